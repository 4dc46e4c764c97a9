package proxy

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"
	"golang.org/x/net/http2"

	"github.com/sidecarlb/sidecar/config"
	"github.com/sidecarlb/sidecar/internal/leakcheck"
	"github.com/sidecarlb/sidecar/proxy/resilience"
)

// resDefaults returns proxy.resilience as an empty config file leaves it.
func resDefaults(t testing.TB) config.Resilience {
	t.Helper()
	c, err := config.ParseEnv(nil, "t", nil)
	if err != nil {
		t.Fatal(err)
	}
	return c.Proxy.Resilience
}

// resNode is a backend whose behaviour a test switches while it runs. It
// counts the requests that reach it and keeps the bodies it read.
type resNode struct {
	addr string
	hits atomic.Int64
	// status is what it answers: 0 or 200 for "NAME METHOD PATH" and the
	// body echoed; anything else answers that status with "NAME".
	status atomic.Int64
	// stall makes it hold each request until the client gives up.
	stall atomic.Bool

	mu     sync.Mutex
	bodies [][]byte

	ln  net.Listener
	srv *http.Server
}

func (n *resNode) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	n.hits.Add(1)
	b, _ := io.ReadAll(r.Body)
	if len(b) > 0 {
		n.mu.Lock()
		n.bodies = append(n.bodies, b)
		n.mu.Unlock()
	}
	if n.stall.Load() {
		select {
		case <-r.Context().Done():
		case <-time.After(5 * time.Second):
		}
		return
	}
	w.Header().Set("X-Instance", n.addr)
	if s := int(n.status.Load()); s != 0 && s != http.StatusOK {
		w.WriteHeader(s)
		io.WriteString(w, n.addr)
		return
	}
	io.WriteString(w, n.addr+" "+r.Method+" "+r.URL.Path+"\n")
	w.Write(b)
}

// received returns the bodies the node read so far.
func (n *resNode) received() [][]byte {
	n.mu.Lock()
	defer n.mu.Unlock()
	return append([][]byte(nil), n.bodies...)
}

// start serves the node on addr (a fresh loopback port when empty).
func (n *resNode) start(t testing.TB, addr string) {
	t.Helper()
	if addr == "" {
		addr = "127.0.0.1:0"
	}
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	n.ln, n.addr = ln, ln.Addr().String()
	n.srv = &http.Server{Handler: n}
	go n.srv.Serve(ln)
}

// stop closes the node's listener and connections: dials are refused.
func (n *resNode) stop() { n.srv.Close() }

func resStartNodes(t testing.TB, count int) []*resNode {
	t.Helper()
	nodes := make([]*resNode, count)
	for i := range nodes {
		nodes[i] = &resNode{}
		nodes[i].start(t, "")
		n := nodes[i]
		t.Cleanup(func() { n.stop() })
	}
	return nodes
}

// resDeadAddr returns a loopback address where dials are refused.
func resDeadAddr(_ testing.TB) string {
	// Port 1 on a fresh loopback address: nothing binds there, so dials are
	// refused, and no other test can take it over as it can a freed port.
	n := deadAddrs.Add(1)
	return fmt.Sprintf("127.1.%d.%d:1", n/250, n%250+1)
}

var deadAddrs atomic.Int64

// resSetup is a proxy in front of a static service "svc".
type resSetup struct {
	px  *Proxy
	reg *prometheus.Registry
	url string
}

// staticProxy is a proxy for a static service "svc" on addrs, and the
// registry of its metrics.
func staticProxy(t testing.TB, addrs []string) (*Proxy, *prometheus.Registry) {
	t.Helper()
	reg := prometheus.NewRegistry()
	return New(staticCache(t, map[string][]string{"svc": addrs}), NewMetrics(reg), testLogger(t)), reg
}

// resProxy serves an upstream handler for service svc on addrs, with rc's
// settings (Service is set here).
func resProxy(t testing.TB, addrs []string, rc RouteConfig) *resSetup {
	t.Helper()
	return resProxyClock(t, addrs, rc, resilience.System)
}

// resProxyClock is resProxy with the clock ejections follow.
func resProxyClock(t testing.TB, addrs []string, rc RouteConfig, clock resilience.Clock) *resSetup {
	t.Helper()
	px, reg := staticProxy(t, addrs)
	px.clock = clock
	rc.Service = "svc"
	h, err := px.Upstream("test", rc)
	if err != nil {
		t.Fatal(err)
	}
	srv := httptest.NewServer(h)
	t.Cleanup(srv.Close)
	return &resSetup{px: px, reg: reg, url: srv.URL}
}

type resResponse struct {
	status int
	body   string
	header http.Header
}

// do sends one request through the proxy and reads the whole answer.
func (s *resSetup) do(t testing.TB, method, path string, body []byte) resResponse {
	t.Helper()
	var rd io.Reader
	if body != nil {
		rd = bytes.NewReader(body)
	}
	req, err := http.NewRequest(method, s.url+path, rd)
	if err != nil {
		t.Fatal(err)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatalf("%s %s: %v", method, path, err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatalf("%s %s: read body: %v", method, path, err)
	}
	return resResponse{resp.StatusCode, string(b), resp.Header}
}

// endpoint returns the /status view of the endpoint at addr.
func (s *resSetup) endpoint(t testing.TB, addr string) EndpointStatus {
	t.Helper()
	for _, rs := range s.px.Status() {
		for _, e := range rs.Endpoints {
			if e.Addr == addr {
				return e
			}
		}
	}
	t.Fatalf("Status() has no endpoint %s", addr)
	return EndpointStatus{}
}

// eligible is how many endpoints the route's balancer picks from.
func (s *resSetup) eligible() int {
	s.px.mu.Lock()
	defer s.px.mu.Unlock()
	n := 0
	for _, rt := range s.px.routes {
		if st := rt.state.Load(); st != nil {
			n += st.eligible
		}
	}
	return n
}

// ejected lists the endpoints /status shows ejected.
func (s *resSetup) ejected() []string {
	var out []string
	for _, rs := range s.px.Status() {
		for _, e := range rs.Endpoints {
			if e.EjectedUntil != nil {
				out = append(out, e.Addr)
			}
		}
	}
	return out
}

func (s *resSetup) panicking() bool {
	for _, rs := range s.px.Status() {
		if rs.Panic {
			return true
		}
	}
	return false
}

// metric returns the value of the series of family name whose labels
// include want, or 0 when there is none.
func (s *resSetup) metric(t testing.TB, name string, want map[string]string) float64 {
	t.Helper()
	mfs, err := s.reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() != name {
			continue
		}
	series:
		for _, m := range mf.GetMetric() {
			got := map[string]string{}
			for _, lp := range m.GetLabel() {
				got[lp.GetName()] = lp.GetValue()
			}
			for k, v := range want {
				if got[k] != v {
					continue series
				}
			}
			return resValue(m)
		}
	}
	return 0
}

func resValue(m *dto.Metric) float64 {
	switch {
	case m.Counter != nil:
		return m.Counter.GetValue()
	case m.Gauge != nil:
		return m.Gauge.GetValue()
	}
	return 0
}

func resWait(t testing.TB, within time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(within)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %v waiting for %s", within, what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func resAddrs(nodes []*resNode) []string {
	out := make([]string, len(nodes))
	for i, n := range nodes {
		out[i] = n.addr
	}
	return out
}

func resHits(nodes []*resNode) int64 {
	var sum int64
	for _, n := range nodes {
		sum += n.hits.Load()
	}
	return sum
}

