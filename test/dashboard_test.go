package test

// The live dashboard in a real browser: headless Chromium (Debian's
// chromium package, `make chromium`) driven by chromedp loads the admin
// listener's GET / of a real sidecar that runs its app and balances over
// itself and a second instance, registered in a real Consul agent. The
// page must load with no console error or exception, list both nodes of
// the route, and drop the second within dashLeaveBound of its app being
// killed (SIGKILL, restart: never).

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/chromedp/chromedp"

	"github.com/sidecarlb/sidecar/admin"
	"github.com/sidecarlb/sidecar/admin/dashboard"
	"github.com/sidecarlb/sidecar/discovery"
	"github.com/sidecarlb/sidecar/heartbeat"
	"github.com/sidecarlb/sidecar/proxy"
	"github.com/sidecarlb/sidecar/pubsub/httpbroker"
	"github.com/sidecarlb/sidecar/supervisor"
	"github.com/sidecarlb/sidecar/test/consulagent"
	"github.com/sidecarlb/sidecar/test/harness"
)

// dashLeaveBound bounds the time from killing an app to its node leaving
// the page: the instance's check goes critical at its next probe (every
// 100ms here), Consul's blocking query answers the watching sidecar, its
// route follows the snapshot within 100ms and the stream sends within
// 250ms. Generous for a loaded machine; the measured time is logged.
const dashLeaveBound = 10 * time.Second

// dashInstance is a sidecar that runs echo as its app, registered as web.
type dashInstance struct {
	id, appAddr, adminAddr string
	appPort                int
	sidecar                *harness.Proc
}

func newDashInstance(t *testing.T, id string) *dashInstance {
	port := consulagent.FreePort(t)
	return &dashInstance{id: id, appPort: port, appAddr: "127.0.0.1:" + strconv.Itoa(port),
		adminAddr: "127.0.0.1:" + strconv.Itoa(consulagent.FreePort(t))}
}

// config runs echo with restart: never (a killed app stays dead) and, when
// upstream is not empty, an upstream listener for web there.
func (d *dashInstance) config(t *testing.T, consulAddr, upstream string) string {
	echo := filepath.Join(harness.Binaries(t), "echo")
	cfg := fmt.Sprintf(`service:
  name: web
  id: %[1]s
  port: %[2]d
  check: {http: "http://%[3]s/health", interval: 100ms, timeout: 1s}
  ttl: 2s
  drain: 100ms
  run:
    command: %[4]s
    args: [-listen, "%[3]s", -name, %[1]s]
    restart: never
    stop_timeout: 2s
consul:
  address: %[5]s
admin:
  listen: %[6]s
  token: s3cret
`, d.id, d.appPort, d.appAddr, echo, consulAddr, d.adminAddr)
	if upstream != "" {
		cfg += fmt.Sprintf("upstreams:\n  - name: web\n    listen: %s\n", upstream)
	}
	return cfg
}

// status reads the instance's /status.
func (d *dashInstance) status(t *testing.T) map[string]json.RawMessage {
	t.Helper()
	c := &http.Client{Timeout: 5 * time.Second}
	resp, err := c.Get("http://" + d.adminAddr + "/status")
	if err != nil {
		t.Fatalf("GET /status of %s: %v", d.id, err)
	}
	defer resp.Body.Close()
	var doc map[string]json.RawMessage
	if err := json.NewDecoder(resp.Body).Decode(&doc); err != nil {
		t.Fatalf("GET /status of %s: %v", d.id, err)
	}
	return doc
}

// routeNodes lists the nodes of the instance's upstream route in /status.
func (d *dashInstance) routeNodes(t *testing.T) []string {
	var routes []struct {
		Endpoints []struct {
			Addr string `json:"addr"`
		} `json:"endpoints"`
	}
	_ = json.Unmarshal(d.status(t)["upstreams"], &routes)
	var out []string
	for _, r := range routes {
		for _, e := range r.Endpoints {
			out = append(out, e.Addr)
		}
	}
	return out
}

