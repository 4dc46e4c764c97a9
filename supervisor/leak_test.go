package supervisor

import (
	"context"
	"path/filepath"
	"testing"
	"time"

	"github.com/sidecarlb/sidecar/internal/leakcheck"
)

// TestNoGoroutineLeak drives a supervisor through restarts, a rolling
// restart, a failed build and a kill; once Run has returned, every
// goroutine it started is gone. Not parallel: it counts goroutines.
func TestNoGoroutineLeak(t *testing.T) {
	leakcheck.Check(t)
	starts := filepath.Join(t.TempDir(), "starts")
	h := start(t, Spec{BackoffMin: time.Millisecond, BackoffMax: time.Millisecond, CrashLoopRestarts: -1,
		MemoryLimit: 1 << 30, Build: "exit 1"}, Options{MemoryInterval: 10 * time.Millisecond},
		"-exit", "1", "-after", "50ms", "-starts", starts)
	poll(t, 10*time.Second, "3 starts", func() bool { ts, _ := readStarts(t, starts); return len(ts) >= 3 })
	ctx := context.Background()
	if err := h.app.Restart(ctx); err != nil {
		t.Errorf("Restart() error: %v", err)
	}
	if _, err := h.app.Update(ctx); err == nil {
		t.Error("Update() with a failing build: no error")
	}
	if err := h.app.Kill(ctx); err != nil {
		t.Errorf("Kill() error: %v", err)
	}
	h.stop()
}
