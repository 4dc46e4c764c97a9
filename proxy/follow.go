package proxy

import (
	"context"
	"time"

	"go.uber.org/zap"
)

// followEvery is how often Follow looks for new snapshots when given zero.
const followEvery = 100 * time.Millisecond

// Follow keeps every route on its service's current snapshot until ctx
// ends: a route whose set changed is rebuilt within every (if zero,
// 100ms), not on its next request, so that /status, the per-endpoint
// series and the node connections of nodes that left go at once. It
// blocks; run it in a goroutine owned by ctx.
//
// A look at a route costs two atomic loads. A route of an upstream
// listener that has had no request yet looks its watch up (upstream
// services are pinned in the cache, so this keeps nothing alive that
// would otherwise go); a forward-proxy route follows the watch its last
// request used, so that following it does not keep an unused service in
// the cache.
func (p *Proxy) Follow(ctx context.Context, every time.Duration) {
	if every <= 0 {
		every = followEvery
	}
	defer func() {
		if r := recover(); r != nil {
			p.log.Error("route follower panicked", zap.Any("panic", r), zap.Stack("stack"))
		}
	}()
	t := time.NewTicker(every)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		p.mu.Lock()
		routes := append([]*route(nil), p.routes...)
		p.mu.Unlock()
		for _, rt := range routes {
			rt.follow(ctx, every)
		}
	}
}

// follow rebuilds rt if its watch has a snapshot rt has not seen.
func (rt *route) follow(ctx context.Context, timeout time.Duration) {
	w := rt.watch.Load()
	if w != nil {
		select {
		case <-w.Stopped():
			w = nil // evicted or closed: the cache has a new one, if any
		default:
		}
	}
	if w == nil {
		if rt.onDemand {
			return
		}
		lctx, cancel := context.WithTimeout(ctx, timeout)
		var err error
		w, err = rt.resolver.Watch(lctx, rt.cfg.Service)
		cancel()
		if err != nil {
			return
		}
		rt.watch.Store(w)
	}
	snap := w.Snapshot()
	if snap == nil {
		return
	}
	if st := rt.state.Load(); st != nil && st.snap == snap {
		return
	}
	rt.mu.Lock()
	defer rt.mu.Unlock()
	// A route a reload replaced is left be: rebuilding it would make
	// endpoints, and series, that nothing retires.
	if st := rt.state.Load(); !rt.retired && (st == nil || st.snap != snap) {
		rt.rebuildLocked(snap)
	}
}