func TestRetryDialRefused(t *testing.T) {
	defaults := resDefaults(t)
	off := defaults
	off.Breaker.Enabled = false
	off.Outlier.Enabled = false
	tests := []struct {
		name string
		res  config.Resilience
	}{
		{"defaults", defaults},
		{"retries only", off},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			nodes := resStartNodes(t, 2)
			dead := resDeadAddr(t)
			s := resProxy(t, append(resAddrs(nodes), dead), RouteConfig{Resilience: tc.res})
			for i := range 30 {
				if r := s.do(t, http.MethodGet, "/get", nil); r.status != http.StatusOK {
					t.Fatalf("GET #%d: status %d (%s), want 200", i, r.status, r.body)
				}
				body := []byte("post body " + strings.Repeat("x", i))
				r := s.do(t, http.MethodPost, "/post", body)
				if r.status != http.StatusOK {
					t.Fatalf("POST #%d: status %d (%s), want 200", i, r.status, r.body)
				}
				if !strings.HasSuffix(r.body, string(body)) {
					t.Fatalf("POST #%d: body %q, want it to end with %q", i, r.body, body)
				}
			}
		})
	}
}

func TestRetryOn503(t *testing.T) {
	res := resDefaults(t)
	res.Outlier.Enabled = false // keep the failing node in rotation
	res.Retries.Backoff = time.Millisecond
	replay := res
	replay.Retries.RetryNonIdempotent = true

	tests := []struct {
		name      string
		method    string
		res       config.Resilience
		want503   bool // some answers are the failing node's 503
		wantOther bool // the failing node's tries were sent on elsewhere
	}{
		{name: "GET retried", method: http.MethodGet, res: res, wantOther: true},
		{name: "POST not retried", method: http.MethodPost, res: res, want503: true},
		{name: "POST retried when allowed", method: http.MethodPost, res: replay, wantOther: true},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			nodes := resStartNodes(t, 3)
			bad := nodes[0]
			bad.status.Store(http.StatusServiceUnavailable)
			s := resProxy(t, resAddrs(nodes), RouteConfig{Resilience: tc.res})
			var got503 int
			var sent [][]byte
			for i := range 30 {
				var body []byte
				if tc.method == http.MethodPost {
					body = []byte("payload-" + strings.Repeat("ab", i))
					sent = append(sent, body)
				}
				r := s.do(t, tc.method, "/x", body)
				switch r.status {
				case http.StatusOK:
				case http.StatusServiceUnavailable:
					if r.header.Get("X-Sidecar-Error") != "" || r.body != bad.addr {
						t.Fatalf("#%d: a 503 that is not the node's: %v %q", i, r.header, r.body)
					}
					got503++
				default:
					t.Fatalf("#%d: status %d (%s)", i, r.status, r.body)
				}
			}
			badHits := bad.hits.Load()
			if badHits == 0 {
				t.Fatal("the failing node got no request")
			}
			if tc.want503 {
				if int64(got503) != badHits {
					t.Errorf("client got %d 503s, failing node got %d requests: want equal (no retry)", got503, badHits)
				}
			} else if got503 != 0 {
				t.Errorf("client got %d 503s, want 0", got503)
			}
			if total := resHits(nodes); tc.wantOther && total != 30+badHits {
				t.Errorf("nodes got %d requests, want 30 + %d retries", total, badHits)
			}
			if tc.method != http.MethodPost {
				return
			}
			// Every try, the failed ones too, carried the request's exact
			// bytes.
			all := map[string]int{}
			for _, n := range nodes {
				for _, b := range n.received() {
					all[string(b)]++
				}
			}
			for _, b := range sent {
				if all[string(b)] == 0 {
					t.Errorf("body %q reached no node", b)
				}
				delete(all, string(b))
			}
			if len(all) != 0 {
				t.Errorf("nodes read bodies that were never sent: %v", all)
			}
			if tc.wantOther {
				// The failing node's bodies were replayed elsewhere.
				for _, b := range bad.received() {
					replayed := false
					for _, n := range nodes[1:] {
						for _, x := range n.received() {
							replayed = replayed || bytes.Equal(x, b)
						}
					}
					if !replayed {
						t.Errorf("body %q sent to the failing node was not replayed", b)
					}
				}
			}
		})
	}
}

func TestRetryPerTryTimeout(t *testing.T) {
	res := resDefaults(t)
	res.Outlier.Enabled = false
	res.Breaker.Enabled = false
	res.Retries.PerTryTimeout = 100 * time.Millisecond
	res.Retries.Backoff = time.Millisecond
	nodes := resStartNodes(t, 3)
	nodes[1].stall.Store(true)
	s := resProxy(t, resAddrs(nodes), RouteConfig{Resilience: res})
	for i := range 9 {
		start := time.Now()
		r := s.do(t, http.MethodGet, "/slow", nil)
		if r.status != http.StatusOK {
			t.Fatalf("GET #%d: status %d (%s), want 200", i, r.status, r.body)
		}
		if d := time.Since(start); d > 3*time.Second {
			t.Errorf("GET #%d took %v: the stalled try was not cut at the per-try timeout", i, d)
		}
	}
	if nodes[1].hits.Load() == 0 {
		t.Error("the stalled node got no request")
	}
	if got := s.metric(t, "sidecar_retries_total", map[string]string{"reason": "per_try_timeout", "outcome": "retried"}); got == 0 {
		t.Error(`sidecar_retries_total{reason="per_try_timeout",outcome="retried"} = 0, want > 0`)
	}
}

func TestRetryAttemptsBound(t *testing.T) {
	base := resDefaults(t)
	base.Retries.Backoff = time.Millisecond
	base.Retries.Budget = config.Budget{Percent: 100, MinPerSecond: 100, Window: time.Second}
	base.Outlier.Enabled = false
	tests := []struct {
		name     string
		nodes    int
		attempts int
		outlier  bool
	}{
		{name: "3 nodes 2 retries", nodes: 3, attempts: 2},
		{name: "5 nodes 2 retries", nodes: 5, attempts: 2},
		{name: "3 nodes 1 retry", nodes: 3, attempts: 1},
		{name: "3 nodes no retry", nodes: 3, attempts: 0},
		// Ejection takes one node out after its first failures: the last
		// try's answer must still be relayed.
		{name: "3 nodes with ejection", nodes: 3, attempts: 2, outlier: true},
		{name: "5 nodes 4 retries with ejection", nodes: 5, attempts: 4, outlier: true},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			res := base
			res.Retries.Attempts = tc.attempts
			if tc.outlier {
				res.Outlier = resDefaults(t).Outlier
				res.Outlier.ConsecutiveFailures = 2
			}
			nodes := resStartNodes(t, tc.nodes)
			for _, n := range nodes {
				n.status.Store(http.StatusServiceUnavailable)
			}
			s := resProxy(t, resAddrs(nodes), RouteConfig{Resilience: res})
			for i := range 20 {
				before := resHits(nodes)
				r := s.do(t, http.MethodGet, "/", nil)
				if r.status != http.StatusServiceUnavailable || r.header.Get("X-Sidecar-Error") != "" {
					t.Fatalf("GET #%d: status %d, X-Sidecar-Error %q, body %q; want the node's own 503",
						i, r.status, r.header.Get("X-Sidecar-Error"), r.body)
				}
				if tries := resHits(nodes) - before; tries < 1 || tries > int64(tc.attempts+1) {
					t.Fatalf("GET #%d reached nodes %d times, want 1 to %d", i, tries, tc.attempts+1)
				}
			}
		})
	}
}

