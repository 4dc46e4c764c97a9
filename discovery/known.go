package discovery

import (
	"context"
	"fmt"
	"runtime/debug"
	"strings"
	"time"

	"github.com/hashicorp/consul/api"
	"go.uber.org/zap"

	"github.com/sidecarlb/sidecar/internal/backoff"
)

// Known reports whether service is registered in the catalog, ignoring case
// as Consul's own lookups do. The first call starts one blocking watch on the
// catalog's list of services, shared by all callers and kept until Close, and
// waits for its first answer, at most ResolveTimeout and while ctx lasts.
// After that Known is a lock-free map lookup. While Consul fails, the last
// list answers. Safe for concurrent use.
func (c *Consul) Known(ctx context.Context, service string) (bool, error) {
	service = strings.ToLower(service) // no allocation when already lower case
	if m := c.known.Load(); m != nil {
		_, ok := (*m)[service]
		return ok, nil
	}
	c.knownOnce.Do(c.startCatalog)
	t := time.NewTimer(time.Duration(c.resolveTimeout.Load()))
	defer t.Stop()
	select {
	case <-c.knownReady:
		_, ok := (*c.known.Load())[service]
		return ok, nil
	case <-ctx.Done():
		return false, fmt.Errorf("list services: %w", ctx.Err())
	case <-c.ctx.Done():
		return false, fmt.Errorf("list services: %w", ErrClosed)
	case <-t.C:
		if err := c.knownErr.Load(); err != nil {
			return false, fmt.Errorf("list services: %w: %w", ErrResolveTimeout, *err)
		}
		return false, fmt.Errorf("list services: %w", ErrResolveTimeout)
	}
}

func (c *Consul) startCatalog() {
	if c.ctx.Err() != nil {
		return
	}
	c.wg.Add(1)
	go func() {
		defer c.wg.Done()
		defer func() {
			if r := recover(); r != nil {
				c.log.Error("catalog watch panicked", zap.Any("panic", r), zap.ByteString("stack", debug.Stack()))
			}
		}()
		c.watchCatalog(c.ctx)
	}()
}

// watchCatalog follows the list of services until ctx is done, by the same
// blocking-query rules as a health watch. Every answer with a new index
// replaces the list, and a failure keeps the last one, with one exception
// that mirrors the health watch: after a failure or an index going
// backwards (a restarted agent that has not re-learned its services), names
// missing from the answers stay known until an answer holds them all again
// or StaleFor runs out. Keeping a name costs little: its watch is empty.
func (c *Consul) watchCatalog(ctx context.Context) {
	var (
		idx      blockingIndex
		back     = newRetryBackoff(c.opts.BackoffMin, c.opts.BackoffMax)
		failures int
		ready    bool
		resetAt  time.Time // when the last reset began; zero if none is pending
	)
	for {
		wait := c.opts.WaitTime
		if limit := c.staleLimit(); !resetAt.IsZero() && limit > 0 {
			left := resetAt.Add(limit).Sub(c.opts.Now())
			wait = min(wait, max(left, 10*time.Millisecond))
		}
		q := &api.QueryOptions{Datacenter: c.opts.Datacenter, WaitIndex: idx.wait, WaitTime: wait}
		services, meta, err := c.catalog.Services(q.WithContext(ctx))
		if ctx.Err() != nil {
			return
		}
		now := c.opts.Now()
		if err != nil {
			err = fmt.Errorf("query catalog services: %w", err)
			c.knownErr.Store(&err)
			idx.failed()
			if ready && resetAt.IsZero() {
				resetAt = now
			}
			failures++
			if failures == 1 || failures%logEvery == 0 {
				c.log.Warn("consul query failed", zap.Error(err), zap.Int("attempt", failures))
			}
			if !backoff.Wait(ctx, back.next()) {
				return
			}
			continue
		}
		if failures > 0 {
			c.log.Info("consul query recovered", zap.Int("attempt", failures))
			failures = 0
			back.reset()
		}
		var index uint64
		if meta != nil {
			index = meta.LastIndex
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
		old := c.known.Load()
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
				c.log.Info("services missing after a reset, keeping them known",
					zap.Int("services", kept), zap.Uint64("index", index))
			}
		}
		if old == nil || len(*old) != len(names) {
			c.log.Info("services changed", zap.Int("services", len(names)), zap.Uint64("index", index))
		}
		c.known.Store(&names)
		if !ready {
			ready = true
			close(c.knownReady)
		}
	}
}
