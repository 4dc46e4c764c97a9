package test

// Integration tests of config reload (SIGHUP, sidecar reload): the real
// sidecar binary, echo instances registered in a real Consul dev agent, and
// real HTTP clients, all on loopback.

import (
	"bufio"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptrace"
	"os"
	"os/exec"
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

// rlSidecar is a sidecar started from a file the test rewrites.
type rlSidecar struct {
	path  string
	admin string
	proc  *harness.Proc
}

func rlStart(t *testing.T, admin, cfg string) *rlSidecar {
	t.Helper()
	s := &rlSidecar{path: filepath.Join(t.TempDir(), "config.yaml"), admin: admin}
	s.write(t, cfg)
	s.proc = harness.Start(t, "sidecar", "-config", s.path)
	s.proc.WaitHTTP("http://"+admin+"/healthz", 15*time.Second)
	return s
}

func (s *rlSidecar) write(t *testing.T, cfg string) {
	t.Helper()
	if err := os.WriteFile(s.path, []byte(cfg), 0o600); err != nil {
		t.Fatal(err)
	}
}

// hup rewrites the file, sends SIGHUP and waits until the reload counter
// of result has gone up by one.
func (s *rlSidecar) hup(t *testing.T, cfg, result string) {
	t.Helper()
	before := s.reloads(t, result)
	s.write(t, cfg)
	s.proc.Signal(syscall.SIGHUP)
	consulagent.WaitFor(t, 10*time.Second, "reload counted as "+result, func() bool {
		return s.reloads(t, result) > before
	})
}

// reloads reads sidecar_config_reloads_total{result=result} from /metrics.
func (s *rlSidecar) reloads(t *testing.T, result string) int {
	t.Helper()
	v, ok := rlMetric(t, s.admin, `sidecar_config_reloads_total{result="`+result+`"}`)
	if !ok {
		t.Fatalf("no reload counter for %q in /metrics", result)
	}
	return int(v)
}

func rlMetric(t *testing.T, admin, series string) (float64, bool) {
	t.Helper()
	resp, err := adminHTTP.Get("http://" + admin + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	sc := bufio.NewScanner(resp.Body)
	for sc.Scan() {
		if v, ok := strings.CutPrefix(sc.Text(), series+" "); ok {
			f, err := strconv.ParseFloat(v, 64)
			return f, err == nil
		}
	}
	return 0, false
}

// rlEcho starts an echo instance named name and registers it in Consul as
// a node of service with tags; with no check it counts as passing.
func rlEcho(t *testing.T, c *api.Client, service, name string, tags ...string) {
	t.Helper()
	addr := pxLoopback(t)
	harness.StartEcho(t, addr, name)
	_, port, _ := net.SplitHostPort(addr)
	p, _ := strconv.Atoi(port)
	if err := c.Agent().ServiceRegister(&api.AgentServiceRegistration{
		ID: name, Name: service, Address: "127.0.0.1", Port: p, Tags: tags,
	}); err != nil {
		t.Fatal(err)
	}
}

// rlGet sends GET / to base and returns the answering instance, or an error.
func rlGet(client *http.Client, base string) (string, error) {
	resp, err := client.Get(base + "/")
	if err != nil {
		return "", err
	}
	defer resp.Body.Close()
	_, _ = io.Copy(io.Discard, resp.Body)
	if resp.StatusCode != http.StatusOK {
		return "", fmt.Errorf("status %d", resp.StatusCode)
	}
	return resp.Header.Get("X-Instance"), nil
}

// rlInstances sends n requests to base and returns the instances that
// answered, sorted and deduplicated; any failure fails the test.
func rlInstances(t *testing.T, client *http.Client, base string, n int) []string {
	t.Helper()
	var got []string
	for range n {
		inst, err := rlGet(client, base)
		if err != nil {
			t.Fatalf("GET %s/: %v", base, err)
		}
		if !slices.Contains(got, inst) {
			got = append(got, inst)
		}
	}
	slices.Sort(got)
	return got
}

// rlClientConfig is a client-only sidecar's file with the given upstreams
// (YAML list items) and log level.
func rlClientConfig(consulAddr, admin, level string, upstreams ...string) string {
	return fmt.Sprintf(`consul: {address: %s}
admin: {listen: %s}
log: {level: %s}
upstreams:
%s`, consulAddr, admin, level, "  - "+strings.Join(upstreams, "\n  - ")+"\n")
}

// rlRouteStatus is the part of a /status route the tests look at.
type rlRouteStatus struct {
	Listener string   `json:"listener"`
	Balancer string   `json:"balancer"`
	Tags     []string `json:"tags"`
}

func rlRoutes(t *testing.T, admin string) map[string]rlRouteStatus {
	t.Helper()
	var routes []rlRouteStatus
	if err := json.Unmarshal(hbStatus(t, admin)["upstreams"], &routes); err != nil {
		t.Fatal(err)
	}
	out := make(map[string]rlRouteStatus, len(routes))
	for _, r := range routes {
		out[r.Listener] = r
	}
	return out
}

// TestReloadUpstreams reloads on SIGHUP a file with one upstream changed
// (balancer and tags), one removed and one added: the changed listener
// keeps its client connection and answers from the newly tagged node, the
// removed one refuses connections, the added one serves.
func TestReloadUpstreams(t *testing.T) {
	agent := consulagent.Start(t, consulagent.Options{})
	c := agent.Client()
	rlEcho(t, c, "echo", "echo-blue", "blue")
	rlEcho(t, c, "echo", "echo-green", "green")
	changed, removed, added := pxLoopback(t), pxLoopback(t), pxLoopback(t)
	admin := pxLoopback(t)
	s := rlStart(t, admin, rlClientConfig(agent.Addr(), admin, "info",
		"{name: echo, listen: "+changed+", tags: [blue]}",
		"{name: echo, listen: "+removed+"}"))

	client := &http.Client{Timeout: 5 * time.Second}
	if got := rlInstances(t, client, "http://"+changed, 6); !slices.Equal(got, []string{"echo-blue"}) {
		t.Fatalf("before reload, %s answered from %q, want echo-blue only", changed, got)
	}
	rlInstances(t, client, "http://"+removed, 2)

	s.hup(t, rlClientConfig(agent.Addr(), admin, "info",
		"{name: echo, listen: "+changed+", tags: [green], balancer: random}",
		"{name: echo, listen: "+added+"}"), "ok")

	// The changed listener: same client connection, new route.
	reused := false
	trace := &httptrace.ClientTrace{GotConn: func(i httptrace.GotConnInfo) { reused = i.Reused }}
	req, _ := http.NewRequest(http.MethodGet, "http://"+changed+"/", nil)
	resp, err := client.Do(req.WithContext(httptrace.WithClientTrace(req.Context(), trace)))
	if err != nil {
		t.Fatalf("GET %s after reload: %v", changed, err)
	}
	_, _ = io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	if !reused {
		t.Error("the client's keep-alive connection to the changed listener did not survive the reload")
	}
	if got := rlInstances(t, client, "http://"+changed, 6); !slices.Equal(got, []string{"echo-green"}) {
		t.Errorf("after reload, %s answered from %q, want echo-green only", changed, got)
	}
	routes := rlRoutes(t, admin)
	if r := routes[changed]; r.Balancer != "random" || !slices.Equal(r.Tags, []string{"green"}) {
		t.Errorf("/status route of %s = %+v, want balancer random, tags [green]", changed, r)
	}
	if _, ok := routes[removed]; ok {
		t.Errorf("/status still lists the removed listener %s", removed)
	}

	// The removed listener refuses connections; the added one serves.
	consulagent.WaitFor(t, 5*time.Second, "the removed listener to close", func() bool {
		conn, err := net.DialTimeout("tcp", removed, time.Second)
		if err != nil {
			return true
		}
		conn.Close()
		return false
	})
	if got := rlInstances(t, client, "http://"+added, 6); len(got) != 2 {
		t.Errorf("added listener %s answered from %q, want both instances", added, got)
	}
	if !strings.Contains(s.proc.Output(), `"msg":"config reloaded"`) || !strings.Contains(s.proc.Output(), `"took":`) {
		t.Errorf("no \"config reloaded\" line with took in the log:\n%s", s.proc.Output())
	}
}

// TestReloadInvalidKeepsRunning: a file that does not validate is
// rejected, with the errors `sidecar validate` gives, by SIGHUP and by
// `sidecar reload` (exit 2); the counter counts it and the running config
// keeps serving. A valid file then reloads through `sidecar reload`
// (exit 0), and one whose new listener cannot bind fails (exit 1) with
// nothing changed.
func TestReloadInvalidKeepsRunning(t *testing.T) {
	agent := consulagent.Start(t, consulagent.Options{})
	rlEcho(t, agent.Client(), "echo", "echo-1")
	up, admin := pxLoopback(t), pxLoopback(t)
	good := rlClientConfig(agent.Addr(), admin, "info", "{name: echo, listen: "+up+"}")
	s := rlStart(t, admin, good)
	client := &http.Client{Timeout: 5 * time.Second}
	rlInstances(t, client, "http://"+up, 2)

	bad := rlClientConfig(agent.Addr(), admin, "loud", "{name: echo, listen: "+up+", balancer: bogus}")
	s.hup(t, bad, "invalid")
	rlInstances(t, client, "http://"+up, 4)
	if n := s.reloads(t, "ok"); n != 0 {
		t.Errorf("ok reloads = %d after an invalid file, want 0", n)
	}

	// The same errors as validate, from the log and from sidecar reload.
	validate := exec.Command(filepath.Join(harness.Binaries(t), "sidecar"), "validate", "-config", s.path)
	out, err := validate.CombinedOutput()
	if validate.ProcessState.ExitCode() != 2 {
		t.Fatalf("sidecar validate: %v, want exit 2\n%s", err, out)
	}
	problems := strings.Split(strings.TrimSpace(string(out)), "\n")
	if len(problems) < 2 {
		t.Fatalf("sidecar validate printed %q, want two problems", problems)
	}
	for _, p := range problems {
		js, _ := json.Marshal(p)
		if !strings.Contains(s.proc.Output(), string(js)) {
			t.Errorf("the log lacks the problem %s:\n%s", js, s.proc.Output())
		}
	}
	cli := func(args ...string) (int, string, string) {
		cmd := exec.Command(filepath.Join(harness.Binaries(t), "sidecar"), append([]string{"reload"}, args...)...)
		var stdout, stderr strings.Builder
		cmd.Stdout, cmd.Stderr = &stdout, &stderr
		_ = cmd.Run()
		return cmd.ProcessState.ExitCode(), stdout.String(), stderr.String()
	}
	code, _, stderr := cli("-admin", admin)
	if code != 2 {
		t.Errorf("sidecar reload of an invalid file: exit %d, want 2\n%s", code, stderr)
	}
	for _, p := range problems {
		if !strings.Contains(stderr, p+"\n") {
			t.Errorf("sidecar reload did not print %q:\n%s", p, stderr)
		}
	}
	if n := s.reloads(t, "invalid"); n != 2 {
		t.Errorf("invalid reloads = %d, want 2", n)
	}
	rlInstances(t, client, "http://"+up, 2)

	// A listener address in use: the reload fails, nothing changes.
	busy, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer busy.Close()
	s.write(t, rlClientConfig(agent.Addr(), admin, "debug", "{name: echo, listen: "+up+", balancer: random}",
		"{name: echo, listen: "+busy.Addr().String()+"}"))
	code, _, stderr = cli("-config", s.path)
	if code != 1 || !strings.Contains(stderr, busy.Addr().String()) {
		t.Errorf("sidecar reload with a listener address in use: exit %d, want 1 naming %s\n%s", code, busy.Addr(), stderr)
	}
	if r := rlRoutes(t, admin)[up]; r.Balancer != "round_robin" {
		t.Errorf("after a failed reload, balancer = %q, want round_robin still", r.Balancer)
	}

	s.write(t, rlClientConfig(agent.Addr(), admin, "info", "{name: echo, listen: "+up+", balancer: random}"))
	code, stdout, stderr := cli("-config", s.path)
	if code != 0 || !strings.Contains(stdout, "config reloaded") || !strings.Contains(stdout, "upstreams[0].balancer") {
		t.Errorf("sidecar reload of a valid file: exit %d, want 0 and the applied keys\n%s%s", code, stdout, stderr)
	}
	if r := rlRoutes(t, admin)[up]; r.Balancer != "random" {
		t.Errorf("after sidecar reload, balancer = %q, want random", r.Balancer)
	}
	if n := s.reloads(t, "failed"); n != 1 {
		t.Errorf("failed reloads = %d, want 1", n)
	}
	if v, ok := rlMetric(t, admin, "sidecar_config_last_reload_success_timestamp_seconds"); !ok || v < float64(time.Now().Add(-time.Minute).Unix()) {
		t.Errorf("last reload success timestamp = %v, %v; want about now", v, ok)
	}
}

// TestReloadLogLevel: a reload from info to debug turns debug lines on
// (a malformed request's "bad request"), and keys that need a restart are
// named, one log line each.
func TestReloadLogLevel(t *testing.T) {
	agent := consulagent.Start(t, consulagent.Options{})
	up, admin := pxLoopback(t), pxLoopback(t)
	s := rlStart(t, admin, rlClientConfig(agent.Addr(), admin, "info", "{name: echo, listen: "+up+"}"))
	badRequest := func() {
		conn, err := net.Dial("tcp", up)
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close()
		_, _ = conn.Write([]byte("NOT HTTP\r\n\r\n"))
		_, _ = io.ReadAll(conn)
	}
	badRequest()
	if strings.Contains(s.proc.Output(), `"bad request"`) {
		t.Fatal("a debug line logged at level info")
	}
	cfg := strings.Replace(rlClientConfig(agent.Addr(), admin, "debug", "{name: echo, listen: "+up+"}"),
		"log: {level: debug}", "log: {level: debug, format: console}", 1)
	s.hup(t, cfg, "ok")
	badRequest()
	s.proc.WaitOutput(`"bad request"`, 5*time.Second)
	if !strings.Contains(s.proc.Output(), `"msg":"config change needs a restart","key":"log.format"`) {
		t.Errorf("log.format not named as needing a restart:\n%s", s.proc.Output())
	}
}

// TestReloadServiceTags: new service tags, meta and weight reach Consul's
// catalog by re-registration, while the check stays passing throughout.
func TestReloadServiceTags(t *testing.T) {
	agent := consulagent.Start(t, consulagent.Options{})
	c := agent.Client()
	app := newHBApp(t, "echo-reload", agent.Addr())
	app.echo = harness.StartEcho(t, app.echoAddr, app.id)
	s := rlStart(t, app.adminAddr, app.config())
	hbWaitPassing(t, c, app, 15*time.Second)

	// Watch the check while the reload happens.
	stop := make(chan struct{})
	seen := make(chan []string, 1)
	go func() {
		var statuses []string
		defer func() { seen <- statuses }()
		for {
			select {
			case <-stop:
				return
			case <-time.After(20 * time.Millisecond):
			}
			checks, err := c.Agent().Checks()
			if err != nil {
				continue
			}
			if chk, ok := checks[app.checkID()]; ok && chk.Status != api.HealthPassing {
				statuses = append(statuses, chk.Status)
			} else if !ok {
				statuses = append(statuses, "missing")
			}
		}
	}()
	cfg := strings.NewReplacer("tags: [v1, blue]", "tags: [v2, green]", `build: "42"`, `build: "43"`,
		"weight: 3", "weight: 5").Replace(app.config())
	s.hup(t, cfg, "ok")
	consulagent.WaitFor(t, 10*time.Second, "the new tags and meta in the catalog", func() bool {
		svcs, _, err := c.Catalog().Service(app.name, "", nil)
		if err != nil || len(svcs) != 1 {
			return false
		}
		sv := svcs[0]
		return slices.Equal(sv.ServiceTags, []string{"v2", "green"}) && sv.ServiceMeta["build"] == "43" &&
			sv.ServiceWeights.Passing == 5
	})
	time.Sleep(hbTTL) // a lapse of the TTL would show within it
	close(stop)
	if bad := <-seen; len(bad) > 0 {
		t.Errorf("the check left passing during the reload: %q", bad)
	}
	if e := hbHealthEntry(t, c, app.name, app.id, true); e == nil {
		t.Error("the instance is not passing after the reload")
	}
}

// TestReloadConfigMasked: GET /config shows the running config, secrets
// masked when set, and needs the admin token when one is set.
func TestReloadConfigMasked(t *testing.T) {
	agent := consulagent.Start(t, consulagent.Options{})
	admin := pxLoopback(t)
	cfg := fmt.Sprintf(`consul: {address: %s, token: consul-secret}
admin: {listen: %s, token: admin-secret}
`, agent.Addr(), admin)
	s := rlStart(t, admin, cfg)
	get := func(token string) (int, string) {
		req, _ := http.NewRequest(http.MethodGet, "http://"+admin+"/config", nil)
		if token != "" {
			req.Header.Set("Authorization", "Bearer "+token)
		}
		resp, err := adminHTTP.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		body, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, string(body)
	}
	if code, _ := get(""); code != http.StatusUnauthorized {
		t.Errorf("GET /config without the token = %d, want 401", code)
	}
	code, body := get("admin-secret")
	if code != http.StatusOK {
		t.Fatalf("GET /config = %d: %s", code, body)
	}
	var doc struct {
		Consul struct{ Token, Address string }
		Admin  struct{ Token, Listen string }
		Log    struct{ Level string }
	}
	if err := json.Unmarshal([]byte(body), &doc); err != nil {
		t.Fatalf("GET /config: %v\n%s", err, body)
	}
	if doc.Consul.Token != "***" || doc.Admin.Token != "***" || strings.Contains(body, "secret") {
		t.Errorf("GET /config does not mask the tokens:\n%s", body)
	}
	if doc.Admin.Listen != admin || doc.Consul.Address != agent.Addr() || doc.Log.Level != "info" {
		t.Errorf("GET /config = %+v, want the running values", doc)
	}
	// After a reload it shows the new effective config.
	s.hup(t, cfg+"log: {level: warn}\n", "ok")
	if _, body := get("admin-secret"); !strings.Contains(body, `"level": "warn"`) {
		t.Errorf("GET /config after reload lacks level warn:\n%s", body)
	}
}

// TestReloadUnderLoad is the reload target: about 1,000 requests a second
// through an upstream listener for a few seconds while SIGHUPs apply real
// changes (balancer and tags toggled, another upstream added and removed):
// no request may fail. It logs how long each reload took to apply (the
// log's took), p50 and max; the figures are measured, not asserted.
func TestReloadUnderLoad(t *testing.T) {
	agent := consulagent.Start(t, consulagent.Options{})
	c := agent.Client()
	rlEcho(t, c, "echo", "echo-blue", "blue")
	rlEcho(t, c, "echo", "echo-green", "green")
	up, other, admin := pxLoopback(t), pxLoopback(t), pxLoopback(t)
	variant := func(i int) string {
		if i%2 == 0 {
			return rlClientConfig(agent.Addr(), admin, "info", "{name: echo, listen: "+up+"}")
		}
		return rlClientConfig(agent.Addr(), admin, "info",
			"{name: echo, listen: "+up+", balancer: least_request, tags: [blue]}",
			"{name: echo, listen: "+other+"}")
	}
	s := rlStart(t, admin, variant(0))
	rlInstances(t, &http.Client{Timeout: 5 * time.Second}, "http://"+up, 4)

	const (
		workers  = 20
		every    = 20 * time.Millisecond // 20 workers: 1,000 requests a second
		reloads  = 8
		interval = 400 * time.Millisecond
	)
	type tally struct {
		ok, failed int
		errs       []string
	}
	done := make(chan struct{})
	results := make(chan tally, workers)
	start := time.Now()
	for range workers {
		go func() {
			var r tally
			defer func() { results <- r }()
			client := &http.Client{Timeout: 5 * time.Second}
			tick := time.NewTicker(every)
			defer tick.Stop()
			for {
				select {
				case <-done:
					return
				case <-tick.C:
				}
				if _, err := rlGet(client, "http://"+up); err != nil {
					r.failed++
					if len(r.errs) < 5 {
						r.errs = append(r.errs, err.Error())
					}
				} else {
					r.ok++
				}
			}
		}()
	}
	time.Sleep(interval)
	for i := 1; i <= reloads; i++ {
		s.hup(t, variant(i), "ok")
		time.Sleep(interval)
	}
	close(done)
	var total tally
	for range workers {
		r := <-results
		total.ok += r.ok
		total.failed += r.failed
		total.errs = append(total.errs, r.errs...)
	}
	elapsed := time.Since(start)
	t.Logf("%d requests in %v (%.0f/s) across %d reloads, %d failed", total.ok+total.failed, elapsed.Round(time.Millisecond),
		float64(total.ok+total.failed)/elapsed.Seconds(), reloads, total.failed)
	if total.failed > 0 {
		t.Errorf("%d of %d requests failed during reloads, want 0; first errors: %q", total.failed, total.ok+total.failed, total.errs)
	}
	if total.ok == 0 {
		t.Fatal("no request succeeded")
	}

	// How long each reload took to apply, from the log.
	var took []time.Duration
	for _, line := range strings.Split(s.proc.Output(), "\n") {
		var entry struct {
			Msg  string  `json:"msg"`
			Took float64 `json:"took"`
		}
		if json.Unmarshal([]byte(line), &entry) == nil && entry.Msg == "config reloaded" {
			took = append(took, time.Duration(entry.Took*float64(time.Second)))
		}
	}
	if len(took) != reloads {
		t.Fatalf("%d \"config reloaded\" lines with took, want %d", len(took), reloads)
	}
	slices.Sort(took)
	t.Logf("reload applied in p50 %v, max %v (race-enabled build): %v", took[len(took)/2], took[len(took)-1], took)
}
