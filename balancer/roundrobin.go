package balancer

import (
	"slices"
	"sync/atomic"

	"github.com/sidecarlb/sidecar/discovery"
)

const (
	// maxSchedule and slotsPerEndpoint bound the weighted schedule of n
	// endpoints to limit = max(maxSchedule, slotsPerEndpoint·n) slots:
	// weights whose sum exceeds it are scaled down, rounding, and every
	// endpoint keeps at least one slot, so a schedule holds at most limit+n.
	maxSchedule      = 1 << 14
	slotsPerEndpoint = 16
	// swrrBudget bounds the work of computing the exact smooth weighted
	// round-robin schedule, which costs O(len(schedule) × endpoints). Larger
	// weighted sets use stride scheduling, which is O(n log n) and nearly as
	// smooth.
	swrrBudget = 1 << 24
)

// RoundRobin rotates through the endpoints across requests, in the order
// Update received them (sorted by ID in a discovery.Snapshot). When weights
// differ it follows a smooth weighted round-robin schedule, the one nginx
// uses, so a heavy endpoint's turns are spread out rather than bunched. It is
// the balancer configured as "round_robin".
type RoundRobin struct {
	// next is shared by all requests and survives Update, so the rotation
	// continues across set changes.
	next  atomic.Uint64
	state atomic.Pointer[roundRobinState]
}

// roundRobinState is an immutable snapshot built by Update.
type roundRobinState struct {
	eps []discovery.Endpoint
	// schedule lists endpoint indexes for one weighted cycle, or is nil when
	// all weights are equal and plain modulo is exact.
	schedule []int32
}

// NewRoundRobin returns a RoundRobin balancer with no endpoints.
func NewRoundRobin() *RoundRobin {
	r := &RoundRobin{}
	r.state.Store(&roundRobinState{})
	return r
}

// Update replaces the endpoint set and, when weights differ, precomputes the
// weighted schedule so that Pick is an atomic add and an index.
func (r *RoundRobin) Update(endpoints []discovery.Endpoint) {
	st := &roundRobinState{eps: endpoints}
	if !uniformWeights(endpoints) {
		st.schedule = weightedSchedule(reducedWeights(endpoints))
	}
	r.state.Store(st)
}

// Pick returns the next endpoint in the rotation, skipping req.Exclude while
// any other endpoint remains. It is safe for concurrent use and does not
// block.
func (r *RoundRobin) Pick(req Request) (Pick, error) {
	st := r.state.Load()
	n := len(st.eps)
	if n == 0 {
		return Pick{}, ErrNoEndpoints
	}
	c := r.next.Add(1) - 1
	if st.schedule == nil {
		i := int(c % uint64(n))
		if len(req.Exclude) > 0 {
			if j := nextAllowed(st.eps, i, req.Exclude); j >= 0 {
				i = j
			}
		}
		return Pick{Endpoint: &st.eps[i]}, nil
	}
	pos := int(c % uint64(len(st.schedule)))
	i := int(st.schedule[pos])
	if len(req.Exclude) > 0 && excluded(req.Exclude, st.eps[i].ID) {
		i = st.nextScheduled(pos, req.Exclude)
	}
	return Pick{Endpoint: &st.eps[i]}, nil
}

// nextScheduled steps forward through the schedule from pos, keeping the
// weighting, for a few slots, then falls back to the endpoint order so that
// it stays cheap when most endpoints are excluded.
func (st *roundRobinState) nextScheduled(pos int, ex []string) int {
	first := int(st.schedule[pos])
	for step := 1; step <= 2*len(ex)+2 && step < len(st.schedule); step++ {
		i := int(st.schedule[(pos+step)%len(st.schedule)])
		if !excluded(ex, st.eps[i].ID) {
			return i
		}
	}
	if i := nextAllowed(st.eps, first, ex); i >= 0 {
		return i
	}
	return first
}

// reducedWeights returns the endpoints' weights divided by their greatest
// common divisor and, if their sum exceeds scheduleLimit, scaled down
// proportionally (never below 1).
func reducedWeights(eps []discovery.Endpoint) []uint64 {
	w := make([]uint64, len(eps))
	var sum uint64
	for i := range eps {
		w[i] = weightOf(&eps[i])
		sum += w[i]
	}
	if limit := scheduleLimit(len(eps)); sum > limit {
		for i := range w {
			// w ≤ 2^32 and limit is far below 2^31, so this fits.
			w[i] = max(1, (w[i]*limit+sum/2)/sum)
		}
	}
	var g uint64
	for _, x := range w {
		g = gcd(g, x)
	}
	for i := range w {
		w[i] /= g
	}
	return w
}

// scheduleLimit is the number of slots the weights of n endpoints are scaled
// into when their sum is larger.
func scheduleLimit(n int) uint64 {
	return max(maxSchedule, slotsPerEndpoint*uint64(n))
}

// weightedSchedule returns one full cycle in which endpoint i appears w[i]
// times.
func weightedSchedule(w []uint64) []int32 {
	var total uint64
	for _, x := range w {
		total += x
	}
	if total*uint64(len(w)) <= swrrBudget {
		return smoothSchedule(w, total)
	}
	return strideSchedule(w, total)
}

// smoothSchedule runs nginx's smooth weighted round-robin for one cycle: each
// step every endpoint's current value grows by its weight, the largest (the
// first on ties) is chosen and loses the total weight.
func smoothSchedule(w []uint64, total uint64) []int32 {
	cur := make([]int64, len(w))
	out := make([]int32, total)
	for t := range out {
		best := 0
		for i, x := range w {
			cur[i] += int64(x)
			if cur[i] > cur[best] {
				best = i
			}
		}
		cur[best] -= int64(total)
		out[t] = int32(best)
	}
	return out
}

// strideSchedule orders the k-th turn of endpoint i at virtual time
// (k+½)/w[i], ties by index: each endpoint's turns are evenly spaced over the
// cycle, like smoothSchedule, at O(total log total) instead of
// O(total × endpoints).
func strideSchedule(w []uint64, total uint64) []int32 {
	type turn struct {
		i int32
		k uint64
	}
	turns := make([]turn, 0, total)
	for i, x := range w {
		for k := range x {
			turns = append(turns, turn{int32(i), k})
		}
	}
	slices.SortFunc(turns, func(a, b turn) int {
		// (2a.k+1)/w[a.i] vs (2b.k+1)/w[b.i], cross-multiplied; both
		// sides stay below 2·total², far from overflow.
		l, r := (2*a.k+1)*w[b.i], (2*b.k+1)*w[a.i]
		switch {
		case l < r:
			return -1
		case l > r:
			return 1
		}
		return int(a.i - b.i)
	})
	out := make([]int32, len(turns))
	for t, x := range turns {
		out[t] = x.i
	}
	return out
}
