package test

// Integration tests of registration and the TTL heartbeat: the real sidecar
// binary, the echo example and a real Consul dev agent, all on loopback.
//
// The sidecar runs with short settings (check.interval 200ms, ttl 2s), so a
// TTL lapse takes seconds. Every wait is bounded and polls rather than
// sleeps. Removal of a critical instance by deregister_critical_after is not
// tested: Consul's minimum is 1m and its reaper runs on a slow schedule.

import (
	"encoding/json"
	"fmt"
	"maps"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"

	"github.com/sidecarlb/sidecar/test/consulagent"
	"github.com/sidecarlb/sidecar/test/harness"
)

// The heartbeat settings every test here runs with.
const (
	hbInterval = 200 * time.Millisecond
	hbTTL      = 2 * time.Second
)

// hbApp is an echo instance and the sidecar that registers it.
type hbApp struct {
	name, id   string
	echoAddr   string
	echoPort   int
	adminAddr  string
	consulAddr string
	drain      time.Duration

	echo    *harness.Proc
	sidecar *harness.Proc
}

// checkID is the ID of the TTL check the sidecar registers.
func (a *hbApp) checkID() string { return "service:" + a.id + ":ttl" }

// config is the sidecar's configuration file.
func (a *hbApp) config() string {
	return fmt.Sprintf(`service:
  name: %[1]s
  id: %[2]s
  address: 127.0.0.1
  port: %[3]d
  tags: [v1, blue]
  meta: {zone: a, build: "42"}
  weight: 3
  check:
    http: http://%[4]s/health
    interval: %[5]s
    timeout: 1s
  ttl: %[6]s
  deregister_critical_after: 1m
  drain: %[7]s
consul:
  address: %[8]s
admin:
  listen: %[9]s
log:
  level: debug
`, a.name, a.id, a.echoPort, a.echoAddr, hbInterval, hbTTL, a.drain, a.consulAddr, a.adminAddr)
}

// newHBApp picks ports for an echo instance named name and its sidecar,
// which talks to the agent at consulAddr. Nothing is started.
func newHBApp(t *testing.T, name, consulAddr string) *hbApp {
	t.Helper()
	port := consulagent.FreePort(t)
	return &hbApp{
		name:       name,
		id:         name + "-1",
		echoAddr:   "127.0.0.1:" + strconv.Itoa(port),
		echoPort:   port,
		adminAddr:  "127.0.0.1:" + strconv.Itoa(consulagent.FreePort(t)),
		consulAddr: consulAddr,
		drain:      200 * time.Millisecond,
	}
}

// start starts echo, then the sidecar, and waits until both answer.
func (a *hbApp) start(t *testing.T) {
	t.Helper()
	a.echo = harness.StartEcho(t, a.echoAddr, a.id)
	a.sidecar = harness.StartSidecar(t, a.adminAddr, a.config())
}

