package test

// Integration test of service.inbound with security.mtls: strict in the
// real sidecar binary, in front of the echo example, with a real Consul dev
// agent's CA and intentions; the caller is a mesh identity of the test.

import (
	"encoding/json"
	"fmt"
	"net/http"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/sidecarlb/sidecar/mesh"
	"github.com/sidecarlb/sidecar/test/consulagent"
	"github.com/sidecarlb/sidecar/test/harness"
)

// TestMeshSidecarInbound: a sidecar with service.inbound in strict mode
// registers the inbound port with the sidecar-mtls meta; a caller with
// web's leaf reaches echo through it over mTLS, a plaintext caller is
// refused, a deny intention answers 403, and /status and `sidecar status`
// show the identity, its expiry and the denial.
func TestMeshSidecarInbound(t *testing.T) {
	t.Parallel()
	agent := consulagent.Start(t, consulagent.Options{})
	client := agent.Client()
	app := newHBApp(t, "billing", agent.Addr())
	inPort := consulagent.FreePort(t)
	inbound := "127.0.0.1:" + strconv.Itoa(inPort)
	cfg := app.config()
	at := fmt.Sprintf("  drain: %s\n", app.drain)
	if !strings.Contains(cfg, at) {
		t.Fatal("hbApp.config has no drain line")
	}
	cfg = strings.Replace(cfg, at, at+"  inbound:\n    listen: "+inbound+"\n", 1)
	cfg += "security:\n  mtls: strict\n"
	app.echo = harness.StartEcho(t, app.echoAddr, app.id)
	app.sidecar = harness.StartSidecar(t, app.adminAddr, cfg)
	hbWaitPassing(t, client, app, 20*time.Second)

	entry := hbHealthEntry(t, client, app.name, app.id, true)
	if entry == nil || entry.Service.Port != inPort || entry.Service.Meta[mesh.MetaKey] != "strict" {
		t.Fatalf("registered %+v, want port %d and meta %s=strict", entry.Service, inPort, mesh.MetaKey)
	}

	web := startMeshNode(t, client, "web", "")
	url := "https://" + inbound + "/"
	code, body, err := get(mtlsClient(web, "billing", false), url)
	if err != nil || code != http.StatusOK || !strings.Contains(body, app.id) {
		t.Fatalf("GET over mTLS = %d %q, %v; want 200 from echo %s", code, body, err, app.id)
	}
	if code, _, err := get(&http.Client{Timeout: 3 * time.Second}, "http://"+inbound+"/"); err == nil {
		t.Fatalf("plaintext GET = %d, want refused", code)
	}

	setIntention(t, client, "web", "billing", "deny")
	consulagent.WaitFor(t, 5*time.Second, "web denied", func() bool {
		code, _, _ := get(mtlsClient(web, "billing", false), url)
		return code == http.StatusForbidden
	})

	var st struct {
		MTLS     string `json:"mtls"`
		Identity struct {
			URI    string    `json:"uri"`
			Expiry time.Time `json:"expiry"`
		} `json:"identity"`
		Denied  int64 `json:"denied"`
		Denials []struct {
			Caller string `json:"caller"`
		} `json:"recent_denials"`
	}
	if err := json.Unmarshal(hbStatus(t, app.adminAddr)["mesh"], &st); err != nil {
		t.Fatalf("mesh section of /status: %v", err)
	}
	if st.MTLS != "strict" || !strings.HasSuffix(st.Identity.URI, "/svc/billing") || !st.Identity.Expiry.After(time.Now()) ||
		st.Denied < 1 || !strings.HasSuffix(st.Denials[0].Caller, "/svc/web") {
		t.Errorf("mesh status = %+v, want strict, billing's identity, web denied", st)
	}

	cli := harness.Start(t, "sidecar", "status", "-admin", app.adminAddr)
	if code := cli.Wait(10 * time.Second); code != 0 {
		t.Fatalf("sidecar status exited %d: %s", code, cli.Output())
	}
	if out := cli.Output(); !strings.Contains(out, "identity spiffe://") || !strings.Contains(out, "/svc/web") {
		t.Errorf("sidecar status printed:\n%s\nwant the identity and web's denial", out)
	}
}
