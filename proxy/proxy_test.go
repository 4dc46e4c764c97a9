package proxy

import (
	"bufio"
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/sidecarlb/sidecar/internal/leakcheck"

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

func TestUpstreamRoundRobin(t *testing.T) {
	leakcheck.Check(t)
	nodes := startNodes(t, 3)
	px := startUpstream(t, staticCache(t, map[string][]string{"echo": addrs(nodes)}),
		RouteConfig{Service: "echo", Balancer: "round_robin"})
	client := newClient(t, nil)

	counts := map[string]int{}
	for i := range 300 {
		resp := doGet(t, client, px.URL+"/rr", nil)
		if resp.status != http.StatusOK {
			t.Fatalf("request %d: status = %d, want 200; body %q", i, resp.status, resp.body)
		}
		inst := resp.header.Get("X-Instance")
		if want := inst + " GET /rr"; resp.body != want {
			t.Fatalf("request %d: body = %q, want %q", i, resp.body, want)
		}
		counts[inst]++
	}
	for _, n := range nodes {
		if got := counts[n.name]; got != 100 {
			t.Errorf("requests to %s = %d, want 100 (all: %v)", n.name, got, counts)
		}
		// Keep-alive: one connection per node carried all its requests.
		if got := n.accepts.Load(); got != 1 {
			t.Errorf("connections accepted by %s = %d, want 1", n.name, got)
		}
	}
	if got := px.accepts.Load(); got != 1 {
		t.Errorf("connections accepted by the proxy = %d, want 1", got)
	}
}

func TestUpstreamHashByHeader(t *testing.T) {
	leakcheck.Check(t)
	nodes := startNodes(t, 3)
	px := startUpstream(t, staticCache(t, map[string][]string{"echo": addrs(nodes)}),
		RouteConfig{Service: "echo", Balancer: "hash", HashKey: "header:X-User"})
	client := newClient(t, nil)

	first := ""
	for i := range 50 {
		inst := doGet(t, client, px.URL+"/", http.Header{"X-User": {"alice"}}).header.Get("X-Instance")
		if i == 0 {
			first = inst
		} else if inst != first {
			t.Fatalf("request %d for alice went to %s, earlier ones to %s", i, inst, first)
		}
	}
	users := map[string]string{} // user → instance
	spread := map[string]int{}
	for round := range 2 {
		for u := range 30 {
			user := fmt.Sprintf("user-%d", u)
			inst := doGet(t, client, px.URL+"/", http.Header{"X-User": {user}}).header.Get("X-Instance")
			if round == 1 && users[user] != inst {
				t.Errorf("%s went to %s, then to %s", user, users[user], inst)
			}
			users[user] = inst
			spread[inst]++
		}
	}
	if len(spread) < 2 {
		t.Errorf("30 users all went to %v, want them spread over more than one node", spread)
	}
	// Without the key the hash balancer rotates.
	noKey := map[string]bool{}
	for range 3 {
		noKey[doGet(t, client, px.URL+"/", nil).header.Get("X-Instance")] = true
	}
	if len(noKey) != 3 {
		t.Errorf("3 requests without X-User went to %v, want 3 nodes", noKey)
	}
}

func TestUpstreamStreamsResponse(t *testing.T) {
	leakcheck.Check(t)
	// The node writes a chunk, then holds the next one until the client has
	// this one: a proxy that held the response back would never deliver it.
	gate := make(chan struct{})
	node := startServer(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		rc := http.NewResponseController(w)
		for i := range 3 {
			if i > 0 {
				select {
				case <-gate:
				case <-r.Context().Done():
					return
				}
			}
			fmt.Fprintf(w, "chunk-%d;", i)
			if err := rc.Flush(); err != nil {
				return
			}
		}
	}))
	px := startUpstream(t, staticCache(t, map[string][]string{"echo": {node.Listener.Addr().String()}}),
		RouteConfig{Service: "echo"})
	client := newClient(t, nil)
	resp, err := client.Get(px.URL + "/stream")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()

	br := bufio.NewReader(resp.Body)
	for i := range 3 {
		got := make(chan string, 1)
		go func() {
			s, _ := br.ReadString(';')
			got <- s
		}()
		select {
		case s := <-got:
			if want := fmt.Sprintf("chunk-%d;", i); s != want {
				t.Fatalf("chunk %d = %q, want %q", i, s, want)
			}
		case <-time.After(10 * time.Second):
			// Fail rather than hang; the body read ends with the test's
			// cleanups.
			t.Fatalf("chunk %d never reached the client while the node waited: the proxy held it back", i)
		}
		if i < 2 {
			gate <- struct{}{}
		}
	}
	if rest, err := io.ReadAll(br); err != nil || len(rest) != 0 {
		t.Errorf("after the last chunk: %q, %v; want EOF", rest, err)
	}
}