func TestOutlierEjection(t *testing.T) {
	base := resDefaults(t)
	base.Breaker.Enabled = false
	base.Retries.Backoff = time.Millisecond
	base.Outlier.ConsecutiveFailures = 3
	base.Outlier.BaseEjection = 10 * time.Second

	t.Run("consecutive 503s eject", func(t *testing.T) {
		nodes := resStartNodes(t, 3)
		bad := nodes[2]
		bad.status.Store(http.StatusServiceUnavailable)
		s := resProxy(t, resAddrs(nodes), RouteConfig{Resilience: base})
		for i := range 60 {
			if r := s.do(t, http.MethodGet, "/", nil); r.status != http.StatusOK {
				t.Fatalf("GET #%d: status %d, want 200", i, r.status)
			}
		}
		if got := bad.hits.Load(); got != 3 {
			t.Errorf("failing node got %d requests, want 3 (then ejected)", got)
		}
		if got := s.ejected(); len(got) != 1 || got[0] != bad.addr {
			t.Errorf("ejected endpoints = %v, want [%s]", got, bad.addr)
		}
		e := s.endpoint(t, bad.addr)
		if until := time.Until(*e.EjectedUntil); until < 8*time.Second || until > 10*time.Second {
			t.Errorf("ejected_until in %v, want about 10s", until)
		}
		if got := s.metric(t, "sidecar_outlier_ejections_total", map[string]string{"endpoint": bad.addr}); got != 1 {
			t.Errorf("sidecar_outlier_ejections_total = %v, want 1", got)
		}
	})

	t.Run("max ejection percent", func(t *testing.T) {
		nodes := resStartNodes(t, 3)
		for _, n := range nodes {
			n.status.Store(http.StatusServiceUnavailable)
		}
		s := resProxy(t, resAddrs(nodes), RouteConfig{Resilience: base})
		for range 60 {
			s.do(t, http.MethodGet, "/", nil)
		}
		if got := s.ejected(); len(got) != 1 {
			t.Errorf("ejected endpoints = %v, want exactly 1 of 3 (max_ejection_percent 50)", got)
		}
		if got := s.metric(t, "sidecar_outlier_ejections_refused_total", nil); got == 0 {
			t.Error("sidecar_outlier_ejections_refused_total = 0, want > 0")
		}
	})

	for _, tc := range []struct {
		status     int
		ejectOn5xx bool
		want       bool
	}{
		{http.StatusNotFound, false, false},
		{http.StatusTooManyRequests, false, false},
		{http.StatusInternalServerError, false, false},
		{http.StatusNotFound, true, false},
		{http.StatusInternalServerError, true, true},
		{http.StatusBadGateway, false, true},
		{http.StatusGatewayTimeout, false, true},
	} {
		name := http.StatusText(tc.status)
		if tc.ejectOn5xx {
			name += " with eject_on_5xx"
		}
		t.Run(name, func(t *testing.T) {
			res := base
			res.Outlier.EjectOn5xx = tc.ejectOn5xx
			nodes := resStartNodes(t, 3)
			bad := nodes[0]
			bad.status.Store(int64(tc.status))
			s := resProxy(t, resAddrs(nodes), RouteConfig{Resilience: res})
			for range 30 {
				s.do(t, http.MethodGet, "/", nil)
			}
			got := len(s.ejected()) == 1
			if got != tc.want {
				t.Errorf("node answering %d ejected = %v, want %v (ejected: %v)", tc.status, got, tc.want, s.ejected())
			}
		})
	}

	t.Run("ejection ends", func(t *testing.T) {
		res := base
		res.Outlier.BaseEjection = 300 * time.Millisecond
		nodes := resStartNodes(t, 3)
		bad := nodes[1]
		bad.status.Store(http.StatusServiceUnavailable)
		clk := resilience.NewManual(time.Unix(1_700_000_000, 0))
		s := resProxyClock(t, resAddrs(nodes), RouteConfig{Resilience: res}, clk)
		for range 20 {
			s.do(t, http.MethodGet, "/", nil)
		}
		if got := s.ejected(); len(got) != 1 {
			t.Fatalf("ejected endpoints = %v, want [%s]", got, bad.addr)
		}
		bad.status.Store(http.StatusOK)
		hits := bad.hits.Load()
		clk.Advance(299 * time.Millisecond)
		for range 9 {
			s.do(t, http.MethodGet, "/", nil)
		}
		if got := bad.hits.Load(); got != hits {
			t.Errorf("ejected node got %d requests while ejected", got-hits)
		}
		clk.Advance(time.Millisecond)
		if got, n := s.ejected(), s.eligible(); len(got) != 0 || n != len(nodes) {
			t.Fatalf("at the ejection's end: ejected %v, %d eligible, want none and %d", got, n, len(nodes))
		}
		hits = bad.hits.Load()
		for i := range 30 {
			if r := s.do(t, http.MethodGet, "/", nil); r.status != http.StatusOK {
				t.Fatalf("GET #%d: status %d, want 200", i, r.status)
			}
		}
		if got := bad.hits.Load() - hits; got < 8 {
			t.Errorf("returned node got %d of 30 requests, want its share (about 10)", got)
		}
	})

	for _, tc := range []struct {
		name      string
		threshold int
		wantPanic bool
	}{
		{"panic threshold 50 with 1 of 2 left", 50, false},
		{"panic threshold 60 with 1 of 2 left", 60, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			res := base
			res.Outlier.PanicThreshold = tc.threshold
			nodes := resStartNodes(t, 2)
			bad := nodes[0]
			bad.status.Store(http.StatusServiceUnavailable)
			s := resProxy(t, resAddrs(nodes), RouteConfig{Resilience: res})
			for range 20 {
				s.do(t, http.MethodGet, "/", nil)
			}
			if got := s.ejected(); len(got) != 1 {
				t.Fatalf("ejected endpoints = %v, want [%s]", got, bad.addr)
			}
			if got := s.panicking(); got != tc.wantPanic {
				t.Errorf("Status().Panic = %v, want %v", got, tc.wantPanic)
			}
			hits := bad.hits.Load()
			for range 20 {
				s.do(t, http.MethodGet, "/", nil)
			}
			got := bad.hits.Load() - hits
			if tc.wantPanic && got == 0 {
				t.Error("in panic the ejected node got no request, want balancing over all")
			}
			if !tc.wantPanic && got != 0 {
				t.Errorf("ejected node got %d requests, want 0", got)
			}
		})
	}
}

func TestBreakerCycle(t *testing.T) {
	res := resDefaults(t)
	res.Outlier.Enabled = false // the breaker alone keeps traffic off
	res.Breaker.ConsecutiveFailures = 3
	res.Breaker.OpenFor = 300 * time.Millisecond
	res.Retries.Backoff = time.Millisecond
	nodes := resStartNodes(t, 2)
	flaky := nodes[0]
	s := resProxy(t, resAddrs(nodes), RouteConfig{Resilience: res})
	state := func() float64 {
		return s.metric(t, "sidecar_breaker_state", map[string]string{"endpoint": flaky.addr})
	}
	transitions := func(to string) float64 {
		return s.metric(t, "sidecar_breaker_transitions_total", map[string]string{"endpoint": flaky.addr, "state": to})
	}
	get := func(n int) {
		t.Helper()
		for i := range n {
			if r := s.do(t, http.MethodGet, "/", nil); r.status != http.StatusOK {
				t.Fatalf("GET #%d: status %d (%s), want 200", i, r.status, r.body)
			}
		}
	}

	get(4)
	if got := s.endpoint(t, flaky.addr).Breaker; got != "closed" {
		t.Fatalf("breaker = %q, want closed", got)
	}
	flaky.stop() // dials refused from now on
	get(12)
	if got := s.endpoint(t, flaky.addr).Breaker; got != "open" {
		t.Fatalf("after refused dials breaker = %q, want open", got)
	}
	if got := state(); got != 2 {
		t.Errorf("sidecar_breaker_state = %v, want 2 (open)", got)
	}
	openedAt := time.Now()

	// Back on the same port: after open_for one probe goes through, and
	// its success closes the breaker.
	hits := flaky.hits.Load()
	flaky.start(t, flaky.addr)
	t.Cleanup(flaky.stop)
	for time.Since(openedAt) < 200*time.Millisecond {
		get(1)
	}
	if got := flaky.hits.Load() - hits; got != 0 {
		t.Errorf("open breaker let %d requests through before open_for", got)
	}
	resWait(t, 2*time.Second, "the breaker to close", func() bool {
		get(1)
		return s.endpoint(t, flaky.addr).Breaker == "closed"
	})
	if got := state(); got != 0 {
		t.Errorf("sidecar_breaker_state = %v, want 0 (closed)", got)
	}
	for _, to := range []string{"open", "half-open", "closed"} {
		if got := transitions(to); got != 1 {
			t.Errorf(`sidecar_breaker_transitions_total{state=%q} = %v, want 1`, to, got)
		}
	}
	if flaky.hits.Load() == hits {
		t.Error("the revived node got no request")
	}
}

