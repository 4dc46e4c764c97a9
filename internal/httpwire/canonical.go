package httpwire

import (
	"net/textproto"
	"strings"
)

// CanonicalKey returns textproto.CanonicalMIMEHeaderKey(k), for any k. A
// key already canonical, as HTTP/1.1 clients nearly always send them, comes
// back at once, and a common lower-case one, as HTTP/2 sends them all, from
// a table: neither allocates.
func CanonicalKey(k string) string {
	upper := true
	for i := 0; i < len(k); i++ {
		c := k[i]
		if upper && 'a' <= c && c <= 'z' || !upper && 'A' <= c && c <= 'Z' {
			if ck, ok := commonCanonical[k]; ok {
				return ck
			}
			return textproto.CanonicalMIMEHeaderKey(k)
		}
		upper = c == '-'
	}
	return k
}

// LowerKey returns a canonical key in lower case, as HTTP/2 sends it,
// without allocating for common keys or keys already in lower case.
func LowerKey(k string) string {
	if v, ok := commonLower[k]; ok {
		return v
	}
	for i := 0; i < len(k); i++ {
		if c := k[i]; 'A' <= c && c <= 'Z' {
			return strings.ToLower(k)
		}
	}
	return k
}

// CommonKeys returns the canonical keys CanonicalKey and LowerKey know by
// heart, for a caller building a table of its own over them.
func CommonKeys() []string { return append([]string(nil), commonKeys...) }

var commonKeys = []string{
	"Accept", "Accept-Charset", "Accept-Encoding", "Accept-Language", "Accept-Ranges",
	"Age", "Allow", "Authorization", "Cache-Control", "Content-Disposition",
	"Content-Encoding", "Content-Language", "Content-Length", "Content-Location",
	"Content-Range", "Content-Type", "Cookie", "Date", "Etag", "Expect", "Expires",
	"From", "If-Match", "If-Modified-Since", "If-None-Match", "If-Range",
	"If-Unmodified-Since", "Last-Modified", "Link", "Location", "Max-Forwards",
	"Origin", "Proxy-Authenticate", "Proxy-Authorization", "Range", "Referer",
	"Refresh", "Retry-After", "Server", "Set-Cookie", "Strict-Transport-Security",
	"Trailer", "User-Agent", "Vary", "Via", "Www-Authenticate", "X-Forwarded-For",
	"X-Forwarded-Proto", "X-Content-Type-Options", "X-Request-Id", "X-Sidecar-Error",
	"Grpc-Status", "Grpc-Message", "Grpc-Status-Details-Bin", "Grpc-Encoding",
	"Grpc-Accept-Encoding", "Grpc-Timeout", "Traceparent", "Tracestate", "Te",
}

// commonLower maps each common canonical key to its lower-case form, and
// commonCanonical the other way round.
var commonLower, commonCanonical = func() (lower, canonical map[string]string) {
	lower = make(map[string]string, len(commonKeys))
	canonical = make(map[string]string, len(commonKeys))
	for _, k := range commonKeys {
		l := strings.ToLower(k)
		lower[k], canonical[l] = l, k
	}
	return lower, canonical
}()
