package supervisor

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

func TestHealthFollowsProcess(t *testing.T) {
	t.Parallel()
	h := newHarness(t, Spec{Command: helper, Args: []string{"-exit", "3", "-after", "200ms"}, Restart: RestartNever}, Options{})
	if got, want := h.health.Events(), []string{"critical: starting"}; !slices.Equal(got, want) {
		t.Fatalf("after New: overrides = %q, want %q", got, want)
	}
	h.run()
	st := h.waitState(StateExited, 5*time.Second)
	want := []string{"critical: starting", "clear", "critical: app exited: exit status 3"}
	if got := h.health.Events(); !slices.Equal(got, want) {
		t.Errorf("overrides = %q, want %q", got, want)
	}
	if st.LastExit != "exit status 3" || st.PID != 0 || st.Restarts != 0 {
		t.Errorf("Status() = %+v, want exited with exit status 3, no pid, no restarts", st)
	}
}

func TestRestartPolicies(t *testing.T) {
	t.Parallel()
	tests := []struct {
		policy string
		code   string
		want   string // state after the first exit
	}{
		{RestartNever, "1", StateExited},
		{RestartOnFailure, "0", StateExited},
		{RestartOnFailure, "1", StateBackoff},
		{RestartAlways, "0", StateBackoff},
	}
	for _, tc := range tests {
		t.Run(tc.policy+"/exit "+tc.code, func(t *testing.T) {
			t.Parallel()
			h := start(t, Spec{Restart: tc.policy, BackoffMin: time.Hour}, Options{}, "-exit", tc.code)
			h.waitState(tc.want, 5*time.Second)
		})
	}
}

// TestBackoffGrows runs an app that crashes at once: each planned delay
// (the "restarting app" log's) is longer than the one before, and each
// measured gap from an exit to the next start is at least its planned
// delay. The gaps themselves are not compared with each other: they also
// hold the app's own start, which a loaded machine stretches by more than
// the jitter between two delays.
func TestBackoffGrows(t *testing.T) {
	t.Parallel()
	starts := filepath.Join(t.TempDir(), "starts")
	h := start(t, Spec{BackoffMin: 100 * time.Millisecond, BackoffMax: 5 * time.Second, CrashLoopRestarts: -1},
		Options{}, "-exit", "1", "-starts", starts)
	poll(t, 10*time.Second, "5 starts", func() bool { ts, _ := readStarts(t, starts); return len(ts) >= 5 })
	h.stop()
	started := h.logs.FilterMessage("app started").All()
	exited := h.logs.FilterMessage("app exited").All()
	restarting := h.logs.FilterMessage("restarting app").All()
	var gaps, planned []time.Duration
	for i := 1; i < len(started) && i <= len(exited) && i <= len(restarting); i++ {
		gaps = append(gaps, started[i].Time.Sub(exited[i-1].Time).Round(time.Millisecond))
		d, ok := restarting[i-1].ContextMap()["delay"].(time.Duration)
		if !ok {
			t.Fatalf("restarting app without a delay field: %v", restarting[i-1].ContextMap())
		}
		planned = append(planned, d)
	}
	t.Logf("planned delays %v, measured from exit to restart %v", planned, gaps)
	if len(gaps) < 4 {
		t.Fatalf("measured %d delays, want 4", len(gaps))
	}
	for i := range gaps {
		if i > 0 && planned[i] <= planned[i-1] {
			t.Errorf("delay %d = %v, not longer than delay %d = %v (all: %v)", i+1, planned[i], i, planned[i-1], planned)
		}
		if gaps[i] < planned[i].Round(time.Millisecond)-time.Millisecond {
			t.Errorf("restart %d came %v after the exit, before its delay of %v", i+1, gaps[i], planned[i])
		}
	}
	if planned[0] < 80*time.Millisecond {
		t.Errorf("first delay = %v, want at least 80ms (backoff min 100ms - 20%%)", planned[0])
	}
}

