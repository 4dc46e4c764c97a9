package test

// Integration test of the admin route /drain and `sidecar drain`, the
// Kubernetes preStop path: the real sidecar binary, the echo example and a
// real Consul dev agent, all on loopback.

import (
	"encoding/json"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/sidecarlb/sidecar/test/consulagent"
	"github.com/sidecarlb/sidecar/test/harness"
)

// drainGet sends GET /drain with the bearer token (none if empty).
func drainGet(t *testing.T, adminAddr, token string) (int, map[string]any) {
	t.Helper()
	req, err := http.NewRequest(http.MethodGet, "http://"+adminAddr+"/drain", nil)
	if err != nil {
		t.Fatal(err)
	}
	if token != "" {
		req.Header.Set("Authorization", "Bearer "+token)
	}
	resp, err := (&http.Client{Timeout: 30 * time.Second}).Do(req)
	if err != nil {
		t.Fatalf("GET /drain: %v", err)
	}
	defer resp.Body.Close()
	var doc map[string]any
	_ = json.NewDecoder(resp.Body).Decode(&doc)
	return resp.StatusCode, doc
}

// TestDrain: `sidecar drain` (POST /drain) takes the instance out of the
// catalog and makes /ready answer 503 "draining" while it waits, and
// returns only once service.drain has passed; GET /drain needs the admin
// token; the SIGTERM that follows neither deregisters nor drains again.
func TestDrain(t *testing.T) {
	t.Parallel()
	agent := consulagent.Start(t, consulagent.Options{})
	c := agent.Client()
	app := newHBApp(t, "echo-drain", agent.Addr())
	app.drain = 2 * time.Second
	const token = "s3cret"
	cfg := strings.Replace(app.config(), "admin:\n", "admin:\n  token: "+token+"\n", 1)
	path := filepath.Join(t.TempDir(), "config.yaml")
	if err := os.WriteFile(path, []byte(cfg), 0o600); err != nil {
		t.Fatal(err)
	}
	app.echo = harness.StartEcho(t, app.echoAddr, app.id)
	app.sidecar = harness.Start(t, "sidecar", "-config", path)
	app.sidecar.WaitHTTP("http://"+app.adminAddr+"/healthz", 15*time.Second)
	hbWaitPassing(t, c, app, 15*time.Second)
	hbPoll(t, 10*time.Second, "/ready 200", func() bool {
		code, _ := readyState(t, app.adminAddr)
		return code == http.StatusOK
	})

	// Without the token, a GET does nothing.
	if code, _ := drainGet(t, app.adminAddr, ""); code != http.StatusUnauthorized {
		t.Fatalf("GET /drain without the token = %d, want 401", code)
	}
	if code, reason := readyState(t, app.adminAddr); code != http.StatusOK || hbHealthEntry(t, c, app.name, app.id, true) == nil {
		t.Fatalf("after a refused GET /drain: /ready %d %q, in catalog %v; want 200 and still listed", code, reason, hbHealthEntry(t, c, app.name, app.id, true) != nil)
	}

	start := time.Now()
	cli := harness.Start(t, "sidecar", "drain", "-config", path)
	hbPoll(t, 10*time.Second, "instance out of the catalog and /ready 503 draining while sidecar drain runs", func() bool {
		select {
		case <-cli.Exited():
			t.Fatalf("sidecar drain returned (%v) before the instance left the catalog\n%s", cli.ExitErr(), cli.Output())
		default:
		}
		code, reason := readyState(t, app.adminAddr)
		return hbHealthEntry(t, c, app.name, app.id, false) == nil && code == http.StatusServiceUnavailable && reason == "draining"
	})
	if code := cli.Wait(30 * time.Second); code != 0 {
		t.Fatalf("sidecar drain exit code = %d, want 0\n%s", code, cli.Output())
	}
	took := time.Since(start)
	if took < app.drain {
		t.Errorf("sidecar drain returned after %v, before service.drain (%v) passed", took, app.drain)
	}
	if want := app.id + " deregistered and drained in"; !strings.Contains(cli.Output(), want) {
		t.Errorf("sidecar drain printed %q, want it to contain %q", cli.Output(), want)
	}
	t.Logf("sidecar drain took %v with service.drain %v", took.Round(time.Millisecond), app.drain)

	// A second drain answers at once with the first one's result.
	if code, doc := drainGet(t, app.adminAddr, token); code != http.StatusOK || doc["ok"] != true || doc["deregistered"] != app.id {
		t.Errorf("GET /drain again = %d %v, want 200 ok, deregistered %s", code, doc, app.id)
	}

	stop := time.Now()
	app.sidecar.Signal(syscall.SIGTERM)
	if code := app.sidecar.Wait(15 * time.Second); code != 0 {
		t.Fatalf("sidecar exit code = %d, want 0", code)
	}
	t.Logf("SIGTERM after the drain: exited in %v", time.Since(stop).Round(time.Millisecond))
	out := app.sidecar.Output()
	if n := strings.Count(out, `"msg":"draining"`); n != 1 {
		t.Errorf("sidecar logged draining %d times, want once (SIGTERM after /drain must not drain again)\n%s", n, out)
	}
	if n := strings.Count(out, `"logger":"heartbeat","msg":"deregistered"`); n != 1 {
		t.Errorf("sidecar deregistered %d times, want once\n%s", n, out)
	}
}
