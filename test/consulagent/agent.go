// Package consulagent starts a real Consul dev agent on free loopback ports
// for integration tests, and stops it by PID.
//
// The binary is found as $CONSUL_BIN, then bin/consul at the repository root
// (built by `make consul`), then consul on PATH. When none exists the test
// fails with a message saying to run `make consul`; with -short it is skipped.
package consulagent

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"
)

// Agent is a running (or stopped) Consul dev agent.
type Agent struct {
	t      testing.TB
	bin    string
	dir    string
	Ports  Ports
	mu     sync.Mutex // guards cmd and exited
	cmd    *exec.Cmd
	exited chan struct{}
	log    LockedBuffer
	opts   Options
}

// Ports are the loopback ports the agent listens on. The HTTP port stays
// the same across Stop and Start, so clients keep their address.
type Ports struct {
	HTTP, SerfLAN, SerfWAN, Server int
}

// Options tune the agent. The zero value is fine.
type Options struct {
	// ExtraHCL is appended to the agent's configuration file.
	ExtraHCL string
	// TLS, if set, makes the agent serve its HTTP API over HTTPS only, on
	// Ports.HTTP, with TLS.ServerCert; with TLS.VerifyIncoming it requires
	// a client certificate signed by TLS.CA. Client uses TLS.ClientCert.
	TLS *TLSFiles
	// ACLToken, if set, turns ACLs on with default_policy "deny" and makes
	// it the initial management token (and the agent's token); Client
	// uses it.
	ACLToken string
	// UnixSocket, if set, is the path of a unix socket the agent serves
	// its HTTP API on, in place of Ports.HTTP.
	UnixSocket string
	// MaxConnsPerClient is the agent's limits.http_max_conns_per_client;
	// if zero, 10000 (Consul's own default is 200).
	MaxConnsPerClient int
	// Datacenter is the agent's datacenter; if empty, Consul's dc1.
	Datacenter string
	// JoinWAN is the serf WAN address (host:port) of an agent of another
	// datacenter to federate with (see Agent.WANAddr).
	JoinWAN string
	// Mode is "" for a dev agent (a one-server datacenter in memory), or
	// "server" or "client" for an agent of a cluster (see StartCluster),
	// which keeps its state in a data directory across Stop and Start.
	Mode string
	// NodeName is the agent's node name; if empty, sidecar-test.
	NodeName string
	// BootstrapExpect is the number of servers a server waits for before
	// electing a leader (Mode server).
	BootstrapExpect int
	// RetryJoin lists serf LAN addresses (host:port) of agents to join.
	RetryJoin []string
}

// Binary returns the path of the consul binary tests use, or an error saying
// how to get one.
func Binary() (string, error) { return FindBinary("CONSUL_BIN", "consul", "consul") }

// FindBinary returns the path of the program name that tests run: $env when
// set, then bin/name at the repository root (built by `make target`), then
// name on PATH; else an error saying how to get one.
func FindBinary(env, name, target string) (string, error) {
	if p := os.Getenv(env); p != "" {
		return p, nil
	}
	if root, err := repoRoot(); err == nil {
		p := filepath.Join(root, "bin", name)
		if _, err := os.Stat(p); err == nil {
			return p, nil
		}
	}
	if p, err := exec.LookPath(name); err == nil {
		return p, nil
	}
	return "", fmt.Errorf("no %s binary: run `make %s` (builds bin/%s), put %s on PATH, or set %s", name, target, name, name, env)
}

// Start starts a dev agent and waits until it has elected itself leader. The
// agent is stopped when the test ends.
func Start(t testing.TB, opts Options) *Agent {
	t.Helper()
	bin, err := Binary()
	if err != nil {
		if testing.Short() {
			t.Skip(err)
		}
		t.Fatal(err)
	}
	a := &Agent{t: t, bin: bin, dir: t.TempDir(), opts: opts}
	// A port free when picked may be taken before the agent binds it, by
	// another test's agent: start again on fresh ports when that happens.
	for attempt := 0; attempt < 3; attempt++ {
		a.Ports = Ports{HTTP: FreePort(t), SerfLAN: FreePort(t), SerfWAN: FreePort(t), Server: FreePort(t)}
		a.writeConfig(opts)
		if err = a.start(); err == nil {
			break
		}
		t.Logf("consul agent did not start (attempt %d): %v", attempt+1, err)
	}
	if err != nil {
		t.Fatalf("consul agent not ready: %v\n%s", err, a.Log())
	}
	t.Cleanup(a.Stop)
	return a
}

