package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// scenario is one workload, run against every peer.
type scenario struct {
	Name     string   `json:"name"`
	Title    string   `json:"title"`
	Mode     string   `json:"mode"`     // loadgen -mode
	Listener string   `json:"listener"` // which of the peer's listeners
	Workers  int      `json:"workers"`  // loadgen -c
	Args     []string `json:"args,omitempty"`
	Counter  string   `json:"counter"` // backend counter that shows the spread
	Unit     string   `json:"unit"`    // what one "request" is
	Latency  bool     `json:"latency"` // fixed rate: report latency added over direct
	// MinRuns raises -runs for this scenario: its medians need more runs
	// to hold still against the machine's noise.
	MinRuns int `json:"min_runs,omitempty"`
	// Peers, when set, are the only peers the scenario runs against (see
	// codec.go).
	Peers []string `json:"peers,omitempty"`
}

var scenarios = []scenario{
	{Name: "h1-get", Title: "HTTP/1.1 keep-alive GET, 100 B answer", Mode: "get", Listener: lnH1, Workers: 64,
		Counter: "http", Unit: "req"},
	{Name: "h1-post", Title: "HTTP/1.1 keep-alive POST, 4 KiB both ways", Mode: "post", Listener: lnH1, Workers: 64,
		Args: []string{"-size", "4096"}, Counter: "http", Unit: "req"},
	{Name: "h2c-get", Title: "h2c GET, 100 B answer, 64 streams on one connection", Mode: "h2c", Listener: lnH2, Workers: 64,
		Counter: "http", Unit: "req"},
	{Name: "grpc-unary", Title: "gRPC unary, 100 B each way, 64 concurrent streams on one connection", Mode: "grpc",
		Listener: lnGRPC, Workers: 64, Counter: "grpc", Unit: "call"},
	{Name: "grpc-bidi", Title: "gRPC bidi streams, 100 B messages echoed, 12 streams × 32 in flight", Mode: "bidi",
		Listener: lnGRPC, Workers: 12, Args: []string{"-depth", "32"}, Counter: "grpc_msgs", Unit: "msg"},
	{Name: "ws", Title: "WebSocket ping-pong, 100 B messages, 64 connections", Mode: "ws", Listener: lnH1, Workers: 64,
		Counter: "ws_msgs", Unit: "msg"},
	{Name: "latency", Title: "HTTP/1.1 GET at a fixed 1,000 req/s (open loop, 16 connections)", Mode: "rate",
		Listener: lnH1, Workers: 16, Args: []string{"-rate", "1000"}, Counter: "http", Unit: "req", Latency: true,
		MinRuns: 7},
}

// loadResult is loadgen's JSON.
type loadResult struct {
	Requests    int64   `json:"requests"`
	Errors      int64   `json:"errors"`
	ErrorSample string  `json:"error_sample,omitempty"`
	Seconds     float64 `json:"seconds"`
	RPS         float64 `json:"rps"`
	MeanUS      float64 `json:"mean_us"`
	P50US       float64 `json:"p50_us"`
	P90US       float64 `json:"p90_us"`
	P99US       float64 `json:"p99_us"`
	P999US      float64 `json:"p999_us"`
	MaxUS       float64 `json:"max_us"`
	SchedP50US  float64 `json:"sched_p50_us,omitempty"`
	SchedP99US  float64 `json:"sched_p99_us,omitempty"`
	SchedP999US float64 `json:"sched_p999_us,omitempty"`
}

// runResult is one run of a scenario against one peer.
type runResult struct {
	Run         int        `json:"run"`
	Load        loadResult `json:"load"`
	CPUSeconds  float64    `json:"proxy_cpu_s"`
	CPUPerReqUS float64    `json:"proxy_cpu_us_per_req"`
	// From schedstat: exact run time of the proxy's threads.
	SchedCPUPerReqUS float64 `json:"proxy_sched_cpu_us_per_req"`
	PeakRSSKB        int64   `json:"peak_rss_kb"`
	Spread           []int64 `json:"spread"`
	LoadAvg          string  `json:"loadavg_after"`
	Err              string  `json:"error,omitempty"`
}

