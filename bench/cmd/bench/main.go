// Command bench measures the sidecar side by side with HAProxy and nginx,
// and with no proxy at all, on loopback.
//
//	go run ./bench/cmd/bench [-duration 5s] [-runs 3] [-scenarios h1-get,grpc-unary]
//	                         [-peers direct,sidecar,haproxy,nginx] [-consul]
//	                         [-update BENCHMARKS.md] [-profile h1-get] [-base REV]
//
// It builds the sidecar, bench/backend and bench/loadgen into a temp dir,
// installs haproxy and nginx with apt-get when they are missing, starts three
// backends, the sidecar (static discovery, and with -consul a second one
// fed by a Consul dev agent), HAProxy and nginx, all round-robin over the
// same backends with keep-alive to them, and drives each scenario through
// every peer with the same load generator. Proxies run on one CPU and the
// load generator on another (taskset); backends are not pinned. With -base
// it also builds the sidecar at that git revision and runs it beside the
// working tree's as peer sidecar-base, configured and pinned the same way.
//
// Results go to bench/results/latest.md and latest.json, and with -update
// into the section between the bench:results markers of that file. Every
// process it starts is stopped by PID when it ends, fails or gets Ctrl-C.
package main

import (
	"bufio"
	"context"
	"errors"
	"flag"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"syscall"
	"time"
)

type options struct {
	duration  time.Duration
	warmup    time.Duration
	runs      int
	scenarios string
	peers     string
	consul    bool
	install   bool
	out       string
	update    string
	micro     string
	noMicro   bool
	profile   string
	keep      bool
	base      string
	proxyCPU  int
	loadCPU   int
}

type harness struct {
	ctx      context.Context
	opts     options
	tmp      string
	procs    procs
	backends []*backend
	http     *http.Client
	ticks    int64

	pinned            bool
	proxyCPU, loadCPU int

	consulAddr string   // the dev agent, once started (mesh.go)
	meshNodes  []string // the mesh nodes' inbound listeners, once started

	profileAddr string
	source      string // git describe of the tree the sidecar was built from
	baseSource  string // short hash of -base, built as sidecar-base
	peakNote    string
	notes       []string // for the report: skipped peers, install output
	start       time.Time
}

var tasksetPath string

func main() {
	var o options
	flag.DurationVar(&o.duration, "duration", 5*time.Second, "measured time of each run")
	flag.DurationVar(&o.warmup, "warmup", 500*time.Millisecond, "unmeasured time before each run")
	flag.IntVar(&o.runs, "runs", 3, "runs of each scenario per peer; medians are reported")
	flag.StringVar(&o.scenarios, "scenarios", "", "comma-separated scenarios (default all): "+scenarioNames())
	flag.StringVar(&o.peers, "peers", "direct,direct-1,sidecar,haproxy,nginx", "comma-separated peers")
	flag.BoolVar(&o.consul, "consul", false, "also run a sidecar fed by a Consul dev agent (bin/consul) as peer sidecar-consul")
	flag.BoolVar(&o.install, "install", true, "apt-get install haproxy and nginx when missing")
	flag.StringVar(&o.out, "out", "bench/results", "directory for latest.md, latest.json and profiles")
	flag.StringVar(&o.update, "update", "", "markdown file whose bench:results section to rewrite (e.g. BENCHMARKS.md)")
	flag.StringVar(&o.micro, "micro", "", "go test -bench output to take BenchmarkProxyHTTP allocs from (default: run it)")
	flag.BoolVar(&o.noMicro, "no-micro", false, "do not run BenchmarkProxyHTTP when -micro is not given")
	flag.StringVar(&o.profile, "profile", "", "scenarios (or all) in which to save a CPU and an alloc profile of the sidecar (first run)")
	flag.BoolVar(&o.keep, "keep", false, "keep the temp dir (configs, logs)")
	flag.StringVar(&o.base, "base", "", "git revision of a second sidecar build to run as peer sidecar-base (A/B comparison)")
	flag.IntVar(&o.proxyCPU, "proxy-cpu", 1, "CPU the proxies are pinned to")
	flag.IntVar(&o.loadCPU, "load-cpu", 0, "CPU the load generator is pinned to")
	flag.Parse()
	if err := run(o); err != nil {
		fmt.Fprintln(os.Stderr, "bench:", err)
		os.Exit(1)
	}
}

func scenarioNames() string {
	var n []string
	for _, s := range scenarios {
		n = append(n, s.Name)
	}
	return strings.Join(n, ",")
}

