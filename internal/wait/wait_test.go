package wait

import (
	"testing"
	"time"
)

type fakeT struct {
	testing.TB
	failed string
}

func (f *fakeT) Helper() {}
func (f *fakeT) Fatalf(format string, args ...any) {
	f.failed = format
	panic(f)
}

func TestFor(t *testing.T) {
	n := 0
	For(t, time.Second, "the third poll", func() bool { n++; return n == 3 })
	if n != 3 {
		t.Errorf("cond ran %d times, want 3", n)
	}

	ft := &fakeT{TB: t}
	func() {
		defer func() {
			if r := recover(); r != ft {
				t.Fatalf("recover() = %v, want the fake's Fatalf", r)
			}
		}()
		For(ft, 20*time.Millisecond, "never", func() bool { return false })
	}()
	if ft.failed == "" {
		t.Error("For() with a condition that never holds did not fail the test")
	}
}
