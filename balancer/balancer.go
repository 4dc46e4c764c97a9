// Package balancer holds the load-balancing algorithms: pure functions of the
// endpoint set and the request key, with no I/O and no clocks of their own.
package balancer

import (
	"errors"
	"time"

	"github.com/sidecarlb/sidecar/discovery"
)

// ErrNoEndpoints is returned by Pick when the endpoint set is empty.
var ErrNoEndpoints = errors.New("no endpoints")

// Balancer picks one endpoint per request from the current set.
type Balancer interface {
	// Update replaces the endpoint set. The slice and its endpoints are
	// shared and read-only. Update is not called concurrently with itself,
	// but may run concurrently with Pick; it may block briefly to rebuild.
	Update(endpoints []discovery.Endpoint)

	// Pick chooses an endpoint for one request. Pick must not block, is safe
	// for concurrent use, takes no lock and does not allocate. It returns
	// ErrNoEndpoints when the set is empty.
	Pick(r Request) (Pick, error)
}

// Request is what a balancer may know about the request being placed.
type Request struct {
	// Key is the hash of the request's hash key, valid when HasKey is set.
	Key    uint64
	HasKey bool
	// Exclude lists IDs of endpoints already tried for this request; Pick
	// avoids them while any other endpoint remains.
	Exclude []string
}

// Pick is a balancer's choice.
type Pick struct {
	Endpoint *discovery.Endpoint
	// Done, when not nil, must be called exactly once when the request ends.
	Done func(Result)
}

// Result reports how a picked request ended. A zero Latency means the
// request was never sent (an open breaker, say): only its in-flight count
// is released, and latency-aware balancers take no sample.
type Result struct {
	Err     error
	Latency time.Duration
	// At is when the request ended, if the caller read the clock anyway;
	// zero means the balancer reads it when it needs it.
	At time.Time
}
