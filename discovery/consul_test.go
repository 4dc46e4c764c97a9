package discovery

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/sidecarlb/sidecar/internal/leakcheck"

	"go.uber.org/zap/zaptest"
)

var errDown = errors.New("connection refused")

func newTestConsul(t *testing.T, f *fakeConsul, opts ConsulOptions) *Consul {
	t.Helper()
	if opts.BackoffMin == 0 {
		opts.BackoffMin, opts.BackoffMax = 5*time.Millisecond, 20*time.Millisecond
	}
	c := NewConsul(f, f, opts, zaptest.NewLogger(t))
	t.Cleanup(c.Close)
	return c
}

func TestConsulSnapshotFollowsChanges(t *testing.T) {
	leakcheck.Check(t)
	f := newFakeConsul()
	c := newTestConsul(t, f, ConsulOptions{Datacenter: "dc2", WaitTime: time.Minute})
	b := node("web-b", 2)
	b.addr = "" // falls back to the node's address
	b.nodeAddr = "192.168.0.2"
	b.weight = 0 // at least 1
	a := node("web-a", 1)
	a.tags = []string{"v1"}
	a.meta = map[string]string{"zone": "a"}
	a.weight = 5
	f.set(10, "web", b, a)
	rec := runWatch(t, c, "web")

	waitUntil(t, "first snapshot", func() bool { return rec.last() != nil })
	s := rec.last()
	if got, want := ids(s), []string{"web-a", "web-b"}; !slices.Equal(got, want) {
		t.Fatalf("IDs = %v, want %v", got, want)
	}
	if s.Service != "web" || s.Stale || s.Err != nil || s.Updated.IsZero() {
		t.Errorf("Snapshot = %+v, want fresh web", s)
	}
	ea, eb := s.Endpoints[0], s.Endpoints[1]
	if ea.Addr != "10.0.0.1:8080" || ea.Weight != 5 || !slices.Equal(ea.Tags, []string{"v1"}) || ea.Meta["zone"] != "a" {
		t.Errorf("endpoint a = %+v", ea)
	}
	if eb.Address != "192.168.0.2" || eb.Addr != "192.168.0.2:8080" || eb.Weight != 1 {
		t.Errorf("endpoint b = %+v, want node address and weight 1", eb)
	}

	f.set(11, "web", b, node("web-c", 3))
	waitUntil(t, "second snapshot", func() bool { return slices.Equal(ids(rec.last()), []string{"web-b", "web-c"}) })
	if s2 := rec.last(); s2 == s || s.Endpoints[0].ID != "web-a" {
		t.Errorf("the first snapshot changed or was reused")
	}

	checkFetchOptions(t, f)
}

// checkFetchOptions checks that the fetches answer at once, in dc2, and
// that the state query blocks on the indexes 0, 10, 11.
func checkFetchOptions(t *testing.T, f *fakeConsul) {
	t.Helper()
	f.mu.Lock()
	defer f.mu.Unlock()
	for i, q := range f.queries {
		if q.Datacenter != "dc2" || q.WaitTime != 0 || q.WaitIndex != 0 || q.UseCache || q.AllowStale || !f.passingOnly[i] {
			t.Errorf("query %d: options %+v, passingOnly %v", i, q, f.passingOnly[i])
		}
	}
	if w := f.waits["state"]; len(w) < 3 || w[0] != 0 || w[1] != 10 || w[2] != 11 {
		t.Errorf("state WaitIndex sequence = %v, want 0, 10, 11, ...", w)
	}
}

func TestConsulSameIndexNoPublish(t *testing.T) {
	f := newFakeConsul()
	c := newTestConsul(t, f, ConsulOptions{})
	f.set(10, "web", node("a", 1))
	rec := runWatch(t, c, "web")
	waitUntil(t, "first snapshot", func() bool { return rec.last() != nil })

	// Data that changed without the index moving is not looked at.
	settle(t, f, 10)
	f.setQuiet("web", node("b", 2))
	calls, states := f.callCount("web"), f.callCount("state")
	f.poke()
	waitUntil(t, "a second state answer", func() bool { return f.callCount("state") >= states+1 })
	f.poke()
	waitUntil(t, "a third state answer", func() bool { return f.callCount("state") >= states+2 })
	if n := f.callCount("web") - calls; n != 0 {
		t.Errorf("%d fetches of web at the same index, want 0", n)
	}
	if n, _, _ := rec.count(); n != 1 {
		t.Errorf("published %d snapshots, want 1", n)
	}
	if got := ids(rec.last()); !slices.Equal(got, []string{"a"}) {
		t.Errorf("IDs = %v, want [a]", got)
	}
}

