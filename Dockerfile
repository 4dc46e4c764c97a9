# syntax=docker/dockerfile:1
# Multi-stage build: a static sidecar binary in a small non-root image.
#   docker build -t sidecar .
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
COPY --from=build /out/sidecar /usr/local/bin/sidecar
# The config is mounted here; validate it with `sidecar validate -config …`.
VOLUME /etc/sidecar
USER nonroot:nonroot
EXPOSE 15001 15100
ENTRYPOINT ["/usr/local/bin/sidecar"]
CMD ["-config", "/etc/sidecar/config.yaml"]
