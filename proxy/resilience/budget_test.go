package resilience

import (
	"testing"
	"time"

	"github.com/sidecarlb/sidecar/config"
)

func TestRetryBudget(t *testing.T) {
	t0 := time.Unix(1_700_000_000, 0)
	tests := []struct {
		name     string
		requests int // offered at t0
		at       time.Duration
		spent    int // retries spent at t0
		want     int // further retries allowed at t0+at
	}{
		{name: "floor with no requests", want: 30},
		{name: "floor above percent", requests: 100, want: 30},
		{name: "percent above floor", requests: 1000, want: 200},
		{name: "percent partly spent", requests: 1000, spent: 150, want: 50},
		{name: "spent within window", requests: 1000, spent: 200, at: 9 * time.Second, want: 0},
		{name: "window slid past", requests: 1000, spent: 200, at: 10 * time.Second, want: 30},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			b := NewBudget(config.Budget{Percent: 20, MinPerSecond: 3, Window: 10 * time.Second})
			for range tc.requests {
				b.Request(t0)
			}
			for i := range tc.spent {
				if !b.Spend(t0) {
					t.Fatalf("Spend() #%d at t0 = false, want true", i+1)
				}
			}
			now := t0.Add(tc.at)
			got := 0
			for got < 10_000 && b.Spend(now) {
				got++
			}
			if got != tc.want {
				t.Errorf("Spend() allowed %d retries, want %d", got, tc.want)
			}
		})
	}

	t.Run("sliding", func(t *testing.T) {
		// 500 requests in each of 10 seconds: 1000 retries over the
		// window; a second later the oldest second's share is gone.
		b := NewBudget(config.Budget{Percent: 20, MinPerSecond: 3, Window: 10 * time.Second})
		for s := range 10 {
			now := t0.Add(time.Duration(s) * time.Second)
			for range 500 {
				b.Request(now)
			}
		}
		last := t0.Add(9 * time.Second)
		n := 0
		for n < 10_000 && b.Spend(last) {
			n++
		}
		if n != 1000 {
			t.Fatalf("Spend() allowed %d retries over 5000 requests, want 1000", n)
		}
		// One second on: 4500 requests left in the window (900 allowed),
		// all 1000 retries still in it.
		if b.Spend(t0.Add(10 * time.Second)) {
			t.Errorf("Spend() one second on = true, want false: retries still exceed 20%%")
		}
		// Eleven seconds after the last retries, nothing is left but the
		// floor.
		later := t0.Add(19 * time.Second)
		n = 0
		for n < 10_000 && b.Spend(later) {
			n++
		}
		if n != 30 {
			t.Errorf("Spend() after the window allowed %d, want 30", n)
		}
	})

	t.Run("refund", func(t *testing.T) {
		// A retry decided on but never sent gives its share back; one
		// from a second that has left the window has nothing to give.
		b := NewBudget(config.Budget{Percent: 20, MinPerSecond: 3, Window: 10 * time.Second})
		for n := 0; n < 30; n++ {
			if !b.Spend(t0) {
				t.Fatalf("Spend() #%d = false, want true", n+1)
			}
		}
		if b.Spend(t0) {
			t.Fatal("Spend() past the floor = true, want false")
		}
		b.Refund(t0)
		if !b.Spend(t0) {
			t.Error("Spend() after a refund = false, want true")
		}
		b.Refund(t0.Add(-10 * time.Second)) // the same bucket, an older second
		if b.Spend(t0) {
			t.Error("Spend() after refunding a second out of the window = true, want false")
		}
	})
}
