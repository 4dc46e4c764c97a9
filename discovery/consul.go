package discovery

import (
	"context"
	"fmt"
	"maps"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hashicorp/consul/api"
	"go.uber.org/zap"

	"github.com/sidecarlb/sidecar/internal/backoff"
)

// HealthClient is the part of *api.Health the Consul backend uses;
// *api.Health satisfies it. Service may block for up to q.WaitTime and must
// return soon after q.Context() is done.
type HealthClient interface {
	Service(service, tag string, passingOnly bool, q *api.QueryOptions) ([]*api.ServiceEntry, *api.QueryMeta, error)
}

// CatalogClient is the part of *api.Catalog used for Known; *api.Catalog
// satisfies it. Services blocks like HealthClient.Service.
type CatalogClient interface {
	Services(q *api.QueryOptions) (map[string][]string, *api.QueryMeta, error)
}

// ConsulOptions tune the Consul backend. The zero value is usable.
type ConsulOptions struct {
	// Datacenter to query; if empty, the agent's own.
	Datacenter string
	// WaitTime bounds each blocking query; if zero, 5m is used.
	WaitTime time.Duration
	// StaleFor is how long the last good set keeps serving, marked Stale,
	// while Consul fails, or while Consul answers empty after an index reset
	// or an outage (a restarted agent that has not re-learned its
	// services); past it the set is cleared. Counted from the first failure
	// (or the empty answer). Zero means forever, which also keeps a service
	// that truly emptied during an outage until it has instances again.
	StaleFor time.Duration
	// ResolveTimeout bounds how long the first Known call waits for the
	// first list of services; if zero, 2s is used.
	ResolveTimeout time.Duration
	// BackoffMin and BackoffMax bound the delay between retries of a
	// failing query, which doubles from min to max with ±25% jitter; if
	// zero, 100ms and 10s are used.
	BackoffMin, BackoffMax time.Duration
	// Now is the clock for timestamps and StaleFor; if nil, time.Now is
	// used. Waiting always uses real timers.
	Now func() time.Time
}

func (o ConsulOptions) withDefaults() ConsulOptions {
	if o.WaitTime <= 0 {
		o.WaitTime = 5 * time.Minute
	}
	if o.ResolveTimeout <= 0 {
		o.ResolveTimeout = 2 * time.Second
	}
	if o.BackoffMin <= 0 {
		o.BackoffMin = 100 * time.Millisecond
	}
	if o.BackoffMax <= 0 {
		o.BackoffMax = 10 * time.Second
	}
	o.BackoffMax = max(o.BackoffMax, o.BackoffMin)
	if o.Now == nil {
		o.Now = time.Now
	}
	return o
}

// logEvery is how many consecutive failures of a query pass between two
// warnings; the first failure is always logged, and so is the recovery.
const logEvery = 10

// Consul is a Backend that follows Consul's health endpoint with one
// blocking query per watched service, keeping passing instances only.
// Safe for concurrent use.
type Consul struct {
	health  HealthClient
	catalog CatalogClient
	opts    ConsulOptions
	log     *zap.Logger

	// ctx owns the catalog watch behind Known.
	ctx    context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup

	knownOnce  sync.Once
	known      atomic.Pointer[map[string]struct{}] // nil until the first answer
	knownReady chan struct{}                       // closed with the first answer
	knownErr   atomic.Pointer[error]               // last failure of the catalog query

	// staleFor and resolveTimeout are opts.StaleFor and ResolveTimeout,
	// which SetTimeouts changes while watches run.
	staleFor, resolveTimeout atomic.Int64
}

// NewConsul returns a Consul backend querying health for instances and
// catalog for the list of services. Close stops it.
func NewConsul(health HealthClient, catalog CatalogClient, opts ConsulOptions, log *zap.Logger) *Consul {
	ctx, cancel := context.WithCancel(context.Background())
	c := &Consul{
		health:     health,
		catalog:    catalog,
		opts:       opts.withDefaults(),
		log:        log.Named("discovery"),
		ctx:        ctx,
		cancel:     cancel,
		knownReady: make(chan struct{}),
	}
	c.SetTimeouts(c.opts.StaleFor, c.opts.ResolveTimeout)
	return c
}

