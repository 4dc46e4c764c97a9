package proxy

// Tests of the sidecar's own HTTP/2 engine (internal/h2) on the proxy's
// path, route to node: real Go h2c peers where the behaviour is end to
// end, and raw framers, as client or node, where a test needs frames the
// Go peers never send or must see exactly which frames the sidecar sends.

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"net"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"golang.org/x/net/http2"

	"github.com/sidecarlb/sidecar/discovery"
	"github.com/sidecarlb/sidecar/internal/h2/h2test"
	"github.com/sidecarlb/sidecar/internal/leakcheck"
)

// h2Sidecar is an upstream listener of the sidecar served by its own Server.
type h2Sidecar struct {
	*testServer
	srv  *Server
	px   *Proxy
	reg  *prometheus.Registry
	addr string
}

func startH2Sidecar(t testing.TB, resolver Resolver, cfg RouteConfig, opts ServerOptions) *h2Sidecar {
	t.Helper()
	reg := prometheus.NewRegistry()
	px := New(resolver, NewMetrics(reg), testLogger(t))
	h, err := px.Upstream("upstream", cfg)
	if err != nil {
		t.Fatalf("Upstream(%+v) error = %v", cfg, err)
	}
	srv := NewServer(h, opts, testLogger(t))
	ts := startProxyServerWith(t, srv)
	return &h2Sidecar{testServer: ts, srv: srv, px: px, reg: reg, addr: ts.Listener.Addr().String()}
}

func (s *h2Sidecar) metric(t testing.TB, name string, labels map[string]string) float64 {
	t.Helper()
	return (&resSetup{reg: s.reg}).metric(t, name, labels)
}

// h2ServerLoad counts the app connections of s, their open streams and
// their handlers not yet returned (a stream is held until its handler
// returns).
func h2ServerLoad(s *Server) (conns, streams, running int) {
	conns, streams = s.h2.Load()
	return conns, streams, streams
}

// h2PoolLoad counts the sidecar's h2c connections to nodes over every
// route of p, and the streams open or reserved on them.
func h2PoolLoad(p *Proxy) (conns, streams int) {
	p.mu.Lock()
	routes := slices.Clone(p.routes)
	p.mu.Unlock()
	for _, rt := range routes {
		st := rt.state.Load()
		if st == nil {
			continue
		}
		for _, e := range st.endpoints {
			if pl := e.pools.Load().h2c; pl != nil {
				c, s := pl.Load()
				conns += c
				streams += s
			}
		}
	}
	return conns, streams
}

func sha256Hex(b []byte) string {
	s := sha256.Sum256(b)
	return hex.EncodeToString(s[:])
}

// TestH2LargeBodies: 8 MiB uploads echoed back over h2c on both sides
// cross the sidecar's 256 KiB stream and 4 MiB connection windows many
// times over, one at a time and several at once on one app connection,
// and arrive intact.
func TestH2LargeBodies(t *testing.T) {
	leakcheck.Check(t)
	node := h2test.StartH2C(t, h2test.EchoNode, nil)
	sc := startH2Sidecar(t, staticCache(t, map[string][]string{"echo": {node.Addr}}),
		RouteConfig{Service: "echo", Protocol: "http2"}, ServerOptions{})
	client := h2test.NewClient(t, nil)

	echo := func(body io.Reader, want []byte) error {
		req, err := http.NewRequest(http.MethodPost, sc.URL+"/echo", body)
		if err != nil {
			return err
		}
		resp, err := client.Do(req)
		if err != nil {
			return err
		}
		defer resp.Body.Close()
		got, err := io.ReadAll(resp.Body)
		if err != nil {
			return fmt.Errorf("read echoed body: %w after %d bytes", err, len(got))
		}
		if resp.StatusCode != http.StatusOK || resp.Proto != "HTTP/2.0" || resp.Header.Get("X-Node-Proto") != "HTTP/2.0" {
			return fmt.Errorf("status %d, app side %s, node side %q; want 200 over HTTP/2.0 on both",
				resp.StatusCode, resp.Proto, resp.Header.Get("X-Node-Proto"))
		}
		if len(got) != len(want) || sha256Hex(got) != sha256Hex(want) {
			return fmt.Errorf("echoed body: %d bytes, sha256 %s; want %d bytes, %s", len(got), sha256Hex(got), len(want), sha256Hex(want))
		}
		return nil
	}

	body := h2test.RandomBytes(8 << 20)
	tests := []struct {
		name string
		body func() io.Reader
	}{
		{"content length", func() io.Reader { return bytes.NewReader(body) }},
		{"unknown length", func() io.Reader { return io.MultiReader(bytes.NewReader(body)) }},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			if err := echo(tc.body(), body); err != nil {
				t.Fatal(err)
			}
		})
	}
	t.Run("concurrent streams", func(t *testing.T) {
		const streams = 4
		errs := make(chan error, streams)
		for i := range streams {
			// A body of its own for each, so crossed streams show.
			b := append(slices.Clone(body[i*1000:]), body[:i*1000]...)
			go func() { errs <- echo(bytes.NewReader(b), b) }()
		}
		for range streams {
			if err := <-errs; err != nil {
				t.Error(err)
			}
		}
	})
	if got := sc.accepts.Load(); got != 1 {
		t.Errorf("app connections = %d, want 1: every stream on one connection", got)
	}
	if got := node.Accepts.Load(); got != 1 {
		t.Errorf("node connections = %d, want 1: every stream on one connection", got)
	}
}

