package httpserver

import (
	"context"
	"errors"
	"io"
	"net"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"

	"go.uber.org/zap"
	"golang.org/x/net/http2"

	"github.com/sidecarlb/sidecar/internal/leakcheck"
)

const testTimeout = 5 * time.Second

// fakeEngine records the connections handed to it and closes them.
type fakeEngine struct {
	got      chan []byte // the prefix of each connection served
	mu       sync.Mutex
	shutdown int
	closed   int
}

func newFakeEngine() *fakeEngine { return &fakeEngine{got: make(chan []byte, 8)} }

func (e *fakeEngine) ServeConn(c net.Conn, prefix []byte) {
	e.got <- append([]byte(nil), prefix...)
	c.Close()
}

func (e *fakeEngine) Shutdown(context.Context) error {
	e.mu.Lock()
	e.shutdown++
	e.mu.Unlock()
	return nil
}

func (e *fakeEngine) Close() {
	e.mu.Lock()
	e.closed++
	e.mu.Unlock()
}

func (e *fakeEngine) counts() (shutdown, closed int) {
	e.mu.Lock()
	defer e.mu.Unlock()
	return e.shutdown, e.closed
}

// start serves s on a loopback listener and returns its address and a
// channel that gets what Serve returned.
func start(t *testing.T, s *Server) (string, <-chan error) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	served := make(chan error, 1)
	go func() { served <- s.Serve(ln) }()
	return ln.Addr().String(), served
}

func recv[T any](t *testing.T, ch <-chan T, what string) T {
	t.Helper()
	select {
	case v := <-ch:
		return v
	case <-time.After(testTimeout):
		t.Fatalf("timed out waiting for %s", what)
		panic("unreachable")
	}
}

// TestSniff: a connection that opens with the HTTP/2 preface goes to H2
// with the preface; any other goes to H1 with the bytes the sniff read,
// from the first, at most the preface's length and past the first byte that
// differs from it.
func TestSniff(t *testing.T) {
	leakcheck.Check(t)
	tests := []struct {
		name, send string
		wantH2     bool
		minPrefix  int // bytes the sniff must have read
	}{
		{"http/1.1", "GET / HTTP/1.1\r\nHost: a\r\n\r\n", false, 1},
		{"shares the preface's start", "PRI /x HTTP/1.1\r\n\r\n", false, len("PRI /")},
		{"http/2 preface", http2.ClientPreface + "\x00\x00\x00\x04\x00\x00\x00\x00\x00", true, len(http2.ClientPreface)},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			h1, h2 := newFakeEngine(), newFakeEngine()
			s := New(Options{ReadHeaderTimeout: testTimeout, H1: h1, H2: h2}, zap.NewNop())
			addr, served := start(t, s)
			c, err := net.DialTimeout("tcp", addr, testTimeout)
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			if _, err := io.WriteString(c, tc.send); err != nil {
				t.Fatal(err)
			}
			want, other := h1, h2
			if tc.wantH2 {
				want, other = h2, h1
			}
			got := string(recv(t, want.got, "the connection handed over"))
			if len(got) < tc.minPrefix || len(got) > len(http2.ClientPreface) || !strings.HasPrefix(tc.send, got) {
				t.Errorf("prefix = %q, want the first %d to %d bytes of %q", got, tc.minPrefix, len(http2.ClientPreface), tc.send)
			}
			select {
			case p := <-other.got:
				t.Errorf("the other engine got a connection too (prefix %q)", p)
			default:
			}
			s.Close()
			if err := recv(t, served, "Serve to return"); !errors.Is(err, http.ErrServerClosed) {
				t.Errorf("Serve = %v, want http.ErrServerClosed", err)
			}
		})
	}
}

// TestSniffTimeout: a client that sends nothing within the read-header
// timeout is closed, and reaches no engine.
func TestSniffTimeout(t *testing.T) {
	leakcheck.Check(t)
	h1, h2 := newFakeEngine(), newFakeEngine()
	s := New(Options{ReadHeaderTimeout: 100 * time.Millisecond, H1: h1, H2: h2}, zap.NewNop())
	addr, served := start(t, s)
	c, err := net.DialTimeout("tcp", addr, testTimeout)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	_ = c.SetReadDeadline(time.Now().Add(testTimeout))
	if n, err := c.Read(make([]byte, 1)); err != io.EOF {
		t.Fatalf("Read = %d, %v; want the connection closed (EOF)", n, err)
	}
	select {
	case <-h1.got:
		t.Error("H1 got the silent connection")
	case <-h2.got:
		t.Error("H2 got the silent connection")
	default:
	}
	s.Close()
	recv(t, served, "Serve to return")
}

// TestShutdownAndClose: Shutdown stops Serve and shuts both engines down;
// Close closes both; Serve after either returns http.ErrServerClosed.
func TestShutdownAndClose(t *testing.T) {
	leakcheck.Check(t)
	h1, h2 := newFakeEngine(), newFakeEngine()
	s := New(Options{H1: h1, H2: h2}, zap.NewNop())
	_, served := start(t, s)
	ctx, cancel := context.WithTimeout(context.Background(), testTimeout)
	defer cancel()
	// Serve may not have registered its listener yet: Shutdown then makes
	// it close the listener as it starts.
	if err := s.Shutdown(ctx); err != nil {
		t.Fatalf("Shutdown = %v", err)
	}
	if err := recv(t, served, "Serve to return"); !errors.Is(err, http.ErrServerClosed) {
		t.Errorf("Serve = %v, want http.ErrServerClosed", err)
	}
	for name, e := range map[string]*fakeEngine{"H1": h1, "H2": h2} {
		if sd, _ := e.counts(); sd != 1 {
			t.Errorf("%s shut down %d times, want 1", name, sd)
		}
	}
	s.Close()
	for name, e := range map[string]*fakeEngine{"H1": h1, "H2": h2} {
		if _, cl := e.counts(); cl != 1 {
			t.Errorf("%s closed %d times, want 1", name, cl)
		}
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Serve(ln); !errors.Is(err, http.ErrServerClosed) {
		t.Errorf("Serve after Close = %v, want http.ErrServerClosed", err)
	}
}
