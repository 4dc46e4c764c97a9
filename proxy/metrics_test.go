package proxy

import (
	"context"
	"net/http"
	"net/url"
	"slices"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/sidecarlb/sidecar/discovery"
	"github.com/sidecarlb/sidecar/internal/h2/h2test"
)

// series returns the label sets of metric name's series, each as
// "k=v,k=v" in label order.
func series(t *testing.T, reg *prometheus.Registry, name string) []string {
	t.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, mf := range mfs {
		if mf.GetName() != name {
			continue
		}
		for _, m := range mf.GetMetric() {
			var kv []string
			for _, l := range m.GetLabel() {
				kv = append(kv, l.GetName()+"="+l.GetValue())
			}
			out = append(out, strings.Join(kv, ","))
		}
	}
	slices.Sort(out)
	return out
}

// TestMetricsGRPCCode: a gRPC call is counted by its grpc-status, from
// the trailers or from a trailers-only answer, not as a bare 2xx.
func TestMetricsGRPCCode(t *testing.T) {
	node := h2test.StartH2C(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/grpc")
		if r.URL.Path == "/only/Headers" {
			w.Header().Set("Grpc-Status", "7") // trailers-only
			w.WriteHeader(http.StatusOK)
			return
		}
		w.Header().Set("Trailer", "Grpc-Status")
		w.WriteHeader(http.StatusOK)
		_, _ = w.Write([]byte{0, 0, 0, 0, 0})
		w.Header().Set("Grpc-Status", "5")
	}), nil)
	sc := startH2Sidecar(t, staticCache(t, map[string][]string{"svc": {node.Addr}}),
		RouteConfig{Service: "svc", Protocol: "grpc", Timeouts: sidecarTimeouts()}, sidecarServerOptions())
	c := h2test.NewClient(t, nil)
	for _, path := range []string{"/a.B/NotThere", "/a.B/NotThere", "/only/Headers"} {
		req, _ := http.NewRequest(http.MethodPost, sc.URL+path, strings.NewReader("\x00\x00\x00\x00\x00"))
		req.Header.Set("Content-Type", "application/grpc")
		req.Header.Set("Te", "trailers")
		if r := do(t, c, req); r.status != http.StatusOK {
			t.Fatalf("POST %s: status %d, want 200", path, r.status)
		}
	}
	for code, want := range map[string]float64{"NotFound": 2, "PermissionDenied": 1} {
		if got := sc.metric(t, "sidecar_upstream_requests_total", map[string]string{"code": "2xx", "grpc_code": code}); got != want {
			t.Errorf("sidecar_upstream_requests_total{grpc_code=%q} = %v, want %v", code, got, want)
		}
	}
	if got := sc.metric(t, "sidecar_upstream_requests_total", map[string]string{"code": "2xx", "grpc_code": ""}); got != 0 {
		t.Errorf("sidecar_upstream_requests_total{code=2xx, no grpc_code} = %v, want 0: gRPC calls carry their code", got)
	}
}

// TestMetricsRetire: a node that leaves takes every series of its own
// along (requests by code and grpc_code, breaker state and transitions,
// ejections, overflows, TCP connections), and leaves another route's
// series of the same node alone.
func TestMetricsRetire(t *testing.T) {
	reg := prometheus.NewRegistry()
	m := NewMetrics(reg)
	a, b := m.route("api", "svc"), m.route("other", "svc")
	const addr = "10.0.0.1:80"
	for _, rm := range []routeMetrics{a, b} {
		rm.requests.WithLabelValues(addr, "2xx", "").Inc()
		rm.requests.WithLabelValues(addr, "2xx", "NotFound").Inc()
		rm.breakerState.WithLabelValues(addr).Set(2)
		rm.breakerTransitions.WithLabelValues(addr, "open").Inc()
		rm.breakerTransitions.WithLabelValues(addr, "half-open").Inc()
		rm.ejections.WithLabelValues(addr).Inc()
		rm.overflows.WithLabelValues(addr, limitNames[0]).Inc()
		rm.tcpConnections.WithLabelValues(addr).Inc()
	}
	a.retire(addr)
	for _, name := range []string{"sidecar_upstream_requests_total", "sidecar_breaker_state", "sidecar_breaker_transitions_total",
		"sidecar_outlier_ejections_total", "sidecar_upstream_overflows_total", "sidecar_tcp_connections_total"} {
		for _, s := range series(t, reg, name) {
			if strings.Contains(s, "listener=api") {
				t.Errorf("%s{%s} left after its node was retired", name, s)
			}
		}
		if !slices.ContainsFunc(series(t, reg, name), func(s string) bool { return strings.Contains(s, "listener=other") }) {
			t.Errorf("%s: the other route's series of the node went too", name)
		}
	}
}