func TestUpstreamStreamsRequestBody(t *testing.T) {
	leakcheck.Check(t)
	gotFirst := make(chan struct{})
	node := startServer(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		first := make([]byte, 5)
		if _, err := io.ReadFull(r.Body, first); err != nil {
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		}
		close(gotFirst)
		rest, err := io.ReadAll(r.Body)
		if err != nil {
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		}
		fmt.Fprintf(w, "%s|%s", first, rest)
	}))
	px := startUpstream(t, staticCache(t, map[string][]string{"echo": {node.Listener.Addr().String()}}),
		RouteConfig{Service: "echo"})
	client := newClient(t, nil)

	pr, pw := io.Pipe()
	go func() {
		// The second part is written only once the node has the first: a
		// proxy that buffered the body would never deliver it.
		_, _ = io.WriteString(pw, "first")
		select {
		case <-gotFirst:
			_, _ = io.WriteString(pw, "second")
			_ = pw.Close()
		case <-time.After(10 * time.Second):
			pw.CloseWithError(errors.New("the node never got the first part of the body"))
		}
	}()
	req, _ := http.NewRequest(http.MethodPost, px.URL+"/upload", pr)
	resp := do(t, client, req)
	if resp.status != http.StatusOK || resp.body != "first|second" {
		t.Errorf("POST streamed body: status = %d, body %q; want 200 %q", resp.status, resp.body, "first|second")
	}
}

func TestUpstreamLargeBodies(t *testing.T) {
	leakcheck.Check(t)
	// A full-duplex echo: the node streams the body back as it reads it.
	node := startServer(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		_ = http.NewResponseController(w).EnableFullDuplex()
		w.Header().Set("Content-Type", "application/octet-stream")
		_, _ = io.Copy(w, r.Body)
	}))
	px := startUpstream(t, staticCache(t, map[string][]string{"echo": {node.Listener.Addr().String()}}),
		RouteConfig{Service: "echo"})
	client := newClient(t, nil)

	body := make([]byte, 8<<20)
	_, _ = rand.Read(body)
	want := sha256.Sum256(body)
	tests := []struct {
		name string
		body func() io.Reader
	}{
		{"content length", func() io.Reader { return bytes.NewReader(body) }},
		{"chunked", func() io.Reader { return io.MultiReader(bytes.NewReader(body)) }},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			for range 2 { // the second rides the kept-alive connection
				req, _ := http.NewRequest(http.MethodPost, px.URL+"/echo", tc.body())
				resp, err := client.Do(req)
				if err != nil {
					t.Fatal(err)
				}
				h := sha256.New()
				n, err := io.Copy(h, resp.Body)
				resp.Body.Close()
				if err != nil {
					t.Fatalf("read echoed body: %v after %d bytes", err, n)
				}
				if n != int64(len(body)) || !bytes.Equal(h.Sum(nil), want[:]) {
					t.Fatalf("echoed body: %d bytes, sha256 %s; want %d bytes, %s", n,
						hex.EncodeToString(h.Sum(nil)), len(body), hex.EncodeToString(want[:]))
				}
			}
		})
	}
}

