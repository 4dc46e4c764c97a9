package proxy

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	"go.uber.org/zap"

	"github.com/sidecarlb/sidecar/balancer"
	"github.com/sidecarlb/sidecar/discovery"
	"github.com/sidecarlb/sidecar/proxy/resilience"
	"github.com/sidecarlb/sidecar/transcode"
)

// route carries requests for one service under one configuration: an
// upstream listener, or one service reached through the forward proxy. It
// feeds the service's snapshots to its balancer and keeps a connection pool
// per endpoint.
type route struct {
	listener string
	cfg      RouteConfig
	h2       bool // reach nodes over HTTP/2 (protocol http2 or grpc)
	scheme   string
	pool     poolConfig
	// meshPool is the pool config of the nodes that serve mTLS, which
	// meshNode picks out by their meta; nil without a mesh identity.
	meshPool *poolConfig
	meshNode func(meta map[string]string) bool
	key      hashKey
	bal      balancer.Balancer
	resolver Resolver
	metrics  routeMetrics
	budget   *resilience.Budget
	clock    resilience.Clock // for ejections
	log      *zap.Logger
	codec    *transcode.Transcoder      // nil unless cfg.Codec.Transcode
	versions atomic.Pointer[versionSet] // the nodes' versions, for codec (transcode.go)

	mu    sync.Mutex // serialises rebuilds; never held on the hot path
	state atomic.Pointer[routeState]

	// watch is the one the last pick used, for Proxy.Follow; onDemand marks
	// a forward-proxy route, which Follow does not look a watch up for.
	watch    atomic.Pointer[discovery.Watch]
	onDemand bool
	retired  bool // under mu: replaced or closed, so Follow leaves it be
}

// routeState is an immutable view of the endpoints a route knows, rebuilt
// whenever discovery publishes a new snapshot.
type routeState struct {
	snap      *discovery.Snapshot
	endpoints map[string]*endpoint // by endpoint ID, after the tag filter
	panic     bool                 // too few left after ejection: balancing over all
	eligible  int                  // endpoints the balancer picks from
}

// endpoint is one node as a route sees it: its connection pools, limits
// and metrics.
type endpoint struct {
	discovery.Endpoint
	pools      atomic.Pointer[pools]
	poolConfig *poolConfig
	limits     *nodeLimits                   // shared by its pools, old and renewed
	requests   [len(codeClasses)]lazyCounter // by status class; see routeMetrics.countAnswer
	retired    atomic.Bool                   // set when the node left the route
	stats      nodeStats                     // recent rates and latencies, for /status
	health
}

func newRoute(p *Proxy, listener string, cfg RouteConfig) (*route, error) {
	resolver, m, log := p.resolver, p.metrics, p.log
	key, err := parseHashKey(cfg.HashKey)
	if err != nil {
		return nil, err
	}
	name := balancerName(cfg.Balancer)
	bal, err := balancer.New(name, balancer.Options{SlowStart: cfg.Resilience.SlowStart})
	if err != nil {
		return nil, err
	}
	cfg.Balancer = name
	tlsConf, err := clientTLS(cfg.TLS)
	if err != nil {
		return nil, err
	}
	scheme := "http"
	if tlsConf != nil {
		scheme = "https"
	}
	// Lazily: a logger with its fields costs about 1 KB (its encoder), 6 MB
	// at 5,000 forward-proxy routes that mostly never log.
	log = log.WithLazy(zap.String("listener", listener), zap.String("service", cfg.Service))
	rt := &route{
		scheme:   scheme,
		pool:     poolConfig{timeouts: cfg.Timeouts, tls: tlsConf, log: log, pingAfter: p.h2PingAfter, pingTimeout: p.h2PingTimeout},
		listener: listener,
		cfg:      cfg,
		h2:       cfg.Protocol == "http2" || cfg.Protocol == "grpc",
		key:      key,
		bal:      bal,
		resolver: resolver,
		metrics:  m.route(cmp.Or(cfg.Name, listener), cfg.Service),
		budget:   resilience.NewBudget(cfg.Resilience.Retries.Budget),
		clock:    p.clock,
		log:      log,
	}
	rt.meshPool, rt.meshNode = p.meshPool(rt), p.mesh.Node
	if rt.codec, err = newTranscoder(rt, m); err != nil {
		return nil, err
	}
	return rt, nil
}

// balancerName is the balancer a route uses for a configured name: the
// name, or round_robin when it is empty.
func balancerName(name string) string {
	if name == "" {
		return "round_robin"
	}
	return name
}

