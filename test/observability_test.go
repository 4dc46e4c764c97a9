package test

// Integration test of the access log, the metrics and trace context: a
// real Consul dev agent, an echo instance registered by its sidecar, and a
// client sidecar whose upstreams reach it over HTTP and TCP, and reach a
// registered service whose node is down.

import (
	"bufio"
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"

	"github.com/sidecarlb/sidecar/test/consulagent"
	"github.com/sidecarlb/sidecar/test/harness"
)

// accessLines reads the access log file's JSON lines.
func accessLines(t *testing.T, path string) []map[string]any {
	t.Helper()
	data, err := os.ReadFile(path)
	if err != nil && !os.IsNotExist(err) {
		t.Fatal(err)
	}
	var out []map[string]any
	sc := bufio.NewScanner(bytes.NewReader(data))
	for sc.Scan() {
		var m map[string]any
		if err := json.Unmarshal(sc.Bytes(), &m); err != nil {
			t.Fatalf("access log line %q: %v", sc.Text(), err)
		}
		out = append(out, m)
	}
	return out
}

// findLine returns the first access line for which match holds.
func findLine(lines []map[string]any, match func(map[string]any) bool) map[string]any {
	for _, l := range lines {
		if match(l) {
			return l
		}
	}
	return nil
}

// TestObservability: a request through the sidecar is in the access log
// with its trace id, node and status; the 502 the sidecar makes for a dead
// node is in the access log, and in the process log at warn, and its body
// names the service first; /metrics passes `promtool check metrics`, and
// says the same story: the upstream's name as listener, TCP connections
// counted apart, the build info.
func TestObservability(t *testing.T) {
	t.Parallel()
	promtool, err := exec.LookPath("promtool")
	if err != nil {
		if testing.Short() {
			t.Skip("no promtool")
		}
		t.Fatal("no promtool on PATH (Debian's prometheus package has it; make promtool installs it)")
	}
	agent := consulagent.Start(t, consulagent.Options{})
	backend := pxStartBackend(t, agent.Addr(), 0)

	deadPort := consulagent.FreePort(t) // nothing listens there
	if err := agent.Client().Agent().ServiceRegister(&api.AgentServiceRegistration{
		ID: "ghost-1", Name: "ghost", Address: "127.0.0.1", Port: deadPort,
	}); err != nil {
		t.Fatal(err)
	}

	accessLog := filepath.Join(t.TempDir(), "access.log")
	admin, httpUp, tcpUp, ghostUp := pxLoopback(t), pxLoopback(t), pxLoopback(t), pxLoopback(t)
	client := harness.StartSidecar(t, admin, fmt.Sprintf(`consul:
  address: %s
admin:
  listen: %s
log:
  access: %s
upstreams:
  - name: echo
    listen: %s
  - name: echo
    listen: %s
    protocol: tcp
  - name: ghost
    listen: %s
`, agent.Addr(), admin, accessLog, httpUp, tcpUp, ghostUp))
	client.WaitHTTP("http://"+admin+"/healthz", 20*time.Second)
	httpc := &http.Client{Timeout: 5 * time.Second}

	const traceID = "4bf92f3577b34da6a3ce929d0e0e4736"
	consulagent.WaitFor(t, 20*time.Second, "the echo upstream to answer", func() bool {
		req, _ := http.NewRequest(http.MethodGet, "http://"+httpUp+"/traced", nil)
		req.Header.Set("Traceparent", "00-"+traceID+"-00f067aa0ba902b7-01")
		resp, err := httpc.Do(req)
		if err != nil {
			return false
		}
		resp.Body.Close()
		return resp.StatusCode == http.StatusOK
	})
	if resp, err := httpc.Get("http://" + httpUp + "/untraced"); err != nil {
		t.Fatal(err)
	} else {
		resp.Body.Close()
	}
	// HTTP/1.1 over the TCP upstream: a connection, not a request.
	tcpc := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{DisableKeepAlives: true}}
	if resp, err := tcpc.Get("http://" + tcpUp + "/over-tcp"); err != nil {
		t.Fatal(err)
	} else {
		resp.Body.Close()
	}

	resp, err := httpc.Get("http://" + ghostUp + "/x")
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusBadGateway || !strings.HasPrefix(string(body), `sidecar: service "ghost": `) {
		t.Errorf("GET through the ghost upstream = %d %q, want 502 starting `sidecar: service \"ghost\": `", resp.StatusCode, body)
	}
	// Logged at warn with the access log on or off.
	client.WaitOutput(`"msg":"request refused"`, 10*time.Second)
	if out := client.Output(); !strings.Contains(out, `"error_code":"connect_failed"`) {
		t.Errorf("process log has no connect_failed warning:\n%s", out)
	}

	var lines []map[string]any
	consulagent.WaitFor(t, 10*time.Second, "the access lines", func() bool {
		lines = accessLines(t, accessLog)
		return findLine(lines, func(l map[string]any) bool { return l["error_code"] == "connect_failed" }) != nil &&
			findLine(lines, func(l map[string]any) bool { return l["client"] != nil }) != nil
	})
	traced := findLine(lines, func(l map[string]any) bool { return l["path"] == "/traced" && l["status"] == float64(200) })
	if traced == nil || traced["trace_id"] != traceID || traced["node"] != backend.addr || traced["service"] != "echo" ||
		!strings.HasPrefix(fmt.Sprint(traced["listener"]), "echo@") || traced["method"] != "GET" || traced["attempts"] != float64(1) {
		t.Errorf("access line of /traced = %v, want trace_id %s, node %s, service and listener echo, GET, 1 attempt", traced, traceID, backend.addr)
	}
	untraced := findLine(lines, func(l map[string]any) bool { return l["path"] == "/untraced" })
	if id, _ := untraced["trace_id"].(string); len(id) != 32 || id == traceID {
		t.Errorf("access line of /untraced = %v, want a trace id the sidecar started (tracing.start defaults to true)", untraced)
	}
	ghost := findLine(lines, func(l map[string]any) bool { return l["error_code"] == "connect_failed" })
	if ghost["status"] != float64(502) || ghost["listener"] != "ghost" || ghost["path"] != "/x" {
		t.Errorf("access line of the 502 = %v, want status 502, listener ghost, path /x", ghost)
	}
	conn := findLine(lines, func(l map[string]any) bool { return l["client"] != nil })
	if conn["node"] != backend.addr || conn["service"] != "echo" {
		t.Errorf("access line of the TCP connection = %v, want node %s", conn, backend.addr)
	}

	// /metrics: promtool's checks, and the story the access log told.
	mresp, err := httpc.Get("http://" + admin + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	metrics, _ := io.ReadAll(mresp.Body)
	mresp.Body.Close()
	check := exec.Command(promtool, "check", "metrics")
	check.Stdin = bytes.NewReader(metrics)
	if out, err := check.CombinedOutput(); err != nil {
		t.Errorf("promtool check metrics: %v\n%s", err, out)
	}
	text := string(metrics)
	for _, want := range [][]string{
		{"sidecar_build_info{", `goversion="go`},
		{"sidecar_tcp_connections_total{", `endpoint="` + backend.addr + `"`, `listener="echo@` + tcpUp + `"`, "} 1"},
		{"sidecar_tcp_connection_duration_seconds_count{", `listener="echo@` + tcpUp + `"`, "} 1"},
		{"sidecar_proxy_errors_total{", `listener="ghost"`, `reason="connect_failed"`, "} 1"},
		{"sidecar_upstream_requests_total{", `code="2xx"`, `endpoint="` + backend.addr + `"`, `listener="echo@` + httpUp + `"`},
	} {
		if metricLine(text, want[0], want[1:]...) == "" {
			t.Errorf("/metrics has no %s line with %q", want[0], want[1:])
		}
	}
	if l := metricLine(text, "sidecar_upstream_requests_total{", `listener="echo@`+tcpUp+`"`); l != "" {
		t.Errorf("/metrics counts the TCP connection as a request: %s", l)
	}
}

