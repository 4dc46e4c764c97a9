package proxy

import (
	"net/http"
	"strings"

	"github.com/sidecarlb/sidecar/internal/httpwire"
)

// The request path (proxy.go) calls the header rules by these names; the
// rules themselves live in httpwire.

// removeHopHeaders is httpwire.RemoveHopHeaders.
func removeHopHeaders(h http.Header) { httpwire.RemoveHopHeaders(h) }

// upgradeType is httpwire.UpgradeType.
func upgradeType(h http.Header) string { return httpwire.UpgradeType(h) }

// commonLower holds httpwire's common keys, for trailerKey's table.
var commonLower = func() map[string]struct{} {
	m := make(map[string]struct{})
	for _, k := range httpwire.CommonKeys() {
		m[k] = struct{}{}
	}
	return m
}()

// appendForwardedFor adds the client IP to X-Forwarded-For.
func appendForwardedFor(h http.Header, clientIP string) {
	if clientIP == "" {
		return
	}
	if prior, ok := h["X-Forwarded-For"]; ok && len(prior) > 0 {
		clientIP = strings.Join(prior, ", ") + ", " + clientIP
	}
	h["X-Forwarded-For"] = []string{clientIP}
}
