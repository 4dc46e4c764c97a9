// Package backoff spaces the retries of an operation that keeps failing:
// exponential growth to a cap, with jitter, so that many clients failing
// together do not retry in step. It is the one backoff of the sidecar, as
// grpc-go's internal/backoff is grpc's: the Consul watches, the heartbeat,
// the app supervisor and the proxy's retries all use it, each with its own
// base, cap and jitter fraction.
//
// The jitter rule, for every user: retry n (1-based) waits
//
//	d = min(Base × 2^(n−1), Max)
//
// drawn uniformly from [d × (1 − Jitter), d × (1 + Jitter)]. So Jitter 0.2
// is ±20%, and the jittered delay may exceed Max by that fraction. Nothing
// here blocks except Wait; nothing is shared, so every value is safe for
// concurrent use.
package backoff

import (
	"context"
	"math/rand/v2"
	"time"
)

// Exponential is a backoff strategy: Base doubling on each retry up to Max,
// each delay jittered by ±Jitter (a fraction in [0, 1]). The zero Max means
// no cap but the 73 years of maxDelay, so that jitter cannot overflow.
type Exponential struct {
	Base, Max time.Duration
	Jitter    float64
}

// Backoff returns the delay before retry n (1-based; n < 1 counts as 1).
// It does not block.
func (e Exponential) Backoff(n int) time.Duration {
	ceiling := maxDelay
	if e.Max > 0 {
		ceiling = min(e.Max, maxDelay)
	}
	d := min(e.Base, ceiling)
	for i := 1; i < n && d > 0 && d < ceiling; i++ { // a zero Base stays zero: no need to count to n
		d = min(2*d, ceiling)
	}
	return Jitter(d, e.Jitter)
}

// maxDelay bounds every delay before jitter.
const maxDelay = time.Duration(1 << 61)

// Jitter returns d moved by a uniformly random amount within ±frac × d.
// frac outside [0, 1] is clamped to it.
func Jitter(d time.Duration, frac float64) time.Duration {
	frac = min(max(frac, 0), 1)
	if d <= 0 || frac == 0 {
		return d
	}
	return time.Duration(float64(d) * (1 - frac + 2*frac*rand.Float64()))
}

// Wait waits for d, or until ctx is done, and reports whether ctx is still
// live. A d of zero or less returns at once.
func Wait(ctx context.Context, d time.Duration) bool {
	if d <= 0 {
		return ctx.Err() == nil
	}
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return true
	case <-ctx.Done():
		return false
	}
}
