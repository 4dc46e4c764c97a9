package balancer

import (
	"slices"
	"strings"
	"testing"

	"github.com/sidecarlb/sidecar/discovery"
)

func TestRoundRobinEven(t *testing.T) {
	eps := testEndpoints(3)
	rr := NewRoundRobin()
	rr.Update(eps)
	counts := map[string]int{}
	for range 3000 {
		counts[pickID(t, rr, &Request{})]++
	}
	for _, e := range eps {
		if got := counts[e.ID]; got != 1000 {
			t.Errorf("picks of %s = %d, want 1000", e.ID, got)
		}
	}
}

func TestRoundRobinRotates(t *testing.T) {
	rr := NewRoundRobin()
	rr.Update(testEndpoints(3))
	var got []string
	for range 7 {
		got = append(got, pickID(t, rr, nil))
	}
	want := []string{"node-00000", "node-00001", "node-00002", "node-00000", "node-00001", "node-00002", "node-00000"}
	if !slices.Equal(got, want) {
		t.Errorf("Pick() sequence = %v, want %v", got, want)
	}
	// The rotation goes on across an Update rather than restarting.
	rr.Update(testEndpoints(3))
	if got, want := pickID(t, rr, nil), "node-00001"; got != want {
		t.Errorf("Pick() after Update = %v, want %v", got, want)
	}
}

func TestRoundRobinWeighted(t *testing.T) {
	tests := []struct {
		name    string
		weights []int
		// cycle is one full schedule as endpoint letters, from the
		// start; empty to check only the counts.
		cycle string
		// maxRun bounds consecutive picks of one endpoint, cyclically.
		maxRun int
	}{
		// nginx's documented example for {a:5, b:1, c:1}.
		{"5:1:1", []int{5, 1, 1}, "aabacaa", 4},
		{"2:1", []int{2, 1}, "aba", 2},
		{"gcd reduced 10:20", []int{10, 20}, "bab", 2},
		{"3:2:1", []int{3, 2, 1}, "abacba", 2},
		{"huge weights scaled", []int{1 << 30, 1 << 29, 1}, "", 2},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			eps := weightedEndpoints(tc.weights...)
			rr := NewRoundRobin()
			rr.Update(eps)
			sched := rr.state.Load().schedule
			if limit := int(scheduleLimit(len(eps))) + len(eps); len(sched) > limit {
				t.Fatalf("schedule length = %d, want at most %d", len(sched), limit)
			}
			var seq strings.Builder
			for range len(sched) {
				id := pickID(t, rr, &Request{})
				seq.WriteByte(byte('a' + slices.IndexFunc(eps, func(e discovery.Endpoint) bool { return e.ID == id })))
			}
			got := seq.String()
			if tc.cycle != "" && got != tc.cycle {
				t.Errorf("Pick() cycle = %q, want %q", got, tc.cycle)
			}
			// Over a full cycle the counts follow the weights exactly.
			w := reducedWeights(eps)
			for i := range eps {
				if n := strings.Count(got, string(rune('a'+i))); uint64(n) != w[i] {
					t.Errorf("picks of %s per cycle = %d, want %d", eps[i].ID, n, w[i])
				}
			}
			if run := longestRun(got); run > tc.maxRun {
				t.Errorf("longest run in %q = %d, want at most %d", got, run, tc.maxRun)
			}
		})
	}
}

// TestRoundRobinLargeWeighted covers sets too large for the exact smooth
// schedule, which use stride scheduling.
func TestRoundRobinLargeWeighted(t *testing.T) {
	weights := make([]int, 10000)
	for i := range weights {
		weights[i] = 1 + i%3
	}
	eps := weightedEndpoints(weights...)
	rr := NewRoundRobin()
	rr.Update(eps)
	sched := rr.state.Load().schedule
	counts := make([]int, len(eps))
	for _, i := range sched {
		counts[i]++
	}
	for i, e := range eps {
		if counts[i] != e.Weight {
			t.Fatalf("slots of %s = %d, want %d", e.ID, counts[i], e.Weight)
		}
	}
	// A weight-3 endpoint's turns are spread over the cycle, not bunched.
	var pos []int
	for p, i := range sched {
		if i == 2 {
			pos = append(pos, p)
		}
	}
	for k := 1; k < len(pos); k++ {
		if gap := pos[k] - pos[k-1]; gap < len(sched)/6 {
			t.Errorf("turns of %s at %v, want spread over %d slots", eps[2].ID, pos, len(sched))
		}
	}
}

// longestRun returns the longest run of one letter in the cyclic sequence s.
func longestRun(s string) int {
	best, run := 0, 0
	ss := s + s
	for i := range ss {
		if i > 0 && ss[i] == ss[i-1] {
			run++
		} else {
			run = 1
		}
		best = max(best, min(run, len(s)))
	}
	return best
}