// pick chooses the endpoint for one request or connection. key is the hash
// of its hash key, when hasKey.
func (rt *route) pick(ctx context.Context, key uint64, hasKey bool, exclude []string) (*endpoint, balancer.Pick, error) {
	w, err := rt.resolver.Watch(ctx, rt.cfg.Service)
	if err != nil {
		return nil, balancer.Pick{}, &proxyError{rt.cfg.Service, fmt.Errorf("%w: %w", ErrDiscovery, err)}
	}
	if rt.watch.Load() != w {
		rt.watch.Store(w)
	}
	snap := w.Snapshot()
	st := rt.state.Load()
	if st == nil || st.snap != snap {
		st = rt.update(snap)
	}
	var vs *versionSet
	if rt.codec != nil {
		vs, exclude = rt.versionExclude(ctx, st, exclude) // a transcoded call keeps to its version
	}
	pk, err := rt.bal.Pick(balancer.Request{Key: key, HasKey: hasKey, Exclude: exclude})
	if err != nil {
		return nil, balancer.Pick{}, &proxyError{rt.cfg.Service, err}
	}
	if vs != nil && !vs.has(ctx, pk.Endpoint.ID) {
		release(pk) // only other versions are left
		return nil, balancer.Pick{}, &proxyError{rt.cfg.Service, balancer.ErrNoEndpoints}
	}
	e := st.endpoints[pk.Endpoint.ID]
	if e == nil {
		// The balancer saw a newer set than st; the rebuild that fed it
		// publishes the state before releasing the lock.
		rt.mu.Lock()
		e = rt.state.Load().endpoints[pk.Endpoint.ID]
		rt.mu.Unlock()
	}
	if e == nil {
		release(pk)
		return nil, balancer.Pick{}, &proxyError{rt.cfg.Service, balancer.ErrNoEndpoints}
	}
	return e, pk, nil
}

// update rebuilds the route's state for snap: filters by tag, carries over
// the endpoints that stay (pools, breakers, ejections), and retires those
// that left.
func (rt *route) update(snap *discovery.Snapshot) *routeState {
	rt.mu.Lock()
	defer rt.mu.Unlock()
	if old := rt.state.Load(); old != nil && old.snap == snap {
		return old
	}
	return rt.rebuildLocked(snap)
}

// rebuildLocked builds and publishes the state for snap and feeds the
// balancer the endpoints not ejected, or all of them when fewer than
// panic_threshold percent would be left. rt.mu must be held.
func (rt *route) rebuildLocked(snap *discovery.Snapshot) *routeState {
	old := rt.state.Load()
	st := &routeState{snap: snap, endpoints: make(map[string]*endpoint, len(snap.Endpoints))}
	tagged := make([]discovery.Endpoint, 0, len(snap.Endpoints))
	for i := range snap.Endpoints {
		ep := &snap.Endpoints[i]
		if !ep.HasTags(rt.cfg.Tags) {
			continue
		}
		tagged = append(tagged, *ep)
		if old != nil {
			if e, ok := old.endpoints[ep.ID]; ok && e.Addr == ep.Addr && e.poolConfig.mesh() == rt.poolFor(ep.Meta).mesh() {
				st.endpoints[ep.ID] = e
				continue
			}
		}
		st.endpoints[ep.ID] = rt.newEndpoint(*ep)
	}
	now := rt.clock.Now()
	eligible := tagged
	if out := rt.countEjected(st, now); out > 0 {
		healthy := len(tagged) - out
		if healthy*100 < rt.cfg.Resilience.Outlier.PanicThreshold*len(tagged) {
			st.panic = true
		} else {
			eligible = make([]discovery.Endpoint, 0, healthy)
			for _, ep := range tagged {
				if !st.endpoints[ep.ID].ejected(now) {
					eligible = append(eligible, ep)
				}
			}
		}
	}
	st.eligible = len(eligible)
	rt.bal.Update(eligible)
	rt.state.Store(st)
	if old != nil {
		for id, e := range old.endpoints {
			if st.endpoints[id] == e {
				continue
			}
			if st.hasAddr(e.Addr) {
				// A new endpoint at the same address (re-registered under
				// another ID) counts into the same series: keep them.
				e.retired.Store(true)
				drain(e.pools.Load(), rt.cfg.Timeouts.Request)
				continue
			}
			rt.retire(e)
		}
	}
	return st
}

// hasAddr reports whether an endpoint of st is at addr.
func (st *routeState) hasAddr(addr string) bool {
	for _, e := range st.endpoints {
		if e.Addr == addr {
			return true
		}
	}
	return false
}

func (rt *route) countEjected(st *routeState, now time.Time) int {
	n := 0
	for _, e := range st.endpoints {
		if e.ejected(now) {
			n++
		}
	}
	return n
}