func (a *Agent) writeConfig(opts Options) {
	ports := a.Ports
	httpPorts := fmt.Sprintf("http = %d", ports.HTTP)
	var extra string
	if t := opts.TLS; t != nil {
		httpPorts = fmt.Sprintf("http = -1\n  https = %d", ports.HTTP)
		extra += fmt.Sprintf(`
tls {
  defaults {
    ca_file = %q
    cert_file = %q
    key_file = %q
  }
  https {
    verify_incoming = %t
  }
}
`, t.CA, t.ServerCert, t.ServerKey, t.VerifyIncoming)
	}
	if opts.ACLToken != "" {
		extra += fmt.Sprintf(`
acl {
  enabled = true
  default_policy = "deny"
  tokens {
    initial_management = %q
    agent = %q
  }
}
`, opts.ACLToken, opts.ACLToken)
	}
	if opts.UnixSocket != "" {
		extra += fmt.Sprintf("\naddresses {\n  http = %q\n}\n", "unix://"+opts.UnixSocket)
	}
	maxConns := opts.MaxConnsPerClient
	if maxConns == 0 {
		maxConns = 10000
	}
	if opts.Datacenter != "" {
		extra += fmt.Sprintf("\ndatacenter = %q\n", opts.Datacenter)
	}
	if opts.JoinWAN != "" {
		extra += fmt.Sprintf("\nretry_join_wan = [%q]\n", opts.JoinWAN)
	}
	node := opts.NodeName
	if node == "" {
		node = "sidecar-test"
	}
	if opts.Mode != "" {
		extra += fmt.Sprintf("\ndata_dir = %q\nserver = %t\nperformance {\n  raft_multiplier = 1\n}\n",
			filepath.Join(a.dir, "data"), opts.Mode == "server")
		if opts.BootstrapExpect > 0 {
			extra += fmt.Sprintf("bootstrap_expect = %d\n", opts.BootstrapExpect)
		}
		if len(opts.RetryJoin) > 0 {
			extra += fmt.Sprintf("retry_join = [%s]\nretry_interval = \"1s\"\n", quoteAll(opts.RetryJoin))
		}
	}
	hcl := fmt.Sprintf(`
node_name = %q
bind_addr = "127.0.0.1"
client_addr = "127.0.0.1"
log_level = "warn"
ports {
  %s
  dns = -1
  grpc = -1
  grpc_tls = -1
  serf_lan = %d
  serf_wan = %d
  server = %d
}
limits {
  http_max_conns_per_client = %d
}
%s
%s
`, node, httpPorts, ports.SerfLAN, ports.SerfWAN, ports.Server, maxConns, extra, opts.ExtraHCL)
	if err := os.WriteFile(filepath.Join(a.dir, "agent.hcl"), []byte(hcl), 0o600); err != nil {
		a.t.Fatal(err)
	}
}

// WANAddr is the agent's serf WAN address, host:port, for Options.JoinWAN.
func (a *Agent) WANAddr() string { return "127.0.0.1:" + strconv.Itoa(a.Ports.SerfWAN) }

// Addr is the agent's HTTP address, host:port.
func (a *Agent) Addr() string { return "127.0.0.1:" + strconv.Itoa(a.Ports.HTTP) }

// URL is the agent's address as consul.address takes it:
// "https://127.0.0.1:PORT" with Options.TLS, "unix:///PATH" with
// Options.UnixSocket, else Addr.
func (a *Agent) URL() string {
	switch {
	case a.opts.UnixSocket != "":
		return "unix://" + a.opts.UnixSocket
	case a.opts.TLS != nil:
		return "https://" + a.Addr()
	}
	return a.Addr()
}

