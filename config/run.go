package config

import (
	"fmt"
	"maps"
	"math"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"time"
)

// Restart policies of service.run.restart.
const (
	RestartAlways    = "always"
	RestartOnFailure = "on-failure"
	RestartNever     = "never"
)

var (
	restartPolicies = []string{RestartAlways, RestartOnFailure, RestartNever}
	stopSignals     = []string{"SIGTERM", "SIGINT", "SIGQUIT", "SIGHUP", "SIGUSR1", "SIGUSR2", "SIGKILL"}
)

// Run is the app the sidecar starts and supervises (service.run). With a
// run block the instance is registered only once the app has started and
// its probe passes, fails its check the moment the app exits, and is
// deregistered and drained before the app is stopped on shutdown.
type Run struct {
	// Command is the executable: a path (relative to Dir when it holds a
	// slash) or a name looked up in PATH; with Chroot, an absolute path
	// inside it. Required, unless given on the command line with
	// `sidecar run -- CMD ARGS…`, which overrides Command and Args.
	Command string   `yaml:"command"`
	Args    []string `yaml:"args"`
	// Env is added to the sidecar's environment. "${VAR}" and "$VAR" in a
	// value expand from the sidecar's environment (unset: empty); "$$" is a
	// literal "$".
	Env map[string]string `yaml:"env"`
	// Dir is the working directory; inside Chroot when that is set.
	// Default: the sidecar's own, or "/" in a chroot.
	Dir string `yaml:"dir"`
	// Restart is always (the default), on-failure (unless the app exited 0
	// on its own) or never.
	Restart   string    `yaml:"restart"`
	Backoff   Backoff   `yaml:"backoff"`
	CrashLoop CrashLoop `yaml:"crash_loop"`
	// MemoryLimit is the RSS of the app's process group above which it is
	// stopped and restarted by policy: bytes, or a number with a unit:
	// K, M, G, T or KiB, MiB, GiB, TiB (powers of 1024); KB, MB, GB, TB
	// (powers of 1000). Default "" or "0": no limit.
	MemoryLimit string `yaml:"memory_limit"`
	// MemoryLimitBytes is MemoryLimit resolved by Load; 0 means no limit.
	MemoryLimitBytes int64 `yaml:"-"`
	// StopSignal asks the app to stop: SIGTERM (default), SIGINT, SIGQUIT,
	// SIGHUP, SIGUSR1, SIGUSR2 or SIGKILL; "TERM" and "term" work too. Load
	// normalises it to the SIG form.
	StopSignal string `yaml:"stop_signal"`
	// StopTimeout is how long the app may take to exit after StopSignal
	// before SIGKILL. Default 10s.
	StopTimeout time.Duration `yaml:"stop_timeout"`
	// Chroot, if set, is the app's root directory (an absolute path). Linux
	// only; the sidecar must run as root.
	Chroot string `yaml:"chroot"`
	// User, if set, is the user name or uid the app and the build run as.
	// Needs root.
	User string `yaml:"user"`
	// Build is the shell command `sidecar update` runs in Dir before a
	// rolling restart, e.g. "go build -o app .". Default "": update refuses.
	Build string `yaml:"build"`
	// Output, if set, is a file the app's output lines are appended to,
	// instead of the sidecar's stdout and stderr.
	Output string `yaml:"output"`
}

// Backoff is the delay before each consecutive restart: Min doubling up to
// Max, with ±20% jitter. It starts over once the app has run for Max.
type Backoff struct {
	Min time.Duration `yaml:"min"` // default 1s
	Max time.Duration `yaml:"max"` // default 30s, at least min
}

// CrashLoop: after Restarts restarts within Window the app is left stopped,
// its check critical, until `sidecar restart`.
type CrashLoop struct {
	Restarts int           `yaml:"restarts"` // default 5; 0 turns detection off
	Window   time.Duration `yaml:"window"`   // default 1m
}

// setDefaults is called by the decoder on a freshly allocated Run.
func (r *Run) setDefaults() {
	*r = Run{
		Restart:     RestartAlways,
		Backoff:     Backoff{Min: time.Second, Max: 30 * time.Second},
		CrashLoop:   CrashLoop{Restarts: 5, Window: time.Minute},
		StopSignal:  "SIGTERM",
		StopTimeout: 10 * time.Second,
	}
}

// DefaultRun returns a run block with every default and no command, for
// `sidecar run -- CMD` with a file that has none.
func DefaultRun() *Run {
	r := new(Run)
	r.setDefaults()
	return r
}

