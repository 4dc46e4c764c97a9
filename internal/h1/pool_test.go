package h1

import (
	"bufio"
	"context"
	"errors"
	"io"
	"net"
	"net/http"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/sidecarlb/sidecar/internal/httpwire"
	"github.com/sidecarlb/sidecar/internal/rawio"
	"github.com/sidecarlb/sidecar/internal/wait"
)

// rawNode is an HTTP/1.1 node answering with canned bytes, so tests control
// the response framing exactly. answer returns the raw response to one
// request and whether to close the connection after it.
type rawNode struct {
	ln      net.Listener
	accepts atomic.Int32
	closed  atomic.Int32 // connections the node has closed
	mu      sync.Mutex
	reqs    []*http.Request
	bodies  []string
}

func startRawNode(t *testing.T, answer func(r *http.Request) (string, bool)) *rawNode {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	n := &rawNode{ln: ln}
	var wg sync.WaitGroup
	var conns sync.Map
	t.Cleanup(func() {
		ln.Close()
		conns.Range(func(k, _ any) bool { k.(net.Conn).Close(); return true })
		wg.Wait()
	})
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			n.accepts.Add(1)
			conns.Store(c, true)
			wg.Add(1)
			go func() {
				defer wg.Done()
				defer n.closed.Add(1)
				defer c.Close()
				br := bufio.NewReader(c)
				for {
					r, err := http.ReadRequest(br)
					if err != nil {
						return
					}
					b, _ := io.ReadAll(r.Body)
					n.mu.Lock()
					n.reqs = append(n.reqs, r)
					n.bodies = append(n.bodies, string(b))
					n.mu.Unlock()
					raw, closeAfter := answer(r)
					if _, err := io.WriteString(c, raw); err != nil || closeAfter {
						return
					}
				}
			}()
		}
	}()
	return n
}

func (n *rawNode) addr() string { return n.ln.Addr().String() }

// testBody is a Body, as the proxy's replay body behaves: held in memory
// (buf), or streamed from src, and then replayable until read from.
type testBody struct {
	buf  []byte
	src  io.Reader
	read bool
}

func (b *testBody) Read(p []byte) (int, error) { b.read = true; return b.src.Read(p) }
func (b *testBody) Bytes() []byte              { return b.buf }
func (b *testBody) Replayable() bool           { return b.buf != nil || !b.read }

func testH1Pool() *Pool {
	return NewPool(time.Second, time.Minute, nil)
}

func h1Get(t *testing.T, ctx context.Context, p *Pool, method, addr string) (*http.Response, string, error) {
	t.Helper()
	req, err := http.NewRequestWithContext(ctx, method, "http://"+addr+"/path?q=1", nil)
	if err != nil {
		t.Fatal(err)
	}
	resp, err := p.RoundTrip(req, nil, time.Now())
	if err != nil {
		return nil, "", err
	}
	b, err := io.ReadAll(resp.Body)
	resp.Body.Close()
	return resp, string(b), err
}