// chromiumPath finds Debian's chromium (make chromium installs it).
func chromiumPath(t *testing.T) string {
	t.Helper()
	for _, name := range []string{"chromium", "chromium-browser"} {
		if p, err := exec.LookPath(name); err == nil {
			return p
		}
	}
	if testing.Short() {
		t.Skip("no chromium; -short")
	}
	t.Fatal("no chromium on PATH: run make chromium (apt-get install chromium)")
	return ""
}

// browser is headless Chromium with a fresh profile, collecting the
// console errors and uncaught exceptions of its page.
type browser struct {
	ctx  context.Context
	mu   sync.Mutex
	errs []string
}

func startBrowser(t *testing.T) *browser {
	t.Helper()
	opts := []chromedp.ExecAllocatorOption{
		chromedp.ExecPath(chromiumPath(t)),
		chromedp.UserDataDir(t.TempDir()),
		chromedp.Flag("headless", true),
		chromedp.Flag("no-sandbox", true),
		chromedp.Flag("disable-gpu", true),
		chromedp.Flag("disable-quic", true),
		chromedp.Flag("no-first-run", true),
		chromedp.Flag("disable-background-networking", true),
		chromedp.Flag("disable-component-update", true),
		chromedp.Flag("disable-sync", true),
		chromedp.Flag("disable-dev-shm-usage", true),
		chromedp.WindowSize(1280, 900),
	}
	actx, cancelAlloc := chromedp.NewExecAllocator(context.Background(), opts...)
	ctx, cancel := chromedp.NewContext(actx)
	b := &browser{ctx: ctx}
	// The first Run starts the browser; it must have no timeout of its own.
	if err := chromedp.Do(ctx); err != nil {
		cancel()
		cancelAlloc()
		t.Fatalf("start chromium: %v", err)
	}
	messages := chromedp.Console(ctx)
	done := make(chan struct{})
	go func() {
		defer close(done)
		for m, err := range messages {
			if err != nil {
				return
			}
			if m.Type == chromedp.ConsoleError || m.IsException() {
				b.mu.Lock()
				b.errs = append(b.errs, fmt.Sprintf("%s (%s:%d)", m, m.URL, m.Line))
				b.mu.Unlock()
			}
		}
	}()
	t.Cleanup(func() { cancel(); cancelAlloc(); <-done })
	return b
}

func (b *browser) errors() []string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return append([]string(nil), b.errs...)
}

// do runs steps within a time limit.
func (b *browser) do(t *testing.T, within time.Duration, what string, steps ...chromedp.Action[chromedp.Void]) {
	t.Helper()
	ctx, cancel := context.WithTimeout(b.ctx, within)
	defer cancel()
	if err := chromedp.Do(ctx, steps...); err != nil {
		t.Fatalf("%s: %v", what, err)
	}
}

// text returns the text of the element sel selects.
func (b *browser) text(t *testing.T, sel string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(b.ctx, 10*time.Second)
	defer cancel()
	s, err := chromedp.Run(ctx, chromedp.Text(chromedp.CSS(sel)))
	if err != nil {
		t.Fatalf("text of %s: %v", sel, err)
	}
	return s
}