// TestH2NodeAnswersBeforeReadingBody: a node that streams its whole answer
// before it reads the request body, as a gRPC server may, gets the body and
// the app gets the answer. The sidecar must not sit waiting for the node's
// window to send the body while nobody reads the node's answer.
func TestH2NodeAnswersBeforeReadingBody(t *testing.T) {
	leakcheck.Check(t)
	const (
		answer = 1 << 20
		upload = 200 << 10 // within the sidecar's stream window: all at hand at once
	)
	node := h2test.StartH2C(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Trailer", "X-Read")
		chunk := make([]byte, 32<<10)
		for written := 0; written < answer; written += len(chunk) {
			if _, err := w.Write(chunk); err != nil {
				return
			}
		}
		w.(http.Flusher).Flush()
		n, _ := io.Copy(io.Discard, r.Body)
		w.Header().Set("X-Read", strconv.FormatInt(n, 10))
	}), &http.HTTP2Config{MaxReceiveBufferPerStream: 64 << 10}) // as grpc-go's first window
	sc := startH2Sidecar(t, staticCache(t, map[string][]string{"echo": {node.Addr}}),
		RouteConfig{Service: "echo", Protocol: "http2"}, ServerOptions{})

	c := h2test.Dial(t, sc.addr, true)
	c.MustRead(5*time.Second, "the sidecar's SETTINGS and window", func() bool { return c.Settings && c.ConnWindow })
	// The header and the first part of the body in one write: all of it is
	// at hand when the sidecar starts the node's stream.
	c.Request(1, http.MethodPost, "/upload", false)
	c.Data(1, false, make([]byte, upload))
	c.Flush()
	s := c.Stream(1)
	if err := c.ReadUntil(10*time.Second, func() bool { return len(s.Body) >= answer || s.Done }); err != nil || len(s.Body) != answer {
		t.Fatalf("answer while the upload is open: %v (%v), want all %d bytes", s, err, answer)
	}
	c.Data(1, true, []byte("end"))
	c.Flush()
	c.MustRead(10*time.Second, "the end of the answer", func() bool { return s.Done })
	if got, want := s.Field(s.Trailer, "x-read"), strconv.Itoa(upload+3); s.Status() != "200" || got != want {
		t.Errorf("answer: %v, trailer x-read %q; want 200 and %s bytes read by the node", s, got, want)
	}
}

