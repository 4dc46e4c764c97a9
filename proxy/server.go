package proxy

import (
	"context"
	"net"
	"net/http"
	"time"

	"go.uber.org/zap"
)

// ServerOptions tune a listener's HTTP server.
type ServerOptions struct {
	// ReadHeaderTimeout bounds reading a request's header (slowloris
	// protection), and an HTTP/2 client's preface and SETTINGS; if zero,
	// 10s is used.
	ReadHeaderTimeout time.Duration
	// IdleTimeout closes a client's keep-alive connection after this long
	// unused; if zero, 90s is used.
	IdleTimeout time.Duration
}

// NewServer returns the server of a proxy listener: HTTP/1.1 and h2c with
// prior knowledge on the same port, with header and idle timeouts, and the
// server's own errors (malformed requests, TLS noise) logged at debug.
func NewServer(h http.Handler, opts ServerOptions, log *zap.Logger) *Server {
	if opts.ReadHeaderTimeout <= 0 {
		opts.ReadHeaderTimeout = 10 * time.Second
	}
	if opts.IdleTimeout <= 0 {
		opts.IdleTimeout = 90 * time.Second
	}
	errLog, _ := zap.NewStdLogAt(log, zap.DebugLevel)
	protocols := new(http.Protocols)
	protocols.SetHTTP1(true)
	ctx, stop := context.WithCancel(context.Background())
	s := &Server{
		handler:  h,
		opts:     opts,
		log:      log,
		baseCtx:  ctx,
		stop:     stop,
		h2conns:  make(map[*h2ServerConn]struct{}),
		sniffing: make(map[net.Conn]struct{}),
		work:     make(chan *h2ServerStream),
	}
	s.h1 = &http.Server{
		Handler:           h,
		ReadHeaderTimeout: opts.ReadHeaderTimeout,
		IdleTimeout:       opts.IdleTimeout,
		MaxHeaderBytes:    1 << 20,
		ErrorLog:          errLog,
		Protocols:         protocols,
		BaseContext:       func(net.Listener) context.Context { return ctx },
	}
	return s
}
