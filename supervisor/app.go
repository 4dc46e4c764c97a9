// Package supervisor runs the app next to the sidecar and keeps it running:
// it starts the process, restarts it by policy with exponential backoff and
// jitter, gives up on a crash loop, stops it at a memory limit, and drives
// the instance's health check so that the registry follows the process.
//
// The package knows nothing of Consul. It drives the check through Health,
// which *heartbeat.Registrar satisfies, and calls two optional hooks of
// Options: Deregister when the app is killed, Ready after a rolling restart.
//
// # Lifecycle and the health check
//
// New puts the check on hold (critical, "starting"), so the instance never
// passes before the app has started; call it before the registrar runs. Each
// time the process starts, the hold is lifted and the probe decides. When
// the process exits, the check fails at once with the exit status as reason;
// a crash loop keeps it critical with a reason saying so.
//
// # Processes
//
// The app runs in its own process group with a parent-death signal of
// SIGKILL, so it dies with the sidecar even on kill -9. Stopping it sends the
// stop signal to the group, then SIGKILL after the stop timeout. When the
// app's main process exits, whatever is left of its group is killed before
// the process is reaped, so no child is orphaned and none becomes a zombie.
// Processes that leave the group (setsid, double fork) are not followed.
//
// RSS is the sum of VmRSS from /proc/PID/status over every process in the
// app's process group.
package supervisor

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/user"
	"path/filepath"
	"runtime"
	"strconv"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"go.uber.org/zap"

	"github.com/sidecarlb/sidecar/internal/backoff"
)

// Health is the instance's health check as the supervisor drives it.
// *heartbeat.Registrar satisfies it. Neither method may block; both must be
// safe for concurrent use.
type Health interface {
	// SetOverride forces the check to status ("critical" here) with reason.
	SetOverride(status, reason string)
	// ClearOverride hands the check back to the probe of the app.
	ClearOverride()
}

// critical is the check status the supervisor sets (Consul's spelling).
const critical = "critical"

// Restart policies.
const (
	RestartAlways    = "always"     // restart whatever the exit status
	RestartOnFailure = "on-failure" // restart unless the app exited 0 on its own
	RestartNever     = "never"      // never restart
)

// States of the app, as Status reports them.
const (
	StateStarting  = "starting"   // not started yet
	StateRunning   = "running"    // the process runs
	StateStopping  = "stopping"   // stop signal sent, waiting for the exit
	StateBackoff   = "backoff"    // exited; restarts at Status.NextStart
	StateExited    = "exited"     // exited and the policy says not to restart
	StateCrashLoop = "crash-loop" // restarted too often; not restarting
	StateKilled    = "killed"     // stopped by Kill
	StateStopped   = "stopped"    // stopped because Run's context ended
)

// Spec says what to run and how to keep it running. Zero values select the
// documented defaults.
type Spec struct {
	// Command is the executable: a path, relative to Dir when it has a
	// slash, or a name looked up in PATH. With Chroot it must be an absolute
	// path inside the new root. Required.
	Command string
	Args    []string
	// Env holds "KEY=VALUE" pairs added to the sidecar's environment; a key
	// given twice takes the later value.
	Env []string
	// Dir is the working directory, inside Chroot when that is set. If
	// empty, the sidecar's own (or "/" in a chroot).
	Dir string
	// Chroot, if set, is the root directory of the app. Linux only, and the
	// sidecar must run as root.
	Chroot string
	// User, if set, is the user name or numeric uid to run the app (and the
	// build) as, with its primary and supplementary groups. Needs root
	// unless it is the sidecar's own user.
	User string
	// Build is the shell command Update runs (with /bin/sh -c, in Dir; in a
	// chroot, in Chroot+Dir on the host), such as "go build -o app .".
	Build string
	// Output, if set, is a file the app's output is appended to instead of
	// the sidecar's stdout and stderr. It is opened by New.
	Output string

	// Restart is RestartAlways, RestartOnFailure or RestartNever. If empty,
	// RestartAlways is used.
	Restart string
	// BackoffMin is the delay before the first restart; each consecutive
	// restart doubles it, up to BackoffMax, with ±20% jitter. The count
	// starts over once the app has run for BackoffMax. If zero, 1s and 30s.
	BackoffMin, BackoffMax time.Duration
	// CrashLoopRestarts restarts within CrashLoopWindow make a crash loop:
	// the next exit is not followed by a restart. If zero, 5 in 1m; a
	// negative CrashLoopRestarts disables the detection.
	CrashLoopRestarts int
	CrashLoopWindow   time.Duration

	// MemoryLimit, if positive, is the RSS in bytes above which the app is
	// stopped (stop signal, then SIGKILL) and restarted by policy.
	MemoryLimit int64
	// StopSignal asks the app to stop; if zero, SIGTERM is used.
	StopSignal syscall.Signal
	// StopTimeout is how long the app may take to exit after StopSignal
	// before it gets SIGKILL. If zero, 10s is used.
	StopTimeout time.Duration
}

