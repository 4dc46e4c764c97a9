package discovery

import (
	"context"
	"fmt"
	"runtime/debug"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hashicorp/golang-lru/v2/simplelru"
	"go.uber.org/zap"
)

// CacheOptions tune a Cache. The zero value is usable.
type CacheOptions struct {
	// Size bounds how many unpinned services are watched at once; past it
	// the least recently used watch stops. If zero, 1024 is used.
	Size int
	// IdleTimeout stops the watch of an unpinned service not looked up for
	// that long; if zero, 10m is used.
	IdleTimeout time.Duration
	// ResolveTimeout bounds how long the first lookup of a service waits for
	// its first answer; if zero, 2s is used.
	ResolveTimeout time.Duration
	// Now is the clock for idle eviction and ages; if nil, time.Now is used.
	Now func() time.Time
}

func (o CacheOptions) withDefaults() CacheOptions {
	if o.Size <= 0 {
		o.Size = 1024
	}
	if o.IdleTimeout <= 0 {
		o.IdleTimeout = 10 * time.Minute
	}
	if o.ResolveTimeout <= 0 {
		o.ResolveTimeout = 2 * time.Second
	}
	if o.Now == nil {
		o.Now = time.Now
	}
	return o
}

// touchEvery is how far a watch's last-used stamp must move before a lookup
// records it again and refreshes the LRU order, which keeps the LRU lock and
// shared writes off the request path.
const touchEvery = time.Second

// tickEvery is how often the janitor refreshes the cache's coarse clock,
// which lookups read instead of the time (a clock read costs more than the
// rest of a lookup on some virtual machines).
const tickEvery = touchEvery / 4

// Cache keeps one watch per service, shared by every caller, started on a
// service's first lookup and stopped when evicted: by size (least recently
// used first) or after IdleTimeout without a lookup. Pinned services are
// never evicted. Safe for concurrent use.
//
// The watch key is the service name; a per-upstream datacenter would make it
// "name@dc" without changing the API.
type Cache struct {
	backend Backend
	opts    CacheOptions
	log     *zap.Logger
	epoch   time.Time // origin of the watches' last-used stamps
	// clock is opts.Now() as an offset from epoch, refreshed every
	// tickEvery and on every slow path.
	clock atomic.Int64

	ctx       context.Context // owns every watch and the janitor
	cancel    context.CancelFunc
	wg        sync.WaitGroup
	closeOnce sync.Once

	// index maps a service to its *Watch; the request path reads it
	// without a lock. Writes happen under mu.
	index sync.Map

	// aclBlocked counts the answers the registry's ACLs filtered or denied.
	aclBlocked atomic.Int64

	mu     sync.Mutex
	lru    *simplelru.LRU[string, *Watch] // unpinned watches
	pinned map[string]struct{}
	closed bool

	// resolveTimeout is opts.ResolveTimeout, which Tune changes (opts.Size
	// and IdleTimeout change under mu); retune tells the janitor the idle
	// timeout changed.
	resolveTimeout atomic.Int64
	retune         chan struct{}
}

// NewCache returns a cache of watches of b's services, and starts its idle
// janitor. The cache owns b: Close closes it.
func NewCache(b Backend, opts CacheOptions, log *zap.Logger) *Cache {
	opts = opts.withDefaults()
	l, err := simplelru.NewLRU[string, *Watch](opts.Size, nil)
	if err != nil {
		panic(err) // only for a size below 1, which withDefaults rules out
	}
	ctx, cancel := context.WithCancel(context.Background())
	c := &Cache{
		backend: b,
		opts:    opts,
		log:     log.Named("discovery"),
		epoch:   opts.Now(),
		ctx:     ctx,
		cancel:  cancel,
		lru:     l,
		pinned:  make(map[string]struct{}),
		retune:  make(chan struct{}, 1),
	}
	c.resolveTimeout.Store(int64(opts.ResolveTimeout))
	c.wg.Add(1)
	go c.janitor()
	return c
}

