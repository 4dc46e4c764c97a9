package httpwire

import (
	"errors"
	"net/http"
)

// The errors an engine's client side returns for a request it cannot send
// as it is: the client's fault, which the proxy answers 400. The proxy
// package exports them under its own names (proxy.ErrBadRequest,
// proxy.ErrBadRequestBody): the same values, so errors.Is holds.
var (
	// ErrBadRequestBody: the client's request body broke while it was
	// read (bad chunk framing, cut short): the client's fault, not the
	// node's.
	ErrBadRequestBody = errors.New("bad request body")
	// ErrBadRequest: the request cannot be written to a node as it is (a
	// method that is not a token, a control byte in its target).
	ErrBadRequest = errors.New("bad request")
)

// Idempotent reports whether a request of the method may be sent twice
// (RFC 9110, 9.2.2).
func Idempotent(method string) bool {
	switch method {
	case http.MethodGet, http.MethodHead, http.MethodOptions, http.MethodTrace, http.MethodPut, http.MethodDelete:
		return true
	}
	return false
}

// HasIdempotencyKey reports whether the client marked a request as safe to
// send twice, as net/http's Transport honours.
func HasIdempotencyKey(h http.Header) bool {
	_, a := h["Idempotency-Key"]
	_, b := h["X-Idempotency-Key"]
	return a || b
}

// Visible reports whether s holds no space or control byte.
func Visible(s string) bool {
	for i := 0; i < len(s); i++ {
		if c := s[i]; c <= ' ' || c == 0x7f {
			return false
		}
	}
	return true
}