// Client returns an API client for the agent, with the client certificate
// and the management token the agent's Options call for.
func (a *Agent) Client() *api.Client {
	cfg := &api.Config{Address: a.URL(), Token: a.opts.ACLToken}
	if t := a.opts.TLS; t != nil {
		cfg.TLSConfig = api.TLSConfig{CAFile: t.CA, CertFile: t.ClientCert, KeyFile: t.ClientKey}
	}
	c, err := api.NewClient(cfg)
	if err != nil {
		a.t.Fatal(err)
	}
	return c
}

// Start (re)starts a stopped agent on the same ports, with an empty state, as
// a real agent restart in dev mode does, and waits until it is ready.
//
// While the agent was down, another process may have taken one of its
// cluster ports, which no client uses: it then starts again with fresh
// ones.
func (a *Agent) Start() {
	a.t.Helper()
	var err error
	for attempt := 0; attempt < 3; attempt++ {
		if err = a.start(); err == nil {
			return
		}
		a.t.Logf("consul agent did not restart (attempt %d): %v", attempt+1, err)
		a.Ports.SerfLAN, a.Ports.SerfWAN, a.Ports.Server = FreePort(a.t), FreePort(a.t), FreePort(a.t)
		a.writeConfig(a.opts)
	}
	a.t.Fatalf("consul agent not ready: %v\n%s", err, a.Log())
}

func (a *Agent) start() error {
	if err := a.launch(); err != nil {
		return err
	}
	if err := a.waitReady(a.exitedChan(), 60*time.Second); err != nil {
		a.Kill()
		return err
	}
	return nil
}

// exitedChan is the channel closed when the running agent exits.
func (a *Agent) exitedChan() <-chan struct{} {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.exited
}

// launch starts the agent process without waiting for it to be ready.
func (a *Agent) launch() error {
	args := []string{"agent", "-config-file", filepath.Join(a.dir, "agent.hcl")}
	if a.opts.Mode == "" {
		args = append(args, "-dev")
	}
	cmd := exec.Command(a.bin, args...)
	cmd.Stdout = &a.log
	cmd.Stderr = &a.log
	// Own process group so Stop reaches every child; die with the test binary.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	exited := make(chan struct{})
	a.mu.Lock()
	if a.cmd != nil {
		a.mu.Unlock()
		return errors.New("consul agent already running")
	}
	if err := cmd.Start(); err != nil {
		a.mu.Unlock()
		return fmt.Errorf("start consul: %w", err)
	}
	a.cmd, a.exited = cmd, exited
	a.mu.Unlock()
	go func() { _ = cmd.Wait(); close(exited) }()
	return nil
}

func quoteAll(ss []string) string {
	q := make([]string, len(ss))
	for i, s := range ss {
		q[i] = strconv.Quote(s)
	}
	return strings.Join(q, ", ")
}