func run(o options) error {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, os.Interrupt, syscall.SIGTERM)
	defer signal.Stop(sigs)
	if err := chdirRepoRoot(); err != nil {
		return err
	}
	if o.runs < 1 || o.duration <= 0 {
		return errors.New("need -runs ≥ 1 and -duration > 0")
	}
	selected, err := selectScenarios(o.scenarios)
	if err != nil {
		return err
	}
	h := &harness{ctx: ctx, opts: o, http: &http.Client{Timeout: 2 * time.Second}, ticks: clockTicks(), start: time.Now()}
	h.tmp, err = os.MkdirTemp("", "sidecar-bench-")
	if err != nil {
		return err
	}
	if o.keep {
		h.logf("temp dir (kept): %s", h.tmp)
	} else {
		defer os.RemoveAll(h.tmp)
	}
	defer h.procs.stopAll()
	go func() {
		if _, ok := <-sigs; ok {
			h.logf("interrupted: stopping every process started")
			cancel()
		}
	}()

	h.setupPinning()
	peerNames := peerList(o.peers, o.consul, o.base)
	if slices.Contains(peerNames, "haproxy") || slices.Contains(peerNames, "haproxy-tls") || slices.Contains(peerNames, "nginx") {
		h.ensurePeers()
	}
	if err := h.build(); err != nil {
		return err
	}
	machine := h.machine()
	h.logf("machine: %s", machine.summary())

	if err := h.startBackends(3); err != nil {
		return err
	}
	var peers []*peer
	for _, name := range peerNames {
		if ctx.Err() != nil {
			return ctx.Err()
		}
		p, err := h.startPeer(name)
		if err != nil {
			h.note("peer %s skipped: %v", name, firstLine(err.Error()))
			h.logf("%s", err)
			continue
		}
		h.logf("peer %-14s ready %v idle RSS %.1f MB", p.name, p.targets, float64(p.idleRSSKB)/1024)
		peers = append(peers, p)
	}
	if len(peers) == 0 {
		return errors.New("no peer started")
	}

	micro := h.microbench()
	var results []*scenarioResult
	for _, sc := range selected {
		if ctx.Err() != nil {
			break
		}
		h.logf("scenario %s: %s (load avg %s)", sc.Name, sc.Title, loadavg())
		results = append(results, h.runScenario(sc, peers))
	}
	if ctx.Err() != nil {
		return errors.New("interrupted; no results written")
	}
	rep := &report{Machine: machine, Options: h.optionsDoc(), Peers: peerDocs(peers), Scenarios: results,
		Micro: micro, Notes: h.allNotes(), Elapsed: time.Since(h.start).Round(time.Second).String()}
	return h.write(rep)
}

func (h *harness) startPeer(name string) (*peer, error) {
	switch name {
	case "direct":
		return h.directPeer(), nil
	case "direct-1":
		return h.directOnePeer(), nil
	case "sidecar":
		return h.startSidecar("sidecar", "sidecar", "")
	case "sidecar-base":
		if h.baseSource != "" {
			return h.startSidecar("sidecar-base", "sidecar-base", "")
		}
	case "sidecar-consul":
		addr, err := h.consulAgent()
		if err != nil {
			return nil, err
		}
		return h.startSidecar("sidecar-consul", "sidecar", addr)
	case "sidecar-mtls":
		return h.startSidecarMTLS()
	case "haproxy-tls":
		return h.startHAProxyTLS()
	case "haproxy":
		return h.startHAProxy()
	case "nginx":
		return h.startNginx()
	}
	return nil, fmt.Errorf("unknown peer %q (want direct, direct-1, sidecar, sidecar-consul, sidecar-mtls, haproxy, haproxy-tls or nginx)", name)
}

// peerList is the peers to start: those of -peers, then sidecar-consul with
// -consul, and with -base sidecar-base right after sidecar (or last).
func peerList(peers string, consul bool, base string) []string {
	names := strings.Split(peers, ",")
	if consul && !slices.Contains(names, "sidecar-consul") {
		names = append(names, "sidecar-consul")
	}
	if base != "" && !slices.Contains(names, "sidecar-base") {
		i := slices.Index(names, "sidecar")
		if i < 0 {
			i = len(names) - 1
		}
		names = slices.Insert(names, i+1, "sidecar-base")
	}
	return names
}

func selectScenarios(list string) ([]scenario, error) {
	if list == "" || list == "all" {
		return scenarios, nil
	}
	var out []scenario
	for _, name := range strings.Split(list, ",") {
		i := slices.IndexFunc(scenarios, func(s scenario) bool { return s.Name == name })
		if i < 0 {
			return nil, fmt.Errorf("unknown scenario %q (want %s)", name, scenarioNames())
		}
		out = append(out, scenarios[i])
	}
	return out, nil
}