// cell is a scenario's figures for one peer: medians of the runs.
type cell struct {
	Peer        string      `json:"peer"`
	Runs        []runResult `json:"runs"`
	OK          int         `json:"ok_runs"`
	RPS         float64     `json:"rps"`
	P50US       float64     `json:"p50_us"`
	P99US       float64     `json:"p99_us"`
	P999US      float64     `json:"p999_us"`
	SchedP50US  float64     `json:"sched_p50_us,omitempty"`
	SchedP99US  float64     `json:"sched_p99_us,omitempty"`
	CPUPerReqUS float64     `json:"proxy_cpu_us_per_req"`
	SchedCPUUS  float64     `json:"proxy_sched_cpu_us_per_req"`
	PeakRSSKB   int64       `json:"peak_rss_kb"` // the highest of the runs
	Errors      int64       `json:"errors"`      // summed over the runs
	ErrorSample string      `json:"error_sample,omitempty"`
	Spread      []int64     `json:"spread"` // summed over the runs
}

type scenarioResult struct {
	scenario
	LoadBefore string  `json:"loadavg_before"`
	LoadAfter  string  `json:"loadavg_after"`
	Cells      []*cell `json:"cells"`
}

func (r *scenarioResult) cell(peer string) *cell {
	for _, c := range r.Cells {
		if c.Peer == peer {
			return c
		}
	}
	return nil
}

// runScenario runs sc -runs times against every peer, rotating the order
// of the peers from run to run so none always goes first.
func (h *harness) runScenario(sc scenario, peers []*peer) *scenarioResult {
	peers = sc.peersOf(peers)
	res := &scenarioResult{scenario: sc, LoadBefore: loadavg()}
	byPeer := map[string]*cell{}
	for _, p := range peers {
		c := &cell{Peer: p.name}
		byPeer[p.name] = c
		res.Cells = append(res.Cells, c)
	}
	runs := max(h.opts.runs, sc.MinRuns)
	for run := 0; run < runs && h.ctx.Err() == nil; run++ {
		for i := range peers {
			p := peers[(i+run)%len(peers)]
			if h.ctx.Err() != nil {
				break
			}
			r := h.runOne(sc, p, run)
			c := byPeer[p.name]
			c.Runs = append(c.Runs, r)
			status := fmt.Sprintf("%10.0f %s/s  p50 %7.0fµs  p99 %7.0fµs", r.Load.RPS, sc.Unit, r.Load.P50US, r.Load.P99US)
			if p.proc != nil {
				status += fmt.Sprintf("  cpu %6.1fµs/%s (sched %6.1f)  rss %5.1fMB", r.CPUPerReqUS, sc.Unit, r.SchedCPUPerReqUS, float64(r.PeakRSSKB)/1024)
			}
			if r.Load.Errors > 0 {
				status += fmt.Sprintf("  errors %d (%s)", r.Load.Errors, r.Load.ErrorSample)
			}
			if r.Err != "" {
				status = "FAILED: " + r.Err
			}
			h.logf("  %-10s run %d/%d %-14s %s", sc.Name, run+1, runs, p.name, status)
		}
	}
	// Profiles come from one extra, unreported run, so pprof's own cost
	// stays out of the figures.
	if h.profileScenario(sc.Name) && h.ctx.Err() == nil {
		for _, p := range peers {
			if p.name == "sidecar" {
				h.logf("  %-10s profile run    %s", sc.Name, p.name)
				if r := h.runOne(sc, p, -1); r.Err != "" {
					h.logf("  profile run failed: %s", r.Err)
				}
			}
		}
	}
	res.LoadAfter = loadavg()
	for _, c := range res.Cells {
		c.aggregate()
	}
	return res
}

