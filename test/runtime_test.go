package test

// Integration tests of service.run: the real sidecar binary starting the
// echo example as its app, the control commands of the same binary, and a
// real Consul dev agent where registration matters.

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/sidecarlb/sidecar/test/consulagent"
	"github.com/sidecarlb/sidecar/test/harness"
)

// rtApp is a sidecar running echo as its app.
type rtApp struct {
	name, id   string
	appAddr    string
	appPort    int
	adminAddr  string
	consulAddr string
	build      string
	path       string // config file
	sidecar    *harness.Proc
}

func newRTApp(t *testing.T, name, id, consulAddr string) *rtApp {
	t.Helper()
	port := consulagent.FreePort(t)
	return &rtApp{
		name: name, id: id,
		appAddr:    "127.0.0.1:" + strconv.Itoa(port),
		appPort:    port,
		adminAddr:  "127.0.0.1:" + strconv.Itoa(consulagent.FreePort(t)),
		consulAddr: consulAddr,
		build:      "true",
	}
}

func (a *rtApp) config(t *testing.T) string {
	echo := filepath.Join(harness.Binaries(t), "echo")
	return fmt.Sprintf(`service:
  name: %[1]s
  id: %[2]s
  port: %[3]d
  check: {http: "http://%[4]s/health", interval: 100ms, timeout: 1s}
  ttl: 2s
  drain: 1s
  run:
    command: %[5]s
    args: [-listen, "%[4]s", -name, %[2]s]
    build: %[6]q
    stop_timeout: 5s
consul:
  address: %[7]s
admin:
  listen: %[8]s
  token: s3cret
log:
  level: debug
`, a.name, a.id, a.appPort, a.appAddr, echo, a.build, a.consulAddr, a.adminAddr)
}

// start writes the config, starts the sidecar and waits for the app.
func (a *rtApp) start(t *testing.T) {
	t.Helper()
	a.path = filepath.Join(t.TempDir(), "config.yaml")
	if err := os.WriteFile(a.path, []byte(a.config(t)), 0o600); err != nil {
		t.Fatal(err)
	}
	a.sidecar = harness.Start(t, "sidecar", "-config", a.path)
	a.sidecar.WaitHTTP("http://"+a.adminAddr+"/healthz", 15*time.Second)
	a.sidecar.WaitHTTP("http://"+a.appAddr+"/health", 15*time.Second)
}

// rtAppStatus is the "app" section of /status.
type rtAppStatus struct {
	State    string `json:"state"`
	PID      int    `json:"pid"`
	Restarts int    `json:"restarts"`
}

func (a *rtApp) status(t *testing.T) rtAppStatus {
	t.Helper()
	raw, ok := rtStatus(t, a.adminAddr)["app"]
	if !ok {
		t.Fatal(`/status has no "app" section`)
	}
	var s rtAppStatus
	if err := json.Unmarshal(raw, &s); err != nil {
		t.Fatalf("decode /status app: %v", err)
	}
	return s
}

// control runs `sidecar CMD -config FILE` and returns its exit code and
// output.
func (a *rtApp) control(t *testing.T, cmd string) (int, string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	c := exec.CommandContext(ctx, filepath.Join(harness.Binaries(t), "sidecar"), cmd, "-config", a.path)
	out, err := c.CombinedOutput()
	if err != nil && c.ProcessState == nil {
		t.Fatalf("sidecar %s: %v", cmd, err)
	}
	return c.ProcessState.ExitCode(), string(out)
}

// rtStatus fetches a sidecar's /status as sections by key.
func rtStatus(t *testing.T, adminAddr string) map[string]json.RawMessage {
	t.Helper()
	client := &http.Client{Timeout: 2 * time.Second}
	resp, err := client.Get("http://" + adminAddr + "/status")
	if err != nil {
		t.Fatalf("GET /status: %v", err)
	}
	defer resp.Body.Close()
	var doc map[string]json.RawMessage
	if err := json.NewDecoder(resp.Body).Decode(&doc); err != nil {
		t.Fatalf("decode /status: %v", err)
	}
	return doc
}

// rtGone reports whether pid no longer runs (gone, or a zombie).
func rtGone(pid int) bool {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return true
	}
	i := strings.LastIndexByte(string(b), ')')
	return i >= 0 && strings.HasPrefix(strings.TrimSpace(string(b[i+1:])), "Z")
}

// TestRuntimeKill9LeavesNoOrphan: kill -9 of the sidecar takes the app down
// with it. Consul is not needed: the registrar just retries.
func TestRuntimeKill9LeavesNoOrphan(t *testing.T) {
	t.Parallel()
	a := newRTApp(t, "orphan", "orphan-1", "127.0.0.1:"+strconv.Itoa(consulagent.FreePort(t)))
	a.start(t)
	pid := a.status(t).PID
	if pid == 0 || rtGone(pid) {
		t.Fatalf("app pid %d from /status is not running", pid)
	}
	a.sidecar.Signal(syscall.SIGKILL)
	a.sidecar.Wait(5 * time.Second)
	took := consulagent.WaitFor(t, 5*time.Second, "the app to die with the sidecar", func() bool { return rtGone(pid) })
	t.Logf("app pid %d gone %v after the sidecar's kill -9", pid, took)
	if _, err := http.Get("http://" + a.appAddr + "/health"); err == nil {
		t.Errorf("the app still answers on %s", a.appAddr)
	}
}

