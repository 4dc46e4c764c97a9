package discovery

import (
	"net/http"
	"time"
)

// NewTransport bounds base, the transport of the Consul API client, to
// maxConns connections to the agent at once (http.Transport.MaxConnsPerHost:
// a request past it waits for a connection), keeps that many idle for reuse,
// and returns it. When maxStale is above zero, every GET that allows stale
// results (?stale) also gets max_stale, which the consul/api client has no
// option for: a server further behind the leader than maxStale passes the
// read to the leader. base is modified; the result is safe for concurrent
// use.
func NewTransport(base *http.Transport, maxConns int, maxStale time.Duration) http.RoundTripper {
	base.MaxConnsPerHost = maxConns
	base.MaxIdleConnsPerHost = maxConns
	base.MaxIdleConns = max(base.MaxIdleConns, maxConns)
	if maxStale <= 0 {
		return base
	}
	return maxStaleTransport{base: base, maxStale: maxStale.String()}
}

// maxStaleTransport adds max_stale to the reads that allow stale results.
type maxStaleTransport struct {
	base     http.RoundTripper
	maxStale string
}

func (t maxStaleTransport) RoundTrip(r *http.Request) (*http.Response, error) {
	if r.Method != http.MethodGet || r.URL == nil {
		return t.base.RoundTrip(r)
	}
	q := r.URL.Query()
	if !q.Has("stale") || q.Has("max_stale") {
		return t.base.RoundTrip(r)
	}
	q.Set("max_stale", t.maxStale)
	r2 := r.Clone(r.Context())
	r2.URL.RawQuery = q.Encode()
	return t.base.RoundTrip(r2)
}
