package h1

import (
	"bufio"
	"context"
	"errors"
	"io"
	"net"
	"net/http"
	"net/textproto"
	"sync"
	"testing"
	"time"

	"go.uber.org/zap"

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

// TestWatchReadsOneByteAhead: the client watch, run twice for one request
// after the client has already sent its next request (a timer callback of
// an earlier arming, started late, as CPU starvation makes it, next to the
// current arming's), keeps that request's first byte. It used to read a
// second byte over the first, so that "GET /second" reached the handler as
// "ET /second" (through the proxy: a 405 from the node).
func TestWatchReadsOneByteAhead(t *testing.T) {
	nextSent := make(chan struct{})
	methods := make(chan string, 2)
	st := h1tStart(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		methods <- r.Method + " " + r.URL.Path
		if r.URL.Path != "/first" {
			return
		}
		w.Header().Set("Content-Length", "5") // the answer is whole once flushed
		_, _ = io.WriteString(w, "first")
		w.(http.Flusher).Flush()
		select { // the client reads the answer and sends its next request
		case <-nextSent:
		case <-time.After(h1tTimeout):
			t.Error("the next request was not sent")
			return
		}
		c := w.(*response).c
		c.startWatch() // the late callback: takes the next request's first byte
		c.startWatch() // the current arming's: must leave it
	}), Options{})
	c, br := h1tDial(t, st.addr)
	h1tWrite(t, c, "GET /first HTTP/1.1\r\nHost: x\r\n\r\n")
	if _, body := h1tRead(t, br, http.MethodGet); body != "first" {
		t.Fatalf("first answer %q", body)
	}
	h1tWrite(t, c, "GET /second HTTP/1.1\r\nHost: x\r\n\r\n")
	close(nextSent)
	resp, _ := h1tRead(t, br, http.MethodGet)
	if resp.StatusCode != http.StatusOK {
		t.Errorf("second answer %s", resp.Status)
	}
	for _, want := range []string{"GET /first", "GET /second"} {
		if got := h1tRecv(t, methods, h1tTimeout, "a request"); got != want {
			t.Errorf("handler saw %q, want %q", got, want)
		}
	}
}
