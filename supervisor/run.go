package supervisor

import (
	"context"
	"fmt"
	"runtime"
	"time"

	"go.uber.org/zap"
)

// op is a control request to Run.
type op struct {
	kind opKind
	done chan error // buffered; Run answers once
}

type opKind int

const (
	opRestart opKind = iota // stop the app if it runs, then start it at once
	opKill                  // stop the app and keep it stopped
)

// Run starts the app and keeps it running by policy until ctx ends; then it
// stops the app (stop signal, SIGKILL after the stop timeout) and returns
// once the process has been reaped. Run must be called at most once.
//
// Run keeps its goroutine on one OS thread for its whole life, and starts
// every process from it: the kernel sends the parent-death signal when the
// thread that forked the app exits, which then happens only with the
// sidecar, after Run has stopped the app.
func (a *App) Run(ctx context.Context) {
	if !a.running.CompareAndSwap(false, true) {
		a.log.Error("run called twice")
		return
	}
	defer close(a.done)
	runtime.LockOSThread() // never unlocked: the thread ends with Run
	if a.output != nil {
		defer a.output.Close()
	}
	l := &loop{a: a, restart: time.NewTimer(time.Hour)}
	l.restart.Stop()
	defer l.restart.Stop()
	var memC <-chan time.Time
	if a.spec.MemoryLimit > 0 {
		t := time.NewTicker(a.opts.MemoryInterval)
		defer t.Stop()
		memC = t.C
	}
	_ = l.start()
	for {
		var exits <-chan exit
		if l.proc != nil {
			exits = l.proc.done
		}
		select {
		case <-ctx.Done():
			l.shutdown()
			return
		case ex := <-exits:
			l.onExit(ex)
		case <-l.restart.C:
			_ = l.start()
		case <-memC:
			l.checkMemory()
		case o := <-a.ops:
			l.onOp(o)
		}
	}
}

// loop is the state of one Run, owned by its goroutine.
type loop struct {
	a       *App
	proc    *process    // the running process, or nil
	starts  int         // start attempts, successful or not
	attempt int         // consecutive automatic restarts, for the backoff
	history []time.Time // automatic restarts, for crash-loop detection
	restart *time.Timer // armed while in backoff
	pending *op         // answered once the stopping process has exited
	killed  bool
}

// start starts the app and lifts the hold on the check, unless a control
// method holds it. A failed start counts as a failed exit.
func (l *loop) start() error {
	a := l.a
	l.starts++
	p, err := a.startProcess()
	if err != nil {
		a.update(func(st *Status) { st.Restarts = l.starts - 1 })
		a.log.Error("app failed to start", zap.String("command", a.spec.Command), zap.Error(err))
		l.afterExit(0, "start failed: "+err.Error(), true)
		return fmt.Errorf("start %s: %w", a.spec.Command, err)
	}
	l.proc = p
	a.mu.Lock()
	a.pgid = p.pid
	a.st.State, a.st.PID, a.st.StartedAt = StateRunning, p.pid, p.started
	a.st.Restarts, a.st.Reason, a.st.NextStart = l.starts-1, "", time.Time{}
	held := a.held
	a.mu.Unlock()
	if !held {
		a.health.ClearOverride()
	}
	a.log.Info("app started", zap.Int("pid", p.pid), zap.String("command", a.spec.Command), zap.Int("restarts", l.starts-1))
	return nil
}

func (l *loop) onExit(ex exit) {
	a := l.a
	p := l.proc
	l.proc = nil
	ran := ex.at.Sub(p.started)
	desc := ex.describe()
	a.mu.Lock()
	a.pgid = 0
	a.st.PID, a.st.LastExit, a.st.LastExitAt = 0, desc, ex.at
	a.mu.Unlock()
	fields := []zap.Field{zap.Int("pid", p.pid), zap.Int("exit_code", ex.code()), zap.String("exit", desc), zap.Duration("ran", ran)}

	if o := l.pending; o != nil {
		a.log.Info("app stopped", fields...)
		if o.kind == opKill {
			l.pending = nil
			a.update(func(st *Status) { st.State, st.Reason = StateKilled, "killed by sidecar kill" })
			o.done <- nil
			return
		}
		l.startFor(o)
		return
	}
	failed := !ex.success() || p.reason != ""
	if p.reason != "" {
		desc = p.reason + " (" + desc + ")"
	}
	if failed {
		a.log.Warn("app exited", fields...)
	} else {
		a.log.Info("app exited", fields...)
	}
	l.afterExit(ran, desc, failed)
}

