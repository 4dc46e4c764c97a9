package test

// Integration tests of how the sidecar reaches Consul: HTTPS with client
// certificates, ACLs in default-deny mode with a token file, and a unix
// socket. Each runs the real sidecar binary, the echo example and a real
// Consul dev agent set up for it, all on loopback.

import (
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"

	"github.com/sidecarlb/sidecar/test/consulagent"
	"github.com/sidecarlb/sidecar/test/harness"
)

// withConsulKeys adds lines (indented under consul:) to app's config, and
// an upstream listener for service upstream on listen.
func withConsulKeys(app *hbApp, lines, upstream, listen string) string {
	cfg := app.config()
	at := "consul:\n  address: " + app.consulAddr + "\n"
	if !strings.Contains(cfg, at) {
		panic("hbApp.config has no consul section")
	}
	cfg = strings.Replace(cfg, at, at+lines, 1)
	if upstream != "" {
		cfg += fmt.Sprintf("upstreams:\n  - name: %s\n    listen: %s\n", upstream, listen)
	}
	return cfg
}

// getVia sends GET / to a sidecar listener and returns the status and the
// X-Instance header echo sets, or the error.
func getVia(listen string) (int, string, error) {
	client := &http.Client{Timeout: 2 * time.Second}
	resp, err := client.Get("http://" + listen + "/")
	if err != nil {
		return 0, "", err
	}
	defer resp.Body.Close()
	_, _ = io.Copy(io.Discard, resp.Body)
	return resp.StatusCode, resp.Header.Get("X-Instance"), nil
}

// waitProxied waits until a GET through listen reaches echo instance want.
func waitProxied(t *testing.T, listen, want string) {
	t.Helper()
	hbPoll(t, 15*time.Second, "GET via "+listen+" answered by "+want, func() bool {
		code, inst, _ := getVia(listen)
		return code == http.StatusOK && inst == want
	})
}

// waitLastError waits until the sidecar's /status shows a Consul error and
// returns it.
func waitLastError(t *testing.T, adminAddr string) string {
	t.Helper()
	var last string
	hbPoll(t, 15*time.Second, "a consul error in /status", func() bool {
		last = hbServiceSection(t, adminAddr).LastError
		return last != ""
	})
	return last
}

