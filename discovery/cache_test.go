package discovery

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/sidecarlb/sidecar/internal/leakcheck"

	"go.uber.org/zap"
	"go.uber.org/zap/zaptest"
)

func newTestCache(t *testing.T, b Backend, opts CacheOptions) *Cache {
	t.Helper()
	c := NewCache(b, opts, zaptest.NewLogger(t))
	t.Cleanup(c.Close)
	return c
}

// consulCache is a cache over a fake Consul.
func consulCache(t *testing.T, opts CacheOptions) (*Cache, *fakeConsul) {
	t.Helper()
	f := newFakeConsul()
	b := NewConsul(f, f, ConsulOptions{BackoffMin: 5 * time.Millisecond, BackoffMax: 20 * time.Millisecond},
		zaptest.NewLogger(t))
	return newTestCache(t, b, opts), f
}

func stopped(w *Watch) bool {
	select {
	case <-w.Stopped():
		return true
	default:
		return false
	}
}

func TestCacheWatchFollowsBackend(t *testing.T) {
	leakcheck.Check(t)
	c, f := consulCache(t, CacheOptions{})
	f.set(10, "web", node("a", 1))
	w, err := c.Watch(context.Background(), "web")
	if err != nil {
		t.Fatal(err)
	}
	if got := ids(w.Snapshot()); !slices.Equal(got, []string{"a"}) {
		t.Fatalf("IDs = %v, want [a]", got)
	}
	if w.Confirmed().IsZero() || w.Age() != 0 || w.Err() != nil {
		t.Errorf("Confirmed() = %v, Age() = %v, Err() = %v; want confirmed, fresh", w.Confirmed(), w.Age(), w.Err())
	}
	f.set(11, "web", node("a", 1), node("b", 2))
	waitUntil(t, "the new set", func() bool { return len(w.Snapshot().Endpoints) == 2 })
	w2, err := c.Watch(context.Background(), "web")
	if err != nil || w2 != w {
		t.Errorf("Watch() again = %p, %v; want the same watch %p", w2, err, w)
	}
}

func TestCacheOneQueryPerService(t *testing.T) {
	leakcheck.Check(t)
	c, f := consulCache(t, CacheOptions{})
	f.set(10, "web", node("a", 1))
	f.set(10, "api", node("x", 2))
	ctx := context.Background()

	var wg sync.WaitGroup
	watches := make([]*Watch, 64)
	start := make(chan struct{})
	for i := range watches {
		wg.Go(func() {
			<-start
			service := []string{"web", "api"}[i%2]
			for range 200 {
				w, err := c.Watch(ctx, service)
				if err != nil {
					t.Errorf("Watch(%s) error = %v", service, err)
					return
				}
				if s := w.Snapshot(); s == nil || len(s.Endpoints) == 0 {
					t.Errorf("Watch(%s).Snapshot() = %+v, want an endpoint", service, s)
					return
				}
				watches[i] = w
			}
		})
	}
	close(start) // concurrent first lookups
	for i := range 5 {
		f.set(uint64(11+i), "web", node("a", 1), node(fmt.Sprint("b", i), 2))
		time.Sleep(time.Millisecond)
	}
	wg.Wait()

	for i, w := range watches {
		if w != watches[i%2] {
			t.Fatalf("caller %d got watch %p, want the shared %p", i, w, watches[i%2])
		}
	}
	for _, service := range []string{"web", "api"} {
		if n := f.maxInFlight(service); n != 1 {
			t.Errorf("%d queries for %s in flight at once, want 1", n, service)
		}
		// The first answer, one per change, and the parked query.
		if n := f.callCount(service); n > 10 {
			t.Errorf("%d queries for %s, want one per change", n, service)
		}
	}
}

func TestCacheResolveTimeout(t *testing.T) {
	leakcheck.Check(t)
	c, f := consulCache(t, CacheOptions{ResolveTimeout: 30 * time.Millisecond})
	f.setErr(errDown)
	_, err := c.Watch(context.Background(), "web")
	if !errors.Is(err, ErrResolveTimeout) || !errors.Is(err, errDown) {
		t.Fatalf("Watch() error = %v, want %v wrapping %v", err, ErrResolveTimeout, errDown)
	}
	if st := c.Snapshots(); len(st) != 1 || !st[0].Pending || st[0].Error == "" {
		t.Errorf("Snapshots() = %+v, want web pending with an error", st)
	}

	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if _, err := c.Watch(ctx, "web"); !errors.Is(err, context.Canceled) {
		t.Errorf("Watch(cancelled) error = %v, want %v", err, context.Canceled)
	}

	// The watch kept trying; a later lookup finds the answer.
	f.set(10, "web", node("a", 1))
	f.setErr(nil)
	w, err := c.Watch(context.Background(), "web")
	for errors.Is(err, ErrResolveTimeout) {
		w, err = c.Watch(context.Background(), "web")
	}
	if err != nil || len(w.Snapshot().Endpoints) != 1 {
		t.Fatalf("Watch() = %v, %v after recovery, want [a]", w, err)
	}
	if n := f.maxInFlight("web"); n != 1 {
		t.Errorf("%d queries in flight at once, want 1", n)
	}
}