// metricLine returns the line of the exposition text that starts with
// prefix and holds every part, or "".
func metricLine(text, prefix string, parts ...string) string {
lines:
	for _, l := range strings.Split(text, "\n") {
		if !strings.HasPrefix(l, prefix) {
			continue
		}
		for _, p := range parts {
			if !strings.Contains(l, p) {
				continue lines
			}
		}
		return l
	}
	return ""
}

// metricValue returns the value of the first series of name (with the
// labels in parts) in the exposition text, or -1.
func metricValue(t *testing.T, text, name string, parts ...string) float64 {
	t.Helper()
	l := metricLine(text, name, parts...)
	if l == "" {
		return -1
	}
	f := strings.Fields(l)
	v, err := strconv.ParseFloat(f[len(f)-1], 64)
	if err != nil {
		t.Fatalf("%s: %v", l, err)
	}
	return v
}

// TestAppAndHeartbeatMetrics: a sidecar running its app says on /metrics
// when its probe last passed, how many probes failed, how often the app
// restarted and how much memory it holds; promtool accepts the lot.
func TestAppAndHeartbeatMetrics(t *testing.T) {
	t.Parallel()
	promtool, err := exec.LookPath("promtool")
	if err != nil {
		if testing.Short() {
			t.Skip("no promtool")
		}
		t.Fatal("no promtool on PATH (make promtool)")
	}
	agent := consulagent.Start(t, consulagent.Options{})
	a := newRTApp(t, "obs-app", "obs-app-1", agent.Addr())
	a.start(t)
	httpc := &http.Client{Timeout: 10 * time.Second}

	req, _ := http.NewRequest(http.MethodPost, "http://"+a.adminAddr+"/app/restart", nil)
	req.Header.Set("Authorization", "Bearer s3cret")
	resp, err := httpc.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("POST /app/restart = %d, want 200", resp.StatusCode)
	}

	var text string
	consulagent.WaitFor(t, 15*time.Second, "the metrics of the restarted app", func() bool {
		resp, err := httpc.Get("http://" + a.adminAddr + "/metrics")
		if err != nil {
			return false
		}
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		text = string(b)
		return metricValue(t, text, "sidecar_app_restarts_total ") == 1 &&
			metricValue(t, text, "sidecar_app_resident_memory_bytes ") > 0 &&
			metricValue(t, text, "sidecar_heartbeat_last_pass_timestamp_seconds ") > float64(time.Now().Add(-time.Minute).Unix())
	})
	if v := metricValue(t, text, "sidecar_heartbeat_probe_failures_total "); v < 0 {
		t.Errorf("/metrics has no sidecar_heartbeat_probe_failures_total")
	}
	check := exec.Command(promtool, "check", "metrics")
	check.Stdin = strings.NewReader(text)
	if out, err := check.CombinedOutput(); err != nil {
		t.Errorf("promtool check metrics: %v\n%s", err, out)
	}
}
