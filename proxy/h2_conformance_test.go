package proxy

import (
	"bufio"
	"errors"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"net/textproto"
	"os"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"

	"github.com/sidecarlb/sidecar/internal/leakcheck"
)

// TestH2StreamStates: frames on a stream that is half-closed or closed get
// what RFC 9113, 5.1 and 5.3.1 say (the cases h2spec 5.1/6, 5.1/8, 5.1/9,
// 5.1/12, 5.1.1/2 and 5.3.1 check): a stream error STREAM_CLOSED after the
// client's END_STREAM or RST_STREAM, a connection error after a normal
// close or on a stream never opened, a stream error PROTOCOL_ERROR for a
// stream depending on itself; and frames the client sent before it saw
// the sidecar's own reset are ignored.
func TestH2StreamStates(t *testing.T) {
	leakcheck.Check(t)
	srv := NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		switch r.URL.Path {
		case "/hold": // answers once the client is gone, or the body ends
			w.WriteHeader(http.StatusOK)
			w.(http.Flusher).Flush()
			_, _ = io.Copy(io.Discard, r.Body)
			<-r.Context().Done()
		case "/early": // answers without reading the body
		default:
			_, _ = io.Copy(io.Discard, r.Body)
			io.WriteString(w, "ok")
		}
	}), ServerOptions{}, testLogger(t))
	px := startProxyServerWith(t, srv)
	get := func(path string) []string {
		return []string{":method", "GET", ":scheme", "http", ":authority", "echo", ":path", path}
	}
	const (
		rst    = iota // RST_STREAM on stream 1, then stream 3 is served
		goAway        // GOAWAY, and the connection closes
		served        // no reset: stream 3 is served
	)
	tests := []struct {
		name string
		send func(c *rawH2)
		end  int
		code http2.ErrCode
	}{
		{"headers on a half-closed (remote) stream", func(c *rawH2) {
			c.headers(1, true, get("/hold")...)
			c.headers(1, true, "x-trailer", "1")
		}, rst, http2.ErrCodeStreamClosed},
		{"data after the client's reset", func(c *rawH2) {
			c.headers(1, false, get("/hold")...)
			_ = c.fr.WriteRSTStream(1, http2.ErrCodeCancel)
			_ = c.fr.WriteData(1, true, []byte("test"))
		}, rst, http2.ErrCodeStreamClosed},
		{"headers after the client's reset", func(c *rawH2) {
			c.headers(1, false, get("/hold")...)
			_ = c.fr.WriteRSTStream(1, http2.ErrCodeCancel)
			c.headers(1, true, "x-trailer", "1")
		}, rst, http2.ErrCodeStreamClosed},
		{"headers on a stream the client reset, once its handler returned", func(c *rawH2) {
			c.headers(1, false, get("/hold")...)
			c.flush()
			s := c.stream(1)
			c.mustRead(5*time.Second, "the answer's header", func() bool { return s.header != nil })
			_ = c.fr.WriteRSTStream(1, http2.ErrCodeCancel)
			c.flush()
			resWait(t, 5*time.Second, "the handler to return", func() bool {
				_, streams, _ := h2ServerLoad(srv)
				return streams == 0
			})
			c.headers(1, true, "x-trailer", "1")
		}, rst, http2.ErrCodeStreamClosed},
		{"headers on a stream closed normally", func(c *rawH2) {
			c.headers(1, true, get("/ok")...)
			c.flush()
			s := c.stream(1)
			c.mustRead(5*time.Second, "the answer", func() bool { return s.done })
			c.headers(1, true, get("/ok")...)
		}, goAway, http2.ErrCodeStreamClosed},
		{"headers on a lower stream never opened", func(c *rawH2) {
			c.headers(5, true, get("/ok")...)
			c.headers(3, true, get("/ok")...)
		}, goAway, http2.ErrCodeProtocol},
		{"trailers after the sidecar's reset", func(c *rawH2) {
			c.headers(1, false, get("/early")...)
			c.flush()
			s := c.stream(1)
			c.mustRead(5*time.Second, "the early answer and its reset", func() bool { return s.rst != nil })
			c.streams[1] = nil
			c.headers(1, true, "x-trailer", "1")
		}, served, 0},
		{"headers depending on their own stream", func(c *rawH2) {
			c.hbuf.Reset()
			for i, f := 0, get("/ok"); i < len(f); i += 2 {
				_ = c.enc.WriteField(hpack.HeaderField{Name: f[i], Value: f[i+1]})
			}
			_ = c.fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 1, BlockFragment: c.hbuf.Bytes(),
				EndStream: true, EndHeaders: true, Priority: http2.PriorityParam{StreamDep: 1, Weight: 15}})
		}, rst, http2.ErrCodeProtocol},
		{"priority depending on its own stream", func(c *rawH2) {
			_ = c.fr.WritePriority(1, http2.PriorityParam{StreamDep: 1, Weight: 15})
		}, rst, http2.ErrCodeProtocol},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			c := dialRawH2(t, px.Listener.Addr().String(), true)
			tc.send(c)
			c.flush()
			switch tc.end {
			case goAway:
				c.mustRead(5*time.Second, "GOAWAY", func() bool { return c.goAway != nil })
				if c.goAway.ErrCode != tc.code {
					t.Errorf("GOAWAY %v, want %v", c.goAway.ErrCode, tc.code)
				}
				if err := c.read(5*time.Second, func() bool { return false }); errors.Is(err, os.ErrDeadlineExceeded) {
					t.Errorf("connection still open after GOAWAY %v", c.goAway.ErrCode)
				}
				return
			case rst:
				s := c.stream(1)
				c.mustRead(5*time.Second, "RST_STREAM", func() bool { return s.rst != nil || c.goAway != nil })
				if c.goAway != nil || *s.rst != tc.code {
					t.Fatalf("stream 1: %v, GOAWAY %v; want RST_STREAM %v", s, c.goAway, tc.code)
				}
			}
			c.headers(7, true, get("/ok")...)
			c.flush()
			s := c.stream(7)
			c.mustRead(5*time.Second, "the next answer", func() bool { return s.done || c.goAway != nil })
			if c.goAway != nil || s.status() != "200" || string(s.body) != "ok" {
				t.Fatalf("next request: %v, GOAWAY %v; want 200 ok on the same connection", s, c.goAway)
			}
			if s := c.streams[1]; tc.end == served && s != nil {
				t.Errorf("stream 1 after the sidecar's reset: %v, want nothing", s)
			}
		})
	}
}

