package balancer

import (
	"testing"
)

func TestRandomSpread(t *testing.T) {
	tests := []struct {
		name     string
		weights  []int
		min, max []float64 // bounds on each endpoint's share
	}{
		{"uniform", []int{1, 1, 1}, []float64{0.25, 0.25, 0.25}, []float64{0.42, 0.42, 0.42}},
		{"weighted 3:1", []int{3, 1}, []float64{0.65, 0.15}, []float64{0.85, 0.35}},
		{"weighted 1:2:1", []int{1, 2, 1}, []float64{0.15, 0.40, 0.15}, []float64{0.35, 0.60, 0.35}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			eps := weightedEndpoints(tc.weights...)
			r := NewRandom()
			r.Update(eps)
			const picks = 30000
			counts := map[string]int{}
			for range picks {
				counts[pickID(t, r, &Request{})]++
			}
			for i, e := range eps {
				share := float64(counts[e.ID]) / picks
				if share < tc.min[i] || share > tc.max[i] {
					t.Errorf("share of %s = %.3f, want in [%.2f, %.2f]", e.ID, share, tc.min[i], tc.max[i])
				}
			}
		})
	}
}

func TestSearchAbove(t *testing.T) {
	cum := []uint64{3, 4, 9} // weights 3, 1, 5
	tests := []struct {
		v    uint64
		want int
	}{{0, 0}, {2, 0}, {3, 1}, {4, 2}, {8, 2}}
	for _, tc := range tests {
		if got := searchAbove(cum, tc.v); got != tc.want {
			t.Errorf("searchAbove(%v, %d) = %d, want %d", cum, tc.v, got, tc.want)
		}
	}
}