// afterExit fails the check and restarts the app by policy, with backoff,
// unless it is in a crash loop.
func (l *loop) afterExit(ran time.Duration, desc string, failed bool) {
	a := l.a
	s := &a.spec
	now := a.opts.Now()
	reason := "app exited: " + desc
	a.health.SetOverride(critical, reason)
	if l.killed {
		a.update(func(st *Status) { st.State, st.Reason = StateKilled, reason })
		return
	}
	if s.Restart == RestartNever || (s.Restart == RestartOnFailure && !failed) {
		a.update(func(st *Status) { st.State, st.Reason = StateExited, reason+"; restart policy "+s.Restart })
		a.log.Info("not restarting app", zap.String("policy", s.Restart))
		return
	}
	if ran >= s.BackoffMax {
		l.attempt = 0
	}
	kept := l.history[:0]
	for _, t := range l.history {
		if now.Sub(t) < s.CrashLoopWindow {
			kept = append(kept, t)
		}
	}
	l.history = kept
	if s.CrashLoopRestarts > 0 && len(l.history) >= s.CrashLoopRestarts {
		reason = fmt.Sprintf("crash loop: %d restarts within %s, not restarting (sidecar restart tries again); last: %s",
			len(l.history), s.CrashLoopWindow, desc)
		a.health.SetOverride(critical, reason)
		a.update(func(st *Status) { st.State, st.Reason = StateCrashLoop, reason })
		a.log.Error("app in crash loop, not restarting", zap.Int("restarts", len(l.history)),
			zap.Duration("window", s.CrashLoopWindow), zap.String("exit", desc))
		return
	}
	l.attempt++
	delay := a.backoff(l.attempt)
	l.history = append(l.history, now)
	a.update(func(st *Status) { st.State, st.Reason, st.NextStart = StateBackoff, reason, now.Add(delay) })
	a.log.Info("restarting app", zap.Int("attempt", l.attempt), zap.Duration("delay", delay))
	l.restart.Reset(delay)
}

func (l *loop) onOp(o *op) {
	a := l.a
	if old := l.pending; old != nil {
		old.done <- ErrBusy // its caller gave up waiting
		l.pending = nil
	}
	l.restart.Stop()
	switch o.kind {
	case opRestart:
		l.killed = false
		if l.proc != nil {
			l.pending = o
			l.stop("restart")
			return
		}
		l.startFor(o)
	case opKill:
		l.killed = true
		if l.proc != nil {
			l.pending = o
			l.stop("kill")
			return
		}
		a.update(func(st *Status) {
			st.State, st.Reason, st.NextStart = StateKilled, "killed by sidecar kill", time.Time{}
		})
		o.done <- nil
	}
}

// startFor starts the app for a restart asked for by o, afresh: the backoff
// and the crash-loop count start over, and the hold on the check is lifted.
func (l *loop) startFor(o *op) {
	l.pending = nil
	l.attempt, l.history = 0, nil
	l.a.mu.Lock()
	l.a.held = false
	l.a.mu.Unlock()
	o.done <- l.start()
}

// stop asks the running app to stop.
func (l *loop) stop(why string) {
	a := l.a
	p := l.proc
	if !p.stop(a.spec.StopSignal, a.spec.StopTimeout, func() {
		a.log.Warn("app did not stop in time, killing it", zap.Int("pid", p.pid), zap.Duration("stop_timeout", a.spec.StopTimeout))
	}) {
		return
	}
	a.update(func(st *Status) { st.State = StateStopping })
	a.log.Info("stopping app", zap.Int("pid", p.pid), zap.String("signal", a.spec.StopSignal.String()), zap.String("why", why))
}

// checkMemory stops the app when its RSS is over the limit.
func (l *loop) checkMemory() {
	a := l.a
	p := l.proc
	if p == nil || p.isStopping() {
		return
	}
	rss, err := groupRSS(p.pid)
	if err != nil || rss <= a.spec.MemoryLimit {
		return
	}
	p.reason = fmt.Sprintf("memory limit exceeded: RSS %s > %s", FormatBytes(rss), FormatBytes(a.spec.MemoryLimit))
	a.health.SetOverride(critical, "app "+p.reason)
	a.log.Warn("app over memory limit", zap.Int("pid", p.pid), zap.Int64("rss", rss), zap.Int64("limit", a.spec.MemoryLimit))
	l.stop("memory limit")
}

// shutdown stops the app for good and waits for it.
func (l *loop) shutdown() {
	a := l.a
	l.restart.Stop()
	if p := l.proc; p != nil {
		l.stop("sidecar stopping")
		ex := <-p.done
		l.proc = nil
		a.log.Info("app stopped", zap.Int("pid", p.pid), zap.Int("exit_code", ex.code()), zap.String("exit", ex.describe()))
		a.mu.Lock()
		a.pgid = 0
		a.st.PID, a.st.LastExit, a.st.LastExitAt = 0, ex.describe(), ex.at
		a.mu.Unlock()
	}
	a.update(func(st *Status) { st.State, st.Reason, st.NextStart = StateStopped, "sidecar stopped", time.Time{} })
	if o := l.pending; o != nil {
		o.done <- ErrStopped
		l.pending = nil
	}
}

// sleep waits for d or until ctx ends.
func sleep(ctx context.Context, d time.Duration) error {
	if d <= 0 {
		return ctx.Err()
	}
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}