// post sends POST path to echo ("/fail", "/recover").
func (a *hbApp) post(t *testing.T, path string) {
	t.Helper()
	resp, err := http.Post("http://"+a.echoAddr+path, "text/plain", nil)
	if err != nil {
		t.Fatalf("POST %s: %v", path, err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("POST %s: status %d, want 200", path, resp.StatusCode)
	}
}

// hbServiceStatus is the "service" section of the sidecar's /status.
type hbServiceStatus struct {
	ServiceID     string `json:"service_id"`
	CheckID       string `json:"check_id"`
	Registered    bool   `json:"registered"`
	CheckStatus   string `json:"check_status"`
	Output        string `json:"output"`
	LastError     string `json:"last_error"`
	Registrations int    `json:"registrations"`
}

// hbStatus fetches the sidecar's /status as sections by key.
func hbStatus(t *testing.T, adminAddr string) map[string]json.RawMessage {
	t.Helper()
	client := &http.Client{Timeout: 2 * time.Second}
	resp, err := client.Get("http://" + adminAddr + "/status")
	if err != nil {
		t.Fatalf("GET /status: %v", err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("GET /status: status %d, want 200", resp.StatusCode)
	}
	var doc map[string]json.RawMessage
	if err := json.NewDecoder(resp.Body).Decode(&doc); err != nil {
		t.Fatalf("decode /status: %v", err)
	}
	return doc
}

// hbServiceSection fetches the "service" section of /status, failing the
// test when there is none.
func hbServiceSection(t *testing.T, adminAddr string) hbServiceStatus {
	t.Helper()
	raw, ok := hbStatus(t, adminAddr)["service"]
	if !ok {
		t.Fatal(`/status has no "service" section`)
	}
	var s hbServiceStatus
	if err := json.Unmarshal(raw, &s); err != nil {
		t.Fatalf("decode /status service: %v", err)
	}
	return s
}

// hbAgentCheck returns the check as the local agent sees it, or nil when
// the agent does not know it.
func hbAgentCheck(t *testing.T, c *api.Client, checkID string) *api.AgentCheck {
	t.Helper()
	checks, err := c.Agent().Checks()
	if err != nil {
		t.Fatalf("agent checks: %v", err)
	}
	return checks[checkID]
}

// hbCheckStatus is the status of the agent's check, "" when it is absent.
func hbCheckStatus(t *testing.T, c *api.Client, checkID string) string {
	t.Helper()
	if chk := hbAgentCheck(t, c, checkID); chk != nil {
		return chk.Status
	}
	return ""
}

// hbHealthEntry returns the catalog's health entry of instance id of
// service name, or nil when the catalog does not list it.
func hbHealthEntry(t *testing.T, c *api.Client, name, id string, passingOnly bool) *api.ServiceEntry {
	t.Helper()
	entries, _, err := c.Health().Service(name, "", passingOnly, nil)
	if err != nil {
		t.Fatalf("health of %q: %v", name, err)
	}
	for _, e := range entries {
		if e.Service.ID == id {
			return e
		}
	}
	return nil
}

// hbPoll calls cond every 10ms until it returns true and returns how long
// that took; it fails the test after within.
func hbPoll(t *testing.T, within time.Duration, what string, cond func() bool) time.Duration {
	t.Helper()
	start := time.Now()
	deadline := start.Add(within)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %v waiting for %s", within, what)
		}
		time.Sleep(10 * time.Millisecond)
	}
	return time.Since(start)
}

// hbWaitPassing waits until the agent shows the app's check passing.
func hbWaitPassing(t *testing.T, c *api.Client, a *hbApp, within time.Duration) time.Duration {
	t.Helper()
	return hbPoll(t, within, "check "+a.checkID()+" passing", func() bool {
		return hbCheckStatus(t, c, a.checkID()) == api.HealthPassing
	})
}

// TestHeartbeatRegistersPassing checks that a sidecar with a service section
// registers the instance as configured, with its TTL check passing in the
// catalog's health view.
func TestHeartbeatRegistersPassing(t *testing.T) {
	t.Parallel()
	agent := consulagent.Start(t, consulagent.Options{})
	c := agent.Client()
	app := newHBApp(t, "echo-reg", agent.Addr())
	app.start(t)

	var entry *api.ServiceEntry
	hbPoll(t, 10*time.Second, "catalog health entry passing", func() bool {
		entry = hbHealthEntry(t, c, app.name, app.id, true)
		return entry != nil
	})

	svc := entry.Service
	if svc.Service != app.name {
		t.Errorf("service name = %q, want %q", svc.Service, app.name)
	}
	if svc.Address != "127.0.0.1" {
		t.Errorf("service address = %q, want %q", svc.Address, "127.0.0.1")
	}
	if svc.Port != app.echoPort {
		t.Errorf("service port = %d, want %d", svc.Port, app.echoPort)
	}
	if want := []string{"v1", "blue"}; !slices.Equal(svc.Tags, want) {
		t.Errorf("service tags = %q, want %q", svc.Tags, want)
	}
	if svc.Meta["zone"] != "a" || svc.Meta["build"] != "42" || len(svc.Meta) != 2 {
		t.Errorf("service meta = %v, want map[build:42 zone:a]", svc.Meta)
	}
	if svc.Weights.Passing != 3 {
		t.Errorf("service passing weight = %d, want 3", svc.Weights.Passing)
	}

	var chk *api.HealthCheck
	for _, hc := range entry.Checks {
		if hc.CheckID == app.checkID() {
			chk = hc
		}
	}
	if chk == nil {
		t.Fatalf("health entry has no check %q: %v", app.checkID(), entry.Checks)
	}
	if chk.Status != api.HealthPassing {
		t.Errorf("check status = %q, want %q", chk.Status, api.HealthPassing)
	}
	if chk.Type != "ttl" {
		t.Errorf("check type = %q, want %q", chk.Type, "ttl")
	}
	if !strings.Contains(chk.Output, "200") {
		t.Errorf("check output = %q, want the probe's 200", chk.Output)
	}

	st := hbServiceSection(t, app.adminAddr)
	if !st.Registered || st.ServiceID != app.id || st.CheckID != app.checkID() || st.CheckStatus != api.HealthPassing {
		t.Errorf("/status service = %+v, want registered %q with check %q passing", st, app.id, app.checkID())
	}
}

