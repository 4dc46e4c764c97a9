# syntax=docker/dockerfile:1
# Multi-stage build: a static sidecar binary in a small non-root image.
#   docker build -t sidecar --build-arg VERSION=$(git describe --tags --always) --build-arg REVISION=$(git rev-parse HEAD) .
#   docker run --network host -v $PWD/config.yaml:/etc/sidecar/config.yaml:ro sidecar

FROM golang:1.26 AS build
WORKDIR /src
COPY go.mod go.sum ./
RUN go mod download
COPY . .
ARG VERSION=dev
RUN CGO_ENABLED=0 go build -trimpath -ldflags "-s -w -X main.version=${VERSION}" -o /out/sidecar ./cmd/sidecar \
 && /out/sidecar version

FROM gcr.io/distroless/static-debian12:nonroot
ARG VERSION=dev
ARG REVISION=""
LABEL org.opencontainers.image.title="sidecar" \
      org.opencontainers.image.description="Per-instance sidecar: Consul registration with a TTL heartbeat, cached discovery, client-side load balancing of HTTP/1.1, HTTP/2, gRPC, WebSocket and TCP" \
      org.opencontainers.image.source="https://github.com/sidecarlb/sidecar" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}"
COPY --from=build /out/sidecar /usr/local/bin/sidecar
# The config is mounted here; validate it with `sidecar validate -config …`.
VOLUME /etc/sidecar
USER nonroot:nonroot
EXPOSE 15001 15100
ENTRYPOINT ["/usr/local/bin/sidecar"]
CMD ["-config", "/etc/sidecar/config.yaml"]