// TestH2SlowReader: an app that reads a large answer slowly holds the node
// back through flow control. The sidecar buffers a bounded amount, however
// far the node could run ahead, and the answer arrives intact.
func TestH2SlowReader(t *testing.T) {
	leakcheck.Check(t)
	const total = 16 << 20
	payload := h2test.RandomBytes(total)
	var written atomic.Int64
	node := h2test.StartH2C(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Length", strconv.Itoa(total))
		for p := payload; len(p) > 0; {
			n, err := w.Write(p[:min(len(p), 32<<10)])
			written.Add(int64(n))
			if err != nil {
				return
			}
			p = p[n:]
		}
	}), nil)
	sc := startH2Sidecar(t, staticCache(t, map[string][]string{"echo": {node.Addr}}),
		RouteConfig{Service: "echo", Protocol: "http2"}, ServerOptions{})
	// An app that takes 64 KiB at a time.
	client := h2test.NewClient(t, &http.HTTP2Config{MaxReceiveBufferPerConnection: 64 << 10, MaxReceiveBufferPerStream: 64 << 10})

	resp, err := client.Get(sc.URL + "/big")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	// The app reads nothing yet: the node runs until the windows on the way
	// are full, then stops.
	var last int64 = -1
	stable := 0
	resWait(t, 10*time.Second, "the node to stop writing", func() bool {
		if n := written.Load(); n != last {
			last, stable = n, 0
			return false
		}
		stable++
		return stable >= 20 // 100ms without progress
	})
	// The app's 64 KiB, the sidecar's 256 KiB stream window to the node, its
	// copy buffer, and frames on their way.
	if n := written.Load(); n > 2<<20 {
		t.Errorf("node wrote %d bytes while the app read none, want at most 2 MiB buffered on the way", n)
	}
	h := sha256.New()
	buf := make([]byte, 64<<10)
	var got int64
	for {
		n, err := resp.Body.Read(buf)
		h.Write(buf[:n])
		got += int64(n)
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatalf("read after %d bytes: %v", got, err)
		}
		if got%(1<<20) < int64(n) {
			time.Sleep(time.Millisecond) // slowly
		}
	}
	if want := sha256Hex(payload); got != total || hex.EncodeToString(h.Sum(nil)) != want {
		t.Errorf("answer: %d bytes, sha256 %x; want %d bytes, %s", got, h.Sum(nil), total, want)
	}
}

// resetNode answers /ok at once. Any other request is announced on got once
// its first body bytes arrived; its answer's header is sent first when
// answerFirst; then it waits for its request context to end, announced on
// ended.
type resetNode struct {
	answerFirst bool
	got, ended  chan struct{}
}

func (n *resetNode) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if r.URL.Path == "/ok" {
		io.WriteString(w, "ok")
		return
	}
	if n.answerFirst {
		w.WriteHeader(http.StatusOK)
		w.(http.Flusher).Flush()
	}
	buf := make([]byte, 5)
	if _, err := io.ReadFull(r.Body, buf); err != nil {
		return
	}
	n.got <- struct{}{}
	select {
	case <-r.Context().Done():
		n.ended <- struct{}{}
	case <-time.After(20 * time.Second):
	}
}

// TestH2ClientReset: an app that gives up on a streaming request, by
// cancelling it in Go's client or with a bare RST_STREAM, ends the node's
// request too, and the sidecar forgets the stream on both sides while the
// app's connection goes on serving.
func TestH2ClientReset(t *testing.T) {
	leakcheck.Check(t)
	for _, answerFirst := range []bool{false, true} {
		for _, raw := range []bool{false, true} {
			name := fmt.Sprintf("answered %v/raw %v", answerFirst, raw)
			t.Run(name, func(t *testing.T) {
				n := &resetNode{answerFirst: answerFirst, got: make(chan struct{}, 1), ended: make(chan struct{}, 1)}
				node := h2test.StartH2C(t, n, nil)
				sc := startH2Sidecar(t, staticCache(t, map[string][]string{"echo": {node.Addr}}),
					RouteConfig{Service: "echo", Protocol: "http2"}, ServerOptions{})
				wait := func(ch chan struct{}, what string) {
					t.Helper()
					select {
					case <-ch:
					case <-time.After(10 * time.Second):
						t.Fatalf("timed out waiting for %s", what)
					}
				}

				var again func() string
				if raw {
					c := h2test.Dial(t, sc.addr, true)
					c.Request(1, http.MethodPost, "/stream", false)
					c.Data(1, false, []byte("hello"))
					c.Flush()
					wait(n.got, "the node to get the first bytes")
					_ = c.Fr.WriteRSTStream(1, http2.ErrCodeCancel)
					c.Flush()
					again = func() string {
						c.Request(3, http.MethodGet, "/ok", true)
						c.Flush()
						s := c.Stream(3)
						c.MustRead(10*time.Second, "the next request's answer", func() bool { return s.Done })
						return s.Status() + " " + string(s.Body)
					}
				} else {
					client := h2test.NewClient(t, nil)
					pr, pw := io.Pipe()
					defer pw.Close()
					ctx, cancel := context.WithCancel(context.Background())
					defer cancel()
					req, _ := http.NewRequestWithContext(ctx, http.MethodPost, sc.URL+"/stream", pr)
					go func() {
						if resp, err := client.Do(req); err == nil {
							_, _ = io.Copy(io.Discard, resp.Body)
							resp.Body.Close()
						}
					}()
					_, _ = pw.Write([]byte("hello"))
					wait(n.got, "the node to get the first bytes")
					// Go's client notices the cancel while it waits for the
					// answer, or once the body's Read returns.
					cancel()
					pw.CloseWithError(context.Canceled)
					again = func() string {
						r := doGet(t, client, sc.URL+"/ok", nil)
						return strconv.Itoa(r.status) + " " + r.body
					}
				}
				wait(n.ended, "the node's request context to end")
				resWait(t, 5*time.Second, "the sidecar to forget the stream", func() bool {
					_, streams, running := h2ServerLoad(sc.srv)
					_, pooled := h2PoolLoad(sc.px)
					return streams == 0 && running == 0 && pooled == 0
				})
				if got := again(); got != "200 ok" {
					t.Errorf("next request on the connection: %q, want 200 ok", got)
				}
				// The raw client asks again on the same connection, which
				// the sidecar must not have ended. Go's client, on a
				// loaded machine, sometimes closes the connection of a
				// canceled request itself and dials another (it reads EOF
				// from no GOAWAY or error of the sidecar's), so only its
				// answer counts.
				if got := sc.accepts.Load(); raw && got != 1 {
					t.Errorf("app connections = %d, want 1", got)
				}
			})
		}
	}
}