// TestHeartbeatProbeFailureGoesCritical checks that a failing probe turns
// the check critical within ttl + 1s, with the probe's reason as output, and
// that it passes again once the app recovers.
func TestHeartbeatProbeFailureGoesCritical(t *testing.T) {
	t.Parallel()
	agent := consulagent.Start(t, consulagent.Options{})
	c := agent.Client()
	app := newHBApp(t, "echo-probe", agent.Addr())
	app.start(t)
	hbWaitPassing(t, c, app, 10*time.Second)

	app.post(t, "/fail")
	took := hbPoll(t, hbTTL+time.Second, "check critical after POST /fail", func() bool {
		return hbCheckStatus(t, c, app.checkID()) == api.HealthCritical
	})
	t.Logf("probe failure → critical: %d ms (check.interval %v, ttl %v)", took.Milliseconds(), hbInterval, hbTTL)
	if chk := hbAgentCheck(t, c, app.checkID()); chk == nil || !strings.Contains(chk.Output, "503") {
		t.Errorf("check output = %q, want the probe's 503", checkOutput(chk))
	}
	// Peers asking for passing instances no longer get this one.
	hbPoll(t, 5*time.Second, "instance gone from passing-only health", func() bool {
		return hbHealthEntry(t, c, app.name, app.id, true) == nil
	})

	app.post(t, "/recover")
	took = hbPoll(t, hbTTL+time.Second, "check passing after POST /recover", func() bool {
		return hbCheckStatus(t, c, app.checkID()) == api.HealthPassing
	})
	t.Logf("probe recovery → passing: %d ms", took.Milliseconds())
	if chk := hbAgentCheck(t, c, app.checkID()); chk == nil || !strings.Contains(chk.Output, "200") {
		t.Errorf("check output = %q, want the probe's 200", checkOutput(chk))
	}
	hbPoll(t, 5*time.Second, "instance back in passing-only health", func() bool {
		return hbHealthEntry(t, c, app.name, app.id, true) != nil
	})
}

func checkOutput(chk *api.AgentCheck) string {
	if chk == nil {
		return "<no check>"
	}
	return chk.Output
}

