// Package memtune keeps the Go runtime's soft memory limit a little above
// what the live heap needs, never below a floor, so that memory a burst
// left free (a bulk publish's request bodies, an outbox loaded after a
// restart) goes back to the OS within a second, rather than staying
// resident until the background scavenger returns it at its own pace.
//
// The limit follows the heap: twice the live heap (the heap goal under
// GOGC=100) plus Slack, which covers the runtime's own memory (stacks,
// span and GC metadata) when that is small; when it is not (a proxy with
// thousands of connections, a goroutine each), the limit leaves the heap
// at least half the live heap to grow into beyond the runtime's memory
// outside it, so the collector never runs without end. So the collector never runs more often than GOGC=100 makes
// it, except for the moment between a jump of the live heap and the next
// adjustment; the limit only tells the scavenger what to return.
//
// The live heap is what the last collection found, and after a burst
// nothing may collect for a long while: the limit would stay where the
// burst's garbage, still live at that collection, put it. So when no
// collection has run for IdleCollect and the limit is above the floor,
// Run collects once (a few milliseconds for a heap of tens of MiB), and
// not again until the collector has run on its own. A GOMEMLIMIT set in
// the environment is the operator's, and Run leaves it alone.
package memtune

import (
	"context"
	"os"
	"runtime"
	"runtime/debug"
	"runtime/metrics"
	"time"
)

// Slack is what the limit allows beyond twice the live heap.
const Slack = 2 << 20

// IdleCollect is how long without a collection makes Run collect once
// while the limit is above the floor.
const IdleCollect = 5 * time.Second

// Limit returns the soft memory limit for a live heap of live bytes.
func Limit(live uint64, floor int64) int64 {
	return max(floor, int64(2*live)+Slack)
}

// limitFor is Limit, raised where the runtime's memory outside the heap
// (other) would leave the heap less than half its live size to grow.
func limitFor(live, other uint64, floor int64) int64 {
	return max(Limit(live, floor), int64(other+live+live/2)+Slack)
}

// Run sets the soft memory limit from the live heap now and every interval
// until ctx ends, then puts back the limit it found. It does nothing when
// GOMEMLIMIT is set. It blocks; run it in a goroutine of its owner.
func Run(ctx context.Context, floor int64, interval time.Duration) {
	if os.Getenv("GOMEMLIMIT") != "" {
		return
	}
	run(ctx, floor, interval, IdleCollect, runtimeHeap{}, debug.SetMemoryLimit)
}

// heap is what Run reads of the runtime, and asks of it.
type heap interface {
	// live returns the heap the last collection found live, and the
	// number of collections so far.
	live() (bytes, cycles uint64)
	// other returns the memory the runtime holds outside the heap
	// (goroutine stacks, its own metadata), which the limit counts too:
	// a limit that left it out would make the collector run without end
	// in a process with many goroutines.
	other() uint64
	collect()
}

func run(ctx context.Context, floor int64, interval, idle time.Duration, h heap, set func(int64) int64) {
	live, cycles := h.live()
	limit := limitFor(live, h.other(), floor)
	before := set(limit)
	defer set(before)
	t := time.NewTicker(interval)
	defer t.Stop()
	idleSince, collected := time.Now(), false
	for {
		select {
		case <-ctx.Done():
			return
		case now := <-t.C:
			l, c := h.live()
			if c != cycles {
				cycles, idleSince, collected = c, now, false
			} else if !collected && limit > floor && now.Sub(idleSince) >= idle {
				h.collect()
				collected = true
				l, cycles = h.live()
			}
			limit = limitFor(l, h.other(), floor)
			set(limit)
		}
	}
}

type runtimeHeap struct{}

func (runtimeHeap) live() (uint64, uint64) {
	s := []metrics.Sample{{Name: "/gc/heap/live:bytes"}, {Name: "/gc/cycles/total:gc-cycles"}}
	metrics.Read(s)
	var v [2]uint64
	for i := range s {
		if s[i].Value.Kind() == metrics.KindUint64 {
			v[i] = s[i].Value.Uint64()
		}
	}
	return v[0], v[1]
}

func (runtimeHeap) other() uint64 {
	s := []metrics.Sample{{Name: "/memory/classes/total:bytes"}, {Name: "/memory/classes/heap/objects:bytes"},
		{Name: "/memory/classes/heap/unused:bytes"}, {Name: "/memory/classes/heap/free:bytes"}, {Name: "/memory/classes/heap/released:bytes"}}
	metrics.Read(s)
	var v [5]uint64
	for i := range s {
		if s[i].Value.Kind() == metrics.KindUint64 {
			v[i] = s[i].Value.Uint64()
		}
	}
	heap := v[1] + v[2] + v[3] + v[4]
	if v[0] < heap {
		return 0
	}
	return v[0] - heap
}

func (runtimeHeap) collect() { runtime.GC() }