func TestUpstreamTrailers(t *testing.T) {
	leakcheck.Check(t)
	node := startServer(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Trailer", "X-Checksum")
		fmt.Fprint(w, "payload")
		w.(http.Flusher).Flush()
		w.Header().Set("X-Checksum", "abc123")
		w.Header().Set(http.TrailerPrefix+"X-Late", "undeclared")
	}))
	px := startUpstream(t, staticCache(t, map[string][]string{"echo": {node.Listener.Addr().String()}}),
		RouteConfig{Service: "echo"})
	resp := doGet(t, newClient(t, nil), px.URL+"/", nil)
	if resp.status != http.StatusOK || resp.body != "payload" {
		t.Fatalf("status = %d, body %q; want 200 payload", resp.status, resp.body)
	}
	for k, want := range map[string]string{"X-Checksum": "abc123", "X-Late": "undeclared"} {
		if got := resp.trailer.Get(k); got != want {
			t.Errorf("trailer %s = %q, want %q (trailers: %v)", k, got, want, resp.trailer)
		}
	}
}

func TestUpstreamErrors(t *testing.T) {
	leakcheck.Check(t)
	closed := resDeadAddr(t)

	release := make(chan struct{})
	slow := startServer(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		select {
		case <-release:
		case <-r.Context().Done():
		}
	}))
	t.Cleanup(func() { close(release) }) // runs before slow closes

	slowBody := startServer(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Length", "100")
		fmt.Fprint(w, "partial")
		w.(http.Flusher).Flush()
		select {
		case <-release:
		case <-r.Context().Done():
		}
	}))

	cache := staticCache(t, map[string][]string{
		"empty":     {},
		"refused":   {closed},
		"slow":      {slow.Listener.Addr().String()},
		"slow-body": {slowBody.Listener.Addr().String()},
	})
	tests := []struct {
		name    string
		cfg     RouteConfig
		status  int
		code    string
		service string // the body must name it
	}{
		{"no endpoints", RouteConfig{Service: "empty"}, http.StatusServiceUnavailable, "no_healthy_endpoints", "empty"},
		{"not registered", RouteConfig{Service: "nosuch"}, http.StatusServiceUnavailable, "no_healthy_endpoints", "nosuch"},
		{"tag filter leaves none", RouteConfig{Service: "slow", Tags: []string{"canary"}}, http.StatusServiceUnavailable, "no_healthy_endpoints", "slow"},
		{"dial refused", RouteConfig{Service: "refused"}, http.StatusBadGateway, "connect_failed", "refused"},
		{"request timeout", RouteConfig{Service: "slow", Timeouts: Timeouts{Request: 100 * time.Millisecond}},
			http.StatusGatewayTimeout, "upstream_timeout", "slow"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			px := startUpstream(t, cache, tc.cfg)
			resp := doGet(t, newClient(t, nil), px.URL+"/", nil)
			if resp.status != tc.status {
				t.Errorf("status = %d, want %d; body %q", resp.status, tc.status, resp.body)
			}
			if got := resp.header.Get("X-Sidecar-Error"); got != tc.code {
				t.Errorf("X-Sidecar-Error = %q, want %q", got, tc.code)
			}
			if n := strings.Count(resp.body, strconv.Quote(tc.service)); n != 1 {
				t.Errorf("body = %q, want it to name %q once", resp.body, tc.service)
			}
		})
	}

	t.Run("timeout mid-body", func(t *testing.T) {
		px := startUpstream(t, cache, RouteConfig{Service: "slow-body", Timeouts: Timeouts{Request: 100 * time.Millisecond}})
		resp, err := newClient(t, nil).Get(px.URL + "/")
		if err != nil {
			return // cut before the header reached the client: an error too
		}
		defer resp.Body.Close()
		body, err := io.ReadAll(resp.Body)
		if err == nil {
			t.Errorf("read body = %q, nil; want an error, not a clean short body", body)
		}
	})
}

func TestUpstreamDiscoveryDown(t *testing.T) {
	leakcheck.Check(t)
	cache := discovery.NewCache(failingBackend{}, discovery.CacheOptions{ResolveTimeout: 50 * time.Millisecond}, testLogger(t))
	t.Cleanup(cache.Close)
	px := startUpstream(t, cache, RouteConfig{Service: "echo"})
	resp := doGet(t, newClient(t, nil), px.URL+"/", nil)
	if resp.status != http.StatusServiceUnavailable || resp.header.Get("X-Sidecar-Error") != "discovery_unavailable" {
		t.Errorf("status = %d, X-Sidecar-Error %q; want 503 discovery_unavailable", resp.status, resp.header.Get("X-Sidecar-Error"))
	}
}

