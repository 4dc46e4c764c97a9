package proxy

import (
	"context"
	"net/http"
	"time"

	"go.uber.org/zap"

	"github.com/sidecarlb/sidecar/internal/h1"
	"github.com/sidecarlb/sidecar/internal/h2"
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
// prior knowledge (internal/h2) on the same port, both through the
// sidecar's own connection loops. Each accepted connection is sniffed for
// the HTTP/2 preface and handed to one or the other (internal/httpserver).
type Server struct {
	*httpserver.Server
	h2   *h2.Server
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
	h2s := h2.NewServer(ctx, h, h2.Options{
		ReadHeaderTimeout: opts.ReadHeaderTimeout,
		IdleTimeout:       opts.IdleTimeout,
		MaxHeaderBytes:    opts.MaxHeaderBytes,
	}, log)
	h1s := h1.NewServer(ctx, h, h1.Options{
		ReadHeaderTimeout: opts.ReadHeaderTimeout,
		IdleTimeout:       opts.IdleTimeout,
		MaxHeaderBytes:    opts.MaxHeaderBytes,
		ConnContext:       h1.WithInterrupter,
	}, log)
	hs := httpserver.New(httpserver.Options{ReadHeaderTimeout: opts.ReadHeaderTimeout, H1: h1s, H2: h2s}, log)
	return &Server{Server: hs, h2: h2s, stop: stop}
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
