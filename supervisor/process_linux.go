package supervisor

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"strconv"
	"sync"
	"syscall"
	"time"
	"unsafe"

	"go.uber.org/zap"
)

// process is one run of the app.
type process struct {
	cmd     *exec.Cmd
	pid     int
	started time.Time
	outs    []*lineWriter
	done    chan exit // receives once, after the process is reaped
	reason  string    // why the supervisor stopped it on its own; loop only

	mu        sync.Mutex
	dead      bool // the main process exited; its pid is not reaped yet
	stopping  bool
	killTimer *time.Timer
}

// exit is how a process ended.
type exit struct {
	at    time.Time
	state *os.ProcessState
	err   error
}

func (e exit) describe() string {
	if e.state != nil {
		return e.state.String()
	}
	if e.err != nil {
		return e.err.Error()
	}
	return "unknown"
}

func (e exit) code() int {
	if e.state != nil {
		return e.state.ExitCode()
	}
	return -1
}

func (e exit) success() bool { return e.state != nil && e.state.Success() }

// startProcess starts the app in its own process group, with SIGKILL as
// its parent-death signal.
func (a *App) startProcess() (*process, error) {
	s := &a.spec
	cmd := exec.Command(s.Command, s.Args...)
	if cmd.Err != nil {
		return nil, cmd.Err
	}
	cmd.Env = append(os.Environ(), s.Env...)
	cmd.Dir = s.Dir
	cmd.SysProcAttr = &syscall.SysProcAttr{
		Setpgid:    true,
		Pdeathsig:  syscall.SIGKILL,
		Chroot:     s.Chroot,
		Credential: a.cred,
	}
	outs := a.writers()
	cmd.Stdout, cmd.Stderr = outs[0], outs[1]
	// Output pipes held open by a process that left the group.
	cmd.WaitDelay = time.Second
	if err := cmd.Start(); err != nil {
		return nil, err
	}
	p := &process{
		cmd:     cmd,
		pid:     cmd.Process.Pid,
		started: a.opts.Now(),
		outs:    outs,
		done:    make(chan exit, 1),
	}
	go p.wait(a.log, a.opts.Now)
	return p, nil
}

// writers returns fresh line writers for the app's stdout and stderr.
func (a *App) writers() []*lineWriter {
	if a.output != nil {
		return []*lineWriter{newLineWriter(a.output, a.opts.Prefix), newLineWriter(a.output, a.opts.Prefix)}
	}
	return []*lineWriter{newLineWriter(a.opts.Stdout, a.opts.Prefix), newLineWriter(a.opts.Stderr, a.opts.Prefix)}
}

// wait waits for the main process to exit, kills what is left of its group
// while the pid is still reserved, then reaps it.
func (p *process) wait(log *zap.Logger, now func() time.Time) {
	var ex exit
	defer func() {
		if v := recover(); v != nil {
			log.Error("process waiter panicked", zap.Any("panic", v), zap.Stack("stack"))
			ex.err = fmt.Errorf("waiter panicked: %v", v)
		}
		p.done <- ex
	}()
	if err := waitExited(p.pid); err != nil {
		log.Warn("waitid failed", zap.Int("pid", p.pid), zap.Error(err))
	}
	ex.at = now()
	p.mu.Lock()
	p.dead = true
	if p.killTimer != nil {
		p.killTimer.Stop()
	}
	_ = syscall.Kill(-p.pid, syscall.SIGKILL)
	p.mu.Unlock()
	ex.err = p.cmd.Wait()
	ex.state = p.cmd.ProcessState
	for _, w := range p.outs {
		w.Flush()
	}
}

// stop sends sig to the process group, and SIGKILL after timeout, calling
// onKill first. It reports false when the process was already stopping or
// gone.
func (p *process) stop(sig syscall.Signal, timeout time.Duration, onKill func()) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.dead || p.stopping {
		return false
	}
	p.stopping = true
	signalGroup(p.pid, sig)
	p.killTimer = time.AfterFunc(timeout, func() {
		p.mu.Lock()
		defer p.mu.Unlock()
		if p.dead {
			return
		}
		onKill()
		signalGroup(p.pid, syscall.SIGKILL)
	})
	return true
}

func (p *process) isStopping() bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.stopping || p.dead
}

// signalGroup signals the process group pid leads, or the process alone if
// it has left its group.
func signalGroup(pid int, sig syscall.Signal) {
	if err := syscall.Kill(-pid, sig); errors.Is(err, syscall.ESRCH) {
		_ = syscall.Kill(pid, sig)
	}
}

// waitExited blocks until the child pid has exited, without reaping it
// (waitid with WNOWAIT), so its pid and process group stay reserved.
func waitExited(pid int) error {
	const pPID = 1     // idtype_t P_PID
	var info [128]byte // siginfo_t
	for {
		_, _, errno := syscall.Syscall6(syscall.SYS_WAITID, pPID, uintptr(pid),
			uintptr(unsafe.Pointer(&info[0])), syscall.WEXITED|syscall.WNOWAIT, 0, 0)
		switch errno {
		case 0:
			return nil
		case syscall.EINTR:
			continue
		default:
			return errno
		}
	}
}

// groupRSS sums VmRSS over the processes of group pgid.
func groupRSS(pgid int) (int64, error) {
	dir, err := os.Open("/proc")
	if err != nil {
		return 0, err
	}
	names, err := dir.Readdirnames(-1)
	dir.Close()
	if err != nil {
		return 0, err
	}
	var total int64
	found := false
	for _, name := range names {
		pid, err := strconv.Atoi(name)
		if err != nil {
			continue
		}
		if pid != pgid {
			if g, err := procGroup(pid); err != nil || g != pgid {
				continue
			}
		}
		rss, err := vmRSS(pid)
		if err != nil {
			continue
		}
		total += rss
		found = true
	}
	if !found {
		return 0, fmt.Errorf("process group %d: no processes", pgid)
	}
	return total, nil
}

// procGroup reads the process group of pid from /proc/PID/stat.
func procGroup(pid int) (int, error) {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return 0, err
	}
	// pid (comm) state ppid pgrp …; comm may hold spaces and parentheses.
	i := bytes.LastIndexByte(b, ')')
	if i < 0 {
		return 0, errors.New("malformed stat")
	}
	f := bytes.Fields(b[i+1:])
	if len(f) < 3 {
		return 0, errors.New("malformed stat")
	}
	return strconv.Atoi(string(f[2]))
}

// vmRSS reads VmRSS of pid, in bytes; 0 for a zombie.
func vmRSS(pid int) (int64, error) {
	f, err := os.Open("/proc/" + strconv.Itoa(pid) + "/status")
	if err != nil {
		return 0, err
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		line := sc.Bytes()
		if v, ok := bytes.CutPrefix(line, []byte("VmRSS:")); ok {
			kb, err := strconv.ParseInt(string(bytes.TrimSuffix(bytes.TrimSpace(v), []byte(" kB"))), 10, 64)
			if err != nil {
				return 0, fmt.Errorf("VmRSS %q: %w", v, err)
			}
			return kb << 10, nil
		}
	}
	return 0, sc.Err()
}

// buildAttr is how the build command runs: in its own process group, dying
// with the sidecar, as the app's user.
func buildAttr(cred *syscall.Credential) *syscall.SysProcAttr {
	return &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL, Credential: cred}
}