func TestConsulIdenticalSetNotRedelivered(t *testing.T) {
	f := newFakeConsul()
	c := newTestConsul(t, f, ConsulOptions{})
	f.set(10, "web", node("a", 1), node("b", 2))
	rec := runWatch(t, c, "web")
	waitUntil(t, "first snapshot", func() bool { return rec.last() != nil })
	first := rec.last()
	settle(t, f, 10)
	calls := f.callCount("web")

	f.set(11, "web", node("b", 2), node("a", 1)) // same set, other order
	f.set(12, "other", node("x", 9))             // index moves for another service
	waitUntil(t, "state WaitIndex 12", func() bool { return slices.Contains(f.waitIndexes("state"), 12) })
	if n, _, _ := rec.count(); n != 1 || rec.last() != first {
		t.Errorf("published %d snapshots (last %p, first %p), want the first only", n, rec.last(), first)
	}
	if n := f.callCount("web") - calls; n != 0 {
		t.Errorf("%d fetches of web for changes of its order and of another service, want 0", n)
	}

	changed := node("b", 2)
	changed.tags = []string{"canary"}
	f.set(13, "web", node("a", 1), changed)
	waitUntil(t, "a changed tag", func() bool { s := rec.last(); return len(s.Endpoints[1].Tags) == 1 })
}

func TestConsulIndexZeroIsOne(t *testing.T) {
	f := newFakeConsul()
	c := newTestConsul(t, f, ConsulOptions{})
	f.set(0, "web", node("a", 1))
	rec := runWatch(t, c, "web")
	waitUntil(t, "first snapshot", func() bool { return rec.last() != nil })
	waitUntil(t, "a blocking query", func() bool { return len(f.waitIndexes("state")) >= 2 })
	if w := f.waitIndexes("state"); w[1] != 1 {
		t.Errorf("WaitIndex after index 0 = %d, want 1", w[1])
	}
}

func TestConsulIndexBackwardsResets(t *testing.T) {
	f := newFakeConsul()
	c := newTestConsul(t, f, ConsulOptions{})
	f.set(100, "web", node("a", 1))
	rec := runWatch(t, c, "web")
	waitUntil(t, "first snapshot", func() bool { return rec.last() != nil })

	f.set(5, "web", node("a", 1), node("b", 2))
	waitUntil(t, "the new set", func() bool { return len(rec.last().Endpoints) == 2 })
	waitUntil(t, "the query after the reset", func() bool {
		w := f.waitIndexes("state")
		i := slices.Index(w, 100)
		return i >= 0 && len(w) > i+2
	})
	w := f.waitIndexes("state")
	i := slices.Index(w, 100)
	if w[i+1] != 0 || w[i+2] != 5 {
		t.Errorf("WaitIndex sequence = %v, want 100, 0, 5", w)
	}
}

func TestConsulEmptyAfterResetKeepsLastSet(t *testing.T) {
	f := newFakeConsul()
	clk := newFakeClock()
	c := newTestConsul(t, f, ConsulOptions{Now: clk.Now})
	f.set(100, "web", node("a", 1), node("b", 2))
	rec := runWatch(t, c, "web")
	waitUntil(t, "first snapshot", func() bool { return rec.last() != nil })
	good := rec.last()

	f.set(5, "web") // a restarted agent that has not re-learned its services
	waitUntil(t, "a stale snapshot", func() bool { return rec.last().Stale })
	stale := rec.last()
	if !slices.Equal(ids(stale), ids(good)) || stale.Err != nil || stale.StaleSince.IsZero() {
		t.Fatalf("Snapshot = %+v, want the last set, stale, without error", stale)
	}
	f.set(6, "web") // still empty
	waitUntil(t, "WaitIndex 6", func() bool { return slices.Contains(f.waitIndexes("state"), 6) })
	if rec.last() != stale {
		t.Errorf("a second empty answer published %+v", rec.last())
	}

	f.set(7, "web", node("c", 3))
	waitUntil(t, "the re-learned set", func() bool { return !rec.last().Stale })
	if got := ids(rec.last()); !slices.Equal(got, []string{"c"}) {
		t.Errorf("IDs = %v, want [c]", got)
	}

	// Right after it, a restarted agent may still sync checks that lapsed
	// while it was down: an empty answer keeps the set.
	relearned := rec.last()
	f.set(8, "web")
	waitUntil(t, "the re-learned set, stale", func() bool { return rec.last().Stale })
	if got := ids(rec.last()); !slices.Equal(got, ids(relearned)) {
		t.Errorf("IDs after an empty answer while settling = %v, want %v", got, ids(relearned))
	}
	f.set(9, "web", node("c", 3))
	waitUntil(t, "the set fresh again", func() bool { return !rec.last().Stale })

	// Past the reset and its settling, an emptied service is empty.
	clk.Add(resetSettle)
	f.set(10, "web")
	waitUntil(t, "the empty set", func() bool { return len(rec.last().Endpoints) == 0 })
	if s := rec.last(); s.Stale {
		t.Errorf("Snapshot = %+v, want fresh and empty", s)
	}
}