// Watch returns the watch of service once it has a snapshot. The first
// lookup of a service starts its watch and waits for the first answer, at
// most ResolveTimeout and while ctx lasts; concurrent first lookups share
// it. On timeout the error wraps ErrResolveTimeout, and the watch keeps
// trying in the background. Once a service is watched, Watch takes no lock
// and allocates nothing: it is meant to be called on every request.
func (c *Cache) Watch(ctx context.Context, service string) (*Watch, error) {
	if v, ok := c.index.Load(service); ok {
		w := v.(*Watch)
		if w.snap.Load() != nil {
			c.touch(w)
			return w, nil
		}
	}
	return c.resolve(ctx, service)
}

// touch records a lookup of w, at most once per touchEvery.
func (c *Cache) touch(w *Watch) {
	now := c.clock.Load()
	if now-w.lastUsed.Load() < int64(touchEvery) {
		return
	}
	w.lastUsed.Store(now)
	if w.pinned.Load() {
		return
	}
	c.mu.Lock()
	if cur, ok := c.lru.Peek(w.service); ok && cur == w {
		c.lru.Get(w.service) // refresh recency
	}
	c.mu.Unlock()
}

// resolve is the slow path of Watch: start the watch if needed and wait for
// its first snapshot.
func (c *Cache) resolve(ctx context.Context, service string) (*Watch, error) {
	c.mu.Lock()
	w, err := c.watchLocked(service)
	c.mu.Unlock()
	if err != nil {
		return nil, err
	}
	if w.snap.Load() == nil {
		t := time.NewTimer(time.Duration(c.resolveTimeout.Load()))
		defer t.Stop()
		select {
		case <-w.ready:
		case <-w.stopped:
			if w.snap.Load() == nil {
				if c.ctx.Err() != nil {
					return nil, fmt.Errorf("resolve %q: %w", service, ErrClosed)
				}
				return nil, fmt.Errorf("resolve %q: %w", service, ErrWatchStopped)
			}
		case <-ctx.Done():
			return nil, fmt.Errorf("resolve %q: %w", service, ctx.Err())
		case <-t.C:
			if err := w.Err(); err != nil {
				return nil, fmt.Errorf("resolve %q: %w: %w", service, ErrResolveTimeout, err)
			}
			return nil, fmt.Errorf("resolve %q: %w", service, ErrResolveTimeout)
		}
	}
	c.tick()
	c.touch(w)
	return w, nil
}

// tick refreshes the coarse clock and returns it.
func (c *Cache) tick() int64 {
	now := int64(c.opts.Now().Sub(c.epoch))
	c.clock.Store(now)
	return now
}

// watchLocked returns the watch of service, starting it if there is none.
// c.mu must be held.
func (c *Cache) watchLocked(service string) (*Watch, error) {
	if c.closed {
		return nil, fmt.Errorf("watch %q: %w", service, ErrClosed)
	}
	if v, ok := c.index.Load(service); ok {
		return v.(*Watch), nil
	}
	ctx, cancel := context.WithCancel(c.ctx)
	w := newWatch(c, service, cancel)
	w.lastUsed.Store(c.tick())
	if _, ok := c.pinned[service]; ok {
		w.pinned.Store(true)
	} else {
		if c.lru.Len() >= c.opts.Size {
			if _, old, ok := c.lru.RemoveOldest(); ok {
				c.stopLocked(old, "evicted")
			}
		}
		c.lru.Add(service, w)
	}
	c.index.Store(service, w)
	c.wg.Add(1)
	go c.run(ctx, w)
	return w, nil
}

// stopLocked stops w and drops it from the index; the caller has dropped it
// from the LRU. c.mu must be held.
func (c *Cache) stopLocked(w *Watch, why string) {
	c.index.CompareAndDelete(w.service, w)
	w.cancel()
	c.log.Debug("watch stopped", zap.String("service", w.service), zap.String("reason", why))
}

