package h1

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httputil"
	"net/textproto"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"go.uber.org/zap"

	"github.com/sidecarlb/sidecar/internal/leakcheck"
	"github.com/sidecarlb/sidecar/internal/rawio"
)

// These tests pin down how the HTTP/1.1 server speaks to a client, byte by
// byte where framing matters, so that the server's own connection loop can
// be checked against what net/http did. A listener in the test hands each
// connection to ServeConn as the sidecar's does: the first byte it read
// (its sniff) goes along as the prefix.

// h1tTimeout bounds every client read and write in these tests.
const h1tTimeout = 5 * time.Second

type h1tServer struct {
	srv    *Server
	addr   string
	served chan struct{} // closed when the accept loop has returned
}

// h1tStart serves h on a loopback listener until the test ends.
func h1tStart(t *testing.T, h http.Handler, opts Options) *h1tServer {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	st := &h1tServer{srv: NewServer(ctx, h, opts, zap.NewNop()), addr: ln.Addr().String(), served: make(chan struct{})}
	var conns sync.WaitGroup
	go func() {
		defer close(st.served)
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			conns.Go(func() { h1tSniff(st.srv, rawio.Wrap(c), opts.ReadHeaderTimeout) })
		}
	}()
	t.Cleanup(func() {
		ln.Close()
		st.srv.Close()
		cancel()
		select {
		case <-st.served:
		case <-time.After(h1tTimeout):
			t.Errorf("the accept loop did not return within %v of Close", h1tTimeout)
		}
		conns.Wait()
	})
	return st
}

// h1tSniff reads the first byte of c within d, as the sidecar's listener
// reads its sniff, and hands c to s with it.
func h1tSniff(s *Server, c net.Conn, d time.Duration) {
	var b [1]byte
	_ = c.SetReadDeadline(deadline(d))
	n, err := c.Read(b[:])
	if err != nil {
		c.Close()
		return
	}
	_ = c.SetReadDeadline(time.Time{})
	s.ServeConn(c, b[:n])
}

// h1tDial connects to addr with every read and write bounded, closed when
// the test ends.
func h1tDial(t *testing.T, addr string) (net.Conn, *bufio.Reader) {
	t.Helper()
	c, err := net.DialTimeout("tcp", addr, h1tTimeout)
	if err != nil {
		t.Fatal(err)
	}
	_ = c.SetDeadline(time.Now().Add(h1tTimeout))
	t.Cleanup(func() { c.Close() })
	return c, bufio.NewReader(c)
}

func h1tWrite(t *testing.T, c net.Conn, raw string) {
	t.Helper()
	if _, err := io.WriteString(c, raw); err != nil {
		t.Fatalf("write: %v", err)
	}
}

// h1tRead reads one response to a request of method and its whole body.
func h1tRead(t *testing.T, br *bufio.Reader, method string) (*http.Response, string) {
	t.Helper()
	var req *http.Request
	if method != "" {
		req = &http.Request{Method: method}
	}
	resp, err := http.ReadResponse(br, req)
	if err != nil {
		t.Fatalf("ReadResponse: %v", err)
	}
	body, err := io.ReadAll(resp.Body)
	resp.Body.Close()
	if err != nil {
		t.Fatalf("reading the body of %q: %v (read %q)", resp.Status, err, body)
	}
	return resp, string(body)
}

// h1tHead reads a response's status line and header block exactly as they
// are on the wire, and leaves br at the first byte after them.
func h1tHead(t *testing.T, br *bufio.Reader) (string, textproto.MIMEHeader) {
	t.Helper()
	tp := textproto.NewReader(br)
	line, err := tp.ReadLine()
	if err != nil {
		t.Fatalf("reading a status line: %v", err)
	}
	h, err := tp.ReadMIMEHeader()
	if err != nil {
		t.Fatalf("reading the header after %q: %v", line, err)
	}
	return line, h
}

func h1tIsTimeout(err error) bool {
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout()
}

// h1tExpectClosed fails unless the server has closed the connection (or
// closes it before the client's deadline) without sending anything more.
func h1tExpectClosed(t *testing.T, br *bufio.Reader) {
	t.Helper()
	rest, err := io.ReadAll(br)
	if h1tIsTimeout(err) {
		t.Fatalf("connection still open (read %q, then %v)", rest, err)
	}
	if len(rest) > 0 {
		t.Fatalf("read %q after the response, want the connection closed", rest)
	}
}

// h1tRecv receives from ch within d.
func h1tRecv[T any](t *testing.T, ch <-chan T, d time.Duration, what string) T {
	t.Helper()
	select {
	case v := <-ch:
		return v
	case <-time.After(d):
		t.Fatalf("timed out after %v waiting for %s", d, what)
		panic("unreachable")
	}
}

func TestH1ServerKeepAlive(t *testing.T) {
	leakcheck.Check(t)
	remotes := make(chan string, 3)
	st := h1tStart(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		remotes <- r.RemoteAddr
		body := "answer " + r.URL.Path
		w.Header().Set("Content-Length", fmt.Sprint(len(body)))
		io.WriteString(w, body)
	}), Options{})
	c, br := h1tDial(t, st.addr)
	for i := range 3 {
		path := fmt.Sprintf("/k%d", i)
		h1tWrite(t, c, "GET "+path+" HTTP/1.1\r\nHost: svc\r\n\r\n")
		resp, body := h1tRead(t, br, "GET")
		if resp.StatusCode != 200 || body != "answer "+path {
			t.Fatalf("request %d: %d %q, want 200 %q", i, resp.StatusCode, body, "answer "+path)
		}
		if resp.ContentLength != int64(len(body)) || resp.Close {
			t.Fatalf("request %d: ContentLength %d, Close %v; want %d, false", i, resp.ContentLength, resp.Close, len(body))
		}
		if got := h1tRecv(t, remotes, time.Second, "the handler"); got != c.LocalAddr().String() {
			t.Fatalf("request %d came from %s, want %s", i, got, c.LocalAddr())
		}
	}
}

