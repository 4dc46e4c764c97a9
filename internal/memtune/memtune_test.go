package memtune

import (
	"context"
	"math"
	"sync"
	"testing"
	"time"
)

func TestLimit(t *testing.T) {
	tests := []struct {
		name  string
		live  uint64
		floor int64
		want  int64
	}{
		{"small heap: the floor", 2 << 20, 20 << 20, 20 << 20},
		{"at the floor", 9 << 20, 20 << 20, 20 << 20},
		{"large heap: twice it and the slack", 100 << 20, 20 << 20, 202 << 20},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			if got := Limit(tc.live, tc.floor); got != tc.want {
				t.Errorf("Limit(%d, %d) = %d, want %d", tc.live, tc.floor, got, tc.want)
			}
		})
	}
}

// fakeHeap is a heap whose live bytes and collections the test sets.
type fakeHeap struct {
	mu       sync.Mutex
	bytes    uint64
	cycles   uint64
	collects int
	after    uint64 // live bytes after a collection
}

func (f *fakeHeap) live() (uint64, uint64) {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.bytes, f.cycles
}

func (f *fakeHeap) other() uint64 { return 0 }

func (f *fakeHeap) collect() {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.collects++
	f.cycles++
	f.bytes = f.after
}

// limiter records the limits set, as debug.SetMemoryLimit would.
type limiter struct {
	mu      sync.Mutex
	current int64
}

func (l *limiter) set(n int64) int64 {
	l.mu.Lock()
	defer l.mu.Unlock()
	prev := l.current
	l.current = n
	return prev
}

func (l *limiter) get() int64 { l.mu.Lock(); defer l.mu.Unlock(); return l.current }

// TestRunFollowsTheHeap: the limit is set at once, moves with the live
// heap while collections run, and the one found is put back when the
// context ends.
func TestRunFollowsTheHeap(t *testing.T) {
	h := &fakeHeap{bytes: 1 << 20, after: 1 << 20}
	lim := &limiter{current: math.MaxInt64}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); run(ctx, 20<<20, time.Millisecond, time.Hour, h, lim.set) }()
	waitFor(t, func() bool { return lim.get() == 20<<20 })
	h.mu.Lock()
	h.bytes, h.cycles = 50<<20, 1
	h.mu.Unlock()
	waitFor(t, func() bool { return lim.get() == 102<<20 })
	cancel()
	<-done
	if got := lim.get(); got != math.MaxInt64 {
		t.Errorf("limit after Run = %d, want the one before it (%d)", got, int64(math.MaxInt64))
	}
	if h.collects != 0 {
		t.Errorf("Run collected %d times with idle an hour, want 0", h.collects)
	}
}

// TestRunCollectsOnceWhenIdle: a limit left above the floor by a burst
// comes down after one collection once the collector has been idle, and
// Run does not collect again until the collector has run on its own.
func TestRunCollectsOnceWhenIdle(t *testing.T) {
	h := &fakeHeap{bytes: 50 << 20, after: 50 << 20} // the burst's garbage stays live
	lim := &limiter{}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); run(ctx, 20<<20, time.Millisecond, 20*time.Millisecond, h, lim.set) }()
	waitFor(t, func() bool { h.mu.Lock(); defer h.mu.Unlock(); return h.collects == 1 })
	time.Sleep(100 * time.Millisecond) // idle all along, limit still above the floor
	h.mu.Lock()
	if h.collects != 1 {
		t.Errorf("collections while idle = %d, want 1", h.collects)
	}
	h.cycles++ // the collector runs on its own, and then the heap is small
	h.bytes, h.after = 30<<20, 1<<20
	h.mu.Unlock()
	waitFor(t, func() bool { return lim.get() == 20<<20 })
	cancel()
	<-done
	if h.collects != 2 {
		t.Errorf("collections = %d, want 2 (one per idle period)", h.collects)
	}
}

func waitFor(t *testing.T, cond func() bool) {
	t.Helper()
	for deadline := time.Now().Add(5 * time.Second); !cond(); time.Sleep(time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("timed out")
		}
	}
}

// TestRuntimeOther: the runtime's memory outside the heap counts the
// stacks of goroutines, which the limit must leave room for.
func TestRuntimeOther(t *testing.T) {
	before := runtimeHeap{}.other()
	stop := make(chan struct{})
	var ready sync.WaitGroup
	for range 200 {
		ready.Add(1)
		go func() {
			var deep func(n int) int
			deep = func(n int) int {
				var pad [512]byte
				if n == 0 {
					ready.Done()
					<-stop
					return int(pad[0])
				}
				return deep(n-1) + int(pad[n%512])
			}
			deep(32) // about 20 KiB of stack each
		}()
	}
	ready.Wait()
	after := runtimeHeap{}.other()
	close(stop)
	if after < before+2<<20 {
		t.Errorf("memory outside the heap %d → %d with 200 deep goroutines, want at least 2 MiB more", before, after)
	}
}

// TestLimitForOther: the runtime's memory outside the heap raises the
// limit only when it would leave the heap less than half the live heap to
// grow into.
func TestLimitForOther(t *testing.T) {
	const mib = 1 << 20
	if got, want := limitFor(8*mib, 4*mib, 20*mib), Limit(8*mib, 20*mib); got != want {
		t.Errorf("limitFor(8MiB live, 4MiB other) = %d, want Limit's %d", got, want)
	}
	if got, want := limitFor(8*mib, 40*mib, 20*mib), int64(40*mib+12*mib+Slack); got != want {
		t.Errorf("limitFor(8MiB live, 40MiB other) = %d, want %d", got, want)
	}
}
