package proxy

import (
	"net/http"
	"testing"
	"time"

	"github.com/sidecarlb/sidecar/internal/wait"
)

func TestBreakerCycle(t *testing.T) {
	res := resDefaults(t)
	res.Outlier.Enabled = false // the breaker alone keeps traffic off
	res.Breaker.ConsecutiveFailures = 3
	res.Breaker.OpenFor = 300 * time.Millisecond
	res.Retries.Backoff = time.Millisecond
	nodes := resStartNodes(t, 2)
	flaky := nodes[0]
	s := resProxy(t, resAddrs(nodes), RouteConfig{Resilience: res})
	state := func() float64 {
		return s.metric(t, "sidecar_breaker_state", map[string]string{"endpoint": flaky.addr})
	}
	transitions := func(to string) float64 {
		return s.metric(t, "sidecar_breaker_transitions_total", map[string]string{"endpoint": flaky.addr, "state": to})
	}
	get := func(n int) {
		t.Helper()
		for i := range n {
			if r := s.do(t, http.MethodGet, "/", nil); r.status != http.StatusOK {
				t.Fatalf("GET #%d: status %d (%s), want 200", i, r.status, r.body)
			}
		}
	}

	get(4)
	if got := s.endpoint(t, flaky.addr).Breaker; got != "closed" {
		t.Fatalf("breaker = %q, want closed", got)
	}
	flaky.stop() // dials refused from now on
	get(12)
	if got := s.endpoint(t, flaky.addr).Breaker; got != "open" {
		t.Fatalf("after refused dials breaker = %q, want open", got)
	}
	if got := state(); got != 2 {
		t.Errorf("sidecar_breaker_state = %v, want 2 (open)", got)
	}
	openedAt := time.Now()

	// Back on the same port: after open_for one probe goes through, and
	// its success closes the breaker.
	hits := flaky.hits.Load()
	flaky.start(t, flaky.addr)
	t.Cleanup(flaky.stop)
	for time.Since(openedAt) < 200*time.Millisecond {
		get(1)
	}
	if got := flaky.hits.Load() - hits; got != 0 {
		t.Errorf("open breaker let %d requests through before open_for", got)
	}
	wait.For(t, 2*time.Second, "the breaker to close", func() bool {
		get(1)
		return s.endpoint(t, flaky.addr).Breaker == "closed"
	})
	if got := state(); got != 0 {
		t.Errorf("sidecar_breaker_state = %v, want 0 (closed)", got)
	}
	for _, to := range []string{"open", "half-open", "closed"} {
		if got := transitions(to); got != 1 {
			t.Errorf(`sidecar_breaker_transitions_total{state=%q} = %v, want 1`, to, got)
		}
	}
	if flaky.hits.Load() == hits {
		t.Error("the revived node got no request")
	}
}

func TestBreakerHalfOpenFailureReopens(t *testing.T) {
	res := resDefaults(t)
	res.Outlier.Enabled = false
	res.Breaker.ConsecutiveFailures = 2
	res.Breaker.OpenFor = 100 * time.Millisecond
	nodes := resStartNodes(t, 2)
	dead := resDeadAddr(t)
	s := resProxy(t, append(resAddrs(nodes), dead), RouteConfig{Resilience: res})
	wait.For(t, 2*time.Second, "a second opening", func() bool {
		if r := s.do(t, http.MethodGet, "/", nil); r.status != http.StatusOK {
			t.Fatalf("status %d (%s), want 200", r.status, r.body)
		}
		return s.metric(t, "sidecar_breaker_transitions_total", map[string]string{"endpoint": dead, "state": "open"}) >= 2
	})
	if got := s.metric(t, "sidecar_breaker_transitions_total", map[string]string{"endpoint": dead, "state": "half-open"}); got < 1 {
		t.Errorf(`transitions{state="half-open"} = %v, want >= 1`, got)
	}
	if got := s.metric(t, "sidecar_breaker_transitions_total", map[string]string{"endpoint": dead, "state": "closed"}); got != 0 {
		t.Errorf(`transitions{state="closed"} = %v, want 0: the probe failed`, got)
	}
}
