package backoff

import (
	"context"
	"testing"
	"time"
)

func TestExponential(t *testing.T) {
	tests := []struct {
		name string
		e    Exponential
		n    int
		want time.Duration // before jitter
	}{
		{"first", Exponential{Base: 100 * time.Millisecond, Max: time.Second}, 1, 100 * time.Millisecond},
		{"below one", Exponential{Base: 100 * time.Millisecond, Max: time.Second}, 0, 100 * time.Millisecond},
		{"doubles", Exponential{Base: 100 * time.Millisecond, Max: time.Second}, 3, 400 * time.Millisecond},
		{"capped", Exponential{Base: 100 * time.Millisecond, Max: time.Second}, 5, time.Second},
		{"far past the cap", Exponential{Base: 100 * time.Millisecond, Max: time.Second}, 1000, time.Second},
		{"no cap", Exponential{Base: time.Millisecond}, 11, 1024 * time.Millisecond},
		{"no cap, huge n", Exponential{Base: time.Hour}, 1000, maxDelay},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			for _, jitter := range []float64{0, 0.2, 0.5} {
				e := tc.e
				e.Jitter = jitter
				lo := time.Duration(float64(tc.want) * (1 - jitter))
				hi := time.Duration(float64(tc.want) * (1 + jitter))
				seen := map[time.Duration]bool{}
				for range 200 {
					got := e.Backoff(tc.n)
					if got < lo || got > hi {
						t.Fatalf("%+v.Backoff(%d) = %v, want %v ±%v%%", e, tc.n, got, tc.want, jitter*100)
					}
					seen[got] = true
				}
				if jitter > 0 && len(seen) < 50 {
					t.Errorf("%+v.Backoff(%d): %d distinct delays in 200, want jitter to spread them", e, tc.n, len(seen))
				}
			}
		})
	}
}

func TestJitter(t *testing.T) {
	if got := Jitter(time.Second, 0); got != time.Second {
		t.Errorf("Jitter(1s, 0) = %v, want 1s", got)
	}
	if got := Jitter(0, 0.5); got != 0 {
		t.Errorf("Jitter(0, 0.5) = %v, want 0", got)
	}
	for range 200 {
		if got := Jitter(time.Second, 2); got < 0 || got > 2*time.Second {
			t.Fatalf("Jitter(1s, 2) = %v, want within [0, 2s] (frac clamped to 1)", got)
		}
	}
}

func TestWait(t *testing.T) {
	if !Wait(context.Background(), 0) {
		t.Error("Wait(live, 0) = false, want true")
	}
	if !Wait(context.Background(), time.Millisecond) {
		t.Error("Wait(live, 1ms) = false, want true")
	}
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if Wait(ctx, 0) {
		t.Error("Wait(done, 0) = true, want false")
	}
	done := make(chan bool)
	go func() { done <- Wait(ctx, time.Hour) }()
	select {
	case got := <-done:
		if got {
			t.Error("Wait(done, 1h) = true, want false")
		}
	case <-time.After(5 * time.Second):
		t.Fatal("Wait(done, 1h) did not return when ctx was done")
	}
}
