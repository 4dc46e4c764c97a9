package discovery

import (
	"time"

	"github.com/sidecarlb/sidecar/internal/backoff"
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

// retryBackoff spaces retries of a failing query: min doubling to max,
// each delay jittered by ±25% so that many watches do not retry in step.
type retryBackoff struct {
	backoff.Exponential
	n int // retries so far
}

func newRetryBackoff(min, max time.Duration) retryBackoff {
	return retryBackoff{Exponential: backoff.Exponential{Base: min, Max: max, Jitter: 0.25}}
}

func (b *retryBackoff) next() time.Duration {
	b.n++
	return b.Backoff(b.n)
}

func (b *retryBackoff) reset() { b.n = 0 }
