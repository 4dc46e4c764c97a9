package proxy

import (
	"context"
	"errors"
	"fmt"
	"net"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/sidecarlb/sidecar/config"
	"github.com/sidecarlb/sidecar/internal/h1"
	"github.com/sidecarlb/sidecar/internal/rawio"
)

// defaultLimit is each of a node's limits when its config value is zero.
const defaultLimit = 1024

// ErrLocalLimit: the node picked was at one of the sidecar's own limits for
// it (resilience.limits), so the request was not sent to it. It is the
// sidecar's overload, not the node's failure.
var ErrLocalLimit = errors.New("local limit reached")

// The limits, as metrics and errors name them.
const (
	limitConnections = iota // max_connections
	limitPending            // max_pending_requests
	limitRequests           // max_requests
	numLimits
)

var limitNames = [numLimits]string{"max_connections", "max_pending_requests", "max_requests"}

// The refusals, made once: a refusal on the hot path allocates nothing.
var (
	errMaxConnections = fmt.Errorf("%w: max_connections (no connection to the node came free in time)", ErrLocalLimit)
	errMaxPending     = fmt.Errorf("%w: max_pending_requests", ErrLocalLimit)
	errMaxRequests    = fmt.Errorf("%w: max_requests", ErrLocalLimit)
)

// nodeLimits bounds what the sidecar asks of one node (one endpoint of a
// route; pools renewed by max_connection_age share it), as Envoy's
// circuit-breaker thresholds bound a cluster:
//
//   - connections open to the node, HTTP/1.1, HTTP/2, TCP and upgraded, at
//     most max_connections: a connection holds a slot from its dial to its
//     Close;
//   - requests waiting for a connection (pending), at most
//     max_pending_requests: past it a request is refused at once, and one
//     that waited the connect timeout (or until its context ended) for a
//     slot, or a connection put back, is refused then;
//   - requests in flight to the node (HTTP/2 streams included), at most
//     max_requests: past it a request is refused at once. An upgrade
//     (WebSocket) counts against max_connections only, for as long as its
//     tunnel lasts.
//
// A refusal is ErrLocalLimit, counted in sidecar_upstream_overflows_total;
// the retry loop tries another node, and neither the breaker nor outlier
// detection counts it. A request costs two atomic adds and allocates
// nothing; a new connection takes a slot from a buffered channel, used as
// a semaphore. A nil *nodeLimits limits nothing. Its methods are safe for
// concurrent use.
type nodeLimits struct {
	conns       chan struct{} // a token per connection slot taken; cap max_connections
	maxPending  int64
	maxRequests int64
	pending     atomic.Int64
	requests    atomic.Int64
	overflows   [numLimits]lazyCounter // made at the first overflow of each limit
	retired     *atomic.Bool           // the endpoint's, when its series are its own
	overflowVec *prometheus.CounterVec // curried but for endpoint and limit; nil: not counted
	endpoint    string                 // the endpoint label of the overflow series
	// reclaim, when not nil, closes an idle connection of the node's
	// pools, if there is one, giving back its slot: a request that waits
	// for one calls it first, so that one pool's idle connections do not
	// keep another's requests waiting. It does not block.
	reclaim func()
}

// newNodeLimits returns the limits c sets; a zero value is defaultLimit.
// Overflows are counted in overflows' series of endpoint, made at the
// first of each limit; overflows may be nil.
func newNodeLimits(c config.Limits, overflows *prometheus.CounterVec, endpoint string) *nodeLimits {
	or := func(v int) int {
		if v <= 0 {
			return defaultLimit
		}
		return v
	}
	l := &nodeLimits{
		conns:       make(chan struct{}, or(c.MaxConnections)),
		maxPending:  int64(or(c.MaxPendingRequests)),
		maxRequests: int64(or(c.MaxRequests)),
		overflowVec: overflows,
		endpoint:    endpoint,
	}
	return l
}

// makeOverflowSeries makes the overflow series of every limit, at zero.
func (l *nodeLimits) makeOverflowSeries() {
	if l.overflowVec == nil {
		return
	}
	for limit, name := range limitNames {
		l.overflows[limit].set(l.overflowVec.WithLabelValues(l.endpoint, name))
	}
}

// overflow counts a refusal at limit and returns err.
func (l *nodeLimits) overflow(limit int, err error) error {
	if l.overflowVec == nil {
		return err
	}
	l.overflows[limit].make(l.overflowVec, l.retired, l.endpoint, limitNames[limit]).Inc()
	return err
}

// startRequest takes a request slot, or returns errMaxRequests, taking
// none, when max_requests are in flight. It does not block.
func (l *nodeLimits) startRequest() error {
	if l == nil {
		return nil
	}
	if l.requests.Add(1) > l.maxRequests {
		l.requests.Add(-1)
		return l.overflow(limitRequests, errMaxRequests)
	}
	return nil
}

// endRequest gives back a slot startRequest took.
func (l *nodeLimits) endRequest() {
	if l != nil {
		l.requests.Add(-1)
	}
}