func (rt *route) newEndpoint(ep discovery.Endpoint) *endpoint {
	e := &endpoint{Endpoint: ep, poolConfig: rt.poolFor(ep.Meta),
		limits: newNodeLimits(rt.cfg.Resilience.Limits, rt.metrics.overflows, rt.metrics.endpoint(ep.Addr))}
	if rt.metrics.endpointLabels {
		e.limits.retired = &e.retired // its series go with it
	}
	e.stats.born = time.Now().UnixNano()
	e.limits.reclaim = e.closeAnIdle
	e.pools.Store(newPools(e.poolConfig, e.limits, time.Now()))
	e.breaker = rt.newBreaker(ep.Addr)
	if !rt.onDemand && rt.cfg.Protocol != "tcp" {
		// A configured upstream shows every series of its nodes from
		// the start, at zero; a forward-proxy route makes each at its
		// first use (lazyCounter). A TCP route counts connections.
		for class := range codeClasses {
			rt.metrics.newAnswerSeries(e, class)
		}
		e.limits.makeOverflowSeries()
	}
	return e
}

// retire closes the pool of an endpoint that left the set. Requests in
// flight finish; their connections close when they go idle, which the
// second sweep catches.
//
// HTTP/2 connections close once their last stream ends, so streams in flight
// on a node that leaves are drained, not cut.
func (rt *route) retire(e *endpoint) {
	e.retired.Store(true) // before the series go: see routeMetrics.newAnswerSeries
	drain(e.pools.Load(), rt.cfg.Timeouts.Request)
	rt.metrics.retire(e.Addr)
}

// status describes the route for /status.
func (rt *route) status() RouteStatus {
	s := RouteStatus{
		Listener: rt.listener,
		Service:  rt.cfg.Service,
		Protocol: rt.cfg.Protocol,
		Balancer: rt.cfg.Balancer,
		HashKey:  rt.cfg.HashKey,
		Tags:     rt.cfg.Tags,
	}
	st := rt.state.Load()
	if st == nil {
		return s
	}
	s.Stale = st.snap.Stale
	s.Panic = st.panic
	if st.snap.Err != nil {
		s.Error = st.snap.Err.Error()
	}
	for i := range st.snap.Endpoints {
		ep := &st.snap.Endpoints[i]
		e, ok := st.endpoints[ep.ID]
		if !ok {
			continue
		}
		es := EndpointStatus{ID: ep.ID, Addr: ep.Addr, Tags: ep.Tags, Weight: ep.Weight,
			Breaker: e.breaker.State(), ConsecutiveFailures: e.outlier.Consecutive(), MTLS: e.poolConfig.mesh()}
		if l := e.limits; l != nil {
			es.Connections, es.PendingRequests, es.ActiveRequests = len(l.conns), int(l.pending.Load()), int(l.requests.Load())
		}
		now := time.Now()
		es.State = "serving"
		switch es.Breaker {
		case "open":
			es.State = "breaker_open"
		case "half-open":
			es.State = "breaker_half_open"
		}
		if until, ok := e.outlier.EjectedUntil(rt.clock.Now()); ok {
			until = until.UTC()
			es.EjectedUntil = &until
			es.State = "ejected"
		}
		es.NodeStats = e.stats.summary(now)
		s.Endpoints = append(s.Endpoints, es)
	}
	return s
}

// RouteStatus is a route as /status shows it.
type RouteStatus struct {
	Listener  string           `json:"listener"`
	Service   string           `json:"service"`
	Protocol  string           `json:"protocol,omitempty"`
	Balancer  string           `json:"balancer"`
	HashKey   string           `json:"hash_key,omitempty"`
	Tags      []string         `json:"tags,omitempty"`
	Stale     bool             `json:"stale"`
	Panic     bool             `json:"panic,omitempty"`
	Error     string           `json:"error,omitempty"`
	Endpoints []EndpointStatus `json:"endpoints"`
}

// EndpointStatus is one endpoint of a route in /status.
type EndpointStatus struct {
	ID     string   `json:"id"`
	Addr   string   `json:"addr"`
	Tags   []string `json:"tags,omitempty"`
	Weight int      `json:"weight"`
	// MTLS: the node serves the mesh (meta sidecar-mtls) and is dialled
	// with the sidecar's leaf certificate.
	MTLS bool `json:"mtls,omitempty"`
	// Breaker is closed, half-open, open or disabled.
	Breaker             string     `json:"breaker"`
	ConsecutiveFailures int        `json:"consecutive_failures"`
	EjectedUntil        *time.Time `json:"ejected_until,omitempty"`
	// State sums up whether the node gets requests: serving, ejected
	// (outlier detection), breaker_open or breaker_half_open. Every node
	// listed passes its Consul checks; those that fail them are not listed.
	State string `json:"state"`
	// Connections open to the node, requests waiting for one, and
	// requests in flight to it, as resilience.limits bounds them.
	Connections     int `json:"connections"`
	PendingRequests int `json:"pending_requests"`
	ActiveRequests  int `json:"active_requests"`
	// NodeStats are the node's request rate, error rate and latency
	// percentiles over the last 10 seconds.
	NodeStats
}

var errClientGone = errors.New("client went away")
