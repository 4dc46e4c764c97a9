package proxy

import (
	"context"
	"io"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest/observer"
)

// traceNode answers with the traceparent and tracestate it received, and
// drains the body.
func traceNode(t testing.TB) *testServer {
	return startServer(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		_, _ = io.Copy(io.Discard, r.Body)
		w.Header().Set("X-Got-Traceparent", r.Header.Get("Traceparent"))
		w.Header().Set("X-Got-Tracestate", r.Header.Get("Tracestate"))
		_, _ = io.WriteString(w, "hello")
	}))
}

// observedUpstream serves an upstream listener named "api" for the
// services in cache with the access log and tracing of obs, obs.Access
// replaced by an observer it returns, with the proxy's own log.
func observedUpstream(t *testing.T, services map[string][]string, cfg RouteConfig, obs Observability) (*testServer, *observer.ObservedLogs, *observer.ObservedLogs) {
	t.Helper()
	accessCore, access := observer.New(zapcore.InfoLevel)
	logCore, logs := observer.New(zapcore.DebugLevel)
	obs.Access = zap.New(accessCore)
	px := New(staticCache(t, services), nil, zap.New(logCore))
	px.SetObservability(obs)
	cfg.Name = "api"
	cfg.Timeouts = sidecarTimeouts()
	h, err := px.Upstream("127.0.0.1:0", cfg)
	if err != nil {
		t.Fatal(err)
	}
	return startProxyServer(t, h), access, logs
}

// TestAccessLog: one line per request with every field the issue lists,
// the sidecar's own answers with their error code.
func TestAccessLog(t *testing.T) {
	node := traceNode(t)
	srv, access, _ := observedUpstream(t, map[string][]string{"echo": {node.Listener.Addr().String()}, "empty": nil},
		RouteConfig{Service: "echo"}, Observability{})

	const tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
	req, _ := http.NewRequest(http.MethodPost, srv.URL+"/orders?x=1", strings.NewReader("0123456789"))
	req.Host = "echo.local"
	req.Header.Set("Traceparent", tp)
	if r := do(t, newClient(t, nil), req); r.status != http.StatusOK {
		t.Fatalf("POST status = %d, want 200", r.status)
	}
	lines := takeLines(t, access)
	got := lines[0].ContextMap()
	want := map[string]any{
		"listener": "api", "service": "echo", "method": "POST", "authority": "echo.local", "path": "/orders",
		"status": int64(200), "bytes_in": int64(10), "bytes_out": int64(5), "node": node.Listener.Addr().String(),
		"attempts": int64(1), "trace_id": "4bf92f3577b34da6a3ce929d0e0e4736",
	}
	for k, v := range want {
		if got[k] != v {
			t.Errorf("access field %s = %#v, want %#v (line %v)", k, got[k], v, got)
		}
	}
	if _, ok := got["duration"]; !ok {
		t.Errorf("access line %v has no duration", got)
	}
	if _, ok := got["error_code"]; ok {
		t.Errorf("access line %v has an error_code for a node's answer", got)
	}

	// The sidecar's own answer: no node, its error code.
	dead, access, _ := observedUpstream(t, map[string][]string{"dead": {closedAddr(t)}}, RouteConfig{Service: "dead"}, Observability{})
	if r := doGet(t, newClient(t, nil), dead.URL+"/", nil); r.status != http.StatusBadGateway {
		t.Fatalf("GET to a dead node: status = %d, want 502", r.status)
	}
	lines = takeLines(t, access)
	got = lines[0].ContextMap()
	if got["error_code"] != "connect_failed" || got["status"] != int64(502) || got["attempts"].(int64) < 1 {
		t.Errorf("access line of a refused request = %v, want error_code connect_failed, status 502, attempts ≥ 1", got)
	}
}

// takeLines waits for the one access line of a request, which is written
// once the handler returns, after the client has its answer.
func takeLines(t *testing.T, access *observer.ObservedLogs) []observer.LoggedEntry {
	t.Helper()
	waitFor(t, "an access line", func() bool { return access.Len() >= 1 })
	lines := access.TakeAll()
	if len(lines) != 1 {
		t.Fatalf("access lines = %d, want 1: %v", len(lines), lines)
	}
	return lines
}

// closedAddr is a loopback address nothing listens on.
func closedAddr(t testing.TB) string {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close()
	return addr
}

// TestAccessLogSample: a sample leaves lines of answered requests out,
// never the sidecar's own answers.
func TestAccessLogSample(t *testing.T) {
	node := traceNode(t)
	srv, access, _ := observedUpstream(t, map[string][]string{"echo": {node.Listener.Addr().String()}, "empty": nil},
		RouteConfig{Service: "echo"}, Observability{AccessSample: 1e-9})
	c := newClient(t, nil)
	for i := range 20 {
		if r := doGet(t, c, srv.URL+"/", nil); r.status != http.StatusOK {
			t.Fatalf("GET #%d: status %d", i, r.status)
		}
	}
	if n := access.Len(); n != 0 {
		t.Errorf("access lines at sample 1e-9 = %d, want 0", n)
	}
}