func TestH1ServerPipelining(t *testing.T) {
	leakcheck.Check(t)
	st := h1tStart(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/p1" {
			// A slow first answer must still come first.
			time.Sleep(50 * time.Millisecond)
		}
		io.WriteString(w, "body of "+r.URL.Path)
	}), Options{})
	c, br := h1tDial(t, st.addr)
	h1tWrite(t, c, "GET /p1 HTTP/1.1\r\nHost: svc\r\n\r\n"+
		"GET /p2 HTTP/1.1\r\nHost: svc\r\n\r\n"+
		"GET /p3 HTTP/1.1\r\nHost: svc\r\n\r\n")
	for i := 1; i <= 3; i++ {
		resp, body := h1tRead(t, br, "GET")
		if want := fmt.Sprintf("body of /p%d", i); resp.StatusCode != 200 || body != want {
			t.Fatalf("response %d: %d %q, want 200 %q", i, resp.StatusCode, body, want)
		}
	}
}

func TestH1ServerChunkedRequestBody(t *testing.T) {
	leakcheck.Check(t)
	type seen struct {
		cl  int64
		err error
	}
	seenc := make(chan seen, 1)
	st := h1tStart(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		b, err := io.ReadAll(r.Body)
		seenc <- seen{r.ContentLength, err}
		w.Write(b)
	}), Options{})
	c, br := h1tDial(t, st.addr)
	h1tWrite(t, c, "POST /echo HTTP/1.1\r\nHost: svc\r\nTransfer-Encoding: chunked\r\n\r\n"+
		"5;ext=1\r\nhello\r\n6\r\n world\r\na\r\n0123456789\r\n0\r\n\r\n")
	resp, body := h1tRead(t, br, "POST")
	s := h1tRecv(t, seenc, time.Second, "the handler")
	if s.err != nil {
		t.Fatalf("handler reading the body: %v", s.err)
	}
	if s.cl != -1 {
		t.Errorf("r.ContentLength = %d, want -1 for a chunked body", s.cl)
	}
	if want := "hello world0123456789"; resp.StatusCode != 200 || body != want {
		t.Fatalf("got %d %q, want 200 %q", resp.StatusCode, body, want)
	}
	// The connection stays usable after a chunked body.
	h1tWrite(t, c, "POST /echo HTTP/1.1\r\nHost: svc\r\nContent-Length: 3\r\n\r\nabc")
	if resp, body := h1tRead(t, br, "POST"); resp.StatusCode != 200 || body != "abc" {
		t.Fatalf("second request: %d %q, want 200 \"abc\"", resp.StatusCode, body)
	}
}

func TestH1ServerFlushedResponseIsChunked(t *testing.T) {
	leakcheck.Check(t)
	st := h1tStart(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		io.WriteString(w, "first,")
		w.(http.Flusher).Flush()
		io.WriteString(w, "second")
	}), Options{})
	c, br := h1tDial(t, st.addr)
	h1tWrite(t, c, "GET /f HTTP/1.1\r\nHost: svc\r\n\r\n")
	line, h := h1tHead(t, br)
	if !strings.HasPrefix(line, "HTTP/1.1 200 ") {
		t.Fatalf("status line %q, want HTTP/1.1 200", line)
	}
	if te := h.Values("Transfer-Encoding"); len(te) != 1 || te[0] != "chunked" {
		t.Fatalf("Transfer-Encoding %q, want [chunked]", te)
	}
	if cl := h.Values("Content-Length"); len(cl) != 0 {
		t.Fatalf("Content-Length %q on a chunked response", cl)
	}
	body, err := io.ReadAll(httputil.NewChunkedReader(br))
	if err != nil || string(body) != "first,second" {
		t.Fatalf("chunked body %q, %v; want \"first,second\"", body, err)
	}
	// The chunked reader stops at the last chunk: its (empty) trailer follows.
	if crlf, err := br.ReadString('\n'); crlf != "\r\n" || err != nil {
		t.Fatalf("after the last chunk: %q, %v; want an empty trailer", crlf, err)
	}
	// Nothing else is on the wire: a next request answers cleanly.
	h1tWrite(t, c, "GET /f HTTP/1.1\r\nHost: svc\r\n\r\n")
	if resp, body := h1tRead(t, br, "GET"); resp.StatusCode != 200 || body != "first,second" {
		t.Fatalf("second request: %d %q", resp.StatusCode, body)
	}
}

func TestH1ServerSmallUnflushedResponseGetsContentLength(t *testing.T) {
	leakcheck.Check(t)
	st := h1tStart(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		io.WriteString(w, "small")
	}), Options{})
	c, br := h1tDial(t, st.addr)
	h1tWrite(t, c, "GET /s HTTP/1.1\r\nHost: svc\r\n\r\n")
	line, h := h1tHead(t, br)
	if !strings.HasPrefix(line, "HTTP/1.1 200 ") {
		t.Fatalf("status line %q, want HTTP/1.1 200", line)
	}
	// net/http buffers a small answer and, when the handler returns, frames it
	// with a Content-Length rather than chunks.
	if cl, te := h.Get("Content-Length"), h.Values("Transfer-Encoding"); cl != "5" || len(te) != 0 {
		t.Fatalf("Content-Length %q, Transfer-Encoding %q; want 5 and none", cl, te)
	}
	buf := make([]byte, 5)
	if _, err := io.ReadFull(br, buf); err != nil || string(buf) != "small" {
		t.Fatalf("body %q, %v; want \"small\"", buf, err)
	}
}

