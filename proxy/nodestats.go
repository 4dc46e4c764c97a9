package proxy

import (
	"math"
	"math/bits"
	"sync/atomic"
	"time"
)

// statsSlots is the window of an endpoint's recent figures in /status, in
// one-second slots.
const statsSlots = 10

// latencyBuckets are the latency histogram's buckets: bucket i holds
// latencies below 2^i microseconds (the last one everything longer).
const latencyBuckets = 28

// nodeStats keeps an endpoint's recent tries, failed tries and request
// latencies for /status: the request rate, error rate and latency
// percentiles of the last statsSlots seconds. It counts in one-second
// slots, without locks or allocation; counts at a slot's turnover are
// approximate. The slots (1.3 KB) are made at the node's first request,
// so the thousands of routes a fleet watches but never uses cost 16 bytes
// each. Safe for concurrent use.
type nodeStats struct {
	born  int64 // unix nanoseconds the endpoint was created
	slots atomic.Pointer[[statsSlots]statsSlot]
}

type statsSlot struct {
	second          atomic.Int64
	tries, failures atomic.Uint32
	latency         [latencyBuckets]atomic.Uint32
}

// slot returns the slot of the unix second sec, emptied when it last
// held an older second.
func (s *nodeStats) slot(sec int64) *statsSlot {
	slots := s.slots.Load()
	if slots == nil {
		s.slots.CompareAndSwap(nil, new([statsSlots]statsSlot))
		slots = s.slots.Load()
	}
	sl := &slots[sec%statsSlots]
	if old := sl.second.Load(); old != sec && sl.second.CompareAndSwap(old, sec) {
		sl.tries.Store(0)
		sl.failures.Store(0)
		for i := range sl.latency {
			sl.latency[i].Store(0)
		}
	}
	return sl
}

// try counts a try that reached the node (or failed to), failed when it
// ended in a transport error or a gateway answer.
func (s *nodeStats) try(now time.Time, failed bool) {
	sl := s.slot(now.Unix())
	sl.tries.Add(1)
	if failed {
		sl.failures.Add(1)
	}
}

// latency records a request answered by the node that took d.
func (s *nodeStats) latency(now time.Time, d time.Duration) {
	us := uint64(max(d.Microseconds(), 0))
	s.slot(now.Unix()).latency[min(bits.Len64(us), latencyBuckets-1)].Add(1)
}

// NodeStats are an endpoint's figures over the last few seconds.
type NodeStats struct {
	// WindowSeconds is the span the figures cover: 10s, or the endpoint's
	// age when younger.
	WindowSeconds float64 `json:"window_seconds"`
	// RequestsPerSecond counts tries that reached the node or failed to.
	RequestsPerSecond float64 `json:"requests_per_second"`
	// ErrorRate is the share of those tries (0 to 1) that failed: a
	// transport error or a gateway answer (outlier.eject_on_5xx).
	ErrorRate float64 `json:"error_rate"`
	// Latency percentiles of the requests answered, in milliseconds
	// (interpolated in power-of-two buckets); absent with no answer.
	LatencyMS *Percentiles `json:"latency_ms,omitempty"`
}

// Percentiles of a latency distribution.
type Percentiles struct {
	P50 float64 `json:"p50"`
	P90 float64 `json:"p90"`
	P99 float64 `json:"p99"`
}

// summary returns the figures of the statsSlots seconds up to now.
func (s *nodeStats) summary(now time.Time) NodeStats {
	sec := now.Unix()
	var tries, failures uint64
	var hist [latencyBuckets]uint64
	var answered uint64
	slots := s.slots.Load() // nil before the first request: no figures
	for i := 0; slots != nil && i < statsSlots; i++ {
		sl := &slots[i]
		if at := sl.second.Load(); at > sec || at <= sec-statsSlots {
			continue
		}
		tries += uint64(sl.tries.Load())
		failures += uint64(sl.failures.Load())
		for b := range sl.latency {
			n := uint64(sl.latency[b].Load())
			hist[b] += n
			answered += n
		}
	}
	// The window is the earlier whole seconds and the current one so far,
	// or the endpoint's age when shorter.
	window := float64(statsSlots-1) + float64(now.Nanosecond())/1e9
	if age := now.Sub(time.Unix(0, s.born)).Seconds(); age < window {
		window = max(age, 0.001)
	}
	out := NodeStats{WindowSeconds: round3(window), RequestsPerSecond: round3(float64(tries) / window)}
	if tries > 0 {
		out.ErrorRate = round3(float64(failures) / float64(tries))
	}
	if answered > 0 {
		out.LatencyMS = &Percentiles{
			P50: percentile(&hist, answered, 0.50),
			P90: percentile(&hist, answered, 0.90),
			P99: percentile(&hist, answered, 0.99),
		}
	}
	return out
}

// percentile returns the q quantile of hist (total counts) in
// milliseconds, interpolated linearly within its bucket.
func percentile(hist *[latencyBuckets]uint64, total uint64, q float64) float64 {
	rank := q * float64(total)
	var seen float64
	for i, n := range hist {
		if n == 0 {
			continue
		}
		if seen+float64(n) >= rank {
			lo, hi := 0.0, 1.0
			if i > 0 {
				lo, hi = math.Ldexp(1, i-1), math.Ldexp(1, i)
			}
			us := lo + (hi-lo)*(rank-seen)/float64(n)
			return round3(us / 1000)
		}
		seen += float64(n)
	}
	return round3(math.Ldexp(1, latencyBuckets-1) / 1000)
}

func round3(f float64) float64 { return math.Round(f*1000) / 1000 }
