package httpserver

import (
	"context"
	"errors"
	"testing"
	"time"
)

// TestTrackerShutdown: Shutdown refuses new connections, calls idle for
// each connection held, and returns once the last one is untracked.
func TestTrackerShutdown(t *testing.T) {
	var tr Tracker[int]
	for c := range 3 {
		if !tr.Track(c) {
			t.Fatalf("Track(%d) = false before Shutdown, want true", c)
		}
	}
	if n := tr.Range(func(int) {}); n != 3 {
		t.Fatalf("Range() = %d, want 3", n)
	}
	idled := make(chan int, 3)
	done := make(chan error, 1)
	go func() { done <- tr.Shutdown(context.Background(), func(c int) { idled <- c }) }()
	seen := map[int]bool{}
	for range 3 {
		seen[<-idled] = true
	}
	if len(seen) != 3 {
		t.Fatalf("idle called for %v, want each of 0, 1, 2 once", seen)
	}
	if tr.Track(9) {
		t.Error("Track after Shutdown = true, want false")
	}
	if !tr.Closed() {
		t.Error("Closed() after Shutdown = false, want true")
	}
	tr.Untrack(0)
	tr.Untrack(1)
	select {
	case err := <-done:
		t.Fatalf("Shutdown returned %v with a connection left, want it waiting", err)
	case <-time.After(50 * time.Millisecond):
	}
	tr.Untrack(2)
	select {
	case err := <-done:
		if err != nil {
			t.Errorf("Shutdown() = %v, want nil once every connection went", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("Shutdown still waiting 5s after the last connection went")
	}
}

// TestTrackerShutdownContext: Shutdown with connections left returns its
// context's error when the context ends, and at once when none is held.
func TestTrackerShutdownContext(t *testing.T) {
	var empty Tracker[int]
	if err := empty.Shutdown(context.Background(), func(int) {}); err != nil {
		t.Errorf("Shutdown() with no connection = %v, want nil", err)
	}
	var tr Tracker[int]
	tr.Track(1)
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if err := tr.Shutdown(ctx, func(int) {}); !errors.Is(err, context.Canceled) {
		t.Errorf("Shutdown() with a connection left = %v, want context.Canceled", err)
	}
}

// TestTrackerClose: Close refuses new connections and calls closeConn for
// each one held, without waiting for them.
func TestTrackerClose(t *testing.T) {
	var tr Tracker[string]
	tr.Track("a")
	tr.Track("b")
	tr.Untrack("b")
	var closed []string
	tr.Close(func(c string) { closed = append(closed, c) })
	if len(closed) != 1 || closed[0] != "a" {
		t.Errorf("Close closed %v, want [a]", closed)
	}
	if tr.Track("c") {
		t.Error("Track after Close = true, want false")
	}
}
