package balancer

import "github.com/sidecarlb/sidecar/discovery"

// excluded reports whether id is in ex. Exclude lists are short (the
// endpoints already tried for one request), so a linear scan beats a map, and
// the common empty list costs one length check.
func excluded(ex []string, id string) bool {
	for _, x := range ex {
		if x == id {
			return true
		}
	}
	return false
}

// nextAllowed returns the first index at or after i, wrapping around, whose
// endpoint is not in ex, or -1 if every endpoint is. With an empty ex it
// returns i without looking at eps.
func nextAllowed(eps []discovery.Endpoint, i int, ex []string) int {
	if len(ex) == 0 {
		return i
	}
	n := len(eps)
	for step := 0; step < n; step++ {
		j := i + step
		if j >= n {
			j -= n
		}
		if !excluded(ex, eps[j].ID) {
			return j
		}
	}
	return -1
}