func TestH1PoolFraming(t *testing.T) {
	tests := []struct {
		name      string
		method    string
		raw       string
		closeConn bool // node closes after answering
		wantBody  string
		wantLen   int64
		trailer   http.Header
		reuse     bool
	}{
		{name: "content-length", raw: "HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello",
			wantBody: "hello", wantLen: 5, reuse: true},
		{name: "empty content-length", raw: "HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",
			wantLen: 0, reuse: true},
		{name: "chunked", raw: "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n",
			wantBody: "abcde", wantLen: -1, reuse: true},
		{name: "chunked with trailers",
			raw:      "HTTP/1.1 200 OK\r\nTrailer: X-Sum\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\nX-Sum: 42\r\nX-Late: 1\r\n\r\n",
			wantBody: "abc", wantLen: -1, trailer: http.Header{"X-Sum": {"42"}, "X-Late": {"1"}}, reuse: true},
		{name: "close-delimited", raw: "HTTP/1.1 200 OK\r\n\r\nuntil the end", closeConn: true,
			wantBody: "until the end", wantLen: -1, reuse: false},
		{name: "http/1.0 no keep-alive", raw: "HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok",
			wantBody: "ok", wantLen: 2, reuse: false},
		{name: "http/1.0 keep-alive", raw: "HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 2\r\n\r\nok",
			wantBody: "ok", wantLen: 2, reuse: true},
		{name: "connection close", raw: "HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok",
			wantBody: "ok", wantLen: 2, reuse: false},
		{name: "head", method: http.MethodHead, raw: "HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n",
			wantLen: 1000, reuse: true},
		{name: "204", raw: "HTTP/1.1 204 No Content\r\n\r\n", reuse: true},
		{name: "304", raw: "HTTP/1.1 304 Not Modified\r\nContent-Length: 7\r\n\r\n", reuse: true},
		{name: "bare LF and folding", raw: "\r\nHTTP/1.1 200 OK\nX-Fold: a\n  b\nContent-Length: 1\n\nx",
			wantBody: "x", wantLen: 1, reuse: true},
		// RFC 9112, 6.1 and 6.3: framing a peer may read differently; the
		// answer is read as chunked and the connection not used again.
		{name: "chunked and content-length", raw: "HTTP/1.1 200 OK\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
			wantBody: "abc", wantLen: -1, reuse: false},
		{name: "http/1.0 keep-alive chunked", raw: "HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
			wantBody: "abc", wantLen: -1, reuse: false},
		{name: "1xx skipped", raw: "HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nx",
			wantBody: "x", wantLen: 1, reuse: true},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			node := startRawNode(t, func(*http.Request) (string, bool) { return tc.raw, tc.closeConn })
			p := testH1Pool()
			defer p.Retire()
			method := tc.method
			if method == "" {
				method = http.MethodGet
			}
			for i := range 2 {
				resp, body, err := h1Get(t, context.Background(), p, method, node.addr())
				if err != nil {
					t.Fatalf("request %d: %v", i, err)
				}
				if body != tc.wantBody {
					t.Errorf("body = %q, want %q", body, tc.wantBody)
				}
				if resp.ContentLength != tc.wantLen {
					t.Errorf("ContentLength = %d, want %d", resp.ContentLength, tc.wantLen)
				}
				for k, v := range tc.trailer {
					if got := resp.Trailer.Get(k); got != v[0] {
						t.Errorf("trailer %s = %q, want %q", k, got, v[0])
					}
				}
				if tc.name == "bare LF and folding" && resp.Header.Get("X-Fold") != "a b" {
					t.Errorf("X-Fold = %q, want %q", resp.Header.Get("X-Fold"), "a b")
				}
				if tc.trailer != nil && resp.Header.Get("Trailer") != "" {
					t.Errorf("Trailer header left in the response header")
				}
			}
			want := int32(2)
			if tc.reuse {
				want = 1
			}
			if got := node.accepts.Load(); got != want {
				t.Errorf("connections = %d, want %d", got, want)
			}
		})
	}
}

func TestH1PoolMalformed(t *testing.T) {
	tests := []struct{ name, raw string }{
		{"garbage", "HELLO\r\n\r\n"},
		{"bad status", "HTTP/1.1 2x0 OK\r\n\r\n"},
		{"bad length", "HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n"},
		{"conflicting lengths", "HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nx"},
		{"unknown encoding", "HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n"},
		{"101", "HTTP/1.1 101 Switching Protocols\r\n\r\n"},
		{"bad header key", "HTTP/1.1 200 OK\r\nBad Key: 1\r\nContent-Length: 0\r\n\r\n"},
		{"header without colon", "HTTP/1.1 200 OK\r\nNoColon\r\nContent-Length: 0\r\n\r\n"},
		{"control byte in value", "HTTP/1.1 200 OK\r\nX-A: a\x01b\r\nContent-Length: 0\r\n\r\n"},
		{"header too long", "HTTP/1.1 200 OK\r\nX-A: " + strings.Repeat("a", poolMaxHeaderBytes) + "\r\n\r\n"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			node := startRawNode(t, func(*http.Request) (string, bool) { return tc.raw, false })
			p := testH1Pool()
			defer p.Retire()
			if _, _, err := h1Get(t, context.Background(), p, http.MethodGet, node.addr()); err == nil {
				t.Errorf("roundTrip() error = nil, want one")
			}
		})
	}
}

