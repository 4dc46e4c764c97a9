package proxy

import (
	"context"
	"errors"
	"net"
	"net/http"
	"sync"
	"sync/atomic"
	"time"

	"go.uber.org/zap"
	"golang.org/x/net/http2"

	"github.com/sidecarlb/sidecar/internal/httpwire"
	"github.com/sidecarlb/sidecar/internal/rawio"
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

// Server serves one proxy listener: HTTP/1.1 (h1server.go) and HTTP/2 with
// prior knowledge (h2server.go) on the same port, both through the
// sidecar's own connection loops. Each accepted connection is sniffed for
// the HTTP/2 preface and handed to one or the other.
type Server struct {
	handler http.Handler
	opts    ServerOptions
	log     *zap.Logger
	baseCtx context.Context
	stop    context.CancelFunc

	mu        sync.Mutex
	listeners map[net.Listener]struct{}
	sniffing  map[net.Conn]struct{}
	h1conns   map[*h1ServerConn]struct{}
	h2conns   map[*h2ServerConn]struct{}
	work      chan *h2ServerStream // idle HTTP/2 handler workers take streams here
	closed    atomic.Bool          // set under mu, so track cannot add after it; read anywhere
	drained   chan struct{}        // closed when the last connection ends after shutdown
	// idleSweep closes HTTP/1.1 connections idle past the idle timeout
	// (sweepIdle), under mu; it runs while there are any.
	idleSweep *time.Timer
	epoch     time.Time // h1ServerConn.idleSince counts from here
}

// NewServer returns the server of a proxy listener: HTTP/1.1 and h2c with
// prior knowledge on the same port, with header and idle timeouts, and the
// server's own errors (malformed requests) logged at debug.
func NewServer(h http.Handler, opts ServerOptions, log *zap.Logger) *Server {
	if opts.MaxHeaderBytes <= 0 {
		opts.MaxHeaderBytes = DefaultMaxHeaderBytes
	}
	ctx, stop := context.WithCancel(context.Background())
	return &Server{
		handler:   h,
		opts:      opts,
		log:       log,
		baseCtx:   ctx,
		stop:      stop,
		listeners: make(map[net.Listener]struct{}),
		sniffing:  make(map[net.Conn]struct{}),
		h1conns:   make(map[*h1ServerConn]struct{}),
		h2conns:   make(map[*h2ServerConn]struct{}),
		work:      make(chan *h2ServerStream),
		epoch:     time.Now(),
	}
}

// sweepIdle closes the HTTP/1.1 connections that have waited the idle
// timeout for a request, and comes back when the next idle one will have,
// or after the idle timeout, while any connection is left: one going idle
// later cannot time out sooner. One timer for the server does what a read
// deadline on every connection would, without the two timer updates per
// request such a deadline costs (set when the connection goes idle,
// cleared when the request comes).
func (s *Server) sweepIdle() {
	now := time.Since(s.epoch)
	next := s.opts.IdleTimeout
	var idle []*h1ServerConn
	s.mu.Lock()
	for c := range s.h1conns {
		if c.state.Load() != h1Idle {
			continue
		}
		if left := time.Duration(c.idleSince.Load()) + s.opts.IdleTimeout - now; left > 0 {
			next = min(next, left)
		} else {
			idle = append(idle, c)
		}
	}
	if len(s.h1conns) > 0 {
		s.idleSweep.Reset(next)
	} else {
		s.idleSweep = nil
	}
	s.mu.Unlock()
	for _, c := range idle {
		c.closeIfIdle()
	}
}

// Serve accepts connections on ln until Shutdown or Close, and returns
// http.ErrServerClosed then.
func (s *Server) Serve(ln net.Listener) error {
	s.mu.Lock()
	if s.closed.Load() {
		s.mu.Unlock()
		ln.Close()
		return http.ErrServerClosed
	}
	s.listeners[ln] = struct{}{}
	s.mu.Unlock()
	defer func() {
		s.mu.Lock()
		delete(s.listeners, ln)
		s.mu.Unlock()
	}()

	var delay time.Duration
	for {
		c, err := ln.Accept()
		if err != nil {
			if s.isClosed() {
				return http.ErrServerClosed
			}
			if errors.Is(err, net.ErrClosed) {
				return err
			}
			// Out of file descriptors and the like: back off, as net/http does.
			delay = min(max(2*delay, 5*time.Millisecond), time.Second)
			s.log.Warn("accept failed", zap.Error(err))
			time.Sleep(delay)
			continue
		}
		delay = 0
		go s.sniff(rawio.Wrap(c))
	}
}

// sniff reads as much of the first bytes as it takes to tell the HTTP/2
// preface from an HTTP/1.1 request, within the read-header timeout, and
// serves the connection with the protocol it speaks.
func (s *Server) sniff(c net.Conn) {
	if !s.track(func() { s.sniffing[c] = struct{}{} }) {
		c.Close()
		return
	}
	preface := http2.ClientPreface
	buf := make([]byte, len(preface))
	n, h2 := 0, true
	_ = c.SetReadDeadline(deadline(s.opts.ReadHeaderTimeout))
	for n < len(buf) {
		m, err := c.Read(buf[n:])
		n += m
		if string(buf[:n]) != preface[:n] {
			h2 = false
			break
		}
		if err != nil {
			s.untrack(func() { delete(s.sniffing, c) })
			c.Close()
			return
		}
	}
	s.untrack(func() { delete(s.sniffing, c) })
	if h2 {
		_ = c.SetReadDeadline(time.Time{})
		s.serveH2(c)
		return
	}
	s.serveH1(c, buf[:n])
}

func (s *Server) isClosed() bool { return s.closed.Load() }

// track runs add under the server's lock unless the server is closed.
func (s *Server) track(add func()) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed.Load() {
		return false
	}
	add()
	return true
}