func TestBreakerHalfOpenFailureReopens(t *testing.T) {
	res := resDefaults(t)
	res.Outlier.Enabled = false
	res.Breaker.ConsecutiveFailures = 2
	res.Breaker.OpenFor = 100 * time.Millisecond
	nodes := resStartNodes(t, 2)
	dead := resDeadAddr(t)
	s := resProxy(t, append(resAddrs(nodes), dead), RouteConfig{Resilience: res})
	resWait(t, 2*time.Second, "a second opening", func() bool {
		if r := s.do(t, http.MethodGet, "/", nil); r.status != http.StatusOK {
			t.Fatalf("status %d (%s), want 200", r.status, r.body)
		}
		return s.metric(t, "sidecar_breaker_transitions_total", map[string]string{"endpoint": dead, "state": "open"}) >= 2
	})
	if got := s.metric(t, "sidecar_breaker_transitions_total", map[string]string{"endpoint": dead, "state": "half-open"}); got < 1 {
		t.Errorf(`transitions{state="half-open"} = %v, want >= 1`, got)
	}
	if got := s.metric(t, "sidecar_breaker_transitions_total", map[string]string{"endpoint": dead, "state": "closed"}); got != 0 {
		t.Errorf(`transitions{state="closed"} = %v, want 0: the probe failed`, got)
	}
}

func TestRetryBackoffRespectsCancel(t *testing.T) {
	t.Run("backoff", func(t *testing.T) {
		ctx, cancel := context.WithCancel(context.Background())
		cancel()
		start := time.Now()
		if waitBackoff(ctx, time.Hour, 3) {
			t.Error("backoff() on a cancelled context = true, want false")
		}
		if waitBackoff(ctx, 0, 1) {
			t.Error("backoff() with no delay on a cancelled context = true, want false")
		}
		if !waitBackoff(context.Background(), 0, 1) {
			t.Error("backoff() with no delay = false, want true")
		}
		if d := time.Since(start); d > time.Second {
			t.Errorf("backoff() on a cancelled context took %v", d)
		}
	})

	t.Run("client cancels during backoff", func(t *testing.T) {
		res := resDefaults(t)
		res.Outlier.Enabled = false
		res.Retries.Backoff = 10 * time.Second
		nodes := resStartNodes(t, 2)
		for _, n := range nodes {
			n.status.Store(http.StatusServiceUnavailable)
		}
		s := resProxy(t, resAddrs(nodes), RouteConfig{Resilience: res})
		ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
		defer cancel()
		req, _ := http.NewRequestWithContext(ctx, http.MethodGet, s.url+"/", nil)
		start := time.Now()
		resp, err := http.DefaultClient.Do(req)
		if err == nil {
			resp.Body.Close()
			t.Fatalf("GET: status %d, want the client's deadline", resp.StatusCode)
		}
		if !errors.Is(err, context.DeadlineExceeded) {
			t.Fatalf("GET: %v, want context deadline exceeded", err)
		}
		// The handler stops waiting when the client goes, not after the
		// backoff.
		resWait(t, 2*time.Second, "the handler to return", func() bool {
			return s.metric(t, "sidecar_upstream_requests_in_flight", nil) == 0
		})
		if d := time.Since(start); d > 3*time.Second {
			t.Errorf("handler returned after %v, want soon after the client's 200ms deadline", d)
		}
		if got := resHits(nodes); got != 1 {
			t.Errorf("nodes got %d requests, want 1 (no retry after the client left)", got)
		}
		if got := s.metric(t, "sidecar_retries_total", map[string]string{"outcome": "retried"}); got != 0 {
			t.Errorf(`sidecar_retries_total{outcome="retried"} = %v, want 0: the retry was never sent`, got)
		}
	})
}

// A node's 503 given up for a retry is relayed when the retry fails
// outright: a real answer beats one the sidecar makes up.
func TestRetryRelaysHeldAnswerWhenRetryFails(t *testing.T) {
	res := resDefaults(t)
	res.Outlier.Enabled = false
	res.Breaker.Enabled = false
	res.Retries.Backoff = time.Millisecond
	nodes := resStartNodes(t, 1)
	bad := nodes[0]
	bad.status.Store(http.StatusServiceUnavailable)
	s := resProxy(t, []string{bad.addr, resDeadAddr(t)}, RouteConfig{Resilience: res})
	for i := range 20 {
		r := s.do(t, http.MethodGet, "/x", nil)
		if r.status != http.StatusServiceUnavailable || r.header.Get("X-Sidecar-Error") != "" || r.body != bad.addr {
			t.Fatalf("request %d = %d %q (X-Sidecar-Error %q), want the node's own 503",
				i, r.status, r.body, r.header.Get("X-Sidecar-Error"))
		}
	}
}

