package proxy

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"syscall"

	"github.com/sidecarlb/sidecar/balancer"
	"github.com/sidecarlb/sidecar/internal/h2"
	"github.com/sidecarlb/sidecar/internal/httpwire"
)

// Errors the proxy produces itself, before or instead of reaching a node.
var (
	// ErrUnknownService: the name is not a service registered in discovery.
	ErrUnknownService = errors.New("unknown service")
	// ErrBadServiceName: the host does not name a service at all (an IP
	// literal, localhost, or not a valid service name).
	ErrBadServiceName = errors.New("not a service name")
	// ErrDiscovery: discovery could not answer (Consul unreachable on first
	// lookup, resolve timeout).
	ErrDiscovery = errors.New("discovery unavailable")
	// ErrUpstreamTimeout: the request timeout passed before a response.
	ErrUpstreamTimeout = errors.New("upstream timeout")
	// ErrBadRequestBody: the client's request body broke while it was
	// read (bad chunk framing, cut short): the client's fault, not the
	// node's.
	ErrBadRequestBody = httpwire.ErrBadRequestBody
	// ErrBadRequest: the request cannot be written to a node as it is (a
	// method that is not a token, a control byte in its target).
	ErrBadRequest = httpwire.ErrBadRequest
)

// A CONNECT request is refused with 405: the sidecar is no tunnel to
// arbitrary addresses (no open proxy); services are reached by name.
var errConnect = errors.New("CONNECT is not supported")

const codeConnect = "connect_not_supported"

// proxyError is an error with the service it concerns.
type proxyError struct {
	service string
	err     error
}

// Error names the service first, as the context of what went wrong:
// `service "ghost": dial tcp …: connection refused`.
func (e *proxyError) Error() string { return fmt.Sprintf("service %q: %v", e.service, e.err) }
func (e *proxyError) Unwrap() error { return e.err }

// classify maps an error to the HTTP status the client sees and a short
// code for the X-Sidecar-Error header and the metrics. It is the one place
// where errors become statuses.
func classify(err error) (status int, code string) {
	switch {
	case errors.Is(err, ErrBadServiceName):
		return http.StatusBadRequest, "bad_service_name"
	case errors.Is(err, ErrBadRequestBody):
		return http.StatusBadRequest, "bad_request_body"
	case errors.Is(err, ErrBadRequest):
		return http.StatusBadRequest, "bad_request"
	case errors.Is(err, ErrUnknownService):
		return http.StatusNotFound, "unknown_service"
	case errors.Is(err, balancer.ErrNoEndpoints):
		return http.StatusServiceUnavailable, "no_healthy_endpoints"
	case errors.Is(err, ErrBreakerOpen):
		return http.StatusServiceUnavailable, "breaker_open"
	case errors.Is(err, ErrLocalLimit):
		return http.StatusServiceUnavailable, "local_limit"
	case errors.Is(err, ErrDiscovery):
		return http.StatusServiceUnavailable, "discovery_unavailable"
	case errors.Is(err, ErrUpstreamTimeout), errors.Is(err, context.DeadlineExceeded):
		return http.StatusGatewayTimeout, "upstream_timeout"
	case isDialError(err):
		return http.StatusBadGateway, "connect_failed"
	}
	return http.StatusBadGateway, "upstream_failed"
}

// isDialError reports whether err happened while connecting, or otherwise
// before the node processed the request (an HTTP/2 stream it refused).
func isDialError(err error) bool {
	var op *net.OpError
	if errors.As(err, &op) && op.Op == "dial" {
		return true
	}
	return errors.Is(err, syscall.ECONNREFUSED) || errors.Is(err, h2.ErrRefusedStream)
}

// answerError answers a request the proxy could not forward: with a gRPC
// status for a gRPC call, in plain text otherwise.
func answerError(w http.ResponseWriter, r *http.Request, err error) {
	if isGRPC(r) {
		writeGRPCError(w, err)
		return
	}
	writeError(w, err)
}

// writeError answers a request the proxy could not forward in plain text.
func writeError(w http.ResponseWriter, err error) {
	status, code := classify(err)
	h := w.Header()
	h.Set("Content-Type", "text/plain; charset=utf-8")
	h.Set("X-Content-Type-Options", "nosniff")
	h.Set("X-Sidecar-Error", code)
	w.WriteHeader(status)
	fmt.Fprintf(w, "sidecar: %v\n", err)
}
