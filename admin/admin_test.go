package admin

import (
	"encoding/json"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

func TestAdmin(t *testing.T) {
	reg := prometheus.NewRegistry()
	c := prometheus.NewCounter(prometheus.CounterOpts{Name: "sidecar_test_total", Help: "test"})
	reg.MustRegister(c)
	c.Add(3)
	now := time.Unix(1000, 0)
	h := New(Options{
		Version:  "v1.2.3",
		Sections: map[string]func() any{"service": func() any { return map[string]string{"name": "echo"} }},
		Gatherer: reg,
		Now:      func() time.Time { return now },
	})
	now = now.Add(5 * time.Second)
	srv := httptest.NewServer(h)
	defer srv.Close()

	tests := []struct {
		name, method, path string
		wantStatus         int
		wantBody           string
	}{
		{"healthz", "GET", "/healthz", 200, "ok"},
		{"metrics", "GET", "/metrics", 200, "sidecar_test_total 3"},
		{"status", "GET", "/status", 200, `"name": "echo"`},
		{"unknown path", "GET", "/nope", 404, ""},
		{"wrong method", "POST", "/status", 405, ""},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			req, _ := http.NewRequest(tc.method, srv.URL+tc.path, nil)
			resp, err := http.DefaultClient.Do(req)
			if err != nil {
				t.Fatal(err)
			}
			body, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			if resp.StatusCode != tc.wantStatus {
				t.Fatalf("%s %s = %d, want %d", tc.method, tc.path, resp.StatusCode, tc.wantStatus)
			}
			if !strings.Contains(string(body), tc.wantBody) {
				t.Fatalf("%s %s body = %q, want it to contain %q", tc.method, tc.path, body, tc.wantBody)
			}
		})
	}

	resp, err := http.Get(srv.URL + "/status")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var doc struct {
		Version string  `json:"version"`
		Uptime  float64 `json:"uptime_seconds"`
	}
	if err := json.NewDecoder(resp.Body).Decode(&doc); err != nil {
		t.Fatal(err)
	}
	if doc.Version != "v1.2.3" || doc.Uptime != 5 {
		t.Fatalf("status = %+v, want version v1.2.3 and uptime 5", doc)
	}
}

func TestPprofOnlyWhenEnabled(t *testing.T) {
	for _, enabled := range []bool{false, true} {
		h := New(Options{})
		if enabled {
			h.EnablePprof()
		}
		srv := httptest.NewServer(h)
		resp, err := http.Get(srv.URL + "/debug/pprof/goroutine?debug=1")
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		srv.Close()
		want := http.StatusNotFound
		if enabled {
			want = http.StatusOK
		}
		if resp.StatusCode != want {
			t.Errorf("enabled=%v: GET /debug/pprof/goroutine = %d, want %d", enabled, resp.StatusCode, want)
		}
	}
}