// run is a watch's goroutine.
func (c *Cache) run(ctx context.Context, w *Watch) {
	defer c.wg.Done()
	defer close(w.stopped)
	defer func() {
		if r := recover(); r != nil {
			c.log.Error("watch panicked", zap.String("service", w.service),
				zap.Any("panic", r), zap.ByteString("stack", debug.Stack()))
		}
		// However it ended, forget w so that the next lookup starts afresh.
		c.mu.Lock()
		if cur, ok := c.lru.Peek(w.service); ok && cur == w {
			c.lru.Remove(w.service)
		}
		c.index.CompareAndDelete(w.service, w)
		c.mu.Unlock()
		w.cancel()
	}()
	c.log.Debug("watch started", zap.String("service", w.service))
	c.backend.Watch(ctx, w.service, sink{w})
}

// Known reports whether service is a registered service, as the backend
// says. See Consul.Known for its cost.
func (c *Cache) Known(ctx context.Context, service string) (bool, error) {
	if c.ctx.Err() != nil {
		return false, fmt.Errorf("known %q: %w", service, ErrClosed)
	}
	return c.backend.Known(ctx, service)
}

// Pin exempts service from eviction, by size or idleness, and starts its
// watch if it has none, without waiting for the first answer. Use it for the
// services named in configuration. It does not block.
func (c *Cache) Pin(service string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed {
		return
	}
	c.pinned[service] = struct{}{}
	if v, ok := c.index.Load(service); ok {
		w := v.(*Watch)
		w.pinned.Store(true)
		c.lru.Remove(service)
		return
	}
	_, _ = c.watchLocked(service) // fails only when closed, ruled out above
}

// Pinned reports whether service is pinned. It takes the cache's lock.
func (c *Cache) Pinned(service string) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	_, ok := c.pinned[service]
	return ok
}

// Unpin undoes Pin: the watch of service, if any, goes back to the LRU,
// to be evicted by size or idleness like one started by a lookup (the
// forward proxy may still use it). It does not block.
func (c *Cache) Unpin(service string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if _, ok := c.pinned[service]; !ok || c.closed {
		return
	}
	delete(c.pinned, service)
	v, ok := c.index.Load(service)
	if !ok {
		return
	}
	w := v.(*Watch)
	w.pinned.Store(false)
	if c.lru.Len() >= c.opts.Size {
		if _, old, ok := c.lru.RemoveOldest(); ok {
			c.stopLocked(old, "evicted")
		}
	}
	c.lru.Add(service, w)
}

// janitor keeps the coarse clock and stops idle watches until the cache
// closes.
func (c *Cache) janitor() {
	defer c.wg.Done()
	defer func() {
		if r := recover(); r != nil {
			c.log.Error("janitor panicked", zap.Any("panic", r), zap.ByteString("stack", debug.Stack()))
		}
	}()
	clock := time.NewTicker(tickEvery)
	defer clock.Stop()
	sweep := time.NewTicker(c.sweepEvery())
	defer sweep.Stop()
	for {
		select {
		case <-c.ctx.Done():
			return
		case <-clock.C:
			c.tick()
		case <-sweep.C:
			c.sweep()
		case <-c.retune:
			sweep.Reset(c.sweepEvery())
			c.sweep()
		}
	}
}

// sweepEvery is how often the janitor sweeps: a quarter of the idle
// timeout, at least a second.
func (c *Cache) sweepEvery() time.Duration {
	c.mu.Lock()
	defer c.mu.Unlock()
	return max(c.opts.IdleTimeout/4, time.Second)
}

