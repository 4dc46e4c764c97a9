// Package harness runs the real sidecar and example binaries as child
// processes for integration tests: built once per test binary, started on
// loopback ports, and stopped by PID when the test ends.
package harness

import (
	"context"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/sidecarlb/sidecar/test/consulagent"
)

var (
	buildOnce sync.Once
	binDir    string
	buildErr  error
)

// Binaries builds cmd/sidecar and examples/echo once per test process and
// returns the folder holding them. $SIDECAR_TEST_BIN names a folder holding
// them already (e.g. bin/ after make build, without the race detector, for
// figures of memory). With $SIDECAR_TEST_COVERDIR set, they are built with
// coverage of every package of the module, and the processes the tests start
// write their counters there when they exit (GOCOVERDIR), so integration
// coverage of cmd/sidecar, heartbeat, supervisor and config shows
// (`make cover`).
func Binaries(t testing.TB) string {
	t.Helper()
	buildOnce.Do(func() {
		if dir := os.Getenv("SIDECAR_TEST_BIN"); dir != "" {
			binDir = dir
			return
		}
		root := consulagent.RepoRoot(t)
		binDir, buildErr = os.MkdirTemp("", "sidecar-test-bin-")
		if buildErr != nil {
			return
		}
		args := []string{"build", "-race"}
		if coverDir() != "" {
			args = append(args, "-cover", "-coverpkg=github.com/sidecarlb/sidecar/...")
		}
		for pkg, name := range map[string]string{"./cmd/sidecar": "sidecar", "./examples/echo": "echo"} {
			cmd := exec.Command("go", append(args, "-o", filepath.Join(binDir, name), pkg)...)
			cmd.Dir = root
			if out, err := cmd.CombinedOutput(); err != nil {
				buildErr = fmt.Errorf("go build %s: %v\n%s", pkg, err, out)
				return
			}
		}
	})
	if buildErr != nil {
		t.Fatal(buildErr)
	}
	return binDir
}

// coverDir is where covered binaries write their counters, or "".
func coverDir() string { return os.Getenv("SIDECAR_TEST_COVERDIR") }

// Proc is a child process started by a test.
type Proc struct {
	t      testing.TB
	Name   string
	cmd    *exec.Cmd
	out    consulagent.LockedBuffer
	exited chan struct{}
	mu     sync.Mutex
	err    error // exit status, once exited
}

// Start starts a binary built by Binaries with args. The process is killed
// when the test ends, if still running.
func Start(t testing.TB, name string, args ...string) *Proc {
	t.Helper()
	p := &Proc{t: t, Name: name, exited: make(chan struct{})}
	bin := name // an absolute path, as SidecarNoRace returns, runs as is
	if !filepath.IsAbs(name) {
		bin = filepath.Join(Binaries(t), name)
	}
	p.cmd = exec.Command(bin, args...)
	p.cmd.Stdout = &p.out
	p.cmd.Stderr = &p.out
	if dir := coverDir(); dir != "" {
		p.cmd.Env = append(os.Environ(), "GOCOVERDIR="+dir)
	}
	p.cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := p.cmd.Start(); err != nil {
		t.Fatalf("start %s: %v", name, err)
	}
	go func() {
		err := p.cmd.Wait()
		p.mu.Lock()
		p.err = err
		p.mu.Unlock()
		close(p.exited)
	}()
	t.Cleanup(func() {
		p.Signal(syscall.SIGKILL)
		<-p.exited
		if t.Failed() {
			t.Logf("%s output:\n%s", name, p.Output())
		}
	})
	return p
}

var (
	noRaceOnce sync.Once
	noRaceBin  string
	noRaceErr  error
)