// setupPinning pins proxies and the load generator to separate CPUs when
// taskset exists and there are at least two.
func (h *harness) setupPinning() {
	h.proxyCPU, h.loadCPU = -1, -1
	p, err := exec.LookPath("taskset")
	switch {
	case err != nil:
		h.note("taskset not found: nothing is pinned")
	case runtime.NumCPU() < 2:
		h.note("one CPU: nothing is pinned")
	case h.opts.proxyCPU == h.opts.loadCPU:
		h.note("-proxy-cpu equals -load-cpu: nothing is pinned")
	default:
		tasksetPath = p
		h.pinned = true
		h.proxyCPU, h.loadCPU = h.opts.proxyCPU, h.opts.loadCPU
	}
}

// ensurePeers installs haproxy and nginx from the distribution when either
// is missing.
func (h *harness) ensurePeers() {
	var missing []string
	for _, name := range []string{"haproxy", "nginx"} {
		if _, err := lookSbin(name); err != nil {
			missing = append(missing, name)
		}
	}
	if len(missing) == 0 {
		return
	}
	if !h.opts.install {
		h.note("not installed (and -install=false): %s", strings.Join(missing, ", "))
		return
	}
	if _, err := exec.LookPath("apt-get"); err != nil {
		h.note("not installed and no apt-get: %s", strings.Join(missing, ", "))
		return
	}
	h.logf("installing %s with apt-get", strings.Join(missing, " "))
	install := append([]string{"apt-get", "install", "-y", "--no-install-recommends"}, missing...)
	env := []string{"DEBIAN_FRONTEND=noninteractive"}
	out, err := runEnv(h.ctx, env, install...)
	if err != nil {
		h.logf("apt-get install failed (%v); running apt-get update and trying again", err)
		if out, err := runEnv(h.ctx, env, "apt-get", "update"); err != nil {
			h.logf("%s", lastLines(out, 5))
		}
		out, err = runEnv(h.ctx, env, install...)
	}
	if err != nil {
		h.note("apt-get install %s failed: %v", strings.Join(missing, " "), err)
		h.logf("%s", lastLines(out, 5))
	}
}

func runEnv(ctx context.Context, env []string, argv ...string) (string, error) {
	ctx, cancel := context.WithTimeout(ctx, 5*time.Minute)
	defer cancel()
	cmd := execCommand(ctx, argv...)
	cmd.Env = append(os.Environ(), env...)
	out, err := cmd.CombinedOutput()
	return string(out), err
}

// lookSbin finds a daemon binary on PATH or in the sbin directories, which
// are not on every user's PATH; it puts their directory on PATH.
func lookSbin(name string) (string, error) {
	if p, err := exec.LookPath(name); err == nil {
		return p, nil
	}
	for _, dir := range []string{"/usr/sbin", "/sbin", "/usr/local/sbin"} {
		p := filepath.Join(dir, name)
		if st, err := os.Stat(p); err == nil && !st.IsDir() {
			os.Setenv("PATH", os.Getenv("PATH")+":"+dir)
			return p, nil
		}
	}
	return "", fmt.Errorf("%s not found", name)
}

// build compiles the sidecar (as `make build` does), the backend and the
// load generator into the temp dir, and with -base the sidecar at that
// revision too.
func (h *harness) build() error {
	binDir := filepath.Join(h.tmp, "bin")
	h.source = "unknown"
	if out, err := runCmd(h.ctx, "git", "describe", "--always", "--dirty"); err == nil {
		h.source = strings.TrimSpace(out)
	}
	sidecarArgs := []string{"go", "build", "-trimpath", "-o", filepath.Join(binDir, "sidecar")}
	if h.opts.profile != "" {
		overlay, err := h.pprofOverlay(".", "overlay.json")
		if err != nil {
			return err
		}
		sidecarArgs = append(sidecarArgs, "-overlay", overlay)
		var pp ports
		h.profileAddr = pp.must(1)[0]
		pp.release()
	}
	builds := [][]string{
		append(sidecarArgs, "./cmd/sidecar"),
		{"go", "build", "-trimpath", "-o", filepath.Join(binDir, "backend"), "./bench/backend"},
		{"go", "build", "-trimpath", "-o", filepath.Join(binDir, "loadgen"), "./bench/loadgen"},
	}
	for _, b := range builds {
		h.logf("%s", strings.Join(b, " "))
		if out, err := runEnv(h.ctx, []string{"CGO_ENABLED=0"}, b...); err != nil {
			return fmt.Errorf("%s: %v\n%s", strings.Join(b, " "), err, out)
		}
	}
	if h.opts.base != "" {
		return h.buildBase()
	}
	return nil
}