func TestH1ServerTrailers(t *testing.T) {
	leakcheck.Check(t)
	st := h1tStart(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Trailer", "X-T")
		io.WriteString(w, "body")
		w.Header().Set("X-T", "v")
		w.Header().Set(http.TrailerPrefix+"X-U", "u")
	}), Options{})
	c, br := h1tDial(t, st.addr)
	h1tWrite(t, c, "GET /t HTTP/1.1\r\nHost: svc\r\n\r\n")
	resp, body := h1tRead(t, br, "GET")
	if resp.StatusCode != 200 || body != "body" {
		t.Fatalf("got %d %q, want 200 \"body\"", resp.StatusCode, body)
	}
	if got := resp.Trailer.Get("X-T"); got != "v" {
		t.Errorf("trailer X-T = %q, want \"v\" (trailers %v)", got, resp.Trailer)
	}
	if got := resp.Trailer.Get("X-U"); got != "u" {
		t.Errorf("trailer X-U = %q, want \"u\" (trailers %v)", got, resp.Trailer)
	}
	if got := resp.Header.Get("X-T"); got != "" {
		t.Errorf("X-T also sent as a header: %q", got)
	}
	// The connection stays usable after the trailer block.
	h1tWrite(t, c, "GET /t HTTP/1.1\r\nHost: svc\r\n\r\n")
	if resp, body := h1tRead(t, br, "GET"); resp.StatusCode != 200 || body != "body" {
		t.Fatalf("second request: %d %q", resp.StatusCode, body)
	}
}

func TestH1ServerExpectContinue(t *testing.T) {
	leakcheck.Check(t)
	st := h1tStart(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		b, _ := io.ReadAll(r.Body)
		io.WriteString(w, "got "+string(b))
	}), Options{})
	c, br := h1tDial(t, st.addr)
	h1tWrite(t, c, "POST /up HTTP/1.1\r\nHost: svc\r\nContent-Length: 7\r\nExpect: 100-continue\r\n\r\n")
	// The body is not sent until the interim response arrives.
	if line, _ := h1tHead(t, br); line != "HTTP/1.1 100 Continue" {
		t.Fatalf("first line %q, want HTTP/1.1 100 Continue", line)
	}
	h1tWrite(t, c, "payload")
	resp, body := h1tRead(t, br, "POST")
	if resp.StatusCode != 200 || body != "got payload" {
		t.Fatalf("final response %d %q, want 200 \"got payload\"", resp.StatusCode, body)
	}
}

func TestH1ServerExpectContinueRejected(t *testing.T) {
	leakcheck.Check(t)
	st := h1tStart(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.WriteHeader(http.StatusUnauthorized)
	}), Options{})
	c, br := h1tDial(t, st.addr)
	h1tWrite(t, c, "POST /up HTTP/1.1\r\nHost: svc\r\nContent-Length: 7\r\nExpect: 100-continue\r\n\r\n")
	// No 100 Continue may precede the final answer.
	resp, _ := h1tRead(t, br, "POST")
	if resp.StatusCode != http.StatusUnauthorized {
		t.Fatalf("first response %q, want 401 with no 100 Continue before it", resp.Status)
	}
}

func TestH1ServerHTTP10(t *testing.T) {
	leakcheck.Check(t)
	st := h1tStart(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		io.WriteString(w, "old "+r.URL.Path)
	}), Options{})

	t.Run("close", func(t *testing.T) {
		c, br := h1tDial(t, st.addr)
		h1tWrite(t, c, "GET /a HTTP/1.0\r\n\r\n")
		resp, body := h1tRead(t, br, "GET")
		if resp.StatusCode != 200 || body != "old /a" {
			t.Fatalf("got %d %q, want 200 \"old /a\"", resp.StatusCode, body)
		}
		h1tExpectClosed(t, br)
	})

	t.Run("keep-alive", func(t *testing.T) {
		c, br := h1tDial(t, st.addr)
		h1tWrite(t, c, "GET /a HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
		line, h := h1tHead(t, br)
		if !strings.HasPrefix(line, "HTTP/1.") || !strings.Contains(line, " 200 ") {
			t.Fatalf("status line %q", line)
		}
		// An HTTP/1.0 client keeps the connection only if told so.
		if got := h.Get("Connection"); !strings.EqualFold(got, "keep-alive") {
			t.Fatalf("Connection %q, want keep-alive", got)
		}
		if h.Get("Content-Length") != "6" {
			t.Fatalf("Content-Length %q, want 6", h.Get("Content-Length"))
		}
		buf := make([]byte, 6)
		if _, err := io.ReadFull(br, buf); err != nil || string(buf) != "old /a" {
			t.Fatalf("body %q, %v", buf, err)
		}
		h1tWrite(t, c, "GET /b HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
		if resp, body := h1tRead(t, br, "GET"); resp.StatusCode != 200 || body != "old /b" {
			t.Fatalf("second request: %d %q", resp.StatusCode, body)
		}
	})
}

func TestH1ServerConnectionClose(t *testing.T) {
	leakcheck.Check(t)
	st := h1tStart(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		io.WriteString(w, "bye")
	}), Options{})
	c, br := h1tDial(t, st.addr)
	h1tWrite(t, c, "GET /c HTTP/1.1\r\nHost: svc\r\nConnection: close\r\n\r\n")
	line, h := h1tHead(t, br)
	if !strings.HasPrefix(line, "HTTP/1.1 200 ") {
		t.Fatalf("status line %q", line)
	}
	if got := h.Get("Connection"); got != "close" {
		t.Fatalf("Connection %q, want close", got)
	}
	buf := make([]byte, 3)
	if _, err := io.ReadFull(br, buf); err != nil || string(buf) != "bye" {
		t.Fatalf("body %q, %v", buf, err)
	}
	h1tExpectClosed(t, br)
}

