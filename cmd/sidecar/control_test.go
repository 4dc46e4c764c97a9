package main

import (
	"bytes"
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/sidecarlb/sidecar/config"
	"github.com/sidecarlb/sidecar/heartbeat"
	"github.com/sidecarlb/sidecar/pubsub/httpbroker"
	"github.com/sidecarlb/sidecar/supervisor"
)

// fakeAdmin serves the admin routes the control commands call, checking
// the bearer token on POST.
func fakeAdmin(t *testing.T, token string) *httptest.Server {
	t.Helper()
	mux := http.NewServeMux()
	mux.HandleFunc("GET /status", func(w http.ResponseWriter, _ *http.Request) {
		_ = json.NewEncoder(w).Encode(map[string]any{
			"version":        "v1.2.3",
			"uptime_seconds": 62.4,
			"app": supervisor.Status{State: "running", Command: "./web", PID: 4242, UptimeSeconds: 61, Restarts: 2,
				RSSBytes: 12 << 20, MemoryLimit: 256 << 20, Policy: "always", LastExit: "exit status 1", LastExitAt: time.Now().Add(-time.Minute)},
			"service": heartbeat.Status{ServiceID: "web-1", Registered: true, CheckStatus: "passing", Output: "GET /health: 200 OK"},
			"upstreams": []map[string]any{{"listener": "127.0.0.1:15002", "service": "db", "balancer": "round_robin",
				"stale": true,
				"endpoints": []map[string]any{
					{"id": "db-1", "addr": "10.0.0.1:5432", "breaker": "closed", "state": "serving", "requests_per_second": 12.5,
						"error_rate": 0.02, "active_requests": 3, "latency_ms": map[string]any{"p50": 1.25, "p90": 2, "p99": 4.5}},
					{"id": "db-2", "addr": "10.0.0.2:5432", "breaker": "open", "state": "ejected", "consecutive_failures": 5,
						"ejected_until": time.Now().Add(30500 * time.Millisecond)},
				}}},
			"discovery": []map[string]any{
				{"service": "db", "endpoints": 2, "stale": true, "age_seconds": 42.2, "confirmed": time.Now().Add(-45 * time.Second), "error": "connection refused"},
				{"service": "web", "endpoints": 3, "confirmed": time.Now()},
			},
			"pubsub": httpbroker.Status{Outbox: 7, OldestSeconds: 3, Groups: []httpbroker.GroupStatus{{Topic: "orders", Group: "billing", Pending: 7, InFlight: 2, OldestSeconds: 3}}},
		})
	})
	post := func(path string, code int, res supervisor.Result) {
		mux.HandleFunc("POST "+path, func(w http.ResponseWriter, r *http.Request) {
			if r.Header.Get("Authorization") != "Bearer "+token {
				http.Error(w, "no", http.StatusUnauthorized)
				return
			}
			w.WriteHeader(code)
			_ = json.NewEncoder(w).Encode(res)
		})
	}
	post("/app/restart", http.StatusOK, supervisor.Result{Action: "restart", OK: true, Seconds: 1.5, PreviousPID: 4242,
		App: supervisor.Status{State: "running", PID: 4343}})
	post("/app/update", http.StatusUnprocessableEntity, supervisor.Result{Action: "update", Error: "build failed: exit status 1",
		BuildOutput: "main.go:3: syntax error\n", App: supervisor.Status{State: "running", PID: 4242}})
	post("/app/kill", http.StatusOK, supervisor.Result{Action: "kill", OK: true, PreviousPID: 4242, App: supervisor.Status{State: "killed"}})
	srv := httptest.NewServer(mux)
	t.Cleanup(srv.Close)
	return srv
}

