// Package leakcheck fails a test that leaves goroutines running.
package leakcheck

import (
	"bytes"
	"runtime"
	"slices"
	"testing"
	"time"
)

// lifetime names the functions of goroutines that live as long as the
// process once started, and so are not leaks: rawio's relay loops.
var lifetime = [][]byte{[]byte("rawio.(*relayLoop).run(")}

// count is runtime.NumGoroutine() without the lifetime goroutines.
func count() (int, []byte) {
	buf := make([]byte, 1<<20)
	for {
		n := runtime.Stack(buf, true)
		if n < len(buf) {
			buf = buf[:n]
			break
		}
		buf = make([]byte, 2*len(buf))
	}
	n := 0
	for g := range bytes.SplitSeq(buf, []byte("\n\n")) {
		if !slices.ContainsFunc(lifetime, func(f []byte) bool { return bytes.Contains(g, f) }) {
			n++
		}
	}
	return n, buf
}

// Check fails t if, once the cleanups registered after this call have run
// (cleanups run last-registered first), more goroutines run than when it
// was called. Goroutines get up to five seconds to wind down. Call it first
// in a test, and not in parallel tests, whose goroutines it would count.
func Check(t testing.TB) {
	t.Helper()
	before, _ := count()
	t.Cleanup(func() {
		deadline := time.Now().Add(5 * time.Second)
		for {
			n, stacks := count()
			if n <= before {
				return
			}
			if time.Now().After(deadline) {
				t.Errorf("%d goroutines after the test, want <= %d\n%s", n, before, stacks)
				return
			}
			time.Sleep(5 * time.Millisecond)
		}
	})
}
