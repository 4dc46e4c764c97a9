package admin

import (
	"bufio"
	"context"
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/sidecarlb/sidecar/internal/leakcheck"
)

// readEvent reads one server-sent event's data line of the given type.
func readEvent(t *testing.T, r *bufio.Reader) map[string]any {
	t.Helper()
	var event string
	for {
		line, err := r.ReadString('\n')
		if err != nil {
			t.Fatalf("reading the stream: %v", err)
		}
		line = strings.TrimRight(line, "\n")
		switch {
		case strings.HasPrefix(line, "event: "):
			event = strings.TrimPrefix(line, "event: ")
		case strings.HasPrefix(line, "data: "):
			if event != "status" {
				t.Fatalf("data for event %q, want status", event)
			}
			var doc map[string]any
			if err := json.Unmarshal([]byte(strings.TrimPrefix(line, "data: ")), &doc); err != nil {
				t.Fatalf("event data is not JSON: %v: %q", err, line)
			}
			return doc
		}
	}
}

// TestStatusStream: GET /status/stream sends the /status document at once
// and again when it changes, and ends when Close is called.
func TestStatusStream(t *testing.T) {
	leakcheck.Check(t)
	var nodes atomic.Int64
	nodes.Store(2)
	h := New(Options{
		Version:     "v9",
		Sections:    map[string]func() any{"upstreams": func() any { return map[string]int64{"nodes": nodes.Load()} }},
		StreamEvery: 5 * time.Millisecond,
	})
	srv := httptest.NewServer(h)
	defer srv.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	req, _ := http.NewRequestWithContext(ctx, http.MethodGet, srv.URL+"/status/stream", nil)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	if ct := resp.Header.Get("Content-Type"); ct != "text/event-stream" {
		t.Errorf("Content-Type = %q, want text/event-stream", ct)
	}
	r := bufio.NewReader(resp.Body)
	doc := readEvent(t, r)
	if doc["version"] != "v9" || doc["upstreams"].(map[string]any)["nodes"] != 2.0 {
		t.Fatalf("first event = %v, want version v9 and 2 nodes", doc)
	}
	if _, ok := doc["uptime_seconds"]; !ok {
		t.Errorf("first event = %v, want uptime_seconds", doc)
	}
	nodes.Store(1)
	if doc := readEvent(t, r); doc["upstreams"].(map[string]any)["nodes"] != 1.0 {
		t.Fatalf("event after the change = %v, want 1 node", doc)
	}
	h.Close()
	done := make(chan struct{})
	go func() {
		defer close(done)
		for {
			if _, err := r.ReadString('\n'); err != nil {
				return
			}
		}
	}()
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		t.Fatal("the stream did not end after Close")
	}
}

// TestDashboardServed: GET / is the page, with its script and style sheet
// from the binary, under a policy that loads nothing from elsewhere; the
// page and the stream need no token, as /status does.
func TestDashboardServed(t *testing.T) {
	h := New(Options{Version: "v9", Token: "secret"})
	h.Close() // the stream answers and ends at once
	srv := httptest.NewServer(h)
	defer srv.Close()
	for _, tc := range []struct {
		path, contentType, want string
	}{
		{"/", "text/html; charset=utf-8", `<script src="/dashboard/app.js" defer></script>`},
		{"/dashboard/app.js", "text/javascript; charset=utf-8", `new EventSource("/status/stream")`},
		{"/dashboard/app.css", "text/css; charset=utf-8", "prefers-color-scheme"},
		{"/status/stream", "text/event-stream", `"version":"v9"`},
	} {
		t.Run(tc.path, func(t *testing.T) {
			resp, err := http.Get(srv.URL + tc.path)
			if err != nil {
				t.Fatal(err)
			}
			defer resp.Body.Close()
			var body strings.Builder
			_, _ = bufio.NewReader(resp.Body).WriteTo(&body)
			if resp.StatusCode != http.StatusOK {
				t.Fatalf("GET %s = %d, want 200", tc.path, resp.StatusCode)
			}
			if ct := resp.Header.Get("Content-Type"); ct != tc.contentType {
				t.Errorf("GET %s Content-Type = %q, want %q", tc.path, ct, tc.contentType)
			}
			if !strings.Contains(body.String(), tc.want) {
				t.Errorf("GET %s body lacks %q", tc.path, tc.want)
			}
			if tc.path != "/status/stream" {
				if csp := resp.Header.Get("Content-Security-Policy"); !strings.Contains(csp, "default-src 'none'") {
					t.Errorf("GET %s Content-Security-Policy = %q, want default-src 'none'", tc.path, csp)
				}
			}
		})
	}
	resp, err := http.Get(srv.URL + "/other")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusNotFound {
		t.Errorf("GET /other = %d, want 404 (only / is the page)", resp.StatusCode)
	}
}