func TestControlCommands(t *testing.T) {
	srv := fakeAdmin(t, "s3cret")
	addr := strings.TrimPrefix(srv.URL, "http://")
	cfg := filepath.Join(t.TempDir(), "config.yaml")
	// A listener on every interface is reached on loopback.
	allIfaces := strings.Replace(addr, "127.0.0.1", "0.0.0.0", 1)
	if err := os.WriteFile(cfg, []byte("admin: {listen: '"+allIfaces+"', token: s3cret}\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	t.Setenv(tokenEnv, "")
	tests := []struct {
		name       string
		env        string
		args       []string
		wantCode   int
		wantStdout []string
		wantStderr []string
	}{
		{"status", "", []string{"status", "-admin", addr}, exitOK, []string{
			"sidecar    v1.2.3, up 1m2s",
			"app        running, pid 4242, up 1m1s, 2 restarts (policy always), rss 12MiB of 256MiB",
			"last exit: exit status 1, 1m0s ago",
			"service    web-1, registered, check passing: GET /health: 200 OK",
			"127.0.0.1:15002 → db (round_robin): 2 endpoints 10.0.0.1:5432, 10.0.0.2:5432",
			"    stale: discovery serves the last set it had",
			"    10.0.0.1:5432 serving, breaker closed, 3 in flight, 12.5 req/s, 2.0% errors, p50 1.2ms p99 4.5ms",
			"    10.0.0.2:5432 ejected, breaker open (5 failures in a row), ejected for 30s more, 0 in flight, 0.0 req/s, 0.0% errors\n",
			"discovery  2 watches",
			"  db: 2 nodes, STALE for 42s, confirmed 45s ago; connection refused",
			"  web: 3 nodes, fresh, confirmed 0s ago",
			"pubsub     outbox 7, oldest 3s",
			"orders → billing: 7 pending, 2 in flight, oldest 3s",
		}, nil},
		{"status json", "", []string{"status", "-json", "-admin", addr}, exitOK, []string{`"pid":4242`}, nil},
		{"restart with the config's token", "", []string{"restart", "-config", cfg}, exitOK,
			[]string{"app restarted: pid 4242 → 4343, healthy and registered, in 1.5s"}, nil},
		{"restart with the env token", "s3cret", []string{"restart", "-admin", addr}, exitOK, []string{"pid 4242 → 4343"}, nil},
		{"restart without a token", "", []string{"restart", "-admin", addr}, exitFail, nil,
			[]string{"admin token is missing or wrong"}},
		{"failed update prints the build", "", []string{"update", "-config", cfg}, exitFail, nil,
			[]string{"build output:\nmain.go:3: syntax error\n", "sidecar update: build failed: exit status 1", "app running, pid 4242"}},
		{"kill", "", []string{"kill", "-config", cfg}, exitOK, []string{"app killed (was pid 4242) and instance deregistered"}, nil},
		{"both -config and -admin", "", []string{"kill", "-config", cfg, "-admin", addr}, exitConfig, nil, []string{"not both"}},
		{"no sidecar", "", []string{"status", "-admin", "127.0.0.1:1"}, exitFail, nil, []string{"is the sidecar running?"}},
		{"bad config", "", []string{"restart", "-config", filepath.Join(t.TempDir(), "nope.yaml")}, exitConfig, nil, []string{"nope.yaml"}},
		{"stray argument", "", []string{"restart", "now"}, exitConfig, nil, []string{"unexpected arguments"}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Setenv(tokenEnv, tc.env)
			var stdout, stderr bytes.Buffer
			code := run(tc.args, &stdout, &stderr)
			if code != tc.wantCode {
				t.Fatalf("run(%q) = %d, want %d; stdout:\n%s\nstderr:\n%s", tc.args, code, tc.wantCode, stdout.String(), stderr.String())
			}
			for _, want := range tc.wantStdout {
				if !strings.Contains(stdout.String(), want) {
					t.Errorf("stdout =\n%s\nwant it to contain %q", stdout.String(), want)
				}
			}
			for _, want := range tc.wantStderr {
				if !strings.Contains(stderr.String(), want) {
					t.Errorf("stderr =\n%s\nwant it to contain %q", stderr.String(), want)
				}
			}
		})
	}
}

func TestControlNoApp(t *testing.T) {
	srv := httptest.NewServer(http.NotFoundHandler())
	defer srv.Close()
	var stdout, stderr bytes.Buffer
	if code := run([]string{"kill", "-admin", strings.TrimPrefix(srv.URL, "http://")}, &stdout, &stderr); code != exitFail ||
		!strings.Contains(stderr.String(), "runs no app (no service.run)") {
		t.Errorf("kill against a sidecar without an app = %d, %q; want 1 and a message saying so", code, stderr.String())
	}
}

func TestRunCommandErrors(t *testing.T) {
	dir := t.TempDir()
	noService := filepath.Join(dir, "client.yaml")
	if err := os.WriteFile(noService, []byte("proxy: {listen: 127.0.0.1:15001}\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name string
		args []string
		want string
	}{
		{"no command", []string{"run", "-config", noService}, "missing the app's command"},
		{"no command after --", []string{"run", "-config", noService, "--"}, "missing the app's command"},
		{"no service", []string{"run", "-config", noService, "--", "/bin/true"}, "service: required by sidecar run"},
		{"missing config", []string{"run", "-config", filepath.Join(dir, "nope.yaml"), "--", "/bin/true"}, "nope.yaml"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			var stdout, stderr bytes.Buffer
			if code := run(tc.args, &stdout, &stderr); code != exitConfig || !strings.Contains(stderr.String(), tc.want) {
				t.Errorf("run(%q) = %d, stderr %q; want 2 and %q", tc.args, code, stderr.String(), tc.want)
			}
		})
	}
}

func TestNewAppErrors(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name string
		run  config.Run
		want string
	}{
		{"no command", config.Run{}, "service.run.command: required (or give the command after --"},
		{"missing chroot", config.Run{Command: "/app", Chroot: "/nonexistent-root"}, "service.run: chroot: stat /nonexistent-root: no such file or directory"},
		{"missing command", config.Run{Command: "/nonexistent/app"}, "service.run: command: stat /nonexistent/app"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			r := *config.DefaultRun()
			r.Command, r.Chroot = tc.run.Command, tc.run.Chroot
			s := &config.Service{Name: "web", Port: 9001, Run: &r}
			reg := heartbeat.NewRegistrar(nil, heartbeat.Service{Name: "web", Port: 9001}, nil, heartbeat.Options{}, nil)
			if _, err := newApp(s, reg, nil, nil); err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Errorf("newApp() error = %v, want it to contain %q", err, tc.want)
			}
		})
	}
}

func TestPrintPubSubNATS(t *testing.T) {
	raw := []byte(`{"broker":"nats","connected":true,"server":"nats://127.0.0.1:4222","stream":"SIDECAR",
		"groups":[{"topic":"orders","group":"billing","consumer":"billing__orders__3cce84f2","pending":4,"in_flight":2},
		{"topic":"prices","group":"cache","consumer":"c","pending":-1,"in_flight":0,"error":"nats: timeout"}]}`)
	var b bytes.Buffer
	printPubSub(&b, raw)
	want := "pubsub     nats connected to nats://127.0.0.1:4222, stream SIDECAR\n" +
		"  orders → billing: 4 pending, 2 in flight (consumer billing__orders__3cce84f2)\n" +
		"  prices → cache: ? pending, 0 in flight (consumer c); nats: timeout\n"
	if got := b.String(); got != want {
		t.Errorf("printPubSub() =\n%s\nwant:\n%s", got, want)
	}
}
