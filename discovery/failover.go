package discovery

import (
	"context"
	"net/url"
	"runtime/debug"
	"strings"
	"sync"
	"time"

	"go.uber.org/zap"
)

// FailoverKey is the watch key of service in datacenter dc (empty: the
// default one) that fails over to the datacenters in failover, in order,
// while dc has no healthy instance carrying every tag in tags: the watch
// serves the set of the first datacenter that has one, and returns to dc as
// soon as dc has one again, as Consul's prepared queries and
// service-resolver failover do. With no failover it is Key(service, dc).
// The key reads "service@dc|dc2|dc3#tag", tags path-escaped.
func FailoverKey(service, dc string, failover, tags []string) string {
	k := Key(service, dc)
	if len(failover) == 0 {
		return k
	}
	var b strings.Builder
	b.WriteString(k)
	for _, f := range failover {
		b.WriteByte('|')
		b.WriteString(f)
	}
	for _, t := range tags {
		b.WriteByte('#')
		b.WriteString(url.PathEscape(t))
	}
	return b.String()
}

// parseKey splits a key made by Key or FailoverKey.
func parseKey(key string) (service, dc string, failover, tags []string) {
	rest, tagPart, hasTags := strings.Cut(key, "#")
	if hasTags {
		for _, t := range strings.Split(tagPart, "#") {
			if u, err := url.PathUnescape(t); err == nil {
				t = u
			}
			tags = append(tags, t)
		}
	}
	parts := strings.Split(rest, "|")
	service, dc, _ = strings.Cut(parts[0], "@")
	return service, dc, parts[1:], tags
}

// watchFailover follows service in dc and in each failover datacenter, one
// health watch each (they share the datacenters' blocking queries and the
// worker pool), and publishes to sink the set of the first datacenter with
// a healthy instance carrying tags, or dc's when none has one. It blocks
// until ctx is done.
func (c *Consul) watchFailover(ctx context.Context, key, service, dc string, others, tags []string, sink Sink) {
	f := c.newFailover(ctx, key, dc, others, tags, sink)
	var wg sync.WaitGroup
	for i, name := range append([]string{dc}, others...) {
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer func() {
				if r := recover(); r != nil {
					f.log.Error("failover watch panicked", zap.String("datacenter", f.names[i]),
						zap.Any("panic", r), zap.ByteString("stack", debug.Stack()))
				}
			}()
			c.watchDC(ctx, Key(service, name), service, name, dcSink{f, i})
		}()
	}
	wg.Wait()
}

// newFailover returns the failover of the watch key, feeding sink.
func (c *Consul) newFailover(ctx context.Context, key, dc string, others, tags []string, sink Sink) *failover {
	names := append([]string{dc}, others...)
	f := &failover{
		out:     sink,
		key:     key,
		tags:    tags,
		names:   names,
		snaps:   make([]*Snapshot, len(names)),
		failed:  make([]bool, len(names)),
		serving: -1,
		log:     c.log.With(zap.String("service", key)),
	}
	if dc == "" {
		f.names[0] = c.opts.Datacenter
		if f.names[0] == "" {
			f.names[0], _ = c.localDatacenter(ctx)
		}
		if f.names[0] == "" {
			f.names[0] = "local"
		}
	}
	return f
}

// failover merges the health watches of one service in several datacenters
// into one Sink. Its methods are called by those watches' goroutines, and
// serialise on mu, so the Sink it feeds sees one call at a time.
type failover struct {
	key   string
	tags  []string
	names []string // names[0] is the primary datacenter
	log   *zap.Logger

	mu      sync.Mutex
	out     Sink
	snaps   []*Snapshot // last snapshot of each datacenter, nil before its first
	failed  []bool      // whether its last query failed
	serving int         // index of the datacenter served, -1 before the first publish
	from    *Snapshot   // the snapshot of names[serving] last published
}

// healthy reports whether s has an instance carrying every tag in f.tags.
func (f *failover) healthy(s *Snapshot) bool {
	for i := range s.Endpoints {
		if s.Endpoints[i].HasTags(f.tags) {
			return true
		}
	}
	return false
}

// choose publishes the set of the datacenter that should serve, when it
// differs from the last one published. f.mu must be held.
func (f *failover) choose() {
	pick := -1
	for i, s := range f.snaps {
		if s == nil {
			if f.failed[i] || f.serving >= 0 {
				continue // unreachable, or not yet answering after a restart
			}
			return // wait for it: it may have healthy instances
		}
		if f.healthy(s) {
			pick = i
			break
		}
	}
	if pick < 0 {
		// None has a healthy instance: serve the primary's (empty) set, or
		// the first set there is if the primary never answered.
		for i, s := range f.snaps {
			if s != nil {
				pick = i
				break
			}
		}
		if pick < 0 {
			return
		}
	}
	s := f.snaps[pick]
	if pick == f.serving && s == f.from {
		return
	}
	if pick != f.serving && f.serving >= 0 {
		f.log.Info("datacenter failover", zap.String("from", f.names[f.serving]),
			zap.String("datacenter", f.names[pick]), zap.Int("endpoints", len(s.Endpoints)))
	}
	cp := *s
	cp.Service = f.key
	cp.Datacenter = f.names[pick]
	f.serving, f.from = pick, s
	f.out.Publish(&cp)
}

// dcSink is the Sink of one datacenter's health watch in a failover.
type dcSink struct {
	f *failover
	i int
}

func (d dcSink) Publish(s *Snapshot) {
	f := d.f
	f.mu.Lock()
	defer f.mu.Unlock()
	f.snaps[d.i], f.failed[d.i] = s, false
	f.choose()
}

func (d dcSink) Confirm(t time.Time) {
	f := d.f
	f.mu.Lock()
	defer f.mu.Unlock()
	f.failed[d.i] = false
	if d.i == max(f.serving, 0) {
		f.out.Confirm(t)
	}
}

func (d dcSink) Fail(err error) {
	f := d.f
	f.mu.Lock()
	defer f.mu.Unlock()
	f.failed[d.i] = true
	if d.i == max(f.serving, 0) {
		f.out.Fail(err)
	}
	f.choose()
}

func (d dcSink) ACL(err error) {
	f := d.f
	f.mu.Lock()
	defer f.mu.Unlock()
	if d.i == max(f.serving, 0) {
		f.out.ACL(err)
	}
}
