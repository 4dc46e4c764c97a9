package h1

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/sidecarlb/sidecar/internal/leakcheck"
)

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

// TestH1ServerWriteDeadline: a handler's write deadline (through
// http.ResponseController) bounds its writes, and ends with its answer:
// the next request on the connection is not cut by it.
func TestH1ServerWriteDeadline(t *testing.T) {
	leakcheck.Check(t)
	st := h1tStart(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		rc := http.NewResponseController(w)
		switch r.URL.Path {
		case "/short":
			if err := rc.SetWriteDeadline(time.Now().Add(20 * time.Millisecond)); err != nil {
				t.Errorf("SetWriteDeadline() = %v", err)
			}
			io.WriteString(w, "ok")
		case "/past":
			_ = rc.SetWriteDeadline(time.Now().Add(-time.Second))
			io.WriteString(w, "late")
			if err := rc.Flush(); err == nil {
				t.Errorf("Flush() past the write deadline = nil, want an error")
			}
		default:
			io.WriteString(w, "later")
		}
	}), Options{})
	c, br := h1tDial(t, st.addr)
	h1tWrite(t, c, "GET /short HTTP/1.1\r\nHost: svc\r\n\r\n")
	if resp, body := h1tRead(t, br, "GET"); resp.StatusCode != 200 || body != "ok" {
		t.Fatalf("first answer %d %q, want 200 ok", resp.StatusCode, body)
	}
	time.Sleep(50 * time.Millisecond) // past the first answer's deadline
	h1tWrite(t, c, "GET /next HTTP/1.1\r\nHost: svc\r\n\r\n")
	if resp, body := h1tRead(t, br, "GET"); resp.StatusCode != 200 || body != "later" {
		t.Fatalf("next answer %d %q, want 200 later", resp.StatusCode, body)
	}
	h1tWrite(t, c, "GET /past HTTP/1.1\r\nHost: svc\r\n\r\n")
	if resp, err := http.ReadResponse(br, nil); err == nil {
		t.Fatalf("an answer past its write deadline came: %d", resp.StatusCode)
	}
}
