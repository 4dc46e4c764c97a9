# The README's two commands: `make demo` runs the demo, `make test` passes
# the tests. Both set up what they need on a fresh machine.

GO        ?= go
CONSUL_VERSION := v1.16.3
NATS_VERSION   := v2.15.3
VERSION   ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo dev)
LDFLAGS   := -s -w -X main.version=$(VERSION)

.PHONY: cover all build consul nats h2spec systemd-analyze chromium promtool test test-short lint bench pgo demo demo-pubsub demo-pubsub-nats clean

all: build

build:
	CGO_ENABLED=0 $(GO) build -trimpath -ldflags '$(LDFLAGS)' -o bin/sidecar ./cmd/sidecar
	CGO_ENABLED=0 $(GO) build -trimpath -o bin/echo ./examples/echo
	CGO_ENABLED=0 $(GO) build -trimpath -o bin/loadgen ./examples/loadgen
	CGO_ENABLED=0 $(GO) build -trimpath -o bin/orders ./examples/orders

# bin/consul: consul from PATH when there is one, else the pinned version
# built from tools/consul (about 6 minutes cold on 2 cores; cached after).
consul: bin/consul

bin/consul: tools/consul/go.mod tools/consul/go.sum
	@mkdir -p bin
	@if command -v consul >/dev/null 2>&1; then \
		echo "using $$(command -v consul)"; ln -sf "$$(command -v consul)" bin/consul; \
	else \
		echo "building consul $(CONSUL_VERSION) into bin/consul (takes a few minutes the first time)"; \
		cd tools/consul && GONOSUMDB=github.com/hashicorp/consul GOFLAGS=-mod=mod \
			$(GO) build -trimpath -o ../../bin/consul github.com/hashicorp/consul; \
	fi
	@touch bin/consul

# bin/nats-server: nats-server from PATH when there is one, else the pinned
# version built from tools/nats; the pub/sub NATS JetStream broker's tests
# start it (test/natsserver).
nats: bin/nats-server

bin/nats-server: tools/nats/go.mod tools/nats/go.sum
	@mkdir -p bin
	@if command -v nats-server >/dev/null 2>&1; then \
		echo "using $$(command -v nats-server)"; ln -sf "$$(command -v nats-server)" bin/nats-server; \
	else \
		echo "building nats-server $(NATS_VERSION) into bin/nats-server"; \
		cd tools/nats && $(GO) build -trimpath -o ../../bin/nats-server github.com/nats-io/nats-server/v2; \
	fi
	@touch bin/nats-server

# bin/h2spec: the HTTP/2 conformance suite TestH2Spec runs, the pinned
# version built from tools/h2spec.
h2spec: bin/h2spec

bin/h2spec: tools/h2spec/go.mod tools/h2spec/go.sum
	@mkdir -p bin
	cd tools/h2spec && $(GO) build -trimpath -o ../../bin/h2spec github.com/summerwind/h2spec/cmd/h2spec
	@touch bin/h2spec

# systemd-analyze rates the example unit's hardening in TestSystemdUnitHardening
# (Debian's systemd package, on the machine already in most images).
systemd-analyze:
	@command -v systemd-analyze >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq systemd; }

# chromium: headless Chromium for TestDashboardInBrowser, which drives the
# admin dashboard through chromedp (Debian's chromium package).
chromium:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
		{ apt-get update -qq && apt-get install -y -qq chromium; }

# promtool checks every metric name and help text of a real sidecar's
# /metrics in TestObservability (Debian's prometheus package; no smaller
# package carries promtool).
promtool:
	@command -v promtool >/dev/null 2>&1 || \
		{ apt-get update -qq && apt-get install -y -qq --no-install-recommends prometheus; }

test: consul nats h2spec systemd-analyze chromium promtool build
	$(GO) test -race -count=1 -timeout 20m ./...

# Coverage of the unit and integration tests together: the sidecar processes
# that test/ starts are built with -cover and write their counters to
# bin/cover/procs when they exit, so cmd/sidecar, heartbeat, supervisor and
# config count what the real processes ran. bin/cover/all.out is the merged
# profile (go tool cover -html=bin/cover/all.out to browse it).
cover: consul nats h2spec systemd-analyze chromium promtool
	@rm -rf bin/cover && mkdir -p bin/cover/procs
	SIDECAR_TEST_COVERDIR=$(CURDIR)/bin/cover/procs $(GO) test -race -count=1 -coverpkg=./... -coverprofile=bin/cover/unit.out ./...
	$(GO) tool covdata textfmt -i bin/cover/procs -o bin/cover/procs.out
	{ cat bin/cover/unit.out; tail -n +2 bin/cover/procs.out; } > bin/cover/all.out
	@awk '/^mode:/ {next} {k = $$1; p = $$1; sub(/\/[^\/]*$$/, "", p); pk[k] = p; st[k] = $$2; if ($$3 > 0) hit[k] = 1} END {for (k in st) {t[pk[k]] += st[k]; T += st[k]; if (k in hit) {c[pk[k]] += st[k]; C += st[k]}} for (p in t) printf "%-55s %5.1f%%\n", p, 100 * c[p] / t[p]; printf "%-55s %5.1f%%\n", "total (statements)", 100 * C / T}' bin/cover/all.out | sort

# Unit tests only: no Consul needed.
test-short:
	$(GO) test -race -count=1 -short ./...

lint:
	@out=$$(gofmt -l $$(git ls-files '*.go')); if [ -n "$$out" ]; then echo "gofmt needed:"; echo "$$out"; exit 1; fi
	$(GO) vet ./...
	$(GO) run honnef.co/go/tools/cmd/staticcheck@v0.8.2 ./...

# Microbenchmarks, then the side-by-side harness (direct, sidecar, HAProxy,
# nginx on loopback; about 8 minutes): figures go to bench/results/ and the
# results section of BENCHMARKS.md. BENCHFLAGS passes options to the harness,
# e.g. BENCHFLAGS='-consul' or BENCHFLAGS='-scenarios h1-get -profile h1-get'.
bench:
	@mkdir -p bench/results
	$(GO) test -run '^$$' -bench . -benchmem ./balancer/ ./discovery/ ./proxy/ > bench/results/micro.txt; \
		status=$$?; cat bench/results/micro.txt; exit $$status
	$(GO) run ./bench/cmd/bench -micro bench/results/micro.txt -update BENCHMARKS.md $(BENCHFLAGS)

# cmd/sidecar/default.pgo: the CPU profile the Go toolchain optimises the
# sidecar with (profile-guided optimisation; every go build of ./cmd/sidecar
# uses it). Rebuilt from one profiled run of every bench scenario, so that
# the profile follows the code; commit the result.
pgo:
	$(GO) run ./bench/cmd/bench -peers sidecar -runs 1 -no-micro -profile all -out bench/results/pgo
	$(GO) tool pprof -proto bench/results/pgo/profiles/*-cpu.pprof > cmd/sidecar/default.pgo

demo: consul build
	./examples/demo.sh

# The pub/sub order flow: two consumers sharing a group, a second group,
# one subscriber's sidecar killed mid-stream, and the count of lost orders.
demo-pubsub: consul build
	./examples/pubsub-demo.sh

# The same order flow on the nats broker (a nats-server with JetStream).
demo-pubsub-nats: consul nats build
	DEMO_BROKER=nats ./examples/pubsub-demo.sh

clean:
	rm -rf bin