// TestMetricsNoEndpointLabels: with metrics.endpoint_labels false, the
// series of two nodes are one, with an empty endpoint, and there is no
// per-node breaker state.
func TestMetricsNoEndpointLabels(t *testing.T) {
	nodes := startNodes(t, 2)
	reg := prometheus.NewRegistry()
	px := New(staticCache(t, map[string][]string{"echo": addrs(nodes)}), NewMetricsWith(reg, MetricsOptions{NoEndpointLabels: true}), testLogger(t))
	cfg := RouteConfig{Service: "echo", Timeouts: sidecarTimeouts()}
	cfg.Resilience.Breaker.Enabled = true
	cfg.Resilience.Breaker.ConsecutiveFailures = 5
	h, err := px.Upstream("127.0.0.1:0", cfg)
	if err != nil {
		t.Fatal(err)
	}
	srv := startProxyServer(t, h)
	c := newClient(t, nil)
	for range 4 {
		if r := doGet(t, c, srv.URL+"/", nil); r.status != http.StatusOK {
			t.Fatalf("GET: status %d", r.status)
		}
	}
	for _, s := range series(t, reg, "sidecar_upstream_requests_total") {
		if !strings.Contains(s, "endpoint=,") {
			t.Errorf("sidecar_upstream_requests_total{%s} has an endpoint", s)
		}
	}
	if got := (&resSetup{reg: reg}).metric(t, "sidecar_upstream_requests_total", map[string]string{"code": "2xx"}); got != 4 {
		t.Errorf("sidecar_upstream_requests_total{code=2xx} = %v, want 4 in the one series", got)
	}
	if s := series(t, reg, "sidecar_breaker_state"); len(s) != 0 {
		t.Errorf("sidecar_breaker_state series = %v, want none without endpoint labels", s)
	}
}

// TestMetricsSeriesMadeAtFirstUse: the forward proxy's routes make a
// node's series when they first count something (such a route is often
// made for one request, and at 5,000 services the series never used took
// 20 MB): one 2xx answer leaves one requests series and no overflow
// series; a 5xx adds its own; a series made after its node left is deleted
// again. A configured upstream shows its node's series at zero from the
// start.
func TestMetricsSeriesMadeAtFirstUse(t *testing.T) {
	node := startServer(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/fail" {
			w.WriteHeader(http.StatusBadGateway)
		}
	}))
	reg := prometheus.NewRegistry()
	px := New(staticCache(t, map[string][]string{"echo": {node.Listener.Addr().String()}}), NewMetrics(reg), testLogger(t))
	f, err := px.Forward("forward", RouteConfig{Timeouts: sidecarTimeouts()})
	if err != nil {
		t.Fatal(err)
	}
	srv := startProxyServer(t, f)
	c := newClient(t, func(tr *http.Transport) {
		tr.Proxy = func(*http.Request) (*url.URL, error) { return url.Parse(srv.URL) }
	})
	codes := func() []string {
		var out []string
		for _, s := range series(t, reg, "sidecar_upstream_requests_total") {
			if !strings.Contains(s, "listener=forward") {
				continue
			}
			for kv := range strings.SplitSeq(s, ",") {
				if v, ok := strings.CutPrefix(kv, "code="); ok {
					out = append(out, v)
				}
			}
		}
		return out
	}
	if r := doGet(t, c, "http://echo/", nil); r.status != http.StatusOK {
		t.Fatalf("GET /: status %d", r.status)
	}
	if got := codes(); !slices.Equal(got, []string{"2xx"}) {
		t.Errorf("requests series after one 200 = %v, want [2xx]", got)
	}
	if s := series(t, reg, "sidecar_upstream_overflows_total"); len(s) != 0 {
		t.Errorf("overflow series with no overflow = %v, want none", s)
	}
	if r := doGet(t, c, "http://echo/fail", nil); r.status != http.StatusBadGateway {
		t.Fatalf("GET /fail: status %d", r.status)
	}
	if got := codes(); !slices.Equal(got, []string{"2xx", "5xx"}) {
		t.Errorf("requests series after a 200 and a 502 = %v, want [2xx 5xx]", got)
	}

	// A node that left, whose request in flight then answers.
	rm := px.routes[0].metrics
	e := &endpoint{Endpoint: discovery.Endpoint{ID: "gone", Addr: "10.0.0.9:80"}}
	e.retired.Store(true)
	rm.retire(e.Addr)
	rm.countAnswer(e, http.StatusOK)
	for _, s := range series(t, reg, "sidecar_upstream_requests_total") {
		if strings.Contains(s, e.Addr) {
			t.Errorf("series %s of a node that left", s)
		}
	}

	// A configured upstream, before any request.
	if _, err := px.Upstream("api", RouteConfig{Service: "echo", Timeouts: sidecarTimeouts()}); err != nil {
		t.Fatal(err)
	}
	_, pk, err := px.routes[len(px.routes)-1].pick(context.Background(), 0, false, nil)
	if err != nil {
		t.Fatal(err)
	}
	release(pk)
	var upstream int
	for _, name := range []string{"sidecar_upstream_requests_total", "sidecar_upstream_overflows_total"} {
		for _, s := range series(t, reg, name) {
			if strings.Contains(s, "listener=api") {
				upstream++
			}
		}
	}
	if want := len(codeClasses) + len(limitNames); upstream != want {
		t.Errorf("series of a configured upstream's node before any request = %d, want %d (every class and limit, at zero)", upstream, want)
	}
}