// Options tune a supervisor and carry its hooks. The zero value is fine.
type Options struct {
	// Drain is the wait between taking the instance out of rotation and
	// stopping the app, in Kill, Restart and Update. Zero means no wait.
	Drain time.Duration
	// Deregister, if set, removes the instance from the registry for good;
	// Kill calls it before stopping the app, and afterwards the app cannot
	// be started again. It may block until ctx ends.
	Deregister func(ctx context.Context) error
	// Register, if set with Deregister, puts the instance back in the
	// registry. Restart and Update then deregister the instance before the
	// drain and register it again once the new process has started (its
	// check critical until the probe passes); without it they only fail the
	// check. It must not block.
	Register func()
	// Ready, if set, blocks until the instance is registered and healthy, or
	// ctx ends. Restart and Update wait for it after starting the new
	// process, for at most ReadyTimeout.
	Ready func(ctx context.Context) error
	// ReadyTimeout bounds the wait for Ready. If zero, 1m is used.
	ReadyTimeout time.Duration
	// MemoryInterval is how often RSS is checked against the limit. If
	// zero, 1s is used.
	MemoryInterval time.Duration
	// Stdout and Stderr receive the app's output lines, each prefixed with
	// Prefix, when Spec.Output is empty. If nil, os.Stdout and os.Stderr.
	Stdout, Stderr io.Writer
	// Prefix tags each line of the app's output. If empty, "[app] ".
	Prefix string
	// Backoff, if set, replaces the delay before the nth consecutive
	// restart (n ≥ 1), for tests.
	Backoff func(n int) time.Duration
	// Now is the clock; if nil, time.Now is used.
	Now func() time.Time
}

// Errors of the control methods.
var (
	ErrBusy    = errors.New("another kill, restart or update is in progress")
	ErrKilled  = errors.New("the app was killed and its instance deregistered; restart the sidecar to run it again")
	ErrStopped = errors.New("the supervisor is not running")
	ErrNoBuild = errors.New("no build command is configured (service.run.build)")
)

// Status is a snapshot of the app, for the admin endpoint.
type Status struct {
	State   string `json:"state"`
	Command string `json:"command"`
	// PID of the running process; 0 when none runs.
	PID       int       `json:"pid,omitempty"`
	StartedAt time.Time `json:"started_at,omitzero"`
	// UptimeSeconds is how long the current process has run.
	UptimeSeconds float64 `json:"uptime_seconds,omitempty"`
	// Restarts counts every start after the first, automatic or asked for.
	Restarts int `json:"restarts"`
	// RSSBytes is the resident memory of the app's process group.
	RSSBytes    int64  `json:"rss_bytes,omitempty"`
	MemoryLimit int64  `json:"memory_limit_bytes,omitempty"`
	Policy      string `json:"restart_policy"`
	// LastExit describes the last exit ("exit status 1", "signal: killed").
	LastExit   string    `json:"last_exit,omitempty"`
	LastExitAt time.Time `json:"last_exit_at,omitzero"`
	// Reason says why the app is not running, or what is going on.
	Reason    string    `json:"reason,omitempty"`
	NextStart time.Time `json:"next_start,omitzero"`
}

