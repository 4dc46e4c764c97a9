package proxy

import (
	"bufio"
	"fmt"
	"io"
	"net"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/sidecarlb/sidecar/internal/leakcheck"

	"github.com/sidecarlb/sidecar/config"
	"github.com/sidecarlb/sidecar/discovery"
)

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
			// The name is the context, first, not a stray word at the end
			// (`… connection refused "ghost"`).
			if prefix := "sidecar: service " + strconv.Quote(tc.service) + ": "; !strings.HasPrefix(resp.body, prefix) {
				t.Errorf("body = %q, want it to start %q", resp.body, prefix)
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
