package proxy

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"go.uber.org/zap"

	"github.com/sidecarlb/sidecar/config"
	"github.com/sidecarlb/sidecar/discovery"
)

// testServer is an httptest server, or a proxy listener's Server, that
// counts the connections it accepts.
type testServer struct {
	*httptest.Server // nil for a proxy listener's Server
	URL              string
	Listener         net.Listener
	name             string
	accepts          atomic.Int64
}

type countingListener struct {
	net.Listener
	n *atomic.Int64
}

func (l *countingListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err == nil {
		l.n.Add(1)
	}
	return c, err
}

// startServer starts h on a loopback httptest server, closed when the test
// ends.
func startServer(t testing.TB, h http.Handler) *testServer {
	t.Helper()
	return startServerWith(t, h, nil)
}

// startServerWith is startServer on srv's configuration, when srv is not
// nil.
func startServerWith(t testing.TB, h http.Handler, srv *http.Server) *testServer {
	t.Helper()
	s := &testServer{}
	ts := httptest.NewUnstartedServer(h)
	if srv != nil {
		ts.Config = srv
	}
	ts.Listener = &countingListener{Listener: ts.Listener, n: &s.accepts}
	ts.Start()
	t.Cleanup(ts.Close)
	s.Server, s.URL, s.Listener = ts, ts.URL, ts.Listener
	return s
}

// startProxyServer serves a proxy handler the way the sidecar does, on the
// server NewServer builds, with the timeouts an empty config file gives.
func startProxyServer(t testing.TB, h http.Handler) *testServer {
	t.Helper()
	return startProxyServerWith(t, NewServer(h, sidecarServerOptions(), testLogger(t)))
}

// sidecarServerOptions are the listener options of a sidecar whose file
// sets none: config.Load is where their defaults come from.
func sidecarServerOptions() ServerOptions {
	t := config.Default().Proxy.Timeouts
	return ServerOptions{ReadHeaderTimeout: t.ReadHeader, IdleTimeout: t.Idle}
}

// sidecarTimeouts are the route timeouts the tests ran with before a zero
// idle meant no limit: the connect and idle timeouts an empty file gives.
func sidecarTimeouts() Timeouts {
	t := config.Default().Proxy.Timeouts
	return Timeouts{Connect: t.Connect, Idle: t.Idle}
}

// startProxyServerWith serves srv on a loopback listener until the test
// ends.
func startProxyServerWith(t testing.TB, srv *Server) *testServer {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	s := &testServer{}
	s.Listener = &countingListener{Listener: ln, n: &s.accepts}
	s.URL = "http://" + ln.Addr().String()
	done := make(chan struct{})
	go func() {
		defer close(done)
		_ = srv.Serve(s.Listener)
	}()
	t.Cleanup(func() {
		srv.Close()
		<-done
	})
	return s
}

// nodeHandler answers as examples/echo does: "NAME METHOD PATH" and an
// X-Instance header.
func nodeHandler(name string) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("X-Instance", name)
		_, _ = io.Copy(io.Discard, r.Body)
		fmt.Fprintf(w, "%s %s %s", name, r.Method, r.URL.Path)
	})
}

// startNodes starts n echo nodes named node-0, node-1, …
func startNodes(t testing.TB, n int) []*testServer {
	t.Helper()
	nodes := make([]*testServer, n)
	for i := range nodes {
		name := fmt.Sprintf("node-%d", i)
		nodes[i] = startServer(t, nodeHandler(name))
		nodes[i].name = name
	}
	return nodes
}

func addrs(nodes []*testServer) []string {
	out := make([]string, len(nodes))
	for i, n := range nodes {
		out[i] = n.Listener.Addr().String()
	}
	return out
}

// staticCache returns a discovery cache over a static map of services,
// closed when the test ends.
func staticCache(t testing.TB, services map[string][]string) *discovery.Cache {
	t.Helper()
	st, err := discovery.NewStatic(services)
	if err != nil {
		t.Fatalf("NewStatic() error = %v", err)
	}
	c := discovery.NewCache(st, discovery.CacheOptions{}, testLogger(t))
	t.Cleanup(c.Close)
	return c
}