func TestH1PoolShortBody(t *testing.T) {
	node := startRawNode(t, func(*http.Request) (string, bool) {
		return "HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc", true
	})
	p := testH1Pool()
	defer p.Retire()
	if _, _, err := h1Get(t, context.Background(), p, http.MethodGet, node.addr()); !errors.Is(err, io.ErrUnexpectedEOF) {
		t.Errorf("read error = %v, want %v", err, io.ErrUnexpectedEOF)
	}
}

func TestH1PoolWritesRequest(t *testing.T) {
	node := startRawNode(t, func(*http.Request) (string, bool) {
		return "HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", false
	})
	p := testH1Pool()
	defer p.Retire()
	req, _ := http.NewRequest(http.MethodPost, "http://"+node.addr()+"/a%2Fb?x=1&y=2", nil)
	req.Host = "svc.example"
	req.Header = http.Header{"X-One": {"1", "2"}, "User-Agent": {""}}
	resp, err := p.RoundTrip(req, &testBody{buf: []byte("payload")}, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	node.mu.Lock()
	defer node.mu.Unlock()
	got := node.reqs[0]
	if got.Host != "svc.example" || got.RequestURI != "/a%2Fb?x=1&y=2" || got.ContentLength != 7 || node.bodies[0] != "payload" {
		t.Errorf("node saw Host %q, URI %q, length %d, body %q", got.Host, got.RequestURI, got.ContentLength, node.bodies[0])
	}
	if v := got.Header["X-One"]; len(v) != 2 || v[0] != "1" || v[1] != "2" {
		t.Errorf("X-One = %q, want [1 2]", v)
	}
	if _, ok := got.Header["User-Agent"]; ok {
		t.Errorf("empty User-Agent sent")
	}
}

// A node closing a keep-alive connection while it is idle must not fail the
// next request: it goes again on a new connection.
func TestH1PoolRetriesConnClosedIdle(t *testing.T) {
	node := startRawNode(t, func(*http.Request) (string, bool) {
		return "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", true // no Connection: close
	})
	p := testH1Pool()
	defer p.Retire()
	for i := range 3 {
		if _, body, err := h1Get(t, context.Background(), p, http.MethodGet, node.addr()); err != nil || body != "ok" {
			t.Fatalf("request %d = %q, %v; want ok", i, body, err)
		}
		time.Sleep(20 * time.Millisecond) // let the close arrive
	}
	if got := node.accepts.Load(); got < 3 {
		t.Errorf("connections = %d, want a new one per request", got)
	}
}

// TestH1PoolRetriesOnlyWhatIsSafeToRepeat: a request the node read and
// then closed its connection on, answering nothing, may have been acted
// on: a POST is not sent again, unless it carries an Idempotency-Key.
func TestH1PoolRetriesOnlyWhatIsSafeToRepeat(t *testing.T) {
	var drop atomic.Bool // the node reads the next request and closes
	node := startRawNode(t, func(*http.Request) (string, bool) {
		if drop.CompareAndSwap(true, false) {
			return "", true
		}
		return "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", false
	})
	p := testH1Pool()
	defer p.Retire()
	post := func(key string) error {
		req, _ := http.NewRequest(http.MethodPost, "http://"+node.addr()+"/", nil)
		if key != "" {
			req.Header.Set("Idempotency-Key", key)
		}
		resp, err := p.RoundTrip(req, nil, time.Now())
		if err == nil {
			io.Copy(io.Discard, resp.Body)
			resp.Body.Close()
		}
		return err
	}
	warm := func() {
		t.Helper()
		if _, body, err := h1Get(t, context.Background(), p, http.MethodGet, node.addr()); err != nil || body != "ok" {
			t.Fatalf("GET = %q, %v; want ok", body, err)
		}
		drop.Store(true)
	}

	warm()
	before := node.accepts.Load()
	if err := post(""); err == nil {
		t.Errorf("POST the node read and dropped succeeded, want an error: it was sent and may have been acted on")
	}
	if got := node.accepts.Load(); got != before {
		t.Errorf("POST dialled %d new connections, want none (no replay of a sent POST)", got-before)
	}

	warm()
	if err := post("k-1"); err != nil {
		t.Errorf("POST with an Idempotency-Key the node dropped = %v, want it retried on a new connection", err)
	}
}

// TestH1PoolSkipsConnClosedWhileIdle: a connection the node closed while
// it was idle in the pool is noticed before reuse, so a POST, which could
// not be retried after it was sent on it, goes on a new one, once.
func TestH1PoolSkipsConnClosedWhileIdle(t *testing.T) {
	node := startRawNode(t, func(*http.Request) (string, bool) {
		return "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", true // closes, says nothing
	})
	p := testH1Pool()
	defer p.Retire()
	for i := range 3 {
		req, _ := http.NewRequest(http.MethodPost, "http://"+node.addr()+"/", strings.NewReader("body"))
		// As if sent a moment later: the connection has been idle for
		// poolCheckIdleAfter.
		resp, err := p.RoundTrip(req, &testBody{buf: []byte("body")}, time.Now().Add(poolCheckIdleAfter))
		if err != nil {
			t.Fatalf("POST %d on a pool whose idle connection the node closed: %v", i, err)
		}
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		// Wait for the node's close: the pool holds a dead connection.
		deadline := time.Now().Add(5 * time.Second)
		for node.closed.Load() < int32(i+1) && time.Now().Before(deadline) {
			time.Sleep(time.Millisecond)
		}
	}
	node.mu.Lock()
	defer node.mu.Unlock()
	if len(node.reqs) != 3 || node.accepts.Load() != 3 {
		t.Errorf("node read %d requests on %d connections, want 3 on 3", len(node.reqs), node.accepts.Load())
	}
}

func TestH1PoolDialError(t *testing.T) {
	ln, _ := net.Listen("tcp", "127.0.0.1:0")
	addr := ln.Addr().String()
	ln.Close()
	p := testH1Pool()
	_, _, err := h1Get(t, context.Background(), p, http.MethodGet, addr)
	var op *net.OpError
	if !errors.As(err, &op) || op.Op != "dial" {
		t.Errorf("roundTrip() error = %v, want a dial error", err)
	}
}

func TestH1PoolContextCancelMidBody(t *testing.T) {
	release := make(chan struct{})
	defer close(release)
	node := startRawNode(t, func(*http.Request) (string, bool) {
		return "HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nfirst", false
	})
	p := testH1Pool()
	defer p.Retire()
	ctx, cancel := context.WithCancel(context.Background())
	req, _ := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+node.addr()+"/", nil)
	resp, err := p.RoundTrip(req, nil, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 5)
	if _, err := io.ReadFull(resp.Body, buf); err != nil {
		t.Fatal(err)
	}
	time.AfterFunc(20*time.Millisecond, cancel)
	start := time.Now()
	_, err = io.ReadAll(resp.Body)
	if !errors.Is(err, context.Canceled) {
		t.Errorf("read error = %v, want %v", err, context.Canceled)
	}
	if d := time.Since(start); d > 5*time.Second {
		t.Errorf("read returned after %v, want soon after cancel", d)
	}
	resp.Body.Close()
}