// TestHeartbeatKillSidecarExpiresTTL checks the expiry half of the
// heartbeat: once the sidecar is killed with SIGKILL nothing refreshes the
// check, and Consul turns it critical when the TTL lapses, not before.
func TestHeartbeatKillSidecarExpiresTTL(t *testing.T) {
	t.Parallel()
	agent := consulagent.Start(t, consulagent.Options{})
	c := agent.Client()
	app := newHBApp(t, "echo-kill", agent.Addr())
	app.start(t)
	hbWaitPassing(t, c, app, 10*time.Second)

	killed := time.Now()
	app.sidecar.Signal(syscall.SIGKILL)
	if code := app.sidecar.Wait(5 * time.Second); code != -1 {
		t.Errorf("sidecar exit code = %d, want -1 (killed)", code)
	}
	// The last refresh was at most ttl/3 before the kill, so the check
	// outlives the sidecar by at least 2/3 of the TTL.
	if got := hbCheckStatus(t, c, app.checkID()); got != api.HealthPassing {
		t.Fatalf("check status %v after SIGKILL = %q, want %q", time.Since(killed), got, api.HealthPassing)
	}
	hbPoll(t, hbTTL+2*time.Second, "check critical after SIGKILL", func() bool {
		return hbCheckStatus(t, c, app.checkID()) == api.HealthCritical
	})
	took := time.Since(killed)
	t.Logf("SIGKILL → critical: %d ms (ttl %v)", took.Milliseconds(), hbTTL)
	if took < hbTTL/2 {
		t.Errorf("check critical %v after SIGKILL, want at least ttl/2 = %v", took, hbTTL/2)
	}
	if chk := hbAgentCheck(t, c, app.checkID()); chk == nil || !strings.Contains(chk.Output, "TTL expired") {
		t.Errorf("check output = %q, want Consul's TTL expiry", checkOutput(chk))
	}
	// The instance stays listed (critical) until deregister_critical_after.
	if hbHealthEntry(t, c, app.name, app.id, false) == nil {
		t.Error("instance gone from health right after the TTL lapsed, want it listed as critical")
	}
}

// TestHeartbeatSIGTERMDeregistersBeforeExit checks the shutdown order: on
// SIGTERM the instance leaves the agent and the catalog first, then the
// sidecar drains and exits 0.
func TestHeartbeatSIGTERMDeregistersBeforeExit(t *testing.T) {
	t.Parallel()
	agent := consulagent.Start(t, consulagent.Options{})
	c := agent.Client()
	app := newHBApp(t, "echo-term", agent.Addr())
	app.drain = time.Second
	app.start(t)
	hbWaitPassing(t, c, app, 10*time.Second)
	hbPoll(t, 10*time.Second, "catalog health entry", func() bool {
		return hbHealthEntry(t, c, app.name, app.id, false) != nil
	})

	gone := func() bool {
		services, err := c.Agent().Services()
		if err != nil {
			t.Fatalf("agent services: %v", err)
		}
		if _, ok := services[app.id]; ok {
			return false
		}
		return hbHealthEntry(t, c, app.name, app.id, false) == nil
	}
	signalled := time.Now()
	app.sidecar.Signal(syscall.SIGTERM)
	hbPoll(t, 5*time.Second, "service deregistered", func() bool {
		select {
		case <-app.sidecar.Exited():
			t.Fatalf("sidecar exited (%v) before %q left the agent and the catalog", app.sidecar.ExitErr(), app.id)
		default:
		}
		return gone()
	})
	t.Logf("SIGTERM → deregistered: %d ms", time.Since(signalled).Milliseconds())
	select {
	case <-app.sidecar.Exited():
		t.Fatalf("sidecar had exited by the time %q was deregistered, want it still draining", app.id)
	default:
	}

	if code := app.sidecar.Wait(10 * time.Second); code != 0 {
		t.Fatalf("sidecar exit code = %d, want 0\n%s", code, app.sidecar.Output())
	}
	took := time.Since(signalled)
	t.Logf("SIGTERM → exit: %d ms (drain %v)", took.Milliseconds(), app.drain)
	if took < app.drain {
		t.Errorf("sidecar exited %v after SIGTERM, want after the drain of %v", took, app.drain)
	}
	if !gone() {
		t.Errorf("service %q registered again after exit", app.id)
	}
	if hbAgentCheck(t, c, app.checkID()) != nil {
		t.Errorf("check %q still on the agent after exit", app.checkID())
	}
}

