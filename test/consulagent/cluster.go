package consulagent

import (
	"fmt"
	"strconv"
	"testing"
	"time"
)

// Cluster is a datacenter of three Consul servers and one client agent,
// on loopback ports, as in production: the sidecars talk to the client
// agent, which forwards to the servers.
type Cluster struct {
	Servers []*Agent
	Client  *Agent
}

// StartCluster starts three servers and a client agent, waits until the
// servers have elected a leader and the client has joined, and stops them
// all when the test ends. opts apply to the client agent (limits, ACLs
// are not supported here).
func StartCluster(t testing.TB, opts Options) *Cluster {
	t.Helper()
	bin, err := Binary()
	if err != nil {
		if testing.Short() {
			t.Skip(err)
		}
		t.Fatal(err)
	}
	c := &Cluster{}
	var joins []string
	for range 3 {
		a := &Agent{t: t, bin: bin, dir: t.TempDir()}
		a.Ports = Ports{HTTP: FreePort(t), SerfLAN: FreePort(t), SerfWAN: FreePort(t), Server: FreePort(t)}
		c.Servers = append(c.Servers, a)
		joins = append(joins, a.LANAddr())
	}
	for i, a := range c.Servers {
		a.opts = Options{Mode: "server", NodeName: fmt.Sprintf("server-%d", i), BootstrapExpect: 3, RetryJoin: joins}
		a.writeConfig(a.opts)
		if err := a.launch(); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(a.Stop)
	}
	for _, a := range c.Servers {
		if err := a.waitReady(a.exitedChan(), 90*time.Second); err != nil {
			t.Fatalf("consul server not ready: %v\n%s", err, a.Log())
		}
	}
	cl := &Agent{t: t, bin: bin, dir: t.TempDir()}
	opts.Mode, opts.NodeName, opts.RetryJoin = "client", "client", joins
	cl.opts = opts
	for attempt := 0; attempt < 3; attempt++ {
		cl.Ports = Ports{HTTP: FreePort(t), SerfLAN: FreePort(t), SerfWAN: FreePort(t), Server: FreePort(t)}
		cl.writeConfig(opts)
		if err = cl.start(); err == nil {
			break
		}
	}
	if err != nil {
		t.Fatalf("consul client agent not ready: %v\n%s", err, cl.Log())
	}
	t.Cleanup(cl.Stop)
	c.Client = cl
	return c
}

// LANAddr is the agent's serf LAN address, host:port, for Options.RetryJoin.
func (a *Agent) LANAddr() string { return "127.0.0.1:" + strconv.Itoa(a.Ports.SerfLAN) }

// Leader returns the server that leads, as the client agent sees it, or nil
// while there is none.
func (c *Cluster) Leader() *Agent {
	addr, err := c.Client.Client().Status().Leader()
	if err != nil || addr == "" {
		return nil
	}
	for _, s := range c.Servers {
		if addr == "127.0.0.1:"+strconv.Itoa(s.Ports.Server) {
			return s
		}
	}
	return nil
}
