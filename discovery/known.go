package discovery

import (
	"context"
	"fmt"
	"hash/fnv"
	"slices"
	"strings"
	"time"

	"github.com/hashicorp/consul/api"
	"go.uber.org/zap"

	"github.com/sidecarlb/sidecar/internal/backoff"
)

// Known reports whether service is registered in the catalog, ignoring case
// as Consul's own lookups do. The first call (or Watch) starts the catalog
// watch, shared by all callers and kept until Close, and Known waits for its
// first answer, at most ResolveTimeout and while ctx lasts.
// After that Known is a lock-free map lookup. While Consul fails, the last
// list answers. Safe for concurrent use.
func (c *Consul) Known(ctx context.Context, service string) (bool, error) {
	service, dc := SplitKey(service)
	d, err := c.dcWatch(ctx, dc)
	if err != nil {
		return false, err
	}
	return d.knows(ctx, service)
}

// knows is Known in d's datacenter.
func (d *dcWatch) knows(ctx context.Context, service string) (bool, error) {
	c := d.c
	service = strings.ToLower(service) // no allocation when already lower case
	if m := d.known.Load(); m != nil {
		_, ok := (*m)[service]
		return ok, nil
	}
	c.start()
	t := time.NewTimer(time.Duration(c.resolveTimeout.Load()))
	defer t.Stop()
	select {
	case <-d.knownReady:
		_, ok := (*d.known.Load())[service]
		return ok, nil
	case <-ctx.Done():
		return false, fmt.Errorf("list services: %w", ctx.Err())
	case <-c.ctx.Done():
		return false, fmt.Errorf("list services: %w", ErrClosed)
	case <-t.C:
		if err := d.knownErr.Load(); err != nil {
			return false, fmt.Errorf("list services: %w: %w", ErrResolveTimeout, *err)
		}
		return false, fmt.Errorf("list services: %w", ErrResolveTimeout)
	}
}

// watchCatalog follows the list of services until ctx is done, by the same
// blocking-query rules as a health watch. Every answer with a new index
// replaces the list, and a failure keeps the last one, with one exception
// that mirrors the health watch: after a failure or an index going
// backwards (a restarted agent that has not re-learned its services), names
// missing from the answers stay known until an answer holds them all again
// or StaleFor runs out. Keeping a name costs little: its watch is empty.
//
// It also tells the health watches of registrations: each new index asks
// the watches of the services that appeared, disappeared or changed their
// tags to fetch again, and those of the services with an instance without
// checks (which the health state does not show).
func (d *dcWatch) watchCatalog(ctx context.Context) {
	st := &catalogState{back: newRetryBackoff(d.c.opts.BackoffMin, d.c.opts.BackoffMax)}
	for {
		q := d.query()
		q.WaitIndex, q.WaitTime = st.idx.wait, d.catalogWait(st)
		services, meta, err := d.c.catalog.Services(q.WithContext(ctx))
		if ctx.Err() != nil {
			return
		}
		if err != nil {
			if !d.catalogFailed(ctx, st, err) {
				return
			}
			continue
		}
		d.catalogAnswered(st, services, meta)
	}
}

// catalogState is the state of a catalog watch, touched by its goroutine
// only.
type catalogState struct {
	idx       blockingIndex
	back      retryBackoff
	failures  int
	ready     bool              // whether the list was stored once
	resetAt   time.Time         // when the last reset began; zero if none is pending
	tags      map[string]uint64 // digestTags of the last answer
	aclLogged bool
}

// catalogWait is how long the next catalog query may block: the wait
// time, or less while names missing after a reset are kept.
func (d *dcWatch) catalogWait(st *catalogState) time.Duration {
	wait := d.c.opts.WaitTime
	if limit := d.c.staleLimit(); !st.resetAt.IsZero() && limit > 0 {
		left := st.resetAt.Add(limit).Sub(d.c.opts.Now())
		wait = min(wait, max(left, 10*time.Millisecond))
	}
	return wait
}