func (c *cell) aggregate() {
	var rps, p50, p99, p999, s50, s99, cpu, sched []float64
	for _, r := range c.Runs {
		c.Errors += r.Load.Errors
		if c.ErrorSample == "" {
			c.ErrorSample = r.Load.ErrorSample
			if r.Err != "" {
				c.ErrorSample = r.Err
			}
		}
		c.PeakRSSKB = max(c.PeakRSSKB, r.PeakRSSKB)
		if c.Spread == nil {
			c.Spread = make([]int64, len(r.Spread))
		}
		for i, n := range r.Spread {
			if i < len(c.Spread) && n > 0 {
				c.Spread[i] += n
			}
		}
		if r.Err != "" || r.Load.Requests == 0 {
			continue
		}
		c.OK++
		rps = append(rps, r.Load.RPS)
		p50 = append(p50, r.Load.P50US)
		p99 = append(p99, r.Load.P99US)
		p999 = append(p999, r.Load.P999US)
		s50 = append(s50, r.Load.SchedP50US)
		s99 = append(s99, r.Load.SchedP99US)
		cpu = append(cpu, r.CPUPerReqUS)
		sched = append(sched, r.SchedCPUPerReqUS)
	}
	c.RPS, c.P50US, c.P99US, c.P999US = median(rps), median(p50), median(p99), median(p999)
	c.SchedP50US, c.SchedP99US = median(s50), median(s99)
	c.CPUPerReqUS, c.SchedCPUUS = median(cpu), median(sched)
}

func median(v []float64) float64 {
	if len(v) == 0 {
		return 0
	}
	s := slices.Clone(v)
	slices.Sort(s)
	if len(s)%2 == 1 {
		return s[len(s)/2]
	}
	return (s[len(s)/2-1] + s[len(s)/2]) / 2
}

// runOne runs the load generator once and samples the proxy around the
// measured window, which the load generator marks on its stdout. Run -1 is
// a profiling run of the sidecar.
func (h *harness) runOne(sc scenario, p *peer, run int) runResult {
	r := runResult{Run: run + 1}
	var pids []int
	if p.proc != nil {
		if !p.proc.alive() {
			r.Err = p.name + " is not running: " + p.proc.logTail()
			return r
		}
		pids = p.proc.pids()
		if !resetPeakRSS(pids) {
			h.peakNote = "peak RSS could not be reset between runs (clear_refs): it is the process's lifetime peak"
		}
	}
	args := []string{h.bin("loadgen"), "-mode", sc.Mode, "-targets", strings.Join(p.targets[sc.Listener], ","),
		"-c", strconv.Itoa(sc.Workers), "-duration", h.opts.duration.String(), "-warmup", h.opts.warmup.String()}
	args = append(args, sc.Args...)
	args = append(args, p.loadArgs...)
	if h.pinned {
		args = append([]string{tasksetPath, "-c", strconv.Itoa(h.loadCPU)}, args...)
	}
	ctx, cancel := context.WithTimeout(h.ctx, h.opts.warmup+h.opts.duration+30*time.Second)
	defer cancel()
	cmd := execCommand(ctx, args...)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		r.Err = err.Error()
		return r
	}
	if err := cmd.Start(); err != nil {
		r.Err = err.Error()
		return r
	}
	profiling := run < 0 && h.profileAddr != ""
	var (
		w          window
		jsonLine   []byte
		profDone   chan error
		sawMeasure bool
	)
	sc2 := bufio.NewScanner(stdout)
	for sc2.Scan() {
		line := sc2.Bytes()
		switch {
		case bytes.Equal(line, []byte("measure")):
			sawMeasure = true
			w.t0, w.n0 = cpuTicks(pids), cpuSchedNS(pids)
			w.c0 = h.allCounts(sc.Counter)
			if profiling {
				profDone = make(chan error, 1)
				go func() {
					profDone <- h.fetchProfile(sc.Name, "profile?seconds="+strconv.Itoa(max(1, int(h.opts.duration.Seconds()))), "cpu")
				}()
			}
		case bytes.Equal(line, []byte("done")):
			w.t1, w.n1 = cpuTicks(pids), cpuSchedNS(pids)
			w.c1 = h.allCounts(sc.Counter)
			if pids != nil {
				r.PeakRSSKB = statusKB(pids, "VmHWM")
			}
		case len(line) > 0 && line[0] == '{':
			jsonLine = slices.Clone(line)
		}
	}
	werr := cmd.Wait()
	r.LoadAvg = loadavg()
	if profDone != nil {
		if err := <-profDone; err != nil {
			h.logf("  cpu profile: %v", err)
		}
		if err := h.fetchProfile(sc.Name, "allocs", "allocs"); err != nil {
			h.logf("  alloc profile: %v", err)
		}
	}
	if werr != nil || jsonLine == nil || !sawMeasure {
		r.Err = fmt.Sprintf("loadgen: %v: %s", werr, strings.TrimSpace(lastLines(stderr.String(), 3)))
		return r
	}
	if err := json.Unmarshal(jsonLine, &r.Load); err != nil {
		r.Err = "loadgen output: " + err.Error()
		return r
	}
	w.settle(&r, pids != nil, h.ticks)
	return r
}