// TestAccessLogOffKeepsWriter: with the access log off, the handler gets
// the server's writer itself, so the hot path adds nothing.
func TestAccessLogOffKeepsWriter(t *testing.T) {
	px := New(staticCache(t, nil), nil, zap.NewNop())
	w := &headerOnlyWriter{h: http.Header{}}
	r, _ := http.NewRequest(http.MethodGet, "http://echo/", nil)
	got, aw := px.observe(w, r, "api")
	if got != http.ResponseWriter(w) || aw != nil {
		t.Errorf("observe() with the access log off = %T, %v; want the writer itself, nil", got, aw)
	}
	if _, ok := r.Header["Traceparent"]; ok {
		t.Errorf("observe() with tracing.start off gave the request a traceparent")
	}
}

type headerOnlyWriter struct{ h http.Header }

func (w *headerOnlyWriter) Header() http.Header         { return w.h }
func (w *headerOnlyWriter) Write(b []byte) (int, error) { return len(b), nil }
func (w *headerOnlyWriter) WriteHeader(int)             {}

// TestTracePropagation: a valid traceparent and its tracestate reach the
// node as sent; with tracing.start a request without one (or with an
// invalid one) gets a new trace, its stale tracestate dropped; without
// it, nothing is added.
func TestTracePropagation(t *testing.T) {
	const tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
	node := traceNode(t)
	services := map[string][]string{"echo": {node.Listener.Addr().String()}}
	tests := []struct {
		name       string
		start      bool
		header     map[string]string
		wantTP     string // "new" for a freshly started valid trace
		wantState  string
		wantLogged bool
	}{
		{"passed on", true, map[string]string{"Traceparent": tp, "Tracestate": "vendor=x"}, tp, "vendor=x", true},
		{"passed on without start", false, map[string]string{"Traceparent": tp, "Tracestate": "vendor=x"}, tp, "vendor=x", true},
		{"started", true, nil, "new", "", true},
		{"invalid replaced", true, map[string]string{"Traceparent": "00-00000000000000000000000000000000-00f067aa0ba902b7-01", "Tracestate": "vendor=x"}, "new", "", true},
		{"none without start", false, nil, "", "", false},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			srv, access, _ := observedUpstream(t, services, RouteConfig{Service: "echo"}, Observability{StartTraces: tc.start})
			h := http.Header{}
			for k, v := range tc.header {
				h.Set(k, v)
			}
			r := doGet(t, newClient(t, nil), srv.URL+"/", h)
			gotTP := r.header.Get("X-Got-Traceparent")
			switch tc.wantTP {
			case "new":
				if !validTraceparent(gotTP) || gotTP == tp || !strings.HasSuffix(gotTP, "-01") {
					t.Errorf("node got traceparent %q, want a new valid sampled one", gotTP)
				}
			default:
				if gotTP != tc.wantTP {
					t.Errorf("node got traceparent %q, want %q", gotTP, tc.wantTP)
				}
			}
			if got := r.header.Get("X-Got-Tracestate"); got != tc.wantState {
				t.Errorf("node got tracestate %q, want %q", got, tc.wantState)
			}
			lines := takeLines(t, access)
			id, ok := lines[0].ContextMap()["trace_id"]
			if ok != tc.wantLogged || ok && (len(gotTP) < 35 || id != gotTP[3:35]) {
				t.Errorf("access trace_id = %v (present %v), want the node's trace id %q", id, ok, gotTP)
			}
		})
	}
}

func TestValidTraceparent(t *testing.T) {
	tests := []struct {
		in   string
		want bool
	}{
		{"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", true},
		{"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00", true},
		{"01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra", true},
		{"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra", false},
		{"ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", false},
		{"00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01", false},
		{"00-00000000000000000000000000000000-00f067aa0ba902b7-01", false},
		{"00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01", false},
		{"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7", false},
		{"", false},
	}
	for _, tc := range tests {
		if got := validTraceparent(tc.in); got != tc.want {
			t.Errorf("validTraceparent(%q) = %v, want %v", tc.in, got, tc.want)
		}
	}
}

