package proxy

import (
	"fmt"
	"net"
	"net/http"
	"strings"
)

// hashKey extracts the request key the hash balancer places requests by.
type hashKey struct {
	kind hashKind
	name string
}

type hashKind uint8

const (
	hashNone hashKind = iota
	hashHeader
	hashCookie
	hashQuery
	hashPath
	hashClientIP
)

// parseHashKey parses a hash_key setting: header:NAME, cookie:NAME,
// query:NAME, path or client_ip. The empty string means no key.
func parseHashKey(s string) (hashKey, error) {
	switch s {
	case "":
		return hashKey{}, nil
	case "path":
		return hashKey{kind: hashPath}, nil
	case "client_ip":
		return hashKey{kind: hashClientIP}, nil
	}
	kind, name, ok := strings.Cut(s, ":")
	if !ok || name == "" {
		return hashKey{}, fmt.Errorf("hash key %q: want header:NAME, cookie:NAME, query:NAME, path or client_ip", s)
	}
	switch kind {
	case "header":
		return hashKey{kind: hashHeader, name: http.CanonicalHeaderKey(name)}, nil
	case "cookie":
		return hashKey{kind: hashCookie, name: name}, nil
	case "query":
		return hashKey{kind: hashQuery, name: name}, nil
	}
	return hashKey{}, fmt.Errorf("hash key %q: unknown kind %q", s, kind)
}

// sum returns the 64-bit FNV-1a hash of the request's key, and false when
// the request carries no such key. The balancer mixes the result further.
func (k hashKey) sum(r *http.Request) (uint64, bool) {
	switch k.kind {
	case hashHeader:
		if v := r.Header[k.name]; len(v) > 0 && v[0] != "" {
			return fnv64(v[0]), true
		}
	case hashCookie:
		if c, err := r.Cookie(k.name); err == nil && c.Value != "" {
			return fnv64(c.Value), true
		}
	case hashQuery:
		if v := queryValue(r.URL.RawQuery, k.name); v != "" {
			return fnv64(v), true
		}
	case hashPath:
		return fnv64(r.URL.Path), true
	case hashClientIP:
		if host, _, err := net.SplitHostPort(r.RemoteAddr); err == nil {
			return fnv64(host), true
		}
		if r.RemoteAddr != "" {
			return fnv64(r.RemoteAddr), true
		}
	}
	return 0, false
}

// queryValue returns the first value of name in a raw query without
// allocating a url.Values map. The value is not unescaped: the hash only
// needs a stable key.
func queryValue(raw, name string) string {
	for raw != "" {
		var kv string
		kv, raw, _ = strings.Cut(raw, "&")
		k, v, _ := strings.Cut(kv, "=")
		if k == name {
			return v
		}
	}
	return ""
}

func fnv64(s string) uint64 {
	const (
		offset = 14695981039346656037
		prime  = 1099511628211
	)
	h := uint64(offset)
	for i := 0; i < len(s); i++ {
		h ^= uint64(s[i])
		h *= prime
	}
	return h
}