// App supervises one app process. Its methods are safe for concurrent use.
type App struct {
	spec   Spec
	opts   Options
	health Health
	log    *zap.Logger
	cred   *syscall.Credential
	output *os.File // Spec.Output, or nil

	running atomic.Bool
	done    chan struct{} // closed when Run returns
	ops     chan *op      // control requests to Run
	opMu    sync.Mutex    // one Kill, Restart or Update at a time

	mu   sync.Mutex
	st   Status
	pgid int  // process group of the running app, for RSS
	held bool // a control method holds the check critical
	gone bool // deregistered by Kill
}

// New checks spec and returns a supervisor for it, holding health critical
// ("starting") until the app has started. It starts nothing until Run. A
// nil log discards.
func New(spec Spec, health Health, opts Options, log *zap.Logger) (*App, error) {
	if log == nil {
		log = zap.NewNop()
	}
	spec, opts = withDefaults(spec, opts)
	a := &App{
		spec:   spec,
		opts:   opts,
		health: health,
		log:    log,
		done:   make(chan struct{}),
		ops:    make(chan *op),
	}
	if err := a.check(); err != nil {
		return nil, err
	}
	if spec.Output != "" {
		f, err := os.OpenFile(spec.Output, os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o644)
		if err != nil {
			return nil, fmt.Errorf("output: %w", err)
		}
		a.output = f
	}
	a.st = Status{State: StateStarting, Command: spec.Command, Policy: spec.Restart, MemoryLimit: spec.MemoryLimit}
	health.SetOverride(critical, "starting")
	return a, nil
}

func withDefaults(s Spec, o Options) (Spec, Options) {
	def := func(d *time.Duration, v time.Duration) {
		if *d <= 0 {
			*d = v
		}
	}
	if s.Restart == "" {
		s.Restart = RestartAlways
	}
	def(&s.BackoffMin, time.Second)
	def(&s.BackoffMax, 30*time.Second)
	s.BackoffMax = max(s.BackoffMax, s.BackoffMin)
	if s.CrashLoopRestarts == 0 {
		s.CrashLoopRestarts = 5
	}
	def(&s.CrashLoopWindow, time.Minute)
	if s.StopSignal == 0 {
		s.StopSignal = syscall.SIGTERM
	}
	def(&s.StopTimeout, 10*time.Second)
	if s.Chroot != "" && s.Dir == "" {
		s.Dir = "/"
	}
	def(&o.ReadyTimeout, time.Minute)
	def(&o.MemoryInterval, time.Second)
	if o.Stdout == nil {
		o.Stdout = os.Stdout
	}
	if o.Stderr == nil {
		o.Stderr = os.Stderr
	}
	if o.Prefix == "" {
		o.Prefix = "[app] "
	}
	if o.Now == nil {
		o.Now = time.Now
	}
	return s, o
}

// check validates the spec against the system: the policy, the chroot, the
// user and the command.
func (a *App) check() error {
	s := &a.spec
	var errs []error
	switch s.Restart {
	case RestartAlways, RestartOnFailure, RestartNever:
	default:
		errs = append(errs, fmt.Errorf("restart: unknown policy %q (want always, on-failure or never)", s.Restart))
	}
	if s.Command == "" {
		return errors.Join(append(errs, errors.New("command: required"))...)
	}
	if s.Chroot != "" {
		if err := checkChroot(s); err != nil {
			errs = append(errs, err)
		}
	} else if err := checkCommand(s.Command, s.Dir); err != nil {
		errs = append(errs, err)
	}
	if s.User != "" {
		cred, err := lookupUser(s.User)
		if err != nil {
			errs = append(errs, err)
		}
		a.cred = cred
	}
	return errors.Join(errs...)
}