// catalogFailed handles a failed catalog query and waits out the backoff;
// false when ctx ended first.
func (d *dcWatch) catalogFailed(ctx context.Context, st *catalogState, err error) bool {
	err = fmt.Errorf("query catalog services: %w", err)
	d.knownErr.Store(&err)
	st.idx.failed()
	if st.ready && st.resetAt.IsZero() {
		st.resetAt = d.c.opts.Now()
	}
	st.failures++
	if st.failures == 1 || st.failures%logEvery == 0 {
		d.log.Warn("consul query failed", zap.Error(err), zap.Int("attempt", st.failures))
	}
	d.catalogOnce.Do(func() { close(d.catalogReady) }) // the first fetches go ahead
	return backoff.Wait(ctx, st.back.next())
}

// catalogAnswered handles an answer of the catalog query: kicks the
// watches of what changed and stores the list of names.
func (d *dcWatch) catalogAnswered(st *catalogState, services map[string][]string, meta *api.QueryMeta) {
	now := d.c.opts.Now()
	recovered := st.failures > 0
	if recovered {
		d.log.Info("consul query recovered", zap.Int("attempt", st.failures))
		st.failures = 0
		st.back.reset()
	}
	var index uint64
	if meta != nil {
		index = meta.LastIndex
		if meta.ResultsFilteredByACLs && !st.aclLogged {
			st.aclLogged = true
			d.log.Warn("consul acls hide services from the catalog",
				zap.String("fix", `give the token (consul.token or CONSUL_HTTP_TOKEN) a policy with service_prefix "" { policy = "read" }`),
				zap.String("effect", "the forward proxy answers 404 for the hidden services"))
		}
	}
	changed, backwards := st.idx.observe(index)
	if backwards && st.resetAt.IsZero() {
		st.resetAt = now
	}
	if !changed && st.ready && st.resetAt.IsZero() {
		return
	}
	names := make(map[string]struct{}, len(services))
	for name := range services {
		names[strings.ToLower(name)] = struct{}{}
	}
	next := digestTags(services)
	switch {
	case st.tags == nil && !recovered:
		// The watches' first fetches waited for this answer: what changes
		// from here on, the next answers show.
		d.catalogOnce.Do(func() { close(d.catalogReady) })
	case st.tags == nil || recovered || backwards:
		// What changed while the query failed or the agent restarted is
		// unknown.
		d.kickAll()
	case changed:
		d.kick(changedKeys(st.tags, next), nil, true)
	}
	st.tags = next
	old := d.known.Load()
	if !st.resetAt.IsZero() && old != nil {
		d.keepMissing(st, names, *old, changed, index, now)
	}
	if old == nil || len(*old) != len(names) {
		d.log.Info("services changed", zap.Int("services", len(names)), zap.Uint64("index", index))
	}
	d.known.Store(&names)
	if !st.ready {
		st.ready = true
		close(d.knownReady)
	}
}

// keepMissing adds to names those of old it lacks while a reset is pending
// and StaleFor has not run out, and ends the reset when none is missing.
func (d *dcWatch) keepMissing(st *catalogState, names, old map[string]struct{}, changed bool, index uint64, now time.Time) {
	kept := 0
	if limit := d.c.staleLimit(); limit == 0 || now.Sub(st.resetAt) < limit {
		for name := range old {
			if _, ok := names[name]; !ok {
				names[name] = struct{}{}
				kept++
			}
		}
	}
	if kept == 0 {
		st.resetAt = time.Time{}
	} else if changed {
		d.log.Info("services missing after a reset, keeping them known",
			zap.Int("services", kept), zap.Uint64("index", index))
	}
}

// digestTags hashes each service's tags, by lower-case service name.
func digestTags(services map[string][]string) map[string]uint64 {
	out := make(map[string]uint64, len(services))
	h := fnv.New64a()
	for name, tags := range services {
		h.Reset()
		for _, tag := range slices.Sorted(slices.Values(tags)) {
			h.Write([]byte(tag))
			h.Write([]byte{0})
		}
		out[strings.ToLower(name)] += h.Sum64() + 1
	}
	return out
}
