package discovery

import (
	"context"
	"fmt"
	"hash/fnv"
	"runtime/debug"
	"strings"
	"time"

	"github.com/hashicorp/consul/api"
	"go.uber.org/zap"

	"github.com/sidecarlb/sidecar/internal/backoff"
)

// fetchJob asks a worker to fetch h's service.
type fetchJob struct {
	ctx context.Context // the watch's; cancelling it aborts the fetch
	h   *healthWatch
}

// fetchResult is the answer to a worker's fetch.
type fetchResult struct {
	entries []*api.ServiceEntry
	meta    *api.QueryMeta
	err     error
}

// start starts, once, the workers and the two watches, owned by c.ctx.
func (c *Consul) start() {
	c.startOnce.Do(func() {
		if c.ctx.Err() != nil {
			return
		}
		// Two blocking queries per datacenter; the rest fetch.
		for range c.opts.MaxConnections - 2*len(c.dcs) {
			c.goOwned("fetch worker", c.worker)
		}
		for _, d := range c.dcs {
			c.goOwned("state watch", d.watchState)
			c.goOwned("catalog watch", d.watchCatalog)
		}
	})
}

// goOwned runs f in a goroutine owned by c.ctx, recovering a panic.
func (c *Consul) goOwned(name string, f func(ctx context.Context)) {
	c.wg.Add(1)
	go func() {
		defer c.wg.Done()
		defer func() {
			if r := recover(); r != nil {
				c.log.Error(name+" panicked", zap.Any("panic", r), zap.ByteString("stack", debug.Stack()))
			}
		}()
		f(c.ctx)
	}()
}

// fetchTimeout bounds one fetch of a service's instances; a fetch that
// runs out fails like any other and is retried with the watch's backoff.
const fetchTimeout = 10 * time.Second

// worker fetches services for the watches until ctx is done: the pool of
// workers bounds the fetches in flight, whatever the number of watches.
//
// The worker also handles the answer (healthWatch.handle), while the
// watch's goroutine waits for it: that goroutine then only ever parks, so
// its stack stays at its smallest. Decoding, publishing and logging an
// answer on it grew each to 8 KiB, 40 MiB at 5,000 watches.
func (c *Consul) worker(ctx context.Context) {
	for {
		select {
		case <-ctx.Done():
			return
		case j := <-c.jobs:
			var retry time.Duration
			if j.ctx.Err() == nil {
				// Not a blocking query: bound it, so that an agent that
				// never answers cannot hold one of the few workers.
				var r fetchResult
				fctx, cancel := context.WithTimeout(j.ctx, fetchTimeout)
				q := j.h.d.query()
				r.entries, r.meta, r.err = c.health.Service(j.h.service, "", true, q.WithContext(fctx))
				cancel()
				if j.ctx.Err() == nil {
					retry = c.handle(j.h, r)
				}
			}
			// The reply is buffered and each watch has one fetch in
			// flight at most, whose fetch waits for this reply even once
			// its context ended: the sink is never called after Watch
			// returned.
			j.h.reply <- retry
		}
	}
}

// handle runs h.handle(r) for h's goroutine, which waits for it. A panic
// there is a failed fetch (the sink is told, so the set ages and goes
// stale as on any failure), logged with its stack the first time, and the
// service fetched again after the backoff, to be published whatever it
// holds (the sink may have missed the last set); the worker carries on.
func (c *Consul) handle(h *healthWatch, r fetchResult) (retry time.Duration) {
	defer func() {
		if v := recover(); v != nil {
			if h.failures == 0 {
				h.logger().Error("handling an answer panicked", zap.Any("panic", v), zap.ByteString("stack", debug.Stack()))
			}
			h.cur = nil
			retry = h.fail(fmt.Errorf("handling the answer panicked: %v", v), true)
		}
	}()
	return h.handle(r)
}

// stateFailure is the last failure of the state watch, nil while it answers.
func (d *dcWatch) stateFailure() error {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.stateErr
}

// kickAll asks every watch to fetch again (or, while the state watch fails,
// to mark its set stale).
func (d *dcWatch) kickAll() {
	d.mu.Lock()
	defer d.mu.Unlock()
	for _, set := range d.watchers {
		for h := range set {
			h.Kick()
		}
	}
}