// dyingNode answers with a header and part of the body, then drops the
// connection.
func dyingNode(t testing.TB, head string) *testServer {
	return startServer(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		conn, brw, err := http.NewResponseController(w).Hijack()
		if err != nil {
			t.Errorf("Hijack() error = %v", err)
			return
		}
		defer conn.Close()
		_, _ = brw.WriteString(head)
		_ = brw.Flush()
	}))
}

func TestUpstreamNodeDiesMidBody(t *testing.T) {
	leakcheck.Check(t)
	tests := []struct {
		name string
		head string
	}{
		{"content length", "HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\nonly ten b"},
		{"chunked", "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\na\r\nonly ten b\r\n"},
		{"chunked mid chunk", "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n64\r\nonly ten b"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			node := dyingNode(t, tc.head)
			px := startUpstream(t, staticCache(t, map[string][]string{"echo": {node.Listener.Addr().String()}}),
				RouteConfig{Service: "echo"})
			resp, err := newClient(t, nil).Get(px.URL + "/")
			if err != nil {
				return // broken before the header: an error too
			}
			defer resp.Body.Close()
			body, err := io.ReadAll(resp.Body)
			if err == nil {
				t.Errorf("read body = %q, nil; want an error, not a clean short body", body)
			}
		})
	}
}

func TestUpstreamHeaders(t *testing.T) {
	leakcheck.Check(t)
	type seen struct {
		host   string
		header http.Header
	}
	got := make(chan seen, 1)
	node := startServer(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		got <- seen{r.Host, r.Header.Clone()}
		w.Header().Set("Connection", "X-Node-Hop")
		w.Header().Set("X-Node-Hop", "1")
		w.Header().Set("Keep-Alive", "timeout=5")
		w.Header().Set("X-Node", "kept")
	}))
	nodeAddr := node.Listener.Addr().String()
	cache := staticCache(t, map[string][]string{"echo": {nodeAddr}})

	tests := []struct {
		name         string
		preserveHost bool
		header       http.Header
		want         http.Header // values the node must see
		absent       []string    // headers the node must not see
		wantHost     string
	}{
		{
			name: "hop by hop removed",
			header: http.Header{
				"Connection":          {"X-Hop, x-other"},
				"X-Hop":               {"1"},
				"X-Other":             {"1"},
				"Keep-Alive":          {"timeout=5"},
				"Proxy-Authorization": {"Basic eDp5"},
				"Proxy-Connection":    {"keep-alive"},
				"X-End-To-End":        {"yes"},
				"User-Agent":          {"test-agent"},
			},
			want:     http.Header{"X-End-To-End": {"yes"}, "User-Agent": {"test-agent"}},
			absent:   []string{"Connection", "X-Hop", "X-Other", "Keep-Alive", "Proxy-Authorization", "Proxy-Connection"},
			wantHost: nodeAddr,
		},
		{
			name:     "te trailers kept",
			header:   http.Header{"Te": {"trailers"}},
			want:     http.Header{"Te": {"trailers"}},
			wantHost: nodeAddr,
		},
		{
			name:     "te trailers kept when listed in connection",
			header:   http.Header{"Connection": {"TE"}, "Te": {"trailers, deflate"}},
			want:     http.Header{"Te": {"trailers"}},
			wantHost: nodeAddr,
		},
		{
			name:     "te without trailers removed",
			header:   http.Header{"Te": {"gzip"}},
			absent:   []string{"Te"},
			wantHost: nodeAddr,
		},
		{
			name:     "forwarded for appended",
			header:   http.Header{"X-Forwarded-For": {"10.0.0.1, 10.0.0.2"}},
			want:     http.Header{"X-Forwarded-For": {"10.0.0.1, 10.0.0.2, 127.0.0.1"}, "X-Forwarded-Proto": {"http"}},
			wantHost: nodeAddr,
		},
		{
			name:     "forwarded set",
			want:     http.Header{"X-Forwarded-For": {"127.0.0.1"}, "X-Forwarded-Proto": {"http"}},
			absent:   []string{"User-Agent"}, // none sent, and not Go's default
			wantHost: nodeAddr,
		},
		{
			name:     "forwarded proto kept",
			header:   http.Header{"X-Forwarded-Proto": {"https"}},
			want:     http.Header{"X-Forwarded-Proto": {"https"}},
			wantHost: nodeAddr,
		},
		{
			name:         "host preserved",
			preserveHost: true,
			want:         http.Header{"X-Forwarded-Proto": {"http"}},
			wantHost:     "echo.example:8080",
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			px := startUpstream(t, cache, RouteConfig{Service: "echo", PreserveHost: tc.preserveHost})
			req, _ := http.NewRequest(http.MethodGet, px.URL+"/h", nil)
			req.Host = "echo.example:8080"
			req.Header["User-Agent"] = []string{""} // sends none
			for k, vv := range tc.header {
				req.Header[k] = vv
			}
			resp := do(t, newClient(t, nil), req)
			if resp.status != http.StatusOK {
				t.Fatalf("status = %d, want 200; body %q", resp.status, resp.body)
			}
			s := <-got
			if s.host != tc.wantHost {
				t.Errorf("node saw Host %q, want %q", s.host, tc.wantHost)
			}
			for k, want := range tc.want {
				if g := s.header[k]; !slices.Equal(g, want) {
					t.Errorf("node saw %s = %q, want %q", k, g, want)
				}
			}
			for _, k := range tc.absent {
				if g, ok := s.header[k]; ok {
					t.Errorf("node saw %s = %q, want it removed", k, g)
				}
			}
			// The node's hop-by-hop response headers stop at the proxy.
			for _, k := range []string{"X-Node-Hop", "Keep-Alive"} {
				if g, ok := resp.header[k]; ok {
					t.Errorf("client saw %s = %q, want it removed", k, g)
				}
			}
			if g := resp.header.Get("X-Node"); g != "kept" {
				t.Errorf("client saw X-Node = %q, want kept", g)
			}
		})
	}
}

