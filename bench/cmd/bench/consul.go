package main

import (
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"time"

	"github.com/hashicorp/consul/api"
)

// consulBinary finds consul as the integration tests do: $CONSUL_BIN, then
// bin/consul, then PATH.
func consulBinary() (string, error) {
	if p := os.Getenv("CONSUL_BIN"); p != "" {
		return p, nil
	}
	if _, err := os.Stat("bin/consul"); err == nil {
		return filepath.Abs("bin/consul")
	}
	if p, err := exec.LookPath("consul"); err == nil {
		return p, nil
	}
	return "", fmt.Errorf("no consul binary: run `make consul`, put consul on PATH or set CONSUL_BIN")
}

// startConsul starts a dev agent on free loopback ports (unpinned, like the
// backends) and registers every backend as bench-http and bench-grpc. It
// returns the agent's HTTP address.
func (h *harness) startConsul() (string, error) {
	bin, err := consulBinary()
	if err != nil {
		return "", err
	}
	var pp ports
	a := pp.must(4)
	pp.release()
	port := func(s string) int { _, p, _ := net.SplitHostPort(s); n, _ := strconv.Atoi(p); return n }
	hcl := fmt.Sprintf(`node_name = "sidecar-bench"
bind_addr = "127.0.0.1"
client_addr = "127.0.0.1"
log_level = "warn"
ports {
  http = %d
  dns = -1
  grpc = -1
  grpc_tls = -1
  serf_lan = %d
  serf_wan = %d
  server = %d
}
limits {
  http_max_conns_per_client = 10000
}
`, port(a[0]), port(a[1]), port(a[2]), port(a[3]))
	cfg := filepath.Join(h.tmp, "consul.hcl")
	if err := os.WriteFile(cfg, []byte(hcl), 0o644); err != nil {
		return "", err
	}
	p, err := h.procs.start(h.tmp, "consul", startOpts{cpu: -1}, bin, "agent", "-dev", "-config-file", cfg)
	if err != nil {
		return "", err
	}
	cc := api.DefaultConfig()
	cc.Address = a[0]
	client, err := api.NewClient(cc)
	if err != nil {
		return "", err
	}
	err = waitFor(60*time.Second, func() error {
		if !p.alive() {
			return fmt.Errorf("consul exited")
		}
		leader, err := client.Status().Leader()
		if err != nil {
			return err
		}
		if leader == "" {
			return fmt.Errorf("no leader yet")
		}
		_, _, err = client.Catalog().Services(nil)
		return err
	})
	if err != nil {
		return "", fmt.Errorf("consul not ready: %w\n%s", err, p.logTail())
	}
	for i, b := range h.backends {
		for _, s := range []struct{ name, addr string }{{"bench-http", b.http}, {"bench-grpc", b.grpc}} {
			host, ps, _ := net.SplitHostPort(s.addr)
			n, _ := strconv.Atoi(ps)
			reg := &api.AgentServiceRegistration{ID: s.name + "-" + strconv.Itoa(i), Name: s.name, Address: host, Port: n}
			if err := client.Agent().ServiceRegister(reg); err != nil {
				return "", fmt.Errorf("register %s: %w", reg.ID, err)
			}
		}
	}
	// Wait until the catalog shows every instance passing.
	err = waitFor(30*time.Second, func() error {
		for _, name := range []string{"bench-http", "bench-grpc"} {
			es, _, err := client.Health().Service(name, "", true, nil)
			if err != nil {
				return err
			}
			if len(es) != len(h.backends) {
				return fmt.Errorf("%s: %d of %d instances passing", name, len(es), len(h.backends))
			}
		}
		return nil
	})
	if err != nil {
		return "", err
	}
	return a[0], nil
}
