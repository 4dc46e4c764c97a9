// Package wait is the tests' one "eventually": poll a condition until it
// holds or a bound passes, then fail the test naming what was awaited.
// Tests that can move a clock instead (proxy/resilience.Manual) should.
package wait

import (
	"testing"
	"time"
)

// Interval is how often For polls.
const Interval = 5 * time.Millisecond

// For polls cond every Interval until it reports true, and fails t with
// "timed out after <within> waiting for <what>" if within passes first. It
// returns how long it waited. cond runs in the caller's goroutine.
func For(t testing.TB, within time.Duration, what string, cond func() bool) time.Duration {
	t.Helper()
	start := time.Now()
	deadline := start.Add(within)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %v waiting for %s", within, what)
		}
		time.Sleep(Interval)
	}
	return time.Since(start)
}
