package balancer

import "github.com/sidecarlb/sidecar/discovery"

// maxWeight caps an endpoint's weight so that sums over any realistic set
// cannot overflow a uint64.
const maxWeight = 1 << 32

// weightOf returns e's weight clamped to [1, maxWeight]. discovery already
// guarantees at least 1; the clamp keeps the arithmetic here safe regardless.
func weightOf(e *discovery.Endpoint) uint64 {
	switch {
	case e.Weight < 1:
		return 1
	case e.Weight > maxWeight:
		return maxWeight
	}
	return uint64(e.Weight)
}

// uniformWeights reports whether every endpoint has the same weight, in which
// case the balancers take their cheaper unweighted paths.
func uniformWeights(eps []discovery.Endpoint) bool {
	for i := 1; i < len(eps); i++ {
		if weightOf(&eps[i]) != weightOf(&eps[0]) {
			return false
		}
	}
	return true
}

func gcd(a, b uint64) uint64 {
	for b != 0 {
		a, b = b, a%b
	}
	return a
}
