package h1

import (
	"context"
	"net"
	"net/http"
	"sync"
	"time"

	"go.uber.org/zap"

	"github.com/sidecarlb/sidecar/internal/httpserver"
	"github.com/sidecarlb/sidecar/internal/httpwire"
	"github.com/sidecarlb/sidecar/internal/rawio"
)

// Options tune a Server. The zero value is usable.
type Options struct {
	// ReadHeaderTimeout bounds reading a request's head, and skipping what
	// a handler left of a request body; zero means no limit.
	ReadHeaderTimeout time.Duration
	// IdleTimeout closes a connection after this long waiting for its next
	// request; zero means no limit.
	IdleTimeout time.Duration
	// MaxHeaderBytes bounds a request's head as it comes (request line and
	// fields); past it the request is answered 431 and the connection
	// closed. If zero, httpwire.DefaultMaxHeaderBytes is used.
	MaxHeaderBytes int
	// ConnContext, if non-nil, derives a connection's context, which every
	// request on it carries, from the server's, as net/http's
	// Server.ConnContext does; end is called once when the connection is
	// done, before its context is canceled. It runs on the connection's
	// goroutine and must not block.
	ConnContext func(ctx context.Context) (_ context.Context, end func())
}

// Server serves HTTP/1.x on connections a listener accepted and handed
// over (ServeConn); it keeps track of them for its idle sweep, Shutdown
// and Close. Its methods are safe for concurrent use.
type Server struct {
	handler http.Handler
	opts    Options
	log     *zap.Logger
	baseCtx context.Context

	conns httpserver.Tracker[*conn]

	mu sync.Mutex
	// idleSweep closes connections idle past the idle timeout (sweepIdle),
	// under mu; it runs while there are any.
	idleSweep *time.Timer
	epoch     time.Time // conn.idleSince counts from here
}

// NewServer returns a server running h for each request. Requests' contexts
// derive from ctx, whose end cancels them all; the server's own errors
// (malformed requests) are logged to log at debug, handler panics at error.
func NewServer(ctx context.Context, h http.Handler, opts Options, log *zap.Logger) *Server {
	if opts.MaxHeaderBytes <= 0 {
		opts.MaxHeaderBytes = httpwire.DefaultMaxHeaderBytes
	}
	return &Server{handler: h, opts: opts, log: log, baseCtx: ctx, epoch: time.Now()}
}

// ServeConn serves nc until the client or the server ends it, and returns
// then. prefix is what the listener already read from nc (its protocol
// sniff), read again first. ServeConn closes nc, unless a handler hijacked
// it (http.Hijacker), which then owns it; after Shutdown or Close it
// closes nc at once.
func (s *Server) ServeConn(nc net.Conn, prefix []byte) {
	serveConn(s, nc, prefix)
}

// sweepIdle closes the connections that have waited the idle timeout for a
// request, and comes back when the next idle one will have, or after the
// idle timeout, while any connection is left: one going idle later cannot
// time out sooner. One timer for the server does what a read deadline on
// every connection would, without the two timer updates per request such a
// deadline costs (set when the connection goes idle, cleared when the
// request comes).
func (s *Server) sweepIdle() {
	now := time.Since(s.epoch)
	next := s.opts.IdleTimeout
	var idle []*conn
	s.mu.Lock()
	n := s.conns.Range(func(c *conn) {
		if c.state.Load() != stateIdle {
			return
		}
		if left := time.Duration(c.idleSince.Load()) + s.opts.IdleTimeout - now; left > 0 {
			next = min(next, left)
		} else {
			idle = append(idle, c)
		}
	})
	if n > 0 {
		s.idleSweep.Reset(next)
	} else {
		s.idleSweep = nil
	}
	s.mu.Unlock()
	for _, c := range idle {
		c.closeIfIdle()
	}
}

func (s *Server) isClosed() bool { return s.conns.Closed() }

// track adds c to the server's connections unless the server is closed,
// and starts the idle sweep if it is not running. sweepIdle counts the
// connections under mu, so one added here is either counted there or
// finds the sweep stopped.
func (s *Server) track(c *conn) bool {
	if !s.conns.Track(c) {
		return false
	}
	s.mu.Lock()
	if s.idleSweep == nil && s.opts.IdleTimeout > 0 {
		s.idleSweep = time.AfterFunc(s.opts.IdleTimeout, s.sweepIdle)
	}
	s.mu.Unlock()
	return true
}

// untrack removes c, and tells a waiting Shutdown when the last connection
// is gone.
func (s *Server) untrack(c *conn) { s.conns.Untrack(c) }

// Shutdown refuses new connections, closes those waiting for a request,
// and waits until every request in flight has been answered (each
// connection closes after its answer) or ctx ends, whose error it then
// returns, leaving the rest to Close.
func (s *Server) Shutdown(ctx context.Context) error {
	return s.conns.Shutdown(ctx, (*conn).closeIfIdle)
}

// Close refuses new connections and closes every connection at once; the
// handlers still running see their requests fail.
func (s *Server) Close() {
	s.conns.Close(func(c *conn) { c.nc.Close() })
}

// prefixConn is a connection whose first bytes were already read.
type prefixConn struct {
	net.Conn
	prefix []byte
}

// RawBeneath makes a relay read what the sniffer read first, then the raw
// connection beneath (rawio.Layered).
func (c *prefixConn) RawBeneath() (*rawio.Conn, []byte) {
	r, _ := c.Conn.(*rawio.Conn)
	return r, c.prefix
}

func (c *prefixConn) Read(p []byte) (int, error) {
	if len(c.prefix) > 0 {
		n := copy(p, c.prefix)
		c.prefix = c.prefix[n:]
		return n, nil
	}
	return c.Conn.Read(p)
}

// CloseWrite half-closes the connection, as a relayed upgrade needs.
func (c *prefixConn) CloseWrite() error {
	if cw, ok := c.Conn.(interface{ CloseWrite() error }); ok {
		return cw.CloseWrite()
	}
	return c.Conn.Close()
}

// deadline returns the deadline d from now, or none when d is zero (no
// limit).
func deadline(d time.Duration) time.Time {
	if d <= 0 {
		return time.Time{}
	}
	return time.Now().Add(d)
}

// aLongTimeAgo, as a deadline, interrupts a read under way.
var aLongTimeAgo = time.Unix(1, 0)

// limitReader bounds how much a message's head may read from the
// connection: past n bytes, reads fail with err. The server reads
// requests through one, the client pool responses.
type limitReader struct {
	c   net.Conn
	n   int64
	err error
}

func (l *limitReader) Read(p []byte) (int, error) {
	if l.n <= 0 {
		return 0, l.err
	}
	if int64(len(p)) > l.n {
		p = p[:l.n]
	}
	n, err := l.c.Read(p)
	l.n -= int64(n)
	return n, err
}

const noLimit = 1 << 62