// TestConsulSettleRunsOut: an empty answer kept while settling after a
// reset is fetched again when the settling runs out, and then served.
func TestConsulSettleRunsOut(t *testing.T) {
	f := newFakeConsul()
	clk := newFakeClock()
	c := newTestConsul(t, f, ConsulOptions{Now: clk.Now})
	f.set(100, "web", node("a", 1))
	rec := runWatch(t, c, "web")
	waitUntil(t, "first snapshot", func() bool { return rec.last() != nil })
	f.set(5, "web", node("a", 1)) // index backwards: a reset
	waitUntil(t, "WaitIndex 5", func() bool { return slices.Contains(f.waitIndexes("state"), 5) })
	f.set(6, "web")
	waitUntil(t, "a stale snapshot", func() bool { return rec.last().Stale })
	clk.Add(resetSettle)
	// The retry timer runs on real time, resetSettle from the stale answer.
	deadline := time.Now().Add(resetSettle + 5*time.Second)
	for s := rec.last(); s.Stale || len(s.Endpoints) > 0; s = rec.last() {
		if time.Now().After(deadline) {
			t.Fatalf("Snapshot = %+v %v past the settling, want fresh and empty", s, ids(s))
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func TestConsulEmptyAfterResetExpires(t *testing.T) {
	f := newFakeConsul()
	c := newTestConsul(t, f, ConsulOptions{StaleFor: 50 * time.Millisecond})
	f.set(100, "web", node("a", 1))
	rec := runWatch(t, c, "web")
	waitUntil(t, "first snapshot", func() bool { return rec.last() != nil })
	f.set(5, "web")
	waitUntil(t, "a stale snapshot", func() bool { return rec.last().Stale })
	// No further answer comes; the wait time is cut to what StaleFor leaves.
	waitUntil(t, "the empty set", func() bool { s := rec.last(); return !s.Stale && len(s.Endpoints) == 0 })
}

func TestConsulEmptiedServiceClears(t *testing.T) {
	f := newFakeConsul()
	c := newTestConsul(t, f, ConsulOptions{})
	f.set(10, "web", node("a", 1))
	rec := runWatch(t, c, "web")
	waitUntil(t, "first snapshot", func() bool { return rec.last() != nil })
	f.set(11, "web")
	waitUntil(t, "the empty set", func() bool { return len(rec.last().Endpoints) == 0 })
	if s := rec.last(); s.Stale {
		t.Errorf("Snapshot = %+v, want fresh", s)
	}
}

func TestConsulErrorServesStale(t *testing.T) {
	leakcheck.Check(t)
	f := newFakeConsul()
	c := newTestConsul(t, f, ConsulOptions{BackoffMin: 10 * time.Millisecond, BackoffMax: 40 * time.Millisecond})
	f.set(10, "web", node("a", 1))
	rec := runWatch(t, c, "web")
	waitUntil(t, "first snapshot", func() bool { return rec.last() != nil })

	f.setErr(errDown)
	waitUntil(t, "a stale snapshot", func() bool { return rec.last().Stale })
	s := rec.last()
	if !slices.Equal(ids(s), []string{"a"}) || !errors.Is(s.Err, errDown) || s.StaleSince.IsZero() {
		t.Fatalf("Snapshot = %+v, want [a], stale with %v", s, errDown)
	}
	// The state query backs off: 10, 20, 40, 40... ms (±25%), not a
	// tight loop, and the service is not fetched meanwhile.
	calls, states := f.callCount("web"), f.callCount("state")
	time.Sleep(300 * time.Millisecond)
	if n := f.callCount("state") - states; n < 2 || n > 20 {
		t.Errorf("%d state queries in 300ms while failing, want 2 to 20", n)
	}
	if n := f.callCount("web") - calls; n != 0 {
		t.Errorf("%d fetches of web while the state query fails, want 0", n)
	}
	if n, _, fails := rec.count(); n != 2 || fails < 2 {
		t.Errorf("published %d snapshots with %d failures, want 2 snapshots and every failure", n, fails)
	}

	f.setErr(nil)
	waitUntil(t, "fresh again", func() bool { return !rec.last().Stale })
	if got := ids(rec.last()); !slices.Equal(got, []string{"a"}) {
		t.Errorf("IDs = %v, want [a]", got)
	}
	// The retry after a failure asked for an immediate answer.
	if w := f.waitIndexes("state"); w[len(w)-2] != 0 && w[len(w)-1] != 0 {
		t.Errorf("WaitIndex sequence = %v, want a 0 after the failures", w)
	}
	// And then blocks again: a change shows.
	f.set(11, "web", node("b", 2))
	waitUntil(t, "the change", func() bool { return slices.Equal(ids(rec.last()), []string{"b"}) })
}

func TestConsulStaleForClears(t *testing.T) {
	clock := newFakeClock()
	f := newFakeConsul()
	c := newTestConsul(t, f, ConsulOptions{StaleFor: time.Minute, Now: clock.Now})
	f.set(10, "web", node("a", 1))
	rec := runWatch(t, c, "web")
	waitUntil(t, "first snapshot", func() bool { return rec.last() != nil })

	f.setErr(errDown)
	waitUntil(t, "a stale snapshot", func() bool { return rec.last().Stale })
	clock.Add(59 * time.Second)
	_, _, fails := rec.count()
	waitUntil(t, "more failures", func() bool { _, _, n := rec.count(); return n > fails+1 })
	if s := rec.last(); len(s.Endpoints) != 1 {
		t.Fatalf("Snapshot = %+v before StaleFor ran out, want the last set", s)
	}
	clock.Add(time.Second)
	waitUntil(t, "the cleared set", func() bool { return len(rec.last().Endpoints) == 0 })
	s := rec.last()
	if !s.Stale || !errors.Is(s.Err, errDown) {
		t.Errorf("Snapshot = %+v, want empty, stale, with %v", s, errDown)
	}

	f.setErr(nil)
	waitUntil(t, "fresh again", func() bool { return !rec.last().Stale })
	if got := ids(rec.last()); !slices.Equal(got, []string{"a"}) {
		t.Errorf("IDs = %v, want [a]", got)
	}
}

func TestConsulCancelStopsQuery(t *testing.T) {
	leakcheck.Check(t)
	f := newFakeConsul()
	c := newTestConsul(t, f, ConsulOptions{WaitTime: time.Hour})
	f.set(10, "web", node("a", 1))
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	rec := &recorder{}
	go func() {
		defer close(done)
		c.Watch(ctx, "web", rec)
	}()
	waitUntil(t, "the first snapshot", func() bool { return rec.last() != nil })
	settle(t, f, 10)
	cancel()
	select {
	case <-done:
	case <-time.After(2 * time.Second):
		t.Fatal("Watch did not return after cancel")
	}
}

func TestConsulDuplicateIDsAcrossNodes(t *testing.T) {
	f := newFakeConsul()
	c := newTestConsul(t, f, ConsulOptions{})
	a, b := node("web", 1), node("web", 2)
	f.set(10, "web", a, b, node("solo", 3))
	rec := runWatch(t, c, "web")
	waitUntil(t, "first snapshot", func() bool { return rec.last() != nil })
	if got, want := ids(rec.last()), []string{"node1/web", "node2/web", "solo"}; !slices.Equal(got, want) {
		t.Errorf("IDs = %v, want %v", got, want)
	}
}

func TestConsulKnown(t *testing.T) {
	leakcheck.Check(t)
	f := newFakeConsul()
	c := newTestConsul(t, f, ConsulOptions{})
	f.set(10, "web", node("a", 1))
	ctx := context.Background()

	var wg sync.WaitGroup
	for range 20 {
		wg.Go(func() {
			if ok, err := c.Known(ctx, "web"); !ok || err != nil {
				t.Errorf("Known(web) = %v, %v, want true", ok, err)
			}
		})
	}
	wg.Wait()
	waitUntil(t, "a parked catalog query", func() bool { return f.callCount("") >= 2 })
	if n := f.maxInFlight(""); n != 1 {
		t.Errorf("%d catalog queries in flight at once, want 1", n)
	}
	if ok, err := c.Known(ctx, "nope"); ok || err != nil {
		t.Errorf("Known(nope) = %v, %v, want false", ok, err)
	}

	f.set(11, "api", node("x", 5))
	waitUntil(t, "api known", func() bool { ok, _ := c.Known(ctx, "api"); return ok })

	// Names are case-insensitive, as in Consul's own lookups.
	f.set(12, "Mixed", node("m", 6))
	waitUntil(t, "Mixed known", func() bool { ok, _ := c.Known(ctx, "Mixed"); return ok })
	for _, name := range []string{"mixed", "MIXED", "Web", "API"} {
		if ok, err := c.Known(ctx, name); !ok || err != nil {
			t.Errorf("Known(%s) = %v, %v, want true", name, ok, err)
		}
	}

	// While Consul is down, the last list answers.
	f.setErr(errDown)
	waitUntil(t, "a failed catalog query", func() bool { return c.dcs[""].knownErr.Load() != nil })
	if ok, err := c.Known(ctx, "api"); !ok || err != nil {
		t.Errorf("Known(api) while down = %v, %v, want true", ok, err)
	}
}

func TestConsulKnownTimeout(t *testing.T) {
	leakcheck.Check(t)
	f := newFakeConsul()
	f.setErr(errDown)
	c := newTestConsul(t, f, ConsulOptions{ResolveTimeout: 30 * time.Millisecond})
	_, err := c.Known(context.Background(), "web")
	if !errors.Is(err, ErrResolveTimeout) || !errors.Is(err, errDown) {
		t.Fatalf("Known() error = %v, want %v and %v", err, ErrResolveTimeout, errDown)
	}
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if _, err := c.Known(ctx, "web"); !errors.Is(err, context.Canceled) {
		t.Errorf("Known(cancelled) error = %v, want %v", err, context.Canceled)
	}

	f.setErr(nil)
	f.set(10, "web", node("a", 1))
	waitUntil(t, "web known", func() bool { ok, _ := c.Known(context.Background(), "web"); return ok })

	c.Close()
	if ok, err := c.Known(context.Background(), "web"); !ok || err != nil {
		t.Errorf("Known() after Close = %v, %v, want the last list", ok, err)
	}
}

func TestBackoff(t *testing.T) {
	b := newRetryBackoff(100*time.Millisecond, 10*time.Second)
	want := []time.Duration{100, 200, 400, 800, 1600, 3200, 6400, 10000, 10000}
	for i, w := range want {
		w *= time.Millisecond
		d := b.next()
		if d < w*3/4 || d > w*5/4 {
			t.Errorf("next() #%d = %v, want %v ±25%%", i, d, w)
		}
	}
	b.reset()
	if d := b.next(); d > 125*time.Millisecond {
		t.Errorf("next() after reset = %v, want about 100ms", d)
	}
}

func TestBlockingIndex(t *testing.T) {
	tests := []struct {
		name                    string
		last, index             uint64
		changed, backwards      bool
		wantWait, wantLastAfter uint64
	}{
		{name: "first", last: 0, index: 7, changed: true, wantWait: 7, wantLastAfter: 7},
		{name: "zero is one", last: 0, index: 0, changed: true, wantWait: 1, wantLastAfter: 1},
		{name: "same", last: 7, index: 7, wantWait: 7, wantLastAfter: 7},
		{name: "forward", last: 7, index: 9, changed: true, wantWait: 9, wantLastAfter: 9},
		{name: "backwards", last: 7, index: 3, changed: true, backwards: true, wantWait: 0, wantLastAfter: 3},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			b := blockingIndex{last: tc.last, wait: tc.last}
			changed, backwards := b.observe(tc.index)
			if changed != tc.changed || backwards != tc.backwards || b.wait != tc.wantWait || b.last != tc.wantLastAfter {
				t.Errorf("observe(%d) = %v, %v, state %+v; want %v, %v, wait %d, last %d",
					tc.index, changed, backwards, b, tc.changed, tc.backwards, tc.wantWait, tc.wantLastAfter)
			}
		})
	}
}

func TestConsulEmptyAfterOutageKeepsLastSet(t *testing.T) {
	f := newFakeConsul()
	c := newTestConsul(t, f, ConsulOptions{})
	f.set(10, "web", node("a", 1))
	rec := runWatch(t, c, "web")
	waitUntil(t, "first snapshot", func() bool { return rec.last() != nil })

	f.setErr(errDown)
	waitUntil(t, "a stale snapshot", func() bool { return rec.last().Stale })
	since := rec.last().StaleSince
	f.set(11, "web") // the agent comes back without its services, index moving on
	f.setErr(nil)
	waitUntil(t, "the error to clear", func() bool { return rec.last().Err == nil })
	s := rec.last()
	if !s.Stale || !slices.Equal(ids(s), []string{"a"}) || !s.StaleSince.Equal(since) {
		t.Fatalf("Snapshot = %+v, want [a] stale since %v", s, since)
	}
	f.set(12, "web", node("b", 2))
	waitUntil(t, "the re-learned set", func() bool { return !rec.last().Stale })
	if got := ids(rec.last()); !slices.Equal(got, []string{"b"}) {
		t.Errorf("IDs = %v, want [b]", got)
	}
}

func TestConsulKnownAfterReset(t *testing.T) {
	outage := func(t *testing.T, f *fakeConsul, c *Consul) {
		f.setErr(errDown)
		waitUntil(t, "a failed catalog query", func() bool { return c.dcs[""].knownErr.Load() != nil })
		answers := f.answerCount("")
		f.set(20, "web") // the agent comes back without its services
		f.setErr(nil)
		waitUntil(t, "an answer", func() bool { return f.answerCount("") > answers })
	}
	backwards := func(t *testing.T, f *fakeConsul, c *Consul) {
		answers := f.answerCount("")
		f.set(5, "web")
		waitUntil(t, "an answer", func() bool { return f.answerCount("") > answers })
	}
	tests := []struct {
		name     string
		staleFor time.Duration
		reset    func(*testing.T, *fakeConsul, *Consul)
	}{
		{name: "outage", reset: outage},
		{name: "index backwards", reset: backwards},
		{name: "outage past StaleFor", staleFor: 50 * time.Millisecond, reset: outage},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			f := newFakeConsul()
			c := newTestConsul(t, f, ConsulOptions{StaleFor: tc.staleFor})
			ctx := context.Background()
			f.set(10, "web", node("a", 1))
			if ok, err := c.Known(ctx, "web"); !ok || err != nil {
				t.Fatalf("Known(web) = %v, %v, want true", ok, err)
			}
			tc.reset(t, f, c)
			if ok, _ := c.Known(ctx, "web"); !ok {
				t.Fatal("Known(web) = false right after the reset, want the name kept")
			}
			if tc.staleFor > 0 {
				waitUntil(t, "web forgotten", func() bool { ok, _ := c.Known(ctx, "web"); return !ok })
				return
			}
			// Re-learned, the reset is over: a real deregistration shows.
			answers := f.answerCount("")
			f.set(30, "web", node("a", 1))
			waitUntil(t, "an answer", func() bool { return f.answerCount("") > answers })
			f.set(31, "web")
			waitUntil(t, "web deregistered", func() bool { ok, _ := c.Known(ctx, "web"); return !ok })
		})
	}
}

