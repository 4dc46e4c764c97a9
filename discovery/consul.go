package discovery

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"math/rand/v2"
	"net/http"
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
// *api.Health satisfies it. Service answers at once (the backend sends no
// WaitIndex); State blocks for up to q.WaitTime. Both must return soon after
// q.Context() is done.
type HealthClient interface {
	Service(service, tag string, passingOnly bool, q *api.QueryOptions) ([]*api.ServiceEntry, *api.QueryMeta, error)
	State(state string, q *api.QueryOptions) (api.HealthChecks, *api.QueryMeta, error)
}

// CatalogClient is the part of *api.Catalog used for Known and for
// registrations; *api.Catalog satisfies it. Services blocks like
// HealthClient.State.
type CatalogClient interface {
	Services(q *api.QueryOptions) (map[string][]string, *api.QueryMeta, error)
}

// Consistency is the consistency mode of Consul's reads.
type Consistency string

// Consistency modes, as Consul names them.
const (
	// ConsistencyDefault reads from the leader, which may answer from its
	// own state for a moment after losing its leadership.
	ConsistencyDefault Consistency = "default"
	// ConsistencyStale lets any server answer, however far behind the
	// leader (bounded by the max_stale the transport adds; see
	// NewTransport): reads scale with the servers and carry on without a
	// leader, at the price of answers that may lag.
	ConsistencyStale Consistency = "stale"
	// ConsistencyConsistent makes the leader confirm its leadership with a
	// quorum before every answer: never stale, one more round trip.
	ConsistencyConsistent Consistency = "consistent"
)

