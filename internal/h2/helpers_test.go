package h2

// The peers the engine's tests run against that are its own: the
// listener's server as the proxy builds it (listenerServer), and faulty
// connections and bodies. Go's h2c peers and the raw framers, as app or
// node, are in h2test, shared with proxy's tests.

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"sync/atomic"
	"testing"
	"time"

	"github.com/sidecarlb/sidecar/internal/h1"
	"github.com/sidecarlb/sidecar/internal/httpserver"
	"github.com/sidecarlb/sidecar/internal/wait"
	"go.uber.org/zap"
	"golang.org/x/net/http2"
)

// panicConn is a connection that panics on its first write (onWrite) or on
// its first read after the HTTP/2 preface, as a faulty wrapper of the
// socket might.
type panicConn struct {
	net.Conn
	onWrite bool
	read    int
}

func (c *panicConn) Read(p []byte) (int, error) {
	if !c.onWrite && c.read >= len(http2.ClientPreface) {
		panic("read boom")
	}
	n, err := c.Conn.Read(p[:min(len(p), len(http2.ClientPreface)-c.read)])
	c.read += n
	return n, err
}

func (c *panicConn) Write(p []byte) (int, error) {
	if c.onWrite {
		panic("write boom")
	}
	return c.Conn.Write(p)
}

// panicListener wraps the connections it accepts in a panicConn while
// mode is "read" or "write".
type panicListener struct {
	net.Listener
	mode atomic.Value // string
}

func (l *panicListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err != nil {
		return nil, err
	}
	switch l.mode.Load() {
	case "read":
		return &panicConn{Conn: c}, nil
	case "write":
		return &panicConn{Conn: c, onWrite: true}, nil
	}
	return c, nil
}

// panicReader panics on its first read.
type panicReader struct{}

func (panicReader) Read([]byte) (int, error) { panic("body boom") }

// testServer is a listener's server under test, which counts the
// connections it accepts.
type testServer struct {
	URL      string
	Listener net.Listener
	accepts  atomic.Int64
}

type countingListener struct {
	net.Listener
	n *atomic.Int64
}

func (l *countingListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err == nil {
		l.n.Add(1)
	}
	return c, err
}

// startProxyServerWith serves srv on a loopback listener until the test
// ends.
func startProxyServerWith(t testing.TB, srv *listenerServer) *testServer {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	s := &testServer{}
	s.Listener = &countingListener{Listener: ln, n: &s.accepts}
	s.URL = "http://" + ln.Addr().String()
	done := make(chan struct{})
	go func() {
		defer close(done)
		_ = srv.Serve(s.Listener)
	}()
	t.Cleanup(func() {
		srv.Close()
		<-done
	})
	return s
}

func testLogger(testing.TB) *zap.Logger { return zap.NewNop() }

type response struct {
	status  int
	header  http.Header
	trailer http.Header
	body    string
}

func do(t testing.TB, c *http.Client, req *http.Request) response {
	t.Helper()
	resp, err := c.Do(req)
	if err != nil {
		t.Fatalf("%s %s: %v", req.Method, req.URL, err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatalf("%s %s: read body: %v", req.Method, req.URL, err)
	}
	return response{status: resp.StatusCode, header: resp.Header, trailer: resp.Trailer, body: string(body)}
}

func doGet(t testing.TB, c *http.Client, url string, header http.Header) response {
	t.Helper()
	req, err := http.NewRequest(http.MethodGet, url, nil)
	if err != nil {
		t.Fatal(err)
	}
	for k, vv := range header {
		req.Header[k] = vv
	}
	return do(t, c, req)
}

// listenerServer is a listener's server as the proxy builds one: the
// httpserver sniff in front of an h1.Server and the HTTP/2 Server under
// test, whose requests' context ends with Shutdown or Close.
type listenerServer struct {
	*httpserver.Server
	h2   *Server
	stop context.CancelFunc
}

func newListenerServer(h http.Handler, opts Options, log *zap.Logger) *listenerServer {
	ctx, stop := context.WithCancel(context.Background())
	h2s := NewServer(ctx, h, opts, log)
	h1s := h1.NewServer(ctx, h, h1.Options{ReadHeaderTimeout: opts.ReadHeaderTimeout,
		IdleTimeout: opts.IdleTimeout, MaxHeaderBytes: opts.MaxHeaderBytes}, log)
	hs := httpserver.New(httpserver.Options{ReadHeaderTimeout: opts.ReadHeaderTimeout, H1: h1s, H2: h2s}, log)
	return &listenerServer{Server: hs, h2: h2s, stop: stop}
}

func (s *listenerServer) Shutdown(ctx context.Context) error {
	err := s.Server.Shutdown(ctx)
	s.stop()
	return err
}

func (s *listenerServer) Close() error {
	err := s.Server.Close()
	s.stop()
	return err
}

// h2ServerLoad counts the app connections of s, their open streams and
// their handlers not yet returned (a stream is held until its handler
// returns).
func h2ServerLoad(s *listenerServer) (conns, streams, running int) {
	conns, streams = s.h2.Load()
	return conns, streams, streams
}

// resWait is wait.For, under the name these tests were written with.
func resWait(t testing.TB, within time.Duration, what string, cond func() bool) {
	t.Helper()
	wait.For(t, within, what, cond)
}

// nodeHandler answers as examples/echo does: "NAME METHOD PATH" and an
// X-Instance header.
func nodeHandler(name string) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("X-Instance", name)
		_, _ = io.Copy(io.Discard, r.Body)
		fmt.Fprintf(w, "%s %s %s", name, r.Method, r.URL.Path)
	})
}