// TestConsulTLSClientCertificate: against an agent serving HTTPS only and
// requiring client certificates (verify_incoming), a sidecar with
// consul.tls registers, keeps its TTL check passing past several TTLs and
// resolves its upstream; one without the client certificate does not
// register, and /status and /ready say why.
func TestConsulTLSClientCertificate(t *testing.T) {
	t.Parallel()
	files := consulagent.NewTLSFiles(t)
	files.VerifyIncoming = true
	agent := consulagent.Start(t, consulagent.Options{TLS: files})
	c := agent.Client()

	// The agent refuses a client without a certificate, as configured.
	plain, err := api.NewClient(&api.Config{Address: agent.URL(), TLSConfig: api.TLSConfig{CAFile: files.CA}})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := plain.Agent().Self(); err == nil {
		t.Fatal("agent answered a client without a certificate; verify_incoming is not on")
	}

	app := newHBApp(t, "echo-tls", agent.URL())
	listen := "127.0.0.1:" + strconv.Itoa(consulagent.FreePort(t))
	tlsKeys := fmt.Sprintf("  tls: {ca_file: %s, cert_file: %s, key_file: %s, server_name: localhost}\n", files.CA, files.ClientCert, files.ClientKey)
	app.echo = harness.StartEcho(t, app.echoAddr, app.id)
	app.sidecar = harness.StartSidecar(t, app.adminAddr, withConsulKeys(app, tlsKeys, app.name, listen))

	hbWaitPassing(t, c, app, 15*time.Second)
	waitProxied(t, listen, app.id)
	// Heartbeat: still passing after three TTLs, which only TTL updates
	// over HTTPS keep it.
	time.Sleep(3 * hbTTL)
	if got := hbCheckStatus(t, c, app.checkID()); got != api.HealthPassing {
		t.Fatalf("check after 3 TTLs = %q, want passing", got)
	}

	// Without the client certificate: no registration, a clear error.
	bare := newHBApp(t, "echo-tls-nocert", agent.URL())
	bare.echo = harness.StartEcho(t, bare.echoAddr, bare.id)
	bare.sidecar = harness.StartSidecar(t, bare.adminAddr, withConsulKeys(bare, "  tls: {ca_file: "+files.CA+"}\n", "", ""))
	// Under TLS 1.3 the client's handshake ends before the agent checks
	// the certificate, so one attempt may see its connection closed before
	// it reads the agent's alert; the registrar retries, and the alert
	// naming the certificate must show within a few attempts.
	var last string
	for deadline := time.Now().Add(20 * time.Second); ; time.Sleep(50 * time.Millisecond) {
		last = waitLastError(t, bare.adminAddr)
		if strings.Contains(last, "tls: certificate required") || strings.Contains(last, "tls: bad certificate") {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("consul error without a client certificate = %q after 20s, want the TLS alert naming the certificate", last)
		}
	}
	t.Logf("without a client certificate: %s", last)
	if code, reason := readyState(t, bare.adminAddr); code != http.StatusServiceUnavailable || reason != "not registered in consul" {
		t.Errorf("GET /ready without a client certificate = %d %q, want 503 \"not registered in consul\"", code, reason)
	}
	if st := hbCheckStatus(t, c, bare.checkID()); st != "" {
		t.Errorf("agent has check %s (%s) of a sidecar without a client certificate", bare.checkID(), st)
	}
}

// consulMgmtToken is the initial management token of the ACL test agent.
const consulMgmtToken = "3b3c6f0e-9d7e-4f55-a1a2-6c0f2a6f3d11"

