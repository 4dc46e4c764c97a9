package proxy

// Tests of the sidecar's own HTTP/2 engine (internal/h2) on the proxy's
// path, route to node: real Go h2c peers where the behaviour is end to
// end, and raw framers, as client or node, where a test needs frames the
// Go peers never send or must see exactly which frames the sidecar sends.

import (
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/net/http2"

	"github.com/sidecarlb/sidecar/internal/h2/h2test"
	"github.com/sidecarlb/sidecar/internal/leakcheck"
)

// TestH2MalformedRequests: requests HTTP/2 calls malformed, and frames out
// of place, end in RST_STREAM or GOAWAY as RFC 9113 asks, and none reaches
// the node. After a stream error the connection still serves.
func TestH2MalformedRequests(t *testing.T) {
	leakcheck.Check(t)
	var bad atomic.Int64
	node := h2test.StartH2C(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path != "/ok" {
			bad.Add(1)
		}
		io.WriteString(w, "ok")
	}), nil)
	sc := startH2Sidecar(t, staticCache(t, map[string][]string{"echo": {node.Addr}}),
		RouteConfig{Service: "echo", Protocol: "http2"}, ServerOptions{})

	get := []string{":method", "GET", ":scheme", "http", ":authority", "echo", ":path", "/bad"}
	with := func(extra ...string) []string { return append(slices.Clone(get), extra...) }
	const (
		stream = iota // RST_STREAM on stream 1, and the connection serves on
		conn          // GOAWAY, and the connection closes
	)
	tests := []struct {
		name string
		send func(c *h2test.RawConn)
		end  int
		code http2.ErrCode
	}{
		{"missing path", func(c *h2test.RawConn) {
			c.Headers(1, true, ":method", "GET", ":scheme", "http", ":authority", "echo")
		}, stream, http2.ErrCodeProtocol},
		{"missing method", func(c *h2test.RawConn) {
			c.Headers(1, true, ":scheme", "http", ":authority", "echo", ":path", "/bad")
		}, stream, http2.ErrCodeProtocol},
		{"unknown pseudo-header", func(c *h2test.RawConn) { c.Headers(1, true, with(":foo", "x")...) }, stream, http2.ErrCodeProtocol},
		{"pseudo-header after a field", func(c *h2test.RawConn) {
			c.Headers(1, true, "x-a", "1", ":method", "GET", ":scheme", "http", ":authority", "echo", ":path", "/bad")
		}, stream, http2.ErrCodeProtocol},
		{"connection close", func(c *h2test.RawConn) { c.Headers(1, true, with("connection", "close")...) }, stream, http2.ErrCodeProtocol},
		{"keep-alive", func(c *h2test.RawConn) { c.Headers(1, true, with("keep-alive", "timeout=5")...) }, stream, http2.ErrCodeProtocol},
		{"transfer-encoding", func(c *h2test.RawConn) { c.Headers(1, true, with("transfer-encoding", "chunked")...) }, stream, http2.ErrCodeProtocol},
		{"te gzip", func(c *h2test.RawConn) { c.Headers(1, true, with("te", "gzip")...) }, stream, http2.ErrCodeProtocol},
		{"uppercase name", func(c *h2test.RawConn) { c.Headers(1, true, with("X-Upper", "1")...) }, stream, http2.ErrCodeProtocol},
		{"duplicate pseudo-header", func(c *h2test.RawConn) {
			c.Headers(1, true, append(slices.Clone(get[:6]), ":path", "/a", ":path", "/b")...)
		}, stream, http2.ErrCodeProtocol},
		{"response pseudo-header in a request", func(c *h2test.RawConn) { c.Headers(1, true, append([]string{":status", "200"}, get...)...) }, stream, http2.ErrCodeProtocol},
		{"newline in a value", func(c *h2test.RawConn) { c.Headers(1, true, with("x-a", "1\r\nx-b: 2")...) }, stream, http2.ErrCodeProtocol},
		{"bad content-length", func(c *h2test.RawConn) {
			c.Headers(1, false, ":method", "POST", ":scheme", "http", ":authority", "echo", ":path", "/bad", "content-length", "1x")
		}, stream, http2.ErrCodeProtocol},
		// The malformed request opened stream 1: the body and reset the
		// client sent before it saw the sidecar's reset are on a closed
		// stream, not an idle one.
		{"uppercase name with its body and a reset in flight", func(c *h2test.RawConn) {
			c.Headers(1, false, with("X-Upper", "1")...)
			c.Data(1, true, []byte("body"))
			_ = c.Fr.WriteRSTStream(1, http2.ErrCodeCancel)
		}, stream, http2.ErrCodeProtocol},
		{"data on a stream never opened", func(c *h2test.RawConn) { _ = c.Fr.WriteData(7, false, []byte("x")) }, conn, http2.ErrCodeProtocol},
		{"even stream", func(c *h2test.RawConn) { c.Headers(2, true, get...) }, conn, http2.ErrCodeProtocol},
		{"window overflow", func(c *h2test.RawConn) { _ = c.Fr.WriteWindowUpdate(0, 1<<31-1) }, conn, http2.ErrCodeFlowControl},
		{"headers before settings", nil, conn, http2.ErrCodeProtocol},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			c := h2test.Dial(t, sc.addr, tc.send != nil)
			if tc.send == nil {
				c.Headers(1, true, get...)
			} else {
				tc.send(c)
			}
			c.Flush()
			if tc.end == stream {
				s := c.Stream(1)
				c.MustRead(5*time.Second, "RST_STREAM", func() bool { return s.Done })
				if s.RST == nil || *s.RST != tc.code || s.Header != nil {
					t.Fatalf("stream 1: %v, want RST_STREAM %v and no answer", s, tc.code)
				}
				c.Request(3, http.MethodGet, "/ok", true)
				c.Flush()
				s = c.Stream(3)
				c.MustRead(5*time.Second, "the next request's answer", func() bool { return s.Done })
				if s.Status() != "200" || string(s.Body) != "ok" {
					t.Errorf("next request on the connection: %v, want 200 ok", s)
				}
				return
			}
			c.MustRead(5*time.Second, "GOAWAY", func() bool { return c.GoAway != nil })
			if c.GoAway.ErrCode != tc.code {
				t.Errorf("GOAWAY %v, want %v", c.GoAway.ErrCode, tc.code)
			}
			if err := c.ReadUntil(5*time.Second, func() bool { return false }); errors.Is(err, os.ErrDeadlineExceeded) {
				t.Errorf("connection still open after GOAWAY %v", c.GoAway.ErrCode)
			}
		})
	}
	if n := bad.Load(); n != 0 {
		t.Errorf("node served %d malformed requests, want 0", n)
	}
	// The listener still serves: a well-formed request on a new connection.
	if r := doGet(t, h2test.NewClient(t, nil), sc.URL+"/ok", nil); r.status != http.StatusOK || r.body != "ok" {
		t.Errorf("after malformed requests: %d %q, want 200 ok", r.status, r.body)
	}
}

