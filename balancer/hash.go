package balancer

import (
	"math/bits"
	"sync/atomic"

	"github.com/sidecarlb/sidecar/discovery"
)

const (
	// maxVnodes is the number of ring points per unit of weight while the
	// set is small enough: with 1024 points an endpoint's share of the ring
	// deviates from the mean by about 1/√1024 ≈ 3%.
	maxVnodes = 1024
	// ringBudget bounds the ring (about 13 bytes a point with its index,
	// so 3.3 MiB): once the total weight passes 256 (256 endpoints of
	// weight 1) the points per unit of weight halve until the ring fits,
	// but never go below one.
	ringBudget = 1 << 18
	// maxHashWeight caps the weight an endpoint has on the ring, which then
	// holds at most max(ringBudget, maxHashWeight·n) points.
	maxHashWeight = 64
)

// Hash sends requests with the same key to the same endpoint while the set
// is unchanged: consistent hashing on Request.Key. Requests without a key are
// spread round-robin. It is the balancer configured as "hash".
//
// The scheme is a ring hash (Karger et al.): each endpoint owns
// vnodes·weight points on a 64-bit ring, placed by hashing its ID, and a key
// belongs to the first point at or after its own hash. It was chosen over
// the alternatives for the properties the proxy needs together:
//   - A point's position depends only on its endpoint's ID, so when an
//     endpoint leaves, only the keys on its points move (to the next point
//     clockwise), about 1/N of them, and no key on a surviving endpoint
//     moves. When one joins it takes keys only onto its own points. Maglev
//     and bounded-load hashing rebalance among survivors, and jump hash can
//     only drop the last bucket.
//   - With 1024 points per endpoint the busiest of 10 endpoints typically
//     gets 1.07× the mean share, and under 1.15× for any of 300 random
//     sets of IDs tried; removing one of 10 moves about 10% of keys, at
//     most 11.2% in those trials. Rendezvous hashing balances better but
//     costs O(N) per pick, too slow with 10,000 endpoints.
//   - Pick hashes the key and looks it up in a sorted []uint64 through a
//     bucket index on the top bits, O(1) in expectation, with no
//     allocation.
//
// Large sets get fewer points per endpoint (halving from maxVnodes) so the
// ring stays within ringBudget; because an endpoint's points are a prefix of
// one fixed sequence, crossing such a threshold (only ever past a total
// weight of 256) adds or drops just the tail points of each endpoint.
type Hash struct {
	// next drives the round-robin fallback for requests without a key.
	next  atomic.Uint64
	state atomic.Pointer[hashState]
}

// hashState is an immutable snapshot built by Update.
type hashState struct {
	eps []discovery.Endpoint
	// ring holds the sorted point positions; owner[k] is the index in eps
	// of the endpoint owning ring[k].
	ring  []uint64
	owner []int32
	// index[b] is the first k with ring[k]>>indexShift >= b: the points of
	// bucket b are ring[index[b]:index[b+1]], about four of them, so Pick
	// searches a few neighbouring words instead of the whole ring.
	index      []int32
	indexShift uint
}

// NewHash returns a Hash balancer with no endpoints.
func NewHash() *Hash {
	h := &Hash{}
	h.state.Store(&hashState{})
	return h
}

// Update replaces the endpoint set and rebuilds the ring.
func (h *Hash) Update(endpoints []discovery.Endpoint) {
	h.state.Store(newHashState(endpoints))
}

func newHashState(eps []discovery.Endpoint) *hashState {
	var sumw uint64
	for i := range eps {
		sumw += hashWeight(&eps[i])
	}
	vnodes := uint64(maxVnodes)
	for vnodes > 1 && vnodes*sumw > ringBudget {
		vnodes /= 2
	}
	st := &hashState{eps: eps}
	st.ring = make([]uint64, 0, vnodes*sumw)
	st.owner = make([]int32, 0, vnodes*sumw)
	for i := range eps {
		seed := mix64(fnv1a(eps[i].ID))
		for j := range vnodes * hashWeight(&eps[i]) {
			st.ring = append(st.ring, mix64(seed+(j+1)*golden))
			st.owner = append(st.owner, int32(i))
		}
	}
	st.sort()
	st.buildIndex()
	return st
}

