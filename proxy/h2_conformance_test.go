package proxy

import (
	"bufio"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"net/textproto"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/net/http2"

	"github.com/sidecarlb/sidecar/internal/h2/h2test"
	"github.com/sidecarlb/sidecar/internal/leakcheck"
)

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
	h2test.AcceptEach(t, ln, func(nc net.Conn) {
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
			c := h2test.Dial(t, sc.addr, true)
			c.Headers(1, true, ":method", tc.method, ":scheme", tc.scheme, ":authority", tc.authority, ":path", tc.path)
			c.Flush()
			s := c.Stream(1)
			c.MustRead(5*time.Second, "RST_STREAM", func() bool { return s.Done })
			if s.RST == nil || *s.RST != http2.ErrCodeProtocol || s.Header != nil {
				t.Fatalf("stream 1: %v, want RST_STREAM PROTOCOL_ERROR and no answer", s)
			}
		})
	}
	// A well-formed request reaches the node as sent.
	c := h2test.Dial(t, sc.addr, true)
	c.Request(1, http.MethodGet, "/public?x=1", true)
	c.Flush()
	s := c.Stream(1)
	c.MustRead(5*time.Second, "the answer", func() bool { return s.Done })
	if s.Status() != "200" {
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