// TestH2ContentLengthMismatch: a request whose DATA is not the length its
// content-length says is malformed (RFC 9113, 8.1.1) and gets
// RST_STREAM(PROTOCOL_ERROR). Relayed to an HTTP/1.1 node, the excess could
// otherwise become a second, smuggled request on the node's connection. A
// body of the declared length passes.
func TestH2ContentLengthMismatch(t *testing.T) {
	leakcheck.Check(t)
	var bodies sync.Map // path → body the node read
	node := startServer(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		b, _ := io.ReadAll(r.Body)
		bodies.Store(r.URL.Path, string(b))
		io.WriteString(w, "ok")
	}))
	sc := startH2Sidecar(t, staticCache(t, map[string][]string{"echo": {node.Listener.Addr().String()}}),
		RouteConfig{Service: "echo"}, ServerOptions{})
	tests := []struct {
		name     string
		length   string
		data     []string // DATA frames; the last ends the stream
		wantRST  bool
		wantBody string
	}{
		{"exact", "5", []string{"hello"}, false, "hello"},
		{"exact in two frames", "10", []string{"hello", "world"}, false, "helloworld"},
		{"longer than declared", "5", []string{"hello", "GET /smuggled HTTP/1.1\r\nHost: echo\r\n\r\n"}, true, ""},
		{"shorter than declared", "10", []string{"hello"}, true, ""},
		{"declared with no body", "5", nil, true, ""},
	}
	for i, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			c := h2test.Dial(t, sc.addr, true)
			path := fmt.Sprintf("/cl%d", i)
			c.Request(1, http.MethodPost, path, len(tc.data) == 0, "content-length", tc.length)
			for j, d := range tc.data {
				c.Data(1, j == len(tc.data)-1, []byte(d))
			}
			c.Flush()
			c.MustRead(5*time.Second, "the answer", func() bool { return c.Stream(1).Done })
			r := c.Stream(1)
			if tc.wantRST {
				if r.RST == nil || *r.RST != http2.ErrCodeProtocol {
					t.Errorf("stream = %v, want RST_STREAM(PROTOCOL_ERROR)", r)
				}
				if b, ok := bodies.Load(path); ok && b != "" && b != "hello" {
					t.Errorf("node read body %q, want at most the declared bytes", b)
				}
				return
			}
			if r.Status() != "200" || r.RST != nil {
				t.Errorf("stream = %v, want 200", r)
			}
			if b, _ := bodies.Load(path); b != tc.wantBody {
				t.Errorf("node read body %q, want %q", b, tc.wantBody)
			}
		})
	}
	if _, ok := bodies.Load("/smuggled"); ok {
		t.Error("the excess bytes reached the node as a request of their own")
	}
}

// shutdownHandler answers /slow with 1 MiB once release is closed,
// announcing on started that it began, and anything else at once.
func shutdownHandler(payload []byte, started chan<- struct{}, release <-chan struct{}) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path != "/slow" {
			io.WriteString(w, "fast")
			return
		}
		started <- struct{}{}
		select {
		case <-release:
		case <-r.Context().Done():
			return
		}
		w.Write(payload)
	})
}