// kick asks the watches of the given lower-case service names to fetch
// again, and those of every service on the given nodes, and, if dark is
// set, those of every service with an instance without checks.
func (d *dcWatch) kick(services map[string]struct{}, nodes map[string]struct{}, dark bool) {
	if len(services) == 0 && len(nodes) == 0 && !dark {
		return
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	for key, set := range d.watchers {
		_, changed := services[key]
		for h := range set {
			if changed || (dark && h.dark.Load()) || onNodes(h.nodes, nodes) {
				h.Kick()
			}
		}
	}
}

func onNodes(hn []string, nodes map[string]struct{}) bool {
	if len(nodes) == 0 {
		return false
	}
	for _, n := range hn {
		if _, ok := nodes[n]; ok {
			return true
		}
	}
	return false
}

// stateDigest sums, order-independently, what passing depends on in the
// health state: per service, each of its checks' node, check ID, service ID
// and status, and its tags; per node, the status of the node's own checks.
// Outputs and indexes are left out, so a check whose output alone moved
// fetches nothing.
type stateDigest struct {
	services map[string]uint64 // by lower-case service name
	nodes    map[string]uint64
}

func digestState(checks []stateCheck) stateDigest {
	d := stateDigest{services: make(map[string]uint64), nodes: make(map[string]uint64)}
	h := fnv.New64a()
	for i := range checks {
		ch := &checks[i]
		h.Reset()
		for _, s := range []string{ch.Node, ch.CheckID, ch.ServiceID, ch.Status} {
			h.Write([]byte(s))
			h.Write([]byte{0})
		}
		for _, tag := range ch.ServiceTags {
			h.Write([]byte(tag))
			h.Write([]byte{1})
		}
		if ch.ServiceName == "" {
			d.nodes[ch.Node] += h.Sum64()
		} else {
			d.services[strings.ToLower(ch.ServiceName)] += h.Sum64()
		}
	}
	return d
}

// changedKeys returns the keys whose value differs between a and b, or that
// only one has.
func changedKeys(a, b map[string]uint64) map[string]struct{} {
	out := make(map[string]struct{})
	for k, v := range a {
		if w, ok := b[k]; !ok || w != v {
			out[k] = struct{}{}
		}
	}
	for k := range b {
		if _, ok := a[k]; !ok {
			out[k] = struct{}{}
		}
	}
	return out
}

// watchState follows the health of every check in the datacenter with one
// blocking query, and asks the watches of the services whose checks changed
// (or whose nodes' checks changed) to fetch again. While it fails, every
// watch is told so and serves its last set, stale; when it answers again,
// every watch fetches again.
func (d *dcWatch) watchState(ctx context.Context) {
	var (
		idx       blockingIndex
		back      = newRetryBackoff(d.c.opts.BackoffMin, d.c.opts.BackoffMax)
		failures  int
		prev      *stateDigest
		aclLogged bool
	)
	for {
		q := d.query()
		q.WaitIndex, q.WaitTime = idx.wait, d.c.opts.WaitTime
		checks, meta, err := healthState(d.c.health, q.WithContext(ctx))
		if ctx.Err() != nil {
			return
		}
		if err != nil {
			err = fmt.Errorf("query health state: %w", err)
			idx.failed()
			failures++
			if failures == 1 || failures%logEvery == 0 {
				d.log.Warn("consul query failed", zap.Error(err), zap.Int("attempt", failures))
			}
			d.mu.Lock()
			first := d.stateErr == nil
			d.stateErr = err
			d.mu.Unlock()
			if first {
				d.kickAll()
			}
			d.stateOnce.Do(func() { close(d.stateReady) }) // the first fetches go ahead
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
			d.mu.Lock()
			d.stateErr = nil
			d.mu.Unlock()
		}
		var index uint64
		if meta != nil {
			index = meta.LastIndex
			if meta.ResultsFilteredByACLs && !aclLogged {
				aclLogged = true
				d.log.Warn("consul acls hide checks from the health state",
					zap.String("fix", `give the token (consul.token or CONSUL_HTTP_TOKEN) a policy with service_prefix "" { policy = "read" } and node_prefix "" { policy = "read" }`),
					zap.String("effect", "changes of the hidden services are seen at their resync only"))
			}
		}
		changed, backwards := idx.observe(index)
		if !changed && !recovered && prev != nil {
			continue
		}
		dg := digestState(checks)
		if prev == nil && !recovered {
			// The watches' first fetches waited for this answer: what
			// changes from here on, the next answers show.
			d.stateOnce.Do(func() { close(d.stateReady) })
		} else if recovered || backwards {
			// What changed before this answer is unknown: fetch all.
			d.kickAll()
		} else {
			services, nodes := changedKeys(prev.services, dg.services), changedKeys(prev.nodes, dg.nodes)
			if len(nodes) > 0 {
				// Services with checks on those nodes: when a node
				// recovers, the last passing answer did not list it.
				for i := range checks {
					ch := &checks[i]
					if ch.ServiceName == "" {
						continue
					}
					if _, ok := nodes[ch.Node]; ok {
						services[strings.ToLower(ch.ServiceName)] = struct{}{}
					}
				}
			}
			d.kick(services, nodes, false)
		}
		prev = &dg
	}
}