func TestCacheSizeEviction(t *testing.T) {
	leakcheck.Check(t)
	clock := newFakeClock()
	c, f := consulCache(t, CacheOptions{Size: 2, Now: clock.Now})
	for i, s := range []string{"a", "b", "c"} {
		f.set(uint64(10+i), s, node(s+"1", i))
	}
	ctx := context.Background()
	wa, _ := c.Watch(ctx, "a")
	wb, _ := c.Watch(ctx, "b")
	c.Pin("p")            // pinned watches do not count against Size
	clock.Add(touchEvery) // recency moves once a touchEvery at most
	c.tick()
	c.Watch(ctx, "a")
	wc, err := c.Watch(ctx, "c") // evicts b, the least recently used
	if err != nil {
		t.Fatal(err)
	}
	select {
	case <-wb.Stopped():
	case <-time.After(2 * time.Second):
		t.Fatal("b's watch did not stop after eviction")
	}
	if stopped(wa) || stopped(wc) {
		t.Errorf("a or c stopped; want only b")
	}
	if s := wb.Snapshot(); s == nil || len(s.Endpoints) != 1 {
		t.Errorf("evicted watch Snapshot() = %+v, want its last set", s)
	}
	// b's query was cancelled: only the others stay parked.
	waitUntil(t, "b's query to end", func() bool {
		f.mu.Lock()
		defer f.mu.Unlock()
		return f.inflight["b"] == 0
	})
	wb2, err := c.Watch(ctx, "b")
	if err != nil || wb2 == wb {
		t.Errorf("Watch(b) after eviction = %p, %v; want a new watch", wb2, err)
	}
	got := []string{}
	for _, st := range c.Snapshots() {
		got = append(got, st.Service)
	}
	if want := []string{"b", "c", "p"}; !slices.Equal(got, want) {
		t.Errorf("Snapshots() services = %v, want %v", got, want)
	}
}

func TestCacheIdleEviction(t *testing.T) {
	leakcheck.Check(t)
	clock := newFakeClock()
	c, f := consulCache(t, CacheOptions{IdleTimeout: time.Minute, Now: clock.Now})
	f.set(10, "idle", node("a", 1))
	f.set(11, "busy", node("b", 2))
	f.set(12, "pinned", node("c", 3))
	ctx := context.Background()
	idle, _ := c.Watch(ctx, "idle")
	busy, _ := c.Watch(ctx, "busy")
	c.Pin("pinned")
	pinned, err := c.Watch(ctx, "pinned")
	if err != nil {
		t.Fatal(err)
	}

	clock.Add(40 * time.Second)
	c.tick()
	c.Watch(ctx, "busy")
	c.sweep()
	if stopped(idle) || stopped(busy) {
		t.Fatal("a watch stopped before IdleTimeout")
	}
	clock.Add(30 * time.Second)
	c.sweep()
	select {
	case <-idle.Stopped():
	case <-time.After(2 * time.Second):
		t.Fatal("idle watch did not stop")
	}
	if stopped(busy) {
		t.Error("busy watch stopped 30s after its last use")
	}
	clock.Add(time.Hour)
	c.sweep()
	<-busy.Stopped()
	if stopped(pinned) {
		t.Error("pinned watch stopped")
	}
	st := c.Snapshots()
	if len(st) != 1 || st[0].Service != "pinned" || !st[0].Pinned || st[0].Endpoints != 1 {
		t.Errorf("Snapshots() = %+v, want pinned only", st)
	}
}

func TestCachePinExisting(t *testing.T) {
	clock := newFakeClock()
	c, f := consulCache(t, CacheOptions{IdleTimeout: time.Minute, Now: clock.Now})
	f.set(10, "web", node("a", 1))
	w, err := c.Watch(context.Background(), "web")
	if err != nil {
		t.Fatal(err)
	}
	c.Pin("web")
	clock.Add(time.Hour)
	c.sweep()
	if stopped(w) {
		t.Error("watch pinned after its start was evicted for idleness")
	}
}