func FuzzTraceparent(f *testing.F) {
	f.Add("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
	f.Add("zz")
	f.Fuzz(func(t *testing.T, s string) {
		h := http.Header{"Traceparent": {s}}
		if id, ok := traceID(h); ok && len(id) != 32 {
			t.Errorf("traceID(%q) = %q, want 32 hex digits", s, id)
		}
	})
}

// TestRefusedLogged: an answer the sidecar makes itself is logged at warn
// with the access log off, and a storm of them is rate limited.
func TestRefusedLogged(t *testing.T) {
	logCore, logs := observer.New(zapcore.DebugLevel)
	px := New(staticCache(t, map[string][]string{"dead": {closedAddr(t)}}), nil, zap.New(logCore))
	h, err := px.Upstream("127.0.0.1:0", RouteConfig{Service: "dead", Name: "api", Timeouts: sidecarTimeouts()})
	if err != nil {
		t.Fatal(err)
	}
	srv := startProxyServer(t, h)
	c := newClient(t, nil)
	const n = 300
	for i := range n {
		if r := doGet(t, c, srv.URL+"/x", nil); r.status != http.StatusBadGateway {
			t.Fatalf("GET #%d: status %d, want 502", i, r.status)
		}
	}
	warns := logs.FilterMessage("request refused").FilterLevelExact(zapcore.WarnLevel).All()
	if len(warns) == 0 {
		t.Fatal("no warn line for the sidecar's own 502")
	}
	f := warns[0].ContextMap()
	if f["error_code"] != "connect_failed" || f["listener"] != "api" || f["service"] != "dead" || f["path"] != "/x" {
		t.Errorf("warn line = %v, want error_code connect_failed, listener api, service dead, path /x", f)
	}
	// 10 a second, then one in 100: however fast the loop ran.
	if max := 10 + n/100 + 10*int(time.Since(warns[0].Time)/time.Second+1); len(warns) > max {
		t.Errorf("warn lines for %d refusals = %d, want at most %d (rate limited)", n, len(warns), max)
	}
}

// TestTCPAccessLog: a TCP connection gets one access line naming its
// node, and its own metrics rather than a 2xx request.
func TestTCPAccessLog(t *testing.T) {
	node := startTCPNode(t)
	px, reg := staticProxy(t, []string{node.addr})
	accessCore, access := observer.New(zapcore.InfoLevel)
	px.SetObservability(Observability{Access: zap.New(accessCore)})
	ts, err := px.TCP("127.0.0.1:0", RouteConfig{Service: "svc", Protocol: "tcp"})
	if err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	served := make(chan struct{})
	go func() { defer close(served); ts.Serve(ln) }()
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		ts.Shutdown(ctx)
		<-served
	})
	s := &tcpSetup{resSetup: &resSetup{px: px, reg: reg}, ts: ts, addr: ln.Addr().String()}
	if err := s.echo(); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "the connection's access line", func() bool { return access.Len() == 1 })
	f := access.All()[0].ContextMap()
	if f["node"] != node.addr || f["service"] != "svc" || f["attempts"] != int64(1) || f["bytes_in"] != int64(5) || f["bytes_out"] != int64(5) {
		t.Errorf("tcp access line = %v, want node %s, service svc, attempts 1, 5 bytes each way", f, node.addr)
	}
	if got := s.metric(t, "sidecar_tcp_connections_total", map[string]string{"endpoint": node.addr}); got != 1 {
		t.Errorf("sidecar_tcp_connections_total = %v, want 1", got)
	}
	if got := s.metric(t, "sidecar_tcp_connection_duration_seconds", map[string]string{"service": "svc"}); got != 1 {
		t.Errorf("sidecar_tcp_connection_duration_seconds count = %v, want 1", got)
	}
	if got := s.metric(t, "sidecar_upstream_requests_total", map[string]string{"endpoint": node.addr}); got != 0 {
		t.Errorf("sidecar_upstream_requests_total of a TCP connection = %v, want 0", got)
	}
}

// BenchmarkProxyHTTPAccessLog is BenchmarkProxyHTTP with the access log on
// (JSON to io.Discard) and tracing.start: what the line and a new trace
// cost a request.
func BenchmarkProxyHTTPAccessLog(b *testing.B) {
	node := benchNode(b)
	px := New(staticCache(b, map[string][]string{"echo": {node.Listener.Addr().String()}}), nil, zap.NewNop())
	enc := zapcore.NewJSONEncoder(zap.NewProductionEncoderConfig())
	px.SetObservability(Observability{Access: zap.New(zapcore.NewCore(enc, zapcore.AddSync(io.Discard), zapcore.InfoLevel)), StartTraces: true})
	h, err := px.Upstream("127.0.0.1:0", RouteConfig{Service: "echo", Timeouts: sidecarTimeouts()})
	if err != nil {
		b.Fatal(err)
	}
	benchGet(b, startProxyServer(b, h).URL+"/bench")
}

