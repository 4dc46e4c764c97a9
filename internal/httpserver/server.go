package httpserver

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

	"github.com/sidecarlb/sidecar/internal/rawio"
)

// ConnServer is a protocol engine: it serves the connections handed to it.
// Its methods are safe for concurrent use.
type ConnServer interface {
	// ServeConn serves c until the client or the engine ends it, and
	// returns then; it owns c and closes it (unless it handed it on, as in
	// an HTTP/1 hijack). prefix holds the bytes the sniff read, which c
	// will not return again: the start of an HTTP/1 request, or the whole
	// HTTP/2 client preface. After Shutdown or Close it closes c at once.
	ServeConn(c net.Conn, prefix []byte)
	// Shutdown refuses new connections, closes the idle ones and waits for
	// the others to finish, or for ctx to end, whose error it returns
	// then; it does not close those left (Close does).
	Shutdown(ctx context.Context) error
	// Close refuses new connections and closes every connection. It does
	// not block on handlers.
	Close()
}

// Options tune a Server.
type Options struct {
	// ReadHeaderTimeout bounds the sniff of a connection's first bytes;
	// zero means no limit.
	ReadHeaderTimeout time.Duration
	// H1 serves HTTP/1.x connections, H2 HTTP/2 ones (prior knowledge).
	// Both are required.
	H1, H2 ConnServer
}

// Server accepts the connections of one or more listeners and hands them
// to the engines. Its methods are safe for concurrent use.
type Server struct {
	opts Options
	log  *zap.Logger

	mu        sync.Mutex
	listeners map[net.Listener]struct{}
	sniffing  map[net.Conn]struct{}
	closed    atomic.Bool // set under mu, so sniff cannot track after it; read anywhere
}

// New returns a Server handing connections to opts.H1 and opts.H2, which
// logs to log the accept errors it backs off after.
func New(opts Options, log *zap.Logger) *Server {
	return &Server{opts: opts, log: log,
		listeners: make(map[net.Listener]struct{}),
		sniffing:  make(map[net.Conn]struct{})}
}

// Serve accepts connections on ln until Shutdown or Close, and returns
// http.ErrServerClosed then. It closes ln.
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
			if s.closed.Load() {
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
// hands the connection to the engine of the protocol it speaks.
func (s *Server) sniff(c net.Conn) {
	if !s.track(c) {
		c.Close()
		return
	}
	preface := http2.ClientPreface
	buf := make([]byte, len(preface))
	n, h2 := 0, true
	if d := s.opts.ReadHeaderTimeout; d > 0 {
		_ = c.SetReadDeadline(time.Now().Add(d))
	}
	for n < len(buf) {
		m, err := c.Read(buf[n:])
		n += m
		if string(buf[:n]) != preface[:n] {
			h2 = false
			break
		}
		if err != nil {
			s.untrack(c)
			c.Close()
			return
		}
	}
	s.untrack(c)
	if h2 {
		_ = c.SetReadDeadline(time.Time{})
		s.opts.H2.ServeConn(c, buf[:n])
		return
	}
	s.opts.H1.ServeConn(c, buf[:n])
}

// track adds c to the connections being sniffed unless the server is
// closed.
func (s *Server) track(c net.Conn) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed.Load() {
		return false
	}
	s.sniffing[c] = struct{}{}
	return true
}

func (s *Server) untrack(c net.Conn) {
	s.mu.Lock()
	delete(s.sniffing, c)
	s.mu.Unlock()
}

// stopAccepting marks the server closed and closes its listeners and
// half-sniffed connections.
func (s *Server) stopAccepting() {
	s.mu.Lock()
	defer s.mu.Unlock()
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
// ctx ends; then it closes what is left and returns ctx's error.
func (s *Server) Shutdown(ctx context.Context) error {
	s.stopAccepting()
	errs := make(chan error, 1)
	go func() { errs <- s.opts.H2.Shutdown(ctx) }()
	err := s.opts.H1.Shutdown(ctx)
	if err2 := <-errs; err == nil {
		err = err2
	}
	if err != nil {
		s.opts.H1.Close()
		s.opts.H2.Close()
	}
	return err
}

// Close closes the listeners and every connection at once.
func (s *Server) Close() error {
	s.stopAccepting()
	s.opts.H1.Close()
	s.opts.H2.Close()
	return nil
}