func TestCacheStaleStatus(t *testing.T) {
	clock := newFakeClock()
	f := newFakeConsul()
	b := NewConsul(f, f, ConsulOptions{BackoffMin: 5 * time.Millisecond, BackoffMax: 20 * time.Millisecond, Now: clock.Now},
		zaptest.NewLogger(t))
	c := newTestCache(t, b, CacheOptions{Now: clock.Now})
	f.set(10, "web", node("a", 1))
	w, err := c.Watch(context.Background(), "web")
	if err != nil {
		t.Fatal(err)
	}
	fresh := w.Snapshot()
	f.setErr(errDown)
	waitUntil(t, "stale", func() bool { return w.Snapshot().Stale })
	clock.Add(90 * time.Second)
	if got := w.Age(); got != 90*time.Second {
		t.Errorf("Age() = %v, want 90s", got)
	}
	st := c.Snapshots()
	if len(st) != 1 || !st[0].Stale || st[0].AgeSeconds != 90 || st[0].Endpoints != 1 || st[0].Error == "" {
		t.Errorf("Snapshots() = %+v, want web stale for 90s with 1 endpoint and an error", st)
	}
	f.setErr(nil)
	waitUntil(t, "fresh", func() bool { return !w.Snapshot().Stale })
	if w.Age() != 0 || w.Err() != nil || w.Snapshot() == fresh {
		t.Errorf("Age() = %v, Err() = %v after recovery; want 0, nil and a new snapshot", w.Age(), w.Err())
	}
}

// panicky is a backend whose watches panic.
type panicky struct{ Static }

func (panicky) Watch(context.Context, string, Sink) { panic("boom") }

func TestCacheWatchPanicRecovers(t *testing.T) {
	leakcheck.Check(t)
	c := NewCache(&panicky{}, CacheOptions{ResolveTimeout: time.Second}, zap.NewNop())
	t.Cleanup(c.Close)
	for range 2 {
		if _, err := c.Watch(context.Background(), "web"); !errors.Is(err, ErrWatchStopped) {
			t.Errorf("Watch() error = %v, want %v", err, ErrWatchStopped)
		}
	}
}

func TestCacheClose(t *testing.T) {
	leakcheck.Check(t)
	c, f := consulCache(t, CacheOptions{})
	ctx := context.Background()
	var watches []*Watch
	for i := range 20 {
		s := fmt.Sprint("svc", i)
		f.set(uint64(10+i), s, node("a", 1))
		w, err := c.Watch(ctx, s)
		if err != nil {
			t.Fatal(err)
		}
		watches = append(watches, w)
	}
	c.Pin("pinned")
	// The catalog watch started with the first watch: it follows the sets.
	waitUntil(t, "svc19 known", func() bool { ok, err := c.Known(ctx, "svc19"); return ok && err == nil })
	c.Close()
	for _, w := range watches {
		if !stopped(w) || w.Snapshot() == nil {
			t.Fatalf("watch of %s: stopped %v, snapshot %v; want stopped with its last set", w.Service(), stopped(w), w.Snapshot())
		}
	}
	if _, err := c.Watch(ctx, "svc1"); err == nil {
		// The index may still hold a stopped watch only until its goroutine
		// forgot it, which Close waited for.
		t.Errorf("Watch() after Close succeeded")
	}
	if _, err := c.Watch(ctx, "new"); !errors.Is(err, ErrClosed) {
		t.Errorf("Watch(new) after Close error = %v, want %v", err, ErrClosed)
	}
	if _, err := c.Known(ctx, "svc1"); !errors.Is(err, ErrClosed) {
		t.Errorf("Known() after Close error = %v, want %v", err, ErrClosed)
	}
	c.Close() // twice is fine
}

func TestCacheStatic(t *testing.T) {
	leakcheck.Check(t)
	s, err := NewStatic(map[string][]string{"web": {"10.0.0.2:80", "10.0.0.1:80"}, "empty": {}, "Mixed": {"10.0.0.3:80"}})
	if err != nil {
		t.Fatal(err)
	}
	c := newTestCache(t, s, CacheOptions{})
	ctx := context.Background()
	for _, tc := range []struct {
		service string
		want    []string
	}{
		{"web", []string{"10.0.0.1:80", "10.0.0.2:80"}},
		{"WEB", []string{"10.0.0.1:80", "10.0.0.2:80"}},
		{"mixed", []string{"10.0.0.3:80"}},
	} {
		w, err := c.Watch(ctx, tc.service)
		if err != nil {
			t.Fatal(err)
		}
		if got := ids(w.Snapshot()); !slices.Equal(got, tc.want) {
			t.Errorf("Watch(%q) IDs = %v, want %v", tc.service, got, tc.want)
		}
	}
	// Service names are case-insensitive, as in Consul.
	for _, tc := range []struct {
		service string
		want    bool
	}{{"web", true}, {"Web", true}, {"empty", true}, {"mixed", true}, {"MIXED", true}, {"nope", false}, {"NOPE", false}} {
		if ok, err := c.Known(ctx, tc.service); ok != tc.want || err != nil {
			t.Errorf("Known(%q) = %v, %v, want %v", tc.service, ok, err, tc.want)
		}
	}
}