// buildBase builds the sidecar at -base into the temp dir as sidecar-base,
// with the flags of the working tree's build, from a detached git worktree
// that it removes again, also when the build fails.
func (h *harness) buildBase() error {
	out, err := runCmd(h.ctx, "git", "rev-parse", "--short", "--verify", h.opts.base+"^{commit}")
	if err != nil {
		return fmt.Errorf("-base %s: %v\n%s", h.opts.base, err, out)
	}
	rev := strings.TrimSpace(out)
	src := filepath.Join(h.tmp, "base-src")
	h.logf("git worktree add --detach %s %s", src, rev)
	if out, err := runCmd(h.ctx, "git", "worktree", "add", "--detach", src, rev); err != nil {
		return fmt.Errorf("git worktree add: %v\n%s", err, out)
	}
	defer func() {
		// Not h.ctx: the worktree goes also after Ctrl-C.
		if out, err := runCmd(context.Background(), "git", "worktree", "remove", "--force", src); err != nil {
			h.logf("git worktree remove --force %s: %v: %s", src, err, lastLines(out, 3))
		}
	}()
	args := []string{"go", "-C", src, "build", "-trimpath", "-o", h.bin("sidecar-base")}
	if h.opts.profile != "" {
		overlay, err := h.pprofOverlay(src, "overlay-base.json")
		if err != nil {
			return err
		}
		args = append(args, "-overlay", overlay)
	}
	args = append(args, "./cmd/sidecar")
	h.logf("%s", strings.Join(args, " "))
	if out, err := runEnv(h.ctx, []string{"CGO_ENABLED=0"}, args...); err != nil {
		return fmt.Errorf("%s: %v\n%s", strings.Join(args, " "), err, out)
	}
	h.baseSource = rev
	return nil
}

func (h *harness) bin(name string) string { return filepath.Join(h.tmp, "bin", name) }

func (h *harness) logf(format string, args ...any) {
	fmt.Fprintf(os.Stderr, "[%6.1fs] %s\n", time.Since(h.start).Seconds(), fmt.Sprintf(format, args...))
}

func (h *harness) note(format string, args ...any) {
	h.notes = append(h.notes, fmt.Sprintf(format, args...))
}

func (h *harness) allNotes() []string {
	n := slices.Clone(h.notes)
	if h.peakNote != "" {
		n = append(n, h.peakNote)
	}
	return n
}

func firstLine(s string) string {
	line, _, _ := strings.Cut(s, "\n")
	return line
}

// chdirRepoRoot moves to the directory of the module's go.mod, so the
// harness works from any directory inside the repository.
func chdirRepoRoot() error {
	out, err := exec.Command("go", "env", "GOMOD").Output()
	if err != nil {
		return fmt.Errorf("go env GOMOD: %w", err)
	}
	mod := strings.TrimSpace(string(out))
	if mod == "" || mod == os.DevNull {
		return errors.New("run inside the sidecar repository")
	}
	return os.Chdir(filepath.Dir(mod))
}

// microbench reads BenchmarkProxyHTTP and BenchmarkDirect from -micro, or
// runs just those two.
func (h *harness) microbench() map[string]microResult {
	var text string
	switch {
	case h.opts.micro != "":
		b, err := os.ReadFile(h.opts.micro)
		if err != nil {
			h.note("microbenchmarks: %v", err)
			return nil
		}
		text = string(b)
	case h.opts.noMicro:
		return nil
	default:
		h.logf("go test -run '^$' -bench '^(BenchmarkProxyHTTP|BenchmarkDirect)$' -benchmem ./proxy/")
		out, err := runCmd(h.ctx, "go", "test", "-run", "^$", "-bench", "^(BenchmarkProxyHTTP|BenchmarkDirect)$",
			"-benchmem", "-benchtime", "2s", "./proxy/")
		if err != nil {
			h.note("BenchmarkProxyHTTP did not run: %v: %s", err, lastLines(out, 3))
			return nil
		}
		text = out
	}
	return parseMicro(text)
}

// microResult is one line of go test -bench -benchmem.
type microResult struct {
	NsPerOp     float64 `json:"ns_per_op"`
	BytesPerOp  float64 `json:"bytes_per_op"`
	AllocsPerOp float64 `json:"allocs_per_op"`
}

func parseMicro(text string) map[string]microResult {
	out := map[string]microResult{}
	sc := bufio.NewScanner(strings.NewReader(text))
	for sc.Scan() {
		f := strings.Fields(sc.Text())
		if len(f) < 8 || !strings.HasPrefix(f[0], "Benchmark") {
			continue
		}
		name := f[0]
		if i := strings.LastIndexByte(name, '-'); i > 0 {
			name = name[:i]
		}
		var r microResult
		for i := 2; i+1 < len(f); i += 2 {
			var v float64
			if _, err := fmt.Sscan(f[i], &v); err != nil {
				continue
			}
			switch f[i+1] {
			case "ns/op":
				r.NsPerOp = v
			case "B/op":
				r.BytesPerOp = v
			case "allocs/op":
				r.AllocsPerOp = v
			}
		}
		out[name] = r
	}
	return out
}
