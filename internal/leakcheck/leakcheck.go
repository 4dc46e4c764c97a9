// Package leakcheck fails a test that leaves goroutines running.
package leakcheck

import (
	"runtime"
	"testing"
	"time"
)

// Check fails t if, once the cleanups registered after this call have run
// (cleanups run last-registered first), more goroutines run than when it
// was called. Goroutines get up to five seconds to wind down. Call it first
// in a test, and not in parallel tests, whose goroutines it would count.
func Check(t testing.TB) {
	t.Helper()
	before := runtime.NumGoroutine()
	t.Cleanup(func() {
		deadline := time.Now().Add(5 * time.Second)
		for {
			n := runtime.NumGoroutine()
			if n <= before {
				return
			}
			if time.Now().After(deadline) {
				buf := make([]byte, 1<<20)
				buf = buf[:runtime.Stack(buf, true)]
				t.Errorf("NumGoroutine() = %d after the test, want <= %d\n%s", n, before, buf)
				return
			}
			time.Sleep(5 * time.Millisecond)
		}
	})
}
