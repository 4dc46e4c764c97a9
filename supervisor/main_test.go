package supervisor

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zaptest/observer"
)

// helper is the test app, built static (it also runs in a chroot).
var helper string

func TestMain(m *testing.M) {
	if os.Getenv("SUPERVISOR_TEST_NO_HELPER") != "" { // a test run as another user
		os.Exit(m.Run())
	}
	dir, err := os.MkdirTemp("", "supervisor-test-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	// Readable by the "nobody" user of TestUser.
	_ = os.Chmod(dir, 0o755)
	helper = filepath.Join(dir, "app")
	cmd := exec.Command("go", "build", "-o", helper, "./testdata/app")
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := cmd.CombinedOutput(); err != nil {
		fmt.Fprintf(os.Stderr, "build test app: %v\n%s", err, out)
		os.RemoveAll(dir)
		os.Exit(1)
	}
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

// fakeHealth records the overrides, one line each.
type fakeHealth struct {
	mu     sync.Mutex
	events []string
}

func (h *fakeHealth) SetOverride(status, reason string) {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.events = append(h.events, status+": "+reason)
}

func (h *fakeHealth) ClearOverride() {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.events = append(h.events, "clear")
}

func (h *fakeHealth) Events() []string {
	h.mu.Lock()
	defer h.mu.Unlock()
	return append([]string(nil), h.events...)
}

func (h *fakeHealth) Last() string {
	h.mu.Lock()
	defer h.mu.Unlock()
	if len(h.events) == 0 {
		return ""
	}
	return h.events[len(h.events)-1]
}

// syncBuffer is a bytes.Buffer safe for concurrent use.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// harness is one supervised helper app.
type harness struct {
	t      *testing.T
	app    *App
	health *fakeHealth
	logs   *observer.ObservedLogs
	out    *syncBuffer
	cancel context.CancelFunc
	done   chan struct{}
}

// start supervises the helper app with args; spec.Command and Args are set
// here. Run stops when the test ends.
func start(t *testing.T, spec Spec, opts Options, args ...string) *harness {
	t.Helper()
	spec.Command, spec.Args = helper, args
	h := newHarness(t, spec, opts)
	h.run()
	return h
}

func newHarness(t *testing.T, spec Spec, opts Options) *harness {
	t.Helper()
	core, logs := observer.New(zap.DebugLevel)
	out := &syncBuffer{}
	if opts.Stdout == nil {
		opts.Stdout, opts.Stderr = out, out
	}
	health := &fakeHealth{}
	app, err := New(spec, health, opts, zap.New(core))
	if err != nil {
		t.Fatalf("New() error: %v", err)
	}
	return &harness{t: t, app: app, health: health, logs: logs, out: out}
}

func (h *harness) run() {
	ctx, cancel := context.WithCancel(context.Background())
	h.cancel, h.done = cancel, make(chan struct{})
	go func() { defer close(h.done); h.app.Run(ctx) }()
	h.t.Cleanup(func() {
		h.stop()
		if h.t.Failed() {
			h.t.Logf("app output:\n%s", h.out.String())
			for _, e := range h.logs.All() {
				h.t.Logf("log: %s %s %v", e.Time.Format("15:04:05.000"), e.Message, e.ContextMap())
			}
		}
	})
}

// stop cancels Run and waits for it to return.
func (h *harness) stop() {
	h.cancel()
	select {
	case <-h.done:
	case <-time.After(15 * time.Second):
		h.t.Fatal("Run did not return within 15s")
	}
}

// waitState waits until the app is in state.
func (h *harness) waitState(state string, within time.Duration) Status {
	h.t.Helper()
	var st Status
	poll(h.t, within, "state "+state, func() bool { st = h.app.Status(); return st.State == state })
	return st
}

// poll calls cond every 5ms until it is true, failing the test after within.
func poll(t *testing.T, within time.Duration, what string, cond func() bool) time.Duration {
	t.Helper()
	start := time.Now()
	for !cond() {
		if time.Since(start) > within {
			t.Fatalf("timed out after %v waiting for %s", within, what)
		}
		time.Sleep(5 * time.Millisecond)
	}
	return time.Since(start)
}

// readStarts reads the start times and pids the helper app wrote to path.
func readStarts(t *testing.T, path string) (times []time.Time, pids []int) {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil && !os.IsNotExist(err) {
		t.Fatal(err)
	}
	for _, line := range strings.Split(strings.TrimSpace(string(b)), "\n") {
		f := strings.Fields(line)
		if len(f) != 2 {
			continue
		}
		ns, _ := strconv.ParseInt(f[0], 10, 64)
		pid, _ := strconv.Atoi(f[1])
		times = append(times, time.Unix(0, ns))
		pids = append(pids, pid)
	}
	return times, pids
}

// alive reports whether pid exists and is not a zombie.
func alive(pid int) bool {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return false
	}
	i := bytes.LastIndexByte(b, ')')
	return i < 0 || !bytes.HasPrefix(bytes.TrimSpace(b[i+1:]), []byte("Z"))
}

// zombieChildren lists the zombie children of this process.
func zombieChildren(t *testing.T) []int {
	t.Helper()
	names, err := filepath.Glob("/proc/[0-9]*/stat")
	if err != nil {
		t.Fatal(err)
	}
	self := os.Getpid()
	var zombies []int
	for _, name := range names {
		b, err := os.ReadFile(name)
		if err != nil {
			continue
		}
		i := bytes.LastIndexByte(b, ')')
		f := strings.Fields(string(b[i+1:]))
		if len(f) < 2 {
			continue
		}
		if ppid, _ := strconv.Atoi(f[1]); ppid == self && f[0] == "Z" {
			pid, _ := strconv.Atoi(strings.Fields(string(b))[0])
			zombies = append(zombies, pid)
		}
	}
	return zombies
}