// SetTimeouts changes ConsulOptions.StaleFor and ResolveTimeout (zero: 2s)
// for the running watches: a set already stale is held or cleared by the
// new staleFor from its next wait on. Safe for concurrent use.
func (c *Consul) SetTimeouts(staleFor, resolveTimeout time.Duration) {
	if resolveTimeout <= 0 {
		resolveTimeout = 2 * time.Second
	}
	c.staleFor.Store(int64(max(staleFor, 0)))
	c.resolveTimeout.Store(int64(resolveTimeout))
}

// staleLimit is StaleFor as SetTimeouts last set it.
func (c *Consul) staleLimit() time.Duration { return time.Duration(c.staleFor.Load()) }

// Close stops the catalog watch behind Known and waits for it. Watches run
// by Watch stop with their own contexts.
func (c *Consul) Close() {
	c.cancel()
	c.wg.Wait()
}

// Watch follows the passing instances of service until ctx is done. It
// blocks; cancelling ctx aborts the query in flight at once.
func (c *Consul) Watch(ctx context.Context, service string, sink Sink) {
	h := &healthWatch{
		c:       c,
		service: service,
		sink:    sink,
		log:     c.log.With(zap.String("service", service)),
		back:    newRetryBackoff(c.opts.BackoffMin, c.opts.BackoffMax),
	}
	h.run(ctx)
}

// healthWatch is the state of one service's blocking query. Only its own
// goroutine touches it.
type healthWatch struct {
	c       *Consul
	service string
	sink    Sink
	log     *zap.Logger

	idx      blockingIndex
	back     retryBackoff
	cur      *Snapshot // last published
	failures int       // consecutive failed queries
	// reset is set when the index went backwards or a query failed, and
	// cleared by the first non-empty answer after it (or by StaleFor running
	// out): until then an empty answer does not replace a non-empty set. A
	// restarted dev agent comes back empty, and its index does not always go
	// backwards.
	reset bool
}

func (h *healthWatch) run(ctx context.Context) {
	for {
		q := &api.QueryOptions{
			Datacenter: h.c.opts.Datacenter,
			WaitIndex:  h.idx.wait,
			WaitTime:   h.waitTime(),
		}
		entries, meta, err := h.c.health.Service(h.service, "", true, q.WithContext(ctx))
		if ctx.Err() != nil {
			return
		}
		if err != nil {
			if !backoff.Wait(ctx, h.fail(err)) {
				return
			}
			continue
		}
		var index uint64
		if meta != nil {
			index = meta.LastIndex
		}
		h.answer(entries, index)
	}
}

// waitTime bounds the next blocking query so that a stale set kept after a
// reset is cleared on time when StaleFor runs out.
func (h *healthWatch) waitTime() time.Duration {
	wait := h.c.opts.WaitTime
	if limit := h.c.staleLimit(); limit > 0 && h.reset && h.cur != nil && h.cur.Stale {
		left := h.cur.StaleSince.Add(limit).Sub(h.c.opts.Now())
		wait = min(wait, max(left, 10*time.Millisecond))
	}
	return wait
}

// answer handles a successful query.
func (h *healthWatch) answer(entries []*api.ServiceEntry, index uint64) {
	now := h.c.opts.Now()
	if h.failures > 0 {
		h.log.Info("consul query recovered", zap.Int("attempt", h.failures))
		h.failures = 0
		h.back.reset()
	}
	h.sink.Confirm(now)
	changed, backwards := h.idx.observe(index)
	if backwards {
		h.reset = true
		h.log.Info("consul index went backwards", zap.Uint64("index", index))
	}
	cur := h.cur
	if !changed && !h.reset && cur != nil && !cur.Stale {
		return
	}
	eps := endpointsOf(entries)
	if h.reset && len(eps) == 0 && cur != nil && len(cur.Endpoints) > 0 {
		since := now
		if cur.Stale {
			since = cur.StaleSince
		}
		if !h.expired(since, now) {
			if !cur.Stale || cur.Err != nil {
				h.log.Warn("empty answer after a reset, keeping last endpoints",
					zap.Int("endpoints", len(cur.Endpoints)), zap.Uint64("index", index))
				h.publish(&Snapshot{Service: h.service, Endpoints: cur.Endpoints, Updated: cur.Updated,
					Stale: true, StaleSince: since}, index)
			}
			return
		}
	}
	h.reset = false
	if cur != nil && !cur.Stale && sameEndpoints(cur.Endpoints, eps) {
		return
	}
	h.publish(&Snapshot{Service: h.service, Endpoints: eps, Updated: now}, index)
}

