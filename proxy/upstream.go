package proxy

import (
	"fmt"
	"net/http"
	"reflect"
	"slices"
	"sync/atomic"
)

// Upstream is the handler of a per-upstream listener: every request on it
// goes to its route's service. Update swaps the route under a listener
// that stays open, so a reload changes how requests are carried without
// closing a connection or failing a request.
type Upstream struct {
	p        *Proxy
	listener string
	// route is loaded once per request: a request keeps the route it
	// started on, retries included.
	route atomic.Pointer[route]
}

// Upstream returns the handler of a per-upstream listener: every request on
// it goes to cfg.Service.
func (p *Proxy) Upstream(listener string, cfg RouteConfig) (*Upstream, error) {
	cfg.Timeouts = cfg.Timeouts.withDefaults()
	rt, err := newRoute(p, listener, cfg)
	if err != nil {
		return nil, fmt.Errorf("upstream %q on %s: %w", cfg.Service, listener, err)
	}
	p.addRoute(rt)
	u := &Upstream{p: p, listener: listener}
	u.route.Store(rt)
	return u, nil
}

func (u *Upstream) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	rt := u.route.Load()
	w, aw := u.p.observe(w, r, rt.metrics.listener)
	if aw != nil {
		defer u.p.logAccess(aw)
	}
	u.p.serve(w, r, rt)
}

// Update makes requests that arrive from now on follow cfg: service,
// protocol, balancer, hash key, tags, timeouts, resilience, TLS. Requests
// in flight finish on the route they started on, whose node connections
// then close. On error nothing changes. It does not block, and is safe for
// concurrent use with ServeHTTP.
func (u *Upstream) Update(cfg RouteConfig) error {
	cfg.Timeouts = cfg.Timeouts.withDefaults()
	return u.p.swapRoute(&u.route, u.listener, cfg)
}

// Retire drops the route from Status and its metrics, and lets its node
// connections close as their requests end. Call it once the listener is
// shut down.
func (u *Upstream) Retire() { u.p.retireRoute(u.route.Load(), true) }

// swapRoute builds the route for cfg and publishes it in cur, then retires
// the route it replaces. The balancer starts afresh (slow start included).
// When the endpoints would be built the same way (sameEndpoints), the new
// route takes over the old one's that it keeps: their node connections,
// breakers, ejections and limits carry on. Otherwise they start afresh and
// the old route's connections close as their requests end; the endpoint
// metrics carry on when the service is the same.
func (p *Proxy) swapRoute(cur *atomic.Pointer[route], listener string, cfg RouteConfig) error {
	rt, err := newRoute(p, listener, cfg)
	if err != nil {
		return fmt.Errorf("upstream %q on %s: %w", cfg.Service, listener, err)
	}
	old := cur.Load()
	rt.inheritSchemas(old)
	adopted := false
	if sameEndpoints(old.cfg, rt.cfg) {
		old.mu.Lock()
		old.retired = true
		if st := old.state.Load(); st != nil {
			rt.mu.Lock()
			rt.state.Store(st) // rebuildLocked carries over what it keeps
			rt.rebuildLocked(st.snap)
			rt.mu.Unlock()
			adopted = true
		}
		old.mu.Unlock()
	}
	p.mu.Lock()
	cur.Store(rt)
	if i := slices.Index(p.routes, old); i >= 0 {
		p.routes[i] = rt
	} else {
		p.routes = append(p.routes, rt)
	}
	p.mu.Unlock()
	if adopted {
		old.closeSchemas() // its endpoints carry on in rt, its schemas do not
	} else {
		old.close(old.cfg.Service != rt.cfg.Service)
	}
	return nil
}

// sameEndpoints reports whether routes under a and b build their endpoints
// alike: same service, pools (protocol, TLS, connect and idle timeouts,
// connection age), limits and breaker settings.
func sameEndpoints(a, b RouteConfig) bool {
	ta, tb := a.Timeouts, b.Timeouts
	return a.Service == b.Service && a.Protocol == b.Protocol && reflect.DeepEqual(a.TLS, b.TLS) &&
		ta.Connect == tb.Connect && ta.Idle == tb.Idle && ta.MaxConnectionAge == tb.MaxConnectionAge &&
		a.Resilience.Limits == b.Resilience.Limits && a.Resilience.Breaker == b.Resilience.Breaker
}

// retireRoute removes rt from Status and closes its node connections as
// their requests end; see route.close for dropMetrics.
func (p *Proxy) retireRoute(rt *route, dropMetrics bool) {
	p.mu.Lock()
	p.routes = slices.DeleteFunc(p.routes, func(r *route) bool { return r == rt })
	p.mu.Unlock()
	rt.close(dropMetrics)
}

// closeSchemas stops the route's schema fetches (a route that transcodes).
func (rt *route) closeSchemas() {
	if rt.codec != nil {
		rt.codec.Schemas().Close()
	}
}

// close retires every endpoint of a route nothing picks from any more:
// requests in flight on it finish, then its connections close. With
// dropMetrics its per-endpoint series go too; without it they stay for
// the route that took its place under the same labels, which resolves the
// same series.
func (rt *route) close(dropMetrics bool) {
	rt.closeSchemas()
	rt.mu.Lock()
	defer rt.mu.Unlock()
	rt.retired = true
	st := rt.state.Load()
	if st == nil {
		return
	}
	for _, e := range st.endpoints {
		if dropMetrics {
			rt.retire(e)
		} else {
			drain(e.pools.Load(), rt.cfg.Timeouts.Request)
		}
	}
}
