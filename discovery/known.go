package discovery

import (
	"context"
	"fmt"
	"hash/fnv"
	"slices"
	"strings"
	"time"

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
	c := d.c
	var (
		idx       blockingIndex
		back      = newRetryBackoff(c.opts.BackoffMin, c.opts.BackoffMax)
		failures  int
		ready     bool
		resetAt   time.Time // when the last reset began; zero if none is pending
		tags      map[string]uint64
		aclLogged bool
	)
	for {
		wait := c.opts.WaitTime
		if limit := c.staleLimit(); !resetAt.IsZero() && limit > 0 {
			left := resetAt.Add(limit).Sub(c.opts.Now())
			wait = min(wait, max(left, 10*time.Millisecond))
		}
		q := d.query()
		q.WaitIndex, q.WaitTime = idx.wait, wait
		services, meta, err := c.catalog.Services(q.WithContext(ctx))
		if ctx.Err() != nil {
			return
		}
		now := c.opts.Now()
		if err != nil {
			err = fmt.Errorf("query catalog services: %w", err)
			d.knownErr.Store(&err)
			idx.failed()
			if ready && resetAt.IsZero() {
				resetAt = now
			}
			failures++
			if failures == 1 || failures%logEvery == 0 {
				d.log.Warn("consul query failed", zap.Error(err), zap.Int("attempt", failures))
			}
			if !backoff.Wait(ctx, back.next()) {
				return
			}
			continue
		}
		recovered := failures > 0
		if recovered {
			d.log.Info("consul query recovered", zap.Int("attempt", failures))
			failures = 0
			back.reset()
		}
		var index uint64
		if meta != nil {
			index = meta.LastIndex
			if meta.ResultsFilteredByACLs && !aclLogged {
				aclLogged = true
				d.log.Warn("consul acls hide services from the catalog",
					zap.String("fix", `give the token (consul.token or CONSUL_HTTP_TOKEN) a policy with service_prefix "" { policy = "read" }`),
					zap.String("effect", "the forward proxy answers 404 for the hidden services"))
			}
		}
		changed, backwards := idx.observe(index)
		if backwards && resetAt.IsZero() {
			resetAt = now
		}
		if !changed && ready && resetAt.IsZero() {
			continue
		}
		names := make(map[string]struct{}, len(services))
		for name := range services {
			names[strings.ToLower(name)] = struct{}{}
		}
		next := digestTags(services)
		switch {
		case tags == nil || recovered || backwards:
			// What changed before the first answer, or while the query
			// failed or the agent restarted, is unknown.
			d.kickAll()
		case changed:
			d.kick(changedKeys(tags, next), nil, true)
		}
		tags = next
		old := d.known.Load()
		if !resetAt.IsZero() && old != nil {
			kept := 0
			if limit := c.staleLimit(); limit == 0 || now.Sub(resetAt) < limit {
				for name := range *old {
					if _, ok := names[name]; !ok {
						names[name] = struct{}{}
						kept++
					}
				}
			}
			if kept == 0 {
				resetAt = time.Time{}
			} else if changed {
				d.log.Info("services missing after a reset, keeping them known",
					zap.Int("services", kept), zap.Uint64("index", index))
			}
		}
		if old == nil || len(*old) != len(names) {
			d.log.Info("services changed", zap.Int("services", len(names)), zap.Uint64("index", index))
		}
		d.known.Store(&names)
		if !ready {
			ready = true
			close(d.knownReady)
		}
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
