package proxy

import (
	"context"
	"net"
	"net/http"
	"sync"
	"sync/atomic"
	"time"

	"go.uber.org/zap"

	"github.com/sidecarlb/sidecar/internal/h1"
	"github.com/sidecarlb/sidecar/internal/httpserver"
	"github.com/sidecarlb/sidecar/internal/httpwire"
)

// ServerOptions tune a listener's HTTP server.
type ServerOptions struct {
	// ReadHeaderTimeout bounds reading a request's header (slowloris
	// protection), an HTTP/2 client's preface and SETTINGS, and the rest of
	// an HTTP/2 header block once its HEADERS frame came; zero means no
	// limit. (config.Load gives the 10s default.)
	ReadHeaderTimeout time.Duration
	// IdleTimeout closes a client's keep-alive connection after this long
	// unused; zero means no limit. (config.Load gives the 90s default.)
	IdleTimeout time.Duration
	// MaxHeaderBytes bounds a request's header, and so what one request
	// makes the sidecar hold and send on: on HTTP/1.1 the head as it
	// comes (request line and fields), answered 431 past it, the
	// connection closed; on HTTP/2 the decoded header list as RFC 9113
	// counts it (name, value and 32 bytes per field), advertised in
	// SETTINGS_MAX_HEADER_LIST_SIZE, answered 431 past it and the
	// connection kept, as x/net answers, unless one field alone is over it
	// or the block runs on past twice what is left of it (or twice the
	// bound on the wire), which end the connection (COMPRESSION_ERROR,
	// PROTOCOL_ERROR).
	// If zero, DefaultMaxHeaderBytes is used.
	MaxHeaderBytes int
}

// DefaultMaxHeaderBytes is ServerOptions.MaxHeaderBytes's default, 60 KiB,
// as Envoy's max_request_headers_kb.
const DefaultMaxHeaderBytes = httpwire.DefaultMaxHeaderBytes

// Server serves one proxy listener: HTTP/1.1 (internal/h1) and HTTP/2 with
// prior knowledge (h2server.go) on the same port, both through the
// sidecar's own connection loops. Each accepted connection is sniffed for
// the HTTP/2 preface and handed to one or the other (internal/httpserver).
type Server struct {
	*httpserver.Server
	h2   *h2Server
	stop context.CancelFunc // ends every request's context, and the idle HTTP/2 workers
}

// NewServer returns the server of a proxy listener: HTTP/1.1 and h2c with
// prior knowledge on the same port, with header and idle timeouts, and the
// server's own errors (malformed requests) logged at debug.
func NewServer(h http.Handler, opts ServerOptions, log *zap.Logger) *Server {
	if opts.MaxHeaderBytes <= 0 {
		opts.MaxHeaderBytes = DefaultMaxHeaderBytes
	}
	ctx, stop := context.WithCancel(context.Background())
	h2 := &h2Server{
		handler: h,
		opts:    opts,
		log:     log,
		baseCtx: ctx,
		conns:   make(map[*h2ServerConn]struct{}),
		work:    make(chan *h2ServerStream),
	}
	h1s := h1.NewServer(ctx, h, h1.Options{
		ReadHeaderTimeout: opts.ReadHeaderTimeout,
		IdleTimeout:       opts.IdleTimeout,
		MaxHeaderBytes:    opts.MaxHeaderBytes,
		ConnContext:       h1.WithInterrupter,
	}, log)
	hs := httpserver.New(httpserver.Options{ReadHeaderTimeout: opts.ReadHeaderTimeout, H1: h1s, H2: h2}, log)
	return &Server{Server: hs, h2: h2, stop: stop}
}

// Shutdown stops accepting, closes idle HTTP/1.1 connections, tells HTTP/2
// clients to go away, and waits until every request in flight has ended or
// ctx ends; then it closes what is left.
func (s *Server) Shutdown(ctx context.Context) error {
	err := s.Server.Shutdown(ctx)
	s.stop() // idle workers exit
	return err
}

// Close closes the listeners and every connection at once.
func (s *Server) Close() error {
	err := s.Server.Close()
	s.stop()
	return err
}

// h2Server is the HTTP/2 engine's server side: the connections it serves
// and the workers that run their handlers. It is an httpserver.ConnServer.
type h2Server struct {
	handler http.Handler
	opts    ServerOptions
	log     *zap.Logger
	baseCtx context.Context

	mu      sync.Mutex
	conns   map[*h2ServerConn]struct{}
	work    chan *h2ServerStream // idle handler workers take streams here
	closed  atomic.Bool          // set under mu, so track cannot add after it; read anywhere
	drained chan struct{}        // closed when the last connection ends after Shutdown
}

// ServeConn serves nc, whose client preface (prefix) the listener read.
func (s *h2Server) ServeConn(nc net.Conn, _ []byte) { s.serveH2(nc) }

// track adds sc unless the server is closed.
func (s *h2Server) track(sc *h2ServerConn) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed.Load() {
		return false
	}
	s.conns[sc] = struct{}{}
	return true
}

// untrack removes sc, and tells a waiting Shutdown when the last connection
// is gone.
func (s *h2Server) untrack(sc *h2ServerConn) {
	s.mu.Lock()
	defer s.mu.Unlock()
	delete(s.conns, sc)
	if s.drained != nil && len(s.conns) == 0 {
		close(s.drained)
		s.drained = nil
	}
}

// Shutdown refuses new connections, tells the clients to go away, and
// waits until their streams have ended or ctx ends.
func (s *h2Server) Shutdown(ctx context.Context) error {
	s.mu.Lock()
	s.closed.Store(true)
	conns := make([]*h2ServerConn, 0, len(s.conns))
	for sc := range s.conns {
		conns = append(conns, sc)
	}
	var drained chan struct{}
	if len(s.conns) > 0 {
		if s.drained == nil {
			s.drained = make(chan struct{})
		}
		drained = s.drained
	}
	s.mu.Unlock()
	for _, sc := range conns {
		sc.shutdown()
	}
	if drained == nil {
		return nil
	}
	select {
	case <-drained:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// Close refuses new connections and fails every connection.
func (s *h2Server) Close() {
	s.mu.Lock()
	s.closed.Store(true)
	conns := make([]*h2ServerConn, 0, len(s.conns))
	for sc := range s.conns {
		conns = append(conns, sc)
	}
	s.mu.Unlock()
	for _, sc := range conns {
		sc.fail(errH2ConnClosed)
	}
}

// deadline returns the deadline d from now, or none when d is zero (no
// limit).
func deadline(d time.Duration) time.Time {
	if d <= 0 {
		return time.Time{}
	}
	return time.Now().Add(d)
}

// idleTimer runs its func once a connection has been idle for d; with d
// zero (no limit) it never does. Its methods are the time.Timer's it
// holds, and safe for concurrent use as those are.
type idleTimer struct {
	t *time.Timer
	d time.Duration
}

// newIdleTimer starts an idleTimer that runs f after d.
func newIdleTimer(d time.Duration, f func()) idleTimer {
	if d <= 0 {
		return idleTimer{}
	}
	return idleTimer{t: time.AfterFunc(d, f), d: d}
}

// reset starts the wait of d again.
func (i idleTimer) reset() {
	if i.t != nil {
		i.t.Reset(i.d)
	}
}

// stop keeps the func from running until the next reset.
func (i idleTimer) stop() {
	if i.t != nil {
		i.t.Stop()
	}
}
