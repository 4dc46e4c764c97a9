package proxy

import (
	"bytes"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"

	"github.com/sidecarlb/sidecar/config"
	"github.com/sidecarlb/sidecar/internal/wait"
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
	case m.Histogram != nil:
		return float64(m.Histogram.GetSampleCount())
	}
	return 0
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

// resWait is wait.For, under the name the engines' tests in this package
// still call it by.
func resWait(t testing.TB, within time.Duration, what string, cond func() bool) {
	t.Helper()
	wait.For(t, within, what, cond)
}
