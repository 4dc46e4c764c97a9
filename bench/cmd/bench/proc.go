package main

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"
)

// proc is a process the harness started. Every one is stopped by its PID:
// SIGTERM, then SIGKILL if it has not exited after a grace period.
type proc struct {
	name    string
	cmd     *exec.Cmd
	logPath string
	exited  chan struct{}
	// children reports extra PIDs that belong to it (nginx workers).
	children func(pid int) []int
}

// procs tracks everything started, so Ctrl-C or a failure stops it all.
type procs struct {
	mu   sync.Mutex
	list []*proc
}

// startOpts say how to start a process.
type startOpts struct {
	cpu int      // pin to this CPU with taskset; -1 leaves it unpinned
	env []string // added to the environment
}

func (ps *procs) start(dir, name string, o startOpts, argv ...string) (*proc, error) {
	if o.cpu >= 0 {
		argv = append([]string{tasksetPath, "-c", strconv.Itoa(o.cpu)}, argv...)
	}
	logPath := filepath.Join(dir, name+".log")
	logf, err := os.Create(logPath)
	if err != nil {
		return nil, err
	}
	defer logf.Close()
	cmd := exec.Command(argv[0], argv[1:]...)
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.Env = append(os.Environ(), o.env...)
	// Its own process group keeps a terminal's Ctrl-C away from it (the
	// harness stops it), and it dies with the harness if that is killed.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("start %s: %w", name, err)
	}
	p := &proc{name: name, cmd: cmd, logPath: logPath, exited: make(chan struct{})}
	go func() { _ = cmd.Wait(); close(p.exited) }()
	ps.mu.Lock()
	ps.list = append(ps.list, p)
	ps.mu.Unlock()
	return p, nil
}

// stopAll stops every process, the last started first.
func (ps *procs) stopAll() {
	ps.mu.Lock()
	list := ps.list
	ps.list = nil
	ps.mu.Unlock()
	for i := len(list) - 1; i >= 0; i-- {
		list[i].stop()
	}
}

func (p *proc) pid() int { return p.cmd.Process.Pid }

// pids is the process and its children, for CPU and memory accounting.
func (p *proc) pids() []int {
	out := []int{p.pid()}
	if p.children != nil {
		out = append(out, p.children(p.pid())...)
	}
	return out
}

func (p *proc) alive() bool {
	select {
	case <-p.exited:
		return false
	default:
		return true
	}
}

// stop sends SIGTERM to the PID (and to the children it knows of), then
// SIGKILL after 5s.
func (p *proc) stop() {
	if !p.alive() {
		return
	}
	kids := []int(nil)
	if p.children != nil {
		kids = p.children(p.pid())
	}
	_ = syscall.Kill(p.pid(), syscall.SIGTERM)
	select {
	case <-p.exited:
	case <-time.After(5 * time.Second):
		_ = syscall.Kill(p.pid(), syscall.SIGKILL)
		<-p.exited
	}
	for _, k := range kids {
		if pidAlive(k) {
			_ = syscall.Kill(k, syscall.SIGKILL)
		}
	}
}

// logTail returns the last few lines the process printed.
func (p *proc) logTail() string {
	b, _ := os.ReadFile(p.logPath)
	lines := strings.Split(strings.TrimSpace(string(b)), "\n")
	if len(lines) > 8 {
		lines = lines[len(lines)-8:]
	}
	return strings.Join(lines, "\n")
}

func pidAlive(pid int) bool {
	_, err := os.Stat("/proc/" + strconv.Itoa(pid))
	return err == nil
}

// childrenOf lists the PIDs whose parent is pid.
func childrenOf(pid int) []int {
	ents, _ := os.ReadDir("/proc")
	var out []int
	for _, e := range ents {
		n, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		st, err := readStat(n)
		if err == nil && st.ppid == pid {
			out = append(out, n)
		}
	}
	return out
}

// stat is what the harness reads from /proc/PID/stat.
type stat struct {
	ppid         int
	utime, stime int64 // clock ticks
}

func readStat(pid int) (stat, error) {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return stat{}, err
	}
	i := bytes.LastIndexByte(b, ')')
	if i < 0 {
		return stat{}, errors.New("malformed stat")
	}
	f := strings.Fields(string(b[i+1:]))
	if len(f) < 13 {
		return stat{}, errors.New("malformed stat")
	}
	// f[0] is field 3 (state): ppid is field 4, utime 14, stime 15.
	var s stat
	s.ppid, _ = strconv.Atoi(f[1])
	s.utime, _ = strconv.ParseInt(f[11], 10, 64)
	s.stime, _ = strconv.ParseInt(f[12], 10, 64)
	return s, nil
}

// cpuTicks is utime+stime summed over pids.
func cpuTicks(pids []int) int64 {
	var t int64
	for _, pid := range pids {
		if s, err := readStat(pid); err == nil {
			t += s.utime + s.stime
		}
	}
	return t
}

// statusKB sums a "Vm…: N kB" field of /proc/PID/status over pids.
func statusKB(pids []int, field string) int64 {
	var total int64
	for _, pid := range pids {
		f, err := os.Open("/proc/" + strconv.Itoa(pid) + "/status")
		if err != nil {
			continue
		}
		sc := bufio.NewScanner(f)
		for sc.Scan() {
			line := sc.Text()
			if rest, ok := strings.CutPrefix(line, field+":"); ok {
				fs := strings.Fields(rest)
				if len(fs) > 0 {
					n, _ := strconv.ParseInt(fs[0], 10, 64)
					total += n
				}
				break
			}
		}
		f.Close()
	}
	return total
}

// resetPeakRSS sets VmHWM back to the current RSS (clear_refs 5), so the
// next read is the peak of one run only. It reports whether that worked.
func resetPeakRSS(pids []int) bool {
	ok := true
	for _, pid := range pids {
		if err := os.WriteFile("/proc/"+strconv.Itoa(pid)+"/clear_refs", []byte("5"), 0); err != nil {
			ok = false
		}
	}
	return ok
}

// clockTicks is USER_HZ, the unit of utime and stime.
func clockTicks() int64 {
	out, err := exec.Command("getconf", "CLK_TCK").Output()
	if err == nil {
		if n, err := strconv.ParseInt(strings.TrimSpace(string(out)), 10, 64); err == nil && n > 0 {
			return n
		}
	}
	return 100
}

func loadavg() string {
	b, err := os.ReadFile("/proc/loadavg")
	if err != nil {
		return "?"
	}
	f := strings.Fields(string(b))
	if len(f) < 3 {
		return "?"
	}
	return strings.Join(f[:3], " ")
}

// cpuSchedNS sums the nanoseconds every live thread of pids has run
// (/proc/PID/task/TID/schedstat, first field). It is exact where utime and
// stime are sampled on clock ticks, but it misses threads that have exited.
func cpuSchedNS(pids []int) int64 {
	var total int64
	for _, pid := range pids {
		dir := "/proc/" + strconv.Itoa(pid) + "/task"
		ents, err := os.ReadDir(dir)
		if err != nil {
			continue
		}
		for _, e := range ents {
			b, err := os.ReadFile(dir + "/" + e.Name() + "/schedstat")
			if err != nil {
				continue
			}
			f := strings.Fields(string(b))
			if len(f) > 0 {
				n, _ := strconv.ParseInt(f[0], 10, 64)
				total += n
			}
		}
	}
	return total
}
