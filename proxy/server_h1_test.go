package proxy

import (
	"bufio"
	"context"
	"errors"
	"io"
	"net"
	"net/http"
	"testing"
	"time"

	"github.com/sidecarlb/sidecar/internal/leakcheck"
)

// The listener's side of HTTP/1.1: Shutdown of a Server with HTTP/1.1
// connections idle and busy. internal/h1 tests the connection loop itself.

// h1tTimeout bounds every client read and write in these tests.
const h1tTimeout = 5 * time.Second

type h1tServer struct {
	srv      *Server
	addr     string
	served   chan struct{} // closed when Serve has returned
	serveErr error         // what Serve returned; read after <-served
}

// h1tStart serves h on a loopback listener until the test ends.
func h1tStart(t *testing.T, h http.Handler, opts ServerOptions) *h1tServer {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	st := &h1tServer{srv: NewServer(h, opts, testLogger(t)), addr: ln.Addr().String(), served: make(chan struct{})}
	go func() {
		st.serveErr = st.srv.Serve(ln)
		close(st.served)
	}()
	t.Cleanup(func() {
		st.srv.Close()
		select {
		case <-st.served:
		case <-time.After(h1tTimeout):
			t.Errorf("Serve did not return within %v of Close", h1tTimeout)
		}
	})
	return st
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
	}), ServerOptions{})

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

	// A new connection is refused, or closed without an answer.
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
	h1tRecv(t, st.served, h1tTimeout, "Serve to return")
	if !errors.Is(st.serveErr, http.ErrServerClosed) {
		t.Fatalf("Serve returned %v, want http.ErrServerClosed", st.serveErr)
	}
}