// TestRegistrationWaitsForConsul checks that a sidecar started while Consul
// is down keeps running, says so in /status, and registers the instance once
// the agent comes up.
func TestRegistrationWaitsForConsul(t *testing.T) {
	t.Parallel()
	agent := consulagent.Start(t, consulagent.Options{})
	agent.Stop()
	app := newHBApp(t, "echo-down", agent.Addr())
	app.start(t)

	var st hbServiceStatus
	hbPoll(t, 10*time.Second, "/status to report the registration failure", func() bool {
		st = hbServiceSection(t, app.adminAddr)
		return st.LastError != ""
	})
	if st.Registered {
		t.Errorf("/status service registered = true with Consul down, want false (last_error %q)", st.LastError)
	}
	t.Logf("/status with Consul down: last_error %q", st.LastError)
	select {
	case <-app.sidecar.Exited():
		t.Fatalf("sidecar exited with Consul down: %v", app.sidecar.ExitErr())
	default:
	}

	agent.Start()
	c := agent.Client()
	// Registration is retried with backoff capped at the ttl.
	took := hbWaitPassing(t, c, app, 10*time.Second)
	t.Logf("agent up → registered and passing: %d ms", took.Milliseconds())
	hbPoll(t, 5*time.Second, "/status registered", func() bool {
		st = hbServiceSection(t, app.adminAddr)
		return st.Registered && st.LastError == ""
	})
}

// TestRegistrationAfterAgentRestart checks that the instance comes back
// passing within 2 × ttl of a restarted agent (which forgets every service,
// as a dev agent does) being up again.
func TestRegistrationAfterAgentRestart(t *testing.T) {
	t.Parallel()
	agent := consulagent.Start(t, consulagent.Options{})
	c := agent.Client()
	app := newHBApp(t, "echo-restart", agent.Addr())
	app.start(t)
	hbWaitPassing(t, c, app, 10*time.Second)
	if n := hbRegistrations(t, app, 1); n != 1 {
		t.Fatalf("/status registrations = %d, want 1", n)
	}

	stopped := time.Now()
	agent.Stop()
	agent.Start()
	t.Logf("agent down for %d ms", time.Since(stopped).Milliseconds())
	took := hbWaitPassing(t, c, app, 2*hbTTL)
	t.Logf("agent restart → registered and passing: %d ms (2 × ttl = %v)", took.Milliseconds(), 2*hbTTL)
	hbPoll(t, 5*time.Second, "catalog health entry passing", func() bool {
		return hbHealthEntry(t, c, app.name, app.id, true) != nil
	})
	if n := hbRegistrations(t, app, 2); n < 2 {
		t.Errorf("/status registrations = %d, want at least 2", n)
	}
}

// hbRegistrations returns the registrations /status counts once it counts
// at least want. The agent has the service as soon as it answers a
// registration, a moment before the sidecar, which counts the registration
// on that answer.
func hbRegistrations(t *testing.T, app *hbApp, want int) int {
	t.Helper()
	var n int
	hbPoll(t, 5*time.Second, "/status to count the registration", func() bool {
		n = hbServiceSection(t, app.adminAddr).Registrations
		return n >= want
	})
	return n
}

// TestRegistrationAfterLongAgentOutage checks the 2 × ttl bound after an
// outage long enough for the registration retries to have backed off to
// their longest delay.
func TestRegistrationAfterLongAgentOutage(t *testing.T) {
	t.Parallel()
	agent := consulagent.Start(t, consulagent.Options{})
	c := agent.Client()
	app := newHBApp(t, "echo-outage", agent.Addr())
	app.start(t)
	hbWaitPassing(t, c, app, 10*time.Second)

	agent.Stop()
	// The outage itself: retries back off 200ms, 400ms, … 3.2s, then 5s ±20%,
	// so after 7s the sidecar retries at its longest delay.
	time.Sleep(7 * time.Second)
	if st := hbServiceSection(t, app.adminAddr); st.Registered || st.LastError == "" {
		t.Errorf("/status service during the outage = %+v, want unregistered with an error", st)
	}
	agent.Start()
	took := hbWaitPassing(t, c, app, 2*hbTTL)
	t.Logf("agent back after a 7s outage → registered and passing: %d ms (2 × ttl = %v)", took.Milliseconds(), 2*hbTTL)
}