func TestH1ServerMalformedRequests(t *testing.T) {
	leakcheck.Check(t)
	var calls atomic.Int64
	st := h1tStart(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		calls.Add(1)
		io.WriteString(w, "handled")
	}), Options{})
	big := "GET / HTTP/1.1\r\nHost: svc\r\nX-Big: " + strings.Repeat("a", 1<<20+8<<10) + "\r\n\r\n"
	cases := []struct {
		name string
		raw  string
		code int
	}{
		{"garbage request line", "NOT-HTTP\r\n\r\n", 400},
		{"header block over 1 MiB", big, 431},
		{"no Host", "GET / HTTP/1.1\r\n\r\n", 400},
		{"two Hosts", "GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400},
		{"invalid header name", "GET / HTTP/1.1\r\nHost: svc\r\nBad Header: x\r\n\r\n", 400},
		{"space before colon", "GET / HTTP/1.1\r\nHost: svc\r\nX-A : x\r\n\r\n", 400},
		{"Content-Length not a number", "POST / HTTP/1.1\r\nHost: svc\r\nContent-Length: abc\r\n\r\n", 400},
		{"two different Content-Lengths", "POST / HTTP/1.1\r\nHost: svc\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab", 400},
		// net/http answers 501, not a 4xx, to a transfer coding other than chunked alone.
		{"Transfer-Encoding gzip, chunked", "POST / HTTP/1.1\r\nHost: svc\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n", 501},
		// net/http answers 505 to an HTTP version it does not speak.
		{"HTTP/2.0 request line", "GET / HTTP/2.0\r\nHost: svc\r\n\r\n", 505},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			before := calls.Load()
			c, br := h1tDial(t, st.addr)
			// The server may answer and close before it has read everything.
			wrote := make(chan struct{})
			go func() {
				defer close(wrote)
				_, _ = io.WriteString(c, tc.raw)
			}()
			t.Cleanup(func() {
				c.Close()
				<-wrote
			})
			resp, err := http.ReadResponse(br, nil)
			if err != nil {
				t.Fatalf("ReadResponse: %v", err)
			}
			body, err := io.ReadAll(resp.Body)
			resp.Body.Close()
			if h1tIsTimeout(err) {
				t.Fatalf("reading the %q body: %v (read %q)", resp.Status, err, body)
			}
			if resp.StatusCode != tc.code {
				t.Errorf("status %q (body %q), want %d", resp.Status, body, tc.code)
			}
			h1tExpectClosed(t, br)
			if n := calls.Load() - before; n != 0 {
				t.Errorf("handler called %d times", n)
			}
		})
	}
	if n := calls.Load(); n != 0 {
		t.Errorf("handler called %d times for malformed requests", n)
	}
}

func TestH1ServerHead(t *testing.T) {
	leakcheck.Check(t)
	st := h1tStart(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Length", "5")
		io.WriteString(w, "hello")
	}), Options{})
	c, br := h1tDial(t, st.addr)
	h1tWrite(t, c, "HEAD /h HTTP/1.1\r\nHost: svc\r\n\r\nGET /g HTTP/1.1\r\nHost: svc\r\n\r\n")
	line, h := h1tHead(t, br)
	if !strings.HasPrefix(line, "HTTP/1.1 200 ") {
		t.Fatalf("status line %q", line)
	}
	if got := h.Get("Content-Length"); got != "5" {
		t.Fatalf("HEAD answer's Content-Length %q, want 5", got)
	}
	// The GET's answer follows the HEAD's header block at once.
	if next, err := br.Peek(9); err != nil || string(next) != "HTTP/1.1 " {
		t.Fatalf("after the HEAD answer's header: %q, %v; want the next response", next, err)
	}
	if resp, body := h1tRead(t, br, "GET"); resp.StatusCode != 200 || body != "hello" {
		t.Fatalf("GET after HEAD: %d %q", resp.StatusCode, body)
	}
}

func TestH1ServerNoBodyStatuses(t *testing.T) {
	leakcheck.Check(t)
	writeErrs := make(chan error, 2)
	st := h1tStart(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		switch r.URL.Path {
		case "/204":
			w.WriteHeader(http.StatusNoContent)
		case "/304":
			w.WriteHeader(http.StatusNotModified)
		default:
			io.WriteString(w, "ok")
			return
		}
		_, err := io.WriteString(w, "forbidden body")
		writeErrs <- err
	}), Options{})
	c, br := h1tDial(t, st.addr)
	h1tWrite(t, c, "GET /204 HTTP/1.1\r\nHost: svc\r\n\r\n"+
		"GET /304 HTTP/1.1\r\nHost: svc\r\n\r\n"+
		"GET /ok HTTP/1.1\r\nHost: svc\r\n\r\n")
	for _, code := range []string{"204", "304"} {
		line, h := h1tHead(t, br)
		if !strings.HasPrefix(line, "HTTP/1.1 "+code+" ") {
			t.Fatalf("status line %q, want %s", line, code)
		}
		if te := h.Values("Transfer-Encoding"); len(te) != 0 {
			t.Errorf("%s carries Transfer-Encoding %q", code, te)
		}
		if code == "204" && len(h.Values("Content-Length")) != 0 {
			t.Errorf("204 carries Content-Length %q", h.Values("Content-Length"))
		}
		if next, err := br.Peek(9); err != nil || string(next) != "HTTP/1.1 " {
			t.Fatalf("after the %s header: %q, %v; want the next response", code, next, err)
		}
		// The handler's Write fails (net/http: http.ErrBodyNotAllowed) or
		// is dropped; either way nothing reaches the wire.
		err := h1tRecv(t, writeErrs, time.Second, "the handler's write")
		t.Logf("%s: Write returned %v", code, err)
	}
	if resp, body := h1tRead(t, br, "GET"); resp.StatusCode != 200 || body != "ok" {
		t.Fatalf("request after 204 and 304: %d %q", resp.StatusCode, body)
	}
}

func TestH1ServerReadHeaderTimeout(t *testing.T) {
	leakcheck.Check(t)
	var calls atomic.Int64
	st := h1tStart(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		calls.Add(1)
	}), Options{ReadHeaderTimeout: 200 * time.Millisecond})
	c, br := h1tDial(t, st.addr)
	_ = c.SetDeadline(time.Now().Add(2 * time.Second))
	start := time.Now()
	h1tWrite(t, c, "GET /slow HT")
	// net/http answers 400 to a request line the timeout cut short, then
	// hangs up; a 408, or no answer, before the close would do too.
	rest, err := io.ReadAll(br)
	elapsed := time.Since(start)
	if h1tIsTimeout(err) {
		t.Fatalf("still connected after %v (read %q)", elapsed, rest)
	}
	if elapsed < 100*time.Millisecond {
		t.Errorf("closed after %v, before the 200ms header timeout", elapsed)
	}
	if len(rest) > 0 && !bytes.HasPrefix(rest, []byte("HTTP/1.1 400 ")) && !bytes.HasPrefix(rest, []byte("HTTP/1.1 408 ")) {
		t.Errorf("read %q before the close", rest)
	}
	if calls.Load() != 0 {
		t.Errorf("handler called")
	}
}

