package proxy

import (
	"fmt"
	"net"
	"net/http"
	"strings"

	"github.com/sidecarlb/sidecar/config"
	"github.com/sidecarlb/sidecar/internal/httpwire"
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

// parseHashKey parses a hash_key setting as config.SplitHashKey does (the
// one parser, which config validation uses too): header:NAME, cookie:NAME,
// query:NAME, path or client_ip. The empty string means no key.
func parseHashKey(s string) (hashKey, error) {
	if s == "" {
		return hashKey{}, nil
	}
	source, name, err := config.SplitHashKey(s)
	if err != nil {
		return hashKey{}, fmt.Errorf("hash key: %w", err)
	}
	switch source {
	case config.HashHeader:
		return hashKey{kind: hashHeader, name: httpwire.CanonicalKey(name)}, nil
	case config.HashCookie:
		return hashKey{kind: hashCookie, name: name}, nil
	case config.HashQuery:
		return hashKey{kind: hashQuery, name: name}, nil
	case config.HashPath:
		return hashKey{kind: hashPath}, nil
	}
	return hashKey{kind: hashClientIP}, nil
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
