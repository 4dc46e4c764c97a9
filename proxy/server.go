package proxy

import (
	"net/http"
	"time"

	"go.uber.org/zap"
)

// ServerOptions tune a listener's HTTP server.
type ServerOptions struct {
	// ReadHeaderTimeout bounds reading a request's header (slowloris
	// protection); if zero, 10s is used.
	ReadHeaderTimeout time.Duration
	// IdleTimeout closes a client's keep-alive connection after this long
	// unused; if zero, 90s is used.
	IdleTimeout time.Duration
}

// NewServer returns the HTTP server of a proxy listener: HTTP/1.1 and h2c
// with prior knowledge on the same port, with header and idle timeouts, and
// the server's own errors (malformed requests, TLS noise) logged at debug.
func NewServer(h http.Handler, opts ServerOptions, log *zap.Logger) *http.Server {
	if opts.ReadHeaderTimeout <= 0 {
		opts.ReadHeaderTimeout = 10 * time.Second
	}
	if opts.IdleTimeout <= 0 {
		opts.IdleTimeout = 90 * time.Second
	}
	errLog, _ := zap.NewStdLogAt(log, zap.DebugLevel)
	protocols := new(http.Protocols)
	protocols.SetHTTP1(true)
	protocols.SetUnencryptedHTTP2(true)
	return &http.Server{
		Handler:           h,
		ReadHeaderTimeout: opts.ReadHeaderTimeout,
		IdleTimeout:       opts.IdleTimeout,
		MaxHeaderBytes:    1 << 20,
		ErrorLog:          errLog,
		Protocols:         protocols,
		HTTP2: &http.HTTP2Config{
			// One app connection may carry many concurrent RPCs.
			MaxConcurrentStreams: 1000,
		},
	}
}