// retake takes back a request slot given back, past max_requests if need
// be: for an answer kept from a try that ended, relayed after all.
func (l *nodeLimits) retake() {
	if l != nil {
		l.requests.Add(1)
	}
}

// tryConn takes a connection slot if one is free. It does not block.
func (l *nodeLimits) tryConn() bool {
	if l == nil {
		return true
	}
	select {
	case l.conns <- struct{}{}:
		return true
	default:
		return false
	}
}

// endConn gives back a connection slot.
func (l *nodeLimits) endConn() {
	if l != nil {
		<-l.conns
	}
}

// startPending counts a request waiting for a connection, or returns
// errMaxPending, counting nothing, when max_pending_requests already wait.
func (l *nodeLimits) startPending() error {
	if l.pending.Add(1) > l.maxPending {
		l.pending.Add(-1)
		return l.overflow(limitPending, errMaxPending)
	}
	return nil
}

func (l *nodeLimits) endPending() { l.pending.Add(-1) }

// acquireConn takes a connection slot, waiting for one as a pending request
// when none is free, for at most wait or until ctx ends. It fails with
// ErrLocalLimit, never an error of the node's.
func (l *nodeLimits) acquireConn(ctx context.Context, wait time.Duration) error {
	if l.tryConn() {
		return nil
	}
	_, err := waitConn[struct{}](ctx, l, wait, nil)
	return err
}

// waitConn waits, as a pending request, for a connection slot or for a
// value on more (an HTTP/1.1 connection put back; nil: none), for at most
// wait or until ctx ends: v is more's value, or T's zero value when a slot
// was taken. It fails with ErrLocalLimit.
func waitConn[T any](ctx context.Context, l *nodeLimits, wait time.Duration, more <-chan T) (v T, err error) {
	if err := l.startPending(); err != nil {
		return v, err
	}
	defer l.endPending()
	if l.reclaim != nil {
		l.reclaim()
	}
	if wait <= 0 {
		wait = time.Second // as Timeouts.Connect's default
	}
	t := time.NewTimer(wait)
	defer t.Stop()
	select {
	case l.conns <- struct{}{}:
		return v, nil
	case v = <-more:
		return v, nil
	case <-ctx.Done():
		l.overflow(limitConnections, nil)
		return v, fmt.Errorf("%w: %w", errMaxConnections, ctx.Err())
	case <-t.C:
		return v, l.overflow(limitConnections, errMaxConnections)
	}
}

// attach makes c's Close give back the connection slot its dial took. c is
// the connection rawio.Wrap returned; one of another type holds no slot,
// which is given back at once.
func (l *nodeLimits) attach(c net.Conn) {
	if l == nil {
		return
	}
	if rc, ok := c.(*rawio.Conn); ok {
		rc.OnClose(l.endConn)
		return
	}
	l.endConn()
}

// The methods h1.Limits asks for, so that the HTTP/1.1 pool's connections
// count against l; a nil l limits nothing.

// TryConn is tryConn.
func (l *nodeLimits) TryConn() bool { return l.tryConn() }

// EndConn is endConn.
func (l *nodeLimits) EndConn() { l.endConn() }

// Attach is attach.
func (l *nodeLimits) Attach(c net.Conn) { l.attach(c) }

// The further methods h2.Limits asks for.

// StartPending is startPending.
func (l *nodeLimits) StartPending() error { return l.startPending() }

// EndPending is endPending.
func (l *nodeLimits) EndPending() { l.endPending() }

// Reclaim calls reclaim, if set.
func (l *nodeLimits) Reclaim() {
	if l != nil && l.reclaim != nil {
		l.reclaim()
	}
}

// WaitSlot waits for a connection slot (slot true), a value on room or
// timeout, or ctx's end, counting an overflow of max_connections at
// timeout or ctx's end.
func (l *nodeLimits) WaitSlot(ctx context.Context, room <-chan struct{}, timeout <-chan time.Time) (slot bool, err error) {
	select {
	case l.conns <- struct{}{}:
		return true, nil
	case <-room:
		return false, nil
	case <-ctx.Done():
		l.overflow(limitConnections, nil)
		return false, fmt.Errorf("%w: %w", errMaxConnections, ctx.Err())
	case <-timeout:
		return false, l.overflow(limitConnections, errMaxConnections)
	}
}

// WaitConn is waitConn, for a connection the pool hands over.
func (l *nodeLimits) WaitConn(ctx context.Context, wait time.Duration, more <-chan *h1.ClientConn) (*h1.ClientConn, error) {
	return waitConn(ctx, l, wait, more)
}

// closeAnIdle closes an idle connection of e's current pools, if one has
// any, so that a request waiting for a connection slot may have its slot:
// the HTTP/1.1 pool's least recently used, else the HTTP/2 pool's
// connections with no stream, else the Transports' idle ones.
func (e *endpoint) closeAnIdle() {
	p := e.pools.Load()
	if p.fast != nil && p.fast.CloseOldest() {
		return
	}
	if p.h2c != nil {
		p.h2c.CloseIdle()
	}
	p.h1.CloseIdleConnections()
	if p.h2 != nil {
		p.h2.CloseIdleConnections()
	}
}