// TestRetryCountedWhenSent: a retry counts in sidecar_retries_total and
// against the budget only once its try is sent. A try that fails when the
// request body cannot be sent again, or when no node is left to try, is
// not retried, and so is neither counted nor charged.
func TestRetryCountedWhenSent(t *testing.T) {
	// refuseAfterBody is an h2c node that takes a request's first body
	// bytes, then refuses the stream: never processed, but the body is
	// spoken for.
	refuseAfterBody := func(t *testing.T) *rawH2Node {
		return startRawH2Node(t, func(fr *http2.Framer, f *http2.MetaHeadersFrame) {
			id := f.StreamID
			for {
				g, err := fr.ReadFrame()
				if err != nil {
					return
				}
				if d, ok := g.(*http2.DataFrame); ok && d.StreamID == id {
					break
				}
			}
			_ = fr.WriteRSTStream(id, http2.ErrCodeRefusedStream)
		})
	}
	// dropMidBody is an HTTP/1.1 node that reads a request's first body
	// byte, then drops the connection.
	dropMidBody := func(t *testing.T, tries *atomic.Int64) string {
		return startServer(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			tries.Add(1)
			if r.Method == http.MethodPost {
				_, _ = io.ReadFull(r.Body, make([]byte, 1))
			}
			panic(http.ErrAbortHandler)
		})).Listener.Addr().String()
	}
	tests := []struct {
		name     string
		protocol string
		method   string
		nodes    func(t *testing.T) (addrs []string, tries func() int64)
	}{
		{"h2c nodes refuse a streamed POST after its first bytes", "http2", http.MethodPost, func(t *testing.T) ([]string, func() int64) {
			a, b := refuseAfterBody(t), refuseAfterBody(t)
			return []string{a.addr, b.addr}, func() int64 { return a.headers.Load() + b.headers.Load() }
		}},
		{"http/1.1 nodes drop a streamed POST mid-body", "http", http.MethodPost, func(t *testing.T) ([]string, func() int64) {
			var tries atomic.Int64
			return []string{dropMidBody(t, &tries), dropMidBody(t, &tries)}, tries.Load
		}},
		{"the only node drops a GET", "http", http.MethodGet, func(t *testing.T) ([]string, func() int64) {
			var tries atomic.Int64
			return []string{dropMidBody(t, &tries)}, tries.Load
		}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			leakcheck.Check(t)
			res := resDefaults(t)
			res.Breaker.Enabled = false
			res.Outlier.Enabled = false
			res.Retries.Backoff = time.Millisecond
			res.Retries.RetryNonIdempotent = true
			// One retry a second: a retry wrongly charged would leave none
			// for the next request.
			res.Retries.Budget = config.Budget{Percent: 0, MinPerSecond: 1, Window: time.Second}
			addrs, tries := tc.nodes(t)
			s := resProxy(t, addrs, RouteConfig{Protocol: tc.protocol, Resilience: res})
			const requests = 4
			for i := range requests {
				var body io.Reader
				if tc.method == http.MethodPost {
					body = io.MultiReader(strings.NewReader("streamed body")) // of unknown length: not held for replay
				}
				req, _ := http.NewRequest(tc.method, s.url+"/x", body)
				resp, err := http.DefaultClient.Do(req)
				if err != nil {
					t.Fatalf("request %d: %v", i, err)
				}
				resp.Body.Close()
				if resp.StatusCode != http.StatusBadGateway {
					t.Errorf("request %d: status %d, want 502", i, resp.StatusCode)
				}
			}
			if got := tries(); got != requests {
				t.Errorf("nodes got %d tries, want %d: one per request, none retried", got, requests)
			}
			for _, outcome := range []string{"retried", "budget_exhausted"} {
				if got := s.metric(t, "sidecar_retries_total", map[string]string{"outcome": outcome}); got != 0 {
					t.Errorf(`sidecar_retries_total{outcome=%q} = %v, want 0: no retry was sent`, outcome, got)
				}
			}
		})
	}
}

// feedSource is a client's body whose reads wait for what the test feeds
// them, one read a feed; it can tell whether a read would wait (tryRead).
type feedSource struct {
	feed    chan feedRead // closed for EOF
	started chan struct{} // a read began
	reads   atomic.Int64
}

type feedRead struct {
	p   string
	err error
}

func newFeedSource() *feedSource {
	return &feedSource{feed: make(chan feedRead, 16), started: make(chan struct{}, 16)}
}

func (s *feedSource) Read(p []byte) (int, error) {
	s.reads.Add(1)
	s.started <- struct{}{}
	f, ok := <-s.feed
	if !ok {
		return 0, io.EOF
	}
	return copy(p, f.p), f.err
}

func (s *feedSource) tryRead(p []byte) (int, error, bool) {
	select {
	case f, ok := <-s.feed:
		s.reads.Add(1)
		if !ok {
			return 0, io.EOF, true
		}
		return copy(p, f.p), f.err, true
	default:
		return 0, nil, false
	}
}

func (s *feedSource) Close() error { return nil }

// trailerSource is a feedSource that fills in the request's trailers when
// it reaches the end of the body, as net/http's request body does.
type trailerSource struct {
	*feedSource
	trailer http.Header
}

func (s *trailerSource) Read(p []byte) (int, error) {
	n, err := s.feedSource.Read(p)
	if err == io.EOF {
		s.trailer.Set("X-Sum", "42")
	}
	return n, err
}

// waitRead waits until a read of s has begun.
func (s *feedSource) waitRead(t *testing.T) {
	t.Helper()
	select {
	case <-s.started:
	case <-time.After(5 * time.Second):
		t.Fatal("no read of the source began")
	}
}

type readResult struct {
	p   string
	err error
}

// readAsync reads once from r on a goroutine of its own.
func readAsync(r io.Reader) <-chan readResult {
	c := make(chan readResult, 1)
	go func() {
		buf := make([]byte, 64)
		n, err := r.Read(buf)
		c <- readResult{string(buf[:n]), err}
	}()
	return c
}

func mustResult(t *testing.T, c <-chan readResult, what string) readResult {
	t.Helper()
	select {
	case r := <-c:
		return r
	case <-time.After(5 * time.Second):
		t.Fatalf("%s: the read never returned", what)
		return readResult{}
	}
}

func mustNext(t *testing.T, b *body) io.ReadCloser {
	t.Helper()
	r, ok := b.next()
	if !ok {
		t.Fatal("next() = false, want a reader: no byte was handed to a try")
	}
	return r
}

func readOnce(r io.Reader) (string, error) {
	buf := make([]byte, 64)
	n, err := r.Read(buf)
	return string(buf[:n]), err
}