// fail handles a failed query and returns how long to wait before the next.
func (h *healthWatch) fail(err error) time.Duration {
	now := h.c.opts.Now()
	err = fmt.Errorf("query health of %q: %w", h.service, err)
	h.sink.Fail(err)
	h.idx.failed()
	h.reset = true
	h.failures++
	if h.failures == 1 || h.failures%logEvery == 0 {
		h.log.Warn("consul query failed", zap.Error(err), zap.Int("attempt", h.failures))
	}
	wait := h.back.next()
	cur := h.cur
	if cur == nil {
		return wait
	}
	since := now
	if cur.Stale {
		since = cur.StaleSince
	}
	if h.expired(since, now) {
		if len(cur.Endpoints) > 0 || cur.Err == nil {
			h.log.Warn("stale endpoints expired", zap.Error(err))
			h.publish(&Snapshot{Service: h.service, Updated: now, Stale: true, StaleSince: since, Err: err},
				h.idx.last)
		}
		return wait
	}
	if !cur.Stale || cur.Err == nil {
		h.publish(&Snapshot{Service: h.service, Endpoints: cur.Endpoints, Updated: cur.Updated,
			Stale: true, StaleSince: since, Err: err}, h.idx.last)
	}
	if limit := h.c.staleLimit(); limit > 0 {
		left := since.Add(limit).Sub(now)
		wait = min(wait, max(left, time.Millisecond))
	}
	return wait
}

// expired reports whether a set stale since since has outlived StaleFor.
func (h *healthWatch) expired(since, now time.Time) bool {
	limit := h.c.staleLimit()
	return limit > 0 && now.Sub(since) >= limit
}

func (h *healthWatch) publish(s *Snapshot, index uint64) {
	h.cur = s
	h.sink.Publish(s)
	h.log.Info("endpoints changed", zap.Int("endpoints", len(s.Endpoints)),
		zap.Uint64("index", index), zap.Bool("stale", s.Stale))
}

// endpointsOf converts a health answer to endpoints sorted by ID. Consul
// service IDs are unique per node only; IDs that repeat across nodes are
// qualified as "node/id" so that the set stays keyed by ID.
func endpointsOf(entries []*api.ServiceEntry) []Endpoint {
	var seen map[string]int
	dup := false
	for _, e := range entries {
		if e == nil || e.Service == nil {
			continue
		}
		if seen == nil {
			seen = make(map[string]int, len(entries))
		}
		seen[e.Service.ID]++
		dup = dup || seen[e.Service.ID] > 1
	}
	eps := make([]Endpoint, 0, len(seen))
	for _, e := range entries {
		if e == nil || e.Service == nil {
			continue
		}
		s := e.Service
		id, addr := s.ID, s.Address
		if e.Node != nil {
			if addr == "" {
				addr = e.Node.Address
			}
			if dup && seen[id] > 1 {
				id = e.Node.Node + "/" + id
			}
		}
		eps = append(eps, NewEndpoint(id, addr, s.Port, s.Tags, s.Meta, s.Weights.Passing))
	}
	slices.SortFunc(eps, func(a, b Endpoint) int { return strings.Compare(a.ID, b.ID) })
	return eps
}

// sameEndpoints reports whether a and b, both sorted by ID, hold the same
// instances with the same attributes.
func sameEndpoints(a, b []Endpoint) bool {
	return slices.EqualFunc(a, b, func(x, y Endpoint) bool {
		return x.ID == y.ID && x.Addr == y.Addr && x.Weight == y.Weight &&
			slices.Equal(x.Tags, y.Tags) && maps.Equal(x.Meta, y.Meta)
	})
}
