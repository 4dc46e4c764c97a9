package supervisor

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"syscall"
	"time"

	"go.uber.org/zap"
)

// More errors of the control methods.
var (
	// ErrBuild wraps the failure of the build command.
	ErrBuild = errors.New("build failed")
	// ErrNotReady wraps a wait for Ready that ended first.
	ErrNotReady = errors.New("app not healthy after restart")
)

// maxBuildOutput caps the build output kept; the tail is kept.
const maxBuildOutput = 1 << 20

// Kill takes the instance out of the registry (the Deregister hook, or a
// critical check without one), waits Drain, then stops the app and keeps it
// stopped. Kill blocks until the app has exited or ctx ends; it returns
// ErrBusy while another Kill, Restart or Update runs. Killing a killed app
// does nothing.
func (a *App) Kill(ctx context.Context) error {
	if !a.opMu.TryLock() {
		return ErrBusy
	}
	defer a.opMu.Unlock()
	a.mu.Lock()
	if a.st.State == StateKilled {
		a.mu.Unlock()
		return nil
	}
	a.held = true
	a.mu.Unlock()
	a.health.SetOverride(critical, "killed by sidecar kill")
	a.log.Info("killing app", zap.Duration("drain", a.opts.Drain))
	var errs []error
	if a.opts.Deregister != nil {
		if err := a.opts.Deregister(ctx); err != nil {
			errs = append(errs, fmt.Errorf("deregister: %w", err))
		} else {
			a.mu.Lock()
			a.gone = true
			a.mu.Unlock()
		}
	}
	if err := sleep(ctx, a.opts.Drain); err != nil {
		return errors.Join(append(errs, err)...)
	}
	if _, err := a.send(ctx, opKill); err != nil {
		errs = append(errs, err)
	}
	return errors.Join(errs...)
}

// Restart restarts the app without losing requests: it takes the instance
// out of rotation (a critical check), waits Drain, stops the app, starts it
// again, and waits until the Ready hook says the instance is back. The
// backoff and the crash-loop count start over, so Restart also revives an
// app that exited or is in a crash loop. It blocks until then or ctx ends,
// and returns ErrBusy while another Kill, Restart or Update runs.
func (a *App) Restart(ctx context.Context) error {
	if !a.opMu.TryLock() {
		return ErrBusy
	}
	defer a.opMu.Unlock()
	return a.rollingRestart(ctx, "restart")
}

// Update runs the build command while the app keeps running; only when the
// build succeeds does it restart the app as Restart does. It returns the
// build's combined output (the last MiB) and, when the build fails, an
// error wrapping ErrBuild, leaving the app untouched.
func (a *App) Update(ctx context.Context) (output []byte, err error) {
	if !a.opMu.TryLock() {
		return nil, ErrBusy
	}
	defer a.opMu.Unlock()
	a.mu.Lock()
	gone := a.gone
	a.mu.Unlock()
	switch {
	case gone:
		return nil, ErrKilled
	case a.spec.Build == "":
		return nil, ErrNoBuild
	}
	start := time.Now()
	out, err := a.build(ctx)
	if err != nil {
		return out, fmt.Errorf("%w: %s: %w", ErrBuild, a.spec.Build, err)
	}
	a.log.Info("build succeeded", zap.String("build", a.spec.Build), zap.Duration("took", time.Since(start)))
	return out, a.rollingRestart(ctx, "update")
}

func (a *App) rollingRestart(ctx context.Context, why string) error {
	a.mu.Lock()
	if a.gone {
		a.mu.Unlock()
		return ErrKilled
	}
	a.held = true
	a.mu.Unlock()
	a.health.SetOverride(critical, "restarting (sidecar "+why+")")
	a.log.Info("rolling restart", zap.String("why", why), zap.Duration("drain", a.opts.Drain))
	// Out of the registry, not merely critical, while the app restarts.
	deregistered := false
	if a.opts.Register != nil && a.opts.Deregister != nil {
		if err := a.opts.Deregister(ctx); err != nil {
			a.log.Warn("deregister before restart failed; the check stays critical instead", zap.Error(err))
		} else {
			deregistered = true
		}
	}
	if err := sleep(ctx, a.opts.Drain); err != nil {
		if deregistered {
			a.opts.Register()
		}
		a.release()
		return err
	}
	sent, err := a.send(ctx, opRestart)
	if deregistered {
		a.opts.Register()
	}
	if !sent {
		a.release()
	}
	if err != nil || a.opts.Ready == nil {
		return err
	}
	rctx, cancel := context.WithTimeout(ctx, a.opts.ReadyTimeout)
	defer cancel()
	if err := a.opts.Ready(rctx); err != nil {
		return fmt.Errorf("%w: %w", ErrNotReady, err)
	}
	return nil
}

// release lifts the hold of a control method that gave up before Run took
// its request.
func (a *App) release() {
	a.mu.Lock()
	a.held = false
	running := a.st.State == StateRunning
	a.mu.Unlock()
	if running {
		a.health.ClearOverride()
	}
}

// send hands Run a request and waits for its answer. sent reports whether
// Run took the request.
func (a *App) send(ctx context.Context, kind opKind) (sent bool, err error) {
	o := &op{kind: kind, done: make(chan error, 1)}
	select {
	case a.ops <- o:
	case <-a.done:
		return false, ErrStopped
	case <-ctx.Done():
		return false, ctx.Err()
	}
	select {
	case err := <-o.done:
		return true, err
	case <-a.done:
		select {
		case err := <-o.done:
			return true, err
		default:
			return true, ErrStopped
		}
	case <-ctx.Done():
		return true, ctx.Err()
	}
}

// build runs the build command in its own process group, killed with it
// when ctx ends.
func (a *App) build(ctx context.Context) ([]byte, error) {
	dir := a.spec.Dir
	if a.spec.Chroot != "" {
		dir = filepath.Join(a.spec.Chroot, dir)
	}
	cmd := exec.CommandContext(ctx, "/bin/sh", "-c", a.spec.Build)
	cmd.Dir = dir
	cmd.Env = append(os.Environ(), a.spec.Env...)
	cmd.SysProcAttr = buildAttr(a.cred)
	cmd.Cancel = func() error {
		signalGroup(cmd.Process.Pid, syscall.SIGKILL)
		return nil
	}
	cmd.WaitDelay = time.Second
	out := &tailBuffer{max: maxBuildOutput}
	cmd.Stdout, cmd.Stderr = out, out
	err := cmd.Run()
	return out.Bytes(), err
}

// tailBuffer keeps the last max bytes written to it.
type tailBuffer struct {
	mu  sync.Mutex
	max int
	b   bytes.Buffer
}

func (t *tailBuffer) Write(p []byte) (int, error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.b.Write(p)
	if over := t.b.Len() - t.max; over > 0 {
		t.b.Next(over)
	}
	return len(p), nil
}

func (t *tailBuffer) Bytes() []byte {
	t.mu.Lock()
	defer t.mu.Unlock()
	return bytes.Clone(t.b.Bytes())
}