// waitText returns the visible text of sel once it holds every one of want,
// or, after 10 s, as it last was. The page redraws its sections as the
// stream brings news, so one read can fall between two drawings.
func (b *browser) waitText(t *testing.T, sel string, want ...string) string {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		s := b.text(t, sel)
		missing := false
		for _, w := range want {
			missing = missing || !strings.Contains(s, w)
		}
		if !missing || time.Now().After(deadline) {
			return s
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// screenshot saves the PNG shot takes in dir and, when
// $SIDECAR_TEST_ARTIFACTS names a folder, a copy there.
func (b *browser) screenshot(t *testing.T, dir, name string, shot chromedp.Action[[]byte]) {
	t.Helper()
	ctx, cancel := context.WithTimeout(b.ctx, 20*time.Second)
	defer cancel()
	png, err := chromedp.Run(ctx, shot)
	if err != nil {
		t.Fatalf("screenshot %s: %v", name, err)
	}
	for _, d := range []string{dir, os.Getenv("SIDECAR_TEST_ARTIFACTS")} {
		if d == "" {
			continue
		}
		path := filepath.Join(d, name)
		if err := os.WriteFile(path, png, 0o644); err != nil {
			t.Fatal(err)
		}
		t.Logf("screenshot: %s", path)
	}
}

func TestDashboardInBrowser(t *testing.T) {
	chromiumPath(t)
	agent := consulagent.Start(t, consulagent.Options{})
	a, b := newDashInstance(t, "web-a"), newDashInstance(t, "web-b")
	upstream := "127.0.0.1:" + strconv.Itoa(consulagent.FreePort(t))
	b.sidecar = harness.StartSidecar(t, b.adminAddr, b.config(t, agent.Addr(), ""))
	a.sidecar = harness.StartSidecar(t, a.adminAddr, a.config(t, agent.Addr(), upstream))
	consulagent.WaitFor(t, 30*time.Second, "both instances in the route of web-a's sidecar", func() bool {
		return len(a.routeNodes(t)) == 2
	})
	// Some traffic, so that rates and latencies show.
	c := &http.Client{Timeout: 5 * time.Second}
	for i := range 40 {
		resp, err := c.Get("http://" + upstream + "/")
		if err != nil {
			t.Fatalf("GET #%d through the upstream: %v", i, err)
		}
		resp.Body.Close()
	}

	br := startBrowser(t)
	shots := t.TempDir()
	rowA, rowB := `tr[data-node="`+a.appAddr+`"]`, `tr[data-node="`+b.appAddr+`"]`
	br.do(t, 30*time.Second, "load the dashboard and see both nodes",
		chromedp.Navigate("http://"+a.adminAddr+"/"),
		chromedp.WaitVisible(chromedp.CSS(rowA)),
		chromedp.WaitVisible(chromedp.CSS(rowB)),
		chromedp.WaitVisible(chromedp.CSS(`#conn.badge-ok`)),
	)
	conn := br.waitText(t, "#conn", "live")
	service := br.waitText(t, "#service", "web-a", "registered", "passing")
	app := br.waitText(t, "#app", "running")
	if !strings.Contains(conn, "live") || strings.Contains(conn, "polling") {
		t.Errorf("connection badge = %q, want live from the stream, not polling", conn)
	}
	for _, want := range []string{"web-a", "registered", "passing"} {
		if !strings.Contains(service, want) {
			t.Errorf("registration section = %q, want it to show %q", service, want)
		}
	}
	if !strings.Contains(app, "running") {
		t.Errorf("app section = %q, want it to show running", app)
	}
	br.screenshot(t, shots, "dashboard-1280.png", chromedp.FullScreenshot(100))

	// Kill web-b's app; its sidecar does not restart it.
	var appStatus struct {
		PID int `json:"pid"`
	}
	if err := json.Unmarshal(b.status(t)["app"], &appStatus); err != nil || appStatus.PID <= 0 {
		t.Fatalf("web-b's app pid: %v (%d)", err, appStatus.PID)
	}
	killed := time.Now()
	if err := syscall.Kill(appStatus.PID, syscall.SIGKILL); err != nil {
		t.Fatalf("kill web-b's app: %v", err)
	}
	br.do(t, dashLeaveBound, "web-b's node leaves the page",
		chromedp.WaitNotPresent(chromedp.CSS(rowB)))
	took := time.Since(killed)
	t.Logf("web-b's node left the page %v after its app was killed (bound %v)", took.Round(time.Millisecond), dashLeaveBound)
	br.do(t, 10*time.Second, "web-a's node stays", chromedp.WaitVisible(chromedp.CSS(rowA)))
	events := br.waitText(t, "#events", "node "+b.appAddr+" left web")
	if !strings.Contains(events, "node "+b.appAddr+" left web") {
		t.Errorf("changes = %q, want one saying %s left web", events, b.appAddr)
	}
	br.screenshot(t, shots, "dashboard-after-kill.png", chromedp.FullScreenshot(100))

	// At a phone's width nothing but the tables' own boxes scrolls sideways.
	br.do(t, 20*time.Second, "phone width", chromedp.EmulateViewport(390, 844))
	ctx, cancel := context.WithTimeout(br.ctx, 10*time.Second)
	defer cancel()
	overflow, err := chromedp.Run(ctx, chromedp.Evaluate[bool](`document.documentElement.scrollWidth > document.documentElement.clientWidth + 1 ||
		[...document.querySelectorAll("header, .card")].some((e) => e.getBoundingClientRect().right > document.documentElement.clientWidth + 1)`))
	if err != nil {
		t.Fatal(err)
	}
	if overflow {
		t.Errorf("at 390px the page scrolls sideways")
	}
	br.screenshot(t, shots, "dashboard-390.png", chromedp.CaptureScreenshot()) // the viewport: a full-page shot lays the page out again without the scrollbar

	if errs := br.errors(); len(errs) > 0 {
		t.Errorf("console errors and exceptions:\n%s", strings.Join(errs, "\n"))
	}
}

// TestDashboardStreamEndsAtShutdown: a dashboard's open stream does not
// hold the sidecar's shutdown: SIGTERM ends the stream, and no listener
// is reported late.
func TestDashboardStreamEndsAtShutdown(t *testing.T) {
	agent := consulagent.Start(t, consulagent.Options{})
	admin := "127.0.0.1:" + strconv.Itoa(consulagent.FreePort(t))
	sc := harness.StartSidecar(t, admin, fmt.Sprintf("consul: {address: %s}\nadmin: {listen: %s}\n", agent.Addr(), admin))
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	req, _ := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+admin+"/status/stream", nil)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	first := make([]byte, 64)
	if _, err := resp.Body.Read(first); err != nil {
		t.Fatalf("reading the stream: %v", err)
	}
	sc.Signal(syscall.SIGTERM)
	if code := sc.Wait(20 * time.Second); code != 0 {
		t.Fatalf("sidecar exited %d after SIGTERM, want 0", code)
	}
	if out := sc.Output(); strings.Contains(out, "did not close in time") {
		t.Errorf("a listener closed late with a dashboard stream open:\n%s", out)
	}
}

// TestDashboardRendersEveryState: the page renders, with no console error,
// a status document holding every state it knows (ejected and breaker-open
// nodes, a stale watch, a failing one, pub/sub lag, a crashed app, a
// critical check), served by the real admin handler in process.
func TestDashboardRendersEveryState(t *testing.T) {
	chromiumPath(t)
	// The document is the same at every call (its times are taken once), so
	// the stream sends it once and the page does not redraw the rows while
	// the test reads them.
	now := time.Now()
	until := now.Add(30 * time.Second).UTC()
	h := admin.New(admin.Options{Version: "v1.2.3", Sections: map[string]func() any{
		"service": func() any {
			return heartbeat.Status{ServiceID: "web-1", Registered: true, CheckStatus: "critical", Output: "GET /health: connection refused"}
		},
		"app": func() any {
			return supervisor.Status{State: "backoff", Command: "./web", Restarts: 3, Policy: "always", LastExit: "signal: killed",
				LastExitAt: now.Add(-2 * time.Second), Reason: "restarting in 400ms", NextStart: now.Add(400 * time.Millisecond)}
		},
		"upstreams": func() any {
			return []proxy.RouteStatus{{Listener: "127.0.0.1:15002", Service: "db", Balancer: "least_request", Stale: true, Panic: true,
				Endpoints: []proxy.EndpointStatus{
					{ID: "db-1", Addr: "10.0.0.1:5432", Weight: 2, Breaker: "open", State: "breaker_open", ConsecutiveFailures: 5},
					{ID: "db-2", Addr: "10.0.0.2:5432", Weight: 1, Breaker: "closed", State: "ejected", EjectedUntil: &until,
						NodeStats: proxy.NodeStats{WindowSeconds: 10, RequestsPerSecond: 3.5, ErrorRate: 0.5,
							LatencyMS: &proxy.Percentiles{P50: 1.5, P90: 12, P99: 250}}},
					{ID: "db-3", Addr: "10.0.0.3:5432", Weight: 1, Breaker: "half-open", State: "breaker_half_open"},
				}}, {Listener: "127.0.0.1:15003", Service: "cache", Balancer: "round_robin", Error: "no healthy endpoints"}}
		},
		"discovery": func() any {
			return []discovery.WatchStatus{
				{Service: "db", Endpoints: 3, Stale: true, AgeSeconds: 42, Confirmed: now.Add(-45 * time.Second), Error: "connection refused"},
				{Service: "cache", Pending: true},
			}
		},
		"pubsub": func() any {
			return httpbroker.Status{Outbox: 7, OldestSeconds: 3, Groups: []httpbroker.GroupStatus{{Topic: "orders", Group: "billing", Pending: 7, InFlight: 2, OldestSeconds: 3}}}
		},
	}})
	srv := httptest.NewServer(h)
	t.Cleanup(srv.Close)
	t.Cleanup(h.Close) // before srv.Close: the page's stream ends

	br := startBrowser(t)
	br.do(t, 30*time.Second, "load the dashboard",
		chromedp.Navigate(srv.URL+"/"),
		chromedp.WaitVisible(chromedp.CSS(`tr[data-node="10.0.0.2:5432"]`)),
		chromedp.WaitVisible(chromedp.CSS(`#pubsub-card`)))
	for sel, want := range map[string][]string{
		`tr[data-node="10.0.0.1:5432"]`: {"breaker open", "5 failed"},
		`tr[data-node="10.0.0.2:5432"]`: {"ejected", "until", "3.5", "50.0%", "250.0"},
		`tr[data-node="10.0.0.3:5432"]`: {"half-open"},
		`#routes`:                       {"stale set", "panic", "no healthy nodes", "no healthy endpoints"},
		`tr[data-watch="db"]`:           {"stale for 42 s", "connection refused"},
		`tr[data-watch="cache"]`:        {"waiting for the first answer"},
		`#service`:                      {"critical", "connection refused"},
		`#app`:                          {"backoff", "restarting in 400ms", "signal: killed"},
		`#pubsub`:                       {"7 messages", "orders", "billing"},
	} {
		got := br.waitText(t, sel, want...)
		for _, w := range want {
			if !strings.Contains(got, w) {
				t.Errorf("%s = %q, want it to show %q", sel, got, w)
			}
		}
	}
	br.screenshot(t, t.TempDir(), "dashboard-states.png", chromedp.FullScreenshot(100))
	if errs := br.errors(); len(errs) > 0 {
		t.Errorf("console errors and exceptions:\n%s", strings.Join(errs, "\n"))
	}
}

// TestDashboardPollsWithoutStream: where /status/stream is not served
// (a proxy in between that refuses it, an older sidecar), the page falls
// back to polling /status and still follows a node leaving.
func TestDashboardPollsWithoutStream(t *testing.T) {
	chromiumPath(t)
	var mu sync.Mutex
	nodes := []string{"10.0.0.1:80", "10.0.0.2:80"}
	mux := http.NewServeMux()
	dashboard.Register(mux)
	mux.HandleFunc("GET /status", func(w http.ResponseWriter, _ *http.Request) {
		mu.Lock()
		var eps []proxy.EndpointStatus
		for _, n := range nodes {
			eps = append(eps, proxy.EndpointStatus{ID: n, Addr: n, Weight: 1, Breaker: "closed", State: "serving"})
		}
		mu.Unlock()
		w.Header().Set("Content-Type", "application/json")
		_ = json.NewEncoder(w).Encode(map[string]any{"version": "old", "uptime_seconds": 1,
			"upstreams": []proxy.RouteStatus{{Listener: "127.0.0.1:15002", Service: "web", Balancer: "round_robin", Endpoints: eps}}})
	})
	srv := httptest.NewServer(mux)
	t.Cleanup(srv.Close)

	br := startBrowser(t)
	br.do(t, 30*time.Second, "load the dashboard",
		chromedp.Navigate(srv.URL+"/"),
		chromedp.WaitVisible(chromedp.CSS(`tr[data-node="10.0.0.2:80"]`)))
	if conn := br.text(t, "#conn"); !strings.Contains(conn, "polling") {
		t.Errorf("connection badge = %q, want polling", conn)
	}
	mu.Lock()
	nodes = nodes[:1]
	mu.Unlock()
	br.do(t, 10*time.Second, "the node leaves the page", chromedp.WaitNotPresent(chromedp.CSS(`tr[data-node="10.0.0.2:80"]`)))
	// The refused stream is the only error the browser may report.
	for _, e := range br.errors() {
		if !strings.Contains(e, "EventSource") && !strings.Contains(e, "status/stream") {
			t.Errorf("console error: %s", e)
		}
	}
}