func TestMalformedRequests(t *testing.T) {
	leakcheck.Check(t)
	nodes := startNodes(t, 1)
	cache := staticCache(t, map[string][]string{"echo": addrs(nodes)})
	p := New(cache, nil, testLogger(t))
	up, err := p.Upstream("upstream", RouteConfig{Service: "echo"})
	if err != nil {
		t.Fatal(err)
	}
	fw, err := p.Forward("forward", RouteConfig{})
	if err != nil {
		t.Fatal(err)
	}
	servers := map[string]*testServer{
		"upstream": startProxyServer(t, up),
		"forward":  startProxyServer(t, fw),
	}

	common := []struct {
		name string
		raw  string
	}{
		// At least 14 bytes: see TestShortGarbage.
		{"garbage", "GARBAGE GARBAGE GARBAGE\r\n\r\n"},
		{"binary", "\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n"},
		{"no host", "GET / HTTP/1.1\r\n\r\n"},
		{"two hosts", "GET / HTTP/1.1\r\nHost: echo\r\nHost: other\r\n\r\n"},
		{"bad header line", "GET / HTTP/1.1\r\nHost: echo\r\nNo colon here\r\n\r\n"},
		{"space before colon", "GET / HTTP/1.1\r\nHost: echo\r\nX-A : b\r\n\r\n"},
		{"bad escape", "GET /%zz HTTP/1.1\r\nHost: echo\r\n\r\n"},
		{"missing version", "GET /\r\nHost: echo\r\n\r\n"},
		{"bad version", "GET / HTTP/1.x\r\nHost: echo\r\n\r\n"},
		{"bad host", "GET / HTTP/1.1\r\nHost: ec ho\r\n\r\n"},
		{"negative length", "POST / HTTP/1.1\r\nHost: echo\r\nContent-Length: -1\r\n\r\n"},
		{"bad length", "POST / HTTP/1.1\r\nHost: echo\r\nContent-Length: 1x\r\n\r\n"},
		{"two lengths", "POST / HTTP/1.1\r\nHost: echo\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab"},
		{"huge header", "GET / HTTP/1.1\r\nHost: echo\r\nX-Big: " + strings.Repeat("a", 2<<20) + "\r\n\r\n"},
		{"nul in header", "GET / HTTP/1.1\r\nHost: echo\r\nX-A: a\x00b\r\n\r\n"},
	}
	forwardOnly := []struct {
		name string
		raw  string
	}{
		{"empty host", "GET / HTTP/1.1\r\nHost:\r\n\r\n"},
		{"http/1.0 without host", "GET / HTTP/1.0\r\n\r\n"},
		{"ip host", "GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"},
		{"ip absolute", "GET http://127.0.0.1:1/ HTTP/1.1\r\nHost: echo\r\n\r\n"},
		{"ipv6 absolute", "GET http://[::1]:1/ HTTP/1.1\r\nHost: echo\r\n\r\n"},
		{"slash in host", "GET / HTTP/1.1\r\nHost: a/b\r\n\r\n"},
		{"percent in host", "GET / HTTP/1.1\r\nHost: e%63ho\r\n\r\n"},
		{"localhost", "GET / HTTP/1.1\r\nHost: localhost:80\r\n\r\n"},
		{"connect", "CONNECT echo:443 HTTP/1.1\r\nHost: echo:443\r\n\r\n"},
		{"connect ip", "CONNECT 127.0.0.1:22 HTTP/1.1\r\nHost: 127.0.0.1:22\r\n\r\n"},
	}
	for name, srv := range servers {
		cases := common
		if name == "forward" {
			cases = append(slices.Clone(common), forwardOnly...)
		}
		for _, tc := range cases {
			t.Run(name+"/"+tc.name, func(t *testing.T) {
				status, body := rawExchange(t, srv.Listener.Addr().String(), tc.raw)
				if status < 400 || status > 499 {
					t.Errorf("status = %d (%q), want 4xx", status, body)
				}
			})
		}
		t.Run(name+"/unknown transfer coding", func(t *testing.T) {
			// RFC 9112 section 6.1: 501 for a coding the server does not know.
			raw := "POST / HTTP/1.1\r\nHost: echo\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n"
			if status, body := rawExchange(t, srv.Listener.Addr().String(), raw); status != http.StatusNotImplemented {
				t.Errorf("status = %d (%q), want 501", status, body)
			}
		})
		// The listener still serves well-formed requests.
		status, body := rawExchange(t, srv.Listener.Addr().String(), "GET /ok HTTP/1.1\r\nHost: echo\r\n\r\n")
		if status != http.StatusOK || body != "node-0 GET /ok" {
			t.Errorf("%s after malformed requests: %d %q, want 200", name, status, body)
		}
	}
	// One pool per listener; only the well-formed requests reached the node.
	if got := nodes[0].accepts.Load(); got != 2 {
		t.Errorf("node accepted %d connections, want 2", got)
	}
}

