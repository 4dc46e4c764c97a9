package resilience

import (
	"testing"
	"time"

	"github.com/sidecarlb/sidecar/config"
)

// TestOutlier: a run of gateway failures asks for an ejection, each
// ejection lasts longer up to the cap, and forgiveAfter successes bring it
// back to the base.
func TestOutlier(t *testing.T) {
	cfg := &config.Outlier{Enabled: true, ConsecutiveFailures: 3, BaseEjection: time.Second, MaxEjection: 3 * time.Second}
	clk := NewManual(time.Unix(1_700_000_000, 0))
	var o Outlier
	fail := func() bool {
		t.Helper()
		for i := 1; i <= 3; i++ {
			if got := o.Observe(cfg, true); got != (i == 3) {
				t.Fatalf("Observe(failure #%d) = %v, want %v", i, got, i == 3)
			}
		}
		return true
	}
	for i, want := range []time.Duration{time.Second, 2 * time.Second, 3 * time.Second, 3 * time.Second} {
		fail()
		d, times := o.Eject(cfg, clk.Now())
		if d != want || times != int32(i+1) {
			t.Fatalf("Eject() #%d = %v, %d, want %v, %d", i+1, d, times, want, i+1)
		}
		if !o.Ejected(clk.Now()) {
			t.Fatalf("Ejected() right after Eject() #%d = false, want true", i+1)
		}
		clk.Advance(d)
		if o.Ejected(clk.Now()) {
			t.Fatalf("Ejected() after %v = true, want false", d)
		}
	}
	if o.Observe(cfg, true); o.Consecutive() != 1 {
		t.Fatalf("Consecutive() = %d, want 1", o.Consecutive())
	}
	for range forgiveAfter {
		o.Observe(cfg, false)
	}
	if o.Consecutive() != 0 {
		t.Errorf("Consecutive() after a success = %d, want 0", o.Consecutive())
	}
	fail()
	if d, _ := o.Eject(cfg, clk.Now()); d != time.Second {
		t.Errorf("Eject() after %d successes = %v, want the base %v", forgiveAfter, d, time.Second)
	}

	off := &config.Outlier{ConsecutiveFailures: 1}
	var o2 Outlier
	if o2.Observe(off, true) {
		t.Error("Observe() with outlier detection off = true, want false")
	}
}

// TestManualClock: functions run when Advance passes their time, earliest
// first, and a stopped one never runs.
func TestManualClock(t *testing.T) {
	clk := NewManual(time.Unix(0, 0))
	var ran []int
	clk.AfterFunc(2*time.Second, func() { ran = append(ran, 2) })
	clk.AfterFunc(time.Second, func() { ran = append(ran, 1) })
	stopped := clk.AfterFunc(time.Second, func() { ran = append(ran, -1) })
	if !stopped.Stop() {
		t.Fatal("Stop() = false, want true")
	}
	clk.Advance(999 * time.Millisecond)
	if len(ran) != 0 {
		t.Fatalf("ran %v before their time", ran)
	}
	clk.Advance(2 * time.Second)
	if len(ran) != 2 || ran[0] != 1 || ran[1] != 2 {
		t.Errorf("ran %v, want [1 2]", ran)
	}
	if got := clk.Now(); !got.Equal(time.Unix(2, 999_000_000)) {
		t.Errorf("Now() = %v, want 2.999s past the epoch", got)
	}
}

// TestBreakerDisabled: a nil breaker allows every try.
func TestBreakerDisabled(t *testing.T) {
	b := NewBreaker("n", config.Breaker{}, nil)
	if b != nil {
		t.Fatalf("NewBreaker(disabled) = %v, want nil", b)
	}
	done, err := b.Allow()
	if err != nil {
		t.Fatalf("Allow() = %v, want nil", err)
	}
	done(ErrTripping)
	if got := b.State(); got != "disabled" {
		t.Errorf("State() = %q, want disabled", got)
	}
}

// TestBreakerOpens: consecutive tripping failures open it; refusals do not
// count.
func TestBreakerOpens(t *testing.T) {
	b := NewBreaker("n", config.Breaker{Enabled: true, ConsecutiveFailures: 2, OpenFor: time.Hour}, nil)
	for range 5 {
		done, err := b.Allow()
		if err != nil {
			t.Fatalf("Allow() = %v, want nil", err)
		}
		done(ErrRefused)
	}
	for range 2 {
		done, _ := b.Allow()
		done(ErrTripping)
	}
	if _, err := b.Allow(); err != ErrBreakerOpen {
		t.Errorf("Allow() after 2 failures = %v, want ErrBreakerOpen", err)
	}
	if got := b.State(); got != "open" {
		t.Errorf("State() = %q, want open", got)
	}
}