func TestBackoffBounds(t *testing.T) {
	t.Parallel()
	a := &App{spec: Spec{BackoffMin: time.Second, BackoffMax: 30 * time.Second}}
	for n := 1; n <= 100; n++ {
		base := min(time.Second<<min(n-1, 10), 30*time.Second)
		for range 20 {
			d := a.backoff(n)
			if d < base*8/10 || d > min(base*12/10, 30*time.Second) {
				t.Fatalf("backoff(%d) = %v, want %v ±20%% and at most 30s", n, d, base)
			}
		}
	}
	// A large minimum must not overflow.
	a.spec = Spec{BackoffMin: time.Hour, BackoffMax: 1000 * time.Hour}
	if d := a.backoff(60); d <= 0 || d > 1000*time.Hour {
		t.Errorf("backoff(60) with min 1h = %v, want positive and at most 1000h", d)
	}
}

func TestCrashLoopStops(t *testing.T) {
	t.Parallel()
	starts := filepath.Join(t.TempDir(), "starts")
	h := start(t, Spec{BackoffMin: 10 * time.Millisecond, BackoffMax: 40 * time.Millisecond,
		CrashLoopRestarts: 3, CrashLoopWindow: 10 * time.Second}, Options{}, "-exit", "2", "-starts", starts)
	st := h.waitState(StateCrashLoop, 10*time.Second)
	time.Sleep(300 * time.Millisecond) // would cover several more restarts
	if ts, _ := readStarts(t, starts); len(ts) != 4 {
		t.Errorf("starts = %d, want 4 (the first and 3 restarts)", len(ts))
	}
	if !strings.Contains(st.Reason, "crash loop: 3 restarts within 10s") {
		t.Errorf("Status().Reason = %q, want it to say crash loop", st.Reason)
	}
	if last := h.health.Last(); !strings.HasPrefix(last, "critical: crash loop: 3 restarts within 10s") || !strings.Contains(last, "exit status 2") {
		t.Errorf("last override = %q, want critical with a crash-loop reason naming the exit", last)
	}
	if n := h.logs.FilterMessage("app in crash loop, not restarting").Len(); n != 1 {
		t.Errorf("crash-loop log lines = %d, want 1", n)
	}
	if st := h.app.Status(); st.State != StateCrashLoop || st.Restarts != 3 {
		t.Errorf("Status() = %s with %d restarts, want crash-loop with 3", st.State, st.Restarts)
	}
}

func TestCrashLoopWindowForgets(t *testing.T) {
	t.Parallel()
	// 2 restarts allowed per 50ms, 60ms+ between starts: never a crash loop.
	starts := filepath.Join(t.TempDir(), "starts")
	start(t, Spec{BackoffMin: 60 * time.Millisecond, BackoffMax: 60 * time.Millisecond,
		CrashLoopRestarts: 2, CrashLoopWindow: 50 * time.Millisecond}, Options{}, "-exit", "1", "-starts", starts)
	poll(t, 5*time.Second, "6 starts", func() bool { ts, _ := readStarts(t, starts); return len(ts) >= 6 })
}

// TestMemoryLimit: an app that grows is stopped at the limit and restarted.
func TestMemoryLimit(t *testing.T) {
	t.Parallel()
	starts := filepath.Join(t.TempDir(), "starts")
	const limit = 64 << 20
	h := start(t, Spec{MemoryLimit: limit, Restart: RestartOnFailure, BackoffMin: 10 * time.Millisecond, StopTimeout: 2 * time.Second},
		Options{MemoryInterval: 20 * time.Millisecond}, "-grow", "8", "-starts", starts)
	poll(t, 10*time.Second, "a restart after the memory limit", func() bool { ts, _ := readStarts(t, starts); return len(ts) >= 2 })
	over := h.logs.FilterMessage("app over memory limit").All()
	exited := h.logs.FilterMessage("app exited").All()
	if len(over) == 0 || len(exited) == 0 {
		t.Fatalf("want an over-limit and an exit log line, got %d and %d", len(over), len(exited))
	}
	rss := over[0].ContextMap()["rss"].(int64)
	t.Logf("over limit at RSS %s (limit %s); stopped %v later; exit: %v", FormatBytes(rss), FormatBytes(limit),
		exited[0].Time.Sub(over[0].Time).Round(time.Millisecond), exited[0].ContextMap()["exit"])
	if rss <= limit {
		t.Errorf("over-limit RSS = %d, want more than %d", rss, limit)
	}
	if st := h.app.Status(); st.Restarts < 1 {
		t.Errorf("Status() = %+v, want a restart", st)
	}
	events := h.health.Events()
	if !slices.ContainsFunc(events, func(e string) bool { return strings.HasPrefix(e, "critical: app memory limit exceeded: RSS") }) {
		t.Errorf("overrides = %q, want one for the memory limit", events)
	}
}

