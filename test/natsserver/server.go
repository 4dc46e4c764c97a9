// Package natsserver starts a real nats-server with JetStream on a free
// loopback port and a store directory, for integration tests, and stops it
// by PID (Stop, or Kill like a crash); Start brings it back on the same port
// and store.
//
// The binary is found as $NATS_SERVER_BIN, then bin/nats-server at the
// repository root (built by `make nats`), then nats-server on PATH. When
// none exists the test fails with a message saying to run `make nats`; with
// -short it is skipped.
package natsserver

import (
	"errors"
	"fmt"
	"net"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/sidecarlb/sidecar/test/consulagent"
)

// Server is a running (or stopped) nats-server.
type Server struct {
	t      testing.TB
	bin    string
	Port   int
	Dir    string   // the JetStream store directory
	args   []string // cluster flags; none for a single server
	mu     sync.Mutex
	cmd    *exec.Cmd
	exited chan struct{}
	log    consulagent.LockedBuffer
}

// Binary returns the path of the nats-server binary tests use, or an error
// saying how to get one.
func Binary() (string, error) {
	return consulagent.FindBinary("NATS_SERVER_BIN", "nats-server", "nats")
}

// Start starts a nats-server with JetStream and waits until it accepts
// connections. It is stopped when the test ends.
func Start(t testing.TB) *Server {
	t.Helper()
	bin, err := Binary()
	if err != nil {
		if testing.Short() {
			t.Skip(err)
		}
		t.Fatal(err)
	}
	s := &Server{t: t, bin: bin, Dir: t.TempDir()}
	for attempt := 0; attempt < 3; attempt++ {
		s.Port = consulagent.FreePort(t)
		if err = s.start(); err == nil {
			break
		}
		t.Logf("nats-server did not start (attempt %d): %v", attempt+1, err)
	}
	if err != nil {
		t.Fatalf("nats-server not ready: %v\n%s", err, s.Log())
	}
	t.Cleanup(s.Stop)
	return s
}

// StartCluster starts n nats-servers with JetStream routed into one
// cluster, each on its own client port and store, and waits until each
// accepts connections (JetStream elects its leaders a little later). They
// are stopped when the test ends.
func StartCluster(t testing.TB, n int) []*Server {
	t.Helper()
	bin, err := Binary()
	if err != nil {
		if testing.Short() {
			t.Skip(err)
		}
		t.Fatal(err)
	}
	routePorts := make([]int, n)
	var routes []string
	for i := range n {
		routePorts[i] = consulagent.FreePort(t)
		routes = append(routes, "nats://127.0.0.1:"+strconv.Itoa(routePorts[i]))
	}
	servers := make([]*Server, n)
	for i := range n {
		s := &Server{t: t, bin: bin, Dir: t.TempDir(), Port: consulagent.FreePort(t)}
		s.args = []string{"-n", "node-" + strconv.Itoa(i), "--cluster_name", "test",
			"--cluster", routes[i], "--routes", strings.Join(routes, ",")}
		if err := s.start(); err != nil {
			t.Fatalf("nats-server node-%d not ready: %v\n%s", i, err, s.Log())
		}
		t.Cleanup(s.Stop)
		servers[i] = s
	}
	return servers
}

// URL is the client URL of the server.
func (s *Server) URL() string { return "nats://127.0.0.1:" + strconv.Itoa(s.Port) }

// Start starts a stopped server again on the same port and store.
func (s *Server) Start() {
	s.t.Helper()
	if err := s.start(); err != nil {
		s.t.Fatalf("nats-server did not restart: %v\n%s", err, s.Log())
	}
}

func (s *Server) start() error {
	args := append([]string{"-a", "127.0.0.1", "-p", strconv.Itoa(s.Port), "-js", "-sd", s.Dir}, s.args...)
	if len(s.args) == 0 {
		args = append(args, "-n", "test")
	}
	cmd := exec.Command(s.bin, args...)
	cmd.Stdout = &s.log
	cmd.Stderr = &s.log
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	exited := make(chan struct{})
	s.mu.Lock()
	if s.cmd != nil {
		s.mu.Unlock()
		return errors.New("nats-server already running")
	}
	if err := cmd.Start(); err != nil {
		s.mu.Unlock()
		return fmt.Errorf("start nats-server: %w", err)
	}
	s.cmd, s.exited = cmd, exited
	s.mu.Unlock()
	go func() { _ = cmd.Wait(); close(exited) }()
	deadline := time.Now().Add(30 * time.Second)
	for {
		select {
		case <-exited:
			s.mu.Lock()
			s.cmd = nil
			s.mu.Unlock()
			return errors.New("nats-server exited")
		default:
		}
		if c, err := net.DialTimeout("tcp", "127.0.0.1:"+strconv.Itoa(s.Port), time.Second); err == nil {
			_ = c.Close()
			return nil
		}
		if time.Now().After(deadline) {
			s.Kill()
			return errors.New("not listening after 30s")
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// Stop stops the server by PID (SIGTERM, then SIGKILL after 5s) and waits
// for it to exit. Stopping a stopped server does nothing.
func (s *Server) Stop() { s.signal(syscall.SIGTERM) }

// Kill stops the server at once with SIGKILL, like a crash.
func (s *Server) Kill() { s.signal(syscall.SIGKILL) }

func (s *Server) signal(sig syscall.Signal) {
	s.mu.Lock()
	cmd, exited := s.cmd, s.exited
	s.cmd = nil
	s.mu.Unlock()
	if cmd == nil {
		return
	}
	_ = syscall.Kill(-cmd.Process.Pid, sig)
	select {
	case <-exited:
	case <-time.After(5 * time.Second):
		_ = syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
		<-exited
	}
}

// Log returns what the server has printed so far.
func (s *Server) Log() string { return s.log.String() }

// PID is the running server's process id; 0 when it is stopped.
func (s *Server) PID() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.cmd == nil {
		return 0
	}
	return s.cmd.Process.Pid
}
