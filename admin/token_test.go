package admin

import (
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
)

func TestToken(t *testing.T) {
	t.Parallel()
	ok := http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) { w.WriteHeader(http.StatusNoContent) })
	tests := []struct {
		name, token, method, auth string
		want                      int
	}{
		{"no token configured", "", http.MethodPost, "", http.StatusNoContent},
		{"post without token", "s3cret", http.MethodPost, "", http.StatusUnauthorized},
		{"post with wrong token", "s3cret", http.MethodPost, "Bearer nope", http.StatusUnauthorized},
		{"post with bare token", "s3cret", http.MethodPost, "s3cret", http.StatusUnauthorized},
		{"post with token", "s3cret", http.MethodPost, "Bearer s3cret", http.StatusNoContent},
		{"get needs none", "s3cret", http.MethodGet, "", http.StatusNoContent},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			h := New(Options{Token: tc.token})
			h.Handle("/app/x", ok)
			req := httptest.NewRequest(tc.method, "/app/x", nil)
			if tc.auth != "" {
				req.Header.Set("Authorization", tc.auth)
			}
			rec := httptest.NewRecorder()
			h.ServeHTTP(rec, req)
			if rec.Code != tc.want {
				t.Errorf("%s with %q = %d, want %d", tc.method, tc.auth, rec.Code, tc.want)
			}
		})
	}
	// Built-in GET routes stay open.
	rec := httptest.NewRecorder()
	New(Options{Token: "s3cret"}).ServeHTTP(rec, httptest.NewRequest(http.MethodGet, "/status", nil))
	if rec.Code != http.StatusOK {
		t.Errorf("GET /status with a token configured = %d, want 200", rec.Code)
	}
}

func TestHandlePrivate(t *testing.T) {
	t.Parallel()
	doc := Document(func() (any, error) { return map[string]any{"log": map[string]any{"level": "info"}}, nil })
	tests := []struct {
		name, token, auth, query string
		want                     int
		body                     string
	}{
		{"no token configured", "", "", "", http.StatusOK, `"level": "info"`},
		{"get without token", "s3cret", "", "", http.StatusUnauthorized, ""},
		{"get with wrong token", "s3cret", "Bearer nope", "", http.StatusUnauthorized, ""},
		{"get with token", "s3cret", "Bearer s3cret", "", http.StatusOK, `"level": "info"`},
		{"yaml", "", "", "?format=yaml", http.StatusOK, "level: info"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			h := New(Options{Token: tc.token})
			h.HandlePrivate("GET /config", doc)
			req := httptest.NewRequest(http.MethodGet, "/config"+tc.query, nil)
			if tc.auth != "" {
				req.Header.Set("Authorization", tc.auth)
			}
			rec := httptest.NewRecorder()
			h.ServeHTTP(rec, req)
			if rec.Code != tc.want || !strings.Contains(rec.Body.String(), tc.body) {
				t.Errorf("GET /config%s with %q = %d %q, want %d with %q", tc.query, tc.auth, rec.Code, rec.Body, tc.want, tc.body)
			}
		})
	}
}

// TestHandlePrivateMethods: a route added with HandlePrivate needs the token on GET
// and HEAD as well as POST.
func TestHandlePrivateMethods(t *testing.T) {
	t.Parallel()
	ok := http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) { w.WriteHeader(http.StatusNoContent) })
	tests := []struct {
		name, token, method, auth string
		want                      int
	}{
		{"no token configured", "", http.MethodGet, "", http.StatusNoContent},
		{"get without token", "s3cret", http.MethodGet, "", http.StatusUnauthorized},
		{"head without token", "s3cret", http.MethodHead, "", http.StatusUnauthorized},
		{"get with wrong token", "s3cret", http.MethodGet, "Bearer nope", http.StatusUnauthorized},
		{"get with token", "s3cret", http.MethodGet, "Bearer s3cret", http.StatusNoContent},
		{"post with token", "s3cret", http.MethodPost, "Bearer s3cret", http.StatusNoContent},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			h := New(Options{Token: tc.token})
			h.HandlePrivate("/drain", ok)
			req := httptest.NewRequest(tc.method, "/drain", nil)
			if tc.auth != "" {
				req.Header.Set("Authorization", tc.auth)
			}
			rec := httptest.NewRecorder()
			h.ServeHTTP(rec, req)
			if rec.Code != tc.want {
				t.Errorf("%s with %q = %d, want %d", tc.method, tc.auth, rec.Code, tc.want)
			}
		})
	}
}
