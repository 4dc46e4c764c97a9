package memtune

import (
	"context"
	"math"
	"sync"
	"testing"
	"time"
)

func TestLimit(t *testing.T) {
	tests := []struct {
		name  string
		live  uint64
		floor int64
		want  int64
	}{
		{"small heap: the floor", 2 << 20, 20 << 20, 20 << 20},
		{"at the floor", 9 << 20, 20 << 20, 20 << 20},
		{"large heap: twice it and the slack", 100 << 20, 20 << 20, 202 << 20},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			if got := Limit(tc.live, tc.floor); got != tc.want {
				t.Errorf("Limit(%d, %d) = %d, want %d", tc.live, tc.floor, got, tc.want)
			}
		})
	}
}

// TestRunFollowsTheHeap: the limit is set at once, moves with the live
// heap, and the one found is put back when the context ends.
func TestRunFollowsTheHeap(t *testing.T) {
	var mu sync.Mutex
	live := uint64(1 << 20)
	var sets []int64
	current := int64(math.MaxInt64)
	set := func(n int64) int64 {
		mu.Lock()
		defer mu.Unlock()
		prev := current
		current = n
		sets = append(sets, n)
		return prev
	}
	read := func() uint64 { mu.Lock(); defer mu.Unlock(); return live }
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); run(ctx, 20<<20, time.Millisecond, read, set) }()
	waitFor(t, func() bool { mu.Lock(); defer mu.Unlock(); return current == 20<<20 })
	mu.Lock()
	live = 50 << 20
	mu.Unlock()
	waitFor(t, func() bool { mu.Lock(); defer mu.Unlock(); return current == 102<<20 })
	cancel()
	<-done
	if current != math.MaxInt64 {
		t.Errorf("limit after Run = %d, want the one before it (%d)", current, int64(math.MaxInt64))
	}
}

func waitFor(t *testing.T, cond func() bool) {
	t.Helper()
	for deadline := time.Now().Add(5 * time.Second); !cond(); time.Sleep(time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("timed out")
		}
	}
}