// TestLazySeriesAfterRetire: a node's series first needed after it
// retired (an overflow or an answer of a request that was waiting when
// the node left) is not made, so it cannot outlive the node; another
// endpoint's series at the same address is left alone.
func TestLazySeriesAfterRetire(t *testing.T) {
	reg := prometheus.NewRegistry()
	m := NewMetrics(reg).route("api", "svc")
	const addr = "10.0.0.1:80"
	var retired atomic.Bool
	retired.Store(true)
	var over lazyCounter
	over.make(m.overflows, &retired, addr, limitNames[0]).Inc()
	var answer lazyCounter
	answer.make(m.requests, &retired, addr, "5xx", "").Inc()
	for _, name := range []string{"sidecar_upstream_overflows_total", "sidecar_upstream_requests_total"} {
		if s := series(t, reg, name); len(s) != 0 {
			t.Errorf("%s = %v after the node retired, want none", name, s)
		}
	}
	// The same address's series, made by a newer endpoint, stays when
	// the retired one counts.
	var live atomic.Bool
	var newer lazyCounter
	newer.make(m.requests, &live, addr, "5xx", "").Inc()
	var older lazyCounter
	older.make(m.requests, &retired, addr, "5xx", "").Inc()
	if s := series(t, reg, "sidecar_upstream_requests_total"); len(s) != 1 {
		t.Errorf("series = %v, want the newer endpoint's", s)
	}
}

// TestRebuildKeepsSharedSeries: when an instance comes back at the same
// address under a new ID, the endpoint that left does not take the
// series the new one counts into; when the address leaves, they go.
func TestRebuildKeepsSharedSeries(t *testing.T) {
	reg := prometheus.NewRegistry()
	px := New(staticCache(t, map[string][]string{}), NewMetrics(reg), testLogger(t))
	rt, err := newRoute(px, "l", RouteConfig{Service: "billing"})
	if err != nil {
		t.Fatal(err)
	}
	rebuild := func(ids ...string) *routeState {
		s := &discovery.Snapshot{Service: "billing", Updated: time.Now()}
		for _, id := range ids {
			s.Endpoints = append(s.Endpoints, discovery.NewEndpoint(id, "127.0.0.1", 1, nil, nil, 1))
		}
		rt.mu.Lock()
		defer rt.mu.Unlock()
		return rt.rebuildLocked(s)
	}
	answers := func() float64 {
		return (&resSetup{reg: reg}).metric(t, "sidecar_upstream_requests_total", map[string]string{"code": "2xx", "endpoint": "127.0.0.1:1"})
	}
	rt.metrics.countAnswer(rebuild("old").endpoints["old"], 200)
	rt.metrics.countAnswer(rebuild("new").endpoints["new"], 200)
	if got := answers(); got != 2 {
		t.Errorf("answers at the address after it came back under a new ID = %v, want 2 in the one series", got)
	}
	rebuild()
	for _, s := range series(t, reg, "sidecar_upstream_requests_total") {
		t.Errorf("sidecar_upstream_requests_total{%s} left after the address left", s)
	}
}
