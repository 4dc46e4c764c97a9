package main

import (
	"bytes"
	"github.com/sidecarlb/sidecar/config"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"

	"go.uber.org/zap"
)

// TestDrainClientOnly: a sidecar without a service drains at once: /ready
// says draining, nothing is deregistered, and later calls return the same.
func TestDrainClientOnly(t *testing.T) {
	r := &readiness{}
	r.started.Store(true)
	d := &drainer{ready: r, log: zap.NewNop(), service: func() *config.Service { return nil }}
	rec := httptest.NewRecorder()
	d.ServeHTTP(rec, httptest.NewRequest(http.MethodPost, "/drain", nil))
	if rec.Code != http.StatusOK || !strings.Contains(rec.Body.String(), `"ok":true`) || strings.Contains(rec.Body.String(), "deregistered") {
		t.Errorf("POST /drain = %d %s, want 200 ok without deregistered", rec.Code, rec.Body)
	}
	if ok, why := r.check(); ok || why != "draining" {
		t.Errorf("check() after /drain = %v, %q, want false, draining", ok, why)
	}
	if res := d.drain(true); !res.OK {
		t.Errorf("drain() again = %+v, want the first result", res)
	}
}

// TestDrainCommandErrors: sidecar drain reports a refused token and a
// failed deregistration, exiting 1.
func TestDrainCommandErrors(t *testing.T) {
	tests := []struct {
		name   string
		code   int
		body   string
		stderr string
	}{
		{"wrong token", http.StatusUnauthorized, "no", "the admin token is missing or wrong"},
		{"deregister failed", http.StatusInternalServerError, `{"ok":false,"seconds":5,"error":"deregister \"web-1\": connection refused"}`,
			`sidecar drain: deregister "web-1": connection refused (after 5s)`},
		{"not a sidecar", http.StatusNotFound, "404 page not found", "unexpected answer 404: 404 page not found"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				if r.Method != http.MethodPost || r.URL.Path != "/drain" {
					http.NotFound(w, r)
					return
				}
				w.WriteHeader(tc.code)
				_, _ = w.Write([]byte(tc.body))
			}))
			defer srv.Close()
			t.Setenv(tokenEnv, "")
			var stdout, stderr bytes.Buffer
			code := run([]string{"drain", "-admin", strings.TrimPrefix(srv.URL, "http://")}, &stdout, &stderr)
			if code != exitFail || !strings.Contains(stderr.String(), tc.stderr) {
				t.Errorf("sidecar drain = %d, stderr %q; want 1 and %q", code, stderr.String(), tc.stderr)
			}
		})
	}
}