func BenchmarkCacheWatchHit(b *testing.B) {
	s, err := NewStatic(map[string][]string{"web": {"10.0.0.1:80", "10.0.0.2:80"}})
	if err != nil {
		b.Fatal(err)
	}
	c := NewCache(s, CacheOptions{}, zap.NewNop())
	defer c.Close()
	ctx := context.Background()
	if _, err := c.Watch(ctx, "web"); err != nil {
		b.Fatal(err)
	}
	b.ReportAllocs()
	b.ResetTimer()
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			w, err := c.Watch(ctx, "web")
			if err != nil || len(w.Snapshot().Endpoints) != 2 {
				b.Fatalf("Watch() = %v, %v", w, err)
			}
		}
	})
}

func TestCacheJanitor(t *testing.T) {
	leakcheck.Check(t)
	c, f := consulCache(t, CacheOptions{IdleTimeout: time.Millisecond})
	f.set(10, "web", node("a", 1))
	w, err := c.Watch(context.Background(), "web")
	if err != nil {
		t.Fatal(err)
	}
	start := c.clock.Load()
	waitUntil(t, "the coarse clock to tick", func() bool { return c.clock.Load() > start })
	select {
	case <-w.Stopped(): // the janitor's first sweep, after 1s
	case <-time.After(3 * time.Second):
		t.Fatal("idle watch not stopped by the janitor")
	}
}

// TestCacheTune: a smaller size stops the least recently used watches at
// once, a shorter idle timeout sweeps at once, and a larger size holds
// more watches afterwards.
func TestCacheTune(t *testing.T) {
	leakcheck.Check(t)
	clock := newFakeClock()
	c, f := consulCache(t, CacheOptions{Size: 3, IdleTimeout: time.Hour, Now: clock.Now})
	for i, s := range []string{"a", "b", "c", "d", "e"} {
		f.set(uint64(10+i), s, node(s+"1", i))
	}
	ctx := context.Background()
	wa, _ := c.Watch(ctx, "a")
	clock.Add(touchEvery)
	c.tick()
	wb, _ := c.Watch(ctx, "b")
	clock.Add(touchEvery)
	c.tick()
	wc, _ := c.Watch(ctx, "c")

	c.Tune(CacheOptions{Size: 2, IdleTimeout: time.Hour})
	select {
	case <-wa.Stopped():
	case <-time.After(2 * time.Second):
		t.Fatal("the least recently used watch did not stop when the size shrank")
	}
	if stopped(wb) || stopped(wc) {
		t.Fatal("b or c stopped; want only a")
	}

	clock.Add(2 * time.Minute)
	c.tick()
	c.Watch(ctx, "c")
	c.Tune(CacheOptions{Size: 4, IdleTimeout: time.Minute})
	select {
	case <-wb.Stopped():
	case <-time.After(2 * time.Second):
		t.Fatal("b, idle past the new idle timeout, did not stop")
	}
	if stopped(wc) {
		t.Error("c, just used, stopped")
	}
	wd, _ := c.Watch(ctx, "d")
	we, _ := c.Watch(ctx, "e")
	wa2, _ := c.Watch(ctx, "a")
	if stopped(wc) || stopped(wd) || stopped(we) || stopped(wa2) {
		t.Error("a watch stopped under the new size of 4")
	}
}

func TestCacheUnpin(t *testing.T) {
	leakcheck.Check(t)
	b, err := NewStatic(map[string][]string{"a": {"10.0.0.1:80"}, "b": {"10.0.0.2:80"}})
	if err != nil {
		t.Fatal(err)
	}
	c := NewCache(b, CacheOptions{Size: 1}, zaptest.NewLogger(t))
	defer c.Close()
	c.Pin("a")
	if !c.Pinned("a") {
		t.Fatalf("Pinned(a) = false after Pin")
	}
	waitUntil(t, "a answered", func() bool { s := c.Snapshots(); return len(s) == 1 && !s[0].Pending })
	c.Unpin("a")
	if c.Pinned("a") {
		t.Errorf("Pinned(a) = true after Unpin")
	}
	// Back in the LRU of size 1: a lookup of b evicts it.
	if _, err := c.Watch(context.Background(), "b"); err != nil {
		t.Fatalf("Watch(b) error = %v", err)
	}
	waitUntil(t, "a evicted", func() bool {
		s := c.Snapshots()
		return len(s) == 1 && s[0].Service == "b"
	})
	c.Unpin("never pinned") // no-op
}
