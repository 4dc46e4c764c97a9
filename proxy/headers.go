package proxy

import (
	"net/http"
	"net/textproto"
	"strings"
)

// isHopHeader reports whether k, a canonical key, is one of the hop-by-hop
// headers of RFC 9110 section 7.6.1, which a proxy must not forward.
func isHopHeader(k string) bool {
	switch k {
	case "Connection",
		"Proxy-Connection", // non-standard, sent by some clients
		"Keep-Alive",
		"Proxy-Authenticate",
		"Proxy-Authorization",
		"Te", // canonical of "TE"
		"Trailer",
		"Transfer-Encoding",
		"Upgrade":
		return true
	}
	return false
}

// removeHopHeaders deletes the hop-by-hop headers from h, including any
// named in its Connection header. It keeps "TE: trailers", which gRPC needs
// end to end. It looks at each of h's few keys once, rather than looking up
// every hop-by-hop name, which runs on every request and answer.
func removeHopHeaders(h http.Header) {
	var conn []string
	teTrailers := false
	for k, vv := range h {
		if !isHopHeader(k) {
			continue
		}
		switch k {
		case "Connection":
			conn = vv
		case "Te":
			// Read TE before Connection may name it, as RFC 9110 section
			// 10.1.4 asks senders of TE to do.
			for _, v := range vv {
				if strings.Contains(strings.ToLower(v), "trailers") {
					teTrailers = true
				}
			}
		}
		delete(h, k)
	}
	for _, v := range conn {
		for len(v) > 0 {
			var f string
			f, v, _ = strings.Cut(v, ",")
			if f = textproto.TrimString(f); f != "" {
				delete(h, http.CanonicalHeaderKey(f))
			}
		}
	}
	if teTrailers {
		h["Te"] = teTrailersValue
	}
}

var teTrailersValue = []string{"trailers"}

// upgradeType returns the protocol a request or response asks to switch to
// ("websocket"), or "" when it is not an upgrade.
func upgradeType(h http.Header) string {
	conn := h["Connection"]
	upgrade := false
	for _, v := range conn {
		for len(v) > 0 {
			var f string
			f, v, _ = strings.Cut(v, ",")
			if strings.EqualFold(textproto.TrimString(f), "upgrade") {
				upgrade = true
			}
		}
	}
	if !upgrade {
		return ""
	}
	return h.Get("Upgrade")
}

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