// TestHeartbeatAppKilledGoesCritical checks that the check turns critical
// soon after the app dies, and that a client-only sidecar (no service
// section) against the same agent starts, registers nothing and has no
// service section in /status.
func TestHeartbeatAppKilledGoesCritical(t *testing.T) {
	t.Parallel()
	agent := consulagent.Start(t, consulagent.Options{})
	c := agent.Client()
	app := newHBApp(t, "echo-dies", agent.Addr())
	app.start(t)
	hbWaitPassing(t, c, app, 10*time.Second)

	killed := time.Now()
	app.echo.Signal(syscall.SIGKILL)
	app.echo.Wait(5 * time.Second)
	hbPoll(t, hbTTL+time.Second, "check critical after the app died", func() bool {
		return hbCheckStatus(t, c, app.checkID()) == api.HealthCritical
	})
	t.Logf("app SIGKILL → critical: %d ms", time.Since(killed).Milliseconds())
	// A probe in flight at the kill may report EOF first; the next refresh
	// (every ttl/3) carries the latest probe's output.
	hbPoll(t, hbTTL, "check output to show connection refused", func() bool {
		chk := hbAgentCheck(t, c, app.checkID())
		return chk != nil && chk.Status == api.HealthCritical && strings.Contains(chk.Output, "connection refused")
	})

	t.Run("client-only sidecar", func(t *testing.T) {
		admin := "127.0.0.1:" + strconv.Itoa(consulagent.FreePort(t))
		harness.StartSidecar(t, admin, fmt.Sprintf("consul:\n  address: %s\nadmin:\n  listen: %s\n", agent.Addr(), admin))
		doc := hbStatus(t, admin)
		if _, ok := doc["service"]; ok {
			t.Errorf("/status of a client-only sidecar has a service section: %s", doc["service"])
		}
		if _, ok := doc["version"]; !ok {
			t.Errorf("/status has no version: %v", doc)
		}
		services, err := c.Agent().Services()
		if err != nil {
			t.Fatalf("agent services: %v", err)
		}
		if len(services) != 1 {
			t.Errorf("agent services = %v, want only %q", slices.Collect(maps.Keys(services)), app.id)
		}
	})
}

// TestRegistrationValidateExitCodes checks `sidecar validate`: 0 for a good
// config, 2 for a bad one with the key path named on stderr.
func TestRegistrationValidateExitCodes(t *testing.T) {
	t.Parallel()
	valid := (&hbApp{
		name: "echo", id: "echo-1", echoAddr: "127.0.0.1:9001", echoPort: 9001,
		adminAddr: "127.0.0.1:15100", consulAddr: "127.0.0.1:8500", drain: time.Second,
	}).config()
	tests := []struct {
		name     string
		config   string
		wantCode int
		want     []string
	}{
		{name: "valid", config: valid, wantCode: 0, want: []string{": ok"}},
		{
			name:     "port out of range",
			config:   strings.Replace(valid, "port: 9001", "port: 70000", 1),
			wantCode: 2,
			want:     []string{"service.port", "70000"},
		},
		{
			name:     "short ttl and unknown key",
			config:   strings.Replace(valid, "ttl: 2s", "ttl: 500ms\n  chek: {}", 1),
			wantCode: 2,
			want:     []string{"service.ttl", "service.chek"},
		},
		{
			name:     "no port",
			config:   "service:\n  name: echo\n",
			wantCode: 2,
			want:     []string{"service.port"},
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			path := filepath.Join(t.TempDir(), "config.yaml")
			if err := os.WriteFile(path, []byte(tc.config), 0o600); err != nil {
				t.Fatal(err)
			}
			p := harness.Start(t, "sidecar", "validate", "-config", path)
			if code := p.Wait(30 * time.Second); code != tc.wantCode {
				t.Errorf("validate exit code = %d, want %d\n%s", code, tc.wantCode, p.Output())
			}
			for _, w := range tc.want {
				if !strings.Contains(p.Output(), w) {
					t.Errorf("validate output = %q, want it to contain %q", p.Output(), w)
				}
			}
			if tc.wantCode != 0 && !strings.Contains(p.Output(), path) {
				t.Errorf("validate output = %q, want it to name the file %s", p.Output(), path)
			}
		})
	}
}