// TestBodyStaleTry: a try given up while its read of a streamed body waits
// for the client gets nothing from that read, and the bytes it brings go to
// the next try; the body counts as read, and cannot be sent again, only
// once bytes reach a try.
func TestBodyStaleTry(t *testing.T) {
	t.Run("a stale read's bytes go to the next try", func(t *testing.T) {
		src := newFeedSource()
		b := &body{src: src}
		r1 := mustNext(t, b)
		first := readAsync(r1)
		src.waitRead(t)
		r2 := mustNext(t, b) // while r1's read still waits
		src.feed <- feedRead{p: "abc"}
		if got := mustResult(t, first, "try 1"); got.p != "" || got.err != errStaleTry {
			t.Errorf("try 1 Read() = %q, %v; want nothing, %v", got.p, got.err, errStaleTry)
		}
		if !b.replayable() {
			t.Error("replayable() = false after a stale read, want true: no byte reached a try")
		}
		if p, err := readOnce(r2); p != "abc" || err != nil {
			t.Errorf("try 2 Read() = %q, %v; want %q, nil", p, err, "abc")
		}
		if got := src.reads.Load(); got != 1 {
			t.Errorf("source reads = %d, want 1: the kept bytes come first", got)
		}
		if b.replayable() {
			t.Error("replayable() = true after bytes reached try 2, want false")
		}
		if _, ok := b.next(); ok {
			t.Error("next() = true after bytes reached try 2, want false")
		}
		if p, err := readOnce(r1); p != "" || err != errStaleTry {
			t.Errorf("try 1 Read() again = %q, %v; want nothing, %v", p, err, errStaleTry)
		}
		if got := src.reads.Load(); got != 1 {
			t.Errorf("source reads = %d after a stale try's Read, want 1", got)
		}
		src.feed <- feedRead{p: "def"}
		close(src.feed)
		var got []byte
		for {
			p, err := readOnce(r2)
			got = append(got, p...)
			if err == io.EOF {
				break
			}
			if err != nil {
				t.Fatalf("try 2 Read() error = %v", err)
			}
		}
		if string(got) != "def" {
			t.Errorf("try 2 read the rest as %q, want %q", got, "def")
		}
	})

	t.Run("a stale read's trailers reach the next try's own copy", func(t *testing.T) {
		// The source fills in the request's trailers at the end of the
		// body, as net/http's does, while try 2's request, whose trailers
		// are being encoded, must have a map of its own.
		src := &trailerSource{feedSource: newFeedSource(), trailer: http.Header{"X-Sum": nil}}
		b, err := newBody(&http.Request{Body: src, ContentLength: -1, Trailer: src.trailer}, false)
		if err != nil {
			t.Fatal(err)
		}
		first := readAsync(mustNext(t, b))
		src.waitRead(t)
		r2 := mustNext(t, b).(*bodyReader)
		encoded := make(chan struct{})
		go func() {
			defer close(encoded)
			for range 1000 {
				for k, vv := range r2.trailer {
					_, _ = k, vv
				}
			}
		}()
		close(src.feed)
		if got := mustResult(t, first, "try 1"); got.err != errStaleTry {
			t.Errorf("try 1 Read() = %q, %v; want nothing, %v", got.p, got.err, errStaleTry)
		}
		<-encoded
		if p, err := readOnce(r2); p != "" || err != io.EOF {
			t.Fatalf("try 2 Read() = %q, %v; want nothing, EOF", p, err)
		}
		if got := r2.trailer.Get("X-Sum"); got != "42" {
			t.Errorf("try 2's trailer X-Sum = %q after the end of the body, want %q", got, "42")
		}
		r2.trailer.Set("X-Sum", "changed")
		if got := src.trailer.Get("X-Sum"); got != "42" {
			t.Errorf("the request's trailer X-Sum = %q after try 2 changed its own, want %q", got, "42")
		}
	})

	t.Run("the owner's read waits for a stale one and gets its bytes", func(t *testing.T) {
		src := newFeedSource()
		b := &body{src: src}
		first := readAsync(mustNext(t, b))
		src.waitRead(t)
		second := readAsync(mustNext(t, b))
		src.feed <- feedRead{p: "xyz"}
		if got := mustResult(t, first, "try 1"); got.err != errStaleTry {
			t.Errorf("try 1 Read() = %q, %v; want nothing, %v", got.p, got.err, errStaleTry)
		}
		if got := mustResult(t, second, "try 2"); got.p != "xyz" || got.err != nil {
			t.Errorf("try 2 Read() = %q, %v; want %q, nil", got.p, got.err, "xyz")
		}
		if got := src.reads.Load(); got != 1 {
			t.Errorf("source reads = %d, want 1", got)
		}
	})

	t.Run("bytes read after the try was given up wait for the next", func(t *testing.T) {
		// A retry decided on, backing off: no next try yet.
		src := newFeedSource()
		b := &body{src: src}
		first := readAsync(mustNext(t, b))
		src.waitRead(t)
		b.giveUp()
		src.feed <- feedRead{p: "late"}
		if got := mustResult(t, first, "try 1"); got.p != "" || got.err != errStaleTry {
			t.Errorf("try 1 Read() = %q, %v; want nothing, %v", got.p, got.err, errStaleTry)
		}
		if !b.replayable() {
			t.Error("replayable() = false after a given-up try's read, want true")
		}
		if p, err := readOnce(mustNext(t, b)); p != "late" || err != nil {
			t.Errorf("try 2 Read() = %q, %v; want %q, nil", p, err, "late")
		}
	})

	t.Run("tryRead does not wait behind a stale read", func(t *testing.T) {
		src := newFeedSource()
		b := &body{src: src}
		first := readAsync(mustNext(t, b))
		src.waitRead(t)
		r2 := mustNext(t, b).(*bodyReader)
		buf := make([]byte, 64)
		if n, err, ok := r2.tryRead(buf); ok {
			t.Fatalf("tryRead() = %d, %v, true while a stale read holds the source, want ok false", n, err)
		}
		src.feed <- feedRead{p: "q"}
		mustResult(t, first, "try 1")
		if n, err, ok := r2.tryRead(buf); !ok || string(buf[:n]) != "q" || err != nil {
			t.Errorf("tryRead() = %q, %v, %v; want %q, nil, true", buf[:n], err, ok, "q")
		}
		if n, err, ok := r2.tryRead(buf); ok {
			t.Errorf("tryRead() = %d, %v, true with nothing at hand, want ok false", n, err)
		}
		if b.replayable() {
			t.Error("replayable() = true after tryRead handed bytes, want false")
		}
	})

	t.Run("a stale read's EOF", func(t *testing.T) {
		src := newFeedSource()
		b := &body{src: src}
		first := readAsync(mustNext(t, b))
		src.waitRead(t)
		r2 := mustNext(t, b)
		close(src.feed)
		if got := mustResult(t, first, "try 1"); got.err != errStaleTry {
			t.Errorf("try 1 Read() error = %v, want %v", got.err, errStaleTry)
		}
		if p, err := readOnce(r2); p != "" || err != io.EOF {
			t.Errorf("try 2 Read() = %q, %v; want EOF", p, err)
		}
		// An empty body may go again, and still ends at once.
		r3 := mustNext(t, b)
		if p, err := readOnce(r3); p != "" || err != io.EOF {
			t.Errorf("try 3 Read() = %q, %v; want EOF", p, err)
		}
		if got := src.reads.Load(); got != 1 {
			t.Errorf("source reads = %d, want 1: none after EOF", got)
		}
	})

	t.Run("a stale read's error", func(t *testing.T) {
		src := newFeedSource()
		b := &body{src: src}
		first := readAsync(mustNext(t, b))
		src.waitRead(t)
		r2 := mustNext(t, b)
		broken := errors.New("client reset")
		src.feed <- feedRead{p: "ab", err: broken}
		if got := mustResult(t, first, "try 1"); got.err != errStaleTry {
			t.Errorf("try 1 Read() error = %v, want %v", got.err, errStaleTry)
		}
		if err := b.failed(); !errors.Is(err, ErrBadRequestBody) || !errors.Is(err, broken) {
			t.Errorf("failed() = %v, want %v wrapping %v", err, ErrBadRequestBody, broken)
		}
		if p, err := readOnce(r2); p != "ab" || err != nil {
			t.Errorf("try 2 Read() = %q, %v; want %q, nil", p, err, "ab")
		}
		if p, err := readOnce(r2); p != "" || err != broken {
			t.Errorf("try 2 Read() after the kept bytes = %q, %v; want %v", p, err, broken)
		}
	})

	t.Run("a body in memory reads whole on every try", func(t *testing.T) {
		b := &body{src: http.NoBody, buf: []byte("0123456789")}
		r1 := mustNext(t, b)
		if p, _ := io.ReadAll(io.LimitReader(r1, 4)); string(p) != "0123" {
			t.Fatalf("try 1 read %q, want 0123", p)
		}
		r2 := mustNext(t, b)
		if p, err := io.ReadAll(r2); string(p) != "0123456789" || err != nil {
			t.Errorf("try 2 read %q, %v; want the whole body", p, err)
		}
		if p, err := io.ReadAll(r1); string(p) != "456789" || err != nil {
			t.Errorf("try 1 read on %q, %v; want the rest of its own", p, err)
		}
		if !b.replayable() {
			t.Error("replayable() = false for a body in memory, want true")
		}
	})
}