// TestConsulACLTokenFile: against an agent with ACLs in default-deny mode,
// a sidecar whose consul.token_file holds a token with the README's minimum
// policy (service write for its own name, service read for its upstream,
// node read) registers, heartbeats, resolves its upstream and deregisters
// on SIGTERM; the same token does not let it register another name.
func TestConsulACLTokenFile(t *testing.T) {
	t.Parallel()
	agent := consulagent.Start(t, consulagent.Options{ACLToken: consulMgmtToken})
	c := agent.Client()

	anon, err := api.NewClient(&api.Config{Address: agent.URL()})
	if err != nil {
		t.Fatal(err)
	}
	if err := anon.Agent().ServiceRegister(&api.AgentServiceRegistration{Name: "intruder", Port: 1}); err == nil || !strings.Contains(err.Error(), "Permission denied") {
		t.Fatalf("register without a token: %v, want Permission denied (default_policy deny)", err)
	}

	app := newHBApp(t, "echo-acl", agent.URL())
	peer := newHBApp(t, "peer-acl", agent.URL())
	rules := fmt.Sprintf(`service %q { policy = "write" }
service %q { policy = "read" }
node_prefix "" { policy = "read" }
`, app.name, peer.name)
	pol, _, err := c.ACL().PolicyCreate(&api.ACLPolicy{Name: "sidecar-echo-acl", Rules: rules}, nil)
	if err != nil {
		t.Fatalf("create policy: %v", err)
	}
	tok, _, err := c.ACL().TokenCreate(&api.ACLToken{Policies: []*api.ACLTokenPolicyLink{{ID: pol.ID}}}, nil)
	if err != nil {
		t.Fatalf("create token: %v", err)
	}
	tokenFile := filepath.Join(t.TempDir(), "consul-token")
	if err := os.WriteFile(tokenFile, []byte(tok.SecretID+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}

	// The upstream: a second echo, registered by the management token.
	peer.echo = harness.StartEcho(t, peer.echoAddr, peer.id)
	if err := c.Agent().ServiceRegister(&api.AgentServiceRegistration{ID: peer.id, Name: peer.name, Address: "127.0.0.1", Port: peer.echoPort}); err != nil {
		t.Fatalf("register %s: %v", peer.name, err)
	}

	listen := "127.0.0.1:" + strconv.Itoa(consulagent.FreePort(t))
	app.echo = harness.StartEcho(t, app.echoAddr, app.id)
	app.sidecar = harness.StartSidecar(t, app.adminAddr, withConsulKeys(app, "  token_file: "+tokenFile+"\n", peer.name, listen))
	hbWaitPassing(t, c, app, 15*time.Second)
	waitProxied(t, listen, peer.id)
	hbPoll(t, 10*time.Second, "/ready 200", func() bool {
		code, _ := readyState(t, app.adminAddr)
		return code == http.StatusOK
	})
	time.Sleep(2 * hbTTL)
	if got := hbCheckStatus(t, c, app.checkID()); got != api.HealthPassing {
		t.Fatalf("check after 2 TTLs = %q, want passing (TTL updates need service write)", got)
	}

	// The same token may not register a name its policy does not grant.
	other := newHBApp(t, "echo-acl-other", agent.URL())
	other.echo = harness.StartEcho(t, other.echoAddr, other.id)
	other.sidecar = harness.StartSidecar(t, other.adminAddr, withConsulKeys(other, "  token_file: "+tokenFile+"\n", "", ""))
	if last := waitLastError(t, other.adminAddr); !strings.Contains(last, "Permission denied") {
		t.Errorf("consul error registering %s = %q, want Permission denied", other.name, last)
	}

	app.sidecar.Signal(syscall.SIGTERM)
	if code := app.sidecar.Wait(15 * time.Second); code != 0 {
		t.Fatalf("sidecar exit code = %d, want 0\n%s", code, app.sidecar.Output())
	}
	if services, err := c.Agent().Services(); err != nil {
		t.Fatal(err)
	} else if _, ok := services[app.id]; ok {
		t.Errorf("%s still registered after SIGTERM; deregister needs service write", app.id)
	}
}

// TestConsulUnixSocket: with consul.address unix:///PATH, against an agent
// serving its HTTP API on that socket only, the sidecar registers,
// heartbeats, resolves and deregisters.
func TestConsulUnixSocket(t *testing.T) {
	t.Parallel()
	sock := filepath.Join(t.TempDir(), "consul.sock")
	agent := consulagent.Start(t, consulagent.Options{UnixSocket: sock})
	c := agent.Client()
	if _, err := http.Get("http://" + agent.Addr() + "/v1/agent/self"); err == nil {
		t.Fatalf("agent answers on TCP %s too; want the unix socket only", agent.Addr())
	}

	app := newHBApp(t, "echo-unix", agent.URL())
	listen := "127.0.0.1:" + strconv.Itoa(consulagent.FreePort(t))
	app.echo = harness.StartEcho(t, app.echoAddr, app.id)
	app.sidecar = harness.StartSidecar(t, app.adminAddr, withConsulKeys(app, "", app.name, listen))
	hbWaitPassing(t, c, app, 15*time.Second)
	waitProxied(t, listen, app.id)
	time.Sleep(2 * hbTTL)
	if got := hbCheckStatus(t, c, app.checkID()); got != api.HealthPassing {
		t.Fatalf("check after 2 TTLs = %q, want passing", got)
	}
	app.sidecar.Signal(syscall.SIGTERM)
	if code := app.sidecar.Wait(15 * time.Second); code != 0 {
		t.Fatalf("sidecar exit code = %d, want 0", code)
	}
	if got := hbCheckStatus(t, c, app.checkID()); got != "" {
		t.Errorf("check %s = %q after SIGTERM, want deregistered", app.checkID(), got)
	}
}
