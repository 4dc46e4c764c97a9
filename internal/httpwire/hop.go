package httpwire

import (
	"net/http"
	"net/textproto"
	"strings"
)

// IsHopHeader reports whether k, a canonical key, is one of the hop-by-hop
// fields of RFC 9110 section 7.6.1, which a proxy must not forward.
func IsHopHeader(k string) bool {
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

// RemoveHopHeaders deletes the hop-by-hop fields from h, and any its
// Connection field names. It keeps "TE: trailers", which gRPC needs end to
// end. It looks at each of h's few keys once, rather than looking up every
// hop-by-hop name: it runs on every request and answer.
func RemoveHopHeaders(h http.Header) {
	var conn []string
	teTrailers := false
	for k, vv := range h {
		if !IsHopHeader(k) {
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
				delete(h, CanonicalKey(f))
			}
		}
	}
	if teTrailers {
		h["Te"] = teTrailersValue
	}
}

var teTrailersValue = []string{"trailers"}

// UpgradeType returns the protocol a request or response asks to switch to
// ("websocket"), or "" when it is not an upgrade: Connection must name
// "upgrade".
func UpgradeType(h http.Header) string {
	if !HasToken(h["Connection"], "upgrade") {
		return ""
	}
	return h.Get("Upgrade")
}
