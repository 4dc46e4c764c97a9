package main

import (
	"testing"
	"time"

	"github.com/sidecarlb/sidecar/internal/wait"

	"go.uber.org/zap"

	"github.com/sidecarlb/sidecar/discovery"
)

// TestReadinessClientOnly: a sidecar without a service section is ready
// once started and its upstreams' first discovery answers arrived, and not
// ready again once shutdown begins.
func TestReadinessClientOnly(t *testing.T) {
	static, err := discovery.NewStatic(map[string][]string{"echo": {"127.0.0.1:9001"}})
	if err != nil {
		t.Fatal(err)
	}
	cache := discovery.NewCache(static, discovery.CacheOptions{}, zap.NewNop())
	defer cache.Close()
	r := &readiness{cache: cache, upstreams: []string{"echo"}}

	if ok, why := r.check(); ok || why != "starting" {
		t.Errorf("check() before start = %v, %q, want false, starting", ok, why)
	}
	r.started.Store(true)
	if ok, why := r.check(); ok || why != `waiting for discovery of "echo"` {
		t.Errorf("check() before discovery = %v, %q, want false, waiting for discovery of \"echo\"", ok, why)
	}
	cache.Pin("echo")
	wait.For(t, 10*time.Second, "check() to be ready after the watch started", func() bool {
		ok, _ := r.check()
		return ok
	})
	r.draining.Store(true)
	if ok, why := r.check(); ok || why != "draining" {
		t.Errorf("check() while draining = %v, %q, want false, draining", ok, why)
	}
}
