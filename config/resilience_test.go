package config

import (
	"strings"
	"testing"
	"time"
)

func TestResilienceInheritance(t *testing.T) {
	t.Parallel()
	c, err := ParseEnv([]byte(`
proxy:
  resilience:
    retries: {attempts: 3, budget: {percent: 10}}
    breaker: {open_for: 2s}
    limits: {max_connections: 64}
upstreams:
  - name: a
    listen: 127.0.0.1:15002
    resilience:
      retries: {attempts: 0}
      outlier: {enabled: false}
      limits: {max_requests: 10}
  - name: b
    listen: 127.0.0.1:15003
`), "test.yaml", nil)
	if err != nil {
		t.Fatal(err)
	}
	a, b := c.Upstreams[0].Resilience, c.Upstreams[1].Resilience
	tests := []struct {
		name      string
		got, want any
	}{
		{"proxy attempts", c.Proxy.Resilience.Retries.Attempts, 3},
		{"proxy budget percent", c.Proxy.Resilience.Retries.Budget.Percent, 10},
		{"proxy budget min kept", c.Proxy.Resilience.Retries.Budget.MinPerSecond, 3},
		{"a attempts overridden to 0", a.Retries.Attempts, 0},
		{"a budget inherited", a.Retries.Budget.Percent, 10},
		{"a outlier disabled", a.Outlier.Enabled, false},
		{"a breaker inherited", a.Breaker.OpenFor, 2 * time.Second},
		{"proxy max_connections", c.Proxy.Resilience.Limits.MaxConnections, 64},
		{"proxy max_pending_requests default", c.Proxy.Resilience.Limits.MaxPendingRequests, 1024},
		{"proxy max_requests default", c.Proxy.Resilience.Limits.MaxRequests, 1024},
		{"a max_requests overridden", a.Limits.MaxRequests, 10},
		{"a max_connections inherited", a.Limits.MaxConnections, 64},
		{"b inherits all", b, c.Proxy.Resilience},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			if tc.got != tc.want {
				t.Errorf("got %+v, want %+v", tc.got, tc.want)
			}
		})
	}
}

func TestResilienceErrors(t *testing.T) {
	t.Parallel()
	tests := []struct{ yaml, want string }{
		{"proxy: {resilience: {retries: {attempts: -1}}}", "proxy.resilience.retries.attempts: must be at least 0"},
		{"proxy: {resilience: {outlier: {max_ejection_percent: 101}}}", "proxy.resilience.outlier.max_ejection_percent: must be a percentage"},
		{"proxy: {resilience: {breaker: {open_for: 0s}}}", "proxy.resilience.breaker.open_for"},
		{"proxy: {resilience: {limits: {max_connections: 0}}}", "proxy.resilience.limits.max_connections: must be at least 1, got 0"},
		{"proxy: {resilience: {limits: {max_pending_requests: -1}}}", "proxy.resilience.limits.max_pending_requests: must be at least 1"},
		{"upstreams: [{name: a, listen: '127.0.0.1:1', resilience: {limits: {max_requests: 0}}}]", "upstreams[0].resilience.limits.max_requests: must be at least 1"},
		{"proxy: {resilience: {limits: {max_conections: 1}}}", `proxy.resilience.limits.max_conections: unknown key (did you mean "max_connections"?)`},
		{"proxy: {resilience: {brekaer: {}}}", `proxy.resilience.brekaer: unknown key (did you mean "breaker"?)`},
		{"upstreams: [{name: a, listen: '127.0.0.1:1', resilience: {retries: {budget: {window: 0s}}}}]", "upstreams[0].resilience.retries.budget.window"},
	}
	for _, tc := range tests {
		t.Run(tc.want, func(t *testing.T) {
			_, err := ParseEnv([]byte(tc.yaml), "test.yaml", nil)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("Parse(%q) error = %v, want it to contain %q", tc.yaml, err, tc.want)
			}
		})
	}
}