func TestH1ServerIdleTimeout(t *testing.T) {
	leakcheck.Check(t)
	st := h1tStart(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		io.WriteString(w, "one")
	}), Options{IdleTimeout: 300 * time.Millisecond})
	c, br := h1tDial(t, st.addr)
	_ = c.SetDeadline(time.Now().Add(3 * time.Second))
	h1tWrite(t, c, "GET /i HTTP/1.1\r\nHost: svc\r\n\r\n")
	if resp, body := h1tRead(t, br, "GET"); resp.StatusCode != 200 || body != "one" || resp.Close {
		t.Fatalf("got %d %q close=%v", resp.StatusCode, body, resp.Close)
	}
	start := time.Now()
	rest, err := io.ReadAll(br)
	elapsed := time.Since(start)
	if h1tIsTimeout(err) {
		t.Fatalf("idle connection still open after %v", elapsed)
	}
	if len(rest) > 0 {
		t.Errorf("read %q from an idle connection", rest)
	}
	if elapsed < 100*time.Millisecond {
		t.Errorf("idle connection closed after %v, before the 300ms idle timeout", elapsed)
	}
}

// TestH1ServerIdleTimeoutFromLastRequest: the idle timeout counts from the
// end of the last request, not from the connection's start, and a body the
// handler left unread (skipped under the header timeout) leaves no deadline
// behind for the wait for the next request.
func TestH1ServerIdleTimeoutFromLastRequest(t *testing.T) {
	leakcheck.Check(t)
	st := h1tStart(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		io.WriteString(w, "ok") // the body, if any, is left unread
	}), Options{IdleTimeout: 400 * time.Millisecond, ReadHeaderTimeout: 100 * time.Millisecond})
	c, br := h1tDial(t, st.addr)
	_ = c.SetDeadline(time.Now().Add(5 * time.Second))
	for i := range 4 {
		h1tWrite(t, c, "POST /p HTTP/1.1\r\nHost: svc\r\nContent-Length: 5\r\n\r\nhello")
		if resp, body := h1tRead(t, br, "POST"); resp.StatusCode != 200 || body != "ok" || resp.Close {
			t.Fatalf("request %d: got %d %q close=%v", i, resp.StatusCode, body, resp.Close)
		}
		// Longer than the header timeout, shorter than the idle timeout;
		// four of them are longer than the idle timeout.
		time.Sleep(250 * time.Millisecond)
	}
}

// TestH1ServerIdleTimeoutPerConnection: connections that go idle at
// different times each close one idle timeout after their own last request,
// the one timer of the server coming back for each.
func TestH1ServerIdleTimeoutPerConnection(t *testing.T) {
	leakcheck.Check(t)
	const idle = 400 * time.Millisecond
	st := h1tStart(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		io.WriteString(w, "ok")
	}), Options{IdleTimeout: idle})
	request := func(c net.Conn, br *bufio.Reader) {
		t.Helper()
		h1tWrite(t, c, "GET /i HTTP/1.1\r\nHost: svc\r\n\r\n")
		if resp, body := h1tRead(t, br, "GET"); resp.StatusCode != 200 || body != "ok" {
			t.Fatalf("got %d %q", resp.StatusCode, body)
		}
	}
	closedAfter := func(c net.Conn, br *bufio.Reader, since time.Time) chan time.Duration {
		done := make(chan time.Duration, 1)
		go func() {
			_ = c.SetReadDeadline(time.Now().Add(5 * time.Second))
			_, err := br.ReadByte()
			if h1tIsTimeout(err) {
				done <- -1
				return
			}
			done <- time.Since(since)
		}()
		return done
	}
	a, abr := h1tDial(t, st.addr)
	b, bbr := h1tDial(t, st.addr)
	request(a, abr)
	aIdle := time.Now()
	aClosed := closedAfter(a, abr, aIdle)
	time.Sleep(idle / 2)
	request(b, bbr)
	bIdle := time.Now()
	bClosed := closedAfter(b, bbr, bIdle)
	for _, c := range []struct {
		name   string
		closed chan time.Duration
	}{{"first", aClosed}, {"second", bClosed}} {
		d := <-c.closed
		if d < 0 {
			t.Fatalf("%s connection still open 5s after its last request", c.name)
		}
		if d < idle*3/4 {
			t.Errorf("%s connection closed %v after its last request, before the %v idle timeout", c.name, d, idle)
		}
	}
}

func TestH1ServerHijack(t *testing.T) {
	leakcheck.Check(t)
	errc := make(chan error, 1)
	st := h1tStart(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		errc <- func() error {
			conn, brw, err := http.NewResponseController(w).Hijack()
			if err != nil {
				return fmt.Errorf("Hijack: %w", err)
			}
			defer conn.Close()
			_ = conn.SetDeadline(time.Now().Add(h1tTimeout))
			// The bytes sent right after the request are in the reader.
			early := make([]byte, len("EARLY"))
			if _, err := io.ReadFull(brw.Reader, early); err != nil {
				return fmt.Errorf("reading the early bytes: %w", err)
			}
			brw.WriteString("HTTP/1.1 101 Switching Protocols\r\n\r\necho:")
			brw.Write(early)
			if err := brw.Flush(); err != nil {
				return err
			}
			more := make([]byte, len("ping"))
			if _, err := io.ReadFull(brw.Reader, more); err != nil {
				return fmt.Errorf("reading after the switch: %w", err)
			}
			if _, err := conn.Write(more); err != nil {
				return err
			}
			return nil
		}()
	}), Options{})
	c, br := h1tDial(t, st.addr)
	h1tWrite(t, c, "GET /ws HTTP/1.1\r\nHost: svc\r\nConnection: Upgrade\r\nUpgrade: test\r\n\r\nEARLY")
	want := "HTTP/1.1 101 Switching Protocols\r\n\r\necho:EARLY"
	got := make([]byte, len(want))
	if _, err := io.ReadFull(br, got); err != nil || string(got) != want {
		t.Fatalf("read %q, %v; want %q", got, err, want)
	}
	h1tWrite(t, c, "ping")
	got = make([]byte, 4)
	if _, err := io.ReadFull(br, got); err != nil || string(got) != "ping" {
		t.Fatalf("echo %q, %v; want \"ping\"", got, err)
	}
	if err := h1tRecv(t, errc, h1tTimeout, "the handler"); err != nil {
		t.Fatal(err)
	}
	h1tExpectClosed(t, br)
}