func TestConsulBoundedFetches(t *testing.T) {
	leakcheck.Check(t)
	f := newFakeConsul()
	f.delay = 2 * time.Millisecond
	const services = 200
	for i := range services {
		f.set(uint64(10+i), fmt.Sprint("svc", i), node(fmt.Sprint("a", i), i%250+1))
	}
	c := newTestConsul(t, f, ConsulOptions{MaxConnections: 4})
	recs := make([]*recorder, services)
	for i := range recs {
		recs[i] = runWatch(t, c, fmt.Sprint("svc", i))
	}
	waitUntil(t, "every service's first snapshot", func() bool {
		for _, r := range recs {
			if r.last() == nil {
				return false
			}
		}
		return true
	})
	settle(t, f, uint64(10+services-1))
	// A change of one service fetches that one only.
	calls := f.callCount("svc7")
	others := f.callCount("svc8")
	f.set(1000, "svc7", node("b", 9))
	waitUntil(t, "svc7 changed", func() bool { return slices.Equal(ids(recs[7].last()), []string{"b"}) })
	if n := f.callCount("svc7") - calls; n > 2 {
		t.Errorf("%d fetches of svc7 for one change, want 1 (2 if its first answer raced the state watch)", n)
	}
	if n := f.callCount("svc8") - others; n != 0 {
		t.Errorf("%d fetches of svc8 for a change of svc7, want 0", n)
	}
	total, fetches := f.peaks()
	t.Logf("at most %d queries in flight, %d of them fetches", total, fetches)
	if total > 4 || fetches > 2 {
		t.Errorf("%d queries in flight at once (%d fetches), want at most MaxConnections (4), 2 of them fetches", total, fetches)
	}
}