// TestBodyStaleTryHammer: tries move on at random moments while the
// client's bytes trickle in. Whatever the timing, the bytes reach one try
// only, the one that owns the body, whole and in order, and no try after it
// is allowed.
func TestBodyStaleTryHammer(t *testing.T) {
	const (
		parts = 20
		tries = 8
	)
	for round := range 300 {
		pr, pw := io.Pipe()
		b := &body{src: pr}
		// The client starts sending once start tries were begun, the first
		// of them waiting in a read by then, and goes on while more begin.
		start := round%tries + 1
		send := make(chan struct{})
		var want []byte
		for i := range parts {
			want = fmt.Appendf(want, "<%d.%d>", round, i)
		}
		go func() {
			<-send
			for i := range parts {
				if _, err := pw.Write(fmt.Appendf(nil, "<%d.%d>", round, i)); err != nil {
					return
				}
				if i%(round%3+1) == 0 {
					runtime.Gosched()
				}
			}
			pw.Close()
		}()
		type outcome struct {
			got []byte
			err error
		}
		var outcomes []chan outcome
		for try := 1; ; try++ {
			r, ok := b.next()
			if !ok {
				break
			}
			c := make(chan outcome, 1)
			outcomes = append(outcomes, c)
			go func() {
				var o outcome
				buf := make([]byte, 3)
				for {
					n, err := r.Read(buf)
					o.got = append(o.got, buf[:n]...)
					if err != nil {
						o.err = err
						break
					}
				}
				c <- o
			}()
			if try == start {
				close(send)
			}
			if try == tries {
				break // the last try reads to the end
			}
			if try%2 == round%2 {
				runtime.Gosched()
			}
		}
		if len(outcomes) < start {
			close(send)
		}
		var holder int
		var got []byte
		for i, c := range outcomes {
			var o outcome
			select {
			case o = <-c:
			case <-time.After(10 * time.Second):
				t.Fatalf("round %d: try %d never ended", round, i+1)
			}
			switch {
			case o.err == io.EOF:
				holder, got = i+1, o.got
			case o.err != errStaleTry || len(o.got) > 0:
				t.Fatalf("round %d: stale try %d read %q, %v; want nothing, %v", round, i+1, o.got, o.err, errStaleTry)
			}
		}
		if holder != len(outcomes) {
			t.Fatalf("round %d: try %d of %d read to the end, want the last", round, holder, len(outcomes))
		}
		if !bytes.Equal(got, want) {
			t.Fatalf("round %d: try %d read %q, want %q", round, holder, got, want)
		}
	}
}

// startSignallingEcho starts an h2c node that echoes a request's body and
// signals on started when a request reaches it, before it reads the body.
func startSignallingEcho(t testing.TB) (*h2Node, <-chan struct{}) {
	started := make(chan struct{}, 1)
	echo := startH2CNode(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		started <- struct{}{}
		b, err := io.ReadAll(r.Body)
		if err != nil {
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		}
		if v := r.Trailer.Get("X-Sum"); v != "" {
			w.Header().Set("X-Echo-Sum", v) // the request's trailer, seen
		}
		w.Write(b)
	}), nil)
	return echo, started
}

// TestRetryStreamedBodyWhole: a node that answers 503 at once, before it
// reads any of a streamed request body (of unknown length, so not held for
// replay), has the request retried on another node, which gets the whole
// body, byte for byte. The client's first bytes come only once the retry
// is under way, while the first try's body sender still waits for them:
// they must go to the retry, not to the stream that was answered. The
// body's trailer reaches the node too, in the retry's copy of the
// request's trailers, which a stale try's read of the body's end must not
// write while the retry's request is encoded.
func TestRetryStreamedBodyWhole(t *testing.T) {
	tests := []struct {
		name     string
		protocol string // the route's, to the nodes
		app      func(t *testing.T) *http.Client
	}{
		{"h2c app, http2 route", "http2", func(t *testing.T) *http.Client { return h2cClient(t, nil) }},
		{"http/1.1 app, http2 route", "http2", func(t *testing.T) *http.Client { return newClient(t, nil) }},
		{"http/1.1 app, http route", "http", func(t *testing.T) *http.Client { return newClient(t, nil) }},
		{"h2c app, http route", "http", func(t *testing.T) *http.Client { return h2cClient(t, nil) }},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			leakcheck.Check(t)
			var refused atomic.Int64
			unavailable := startH2CNode(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				// Over HTTP/1.1, answer without first reading the body, as
				// an h2 node does anyway.
				_ = http.NewResponseController(w).EnableFullDuplex()
				refused.Add(1)
				w.WriteHeader(http.StatusServiceUnavailable)
			}), nil)
			echo, started := startSignallingEcho(t)
			res := resDefaults(t)
			res.Breaker.Enabled = false
			res.Outlier.Enabled = false
			res.Retries.Backoff = time.Millisecond
			res.Retries.Budget = config.Budget{Percent: 100, MinPerSecond: 100, Window: time.Second}
			sc := startH2Sidecar(t, staticCache(t, map[string][]string{"echo": {unavailable.addr, echo.addr}}),
				RouteConfig{Service: "echo", Protocol: tc.protocol, Resilience: res}, ServerOptions{})
			client := tc.app(t)

			const rounds = 20
			for i := range rounds {
				before := refused.Load()
				parts := [][]byte{randomBytes(5), randomBytes(20 << 10), randomBytes(1), randomBytes(40 << 10)}
				want := bytes.Join(parts, nil)
				pr, pw := io.Pipe()
				ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
				req, _ := http.NewRequestWithContext(ctx, http.MethodPut, sc.URL+"/upload", pr)
				req.Trailer = http.Header{"X-Sum": nil}
				sum := fmt.Sprint(len(want))
				answer := goDo(client, req)
				// The body starts once a node that reads it has the request:
				// after the 503, when the unavailable node was tried first.
				select {
				case <-started:
				case r := <-answer:
					cancel()
					t.Fatalf("round %d: answered %d %q before the echoing node had the request", i, r.status, r.body)
				case <-ctx.Done():
					t.Fatalf("round %d: the request never reached the echoing node", i)
				}
				go func() {
					for _, p := range parts {
						if _, err := pw.Write(p); err != nil {
							return
						}
					}
					req.Trailer.Set("X-Sum", sum) // sent when the body ends
					pw.Close()
				}()
				var r response
				select {
				case r = <-answer:
				case <-ctx.Done():
					pw.CloseWithError(errors.New("test gave up"))
					r = <-answer
				}
				cancel()
				retried := refused.Load() > before
				if r.status != http.StatusOK || r.body != string(want) {
					t.Fatalf("round %d (retried after a 503: %v): %d with %d bytes (equal: %v), want 200 and the %d bytes sent; %.80q",
						i, retried, r.status, len(r.body), r.body == string(want), len(want), r.body)
				}
				if got := r.header.Get("X-Echo-Sum"); got != sum {
					t.Fatalf("round %d (retried after a 503: %v): the node saw trailer X-Sum %q, want %q", i, retried, got, sum)
				}
			}
			if got := refused.Load(); got < rounds/4 {
				t.Fatalf("the unavailable node was tried first in %d of %d rounds, want at least %d", got, rounds, rounds/4)
			}
			if got, want := sc.metric(t, "sidecar_retries_total", map[string]string{"reason": "status_503", "outcome": "retried"}), float64(refused.Load()); got != want {
				t.Errorf(`sidecar_retries_total{status_503, retried} = %v, want %v: one per 503`, got, want)
			}
		})
	}
}