// lineNode is an HTTP/1.1 node that records the request line of every
// request it reads, as it came, and answers each "ok".
type lineNode struct {
	addr  string
	mu    sync.Mutex
	lines []string
}

func startLineNode(t testing.TB) *lineNode {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	n := &lineNode{addr: ln.Addr().String()}
	acceptEach(t, ln, func(nc net.Conn) {
		tp := textproto.NewReader(bufio.NewReader(nc))
		for {
			// The line as it came, whatever parsing would make of it.
			line, err := tp.ReadLine()
			if err != nil {
				return
			}
			n.mu.Lock()
			n.lines = append(n.lines, line)
			n.mu.Unlock()
			h, err := tp.ReadMIMEHeader()
			if err != nil {
				return
			}
			if cl, _ := strconv.Atoi(h.Get("Content-Length")); cl > 0 {
				if _, err := io.CopyN(io.Discard, tp.R, int64(cl)); err != nil {
					return
				}
			}
			if _, err := io.WriteString(nc, "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"); err != nil {
				return
			}
		}
	})
	return n
}

func (n *lineNode) seen() []string {
	n.mu.Lock()
	defer n.mu.Unlock()
	return append([]string(nil), n.lines...)
}

// TestH2PseudoHeaderValidation: a request whose :method is not a token,
// whose :path is not an absolute path of visible bytes (or "*" for
// OPTIONS), whose :scheme is not http or https, or whose :authority is not
// a valid host is malformed (RFC 9113, 8.3.1): the stream is reset with
// PROTOCOL_ERROR and nothing reaches the node. Relayed, "GET /internal?x="
// with :path /public was the node's request line
// "GET /internal?x= /public HTTP/1.1".
func TestH2PseudoHeaderValidation(t *testing.T) {
	leakcheck.Check(t)
	node := startLineNode(t)
	sc := startH2Sidecar(t, staticCache(t, map[string][]string{"echo": {node.addr}}),
		RouteConfig{Service: "echo", Protocol: "http"}, ServerOptions{})
	tests := []struct {
		name                            string
		method, scheme, authority, path string
	}{
		{"request line in the method", "GET /internal?x=", "http", "echo", "/public"},
		{"space in the method", "GET ", "http", "echo", "/public"},
		{"control byte in the method", "GET\x01", "http", "echo", "/public"},
		{"space in the path", "GET", "http", "echo", "/public /internal"},
		{"space in the query", "GET", "http", "echo", "/public?x= /internal"},
		{"tab in the path", "GET", "http", "echo", "/public\t/internal"},
		{"DEL in the path", "GET", "http", "echo", "/public\x7f"},
		{"absolute path form", "GET", "http", "echo", "http://echo/public"},
		{"path not starting with a slash", "GET", "http", "echo", "public"},
		{"asterisk for GET", "GET", "http", "echo", "*"},
		{"unknown scheme", "GET", "ftp", "echo", "/public"},
		{"space in the authority", "GET", "http", "echo internal", "/public"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			c := dialRawH2(t, sc.addr, true)
			c.headers(1, true, ":method", tc.method, ":scheme", tc.scheme, ":authority", tc.authority, ":path", tc.path)
			c.flush()
			s := c.stream(1)
			c.mustRead(5*time.Second, "RST_STREAM", func() bool { return s.done })
			if s.rst == nil || *s.rst != http2.ErrCodeProtocol || s.header != nil {
				t.Fatalf("stream 1: %v, want RST_STREAM PROTOCOL_ERROR and no answer", s)
			}
		})
	}
	// A well-formed request reaches the node as sent.
	c := dialRawH2(t, sc.addr, true)
	c.request(1, http.MethodGet, "/public?x=1", true)
	c.flush()
	s := c.stream(1)
	c.mustRead(5*time.Second, "the answer", func() bool { return s.done })
	if s.status() != "200" {
		t.Fatalf("well-formed request: %v, want 200", s)
	}
	if got := node.seen(); len(got) != 1 || got[0] != "GET /public?x=1 HTTP/1.1" {
		t.Errorf("node saw request lines %q, want only \"GET /public?x=1\"", got)
	}
}