func TestH1PoolDeadline(t *testing.T) {
	node := startRawNode(t, func(*http.Request) (string, bool) {
		time.Sleep(300 * time.Millisecond)
		return "HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", false
	})
	p := testH1Pool()
	defer p.Retire()
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	if _, _, err := h1Get(t, ctx, p, http.MethodGet, node.addr()); !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("roundTrip() error = %v, want %v", err, context.DeadlineExceeded)
	}
}

func TestH1PoolCloseBeforeEOF(t *testing.T) {
	node := startRawNode(t, func(*http.Request) (string, bool) {
		return "HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n0123456789", false
	})
	p := testH1Pool()
	defer p.Retire()
	for range 2 {
		req, _ := http.NewRequest(http.MethodGet, "http://"+node.addr()+"/", nil)
		resp, err := p.RoundTrip(req, nil, time.Now())
		if err != nil {
			t.Fatal(err)
		}
		_, _ = resp.Body.Read(make([]byte, 3))
		resp.Body.Close()
		if _, err := resp.Body.Read(make([]byte, 3)); err == nil {
			t.Errorf("Read after Close = nil error, want one")
		}
	}
	if got := node.accepts.Load(); got != 2 {
		t.Errorf("connections = %d, want 2 (a body closed early closes its connection)", got)
	}
}