// trailerNode answers 201 with a header, the request body after
// "payload:", and trailers: one declared in Trailer, one set with
// http.TrailerPrefix, and the request's X-Req-Sum trailer sent back.
var trailerNode = http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
	body, _ := io.ReadAll(r.Body)
	w.Header().Set("Trailer", "X-Checksum")
	w.Header().Set("X-Node", "kept")
	w.Header().Set("X-Node-Proto", r.Proto)
	w.WriteHeader(http.StatusCreated)
	io.WriteString(w, "payload:")
	w.Write(body)
	w.(http.Flusher).Flush()
	w.Header().Set("X-Checksum", "abc123")
	w.Header().Set(http.TrailerPrefix+"X-Late", "undeclared")
	w.Header().Set(http.TrailerPrefix+"X-Req-Sum", r.Trailer.Get("X-Req-Sum"))
})

// TestH2Trailers: status, headers, body and trailers both ways make it
// from an h2 node to an h2c app, and across the translations between
// HTTP/1.1 and HTTP/2 on either side of the sidecar.
func TestH2Trailers(t *testing.T) {
	leakcheck.Check(t)
	h2 := h2test.StartH2C(t, trailerNode, nil)
	h1 := startServer(t, trailerNode)
	cache := staticCache(t, map[string][]string{"h2": {h2.Addr}, "h1": {h1.Listener.Addr().String()}})
	tests := []struct {
		name      string
		service   string
		protocol  string
		h2cApp    bool
		nodeProto string
	}{
		{"h2c app to h2 node", "h2", "http2", true, "HTTP/2.0"},
		{"http/1.1 app to h2 node", "h2", "http2", false, "HTTP/2.0"},
		{"h2c app to http/1.1 node", "h1", "http", true, "HTTP/1.1"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			sc := startH2Sidecar(t, cache, RouteConfig{Service: tc.service, Protocol: tc.protocol}, ServerOptions{})
			client, appProto := newClient(t, nil), "HTTP/1.1"
			if tc.h2cApp {
				client, appProto = h2test.NewClient(t, nil), "HTTP/2.0"
			}
			// Of unknown length, so HTTP/1.1 can carry the trailer.
			req, _ := http.NewRequest(http.MethodPost, sc.URL+"/t", io.MultiReader(strings.NewReader("abc")))
			req.Trailer = http.Header{"X-Req-Sum": {"sum1"}}
			resp, err := client.Do(req)
			if err != nil {
				t.Fatal(err)
			}
			body, err := io.ReadAll(resp.Body)
			resp.Body.Close()
			if err != nil {
				t.Fatalf("read body: %v", err)
			}
			if resp.StatusCode != http.StatusCreated || resp.Proto != appProto || string(body) != "payload:abc" {
				t.Errorf("answer = %d %s %q, want 201 %s %q", resp.StatusCode, resp.Proto, body, appProto, "payload:abc")
			}
			for k, want := range map[string]string{"X-Node": "kept", "X-Node-Proto": tc.nodeProto} {
				if got := resp.Header.Get(k); got != want {
					t.Errorf("header %s = %q, want %q", k, got, want)
				}
			}
			for k, want := range map[string]string{"X-Checksum": "abc123", "X-Late": "undeclared", "X-Req-Sum": "sum1"} {
				if got := resp.Trailer.Get(k); got != want {
					t.Errorf("trailer %s = %q, want %q (trailers: %v)", k, got, want, resp.Trailer)
				}
			}
		})
	}
}