func TestConsulCheckLessInstanceFollowsCatalog(t *testing.T) {
	f := newFakeConsul()
	c := newTestConsul(t, f, ConsulOptions{})
	a := node("a", 1)
	a.noCheck = true
	f.set(10, "web", a)
	rec := runWatch(t, c, "web")
	waitUntil(t, "first snapshot", func() bool { return rec.last() != nil })

	// A second check-less instance moves neither the health state nor
	// the catalog's names and tags, only the catalog's index.
	b := node("b", 2)
	b.noCheck = true
	f.set(11, "web", a, b)
	waitUntil(t, "the new instance", func() bool { return slices.Equal(ids(rec.last()), []string{"a", "b"}) })
}

func TestConsulNodeCheckFetches(t *testing.T) {
	f := newFakeConsul()
	c := newTestConsul(t, f, ConsulOptions{})
	f.set(10, "web", node("a", 1), node("b", 2))
	f.set(10, "api", node("x", 3))
	web, api := runWatch(t, c, "web"), runWatch(t, c, "api")
	waitUntil(t, "first snapshots", func() bool { return web.last() != nil && api.last() != nil })
	settle(t, f, 10) // the fetches the first state and catalog answers asked for
	apiCalls := f.callCount("api")

	f.setNode(11, "node2", true)
	waitUntil(t, "b out", func() bool { return slices.Equal(ids(web.last()), []string{"a"}) })
	f.setNode(12, "node2", false)
	waitUntil(t, "b back", func() bool { return slices.Equal(ids(web.last()), []string{"a", "b"}) })
	if n := f.callCount("api") - apiCalls; n != 0 {
		t.Errorf("%d fetches of api, on another node, want 0", n)
	}
}

