//go:build !linux

package supervisor

import (
	"errors"
	"os"
	"syscall"
	"time"
)

// errUnsupported: the supervisor needs Linux (process groups, the
// parent-death signal, /proc).
var errUnsupported = errors.New("running the app needs Linux")

type process struct {
	pid     int
	started time.Time
	done    chan exit
	reason  string
}

type exit struct {
	at    time.Time
	state *os.ProcessState
}

func (e exit) describe() string { return "unknown" }
func (e exit) code() int        { return -1 }
func (e exit) success() bool    { return false }

func (a *App) startProcess() (*process, error) { return nil, errUnsupported }

func (p *process) stop(syscall.Signal, time.Duration, func()) bool { return false }
func (p *process) isStopping() bool                                { return true }

func signalGroup(int, syscall.Signal) {}

func groupRSS(int) (int64, error) { return 0, errUnsupported }

func buildAttr(cred *syscall.Credential) *syscall.SysProcAttr {
	return &syscall.SysProcAttr{Setpgid: true, Credential: cred}
}