// setBackend is a discovery backend whose service "echo" the test moves
// between sets of addresses.
type setBackend struct {
	mu      sync.Mutex
	snap    *discovery.Snapshot
	changed chan struct{}
}

func newSetBackend(t testing.TB, addrs ...string) *setBackend {
	b := &setBackend{changed: make(chan struct{})}
	b.set(t, addrs...)
	return b
}

func (b *setBackend) set(t testing.TB, addrs ...string) {
	t.Helper()
	eps := make([]discovery.Endpoint, 0, len(addrs))
	for _, a := range addrs {
		host, port, err := net.SplitHostPort(a)
		if err != nil {
			t.Fatal(err)
		}
		p, _ := strconv.Atoi(port)
		eps = append(eps, discovery.NewEndpoint(a, host, p, nil, nil, 1))
	}
	slices.SortFunc(eps, func(x, y discovery.Endpoint) int { return strings.Compare(x.ID, y.ID) })
	b.mu.Lock()
	defer b.mu.Unlock()
	b.snap = &discovery.Snapshot{Service: "echo", Endpoints: eps, Updated: time.Now()}
	close(b.changed)
	b.changed = make(chan struct{})
}

func (b *setBackend) Watch(ctx context.Context, service string, sink discovery.Sink) {
	for {
		b.mu.Lock()
		snap, changed := b.snap, b.changed
		b.mu.Unlock()
		sink.Publish(snap)
		sink.Confirm(time.Now())
		select {
		case <-changed:
		case <-ctx.Done():
			return
		}
	}
}

func (b *setBackend) Known(_ context.Context, service string) (bool, error) {
	return service == "echo", nil
}

func (b *setBackend) Close() {}

// TestH2NoBody: the answers to HEAD and a 204 go to an h2c app as a
// HEADERS frame that ends the stream, with no DATA.
func TestH2NoBody(t *testing.T) {
	leakcheck.Check(t)
	node := h2test.StartH2C(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		switch r.URL.Path {
		case "/nocontent":
			w.Header().Set("X-Node", "kept")
			w.WriteHeader(http.StatusNoContent)
		default:
			w.Header().Set("Content-Length", "11")
			io.WriteString(w, "hello world")
		}
	}), nil)
	sc := startH2Sidecar(t, staticCache(t, map[string][]string{"echo": {node.Addr}}),
		RouteConfig{Service: "echo", Protocol: "http2"}, ServerOptions{})

	c := h2test.Dial(t, sc.addr, true)
	c.Request(1, http.MethodHead, "/head", true)
	c.Request(3, http.MethodGet, "/nocontent", true)
	c.Request(5, http.MethodGet, "/get", true)
	c.Flush()
	c.MustRead(10*time.Second, "the answers", func() bool {
		return c.Stream(1).Done && c.Stream(3).Done && c.Stream(5).Done
	})
	head, noContent, get := c.Stream(1), c.Stream(3), c.Stream(5)
	if head.Status() != "200" || head.DataFrames != 0 || head.RST != nil || head.Field(head.Header, "content-length") != "11" {
		t.Errorf("HEAD: %v, content-length %q; want 200, content-length 11, no DATA", head, head.Field(head.Header, "content-length"))
	}
	if noContent.Status() != "204" || noContent.DataFrames != 0 || noContent.RST != nil || noContent.Field(noContent.Header, "x-node") != "kept" {
		t.Errorf("204: %v, x-node %q; want 204, x-node kept, no DATA", noContent, noContent.Field(noContent.Header, "x-node"))
	}
	if get.Status() != "200" || string(get.Body) != "hello world" {
		t.Errorf("GET: %v, want 200 hello world", get)
	}

	// And through Go's clients, both ways round.
	for _, client := range []*http.Client{h2test.NewClient(t, nil), newClient(t, nil)} {
		req, _ := http.NewRequest(http.MethodHead, sc.URL+"/head", nil)
		if r := do(t, client, req); r.status != http.StatusOK || r.body != "" {
			t.Errorf("HEAD = %d %q, want 200 and no body", r.status, r.body)
		}
		if r := doGet(t, client, sc.URL+"/nocontent", nil); r.status != http.StatusNoContent || r.body != "" {
			t.Errorf("GET /nocontent = %d %q, want 204 and no body", r.status, r.body)
		}
	}
}