// resolveRun expands Env, parses MemoryLimit and normalises StopSignal.
func (p *parser) resolveRun(r *Run, getenv func(string) string) {
	// The file-wide expansion skips env's values (see expandScalar): they
	// expand here, once, with $NAME too and unset variables empty.
	lookup := func(k string) (string, bool) { return getenv(k), true }
	for k, v := range r.Env {
		r.Env[k], _, _ = expandEnv(v, lookup, true)
	}
	if n, err := ParseBytes(r.MemoryLimit); err != nil {
		p.errorf("service.run.memory_limit", "%v", err)
	} else {
		r.MemoryLimitBytes = n
	}
	if s := strings.ToUpper(strings.TrimSpace(r.StopSignal)); s != "" && !strings.HasPrefix(s, "SIG") {
		r.StopSignal = "SIG" + s
	} else {
		r.StopSignal = s
	}
}

func (p *parser) validateRun(r *Run) {
	const path = "service.run"
	if p.present(path+".command") && r.Command == "" {
		p.errorf(path+".command", "must not be empty")
	}
	p.oneOf(path+".restart", r.Restart, restartPolicies)
	p.positive(path+".backoff.min", r.Backoff.Min)
	if r.Backoff.Max < r.Backoff.Min {
		p.errorf(path+".backoff.max", "must be at least backoff.min (%s), got %s", r.Backoff.Min, r.Backoff.Max)
	}
	if r.CrashLoop.Restarts < 0 {
		p.errorf(path+".crash_loop.restarts", "must be at least 0 (0 turns crash-loop detection off), got %d", r.CrashLoop.Restarts)
	}
	p.positive(path+".crash_loop.window", r.CrashLoop.Window)
	if r.MemoryLimitBytes > 0 && r.MemoryLimitBytes < 1<<20 {
		p.errorf(path+".memory_limit", "must be at least 1MiB, got %q", r.MemoryLimit)
	}
	if !slices.Contains(stopSignals, r.StopSignal) {
		p.errorf(path+".stop_signal", "unknown signal %q (want %s)", r.StopSignal, orList(stopSignals))
	}
	p.positive(path+".stop_timeout", r.StopTimeout)
	if r.Chroot != "" {
		if !filepath.IsAbs(r.Chroot) {
			p.errorf(path+".chroot", "must be an absolute path, got %q", r.Chroot)
		}
		if r.Command != "" && !filepath.IsAbs(r.Command) {
			p.errorf(path+".command", "must be an absolute path inside the chroot, got %q", r.Command)
		}
		if r.Dir != "" && !filepath.IsAbs(r.Dir) {
			p.errorf(path+".dir", "must be an absolute path inside the chroot, got %q", r.Dir)
		}
	}
	for _, k := range slices.Sorted(maps.Keys(r.Env)) {
		if !validEnvName(k) {
			p.errorf(child(path+".env", k), "invalid variable name: use letters, digits and '_', not starting with a digit")
		}
	}
}

func validEnvName(s string) bool {
	for i, r := range s {
		if !(r == '_' || r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || i > 0 && r >= '0' && r <= '9') {
			return false
		}
	}
	return s != ""
}

// ParseBytes parses a size: bytes ("268435456"), or a number with a unit,
// where K, M, G, T, KiB, MiB, GiB and TiB are powers of 1024 and KB, MB, GB
// and TB powers of 1000; "B" alone is bytes. Units are case-insensitive and
// may follow a space. "" is 0.
func ParseBytes(s string) (int64, error) {
	s = strings.TrimSpace(s)
	if s == "" {
		return 0, nil
	}
	i := strings.IndexFunc(s, func(r rune) bool { return !(r >= '0' && r <= '9' || r == '.') })
	num, unit := s, ""
	if i >= 0 {
		num, unit = s[:i], strings.ToLower(strings.TrimSpace(s[i:]))
	}
	if num == "" {
		return 0, fmt.Errorf("invalid size %q (want e.g. 512MiB, 512M, 1GB or a number of bytes)", s)
	}
	mult, ok := map[string]float64{
		"": 1, "b": 1,
		"k": 1 << 10, "kib": 1 << 10, "kb": 1e3,
		"m": 1 << 20, "mib": 1 << 20, "mb": 1e6,
		"g": 1 << 30, "gib": 1 << 30, "gb": 1e9,
		"t": 1 << 40, "tib": 1 << 40, "tb": 1e12,
	}[unit]
	if !ok {
		return 0, fmt.Errorf("unknown unit in %q (want e.g. 512MiB, 512M, 1GB or a number of bytes)", s)
	}
	v, err := strconv.ParseFloat(num, 64)
	if err != nil {
		return 0, fmt.Errorf("invalid size %q (want e.g. 512MiB, 512M, 1GB or a number of bytes)", s)
	}
	b := v * mult
	if b >= math.MaxInt64 {
		return 0, fmt.Errorf("size %q too large", s)
	}
	return int64(b), nil
}
