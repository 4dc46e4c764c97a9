package test

// Integration test of service.address left unset: the real sidecar binary,
// the echo example and a real Consul dev agent, all on loopback (a dev
// agent's node address is 127.0.0.1).

import (
	"fmt"
	"io"
	"net/http"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/sidecarlb/sidecar/test/consulagent"
	"github.com/sidecarlb/sidecar/test/harness"
)

// TestUnsetAddressRegistersNodeAddress checks that without service.address
// the instance is registered with no address, so the catalog's
// ServiceAddress is empty and health/service gives the node's, the app is
// probed on loopback (the check passes), and a peer's sidecar reaches it
// through the node's address.
func TestUnsetAddressRegistersNodeAddress(t *testing.T) {
	t.Parallel()
	agent := consulagent.Start(t, consulagent.Options{})
	c := agent.Client()
	app := newHBApp(t, "echo-noaddr", agent.Addr())
	upstreamListen := "127.0.0.1:" + strconv.Itoa(consulagent.FreePort(t))
	cfg := strings.Replace(app.config(), "  address: 127.0.0.1\n", "", 1)
	if cfg == app.config() {
		t.Fatal("config has no service.address line to drop")
	}
	// A TCP probe (no check.http), so the loopback default is what passes.
	cfg = strings.Replace(cfg, fmt.Sprintf("    http: http://%s/health\n", app.echoAddr), "", 1)
	cfg += fmt.Sprintf("upstreams:\n  - name: %s\n    listen: %s\n", app.name, upstreamListen)

	app.echo = harness.StartEcho(t, app.echoAddr, app.id)
	app.sidecar = harness.StartSidecar(t, app.adminAddr, cfg)
	hbWaitPassing(t, c, app, 10*time.Second)

	catalog, _, err := c.Catalog().Service(app.name, "", nil)
	if err != nil {
		t.Fatalf("catalog service: %v", err)
	}
	if len(catalog) != 1 {
		t.Fatalf("catalog has %d instances of %s, want 1", len(catalog), app.name)
	}
	if got := catalog[0].ServiceAddress; got != "" {
		t.Errorf("catalog ServiceAddress = %q, want empty (none registered)", got)
	}
	nodeAddr := catalog[0].Address
	if nodeAddr == "" {
		t.Fatal("catalog node Address is empty")
	}

	var entry = hbHealthEntry(t, c, app.name, app.id, true)
	if entry == nil {
		t.Fatalf("health/service/%s has no passing %s", app.name, app.id)
	}
	if entry.Service.Address != "" || entry.Node.Address != nodeAddr {
		t.Errorf("health entry Service.Address, Node.Address = %q, %q, want \"\", %q", entry.Service.Address, entry.Node.Address, nodeAddr)
	}

	// A peer dials the node's address: a request through the upstream
	// listener reaches echo.
	var body string
	hbPoll(t, 10*time.Second, "a request through the upstream", func() bool {
		resp, err := http.Get("http://" + upstreamListen + "/")
		if err != nil {
			return false
		}
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		body = string(b)
		return resp.StatusCode == http.StatusOK
	})
	if !strings.Contains(body, app.id) {
		t.Errorf("upstream answered %q, want echo %s", body, app.id)
	}
}