func TestH1PoolIdleTimeoutAndRetire(t *testing.T) {
	node := startRawNode(t, func(*http.Request) (string, bool) {
		return "HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", false
	})
	p := NewPool(time.Second, 50*time.Millisecond, nil)
	if _, _, err := h1Get(t, context.Background(), p, http.MethodGet, node.addr()); err != nil {
		t.Fatal(err)
	}
	if pc := p.take(time.Now().Add(time.Second)); pc != nil {
		t.Errorf("take() past the idle timeout = a connection, want nil")
	}
	if _, _, err := h1Get(t, context.Background(), p, http.MethodGet, node.addr()); err != nil {
		t.Fatal(err)
	}
	p.Retire()
	p.mu.Lock()
	idle := len(p.idle)
	p.mu.Unlock()
	if idle != 0 {
		t.Errorf("idle after retire = %d, want 0", idle)
	}
	if _, _, err := h1Get(t, context.Background(), p, http.MethodGet, node.addr()); err != nil {
		t.Fatal(err)
	}
	p.mu.Lock()
	idle = len(p.idle)
	p.mu.Unlock()
	if idle != 0 {
		t.Errorf("idle after an exchange on a retired pool = %d, want 0", idle)
	}
}

func TestH1PoolStreamsKnownLengthBody(t *testing.T) {
	node := startRawNode(t, func(*http.Request) (string, bool) {
		return "HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", false
	})
	p := testH1Pool()
	defer p.Retire()
	payload := strings.Repeat("0123456789", 1000) // larger than the write buffer
	req, _ := http.NewRequest(http.MethodPost, "http://"+node.addr()+"/", io.NopCloser(strings.NewReader(payload)))
	req.ContentLength = int64(len(payload))
	b := &testBody{src: req.Body}
	req.Body = io.NopCloser(b)
	if !Qualifies(req, b) {
		t.Fatalf("Qualifies() = false for a %d-byte body, want true", len(payload))
	}
	resp, err := p.RoundTrip(req, b, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	node.mu.Lock()
	got := node.bodies[0]
	node.mu.Unlock()
	if got != payload {
		t.Errorf("node got %d bytes, want %d", len(got), len(payload))
	}

	short := &testBody{src: strings.NewReader("abc")}
	req, _ = http.NewRequest(http.MethodPost, "http://"+node.addr()+"/", nil)
	req.ContentLength = 10
	req.Body = io.NopCloser(short)
	if _, err := p.RoundTrip(req, short, time.Now()); !errors.Is(err, httpwire.ErrBadRequestBody) {
		t.Errorf("roundTrip() of a short body error = %v, want %v", err, httpwire.ErrBadRequestBody)
	}

	req, _ = http.NewRequest(http.MethodPost, "http://"+node.addr()+"/", nil)
	req.ContentLength = MaxStreamedBody + 1
	if Qualifies(req, &testBody{src: http.NoBody}) {
		t.Errorf("Qualifies() = true for a body over %d bytes, want false", MaxStreamedBody)
	}
}

func TestH1PoolRequestClose(t *testing.T) {
	node := startRawNode(t, func(*http.Request) (string, bool) {
		return "HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", false
	})
	p := testH1Pool()
	defer p.Retire()
	for range 2 {
		req, _ := http.NewRequest(http.MethodGet, "http://"+node.addr()+"/", nil)
		req.Close = true
		resp, err := p.RoundTrip(req, nil, time.Now())
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
	}
	node.mu.Lock()
	closeSent := node.reqs[0].Close
	node.mu.Unlock()
	if !closeSent {
		t.Errorf("node saw no Connection: close")
	}
	if got := node.accepts.Load(); got != 2 {
		t.Errorf("connections = %d, want 2", got)
	}
}

func TestInterrupter(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	ictx, end := WithInterrupter(ctx)
	defer end()
	ci := ictx.Value(interrupterKey{}).(*interrupter)

	calls := make(chan string, 4)
	if !ci.arm(func() { calls <- "first" }) {
		t.Fatal("arm() = false on a free interrupter")
	}
	if ci.arm(func() { calls <- "second" }) {
		t.Fatal("arm() = true while another exchange holds the interrupter")
	}
	if !ci.stop() {
		t.Fatal("stop() = false before the context ended")
	}
	if !ci.arm(func() { calls <- "third" }) {
		t.Fatal("arm() = false after stop")
	}
	cancel()
	select {
	case got := <-calls:
		if got != "third" {
			t.Fatalf("called %q, want the armed function", got)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("the armed function was not called when the context ended")
	}
	if ci.stop() {
		t.Error("stop() = true after the armed function was called")
	}
	// Armed after the end, the function runs at once, as with
	// context.AfterFunc, and stop says so.
	if !ci.arm(func() { calls <- "late" }) {
		t.Fatal("arm() = false after the end")
	}
	select {
	case got := <-calls:
		if got != "late" {
			t.Fatalf("called %q, want the late function", got)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("a function armed after the end was not called")
	}
	if ci.stop() {
		t.Error("stop() = true for a function armed after the end")
	}
}

// An exchange on a context derived from the app connection's (a request
// timeout, say) has its own end, so it does not use the connection's
// interrupter.
func TestExchangeArmDerivedContext(t *testing.T) {
	ictx, end := WithInterrupter(context.Background())
	defer end()
	ci := ictx.Value(interrupterKey{}).(*interrupter)
	dctx, cancel := context.WithCancel(ictx)
	called := make(chan struct{})
	x := exchange{ctx: dctx}
	x.arm(func() { close(called) })
	if x.ci != nil {
		t.Fatal("a derived context armed the connection's interrupter")
	}
	if !ci.arm(func() {}) {
		t.Fatal("the connection's interrupter is held")
	}
	ci.stop()
	cancel()
	select {
	case <-called:
	case <-time.After(5 * time.Second):
		t.Fatal("the derived context's end did not interrupt the exchange")
	}
	if x.stop() {
		t.Error("stop() = true after the interrupt")
	}
}

// The app connection's end interrupts an exchange still armed, at once,
// before its context is canceled.
func TestInterrupterEnd(t *testing.T) {
	ictx, end := WithInterrupter(context.Background())
	ci := ictx.Value(interrupterKey{}).(*interrupter)
	called := false
	if !ci.arm(func() { called = true }) {
		t.Fatal("arm() = false on a free interrupter")
	}
	end()
	if !called {
		t.Fatal("end() did not call the armed function")
	}
	if ci.stop() {
		t.Error("stop() = true after end()")
	}
}

// TestH1UpgradedCloseWriteError: the half-close of an upgraded node
// connection reports its failure, here on a connection already closed.
func TestH1UpgradedCloseWriteError(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	c, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	u := &upgraded{pc: &ClientConn{c: rawio.Wrap(c)}}
	if err := u.CloseWrite(); err != nil {
		t.Fatalf("CloseWrite on an open connection: %v", err)
	}
	c.Close()
	if err := u.CloseWrite(); err == nil {
		t.Fatal("CloseWrite on a closed connection reported no error")
	}
}

// TestH1PoolIdleSweep: connections left idle past the idle timeout are
// closed by the pool's sweep, with no request coming to find them stale,
// and the sweep comes back for a connection that was not stale yet when it
// ran.
func TestH1PoolIdleSweep(t *testing.T) {
	const idle = 200 * time.Millisecond
	node := startRawNode(t, func(*http.Request) (string, bool) {
		return "HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", false
	})
	p := NewPool(time.Second, idle, nil)
	t.Cleanup(p.Retire)
	a, err := p.dial(context.Background(), node.addr())
	if err != nil {
		t.Fatal(err)
	}
	b, err := p.dial(context.Background(), node.addr())
	if err != nil {
		t.Fatal(err)
	}
	wait.For(t, 2*time.Second, "the node to accept both connections", func() bool { return node.accepts.Load() == 2 })
	p.put(a)
	time.Sleep(idle / 2)
	p.put(b) // idle half as long as a when the first sweep runs
	wait.For(t, 5*time.Second, "the sweep to close the idle connections", func() bool {
		return node.closed.Load() == 2
	})
	p.mu.Lock()
	n := len(p.idle)
	p.mu.Unlock()
	if n != 0 {
		t.Errorf("idle connections after the sweep = %d, want 0", n)
	}
}

// TestH1PoolZeroIdle: timeouts.idle 0s means no limit: a connection idle
// for a day is reused, and no sweep is armed to close it.
func TestH1PoolZeroIdle(t *testing.T) {
	node := startRawNode(t, func(*http.Request) (string, bool) {
		return "HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", false
	})
	p := NewPool(time.Second, 0, nil)
	t.Cleanup(p.Retire)
	if _, _, err := h1Get(t, context.Background(), p, http.MethodGet, node.addr()); err != nil {
		t.Fatal(err)
	}
	p.mu.Lock()
	armed := p.sweep != nil
	p.mu.Unlock()
	if armed {
		t.Error("idle sweep armed with no idle limit")
	}
	pc := p.take(time.Now().Add(24 * time.Hour))
	if pc == nil {
		t.Fatal("take() a day later = nil, want the idle connection: no idle limit")
	}
	p.put(pc)
}

// TestH1PoolIdleHoldsNoBuffers: a connection back in the pool has given
// its read and write buffers back (the forward proxy keeps one idle
// connection per service it reached, thousands of them), and takes them
// again for its next exchange, chunked answers and answers read to EOF
// included.
func TestH1PoolIdleHoldsNoBuffers(t *testing.T) {
	answers := []string{
		"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
		"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\nX-T: 1\r\n\r\n",
		"HTTP/1.1 204 No Content\r\n\r\n",
	}
	var n atomic.Int32
	node := startRawNode(t, func(*http.Request) (string, bool) {
		return answers[int(n.Add(1)-1)%len(answers)], false
	})
	p := testH1Pool()
	defer p.Retire()
	for i := range 2 * len(answers) {
		resp, body, err := h1Get(t, context.Background(), p, http.MethodGet, node.addr())
		if err != nil {
			t.Fatalf("request %d: %v", i, err)
		}
		if want := map[int]string{200: "ok", 204: ""}[resp.StatusCode]; body != want {
			t.Fatalf("request %d body = %q, want %q", i, body, want)
		}
		p.mu.Lock()
		idle := slices.Clone(p.idle)
		p.mu.Unlock()
		if len(idle) != 1 {
			t.Fatalf("after request %d: %d idle connections, want 1", i, len(idle))
		}
		if pc := idle[0]; pc.br != nil || pc.bw != nil || pc.head != nil {
			t.Errorf("after request %d: the idle connection holds its buffers (reader %v, writer %v, head %d bytes)",
				i, pc.br != nil, pc.bw != nil, cap(pc.head))
		}
	}
	if got := node.accepts.Load(); got != 1 {
		t.Errorf("connections = %d, want 1 (reused)", got)
	}
}