func TestH1ServerAbortHandler(t *testing.T) {
	leakcheck.Check(t)
	st := h1tStart(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		io.WriteString(w, "partial")
		w.(http.Flusher).Flush()
		panic(http.ErrAbortHandler)
	}), Options{})
	c, br := h1tDial(t, st.addr)
	h1tWrite(t, c, "GET /abort HTTP/1.1\r\nHost: svc\r\n\r\n")
	resp, err := http.ReadResponse(br, nil)
	if err != nil {
		t.Fatal(err)
	}
	if len(resp.TransferEncoding) != 1 || resp.TransferEncoding[0] != "chunked" {
		t.Fatalf("Transfer-Encoding %q, want chunked", resp.TransferEncoding)
	}
	body, err := io.ReadAll(resp.Body)
	if err == nil || h1tIsTimeout(err) {
		t.Fatalf("body %q ended with %v; want the connection cut before the last chunk", body, err)
	}
	if string(body) != "partial" {
		t.Errorf("body %q before the cut, want \"partial\"", body)
	}
}

func TestH1ServerShortBody(t *testing.T) {
	leakcheck.Check(t)
	st := h1tStart(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Length", "10")
		io.WriteString(w, "abc")
	}), Options{})
	c, br := h1tDial(t, st.addr)
	h1tWrite(t, c, "GET /short HTTP/1.1\r\nHost: svc\r\n\r\n")
	resp, err := http.ReadResponse(br, nil)
	if err != nil {
		t.Fatal(err)
	}
	if resp.ContentLength != 10 {
		t.Fatalf("ContentLength %d, want 10", resp.ContentLength)
	}
	body, err := io.ReadAll(resp.Body)
	if !errors.Is(err, io.ErrUnexpectedEOF) {
		t.Fatalf("body %q ended with %v, want io.ErrUnexpectedEOF", body, err)
	}
	if string(body) != "abc" {
		t.Errorf("body %q, want \"abc\"", body)
	}
}

func TestH1ServerLongBody(t *testing.T) {
	leakcheck.Check(t)
	errc := make(chan error, 1)
	st := h1tStart(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path != "/long" {
			io.WriteString(w, "next")
			return
		}
		w.Header().Set("Content-Length", "2")
		if _, err := io.WriteString(w, "he"); err != nil {
			errc <- fmt.Errorf("first write: %w", err)
			return
		}
		_, err := io.WriteString(w, "llo")
		errc <- err
	}), Options{})
	c, br := h1tDial(t, st.addr)
	h1tWrite(t, c, "GET /long HTTP/1.1\r\nHost: svc\r\n\r\nGET /next HTTP/1.1\r\nHost: svc\r\n\r\n")
	resp, body := h1tRead(t, br, "GET")
	if resp.ContentLength != 2 || body != "he" {
		t.Fatalf("ContentLength %d body %q, want 2 \"he\"", resp.ContentLength, body)
	}
	if err := h1tRecv(t, errc, time.Second, "the handler"); !errors.Is(err, http.ErrContentLength) {
		t.Errorf("write past Content-Length returned %v, want http.ErrContentLength", err)
	}
	// Exactly 2 bytes: the next thing on the wire is the next response
	// (net/http keeps the connection), or the close.
	next, err := br.Peek(9)
	switch {
	case err == nil && string(next) == "HTTP/1.1 ":
		if resp, body := h1tRead(t, br, "GET"); resp.StatusCode != 200 || body != "next" {
			t.Fatalf("next response %d %q", resp.StatusCode, body)
		}
	case err != nil && !h1tIsTimeout(err) && len(next) == 0:
	default:
		t.Fatalf("after the 2-byte body: %q, %v", next, err)
	}
}

func TestH1ServerClientGoneCancelsContext(t *testing.T) {
	leakcheck.Check(t)
	started := make(chan struct{}, 1)
	fired := make(chan string, 1)
	st := h1tStart(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		started <- struct{}{}
		timer := time.NewTimer(h1tTimeout)
		defer timer.Stop()
		select {
		case <-r.Context().Done():
			fired <- "context"
		case <-timer.C:
			fired <- "timer"
		}
	}), Options{})
	c, _ := h1tDial(t, st.addr)
	h1tWrite(t, c, "GET /wait HTTP/1.1\r\nHost: svc\r\n\r\n")
	h1tRecv(t, started, h1tTimeout, "the handler to start")
	c.Close()
	if got := h1tRecv(t, fired, 2*time.Second, "the request context to be canceled"); got != "context" {
		t.Fatalf("%s fired, want the request context", got)
	}
}