func checkChroot(s *Spec) error {
	if runtime.GOOS != "linux" {
		return fmt.Errorf("chroot: only supported on Linux, not %s", runtime.GOOS)
	}
	if uid := os.Geteuid(); uid != 0 {
		return fmt.Errorf("chroot: needs root, but the sidecar runs as uid %d", uid)
	}
	if fi, err := os.Stat(s.Chroot); err != nil {
		return fmt.Errorf("chroot: %w", err)
	} else if !fi.IsDir() {
		return fmt.Errorf("chroot: %s is not a directory", s.Chroot)
	}
	if !filepath.IsAbs(s.Command) {
		return fmt.Errorf("command: with chroot, must be an absolute path inside %s, got %q", s.Chroot, s.Command)
	}
	if err := executable(filepath.Join(s.Chroot, s.Command)); err != nil {
		return fmt.Errorf("command: %s inside chroot %s: %w", s.Command, s.Chroot, err)
	}
	return nil
}

// checkCommand reports a command that cannot be found or run.
func checkCommand(command, dir string) error {
	path := command
	switch {
	case filepath.Base(command) == command:
		// Looked up in PATH at each start, like exec.Command does.
		return nil
	case !filepath.IsAbs(command) && dir != "":
		path = filepath.Join(dir, command)
	}
	if err := executable(path); err != nil {
		return fmt.Errorf("command: %w", err)
	}
	return nil
}

func executable(path string) error {
	fi, err := os.Stat(path)
	switch {
	case err != nil:
		return err
	case fi.IsDir():
		return fmt.Errorf("%s is a directory", path)
	case fi.Mode()&0o111 == 0:
		return fmt.Errorf("%s is not executable", path)
	}
	return nil
}

// lookupUser resolves a user name or numeric uid to credentials.
func lookupUser(name string) (*syscall.Credential, error) {
	u, err := user.Lookup(name)
	if err != nil {
		if _, nerr := strconv.Atoi(name); nerr == nil {
			u, err = user.LookupId(name)
		}
	}
	if err != nil {
		return nil, fmt.Errorf("user: %w", err)
	}
	uid, err1 := strconv.ParseUint(u.Uid, 10, 32)
	gid, err2 := strconv.ParseUint(u.Gid, 10, 32)
	if err1 != nil || err2 != nil {
		return nil, fmt.Errorf("user: %s has a non-numeric uid or gid", name)
	}
	if euid := os.Geteuid(); euid != 0 && uint64(euid) != uid {
		return nil, fmt.Errorf("user: running as %s needs root, but the sidecar runs as uid %d", name, euid)
	}
	cred := &syscall.Credential{Uid: uint32(uid), Gid: uint32(gid)}
	if ids, err := u.GroupIds(); err == nil {
		for _, id := range ids {
			if g, err := strconv.ParseUint(id, 10, 32); err == nil {
				cred.Groups = append(cred.Groups, uint32(g))
			}
		}
	}
	return cred, nil
}

// Status returns a snapshot of the app, reading its RSS from /proc. It does
// not block.
func (a *App) Status() Status {
	a.mu.Lock()
	st, pgid := a.st, a.pgid
	a.mu.Unlock()
	if st.PID > 0 {
		st.UptimeSeconds = a.opts.Now().Sub(st.StartedAt).Seconds()
		if pgid > 0 {
			st.RSSBytes, _ = groupRSS(pgid)
		}
	}
	return st
}

func (a *App) update(f func(st *Status)) {
	a.mu.Lock()
	f(&a.st)
	a.mu.Unlock()
}

// backoff returns the delay before the nth consecutive restart (n ≥ 1):
// BackoffMin doubling up to BackoffMax, ±20%.
func (a *App) backoff(n int) time.Duration {
	if a.opts.Backoff != nil {
		return a.opts.Backoff(n)
	}
	b := backoff.Exponential{Base: a.spec.BackoffMin, Max: a.spec.BackoffMax, Jitter: 0.2}
	return min(b.Backoff(n), a.spec.BackoffMax)
}