// window is what runOne samples at the start (0) and end (1) of the
// measured window: CPU ticks, scheduler nanoseconds and the nodes' request
// counts.
type window struct {
	t0, t1 int64
	n0, n1 int64
	c0, c1 []int64
}

// settle fills r's CPU figures (when cpu, the sidecar's process being
// known) and the spread of requests over the nodes.
func (w *window) settle(r *runResult, cpu bool, ticks int64) {
	if cpu {
		r.CPUSeconds = float64(w.t1-w.t0) / float64(ticks)
		if r.Load.Requests > 0 {
			r.CPUPerReqUS = r.CPUSeconds * 1e6 / float64(r.Load.Requests)
			r.SchedCPUPerReqUS = float64(w.n1-w.n0) / 1e3 / float64(r.Load.Requests)
		}
	}
	r.Spread = make([]int64, len(w.c1))
	for i := range w.c1 {
		if i < len(w.c0) && w.c0[i] >= 0 && w.c1[i] >= 0 {
			r.Spread[i] = w.c1[i] - w.c0[i]
		} else {
			r.Spread[i] = -1
		}
	}
}

func (h *harness) profileScenario(name string) bool {
	if h.profileAddr == "" {
		return false
	}
	return h.opts.profile == "all" || slices.Contains(strings.Split(h.opts.profile, ","), name)
}

// fetchProfile saves one pprof profile of the sidecar.
func (h *harness) fetchProfile(scenario, query, kind string) error {
	c := &http.Client{Timeout: h.opts.duration + 30*time.Second}
	resp, err := c.Get("http://" + h.profileAddr + "/debug/pprof/" + query)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("%s: %s", query, resp.Status)
	}
	dir := filepath.Join(h.opts.out, "profiles")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	path := filepath.Join(dir, "sidecar-"+scenario+"-"+kind+".pprof")
	f, err := os.Create(path)
	if err != nil {
		return err
	}
	defer f.Close()
	if _, err := io.Copy(f, resp.Body); err != nil {
		return err
	}
	h.logf("  wrote %s (go tool pprof -top %s)", path, path)
	return nil
}

func lastLines(s string, n int) string {
	lines := strings.Split(strings.TrimSpace(s), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, " | ")
}

// execCommand is exec.CommandContext that, when ctx ends, kills the process
// by its PID and stops waiting for its output soon after.
func execCommand(ctx context.Context, argv ...string) *exec.Cmd {
	cmd := exec.CommandContext(ctx, argv[0], argv[1:]...)
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	cmd.Cancel = func() error { return syscall.Kill(cmd.Process.Pid, syscall.SIGKILL) }
	cmd.WaitDelay = 2 * time.Second
	return cmd
}