// untrack runs remove under the server's lock, and tells a waiting
// Shutdown when the last connection is gone.
func (s *Server) untrack(remove func()) {
	s.mu.Lock()
	defer s.mu.Unlock()
	remove()
	if s.drained != nil && len(s.h1conns)+len(s.h2conns) == 0 {
		close(s.drained)
		s.drained = nil
	}
}

// closeLocked stops accepting: the server is marked closed and its
// listeners and half-sniffed connections are closed.
func (s *Server) closeLocked() {
	s.closed.Store(true)
	for ln := range s.listeners {
		ln.Close()
	}
	for c := range s.sniffing {
		c.Close()
	}
}

// Shutdown stops accepting, closes idle HTTP/1.1 connections, tells HTTP/2
// clients to go away, and waits until every request in flight has ended or
// ctx ends; then it closes what is left.
func (s *Server) Shutdown(ctx context.Context) error {
	s.mu.Lock()
	s.closeLocked()
	h2 := make([]*h2ServerConn, 0, len(s.h2conns))
	for sc := range s.h2conns {
		h2 = append(h2, sc)
	}
	h1 := make([]*h1ServerConn, 0, len(s.h1conns))
	for c := range s.h1conns {
		h1 = append(h1, c)
	}
	var drained chan struct{}
	if len(s.h1conns)+len(s.h2conns) > 0 {
		if s.drained == nil {
			s.drained = make(chan struct{})
		}
		drained = s.drained
	}
	s.mu.Unlock()
	for _, sc := range h2 {
		sc.shutdown()
	}
	for _, c := range h1 {
		c.closeIfIdle()
	}
	var err error
	if drained != nil {
		select {
		case <-drained:
		case <-ctx.Done():
			err = ctx.Err()
			s.closeConns()
		}
	}
	s.stop() // idle workers exit
	return err
}

// Close closes the listeners and every connection at once.
func (s *Server) Close() error {
	s.mu.Lock()
	s.closeLocked()
	s.mu.Unlock()
	s.closeConns()
	s.stop()
	return nil
}

func (s *Server) closeConns() {
	s.mu.Lock()
	h2 := make([]*h2ServerConn, 0, len(s.h2conns))
	for sc := range s.h2conns {
		h2 = append(h2, sc)
	}
	for c := range s.h1conns {
		c.nc.Close()
	}
	s.mu.Unlock()
	for _, sc := range h2 {
		sc.fail(errH2ConnClosed)
	}
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