// TestAccessLogForward: the forward proxy's lines carry its name as
// listener, and a name that is no service is logged with its error code.
func TestAccessLogForward(t *testing.T) {
	node := traceNode(t)
	accessCore, access := observer.New(zapcore.InfoLevel)
	px := New(staticCache(t, map[string][]string{"echo": {node.Listener.Addr().String()}}), nil, zap.NewNop())
	px.SetObservability(Observability{Access: zap.New(accessCore)})
	f, err := px.Forward("127.0.0.1:0", RouteConfig{Name: "forward", Timeouts: sidecarTimeouts()})
	if err != nil {
		t.Fatal(err)
	}
	srv := startProxyServer(t, f)
	c := newClient(t, nil)
	for _, host := range []string{"echo", "nosuch"} {
		req, _ := http.NewRequest(http.MethodGet, srv.URL+"/", nil)
		req.Host = host
		do(t, c, req)
	}
	waitFor(t, "two access lines", func() bool { return access.Len() >= 2 })
	byHost := map[string]map[string]any{}
	for _, l := range access.All() {
		f := l.ContextMap()
		byHost[f["authority"].(string)] = f
	}
	if f := byHost["echo"]; f["listener"] != "forward" || f["service"] != "echo" || f["status"] != int64(200) {
		t.Errorf("access line of echo = %v, want listener forward, service echo, 200", f)
	}
	if f := byHost["nosuch"]; f["listener"] != "forward" || f["error_code"] != "unknown_service" || f["status"] != int64(404) {
		t.Errorf("access line of nosuch = %v, want listener forward, error_code unknown_service, 404", f)
	}
}

// TestConnectRefusedLogged: a CONNECT, refused with 405 by the forward
// proxy and by an upstream listener, gets the sidecar's error code and a
// warn line, as every answer the sidecar makes itself does.
func TestConnectRefusedLogged(t *testing.T) {
	nodes := startNodes(t, 1)
	logCore, logs := observer.New(zapcore.DebugLevel)
	px := New(staticCache(t, map[string][]string{"echo": addrs(nodes)}), nil, zap.New(logCore))
	up, err := px.Upstream("127.0.0.1:0", RouteConfig{Service: "echo", Name: "api", Timeouts: sidecarTimeouts()})
	if err != nil {
		t.Fatal(err)
	}
	fwd, err := px.Forward("127.0.0.1:0", RouteConfig{Timeouts: sidecarTimeouts()})
	if err != nil {
		t.Fatal(err)
	}
	for name, h := range map[string]http.Handler{"upstream": up, "forward": fwd} {
		srv := startProxyServer(t, h)
		status, _ := rawExchange(t, srv.Listener.Addr().String(), "CONNECT echo:80 HTTP/1.1\r\nHost: echo:80\r\n\r\n")
		if status != http.StatusMethodNotAllowed {
			t.Errorf("%s: CONNECT status = %d, want 405", name, status)
		}
	}
	warns := logs.FilterMessage("request refused").FilterField(zap.String("error_code", codeConnect)).All()
	if len(warns) != 2 {
		t.Errorf("warn lines for two refused CONNECTs = %d, want 2", len(warns))
	}
	if got := nodes[0].accepts.Load(); got != 0 {
		t.Errorf("node accepted %d connections, want 0", got)
	}
}

// tryReader is a body that has n bytes at hand for TryRead.
type tryReader struct {
	io.Reader
	n int
}

func (r *tryReader) Close() error { return nil }

func (r *tryReader) TryRead(p []byte) (int, error, bool) {
	if r.n == 0 {
		return 0, nil, false
	}
	n := min(len(p), r.n)
	r.n -= n
	return n, nil, true
}

// TestCountingBodyTryRead: the access log's byte counter keeps a body's
// TryRead (so streamed bodies are sent the same with the log on) and
// counts what it reads; a body without one says it cannot tell.
func TestCountingBodyTryRead(t *testing.T) {
	c := &countingBody{ReadCloser: &tryReader{Reader: strings.NewReader(""), n: 5}}
	p := make([]byte, 8)
	if n, err, ok := c.TryRead(p); n != 5 || err != nil || !ok {
		t.Errorf("TryRead() = %d, %v, %v; want 5, nil, true", n, err, ok)
	}
	if n, _, ok := c.TryRead(p); n != 0 || ok {
		t.Errorf("TryRead() with nothing at hand = %d, %v; want 0, false", n, ok)
	}
	if got := c.n.Load(); got != 5 {
		t.Errorf("counted %d bytes, want 5", got)
	}
	plain := &countingBody{ReadCloser: io.NopCloser(strings.NewReader("abc"))}
	if n, _, ok := plain.TryRead(p); n != 0 || ok {
		t.Errorf("TryRead() of a body without one = %d, %v; want 0, false", n, ok)
	}
}