func TestUpstreamConnectRefused(t *testing.T) {
	nodes := startNodes(t, 1)
	px := startUpstream(t, staticCache(t, map[string][]string{"echo": addrs(nodes)}), RouteConfig{Service: "echo"})
	status, _ := rawExchange(t, px.Listener.Addr().String(), "CONNECT echo:80 HTTP/1.1\r\nHost: echo:80\r\n\r\n")
	if status != http.StatusMethodNotAllowed {
		t.Errorf("CONNECT: status = %d, want 405", status)
	}
	if got := nodes[0].accepts.Load(); got != 0 {
		t.Errorf("node accepted %d connections, want 0", got)
	}
}

// TestShortGarbage: with h2c on the listener the server first waits for 14
// bytes (the length of "PRI * HTTP/2.0"), so a shorter request is answered
// only once the header timeout ends that wait, with a 400 all the same.
func TestShortGarbage(t *testing.T) {
	leakcheck.Check(t)
	nodes := startNodes(t, 1)
	h, err := New(staticCache(t, map[string][]string{"echo": addrs(nodes)}), nil, testLogger(t)).
		Upstream("upstream", RouteConfig{Service: "echo"})
	if err != nil {
		t.Fatal(err)
	}
	px := startProxyServerWith(t, NewServer(h, ServerOptions{ReadHeaderTimeout: 200 * time.Millisecond}, testLogger(t)))
	for _, raw := range []string{"GARBAGE\r\n\r\n", "GET\r\n\r\n", "\r\n\r\n"} {
		if status, msg := rawExchange(t, px.Listener.Addr().String(), raw); status != http.StatusBadRequest {
			t.Errorf("%q: status %d (%s), want 400", raw, status, msg)
		}
	}
	if got := nodes[0].accepts.Load(); got != 0 {
		t.Errorf("node accepted %d connections, want 0", got)
	}
}

