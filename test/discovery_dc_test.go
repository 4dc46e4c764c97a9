package test

import (
	"fmt"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"

	"github.com/sidecarlb/sidecar/test/consulagent"
	"github.com/sidecarlb/sidecar/test/harness"
)

// TestDiscoveryDatacenter federates two dev agents (dc1, dc2) and runs a
// sidecar on dc1's agent with an upstream of echo in dc2: its requests reach
// dc2's instances, not dc1's echo, and a new instance in dc2 is followed.
func TestDiscoveryDatacenter(t *testing.T) {
	dc1 := consulagent.Start(t, consulagent.Options{Datacenter: "dc1"})
	dc2 := consulagent.Start(t, consulagent.Options{Datacenter: "dc2", JoinWAN: dc1.WANAddr()})
	consulagent.WaitFor(t, 30*time.Second, "the datacenters federated", func() bool {
		dcs, err := dc1.Client().Catalog().Datacenters()
		return err == nil && len(dcs) == 2
	})
	harness.Binaries(t)
	register := func(a *consulagent.Agent, id string) {
		addr := pxLoopback(t)
		harness.StartEcho(t, addr, id)
		host, port, _ := strings.Cut(addr, ":")
		p, _ := strconv.Atoi(port)
		if err := a.Client().Agent().ServiceRegister(&api.AgentServiceRegistration{
			ID: id, Name: "echo", Address: host, Port: p,
			Check: &api.AgentServiceCheck{TTL: "10m", Status: api.HealthPassing},
		}); err != nil {
			t.Fatal(err)
		}
	}
	register(dc1, "echo-dc1")
	register(dc2, "echo-dc2-a")

	admin, local, remote, fwd := pxLoopback(t), pxLoopback(t), pxLoopback(t), pxLoopback(t)
	// consul.datacenter unset: the sidecar asks the agent its own.
	harness.StartSidecar(t, admin, fmt.Sprintf(`consul:
  address: %s
admin:
  listen: %s
discovery:
  max_connections: 5
proxy:
  listen: %s
upstreams:
  - {name: echo, listen: "%s"}
  - {name: echo, listen: "%s", datacenter: dc2}
`, dc1.Addr(), admin, fwd, local, remote))

	c := pxHTTPClient(t, nil)
	instances := func(base string) map[string]bool {
		seen := map[string]bool{}
		for range 6 {
			r, err := pxDo(c, http.MethodGet, "http://"+base+"/", nil)
			if err != nil || r.status != http.StatusOK {
				return nil
			}
			seen[r.instance] = true
		}
		return seen
	}
	consulagent.WaitFor(t, 15*time.Second, "echo-dc2-a through the dc2 upstream", func() bool {
		s := instances(remote)
		return len(s) == 1 && s["echo-dc2-a"]
	})
	if s := instances(local); len(s) != 1 || !s["echo-dc1"] {
		t.Errorf("instances through the local upstream = %v, want echo-dc1 only", s)
	}
	// The forward proxy reads the datacenter of Consul's DNS form.
	pc := pxHTTPClient(t, &url.URL{Scheme: "http", Host: fwd})
	for target, want := range map[string]string{
		"http://echo.service.dc2.consul/": "echo-dc2-a", "http://echo.service.dc1.consul/": "echo-dc1",
		"http://echo.service.consul/": "echo-dc1", "http://echo/": "echo-dc1",
	} {
		if r := pxGet(t, pc, target, nil); r.status != http.StatusOK || r.instance != want {
			t.Errorf("GET %s via the forward proxy: status %d from %q, want 200 from %s", target, r.status, r.instance, want)
		}
	}
	if r := pxGet(t, pc, "http://echo.service.dc9.consul/", nil); r.status == http.StatusOK || !strings.Contains(r.body, "dc9") {
		t.Errorf("GET echo.service.dc9.consul: status %d, body %q; want an error naming dc9", r.status, r.body)
	}

	register(dc2, "echo-dc2-b")
	consulagent.WaitFor(t, 10*time.Second, "echo-dc2-b through the dc2 upstream", func() bool {
		s := instances(remote)
		return len(s) == 2 && s["echo-dc2-a"] && s["echo-dc2-b"]
	})
}