func TestConsulConsistency(t *testing.T) {
	for _, tc := range []struct {
		mode              Consistency
		stale, consistent bool
	}{
		{"", false, false},
		{ConsistencyDefault, false, false},
		{ConsistencyStale, true, false},
		{ConsistencyConsistent, false, true},
	} {
		t.Run(string(tc.mode), func(t *testing.T) {
			f := newFakeConsul()
			c := newTestConsul(t, f, ConsulOptions{Consistency: tc.mode})
			f.set(10, "web", node("a", 1))
			rec := runWatch(t, c, "web")
			waitUntil(t, "first snapshot", func() bool { return rec.last() != nil })
			waitUntil(t, "the catalog query", func() bool { return f.callCount("") > 0 })
			f.mu.Lock()
			defer f.mu.Unlock()
			all := slices.Concat(f.queries, f.states, f.catalogs)
			for i, q := range all {
				if q.AllowStale != tc.stale || q.RequireConsistent != tc.consistent {
					t.Errorf("query %d: AllowStale %v, RequireConsistent %v; want %v, %v",
						i, q.AllowStale, q.RequireConsistent, tc.stale, tc.consistent)
				}
			}
		})
	}
}

// settle waits until the state and catalog queries are parked at index and
// the fetches their first answers asked for have run out.
func settle(t *testing.T, f *fakeConsul, index uint64) {
	t.Helper()
	waitUntil(t, "the watches parked", func() bool {
		return slices.Contains(f.waitIndexes("state"), index) && slices.Contains(f.waitIndexes(""), index)
	})
	for prev := -1; ; time.Sleep(50 * time.Millisecond) {
		f.mu.Lock()
		n := len(f.queries)
		f.mu.Unlock()
		if n == prev {
			return
		}
		prev = n
	}
}

