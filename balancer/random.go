package balancer

import (
	"math/rand/v2"
	"sync/atomic"

	"github.com/sidecarlb/sidecar/discovery"
)

// Random picks an endpoint at random, in proportion to its weight. It is the
// balancer configured as "random".
type Random struct {
	state atomic.Pointer[randomState]
}

// randomState is an immutable snapshot built by Update.
type randomState struct {
	eps []discovery.Endpoint
	// cum holds prefix sums of the weights, or nil when all weights are
	// equal and a uniform pick is exact.
	cum   []uint64
	total uint64
}

// NewRandom returns a Random balancer with no endpoints.
func NewRandom() *Random {
	r := &Random{}
	r.state.Store(&randomState{})
	return r
}

// Update replaces the endpoint set.
func (r *Random) Update(endpoints []discovery.Endpoint) {
	st := &randomState{eps: endpoints}
	if !uniformWeights(endpoints) {
		st.cum = make([]uint64, len(endpoints))
		for i := range endpoints {
			st.total += weightOf(&endpoints[i])
			st.cum[i] = st.total
		}
	}
	r.state.Store(st)
}

// Pick chooses an endpoint at random, weighted, skipping r.Exclude while any
// other endpoint remains. It is safe for concurrent use and does not block.
func (r *Random) Pick(req Request) (Pick, error) {
	st := r.state.Load()
	if len(st.eps) == 0 {
		return Pick{}, ErrNoEndpoints
	}
	i := st.pick()
	if len(req.Exclude) > 0 && excluded(req.Exclude, st.eps[i].ID) {
		i = st.pickAvoiding(i, req.Exclude)
	}
	return Pick{Endpoint: &st.eps[i]}, nil
}

func (st *randomState) pick() int {
	if st.cum == nil {
		return rand.IntN(len(st.eps))
	}
	return searchAbove(st.cum, rand.Uint64N(st.total))
}

// pickAvoiding draws again a few times, which keeps the weighting for the
// retry, and then steps forward from the first draw so that it terminates even
// when most endpoints are excluded. If all of them are, first is returned.
func (st *randomState) pickAvoiding(first int, ex []string) int {
	for range 3 {
		if i := st.pick(); !excluded(ex, st.eps[i].ID) {
			return i
		}
	}
	if i := nextAllowed(st.eps, first, ex); i >= 0 {
		return i
	}
	return first
}

// searchAbove returns the first index i with cum[i] > v; cum is ascending and
// v < cum[len(cum)-1]. Written out rather than using sort.Search so the hot
// path calls no closure.
func searchAbove(cum []uint64, v uint64) int {
	lo, hi := 0, len(cum)-1
	for lo < hi {
		mid := int(uint(lo+hi) >> 1)
		if cum[mid] > v {
			hi = mid
		} else {
			lo = mid + 1
		}
	}
	return lo
}