// sort orders the ring by position and, on the rare ties, by owner ID, so
// the ring does not depend on the order of the endpoints. The positions are
// uniform hashes, so a bucket pass on their top bits leaves only a few
// inversions for insertion sort to fix: linear time in expectation, where a
// comparison sort of a ring this size takes tens of milliseconds.
func (st *hashState) sort() {
	n := len(st.ring)
	if n < 2 {
		return
	}
	shift := 64 - bits.Len(uint(n))
	start := make([]int32, 1<<(64-shift)+1)
	for _, p := range st.ring {
		start[p>>shift+1]++
	}
	for b := 1; b < len(start); b++ {
		start[b] += start[b-1]
	}
	ring, owner := make([]uint64, n), make([]int32, n)
	for k, p := range st.ring {
		b := p >> shift
		ring[start[b]], owner[start[b]] = p, st.owner[k]
		start[b]++
	}
	less := func(k, l int) bool {
		if ring[k] != ring[l] {
			return ring[k] < ring[l]
		}
		return st.eps[owner[k]].ID < st.eps[owner[l]].ID
	}
	for k := 1; k < n; k++ {
		for l := k; l > 0 && less(l, l-1); l-- {
			ring[l], ring[l-1] = ring[l-1], ring[l]
			owner[l], owner[l-1] = owner[l-1], owner[l]
		}
	}
	st.ring, st.owner = ring, owner
}

// Pick returns the endpoint owning req.Key on the ring. If that endpoint is in
// req.Exclude it walks on clockwise to the next endpoint that is not, so
// retries of one key also go to a stable place. Without a key it rotates
// round-robin. It is safe for concurrent use and does not block.
func (h *Hash) Pick(req Request) (Pick, error) {
	st := h.state.Load()
	n := len(st.eps)
	if n == 0 {
		return Pick{}, ErrNoEndpoints
	}
	if !req.HasKey {
		i := int((h.next.Add(1) - 1) % uint64(n))
		if len(req.Exclude) > 0 {
			if j := nextAllowed(st.eps, i, req.Exclude); j >= 0 {
				i = j
			}
		}
		return Pick{Endpoint: &st.eps[i]}, nil
	}
	k := st.search(mix64(req.Key + golden))
	if k == len(st.ring) {
		k = 0
	}
	i := int(st.owner[k])
	if len(req.Exclude) > 0 && excluded(req.Exclude, st.eps[i].ID) {
		i = st.walk(k, req.Exclude)
	}
	return Pick{Endpoint: &st.eps[i]}, nil
}

// walk returns the owner of the first point after k whose endpoint is not in
// ex, or the owner of k if every endpoint is.
func (st *hashState) walk(k int, ex []string) int {
	prev := st.owner[k]
	for step := 1; step < len(st.ring); step++ {
		o := st.owner[(k+step)%len(st.ring)]
		if o == prev {
			continue
		}
		if !excluded(ex, st.eps[o].ID) {
			return int(o)
		}
		prev = o
	}
	return int(st.owner[k])
}

// hashWeight is an endpoint's weight on the ring, capped at maxHashWeight.
func hashWeight(e *discovery.Endpoint) uint64 {
	return min(weightOf(e), maxHashWeight)
}

// buildIndex fills index for the sorted ring, with one bucket per four
// points or so.
func (st *hashState) buildIndex() {
	n := len(st.ring)
	if n == 0 {
		return
	}
	b := max(bits.Len(uint(n))-2, 0)
	st.indexShift = uint(64 - b)
	st.index = make([]int32, 1<<b+1)
	k := 0
	for bucket := range st.index {
		for k < n && st.ring[k]>>st.indexShift < uint64(bucket) {
			k++
		}
		st.index[bucket] = int32(k)
	}
}

// search returns the first k with ring[k] >= h, or len(ring). The answer
// lies in h's bucket or is the first point after it.
func (st *hashState) search(h uint64) int {
	b := h >> st.indexShift
	lo, hi := int(st.index[b]), int(st.index[b+1])
	return lo + searchAtLeast(st.ring[lo:hi], h)
}

// searchAtLeast returns the first index k with ring[k] >= v, or len(ring).
func searchAtLeast(ring []uint64, v uint64) int {
	lo, hi := 0, len(ring)
	for lo < hi {
		mid := int(uint(lo+hi) >> 1)
		if ring[mid] < v {
			lo = mid + 1
		} else {
			hi = mid
		}
	}
	return lo
}

// golden is 2^64/φ, the splitmix64 increment.
const golden = 0x9e3779b97f4a7c15

// mix64 is the splitmix64 finalizer: a bijection on uint64 that spreads every
// input bit over the output, so poorly mixed keys (small integers, hashes of
// similar strings) land evenly on the ring.
func mix64(z uint64) uint64 {
	z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9
	z = (z ^ (z >> 27)) * 0x94d049bb133111eb
	return z ^ (z >> 31)
}

// fnv1a is the 64-bit FNV-1a hash of s, written out so it does not allocate.
func fnv1a(s string) uint64 {
	h := uint64(14695981039346656037)
	for i := 0; i < len(s); i++ {
		h ^= uint64(s[i])
		h *= 1099511628211
	}
	return h
}
