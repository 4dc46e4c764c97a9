// Package memtune keeps the Go runtime's soft memory limit a little above
// what the live heap needs, never below a floor, so that memory a burst
// left free (a bulk publish's request bodies, an outbox loaded after a
// restart) goes back to the OS within a second, rather than staying
// resident until the background scavenger returns it at its own pace.
//
// The limit follows the heap: twice the live heap (the heap goal under
// GOGC=100) plus Slack for the runtime's own memory (stacks, span and GC
// metadata). So the collector never runs more often than GOGC=100 makes
// it, except for the moment between a jump of the live heap and the next
// adjustment; the limit only tells the scavenger what to return. A
// GOMEMLIMIT set in the environment is the operator's, and Run leaves it
// alone.
package memtune

import (
	"context"
	"os"
	"runtime/debug"
	"runtime/metrics"
	"time"
)

// Slack is what the limit allows beyond twice the live heap.
const Slack = 2 << 20

// Limit returns the soft memory limit for a live heap of live bytes.
func Limit(live uint64, floor int64) int64 {
	return max(floor, int64(2*live)+Slack)
}

// Run sets the soft memory limit from the live heap now and every interval
// until ctx ends, then puts back the limit it found. It does nothing when
// GOMEMLIMIT is set. It blocks; run it in a goroutine of its owner.
func Run(ctx context.Context, floor int64, interval time.Duration) {
	if os.Getenv("GOMEMLIMIT") != "" {
		return
	}
	run(ctx, floor, interval, liveHeap, debug.SetMemoryLimit)
}

func run(ctx context.Context, floor int64, interval time.Duration, live func() uint64, set func(int64) int64) {
	before := set(Limit(live(), floor))
	defer set(before)
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			set(Limit(live(), floor))
		}
	}
}

// liveHeap returns the heap the last collection found live.
func liveHeap() uint64 {
	s := []metrics.Sample{{Name: "/gc/heap/live:bytes"}}
	metrics.Read(s)
	if s[0].Value.Kind() != metrics.KindUint64 {
		return 0
	}
	return s[0].Value.Uint64()
}
