package resilience

import (
	"sync/atomic"
	"time"

	"github.com/sidecarlb/sidecar/config"
)

// Budget caps retries at a share of requests over a sliding window, with a
// floor of a number per second (retries.budget), counted in one-second
// buckets without locks. Counts at a bucket's turnover are approximate.
// Its methods take the time from the caller, do not block, and are safe for
// concurrent use.
type Budget struct {
	percent, minPerSecond int64
	buckets               []budgetBucket
}

type budgetBucket struct {
	second            atomic.Int64
	requests, retries atomic.Int64
}

// NewBudget returns the budget cfg describes: cfg.Window rounded down to
// whole seconds, at least one.
func NewBudget(cfg config.Budget) *Budget {
	n := max(int(cfg.Window/time.Second), 1)
	return &Budget{percent: int64(cfg.Percent), minPerSecond: int64(cfg.MinPerSecond), buckets: make([]budgetBucket, n)}
}

func (b *Budget) bucket(sec int64) *budgetBucket {
	bk := &b.buckets[sec%int64(len(b.buckets))]
	if old := bk.second.Load(); old != sec && bk.second.CompareAndSwap(old, sec) {
		bk.requests.Store(0)
		bk.retries.Store(0)
	}
	return bk
}

// Request counts a request offered at now.
func (b *Budget) Request(now time.Time) { b.bucket(now.Unix()).requests.Add(1) }

// Spend takes one retry from the budget at now, reporting false when none
// is left: retries in the window may reach percent of its requests, or the
// floor times the window's seconds, whichever is more.
func (b *Budget) Spend(now time.Time) bool {
	sec := now.Unix()
	var requests, retries int64
	for i := range b.buckets {
		bk := &b.buckets[i]
		if s := bk.second.Load(); s > sec-int64(len(b.buckets)) && s <= sec {
			requests += bk.requests.Load()
			retries += bk.retries.Load()
		}
	}
	allowed := max(requests*b.percent/100, b.minPerSecond*int64(len(b.buckets)))
	if retries >= allowed {
		return false
	}
	b.bucket(sec).retries.Add(1)
	return true
}

// Refund gives back a retry spent at then that was not made after all, if
// its second is still in the window.
func (b *Budget) Refund(then time.Time) {
	sec := then.Unix()
	bk := &b.buckets[sec%int64(len(b.buckets))]
	if bk.second.Load() != sec {
		return
	}
	for {
		n := bk.retries.Load()
		if n <= 0 || bk.retries.CompareAndSwap(n, n-1) {
			return
		}
	}
}

// Spent is the number of retries in the buckets, spent and not given back,
// whatever their second; for status and tests.
func (b *Budget) Spent() int64 {
	var n int64
	for i := range b.buckets {
		n += b.buckets[i].retries.Load()
	}
	return n
}