// TestRuntimeUpdateFailingBuild: a build that fails leaves the running app
// alone, and `sidecar update` exits non-zero printing the build output.
func TestRuntimeUpdateFailingBuild(t *testing.T) {
	t.Parallel()
	a := newRTApp(t, "upd", "upd-1", "127.0.0.1:"+strconv.Itoa(consulagent.FreePort(t)))
	a.build = "echo compiling main.go; echo 'main.go:3: syntax error' >&2; exit 1"
	a.start(t)
	before := a.status(t)
	code, out := a.control(t, "update")
	if code == 0 {
		t.Errorf("sidecar update exit code = 0, want non-zero; output:\n%s", out)
	}
	for _, want := range []string{"compiling main.go", "main.go:3: syntax error", "build failed"} {
		if !strings.Contains(out, want) {
			t.Errorf("sidecar update output lacks %q:\n%s", want, out)
		}
	}
	after := a.status(t)
	if after.PID != before.PID || after.Restarts != 0 || after.State != "running" || rtGone(before.PID) {
		t.Errorf("after a failed build: %+v, want pid %d still running, no restart", after, before.PID)
	}
	// status works and names the app.
	code, out = a.control(t, "status")
	if code != 0 || !strings.Contains(out, "app        running, pid "+strconv.Itoa(before.PID)) {
		t.Errorf("sidecar status = %d:\n%s\nwant the running app's pid", code, out)
	}
}

// TestRuntimeRollingRestartLosesNoRequest: two instances of a service run
// by their sidecars; a client sidecar carries a steady load to them while
// each is restarted (then updated) in turn. No request fails.
func TestRuntimeRollingRestartLosesNoRequest(t *testing.T) {
	t.Parallel()
	agent := consulagent.Start(t, consulagent.Options{})
	a := newRTApp(t, "roll", "roll-a", agent.Addr())
	b := newRTApp(t, "roll", "roll-b", agent.Addr())
	a.start(t)
	b.start(t)

	clientAdmin := "127.0.0.1:" + strconv.Itoa(consulagent.FreePort(t))
	upstream := "127.0.0.1:" + strconv.Itoa(consulagent.FreePort(t))
	harness.StartSidecar(t, clientAdmin, fmt.Sprintf(`consul: {address: %s}
admin: {listen: %s}
upstreams:
  - name: roll
    listen: %s
    resilience: {retries: {attempts: 0}}
`, agent.Addr(), clientAdmin, upstream))
	endpoints := func() int {
		var routes []struct {
			Endpoints []json.RawMessage `json:"endpoints"`
		}
		if err := json.Unmarshal(rtStatus(t, clientAdmin)["upstreams"], &routes); err != nil || len(routes) != 1 {
			return -1
		}
		return len(routes[0].Endpoints)
	}
	client := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{MaxIdleConnsPerHost: 16}}
	get := func() (string, error) {
		resp, err := client.Get("http://" + upstream + "/load")
		if err != nil {
			return "", err
		}
		defer resp.Body.Close()
		body, _ := io.ReadAll(resp.Body)
		if resp.StatusCode != http.StatusOK {
			return "", fmt.Errorf("status %d: %s", resp.StatusCode, body)
		}
		return resp.Header.Get("X-Instance"), nil
	}
	consulagent.WaitFor(t, 15*time.Second, "the client to see both instances", func() bool {
		_, _ = get()
		return endpoints() == 2
	})

	var ok, failed atomic.Int64
	var mu sync.Mutex
	var failures []string
	seen := map[string]int{}
	stop := make(chan struct{})
	var wg sync.WaitGroup
	for range 4 {
		wg.Go(func() {
			for {
				select {
				case <-stop:
					return
				default:
				}
				inst, err := get()
				mu.Lock()
				if err != nil {
					failed.Add(1)
					failures = append(failures, time.Now().Format("15:04:05.000")+" "+err.Error())
				} else {
					ok.Add(1)
					seen[inst]++
				}
				mu.Unlock()
				time.Sleep(2 * time.Millisecond)
			}
		})
	}

	for _, step := range []struct {
		app *rtApp
		cmd string
	}{{a, "restart"}, {b, "restart"}, {a, "update"}} {
		before := step.app.status(t)
		start := time.Now()
		code, out := step.app.control(t, step.cmd)
		if code != 0 {
			t.Fatalf("sidecar %s of %s = %d:\n%s", step.cmd, step.app.id, code, out)
		}
		after := step.app.status(t)
		t.Logf("%s %s: %v; pid %d → %d; %s", step.cmd, step.app.id, time.Since(start).Round(time.Millisecond),
			before.PID, after.PID, strings.TrimSpace(out))
		if after.PID == before.PID || after.State != "running" || !rtGone(before.PID) {
			t.Errorf("after %s of %s: %+v, want a new running pid (was %d)", step.cmd, step.app.id, after, before.PID)
		}
		consulagent.WaitFor(t, 10*time.Second, "the client to see both instances again", func() bool { return endpoints() == 2 })
	}
	close(stop)
	wg.Wait()
	t.Logf("requests: %d ok, %d failed; by instance: %v", ok.Load(), failed.Load(), seen)
	if failed.Load() > 0 {
		t.Errorf("%d requests failed during the rolling restarts:\n%s", failed.Load(), strings.Join(failures[:min(len(failures), 10)], "\n"))
	}
	if ok.Load() < 100 || seen["roll-a"] == 0 || seen["roll-b"] == 0 {
		t.Errorf("requests ok = %d by instance %v, want a steady load on both", ok.Load(), seen)
	}
}
