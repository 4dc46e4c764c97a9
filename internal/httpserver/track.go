package httpserver

import (
	"context"
	"sync"
	"sync/atomic"
)

// Tracker keeps an engine's live connections, the one set both engines
// (h1.Server, h2.Server) keep for their Shutdown and Close: once closed it
// refuses new connections, and it tells a waiting Shutdown when the last
// one has gone. What idle means, and how a connection is closed, stays the
// engine's: Shutdown and Close take it as a function. The zero value is
// usable; its methods are safe for concurrent use, and only Shutdown
// blocks.
type Tracker[C comparable] struct {
	mu      sync.Mutex
	conns   map[C]struct{}
	closed  atomic.Bool   // set under mu, so Track cannot add after it; read anywhere
	drained chan struct{} // closed when the last connection goes after Shutdown
}

// Track adds c unless the tracker is closed, and reports whether it did.
func (t *Tracker[C]) Track(c C) bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.closed.Load() {
		return false
	}
	if t.conns == nil {
		t.conns = make(map[C]struct{})
	}
	t.conns[c] = struct{}{}
	return true
}

// Untrack removes c, and tells a waiting Shutdown when it was the last.
func (t *Tracker[C]) Untrack(c C) {
	t.mu.Lock()
	defer t.mu.Unlock()
	delete(t.conns, c)
	if t.drained != nil && len(t.conns) == 0 {
		close(t.drained)
		t.drained = nil
	}
}

// Closed reports whether Shutdown or Close was called.
func (t *Tracker[C]) Closed() bool { return t.closed.Load() }

// Range calls f for each connection, under the tracker's lock (so f must
// not block or call the tracker), and returns how many there are.
func (t *Tracker[C]) Range(f func(c C)) int {
	t.mu.Lock()
	defer t.mu.Unlock()
	for c := range t.conns {
		f(c)
	}
	return len(t.conns)
}

// Shutdown closes the tracker to new connections, calls idle for each
// connection it holds (which closes it if idle, or asks it to end after
// what is in flight), and waits until every connection has been
// untracked or ctx ends, whose error it returns then.
func (t *Tracker[C]) Shutdown(ctx context.Context, idle func(c C)) error {
	t.mu.Lock()
	t.closed.Store(true)
	conns := t.snapshotLocked()
	var drained chan struct{}
	if len(conns) > 0 {
		if t.drained == nil {
			t.drained = make(chan struct{})
		}
		drained = t.drained
	}
	t.mu.Unlock()
	for _, c := range conns {
		idle(c)
	}
	if drained == nil {
		return nil
	}
	select {
	case <-drained:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// Close closes the tracker to new connections and calls closeConn for
// each connection it holds. It does not wait for them to be untracked.
func (t *Tracker[C]) Close(closeConn func(c C)) {
	t.mu.Lock()
	t.closed.Store(true)
	conns := t.snapshotLocked()
	t.mu.Unlock()
	for _, c := range conns {
		closeConn(c)
	}
}

func (t *Tracker[C]) snapshotLocked() []C {
	conns := make([]C, 0, len(t.conns))
	for c := range t.conns {
		conns = append(conns, c)
	}
	return conns
}
