package test

// Integration test of readiness: the real sidecar binary, the echo example
// and a real Consul dev agent, all on loopback.

import (
	"encoding/json"
	"fmt"
	"net/http"
	"strconv"
	"syscall"
	"testing"
	"time"

	"github.com/sidecarlb/sidecar/test/consulagent"
	"github.com/sidecarlb/sidecar/test/harness"
)

// readyState fetches the sidecar's /ready: its status code and reason.
func readyState(t *testing.T, adminAddr string) (int, string) {
	t.Helper()
	client := &http.Client{Timeout: 2 * time.Second}
	resp, err := client.Get("http://" + adminAddr + "/ready")
	if err != nil {
		return 0, err.Error()
	}
	defer resp.Body.Close()
	var doc struct {
		Ready  bool   `json:"ready"`
		Reason string `json:"reason"`
	}
	if err := json.NewDecoder(resp.Body).Decode(&doc); err != nil {
		t.Fatalf("GET /ready: decode: %v", err)
	}
	if doc.Ready != (resp.StatusCode == http.StatusOK) {
		t.Fatalf("GET /ready: status %d with ready=%v", resp.StatusCode, doc.Ready)
	}
	return resp.StatusCode, doc.Reason
}

// TestReadyFollowsRegistrationAndDrain checks that /ready is 503 while the
// instance is not registered passing, 200 once it is and its upstream's
// first discovery answer arrived, and 503 from SIGTERM through the drain,
// while /healthz stays 200.
func TestReadyFollowsRegistrationAndDrain(t *testing.T) {
	t.Parallel()
	agent := consulagent.Start(t, consulagent.Options{})
	c := agent.Client()
	app := newHBApp(t, "echo-ready", agent.Addr())
	app.drain = 2 * time.Second
	upstreamListen := "127.0.0.1:" + strconv.Itoa(consulagent.FreePort(t))
	cfg := app.config() + fmt.Sprintf(`upstreams:
  - name: %s
    listen: %s
`, app.name, upstreamListen)

	// The sidecar first, with echo down: the probe fails, the check is
	// critical, so the instance is not ready.
	app.sidecar = harness.StartSidecar(t, app.adminAddr, cfg)
	code, reason := readyState(t, app.adminAddr)
	if code != http.StatusServiceUnavailable {
		t.Fatalf("GET /ready with the app down = %d (%s), want 503", code, reason)
	}
	t.Logf("before registration passing: 503 %q", reason)

	app.echo = harness.StartEcho(t, app.echoAddr, app.id)
	hbWaitPassing(t, c, app, 10*time.Second)
	hbPoll(t, 10*time.Second, "/ready 200", func() bool {
		code, _ := readyState(t, app.adminAddr)
		return code == http.StatusOK
	})

	app.sidecar.Signal(syscall.SIGTERM)
	hbPoll(t, 10*time.Second, "/ready 503 draining", func() bool {
		select {
		case <-app.sidecar.Exited():
			t.Fatalf("sidecar exited (%v) before /ready said draining", app.sidecar.ExitErr())
		default:
		}
		code, reason := readyState(t, app.adminAddr)
		return code == http.StatusServiceUnavailable && reason == "draining"
	})
	// Still draining: /ready says so while the process serves.
	select {
	case <-app.sidecar.Exited():
		t.Fatalf("sidecar exited (%v) during the drain", app.sidecar.ExitErr())
	default:
	}
	resp, err := http.Get("http://" + app.adminAddr + "/healthz")
	if err != nil {
		t.Fatalf("GET /healthz during the drain: %v", err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Errorf("GET /healthz during the drain = %d, want 200", resp.StatusCode)
	}
	if code := app.sidecar.Wait(15 * time.Second); code != 0 {
		t.Fatalf("sidecar exit code = %d, want 0\n%s", code, app.sidecar.Output())
	}
}