func (a *Agent) waitReady(exited <-chan struct{}, within time.Duration) error {
	c := a.Client()
	deadline := time.Now().Add(within)
	for {
		select {
		case <-exited:
			return errors.New("agent exited")
		default:
		}
		leader, err := c.Status().Leader()
		if err == nil && leader != "" {
			// The catalog answers only once the node has synced itself.
			if _, _, err := c.Catalog().Services(nil); err == nil {
				return nil
			}
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("no leader after %v: %v", within, err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// Stop stops the agent by PID (SIGTERM, then SIGKILL after 5s) and waits for
// it to exit. Stopping a stopped agent does nothing.
func (a *Agent) Stop() {
	a.mu.Lock()
	cmd, exited := a.cmd, a.exited
	a.cmd = nil
	a.mu.Unlock()
	if cmd == nil {
		return
	}
	_ = syscall.Kill(-cmd.Process.Pid, syscall.SIGTERM)
	select {
	case <-exited:
	case <-time.After(5 * time.Second):
		_ = syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
		<-exited
	}
}

// Kill stops the agent at once with SIGKILL, like a crash.
func (a *Agent) Kill() {
	a.mu.Lock()
	cmd, exited := a.cmd, a.exited
	a.cmd = nil
	a.mu.Unlock()
	if cmd == nil {
		return
	}
	_ = syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
	<-exited
}

// Log returns what the agent has printed so far.
func (a *Agent) Log() string { return a.log.String() }

// FreePort returns a loopback TCP port that was free a moment ago, and
// that no earlier call in this process returned: the kernel may hand a
// port it just freed to the next bind, and two listeners of one test
// configured with the same port would clash.
//
// The port is picked below the kernel's ephemeral range
// (net.ipv4.ip_local_port_range), where no outgoing connection takes its
// source port: the tests open thousands of connections, and one of them
// could take a port from that range between FreePort and the bind of the
// process the port was meant for. Packages run their tests in parallel
// processes, so the pick is random and checked free by a bind.
func FreePort(t testing.TB) int {
	t.Helper()
	handedOut.Lock()
	defer handedOut.Unlock()
	lo, hi := portRange()
	for range 1000 {
		port := lo + rand.IntN(hi-lo)
		if handedOut.ports[port] {
			continue
		}
		l, err := net.Listen("tcp", "127.0.0.1:"+strconv.Itoa(port))
		if err != nil {
			continue // in use
		}
		l.Close()
		handedOut.ports[port] = true
		return port
	}
	t.Fatal("no loopback port free that was not handed out before")
	return 0
}

// portRange is where FreePort picks: from 10000 up to the start of the
// kernel's ephemeral range, or, when that leaves too little room, from the
// end of the range up to 65535; 20000–30000 when the range cannot be read.
func portRange() (lo, hi int) {
	b, err := os.ReadFile("/proc/sys/net/ipv4/ip_local_port_range")
	f := bytes.Fields(b)
	if err != nil || len(f) != 2 {
		return 20000, 30000
	}
	first, err1 := strconv.Atoi(string(f[0]))
	last, err2 := strconv.Atoi(string(f[1]))
	switch {
	case err1 != nil || err2 != nil:
		return 20000, 30000
	case first-10000 >= 5000:
		return 10000, first
	case 65535-last >= 5000:
		return last + 1, 65536
	default:
		return 20000, 30000 // no room outside the range: take the risk
	}
}

var handedOut = struct {
	sync.Mutex
	ports map[int]bool
}{ports: map[int]bool{}}

// WaitFor polls cond every 20ms until it returns true or within passes, and
// reports how long it took. It fails the test on timeout.
func WaitFor(t testing.TB, within time.Duration, what string, cond func() bool) time.Duration {
	t.Helper()
	start := time.Now()
	ctx, cancel := context.WithTimeout(context.Background(), within)
	defer cancel()
	for {
		if cond() {
			return time.Since(start)
		}
		select {
		case <-ctx.Done():
			t.Fatalf("timed out after %v waiting for %s", within, what)
		case <-time.After(20 * time.Millisecond):
		}
	}
}

func repoRoot() (string, error) {
	dir, err := os.Getwd()
	if err != nil {
		return "", err
	}
	for {
		if _, err := os.Stat(filepath.Join(dir, "go.mod")); err == nil {
			if _, err := os.Stat(filepath.Join(dir, "cmd", "sidecar")); err == nil {
				return dir, nil
			}
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			return "", errors.New("repository root not found")
		}
		dir = parent
	}
}

// RepoRoot returns the repository root (the folder holding go.mod and
// cmd/sidecar), found from the working directory.
func RepoRoot(t testing.TB) string {
	t.Helper()
	root, err := repoRoot()
	if err != nil {
		t.Fatal(err)
	}
	return root
}

// LockedBuffer is a bytes.Buffer safe for a process's output copier and a
// reader to use at once. The zero value is ready to use.
type LockedBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *LockedBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *LockedBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}
