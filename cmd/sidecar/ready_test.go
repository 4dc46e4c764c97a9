package main

import (
	"testing"
	"time"

	"github.com/sidecarlb/sidecar/internal/wait"

	"go.uber.org/zap"

	"github.com/sidecarlb/sidecar/config"
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

// TestRepin: after a reload, the upstreams in effect are pinned and those
// removed are not (the cache may evict them), and readiness waits only for
// the upstreams in effect.
func TestRepin(t *testing.T) {
	parse := func(upstreams string) *config.Config {
		t.Helper()
		cfg, err := config.ParseEnv([]byte("discovery: {backend: static, static: {a: [127.0.0.1:9001], b: [127.0.0.1:9002]}}\nupstreams:\n"+upstreams),
			"config.yaml", nil)
		if err != nil {
			t.Fatal(err)
		}
		return cfg
	}
	running := parse("  - {name: a, listen: 127.0.0.1:16001}\n")
	eff := parse("  - {name: b, listen: 127.0.0.1:16002}\n")
	static, err := discovery.NewStatic(map[string][]string{"a": {"127.0.0.1:9001"}, "b": {"127.0.0.1:9002"}})
	if err != nil {
		t.Fatal(err)
	}
	cache := discovery.NewCache(static, discovery.CacheOptions{}, zap.NewNop())
	defer cache.Close()
	cache.Pin("a")
	repin(cache, running, eff)
	if cache.Pinned("a") || !cache.Pinned("b") {
		t.Errorf("Pinned(a), Pinned(b) = %v, %v after the reload, want false, true", cache.Pinned("a"), cache.Pinned("b"))
	}
	cur := eff
	r := &readiness{cache: cache, upstreams: []string{"a"}, current: func() []string {
		return []string{upstreamKey(cur, cur.Upstreams[0])}
	}}
	r.started.Store(true)
	deadline := time.Now().Add(10 * time.Second)
	for ok, why := r.check(); !ok; ok, why = r.check() {
		if time.Now().After(deadline) {
			t.Fatalf("check() = false, %q; want ready once b answered", why)
		}
		time.Sleep(5 * time.Millisecond)
	}
}