// TestRetryStreamedBodyDuringBackoff: a node fails a request (it resets
// it) before reading any of its streamed body; the client's first bytes
// come once the retry is decided on, while it waits out its backoff. The
// failed try's body sender may still be waiting for them: they must go to
// the retry, not to the failed try, which would leave the body unable to
// be sent again and the client with an error.
func TestRetryStreamedBodyDuringBackoff(t *testing.T) {
	tests := []struct {
		name     string
		protocol string // the route's, to the nodes
		app      func(t *testing.T) *http.Client
	}{
		// Not over an http route: net/http's Transport returns a failed
		// try's error only once its write loop's read of the body returns.
		{"h2c app, http2 route", "http2", func(t *testing.T) *http.Client { return h2cClient(t, nil) }},
		{"http/1.1 app, http2 route", "http2", func(t *testing.T) *http.Client { return newClient(t, nil) }},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			leakcheck.Check(t)
			broken := startH2CNode(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				panic(http.ErrAbortHandler) // a reset stream
			}), nil)
			echo, started := startSignallingEcho(t)
			res := resDefaults(t)
			res.Breaker.Enabled = false
			res.Outlier.Enabled = false
			// Long enough that the first bytes, sent once the retry is
			// decided on, surely come during the backoff; what is asserted
			// does not depend on it.
			res.Retries.Backoff = 400 * time.Millisecond
			res.Retries.Budget = config.Budget{Percent: 100, MinPerSecond: 100, Window: time.Minute}
			sc := startH2Sidecar(t, staticCache(t, map[string][]string{"echo": {broken.addr, echo.addr}}),
				RouteConfig{Service: "echo", Protocol: tc.protocol, Resilience: res}, ServerOptions{})
			client := tc.app(t)

			const wantRetried = 2 // rounds where the broken node goes first
			retried := 0
			for i := 0; retried < wantRetried; i++ {
				if i == 4*wantRetried {
					t.Fatalf("the broken node went first in %d of %d rounds, want %d", retried, i, wantRetried)
				}
				first, rest := randomBytes(100), randomBytes(30<<10)
				want := string(first) + string(rest)
				pr, pw := io.Pipe()
				ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
				req, _ := http.NewRequestWithContext(ctx, http.MethodPut, sc.URL+"/upload", pr)
				answer := goDo(client, req)
				// The failed try gives the body up before the retry takes
				// from the budget: once the budget shows it, what is sent
				// is the retry's.
				spent := retriesSpent(sc.px)
				echoFirst := false
				for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(time.Millisecond) {
					select {
					case <-started:
						echoFirst = true
					default:
					}
					if echoFirst || retriesSpent(sc.px) > spent {
						break
					}
					if time.Now().After(deadline) {
						t.Fatalf("round %d: the request reached no node", i)
					}
				}
				if !echoFirst {
					retried++
				}
				go func() {
					_, _ = pw.Write(first) // a broken round shows in the answer
					if !echoFirst {
						select {
						case <-started:
						case <-ctx.Done():
						}
					}
					_, _ = pw.Write(rest)
					pw.Close()
				}()
				var r response
				select {
				case r = <-answer:
				case <-ctx.Done():
					pw.CloseWithError(errors.New("test gave up"))
					r = <-answer
				}
				cancel()
				pw.CloseWithError(errors.New("round over"))
				if r.status != http.StatusOK || r.body != want {
					t.Fatalf("round %d (retried: %v): %d with %d bytes (equal: %v), want 200 and the %d bytes sent; %.80q",
						i, !echoFirst, r.status, len(r.body), r.body == want, len(want), r.body)
				}
			}
		})
	}
}

// retriesSpent counts the retries p's routes took from their budgets and
// did not give back.
func retriesSpent(p *Proxy) int64 {
	p.mu.Lock()
	defer p.mu.Unlock()
	var n int64
	for _, rt := range p.routes {
		n += rt.budget.Spent()
	}
	return n
}

// TestRetryBudgetPercentWins: through the proxy, the retry budget allows
// percent of the requests in its window as retries when that share is above
// the per-second floor. Every other proxy-level test sets a budget whose
// floor wins, so this one alone holds the percent rule end to end.
func TestRetryBudgetPercentWins(t *testing.T) {
	res := resDefaults(t)
	res.Breaker.Enabled = false
	res.Outlier.Enabled = false
	res.Retries.Attempts = 1
	res.Retries.Backoff = time.Millisecond
	// Floor: 1/s over 10s = 10 retries. Percent: 20% of the requests.
	res.Retries.Budget = config.Budget{Percent: 20, MinPerSecond: 1, Window: 10 * time.Second}
	nodes := resStartNodes(t, 2)
	s := resProxy(t, resAddrs(nodes), RouteConfig{Resilience: res})

	const good, bad = 100, 40
	for i := range good {
		if r := s.do(t, http.MethodGet, "/", nil); r.status != http.StatusOK {
			t.Fatalf("GET #%d: status %d, want 200", i, r.status)
		}
	}
	for _, n := range nodes {
		n.status.Store(http.StatusServiceUnavailable)
	}
	for range bad {
		s.do(t, http.MethodGet, "/", nil)
	}
	// The k-th failing request is retried when the retries so far are
	// under (100+k)*20/100: the first 25 are, then one in five as the
	// requests grow the budget, 28 of the 40 in all (20% of 140). With the
	// floor alone only 10 would be.
	retried := s.metric(t, "sidecar_retries_total", map[string]string{"reason": "status_503", "outcome": "retried"})
	refused := s.metric(t, "sidecar_retries_total", map[string]string{"reason": "status_503", "outcome": "budget_exhausted"})
	if retried != 28 || refused != 12 {
		t.Errorf("sidecar_retries_total{status_503} retried = %v, budget_exhausted = %v; want 28 and 12 (20%% of 140 requests, above the floor of 10)",
			retried, refused)
	}
}

// TestOutlierEjectionGrows: each ejection of the same node lasts base ×
// the times it was ejected, and 100 successes after an ejection forgive
// the earlier ones, so the next lasts base again.
func TestOutlierEjectionGrows(t *testing.T) {
	const base = 200 * time.Millisecond
	res := resDefaults(t)
	res.Breaker.Enabled = false
	res.Retries.Attempts = 0
	res.Outlier.ConsecutiveFailures = 3
	res.Outlier.BaseEjection = base
	res.Outlier.MaxEjection = time.Minute
	nodes := resStartNodes(t, 3)
	bad := nodes[0]
	clk := resilience.NewManual(time.Unix(1_700_000_000, 0))
	s := resProxyClock(t, resAddrs(nodes), RouteConfig{Resilience: res}, clk)

	// ejectOnce fails bad until it is ejected and returns how long the
	// ejection lasts by the route's clock; then moves the clock to its end
	// and checks the node is back.
	ejectOnce := func(t *testing.T) time.Duration {
		t.Helper()
		bad.status.Store(http.StatusServiceUnavailable)
		var until *time.Time
		for i := 0; until == nil; i++ {
			if i == 30 {
				t.Fatal("node answering 503 not ejected after 30 requests")
			}
			s.do(t, http.MethodGet, "/", nil)
			until = s.endpoint(t, bad.addr).EjectedUntil
		}
		bad.status.Store(http.StatusOK)
		d := until.Sub(clk.Now())
		clk.Advance(d)
		if got, n := s.ejected(), s.eligible(); len(got) != 0 || n != len(nodes) {
			t.Fatalf("at the ejection's end: ejected %v, %d eligible, want none and %d", got, n, len(nodes))
		}
		return d
	}
	check := func(t *testing.T, what string, want time.Duration) {
		t.Helper()
		if got := ejectOnce(t); got != want {
			t.Errorf("%s lasted %v, want %v", what, got, want)
		}
	}
	check(t, "first ejection", base)
	check(t, "second ejection", 2*base)
	check(t, "third ejection", 3*base)
	// 100 successes on the node forgive the ejections so far.
	from := bad.hits.Load()
	for i := 0; bad.hits.Load()-from < 100; i++ {
		if i == 1000 {
			t.Fatalf("returned node got %d of 1000 requests, want 100", bad.hits.Load()-from)
		}
		if r := s.do(t, http.MethodGet, "/", nil); r.status != http.StatusOK {
			t.Fatalf("GET: status %d, want 200", r.status)
		}
	}
	check(t, "ejection after 100 successes", base)
}

// TestRetryBackoff: the delay before retry n is between half and all of
// base × 2^(n−1), doubling at most 6 times; no base, no delay.
func TestRetryBackoff(t *testing.T) {
	const base = 40 * time.Millisecond
	for n := 1; n <= 10; n++ {
		d := base << min(n-1, 6)
		for range 50 {
			if got := retryBackoff(base, n); got < d/2 || got > d {
				t.Fatalf("retryBackoff(%v, %d) = %v, want within [%v, %v]", base, n, got, d/2, d)
			}
		}
	}
	if got := retryBackoff(0, 3); got != 0 {
		t.Errorf("retryBackoff(0, 3) = %v, want 0", got)
	}
}