// TestStopEscalates: an app ignoring SIGTERM gets SIGKILL after the stop
// timeout.
func TestStopEscalates(t *testing.T) {
	t.Parallel()
	const timeout = 300 * time.Millisecond
	h := start(t, Spec{StopTimeout: timeout}, Options{}, "-ignore-term", "-say", "ready")
	poll(t, 5*time.Second, "the app to be ready", func() bool { return strings.Contains(h.out.String(), "[app] ready") })
	pid := h.app.Status().PID
	begin := time.Now()
	h.stop()
	took := time.Since(begin)
	t.Logf("stopped after %v (stop_timeout %v)", took.Round(time.Millisecond), timeout)
	if took < timeout || took > timeout+2*time.Second {
		t.Errorf("stop took %v, want stop_timeout %v plus a little", took, timeout)
	}
	if st := h.app.Status(); st.LastExit != "signal: killed" || st.State != StateStopped {
		t.Errorf("Status() = %s, last exit %q; want stopped by signal: killed", st.State, st.LastExit)
	}
	if alive(pid) {
		t.Errorf("pid %d still alive", pid)
	}
	if n := h.logs.FilterMessage("app did not stop in time, killing it").Len(); n != 1 {
		t.Errorf("kill log lines = %d, want 1", n)
	}
}

func TestStopGraceful(t *testing.T) {
	t.Parallel()
	h := start(t, Spec{StopSignal: syscall.SIGINT, StopTimeout: 10 * time.Second}, Options{}, "-ignore-term", "-say", "ready")
	poll(t, 5*time.Second, "the app to be ready", func() bool { return strings.Contains(h.out.String(), "[app] ready") })
	begin := time.Now()
	h.stop()
	if took := time.Since(begin); took > 5*time.Second {
		t.Errorf("stop with SIGINT took %v, want the app to exit at once", took)
	}
	if st := h.app.Status(); st.LastExit != "exit status 0" {
		t.Errorf("last exit = %q, want exit status 0 (SIGINT handled)", st.LastExit)
	}
}

// TestNoZombies restarts an app that starts a child 20 times: every
// process is reaped, and no child outlives its app.
func TestNoZombies(t *testing.T) {
	t.Parallel()
	starts := filepath.Join(t.TempDir(), "starts")
	h := start(t, Spec{BackoffMin: time.Millisecond, BackoffMax: time.Millisecond, CrashLoopRestarts: -1},
		Options{}, "-exit", "1", "-after", "20ms", "-child", "-starts", starts)
	poll(t, 20*time.Second, "21 starts", func() bool { ts, _ := readStarts(t, starts); return len(ts) >= 21 })
	h.stop()
	var children []int
	for _, line := range strings.Split(h.out.String(), "\n") {
		if f := strings.Fields(line); len(f) == 3 && f[1] == "child" {
			pid, _ := strconv.Atoi(f[2])
			children = append(children, pid)
		}
	}
	if len(children) < 20 {
		t.Fatalf("children started = %d, want at least 20", len(children))
	}
	poll(t, 2*time.Second, "every child gone", func() bool { return !slices.ContainsFunc(children, alive) })
	_, pids := readStarts(t, starts)
	for _, pid := range pids {
		if alive(pid) {
			t.Errorf("app pid %d still alive", pid)
		}
	}
	if z := zombieChildren(t); len(z) > 0 {
		t.Errorf("zombie children: %v", z)
	}
	if st := h.app.Status(); st.Restarts < 20 {
		t.Errorf("restarts = %d, want at least 20", st.Restarts)
	}
}

func TestOutputTagged(t *testing.T) {
	t.Parallel()
	h := start(t, Spec{Restart: RestartNever}, Options{}, "-say", "hello", "-exit", "0")
	h.waitState(StateExited, 5*time.Second)
	out := h.out.String()
	for _, want := range []string{"[app] hello\n", "[app] err: hello\n"} {
		if !strings.Contains(out, want) {
			t.Errorf("output = %q, want it to contain %q", out, want)
		}
	}
}