// Tune changes Size, IdleTimeout and ResolveTimeout of a running cache
// (zero values select the defaults, as in CacheOptions): past a smaller
// size the least recently used watches stop at once, and idle watches are
// swept under the new timeout at once. It does not block on lookups and is
// safe for concurrent use.
func (c *Cache) Tune(opts CacheOptions) {
	opts.Now = c.opts.Now
	opts = opts.withDefaults()
	c.resolveTimeout.Store(int64(opts.ResolveTimeout))
	c.mu.Lock()
	c.opts.Size, c.opts.IdleTimeout, c.opts.ResolveTimeout = opts.Size, opts.IdleTimeout, opts.ResolveTimeout
	for c.lru.Len() > opts.Size {
		if _, old, ok := c.lru.RemoveOldest(); ok {
			c.stopLocked(old, "evicted")
		}
	}
	c.lru.Resize(opts.Size)
	c.mu.Unlock()
	select {
	case c.retune <- struct{}{}:
	default:
	}
}

// sweep stops every unpinned watch not looked up for IdleTimeout.
func (c *Cache) sweep() {
	now := c.tick()
	c.mu.Lock()
	defer c.mu.Unlock()
	for _, service := range c.lru.Keys() {
		w, _ := c.lru.Peek(service)
		if now-w.lastUsed.Load() >= int64(c.opts.IdleTimeout) {
			c.lru.Remove(service)
			c.stopLocked(w, "idle")
		}
	}
}

// WatchStatus describes one watched service for /status.
type WatchStatus struct {
	Service string `json:"service"`
	// Endpoints counts the instances in the current set.
	Endpoints int `json:"endpoints"`
	// Pending is true until the first answer.
	Pending bool `json:"pending,omitempty"`
	// Updated is when the current set was delivered.
	Updated time.Time `json:"updated"`
	// Confirmed is when the backend last answered; see Watch.Confirmed.
	Confirmed time.Time `json:"confirmed"`
	// Age is how long the set has gone unconfirmed; see Watch.Age.
	Age        time.Duration `json:"-"`
	AgeSeconds float64       `json:"age_seconds"`
	Stale      bool          `json:"stale"`
	// Error is the backend's last error, if it is failing.
	Error string `json:"error,omitempty"`
	// ACL says what the registry's ACLs hid at the last answer (filtered
	// instances or a denied query) and the fix, if they did.
	ACL      string    `json:"acl,omitempty"`
	Pinned   bool      `json:"pinned"`
	LastUsed time.Time `json:"last_used"`
	// Datacenter is the datacenter serving the set of a watch with
	// failover (see FailoverKey); empty for other watches.
	Datacenter string `json:"datacenter,omitempty"`
}

// Snapshots describes every watched service, sorted by service. It takes no
// lock.
func (c *Cache) Snapshots() []WatchStatus {
	var out []WatchStatus
	c.index.Range(func(_, v any) bool {
		w := v.(*Watch)
		st := WatchStatus{
			Service:   w.service,
			Confirmed: w.Confirmed(),
			Age:       w.Age(),
			Pinned:    w.pinned.Load(),
			LastUsed:  c.epoch.Add(time.Duration(w.lastUsed.Load())),
		}
		st.AgeSeconds = st.Age.Seconds()
		if s := w.Snapshot(); s != nil {
			st.Endpoints = len(s.Endpoints)
			st.Updated = s.Updated
			st.Stale = s.Stale
			st.Datacenter = s.Datacenter
		} else {
			st.Pending = true
		}
		if err := w.Err(); err != nil {
			st.Error = err.Error()
		}
		if err := w.ACL(); err != nil {
			st.ACL = err.Error()
		}
		out = append(out, st)
		return true
	})
	slices.SortFunc(out, func(a, b WatchStatus) int { return strings.Compare(a.Service, b.Service) })
	return out
}

// Close stops every watch and the backend, and waits for their goroutines.
// Watches already handed out keep their last snapshot, with Stopped closed.
// Later lookups fail with ErrClosed.
func (c *Cache) Close() {
	c.closeOnce.Do(func() {
		c.mu.Lock()
		c.closed = true
		c.mu.Unlock()
		c.cancel()
		c.wg.Wait()
		c.backend.Close()
	})
}
