package discovery

import (
	"context"
	"sync"
	"sync/atomic"
	"time"
)

// Watch follows one service. It is shared by every caller of Cache.Watch for
// that service; all its methods are safe for concurrent use and never block.
type Watch struct {
	service string
	cache   *Cache

	snap      atomic.Pointer[Snapshot]
	confirmed atomic.Int64          // unix nanoseconds of the last answer, 0 before it
	lastErr   atomic.Pointer[error] // last failure, nil once the backend answers again
	aclErr    atomic.Pointer[error] // what ACLs hid, nil while answers are whole
	// lastUsed is the cache clock, as an offset from the cache's epoch, at
	// the last lookup; it moves at most once a second.
	lastUsed atomic.Int64
	pinned   atomic.Bool

	readyOnce sync.Once
	ready     chan struct{} // closed with the first snapshot
	stopped   chan struct{} // closed when the watch's goroutine has returned
	cancel    context.CancelFunc
}

func newWatch(c *Cache, service string, cancel context.CancelFunc) *Watch {
	return &Watch{
		service: service,
		cache:   c,
		ready:   make(chan struct{}),
		stopped: make(chan struct{}),
		cancel:  cancel,
	}
}

// Service is the name the watch follows.
func (w *Watch) Service() string { return w.service }

// Snapshot returns the current set. It is never nil once Cache.Watch has
// returned w without error, and it is a new pointer only when the set, or
// whether it is stale, changed: callers may rebuild on pointer change.
func (w *Watch) Snapshot() *Snapshot { return w.snap.Load() }

// Stopped is closed when the watch stops: evicted from the cache, its backend
// gave up, or the cache closed. Its last snapshot stays readable; call
// Cache.Watch again for a live one.
func (w *Watch) Stopped() <-chan struct{} { return w.stopped }

// Confirmed is when the backend last answered for this service, whether or
// not the set changed; zero before the first answer. A blocking query parked
// on Consul is not an answer, so while the service is quiet this can be as
// old as the backend's wait time (5m by default); see Age.
func (w *Watch) Confirmed() time.Time {
	ns := w.confirmed.Load()
	if ns == 0 {
		return time.Time{}
	}
	return time.Unix(0, ns)
}

// Age is how long the served set has gone without the backend vouching for
// it: zero while the backend is healthy (a parked blocking query hears of a
// change at once), and the time since Snapshot().StaleSince while the set is
// stale. Measured with the cache's clock.
func (w *Watch) Age() time.Duration {
	s := w.snap.Load()
	if s == nil || !s.Stale {
		return 0
	}
	return max(w.cache.opts.Now().Sub(s.StaleSince), 0)
}

// Err is the backend's last error for this service, or nil once it answers
// again.
func (w *Watch) Err() error {
	if p := w.lastErr.Load(); p != nil {
		return *p
	}
	return nil
}

// sink is the Sink a backend feeds for w.
type sink struct{ w *Watch }

func (s sink) Publish(snap *Snapshot) {
	if snap == nil {
		return
	}
	s.w.snap.Store(snap)
	s.w.readyOnce.Do(func() { close(s.w.ready) })
}

func (s sink) Confirm(t time.Time) {
	s.w.confirmed.Store(t.UnixNano())
	s.w.lastErr.Store(nil)
}

func (s sink) Fail(err error) { s.w.lastErr.Store(&err) }

func (s sink) ACL(err error) {
	if err == nil {
		if s.w.aclErr.Load() != nil {
			s.w.aclErr.Store(nil)
		}
		return
	}
	s.w.aclErr.Store(&err)
	s.w.cache.aclBlocked.Add(1)
}

// ACL is what the registry's ACLs hid of the service at its last answer
// (an error wrapping ErrACLFiltered or ErrACLDenied), or nil.
func (w *Watch) ACL() error {
	if p := w.aclErr.Load(); p != nil {
		return *p
	}
	return nil
}