func TestOutputFile(t *testing.T) {
	t.Parallel()
	path := filepath.Join(t.TempDir(), "app.log")
	h := start(t, Spec{Restart: RestartNever, Output: path}, Options{Prefix: "[web] "}, "-say", "hi", "-exit", "0")
	h.waitState(StateExited, 5*time.Second)
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if got := string(b); !strings.Contains(got, "[web] hi\n") || !strings.Contains(got, "[web] err: hi\n") {
		t.Errorf("output file = %q, want both lines tagged [web]", got)
	}
	if h.out.String() != "" {
		t.Errorf("stdout got %q, want nothing with an output file", h.out.String())
	}
}

func TestStatusReportsRSS(t *testing.T) {
	t.Parallel()
	h := start(t, Spec{MemoryLimit: 1 << 30}, Options{}, "-say", "up")
	st := h.waitState(StateRunning, 5*time.Second)
	poll(t, 5*time.Second, "RSS", func() bool { st = h.app.Status(); return st.RSSBytes > 0 })
	if st.PID == 0 || st.MemoryLimit != 1<<30 || st.Policy != RestartAlways || st.Command != helper {
		t.Errorf("Status() = %+v, want pid, limit 1GiB, policy always, the command", st)
	}
}

func TestRollingRestart(t *testing.T) {
	t.Parallel()
	var readyCalls int
	h := start(t, Spec{}, Options{
		Drain: 100 * time.Millisecond,
		Ready: func(context.Context) error { readyCalls++; return nil },
	}, "-say", "up")
	st := h.waitState(StateRunning, 5*time.Second)
	begin := time.Now()
	if err := h.app.Restart(context.Background()); err != nil {
		t.Fatalf("Restart() error: %v", err)
	}
	if took := time.Since(begin); took < 100*time.Millisecond {
		t.Errorf("Restart() took %v, want at least the 100ms drain", took)
	}
	after := h.app.Status()
	if after.PID == 0 || after.PID == st.PID || after.Restarts != 1 || after.State != StateRunning {
		t.Errorf("after Restart: %+v, want running with a new pid and 1 restart (was pid %d)", after, st.PID)
	}
	if readyCalls != 1 {
		t.Errorf("Ready calls = %d, want 1", readyCalls)
	}
	want := []string{"critical: starting", "clear", "critical: restarting (sidecar restart)", "clear"}
	if got := h.health.Events(); !slices.Equal(got, want) {
		t.Errorf("overrides = %q, want %q", got, want)
	}
	if alive(st.PID) {
		t.Errorf("old pid %d still alive", st.PID)
	}
}