// TestUpstreamBadRequestBody: a client whose body breaks (bad chunk
// framing) is at fault, not the node: it gets a 400, and the node's breaker
// and outlier counts do not move, so no client can eject a healthy node.
func TestUpstreamBadRequestBody(t *testing.T) {
	leakcheck.Check(t)
	nodes := startNodes(t, 1)
	cache := staticCache(t, map[string][]string{"echo": addrs(nodes)})
	strict := config.Resilience{
		Breaker: config.Breaker{Enabled: true, ConsecutiveFailures: 2, OpenFor: time.Minute, HalfOpenRequests: 1},
		Outlier: config.Outlier{Enabled: true, ConsecutiveFailures: 2, BaseEjection: time.Minute, MaxEjection: time.Minute,
			MaxEjectionPercent: 100, PanicThreshold: 0},
		Retries: config.Retries{Attempts: 2, Budget: config.Budget{Percent: 100, MinPerSecond: 100, Window: time.Second}},
	}
	tests := []struct {
		name string
		res  config.Resilience
		raw  string
	}{
		{"bad chunk size", config.Resilience{},
			"POST / HTTP/1.1\r\nHost: echo\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\nzz\r\n"},
		{"bad chunk size with breaker and retries", strict,
			"PUT / HTTP/1.1\r\nHost: echo\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\nzz\r\n"},
		{"chunk size overflow with breaker and retries", strict,
			"POST / HTTP/1.1\r\nHost: echo\r\nTransfer-Encoding: chunked\r\n\r\nfffffffffffffffffffff\r\nhello\r\n"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			px := startUpstream(t, cache, RouteConfig{Service: "echo", Resilience: tc.res})
			for i := range 4 { // past the breaker's and the ejection's thresholds
				status, body := rawExchange(t, px.Listener.Addr().String(), tc.raw)
				if status != http.StatusBadRequest || !strings.Contains(body, "bad request body") {
					t.Fatalf("try %d: status = %d (%q), want 400 bad request body", i, status, body)
				}
			}
			status, body := rawExchange(t, px.Listener.Addr().String(), "GET /ok HTTP/1.1\r\nHost: echo\r\n\r\n")
			if status != http.StatusOK {
				t.Errorf("then GET /ok: status = %d (%q), want 200 from the node", status, body)
			}
		})
	}
}

// An app that hangs up while its request waits on a node ends the node's
// exchange too: the sidecar closes that connection rather than wait for
// an answer nobody will read.
func TestUpstreamClientGoneAbortsNodeRequest(t *testing.T) {
	leakcheck.Check(t)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	got, closed := make(chan struct{}), make(chan struct{})
	go func() {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		defer c.Close()
		_ = c.SetDeadline(time.Now().Add(30 * time.Second))
		br := bufio.NewReader(c)
		if _, err := http.ReadRequest(br); err != nil {
			return
		}
		close(got)
		_, _ = io.Copy(io.Discard, br) // never answer; returns when the sidecar closes
		close(closed)
	}()
	px := startUpstream(t, staticCache(t, map[string][]string{"echo": {ln.Addr().String()}}),
		RouteConfig{Service: "echo"})

	app, err := net.Dial("tcp", px.Listener.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	if _, err := io.WriteString(app, "GET /stall HTTP/1.1\r\nHost: echo\r\n\r\n"); err != nil {
		t.Fatal(err)
	}
	select {
	case <-got:
	case <-time.After(10 * time.Second):
		t.Fatal("the node did not get the request")
	}
	app.Close()
	select {
	case <-closed:
	case <-time.After(5 * time.Second):
		t.Fatal("the node's connection stayed open after the app hung up")
	}
}