// SidecarNoRace returns the path of a sidecar built without the race
// detector, for the tests that run dozens of sidecars: $SIDECAR_TEST_BIN's
// when set, else one built once per test binary.
func SidecarNoRace(t testing.TB) string {
	t.Helper()
	noRaceOnce.Do(func() {
		if dir := os.Getenv("SIDECAR_TEST_BIN"); dir != "" {
			noRaceBin = filepath.Join(dir, "sidecar")
			return
		}
		root := consulagent.RepoRoot(t)
		dir, err := os.MkdirTemp("", "sidecar-test-norace-")
		if err != nil {
			noRaceErr = err
			return
		}
		noRaceBin = filepath.Join(dir, "sidecar")
		// The flags of make build, so that its compiled packages are reused.
		cmd := exec.Command("go", "build", "-trimpath", "-o", noRaceBin, "./cmd/sidecar")
		cmd.Dir = root
		cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
		if out, err := cmd.CombinedOutput(); err != nil {
			noRaceErr = fmt.Errorf("go build ./cmd/sidecar: %v\n%s", err, out)
		}
	})
	if noRaceErr != nil {
		t.Fatal(noRaceErr)
	}
	return noRaceBin
}

// StartSidecar writes cfg to a file and starts the sidecar with it. It waits
// until the admin listener (adminAddr) answers /healthz.
func StartSidecar(t testing.TB, adminAddr, cfg string) *Proc {
	t.Helper()
	return StartSidecarBin(t, "sidecar", adminAddr, cfg)
}

// StartSidecarBin is StartSidecar with the sidecar binary bin: a name that
// Binaries built, or an absolute path (see SidecarNoRace).
func StartSidecarBin(t testing.TB, bin, adminAddr, cfg string) *Proc {
	t.Helper()
	path := filepath.Join(t.TempDir(), "config.yaml")
	if err := os.WriteFile(path, []byte(cfg), 0o600); err != nil {
		t.Fatal(err)
	}
	p := Start(t, bin, "-config", path)
	p.WaitHTTP("http://"+adminAddr+"/healthz", 15*time.Second)
	return p
}

// StartEcho starts the example echo service on addr, named name, and waits
// until it answers.
func StartEcho(t testing.TB, addr, name string) *Proc {
	t.Helper()
	p := Start(t, "echo", "-listen", addr, "-name", name)
	p.WaitHTTP("http://"+addr+"/health", 10*time.Second)
	return p
}

// WaitHTTP waits until url answers 200, failing the test if the process
// exits or within passes first.
func (p *Proc) WaitHTTP(url string, within time.Duration) {
	p.t.Helper()
	deadline := time.Now().Add(within)
	client := &http.Client{Timeout: time.Second}
	for {
		select {
		case <-p.exited:
			p.t.Fatalf("%s exited while waiting for %s: %v\n%s", p.Name, url, p.ExitErr(), p.Output())
		default:
		}
		if resp, err := client.Get(url); err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return
			}
		}
		if time.Now().After(deadline) {
			p.t.Fatalf("%s: %s not ready after %v\n%s", p.Name, url, within, p.Output())
		}
		time.Sleep(25 * time.Millisecond)
	}
}

// Signal sends sig to the process (not its group).
func (p *Proc) Signal(sig syscall.Signal) { _ = p.cmd.Process.Signal(sig) }

// Pid is the process ID.
func (p *Proc) Pid() int { return p.cmd.Process.Pid }

// Wait waits for the process to exit, up to within, and returns its exit
// code (-1 when killed by a signal).
func (p *Proc) Wait(within time.Duration) int {
	p.t.Helper()
	select {
	case <-p.exited:
	case <-time.After(within):
		p.t.Fatalf("%s did not exit within %v\n%s", p.Name, within, p.Output())
	}
	return p.cmd.ProcessState.ExitCode()
}

// Exited is closed when the process has exited.
func (p *Proc) Exited() <-chan struct{} { return p.exited }

// ExitErr is the error cmd.Wait returned, once exited.
func (p *Proc) ExitErr() error {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.err
}

// Output is what the process printed so far.
func (p *Proc) Output() string { return p.out.String() }

// WaitOutput waits until the process has printed s.
func (p *Proc) WaitOutput(s string, within time.Duration) {
	p.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), within)
	defer cancel()
	for !strings.Contains(p.Output(), s) {
		select {
		case <-ctx.Done():
			p.t.Fatalf("%s did not print %q within %v\n%s", p.Name, s, within, p.Output())
		case <-time.After(20 * time.Millisecond):
		}
	}
}