func TestConsulACLVisible(t *testing.T) {
	f := newFakeConsul()
	f.set(10, "web", node("a", 1))
	f.set(10, "api", node("x", 2))
	f.filtered["web"] = true
	f.denied["api"] = true
	c := newTestCache(t, NewConsul(f, f, ConsulOptions{BackoffMin: 5 * time.Millisecond, BackoffMax: 20 * time.Millisecond},
		zaptest.NewLogger(t)), CacheOptions{ResolveTimeout: 100 * time.Millisecond})
	ctx := context.Background()
	if _, err := c.Watch(ctx, "web"); err != nil {
		t.Fatal(err)
	}
	_, _ = c.Watch(ctx, "api") // denied: no first answer
	waitUntil(t, "both marked", func() bool {
		st := c.Snapshots()
		return len(st) == 2 && st[0].ACL != "" && st[1].ACL != ""
	})
	st := c.Snapshots()
	for _, tc := range []struct {
		s    WatchStatus
		want string
	}{{st[0], "denied by Consul ACLs"}, {st[1], "answer filtered by Consul ACLs"}} {
		if !strings.Contains(tc.s.ACL, tc.want) || !strings.Contains(tc.s.ACL, `service "`+tc.s.Service+`" { policy = "read" }`) {
			t.Errorf("Snapshots() %s: ACL = %q, want %q and the fix", tc.s.Service, tc.s.ACL, tc.want)
		}
	}
	if n := c.aclBlocked.Load(); n < 2 {
		t.Errorf("ACL-blocked answers counted = %d, want 2 or more", n)
	}

	// Once the token may read it, the answer is whole and the mark goes.
	f.mu.Lock()
	f.filtered["web"] = false
	f.mu.Unlock()
	f.set(11, "web", node("b", 3))
	waitUntil(t, "web whole again", func() bool { return c.Snapshots()[1].ACL == "" })
}

func TestConsulDatacenters(t *testing.T) {
	leakcheck.Check(t)
	f := newFakeConsul()
	f.set(10, "web", node("a", 1))
	c := newTestConsul(t, f, ConsulOptions{Datacenter: "dc1", Datacenters: []string{"dc2", "dc1"}})
	if c.opts.MaxConnections != 6 {
		t.Errorf("MaxConnections = %d, want 6 (raised for dc2's two blocking queries)", c.opts.MaxConnections)
	}
	local, remote := runWatch(t, c, "web"), runWatch(t, c, Key("web", "dc2"))
	waitUntil(t, "both snapshots", func() bool { return local.last() != nil && remote.last() != nil })
	waitUntil(t, "the catalog queries", func() bool { return f.callCount("") >= 2 })
	if ok, err := c.Known(context.Background(), Key("web", "dc2")); !ok || err != nil {
		t.Errorf("Known(web@dc2) = %v, %v; want true", ok, err)
	}
	if _, err := c.Known(context.Background(), Key("web", "dc3")); !errors.Is(err, ErrUnknownDatacenter) {
		t.Errorf("Known(web@dc3) error = %v, want ErrUnknownDatacenter", err)
	}
	other := runWatch(t, c, Key("web", "dc3"))
	waitUntil(t, "the failure", func() bool { _, _, n := other.count(); return n == 1 })

	f.mu.Lock()
	defer f.mu.Unlock()
	seen := map[string]int{}
	for _, q := range slices.Concat(f.queries, f.states, f.catalogs) {
		seen[q.Datacenter]++
	}
	if len(seen) != 2 || seen["dc1"] < 3 || seen["dc2"] < 3 {
		t.Errorf("queries by datacenter = %v, want fetch, state and catalog queries in dc1 and dc2 only", seen)
	}
}

