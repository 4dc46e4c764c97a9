package proxy

import (
	"io"
	"net/http"
	"slices"
	"strings"
	"sync"
	"testing"

	"github.com/sidecarlb/sidecar/internal/leakcheck"
)

// These tests send raw bytes to a real sidecar listener in front of a node
// that records every request it runs, and check which of the bytes become
// requests at the node: the keep-alive decision and the body's framing
// decide what a proxy would otherwise run as a request nobody sent
// (request smuggling).

// recordingNode is a node that records "METHOD PATH" of each request.
type recordingNode struct {
	*testServer
	mu   sync.Mutex
	seen []string
}

func startRecordingNode(t *testing.T) *recordingNode {
	t.Helper()
	n := &recordingNode{}
	n.testServer = startServer(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		_, _ = io.Copy(io.Discard, r.Body)
		n.mu.Lock()
		n.seen = append(n.seen, r.Method+" "+r.URL.Path)
		n.mu.Unlock()
		io.WriteString(w, "ran "+r.URL.Path)
	}))
	return n
}

func (n *recordingNode) requests() []string {
	n.mu.Lock()
	defer n.mu.Unlock()
	return slices.Clone(n.seen)
}

// rawSession writes raw to addr in one write, then reads answers until the
// server closes the connection, and returns their statuses. It fails the
// test if the connection is still open after h1tTimeout.
func rawSession(t *testing.T, addr, raw string) []int {
	t.Helper()
	c, br := h1tDial(t, addr)
	wrote := make(chan struct{})
	go func() {
		defer close(wrote)
		_, _ = io.WriteString(c, raw) // the server may close before reading it all
	}()
	defer func() {
		c.Close()
		<-wrote
	}()
	var codes []int
	for {
		if _, err := br.Peek(1); err != nil {
			if h1tIsTimeout(err) {
				t.Fatalf("connection still open after answers %v", codes)
			}
			return codes
		}
		resp, err := http.ReadResponse(br, nil)
		if err != nil {
			t.Fatalf("after answers %v: ReadResponse: %v", codes, err)
		}
		_, err = io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		if h1tIsTimeout(err) {
			t.Fatalf("connection still open in the body of answer %d after %v", resp.StatusCode, codes)
		}
		codes = append(codes, resp.StatusCode)
	}
}

func TestH1ProxyFraming(t *testing.T) {
	leakcheck.Check(t)
	const smuggled = "GET /smuggled HTTP/1.1\r\nHost: svc\r\n\r\n"
	cases := []struct {
		name  string
		raw   string
		codes []int
		node  []string // requests the node runs
	}{{
		name:  "Connection: close is honoured",
		raw:   "GET /a HTTP/1.1\r\nHost: svc\r\nConnection: close\r\n\r\n" + smuggled,
		codes: []int{200},
		node:  []string{"GET /a"},
	}, {
		name:  "Connection: close on the slow path",
		raw:   "GET /a HTTP/1.1\r\nHost: svc\r\nConnection: close\r\nX: a\r\n b\r\n\r\n" + smuggled,
		codes: []int{200},
		node:  []string{"GET /a"},
	}, {
		name:  "HTTP/1.0 closes by default",
		raw:   "GET /a HTTP/1.0\r\nHost: svc\r\n\r\n" + smuggled,
		codes: []int{200},
		node:  []string{"GET /a"},
	}, {
		name:  "HTTP/1.0 keep-alive keeps",
		raw:   "GET /a HTTP/1.0\r\nHost: svc\r\nConnection: keep-alive\r\n\r\nGET /b HTTP/1.0\r\nHost: svc\r\n\r\n",
		codes: []int{200, 200},
		node:  []string{"GET /a", "GET /b"},
	}, {
		name:  "HTTP/1.0 chunked",
		raw:   "POST /a HTTP/1.0\r\nHost: svc\r\nTransfer-Encoding: chunked\r\n\r\n" + smuggled,
		codes: []int{400},
	}, {
		name:  "HTTP/1.0 keep-alive chunked",
		raw:   "POST /a HTTP/1.0\r\nHost: svc\r\nConnection: keep-alive\r\ntransfer-encoding: chunked\r\n\r\n" + smuggled,
		codes: []int{400},
	}, {
		name: "HTTP/1.0 keep-alive chunked with a Content-Length",
		raw: "POST /a HTTP/1.0\r\nHost: svc\r\nConnection: keep-alive\r\nContent-Length: 0\r\nTransfer-Encoding: chunked\r\n\r\n" +
			smuggled,
		codes: []int{400},
	}, {
		name:  "chunked and Content-Length",
		raw:   "POST /a HTTP/1.1\r\nHost: svc\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n" + smuggled,
		codes: []int{400},
	}, {
		name:  "Content-Length and chunked",
		raw:   "POST /a HTTP/1.1\r\nHost: svc\r\nTransfer-Encoding: chunked\r\nContent-Length: 42\r\n\r\n0\r\n\r\n" + smuggled,
		codes: []int{400},
	}, {
		name:  "two different Content-Lengths",
		raw:   "POST /a HTTP/1.1\r\nHost: svc\r\nContent-Length: 0\r\nContent-Length: 39\r\n\r\n" + smuggled,
		codes: []int{400},
	}, {
		name:  "chunked twice",
		raw:   "POST /a HTTP/1.1\r\nHost: svc\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n" + smuggled,
		codes: []int{400},
	}, {
		name:  "Transfer-Encoding folded",
		raw:   "POST /a HTTP/1.1\r\nHost: svc\r\nTransfer-Encoding:\r\n chunked\r\nConnection: close\r\n\r\n0\r\n\r\n" + smuggled,
		codes: []int{200},
		node:  []string{"POST /a"},
	}, {
		name:  "chunked, kept alive",
		raw:   "POST /a HTTP/1.1\r\nHost: svc\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\nGET /b HTTP/1.1\r\nHost: svc\r\nConnection: close\r\n\r\n",
		codes: []int{200, 200},
		node:  []string{"POST /a", "GET /b"},
	}, {
		name:  "bare LF line ends",
		raw:   "GET /a HTTP/1.1\nHost: svc\nConnection: close\n\n" + smuggled,
		codes: []int{200},
		node:  []string{"GET /a"},
	}}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			node := startRecordingNode(t)
			px := startUpstream(t, staticCache(t, map[string][]string{"svc": {node.Listener.Addr().String()}}),
				RouteConfig{Service: "svc"})
			codes := rawSession(t, strings.TrimPrefix(px.URL, "http://"), tc.raw)
			if !slices.Equal(codes, tc.codes) {
				t.Errorf("answers %v, want %v", codes, tc.codes)
			}
			if got := node.requests(); !slices.Equal(got, tc.node) {
				t.Errorf("node ran %q, want %q", got, tc.node)
			}
		})
	}
}
