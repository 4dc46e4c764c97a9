package discovery

import (
	"context"
	"errors"
	"time"
)

var (
	// ErrResolveTimeout: a service's first lookup got no answer within the
	// resolve timeout. The watch keeps trying; a later lookup waits again.
	ErrResolveTimeout = errors.New("no answer from discovery in time")
	// ErrClosed: the cache or backend was closed.
	ErrClosed = errors.New("discovery closed")
	// ErrWatchStopped: a watch stopped (evicted, or its backend gave up)
	// before its first answer. Looking the service up again starts a new one.
	ErrWatchStopped = errors.New("watch stopped before its first answer")
	// ErrUnknownDatacenter: a watch or lookup named a datacenter the backend
	// was not set up to follow.
	ErrUnknownDatacenter = errors.New("datacenter not followed by discovery")
	// ErrACLFiltered: Consul left instances out of an answer because the
	// token may not read them (X-Consul-Results-Filtered-By-ACLs).
	ErrACLFiltered = errors.New("answer filtered by Consul ACLs")
	// ErrACLDenied: Consul refused a query with 403.
	ErrACLDenied = errors.New("denied by Consul ACLs")
)

// Backend is a source of service instances: Consul, or a static map.
type Backend interface {
	// Watch follows service until ctx is done, handing each new complete
	// snapshot of it to sink. It blocks, and returns soon after ctx is
	// done. The Cache calls it once per watched service, from a goroutine
	// of its own.
	Watch(ctx context.Context, service string, sink Sink)
	// Known reports whether service is a registered service. Service names
	// are case-insensitive, as in Consul. It may block on its first call;
	// after that it should be cheap. Safe for concurrent use.
	Known(ctx context.Context, service string) (bool, error)
	// Close stops the backend's own goroutines and waits for them.
	Close()
}

// Sink receives what a backend learns about one service. A backend calls it
// one call at a time, from the goroutine running Backend.Watch or from one
// that goroutine waits for; no method blocks.
type Sink interface {
	// Publish hands over a new snapshot: the set changed, or it turned
	// stale or fresh. s must not be modified afterwards and must not be
	// nil. Publishing the same set again only makes consumers rebuild.
	Publish(s *Snapshot)
	// Confirm records that the backend answered at t; the current
	// snapshot, if any, still holds.
	Confirm(t time.Time)
	// Fail records a failed query. The current snapshot stays until the
	// backend publishes another.
	Fail(err error)
	// ACL records whether the registry's ACLs hid part of the service:
	// an error wrapping ErrACLFiltered or ErrACLDenied, or nil once an
	// answer is whole again.
	ACL(err error)
}
