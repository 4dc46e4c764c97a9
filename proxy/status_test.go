package proxy

import (
	"encoding/json"
	"net/http"
	"testing"
	"time"

	"github.com/sidecarlb/sidecar/config"
)

// statusJSON returns the endpoints of the only route as /status encodes
// them: the fields the dashboard reads.
func statusJSON(t *testing.T, px *Proxy) map[string]map[string]any {
	t.Helper()
	b, err := json.Marshal(px.Status())
	if err != nil {
		t.Fatal(err)
	}
	var routes []struct {
		Endpoints []map[string]any `json:"endpoints"`
	}
	if err := json.Unmarshal(b, &routes); err != nil {
		t.Fatal(err)
	}
	out := map[string]map[string]any{}
	for _, r := range routes {
		for _, e := range r.Endpoints {
			out[e["addr"].(string)] = e
		}
	}
	return out
}

// TestStatusNodeFigures: /status gives each node its state (serving or
// ejected), request rate, error rate and latency percentiles.
func TestStatusNodeFigures(t *testing.T) {
	good := startServer(t, nodeHandler("good"))
	bad := startServer(t, http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		w.WriteHeader(http.StatusServiceUnavailable)
	}))
	goodAddr, badAddr := good.Listener.Addr().String(), bad.Listener.Addr().String()
	cfg, err := config.ParseEnv(nil, "t", nil)
	if err != nil {
		t.Fatal(err)
	}
	res := cfg.Proxy.Resilience
	res.Breaker.Enabled = false
	res.Retries.Attempts = 1
	res.Outlier.Enabled = true
	res.Outlier.ConsecutiveFailures = 3
	res.Outlier.BaseEjection = time.Minute
	res.Outlier.MaxEjectionPercent = 50
	px := New(staticCache(t, map[string][]string{"svc": {goodAddr, badAddr}}), nil, testLogger(t))
	h, err := px.Upstream("test", RouteConfig{Service: "svc", Timeouts: sidecarTimeouts(), Resilience: res})
	if err != nil {
		t.Fatal(err)
	}
	srv := startProxyServer(t, h)
	c := newClient(t, nil)
	for range 12 {
		doGet(t, c, srv.URL+"/", nil)
	}

	eps := statusJSON(t, px)
	for _, tc := range []struct {
		addr, state string
		errorRate   float64
	}{
		{goodAddr, "serving", 0},
		{badAddr, "ejected", 1},
	} {
		e := eps[tc.addr]
		if e == nil {
			t.Fatalf("Status() has no endpoint %s: %v", tc.addr, eps)
		}
		if e["state"] != tc.state {
			t.Errorf("%s: state = %v, want %s", tc.addr, e["state"], tc.state)
		}
		if rate, _ := e["requests_per_second"].(float64); rate <= 0 {
			t.Errorf("%s: requests_per_second = %v, want > 0", tc.addr, e["requests_per_second"])
		}
		if e["error_rate"] != tc.errorRate {
			t.Errorf("%s: error_rate = %v, want %v", tc.addr, e["error_rate"], tc.errorRate)
		}
		lat, _ := e["latency_ms"].(map[string]any)
		for _, q := range []string{"p50", "p90", "p99"} {
			if v, _ := lat[q].(float64); v <= 0 {
				t.Errorf("%s: latency_ms.%s = %v, want > 0", tc.addr, q, lat[q])
			}
		}
		if _, ok := e["window_seconds"]; !ok {
			t.Errorf("%s: no window_seconds", tc.addr)
		}
	}
	if eps[badAddr]["ejected_until"] == nil {
		t.Errorf("%s: no ejected_until", badAddr)
	}
}