// TestH1WriterRefusesBadRequestLine: the HTTP/1.1 pool refuses, with a
// 400 and without counting it against the node, a request whose method or
// target would split the request line, however it reached the proxy.
func TestH1WriterRefusesBadRequestLine(t *testing.T) {
	leakcheck.Check(t)
	node := startLineNode(t)
	px := New(staticCache(t, map[string][]string{"echo": {node.addr}}), nil, testLogger(t))
	h, err := px.Upstream("upstream", RouteConfig{Service: "echo", Protocol: "http"})
	if err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name   string
		method string
		query  string
	}{
		{"request line in the method", "GET /internal?x=", ""},
		{"newline in the method", "GET\r\nX: 1", ""},
		{"space in the query", "GET", "x= /internal"},
		{"newline in the query", "GET", "x=\r\nX: 1"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			req := httptest.NewRequest(http.MethodGet, "http://echo/public", nil)
			req.Method, req.URL.RawQuery = tc.method, tc.query
			rec := httptest.NewRecorder()
			h.ServeHTTP(rec, req)
			if rec.Code != http.StatusBadRequest {
				t.Errorf("status %d, want 400", rec.Code)
			}
		})
	}
	if got := node.seen(); len(got) != 0 {
		t.Errorf("node saw request lines %q, want none", got)
	}
	rec := httptest.NewRecorder()
	h.ServeHTTP(rec, httptest.NewRequest(http.MethodGet, "http://echo/public?x=1", nil))
	if rec.Code != http.StatusOK || !strings.HasPrefix(strings.Join(node.seen(), ","), "GET /public?x=1 HTTP/1.1") {
		t.Errorf("well-formed request: %d, node saw %q; want 200 and GET /public?x=1", rec.Code, node.seen())
	}
}

// TestH2ClientGoAwayThenPing: frames a client sends after its GOAWAY, on a
// connection with no stream open, are still handled (h2spec 7/1 sends a
// PING after a GOAWAY and wants its ACK, or a clean close): the PING is
// answered, and the connection closes once the client stops sending. The
// sidecar used to close at the GOAWAY, with the PING unread; when the PING
// reached its socket first, the close was a reset the client saw as an
// error.
func TestH2ClientGoAwayThenPing(t *testing.T) {
	leakcheck.Check(t)
	srv := NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {}), ServerOptions{}, testLogger(t))
	px := startProxyServerWith(t, srv)
	c := dialRawH2(t, px.Listener.Addr().String(), true)
	_ = c.fr.WriteGoAway(0, 0xff, nil)
	data := [8]byte{'h', '2', 's', 'p', 'e', 'c'}
	_ = c.fr.WritePing(false, data)
	c.flush()
	var ack bool
	for c.err == nil && !ack {
		_ = c.nc.SetReadDeadline(time.Now().Add(5 * time.Second))
		f, err := c.fr.ReadFrame()
		if err != nil {
			t.Fatalf("waiting for the PING's ACK: %v", err)
		}
		if p, ok := f.(*http2.PingFrame); ok && p.IsAck() && p.Data == data {
			ack = true
		}
	}
	if err := c.read(5*time.Second, func() bool { return false }); !errors.Is(err, io.EOF) {
		t.Errorf("after the PING's ACK: %v, want the connection closed", err)
	}
}