func TestH1ServerShutdown(t *testing.T) {
	leakcheck.Check(t)
	started := make(chan struct{}, 1)
	release := make(chan struct{})
	st := h1tStart(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/slow" {
			started <- struct{}{}
			select {
			case <-release:
			case <-time.After(h1tTimeout):
			}
			io.WriteString(w, "slow done")
			return
		}
		io.WriteString(w, "fast")
	}), Options{})

	idle, idleBR := h1tDial(t, st.addr)
	h1tWrite(t, idle, "GET /fast HTTP/1.1\r\nHost: svc\r\n\r\n")
	if resp, body := h1tRead(t, idleBR, "GET"); resp.StatusCode != 200 || body != "fast" {
		t.Fatalf("fast: %d %q", resp.StatusCode, body)
	}
	busy, busyBR := h1tDial(t, st.addr)
	h1tWrite(t, busy, "GET /slow HTTP/1.1\r\nHost: svc\r\n\r\n")
	h1tRecv(t, started, h1tTimeout, "the slow handler to start")

	shutdownErr := make(chan error, 1)
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), h1tTimeout)
		defer cancel()
		shutdownErr <- st.srv.Shutdown(ctx)
	}()

	// Shutdown closes the idle keep-alive connection.
	_ = idle.SetReadDeadline(time.Now().Add(2 * time.Second))
	h1tExpectClosed(t, idleBR)

	// A new connection is closed without an answer.
	if c, err := net.DialTimeout("tcp", st.addr, time.Second); err == nil {
		_ = c.SetDeadline(time.Now().Add(2 * time.Second))
		io.WriteString(c, "GET /fast HTTP/1.1\r\nHost: svc\r\n\r\n")
		rest, err := io.ReadAll(c)
		c.Close()
		if len(rest) > 0 || h1tIsTimeout(err) {
			t.Errorf("dial after Shutdown: read %q, %v; want no answer and a close", rest, err)
		}
	}

	select {
	case err := <-shutdownErr:
		t.Fatalf("Shutdown returned %v with a request in flight", err)
	default:
	}
	close(release)
	resp, body := h1tRead(t, busyBR, "GET")
	if resp.StatusCode != 200 || body != "slow done" {
		t.Fatalf("in-flight request: %d %q, want 200 \"slow done\"", resp.StatusCode, body)
	}
	// net/http closes a connection once its request in flight at Shutdown is done.
	if !resp.Close {
		t.Errorf("in-flight response does not say Connection: close")
	}
	h1tExpectClosed(t, busyBR)
	if err := h1tRecv(t, shutdownErr, h1tTimeout, "Shutdown"); err != nil {
		t.Fatalf("Shutdown: %v", err)
	}
}

func TestH1ServerUnreadRequestBody(t *testing.T) {
	leakcheck.Check(t)
	st := h1tStart(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		io.WriteString(w, "saw "+r.Method+" "+r.URL.Path)
	}), Options{})
	c, br := h1tDial(t, st.addr)
	body := strings.Repeat("x", 10<<10)
	h1tWrite(t, c, fmt.Sprintf("POST /ignore HTTP/1.1\r\nHost: svc\r\nContent-Length: %d\r\n\r\n%s", len(body), body))
	resp, got := h1tRead(t, br, "POST")
	if resp.StatusCode != 200 || got != "saw POST /ignore" {
		t.Fatalf("first: %d %q", resp.StatusCode, got)
	}
	if resp.Close {
		// Allowed, but then the connection must end here.
		t.Logf("server closed after the unread body")
		h1tExpectClosed(t, br)
		return
	}
	// net/http discards the unread body and keeps the connection.
	h1tWrite(t, c, "GET /second HTTP/1.1\r\nHost: svc\r\n\r\n")
	if resp, got := h1tRead(t, br, "GET"); resp.StatusCode != 200 || got != "saw GET /second" {
		t.Fatalf("second: %d %q, want 200 \"saw GET /second\"", resp.StatusCode, got)
	}
}

func TestH1ServerStreamLargeBody(t *testing.T) {
	leakcheck.Check(t)
	payload := make([]byte, 1<<20)
	for i := range payload {
		payload[i] = byte(i*7 + i>>10)
	}
	st := h1tStart(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		for off := 0; off < len(payload); off += 64 << 10 {
			if _, err := w.Write(payload[off : off+64<<10]); err != nil {
				return
			}
			w.(http.Flusher).Flush()
		}
	}), Options{})
	c, br := h1tDial(t, st.addr)
	h1tWrite(t, c, "GET /big HTTP/1.1\r\nHost: svc\r\n\r\n")
	resp, body := h1tRead(t, br, "GET")
	if resp.StatusCode != 200 || !bytes.Equal([]byte(body), payload) {
		t.Fatalf("status %d, %d body bytes (equal %v), want 200 and the %d-byte payload",
			resp.StatusCode, len(body), bytes.Equal([]byte(body), payload), len(payload))
	}
}

func TestH1ServerDateHeader(t *testing.T) {
	leakcheck.Check(t)
	st := h1tStart(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		io.WriteString(w, "dated")
	}), Options{})
	c, br := h1tDial(t, st.addr)
	h1tWrite(t, c, "GET /d HTTP/1.1\r\nHost: svc\r\n\r\n")
	resp, _ := h1tRead(t, br, "GET")
	date := resp.Header.Get("Date")
	d, err := http.ParseTime(date)
	if err != nil {
		t.Fatalf("Date %q: %v", date, err)
	}
	if skew := time.Since(d); skew < -time.Minute || skew > time.Minute {
		t.Fatalf("Date %q is %v off", date, skew)
	}
}

func TestH1ServerAbsoluteFormTarget(t *testing.T) {
	leakcheck.Check(t)
	type seen struct{ path, query, host, uri string }
	seenc := make(chan seen, 1)
	st := h1tStart(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		seenc <- seen{r.URL.Path, r.URL.RawQuery, r.Host, r.RequestURI}
	}), Options{})
	c, br := h1tDial(t, st.addr)
	// The target's authority wins over the Host header (RFC 9112, 3.2.2).
	h1tWrite(t, c, "GET http://svc/path?q=1 HTTP/1.1\r\nHost: other\r\n\r\n")
	if resp, _ := h1tRead(t, br, "GET"); resp.StatusCode != 200 {
		t.Fatalf("status %q", resp.Status)
	}
	want := seen{"/path", "q=1", "svc", "http://svc/path?q=1"}
	if got := h1tRecv(t, seenc, time.Second, "the handler"); got != want {
		t.Fatalf("handler saw %+v, want %+v", got, want)
	}
}

func TestH1ServerRequestFields(t *testing.T) {
	leakcheck.Check(t)
	type seen struct {
		remote, host, uri string
		hostKey           bool
		proto             string
	}
	seenc := make(chan seen, 1)
	st := h1tStart(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		_, hostKey := r.Header["Host"]
		seenc <- seen{r.RemoteAddr, r.Host, r.RequestURI, hostKey, r.Proto}
	}), Options{})
	c, br := h1tDial(t, st.addr)
	h1tWrite(t, c, "GET /r?x=y HTTP/1.1\r\nHost: example.test:8080\r\n\r\n")
	if resp, _ := h1tRead(t, br, "GET"); resp.StatusCode != 200 {
		t.Fatalf("status %q", resp.Status)
	}
	want := seen{c.LocalAddr().String(), "example.test:8080", "/r?x=y", false, "HTTP/1.1"}
	if got := h1tRecv(t, seenc, time.Second, "the handler"); got != want {
		t.Fatalf("handler saw %+v, want %+v", got, want)
	}
}

