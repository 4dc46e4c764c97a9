package admin

import (
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"sync/atomic"
	"testing"
)

func TestReady(t *testing.T) {
	tests := []struct {
		name       string
		ready      func() (bool, string)
		wantStatus int
		want       readyDoc
	}{
		{"no ready func", nil, 200, readyDoc{Ready: true}},
		{"ready", func() (bool, string) { return true, "" }, 200, readyDoc{Ready: true}},
		{"starting", func() (bool, string) { return false, "starting" }, 503, readyDoc{Reason: "starting"}},
		{"draining", func() (bool, string) { return false, "draining" }, 503, readyDoc{Reason: "draining"}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			h := New(Options{Ready: tc.ready, Token: "secret"})
			rec := httptest.NewRecorder()
			h.ServeHTTP(rec, httptest.NewRequest(http.MethodGet, "/ready", nil))
			if rec.Code != tc.wantStatus {
				t.Errorf("GET /ready status = %d, want %d", rec.Code, tc.wantStatus)
			}
			if ct := rec.Header().Get("Content-Type"); ct != "application/json" {
				t.Errorf("Content-Type = %q, want application/json", ct)
			}
			var got readyDoc
			if err := json.Unmarshal(rec.Body.Bytes(), &got); err != nil {
				t.Fatalf("body %q: %v", rec.Body, err)
			}
			if got != tc.want {
				t.Errorf("GET /ready = %+v, want %+v", got, tc.want)
			}
		})
	}
}

// TestReadyFollowsState checks that /ready asks on every request rather
// than caching, and that /healthz stays 200 while not ready.
func TestReadyFollowsState(t *testing.T) {
	var draining atomic.Bool
	h := New(Options{Ready: func() (bool, string) {
		if draining.Load() {
			return false, "draining"
		}
		return true, ""
	}})
	get := func(path string) int {
		rec := httptest.NewRecorder()
		h.ServeHTTP(rec, httptest.NewRequest(http.MethodGet, path, nil))
		return rec.Code
	}
	if got := get("/ready"); got != 200 {
		t.Fatalf("GET /ready = %d, want 200", got)
	}
	draining.Store(true)
	if got := get("/ready"); got != 503 {
		t.Errorf("GET /ready while draining = %d, want 503", got)
	}
	if got := get("/healthz"); got != 200 {
		t.Errorf("GET /healthz while draining = %d, want 200", got)
	}
}