func TestConsulLocalDatacenter(t *testing.T) {
	f := newFakeConsul()
	f.set(10, "web", node("a", 1))
	var mu sync.Mutex
	asked, fail := 0, true
	c := newTestConsul(t, f, ConsulOptions{Datacenters: []string{"dc2"}, LocalDatacenter: func(context.Context) (string, error) {
		mu.Lock()
		defer mu.Unlock()
		asked++
		if fail {
			return "", errDown
		}
		return "dc1", nil
	}})
	ctx := context.Background()
	if _, err := c.Known(ctx, Key("web", "dc1")); !errors.Is(err, errDown) {
		t.Errorf("Known(web@dc1) with the agent down: error = %v, want %v", err, errDown)
	}
	mu.Lock()
	fail = false
	mu.Unlock()
	for _, tc := range []struct {
		key  string
		want error
	}{{Key("web", "dc1"), nil}, {Key("web", "DC1"), nil}, {"web", nil}, {Key("web", "dc2"), nil}, {Key("web", "dc9"), ErrUnknownDatacenter}} {
		if _, err := c.Known(ctx, tc.key); !errors.Is(err, tc.want) {
			t.Errorf("Known(%s) error = %v, want %v", tc.key, err, tc.want)
		}
	}
	mu.Lock()
	defer mu.Unlock()
	if asked != 2 {
		t.Errorf("the agent was asked its datacenter %d times, want 2 (once failing, once answering)", asked)
	}
}

// TestConsulStartFetchesOnce: watches started together with the backend
// fetch their service once, not once more for the state watch's first
// answer.
func TestConsulStartFetchesOnce(t *testing.T) {
	leakcheck.Check(t)
	f := newFakeConsul()
	f.set(10, "web", node("a", 1))
	f.set(10, "api", node("b", 2))
	c := newTestConsul(t, f, ConsulOptions{WaitTime: time.Minute})
	web, api := runWatch(t, c, "web"), runWatch(t, c, "api")
	waitUntil(t, "first snapshots", func() bool { return web.last() != nil && api.last() != nil })
	settle(t, f, 10)
	for _, s := range []string{"web", "api"} {
		if n := f.callCount(s); n != 1 {
			t.Errorf("fetches of %s = %d, want 1", s, n)
		}
	}
}

// panicOnce is a recorder whose first Publish panics.
type panicOnce struct {
	recorder
	panicked atomic.Bool
}

func (p *panicOnce) Publish(s *Snapshot) {
	if p.panicked.CompareAndSwap(false, true) {
		panic("sink")
	}
	p.recorder.Publish(s)
}

// TestConsulWorkerHandlesAnswer: the worker that fetched a service hands
// the answer to its sink (so that the watch's own goroutine only parks and
// keeps a small stack); a panic there costs that answer, retried after the
// backoff, not the worker: the watch and another one carry on.
func TestConsulWorkerHandlesAnswer(t *testing.T) {
	leakcheck.Check(t)
	f := newFakeConsul()
	c := newTestConsul(t, f, ConsulOptions{MaxConnections: 3, BackoffMin: time.Millisecond, BackoffMax: 10 * time.Millisecond})
	f.set(10, "web", node("a", 1))
	f.set(11, "api", node("b", 2))
	p := &panicOnce{}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); c.Watch(ctx, "web", p) }()
	t.Cleanup(func() { cancel(); <-done })
	waitUntil(t, "web's set after the panic", func() bool { return slices.Equal(ids(p.last()), []string{"a"}) })
	p.mu.Lock()
	fails := slices.Clone(p.fails)
	p.mu.Unlock()
	if len(fails) != 1 || !strings.Contains(fails[0].Error(), "panicked") {
		t.Errorf("the sink was told of failures %v, want the one panic (its set must age as on any failure)", fails)
	}
	api := runWatch(t, c, "api") // on the one worker, which survived
	waitUntil(t, "api's set", func() bool { return slices.Equal(ids(api.last()), []string{"b"}) })
	f.set(12, "web", node("a", 1), node("c", 3))
	waitUntil(t, "web's next set", func() bool { return slices.Equal(ids(p.last()), []string{"a", "c"}) })
}