func TestRestartRevivesCrashLoop(t *testing.T) {
	t.Parallel()
	flag := filepath.Join(t.TempDir(), "flag")
	// Crashes until the flag file exists: sh -c 'test -f flag || exit 1; exec app'.
	h := newHarness(t, Spec{Command: "/bin/sh", Args: []string{"-c", `test -f "$FLAG" || exit 1; exec "$APP" -say up`},
		Env: []string{"FLAG=" + flag, "APP=" + helper}, BackoffMin: time.Millisecond, CrashLoopRestarts: 2}, Options{})
	h.run()
	h.waitState(StateCrashLoop, 5*time.Second)
	if err := os.WriteFile(flag, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := h.app.Restart(context.Background()); err != nil {
		t.Fatalf("Restart() error: %v", err)
	}
	if st := h.app.Status(); st.State != StateRunning {
		t.Errorf("after Restart: state %s, want running", st.State)
	}
}

func TestKill(t *testing.T) {
	t.Parallel()
	var order []string
	h := start(t, Spec{}, Options{
		Deregister: func(context.Context) error { order = append(order, "deregister"); return nil },
	}, "-say", "up")
	st := h.waitState(StateRunning, 5*time.Second)
	if err := h.app.Kill(context.Background()); err != nil {
		t.Fatalf("Kill() error: %v", err)
	}
	if got := h.app.Status(); got.State != StateKilled || got.PID != 0 {
		t.Errorf("after Kill: %+v, want killed with no pid", got)
	}
	if alive(st.PID) {
		t.Errorf("pid %d still alive after Kill", st.PID)
	}
	if !slices.Equal(order, []string{"deregister"}) {
		t.Errorf("hooks = %v, want deregister", order)
	}
	if err := h.app.Restart(context.Background()); !errors.Is(err, ErrKilled) {
		t.Errorf("Restart() after Kill = %v, want ErrKilled", err)
	}
	if err := h.app.Kill(context.Background()); err != nil {
		t.Errorf("second Kill() = %v, want nil", err)
	}
}

func TestKillWithoutDeregisterCanRestart(t *testing.T) {
	t.Parallel()
	h := start(t, Spec{}, Options{}, "-say", "up")
	h.waitState(StateRunning, 5*time.Second)
	if err := h.app.Kill(context.Background()); err != nil {
		t.Fatalf("Kill() error: %v", err)
	}
	if last := h.health.Last(); last != "critical: killed by sidecar kill" {
		t.Errorf("last override = %q, want critical: killed by sidecar kill", last)
	}
	if err := h.app.Restart(context.Background()); err != nil {
		t.Fatalf("Restart() after Kill error: %v", err)
	}
	if st := h.app.Status(); st.State != StateRunning {
		t.Errorf("after Restart: %s, want running", st.State)
	}
}

func TestUpdate(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	h := start(t, Spec{Dir: dir, Build: `echo compiling; test -f ok || { echo "missing ok" >&2; exit 3; }`}, Options{}, "-say", "up")
	st := h.waitState(StateRunning, 5*time.Second)

	out, err := h.app.Update(context.Background())
	if !errors.Is(err, ErrBuild) || !strings.Contains(string(out), "compiling\nmissing ok\n") {
		t.Fatalf("Update() = %q, %v; want the build output and ErrBuild", out, err)
	}
	if got := h.app.Status(); got.PID != st.PID || got.Restarts != 0 {
		t.Errorf("after a failed build: pid %d, %d restarts; want pid %d untouched", got.PID, got.Restarts, st.PID)
	}

	if err := os.WriteFile(filepath.Join(dir, "ok"), nil, 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := h.app.Update(context.Background()); err != nil {
		t.Fatalf("Update() error: %v", err)
	}
	if got := h.app.Status(); got.PID == st.PID || got.Restarts != 1 {
		t.Errorf("after a good build: pid %d, %d restarts; want a new pid", got.PID, got.Restarts)
	}
}

func TestBusy(t *testing.T) {
	t.Parallel()
	h := start(t, Spec{}, Options{Drain: 500 * time.Millisecond}, "-say", "up")
	h.waitState(StateRunning, 5*time.Second)
	errc := make(chan error, 1)
	go func() { errc <- h.app.Restart(context.Background()) }()
	poll(t, time.Second, "the restart to hold the check", func() bool {
		return h.health.Last() == "critical: restarting (sidecar restart)"
	})
	if err := h.app.Restart(context.Background()); !errors.Is(err, ErrBusy) {
		t.Errorf("concurrent Restart() = %v, want ErrBusy", err)
	}
	if err := <-errc; err != nil {
		t.Errorf("Restart() error: %v", err)
	}
}

func TestCanceledRestartLeavesAppAlone(t *testing.T) {
	t.Parallel()
	h := start(t, Spec{}, Options{Drain: time.Second}, "-say", "up")
	st := h.waitState(StateRunning, 5*time.Second)
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	if err := h.app.Restart(ctx); !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("Restart() = %v, want a deadline error", err)
	}
	if got := h.app.Status(); got.PID != st.PID {
		t.Errorf("pid = %d, want %d untouched", got.PID, st.PID)
	}
	if last := h.health.Last(); last != "clear" {
		t.Errorf("last override = %q, want the hold lifted", last)
	}
}

func TestEnvAndDir(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	h2 := newHarness(t, Spec{Command: "/bin/sh", Args: []string{"-c", `echo "$GREETING in $(pwd)"`},
		Env: []string{"GREETING=hi there"}, Dir: dir, Restart: RestartNever}, Options{})
	h2.run()
	h2.waitState(StateExited, 5*time.Second)
	if got, want := h2.out.String(), "[app] hi there in "+dir+"\n"; got != want {
		t.Errorf("output = %q, want %q", got, want)
	}
}
