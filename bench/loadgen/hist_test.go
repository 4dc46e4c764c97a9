package main

import (
	"math"
	"testing"
	"time"
)

func TestHistQuantile(t *testing.T) {
	h := newHist()
	for i := 1; i <= 10000; i++ {
		h.record(time.Duration(i) * time.Microsecond)
	}
	tests := []struct {
		q    float64
		want float64 // ns
	}{{0.5, 5000e3}, {0.99, 9900e3}, {0.999, 9990e3}, {1, 10000e3}}
	for _, tc := range tests {
		got := float64(h.quantile(tc.q))
		if math.Abs(got-tc.want)/tc.want > 0.016 {
			t.Errorf("quantile(%v) = %v, want %v ± 1.6 %%", tc.q, got, tc.want)
		}
	}
	if got, want := h.mean(), 5000.5e3; math.Abs(got-want) > 1 {
		t.Errorf("mean() = %v, want %v", got, want)
	}
}

func TestHistIndexMonotonic(t *testing.T) {
	prev := -1
	for v := uint64(0); v < 1<<20; v += 7 {
		i := histIndex(v)
		if i < prev {
			t.Fatalf("histIndex(%d) = %d, below %d", v, i, prev)
		}
		if mid := histValue(i); v >= 128 && math.Abs(float64(mid)-float64(v))/float64(v) > 0.016 {
			t.Fatalf("histValue(histIndex(%d)) = %d, off by more than 1.6 %%", v, mid)
		}
		prev = i
	}
	if i := histIndex(math.MaxUint64); i >= histBuckets {
		t.Fatalf("histIndex(max) = %d, want < %d", i, histBuckets)
	}
}