// recordingResolver records which services were watched: a route was made
// for them and their nodes may be dialled.
type recordingResolver struct {
	Resolver
	mu   sync.Mutex
	seen []string
}

func (r *recordingResolver) Watch(ctx context.Context, service string) (*discovery.Watch, error) {
	r.mu.Lock()
	if !slices.Contains(r.seen, service) {
		r.seen = append(r.seen, service)
	}
	r.mu.Unlock()
	return r.Resolver.Watch(ctx, service)
}

func (r *recordingResolver) watched() []string {
	r.mu.Lock()
	defer r.mu.Unlock()
	return slices.Clone(r.seen)
}

func testLogger(testing.TB) *zap.Logger { return zap.NewNop() }

// startUpstream starts an upstream listener for cfg.
func startUpstream(t testing.TB, resolver Resolver, cfg RouteConfig) *testServer {
	t.Helper()
	if cfg.Timeouts == (Timeouts{}) {
		cfg.Timeouts = sidecarTimeouts()
	}
	h, err := New(resolver, nil, testLogger(t)).Upstream("upstream", cfg)
	if err != nil {
		t.Fatalf("Upstream(%+v) error = %v", cfg, err)
	}
	return startProxyServer(t, h)
}

// newClient returns an HTTP/1.1 client with keep-alive, its idle
// connections closed when the test ends. tune, if not nil, adjusts its
// transport.
func newClient(t testing.TB, tune func(*http.Transport)) *http.Client {
	tr := &http.Transport{MaxIdleConnsPerHost: 64, DisableCompression: true}
	if tune != nil {
		tune(tr)
	}
	t.Cleanup(tr.CloseIdleConnections)
	return &http.Client{Transport: tr, Timeout: 30 * time.Second}
}

type response struct {
	status  int
	header  http.Header
	trailer http.Header
	body    string
}

func do(t testing.TB, c *http.Client, req *http.Request) response {
	t.Helper()
	resp, err := c.Do(req)
	if err != nil {
		t.Fatalf("%s %s: %v", req.Method, req.URL, err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatalf("%s %s: read body: %v", req.Method, req.URL, err)
	}
	return response{status: resp.StatusCode, header: resp.Header, trailer: resp.Trailer, body: string(body)}
}

// goDo sends req from a goroutine of its own, for a test that must feed
// its body or watch the nodes meanwhile. The answer comes on the channel;
// an error, or a failed body read, is told in its body.
func goDo(c *http.Client, req *http.Request) <-chan response {
	answer := make(chan response, 1)
	go func() {
		resp, err := c.Do(req)
		if err != nil {
			answer <- response{body: err.Error()}
			return
		}
		b, err := io.ReadAll(resp.Body)
		resp.Body.Close()
		if err != nil {
			b = append(b, " (read: "+err.Error()+")"...)
		}
		answer <- response{status: resp.StatusCode, header: resp.Header, body: string(b)}
	}()
	return answer
}

func doGet(t testing.TB, c *http.Client, url string, header http.Header) response {
	t.Helper()
	req, err := http.NewRequest(http.MethodGet, url, nil)
	if err != nil {
		t.Fatal(err)
	}
	for k, vv := range header {
		req.Header[k] = vv
	}
	return do(t, c, req)
}

// rawExchange writes raw to addr and reads one response, returning its status
// and body. The status is 0 when the server closed without answering.
func rawExchange(t testing.TB, addr, raw string) (int, string) {
	t.Helper()
	conn, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(10 * time.Second))
	// A server may answer and close before it has read everything.
	_, _ = io.WriteString(conn, raw)
	resp, err := http.ReadResponse(bufio.NewReader(conn), nil)
	if err != nil {
		return 0, err.Error()
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(body)
}