// ConsulOptions tune the Consul backend. The zero value is usable.
type ConsulOptions struct {
	// Datacenter to query; if empty, the agent's own.
	Datacenter string
	// Datacenters are the other datacenters whose services may be watched
	// (by the keys Key(name, dc) makes); each costs two more blocking
	// queries, so MaxConnections must be at least 3 + 2*len(Datacenters).
	// Watching any other fails with ErrUnknownDatacenter.
	Datacenters []string
	// LocalDatacenter reports the agent's own datacenter. It is asked once
	// (until it succeeds), when Datacenter is empty and a key names a
	// datacenter that is not followed, to tell the agent's own from an
	// unknown one. If nil, such a datacenter is taken to be the agent's.
	LocalDatacenter func(ctx context.Context) (string, error)
	// Consistency of every read; if empty, the agent's default
	// (ConsistencyDefault unless the agent sets discovery_max_stale).
	Consistency Consistency
	// MaxConnections bounds the backend's concurrent requests to the agent:
	// two blocking queries (health state and catalog) per datacenter and
	// the fetches of changed services, at most MaxConnections minus those.
	// If below 3 + 2*len(Datacenters), that plus one is used. Bound the
	// client's transport to the same number (NewTransport) so that
	// connections are bounded too.
	MaxConnections int
	// WaitTime bounds each blocking query; if zero, 5m is used. It is also
	// the resync period: every watched service is fetched again at least
	// this often (with ±10% jitter), which catches the changes neither
	// index shows (see the package doc).
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
	var remote []string
	for _, dc := range o.Datacenters {
		if dc != "" && !strings.EqualFold(dc, o.Datacenter) &&
			!slices.ContainsFunc(remote, func(r string) bool { return strings.EqualFold(r, dc) }) {
			remote = append(remote, dc)
		}
	}
	o.Datacenters = remote
	if o.MaxConnections < 3+2*len(o.Datacenters) {
		o.MaxConnections = 4 + 2*len(o.Datacenters)
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

// query returns the options of a read in dc (if empty, o.Datacenter):
// datacenter and consistency.
func (o *ConsulOptions) query(dc string) *api.QueryOptions {
	if dc == "" {
		dc = o.Datacenter
	}
	q := &api.QueryOptions{Datacenter: dc}
	switch o.Consistency {
	case ConsistencyStale:
		q.AllowStale = true
	case ConsistencyConsistent:
		q.RequireConsistent = true
	}
	return q
}

// logEvery is how many consecutive failures of a query pass between two
// warnings; the first failure is always logged, and so is the recovery.
const logEvery = 10

// Consul is a Backend that follows a whole datacenter with two blocking
// queries, whatever the number of watched services: one on the health of
// every check (/v1/health/state/any), one on the catalog's list of services.
// When either shows that a watched service may have changed, that service's
// passing instances are fetched again (/v1/health/service/NAME?passing), by
// a pool of workers: MaxConnections less the two blocking queries of each
// datacenter followed. Safe for concurrent use.
type Consul struct {
	health  HealthClient
	catalog CatalogClient
	opts    ConsulOptions
	log     *zap.Logger

	// ctx owns the two watches and the workers.
	ctx    context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup

	startOnce sync.Once
	jobs      chan fetchJob // to the workers; unbuffered

	dcs map[string]*dcWatch // by lower-case datacenter; "" is Datacenter (the agent's own if empty)

	localMu sync.Mutex
	localDC string // the agent's datacenter, once LocalDatacenter answered

	// staleFor and resolveTimeout are opts.StaleFor and ResolveTimeout,
	// which SetTimeouts changes while watches run.
	staleFor, resolveTimeout atomic.Int64
}

// dcWatch is the state of the two watches of one datacenter.
type dcWatch struct {
	c   *Consul
	dc  string // "" for ConsulOptions.Datacenter
	log *zap.Logger

	// stateReady is closed by the state watch's first outcome, answer or
	// failure: a watch's first fetch waits for it, so that the first answer
	// need not fetch again the services fetched before it (which it cannot
	// tell changed or not).
	stateReady chan struct{}
	stateOnce  sync.Once
	// catalogReady is the same for the catalog watch's first outcome.
	catalogReady chan struct{}
	catalogOnce  sync.Once

	mu       sync.Mutex
	watchers map[string]map[*healthWatch]struct{} // by lower-case service name
	stateErr error                                // last failure of the state query; nil while it answers

	known      atomic.Pointer[map[string]struct{}] // nil until the first answer
	knownReady chan struct{}                       // closed with the first answer
	knownErr   atomic.Pointer[error]               // last failure of the catalog query
}

// query returns the options of a read in d's datacenter.
func (d *dcWatch) query() *api.QueryOptions { return d.c.opts.query(d.dc) }

// dcWatch returns the watches of dc ("" for the default datacenter), or
// ErrUnknownDatacenter for a datacenter that is not followed. When
// Datacenter is empty, the agent's own is asked of LocalDatacenter.
func (c *Consul) dcWatch(ctx context.Context, dc string) (*dcWatch, error) {
	if strings.EqualFold(dc, c.opts.Datacenter) {
		dc = ""
	}
	if d, ok := c.dcs[strings.ToLower(dc)]; ok {
		return d, nil
	}
	if c.opts.Datacenter == "" {
		local, err := c.localDatacenter(ctx)
		if err != nil {
			return nil, fmt.Errorf("datacenter %q: %w", dc, err)
		}
		if local == "" || strings.EqualFold(dc, local) {
			return c.dcs[""], nil
		}
	}
	return nil, fmt.Errorf("datacenter %q: %w", dc, ErrUnknownDatacenter)
}

// localDatacenter is the agent's datacenter, "" if LocalDatacenter is nil.
func (c *Consul) localDatacenter(ctx context.Context) (string, error) {
	if c.opts.LocalDatacenter == nil {
		return "", nil
	}
	c.localMu.Lock()
	defer c.localMu.Unlock()
	if c.localDC != "" {
		return c.localDC, nil
	}
	dc, err := c.opts.LocalDatacenter(ctx)
	if err != nil {
		return "", fmt.Errorf("ask the agent its datacenter: %w", err)
	}
	c.localDC = dc
	return dc, nil
}

// NewConsul returns a Consul backend querying health for instances and
// catalog for the list of services. Its watches start with the first Watch
// or Known call; Close stops them.
func NewConsul(health HealthClient, catalog CatalogClient, opts ConsulOptions, log *zap.Logger) *Consul {
	ctx, cancel := context.WithCancel(context.Background())
	c := &Consul{
		health:  health,
		catalog: catalog,
		opts:    opts.withDefaults(),
		log:     log.Named("discovery"),
		ctx:     ctx,
		cancel:  cancel,
		jobs:    make(chan fetchJob),
		dcs:     make(map[string]*dcWatch),
	}
	for _, dc := range append([]string{""}, c.opts.Datacenters...) {
		l := c.log
		if dc != "" {
			l = l.With(zap.String("datacenter", dc))
		}
		c.dcs[strings.ToLower(dc)] = &dcWatch{c: c, dc: dc, log: l,
			watchers: make(map[string]map[*healthWatch]struct{}), knownReady: make(chan struct{}),
			stateReady: make(chan struct{}), catalogReady: make(chan struct{})}
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

// Key is the watch key of service in datacenter dc: service itself when dc
// is empty, else "service@dc". The Cache and the proxy treat keys as
// service names; the Consul backend splits them.
func Key(service, dc string) string {
	if dc == "" {
		return service
	}
	return service + "@" + dc
}

// SplitKey splits a key made by Key, or the service and datacenter of one
// made by FailoverKey.
func SplitKey(key string) (service, dc string) {
	service, dc, _, _ = parseKey(key)
	return service, dc
}

// Close stops the watches and the workers and waits for them. Watches run
// by Watch stop with their own contexts.
func (c *Consul) Close() {
	c.cancel()
	c.wg.Wait()
}

// Watch follows the passing instances of service until ctx is done. It
// blocks; cancelling ctx aborts the fetch in flight at once. It fetches the
// service once, then again each time the datacenter's watches say it may
// have changed, at most once at a time and once per change.
//
// A key made by FailoverKey follows the service in each of its datacenters
// and serves the first with a healthy instance (see FailoverKey).
func (c *Consul) Watch(ctx context.Context, key string, sink Sink) {
	service, dc, failover, tags := parseKey(key)
	if len(failover) > 0 {
		c.watchFailover(ctx, key, service, dc, failover, tags, sink)
		return
	}
	c.watchDC(ctx, key, service, dc, sink)
}

// watchDC follows service in datacenter dc ("" for the default one) under
// the name key until ctx is done.
func (c *Consul) watchDC(ctx context.Context, key, service, dc string, sink Sink) {
	back := newRetryBackoff(c.opts.BackoffMin, c.opts.BackoffMax)
	var d *dcWatch
	for {
		var err error
		if d, err = c.dcWatch(ctx, dc); err == nil {
			break
		}
		sink.Fail(fmt.Errorf("watch %q: %w", key, err))
		if errors.Is(err, ErrUnknownDatacenter) {
			<-ctx.Done() // giving up would make the cache start the watch again
			return
		}
		if !backoff.Wait(ctx, back.next()) { // the agent did not say its datacenter
			return
		}
	}
	c.start()
	h := &healthWatch{
		c:       c,
		d:       d,
		service: service,
		key:     strings.ToLower(service),
		sink:    sink,
		back:    newRetryBackoff(c.opts.BackoffMin, c.opts.BackoffMax),
		kick:    make(chan struct{}, 1),
		reply:   make(chan time.Duration, 1),
	}
	d.mu.Lock()
	set := d.watchers[h.key]
	if set == nil {
		set = make(map[*healthWatch]struct{})
		d.watchers[h.key] = set
	}
	set[h] = struct{}{}
	d.mu.Unlock()
	defer func() {
		d.mu.Lock()
		delete(set, h)
		if len(set) == 0 {
			delete(d.watchers, h.key)
		}
		d.mu.Unlock()
	}()
	h.run(ctx)
}

// healthWatch is the state of one watched service. Only its own goroutine
// touches it, or the worker handling a fetch while that goroutine waits for
// it (handle), but for kick, which anyone may signal.
type healthWatch struct {
	c       *Consul
	d       *dcWatch // the watches of its datacenter
	service string
	key     string // service in lower case, as the watches key services
	sink    Sink

	// kick asks for a fetch; a buffer of one coalesces the changes seen
	// while a fetch runs into one more fetch.
	kick  chan struct{}
	reply chan time.Duration // from the worker that ran this watch's fetch: the wait before a retry

	idx      blockingIndex
	back     retryBackoff
	cur      *Snapshot // last published
	failures int       // consecutive failed queries
	logged   bool      // whether one of them was logged here
	// aclLogged is set once ACLs hiding the service has been logged.
	aclLogged bool
	// reset is set when the index went backwards or a query failed, and
	// cleared by the first non-empty answer after it (or by StaleFor running
	// out): until then an empty answer does not replace a non-empty set. A
	// restarted dev agent comes back empty, and its index does not always go
	// backwards.
	reset bool
	// settleUntil is set by the first non-empty answer after a reset:
	// until then the reset holds (see resetSettle). Zero otherwise.
	settleUntil time.Time
	// dark is set when an instance in the last answer has no check of its
	// own: the health state does not show such an instance's changes, so
	// every change of the catalog fetches the service again.
	dark atomic.Bool
	// nodes are the nodes of the last answer's instances; a change of a
	// node's own checks fetches the services on it again. Read by the state
	// watch under c.mu.
	nodes []string
}

// logger is the datacenter's logger with the service: made when a line is
// logged, since a logger kept per watch costs about 1 KB (its encoder),
// 5 MB at 5,000 watches.
func (h *healthWatch) logger() *zap.Logger { return h.d.log.With(zap.String("service", h.service)) }

// Kick asks h to fetch again. It does not block.
func (h *healthWatch) Kick() {
	select {
	case h.kick <- struct{}{}:
	default:
	}
}

func (h *healthWatch) run(ctx context.Context) {
	for _, first := range []chan struct{}{h.d.stateReady, h.d.catalogReady} {
		select {
		case <-first:
		case <-ctx.Done():
			return
		}
	}
	retry := h.fetch(ctx)
	for {
		// At least once per WaitTime, the service is fetched again.
		wait := resyncJitter(h.c.opts.WaitTime)
		if retry > 0 {
			wait = min(wait, retry)
		}
		t := time.NewTimer(wait)
		select {
		case <-ctx.Done():
			t.Stop()
			return
		case <-h.kick:
		case <-t.C:
		}
		t.Stop()
		if ctx.Err() != nil {
			return
		}
		if err := h.d.stateFailure(); err != nil {
			// The agent is failing: keep the set, stale, without a
			// fetch of our own (the state watch logs and retries).
			retry = h.fail(err, false)
			continue
		}
		retry = h.fetch(ctx)
	}
}

// resyncJitter returns d ± 10%.
func resyncJitter(d time.Duration) time.Duration {
	return time.Duration(float64(d) * (0.9 + 0.2*rand.Float64()))
}

// fetch queries the service through the worker pool, which handles the
// answer (handle) while fetch waits. It returns how long to wait before a
// retry, 0 for none.
func (h *healthWatch) fetch(ctx context.Context) time.Duration {
	select {
	case h.c.jobs <- fetchJob{ctx: ctx, h: h}:
	case <-ctx.Done():
		return 0
	}
	// Even once ctx ends: the worker may be handling the answer, which
	// calls the sink, and must be done before Watch returns. It is bounded
	// by fetchTimeout and one handle.
	return <-h.reply
}

// handle handles the answer to a fetch and returns how long to wait before
// a retry, 0 for none. A worker runs it while h's goroutine waits in fetch.
func (h *healthWatch) handle(r fetchResult) time.Duration {
	h.acl(r)
	if r.err != nil {
		return h.fail(r.err, true)
	}
	var index uint64
	if r.meta != nil {
		index = r.meta.LastIndex
	}
	h.answer(r.entries, index)
	return h.staleLeft()
}

// acl tells the sink whether ACLs hid part of the service in the answer r,
// and logs it, with the fix, the first time.
func (h *healthWatch) acl(r fetchResult) {
	var err error
	var se api.StatusError
	switch {
	case errors.As(r.err, &se) && se.Code == http.StatusForbidden:
		err = fmt.Errorf("query health of %q: %w: %s", h.service, ErrACLDenied, aclFix(h.service))
	case r.err == nil && r.meta != nil && r.meta.ResultsFilteredByACLs:
		err = fmt.Errorf("query health of %q: %w: %s", h.service, ErrACLFiltered, aclFix(h.service))
	case r.err != nil:
		return // another failure says nothing of ACLs
	}
	h.sink.ACL(err)
	if err != nil && !h.aclLogged {
		h.aclLogged = true
		h.logger().Warn("consul acls hide the service", zap.Error(err))
	}
}

// aclFix says what a token needs to read service.
func aclFix(service string) string {
	return fmt.Sprintf(`give the token (consul.token or CONSUL_HTTP_TOKEN) a policy with service %q { policy = "read" } and node_prefix "" { policy = "read" }`, service)
}

// staleLeft is how long until a stale set kept after a reset must be
// fetched again, because StaleFor or the settling after the reset (see
// resetSettle) runs out, or 0 when none is kept.
func (h *healthWatch) staleLeft() time.Duration {
	if !h.reset || h.cur == nil || !h.cur.Stale {
		return 0
	}
	now := h.c.opts.Now()
	var left time.Duration
	if limit := h.c.staleLimit(); limit > 0 {
		left = max(h.cur.StaleSince.Add(limit).Sub(now), 10*time.Millisecond)
	}
	if !h.settleUntil.IsZero() {
		settle := max(h.settleUntil.Sub(now), 10*time.Millisecond)
		if left == 0 || settle < left {
			left = settle
		}
	}
	return left
}

// resetSettle is how long after the first non-empty answer that follows a
// reset an empty answer still keeps the last set: a restarted client agent
// may first answer from the servers' old state, then sync the checks that
// lapsed while it was down (critical until their next heartbeat).
const resetSettle = 5 * time.Second

// resetting reports whether an empty answer at now keeps the last set:
// after a reset, until resetSettle past the first non-empty answer.
func (h *healthWatch) resetting(now time.Time) bool {
	return h.reset && (h.settleUntil.IsZero() || now.Before(h.settleUntil))
}

// answer handles a successful query.
func (h *healthWatch) answer(entries []*api.ServiceEntry, index uint64) {
	now := h.c.opts.Now()
	if h.failures > 0 {
		if h.logged {
			h.logger().Info("consul query recovered", zap.Int("attempt", h.failures))
		}
		h.failures, h.logged = 0, false
		h.back.reset()
	}
	h.sink.Confirm(now)
	h.observe(entries)
	changed, backwards := h.idx.observe(index)
	if backwards {
		h.reset, h.settleUntil = true, time.Time{}
		h.logger().Info("consul index went backwards", zap.Uint64("index", index))
	}
	cur := h.cur
	if !changed && !h.reset && cur != nil && !cur.Stale {
		return
	}
	eps := endpointsOf(entries)
	if h.resetting(now) && len(eps) == 0 && cur != nil && len(cur.Endpoints) > 0 {
		since := now
		if cur.Stale {
			since = cur.StaleSince
		}
		if !h.expired(since, now) {
			if !cur.Stale || cur.Err != nil {
				h.logger().Warn("empty answer after a reset, keeping last endpoints",
					zap.Int("endpoints", len(cur.Endpoints)), zap.Uint64("index", index))
				h.publish(&Snapshot{Service: h.service, Endpoints: cur.Endpoints, Updated: cur.Updated,
					Stale: true, StaleSince: since}, index)
			}
			return
		}
	}
	if h.reset && h.settleUntil.IsZero() {
		// A restarted agent may answer with its old state first and only
		// then sync checks that lapsed while it was down: an empty answer
		// shortly after this one still keeps the last set.
		h.settleUntil = now.Add(resetSettle)
	}
	if !h.resetting(now) {
		h.reset, h.settleUntil = false, time.Time{}
	}
	if cur != nil && !cur.Stale && sameEndpoints(cur.Endpoints, eps) {
		return
	}
	h.publish(&Snapshot{Service: h.service, Endpoints: eps, Updated: now}, index)
}

// observe records, from an answer, whether the service has instances
// without checks of their own and which nodes it runs on.
func (h *healthWatch) observe(entries []*api.ServiceEntry) {
	dark := false
	var nodes []string
	for _, e := range entries {
		if e == nil || e.Service == nil {
			continue
		}
		if e.Node != nil && !slices.Contains(nodes, e.Node.Node) {
			nodes = append(nodes, e.Node.Node)
		}
		own := false
		for _, ch := range e.Checks {
			if ch != nil && ch.ServiceID == e.Service.ID {
				own = true
				break
			}
		}
		dark = dark || !own
	}
	h.dark.Store(dark)
	h.d.mu.Lock()
	h.nodes = nodes
	h.d.mu.Unlock()
}

// fail handles a failed query and returns how long to wait before the next.
// A failure of the state watch, relayed to every service, is logged there
// (logged false), not once per service.
func (h *healthWatch) fail(err error, logged bool) time.Duration {
	now := h.c.opts.Now()
	err = fmt.Errorf("query health of %q: %w", h.service, err)
	h.sink.Fail(err)
	h.idx.failed()
	h.reset, h.settleUntil = true, time.Time{}
	h.failures++
	if logged && (!h.logged || h.failures%logEvery == 0) {
		h.logged = true
		h.logger().Warn("consul query failed", zap.Error(err), zap.Int("attempt", h.failures))
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
			h.logger().Warn("stale endpoints expired", zap.Error(err))
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
	h.logger().Info("endpoints changed", zap.Int("endpoints", len(s.Endpoints)),
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