// TestH1ServerBodyReadAfterHandler: a body read the handler left behind
// (as a Transport's write loop can, when a node answers before reading the
// whole upload) fails once the handler has returned. It neither reaches
// the connection's reader, which serves the next request, nor disturbs
// that request's body.
func TestH1ServerBodyReadAfterHandler(t *testing.T) {
	leakcheck.Check(t)
	late := make(chan error, 2)
	var calls atomic.Int32
	h := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if calls.Add(1) == 1 {
			go func() {
				time.Sleep(30 * time.Millisecond)
				_, err := io.ReadAll(r.Body)
				late <- err
			}()
			w.WriteHeader(http.StatusRequestEntityTooLarge)
			return
		}
		b, _ := io.ReadAll(r.Body)
		w.Write(b)
	})
	st := h1tStart(t, h, Options{})
	c, br := h1tDial(t, st.addr)
	h1tWrite(t, c, "POST /first HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n0123456789")
	if resp, _ := h1tRead(t, br, ""); resp.StatusCode != http.StatusRequestEntityTooLarge {
		t.Fatalf("first: %d, want 413", resp.StatusCode)
	}
	// The second request's body arrives in two parts around the late read.
	h1tWrite(t, c, "POST /second HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nabcde")
	time.Sleep(60 * time.Millisecond)
	h1tWrite(t, c, "fghij")
	if resp, body := h1tRead(t, br, ""); resp.StatusCode != http.StatusOK || body != "abcdefghij" {
		t.Fatalf("second: %d %q, want 200 abcdefghij", resp.StatusCode, body)
	}
	select {
	case err := <-late:
		if !errors.Is(err, http.ErrBodyReadAfterClose) {
			t.Fatalf("late read = %v, want http.ErrBodyReadAfterClose", err)
		}
	case <-time.After(h1tTimeout):
		t.Fatal("late read never returned")
	}

	// A read still under way when the handler returns: the connection
	// closes, and its reader is not handed to another.
	started := make(chan struct{})
	h2 := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		go func() {
			close(started)
			_, err := io.ReadAll(r.Body) // the client sends only part of it
			late <- err
		}()
		<-started
		time.Sleep(20 * time.Millisecond) // let the read block
		w.WriteHeader(http.StatusRequestEntityTooLarge)
	})
	st2 := h1tStart(t, h2, Options{})
	c2, br2 := h1tDial(t, st2.addr)
	h1tWrite(t, c2, "POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\n\r\n"+strings.Repeat("u", 300<<10))
	if resp, _ := h1tRead(t, br2, ""); resp.StatusCode != http.StatusRequestEntityTooLarge {
		t.Fatalf("upload: %d, want 413", resp.StatusCode)
	}
	select {
	case err := <-late:
		if err == nil {
			t.Fatal("the lingering read of a cut-off body succeeded")
		}
	case <-time.After(h1tTimeout):
		t.Fatal("the lingering read never returned: the connection stayed open")
	}
}

// A whole answer of declared length reaches the client as its last byte is
// written, while the handler is still running (for a proxied answer: its
// metrics, breaker and balancer feedback, the node connection's return).
func TestH1ServerWholeAnswerSentBeforeHandlerReturns(t *testing.T) {
	leakcheck.Check(t)
	release := make(chan struct{}, 1)
	returned := make(chan struct{}, 1)
	st := h1tStart(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Length", "10")
		io.WriteString(w, "hello")
		io.WriteString(w, "world")
		<-release // the handler's bookkeeping after the body
		returned <- struct{}{}
	}), Options{})
	c, br := h1tDial(t, st.addr)
	for range 2 { // the connection carries the next request as usual
		h1tWrite(t, c, "GET /w HTTP/1.1\r\nHost: svc\r\n\r\n")
		// The handler waits for release, so the answer can only come now if
		// it was sent before the handler returned.
		line, h := h1tHead(t, br)
		buf := make([]byte, 10)
		_, err := io.ReadFull(br, buf)
		if got, want := fmt.Sprintf("%s|%s|%s|%v", line, h.Get("Content-Length"), buf, err), "HTTP/1.1 200 OK|10|helloworld|<nil>"; got != want {
			t.Fatalf("answer = %q, want %q", got, want)
		}
		select {
		case <-returned:
			t.Fatal("the handler returned before it was released")
		default:
		}
		release <- struct{}{}
		h1tRecv(t, returned, h1tTimeout, "the handler to return")
	}
}

// An answer still short of its declared length, or of unknown length, waits
// for the handler: a held short answer still gets its Content-Length.
func TestH1ServerPartialAnswerHeld(t *testing.T) {
	leakcheck.Check(t)
	release := make(chan struct{}, 1)
	st := h1tStart(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/declared" {
			w.Header().Set("Content-Length", "10")
		}
		io.WriteString(w, "hello")
		<-release
		io.WriteString(w, "world")
	}), Options{})
	for _, path := range []string{"/declared", "/unknown"} {
		c, br := h1tDial(t, st.addr)
		h1tWrite(t, c, "GET "+path+" HTTP/1.1\r\nHost: svc\r\n\r\n")
		_ = c.SetReadDeadline(time.Now().Add(50 * time.Millisecond))
		if b, err := br.Peek(1); !h1tIsTimeout(err) {
			t.Fatalf("%s: read %q, %v before the handler finished; want nothing yet", path, b, err)
		}
		_ = c.SetReadDeadline(time.Now().Add(h1tTimeout))
		release <- struct{}{}
		line, h := h1tHead(t, br)
		if !strings.HasPrefix(line, "HTTP/1.1 200 ") || h.Get("Content-Length") != "10" {
			t.Fatalf("%s: %q with Content-Length %q, want 200 with 10", path, line, h.Get("Content-Length"))
		}
	}
}
