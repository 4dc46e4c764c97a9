package discovery

import (
	"context"
	"math/rand/v2"
	"time"
)

// blockingIndex follows the index of a Consul blocking query by Consul's
// rules: an index of 0 is taken as 1, the same index means nothing changed,
// and an index that goes backwards resets the next wait to 0.
type blockingIndex struct {
	// wait is the WaitIndex of the next query; 0 asks for an answer at once.
	wait uint64
	// last is the index of the last answer, 0 before the first.
	last uint64
}

// observe records the index of an answer and reports whether the answer may
// hold new data, and whether the index went backwards (the registry lost its
// state, e.g. a restarted dev agent).
func (b *blockingIndex) observe(index uint64) (changed, backwards bool) {
	if index == 0 {
		index = 1
	}
	switch {
	case b.last != 0 && index < b.last:
		b.last, b.wait = index, 0
		return true, true
	case index == b.last:
		b.wait = index
		return false, false
	default:
		b.last, b.wait = index, index
		return true, false
	}
}

// failed makes the next query answer at once, so that a registry coming back
// is seen without waiting out a blocking query. last is kept: an answer at
// the same index still means nothing changed meanwhile.
func (b *blockingIndex) failed() { b.wait = 0 }

// backoff spaces retries of a failing query: min doubling to max, each
// delay jittered by ±25% so that many watches do not retry in step.
type backoff struct {
	min, max time.Duration
	cur      time.Duration
}

func (b *backoff) next() time.Duration {
	switch {
	case b.cur == 0:
		b.cur = b.min
	case b.cur < b.max:
		b.cur = min(2*b.cur, b.max)
	}
	return time.Duration(float64(b.cur) * (0.75 + 0.5*rand.Float64()))
}

func (b *backoff) reset() { b.cur = 0 }

// sleep waits for d or until ctx is done, and reports whether ctx is still
// live.
func sleep(ctx context.Context, d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return false
	case <-t.C:
		return true
	}
}
