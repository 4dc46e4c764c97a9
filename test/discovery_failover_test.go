package test

import (
	"encoding/json"
	"fmt"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"

	"github.com/sidecarlb/sidecar/test/consulagent"
	"github.com/sidecarlb/sidecar/test/harness"
)

// servingDatacenter is the datacenter /status says serves key, "" if none.
func servingDatacenter(c *http.Client, admin, key string) string {
	resp, err := c.Get("http://" + admin + "/status")
	if err != nil {
		return ""
	}
	defer resp.Body.Close()
	var st struct {
		Discovery []struct {
			Service    string `json:"service"`
			Datacenter string `json:"datacenter"`
		} `json:"discovery"`
	}
	if json.NewDecoder(resp.Body).Decode(&st) != nil {
		return ""
	}
	for _, w := range st.Discovery {
		if w.Service == key {
			return w.Datacenter
		}
	}
	return ""
}

// TestDiscoveryFailover federates two dev agents (dc1, dc2) and runs a
// sidecar on dc1's agent with an upstream of echo that fails over to dc2.
// Under steady traffic, dc1's instance goes critical: traffic moves to dc2
// and, once it has, no request fails though dc1's instance is then killed;
// dc1's instance comes back and passes: traffic returns to dc1, again
// without a failure. /status names the serving datacenter throughout.
func TestDiscoveryFailover(t *testing.T) {
	dc1 := consulagent.Start(t, consulagent.Options{Datacenter: "dc1"})
	dc2 := consulagent.Start(t, consulagent.Options{Datacenter: "dc2", JoinWAN: dc1.WANAddr()})
	consulagent.WaitFor(t, 30*time.Second, "the datacenters federated", func() bool {
		dcs, err := dc1.Client().Catalog().Datacenters()
		return err == nil && len(dcs) == 2
	})
	harness.Binaries(t)
	register := func(a *consulagent.Agent, id, addr string) {
		host, port, _ := strings.Cut(addr, ":")
		p, _ := strconv.Atoi(port)
		if err := a.Client().Agent().ServiceRegister(&api.AgentServiceRegistration{
			ID: id, Name: "echo", Address: host, Port: p,
			Check: &api.AgentServiceCheck{TTL: "10m", Status: api.HealthPassing},
		}); err != nil {
			t.Fatal(err)
		}
	}
	setCheck := func(status string) {
		if err := dc1.Client().Agent().UpdateTTL("service:echo-dc1", "", status); err != nil {
			t.Fatal(err)
		}
	}
	dc1Addr, dc2Addr := pxLoopback(t), pxLoopback(t)
	echo1 := harness.StartEcho(t, dc1Addr, "echo-dc1")
	harness.StartEcho(t, dc2Addr, "echo-dc2")
	register(dc1, "echo-dc1", dc1Addr)
	register(dc2, "echo-dc2", dc2Addr)

	admin, up := pxLoopback(t), pxLoopback(t)
	harness.StartSidecar(t, admin, fmt.Sprintf(`consul: {address: %s, datacenter: dc1}
admin: {listen: %s}
discovery: {max_connections: 5}
upstreams:
  - {name: echo, listen: "%s", failover: [dc2]}
`, dc1.Addr(), admin, up))
	const key = "echo|dc2"

	c := pxHTTPClient(t, nil)
	consulagent.WaitFor(t, 15*time.Second, "echo-dc1 through the upstream", func() bool {
		r, err := pxDo(c, http.MethodGet, "http://"+up+"/", nil)
		return err == nil && r.status == http.StatusOK && r.instance == "echo-dc1"
	})
	if dc := servingDatacenter(c, admin, key); dc != "dc1" {
		t.Errorf("/status serving datacenter = %q, want dc1", dc)
	}

	// Steady traffic from one client, each answer recorded in order.
	type answer struct {
		instance string
		err      string
	}
	var (
		mu      sync.Mutex
		answers []answer
	)
	stop := make(chan struct{})
	done := make(chan struct{})
	go func() {
		defer close(done)
		for {
			select {
			case <-stop:
				return
			default:
			}
			r, err := pxDo(c, http.MethodGet, "http://"+up+"/", nil)
			a := answer{instance: r.instance}
			switch {
			case err != nil:
				a.err = err.Error()
			case r.status != http.StatusOK:
				a.err = fmt.Sprintf("status %d: %s", r.status, r.body)
			}
			mu.Lock()
			answers = append(answers, a)
			mu.Unlock()
			time.Sleep(2 * time.Millisecond)
		}
	}()
	t.Cleanup(func() {
		select {
		case <-stop:
		default:
			close(stop)
		}
		<-done
	})
	mark := func() int {
		mu.Lock()
		defer mu.Unlock()
		return len(answers)
	}
	// waitServed waits for the first answer from instance after answer
	// from, and returns its index.
	waitServed := func(from int, instance string) int {
		t.Helper()
		at := -1
		consulagent.WaitFor(t, 15*time.Second, "traffic to "+instance, func() bool {
			mu.Lock()
			defer mu.Unlock()
			for i := from; i < len(answers); i++ {
				if answers[i].instance == instance {
					at = i
					return true
				}
			}
			return false
		})
		return at
	}
	// afterSwitch checks the answers from from to to: all from instance,
	// none failed.
	afterSwitch := func(step string, from, to int, instance string) {
		t.Helper()
		mu.Lock()
		defer mu.Unlock()
		failed, other := 0, 0
		for _, a := range answers[from:to] {
			switch {
			case a.err != "":
				failed++
				if failed == 1 {
					t.Errorf("%s: request failed after the switch: %s", step, a.err)
				}
			case a.instance != instance:
				other++
			}
		}
		t.Logf("%s: %d requests after the switch, %d failed, %d not from %s", step, to-from, failed, other, instance)
		if failed > 0 || other > 0 {
			t.Errorf("%s: %d of %d requests failed, %d answered by another instance than %s", step, failed, to-from, other, instance)
		}
	}
	waitServed(0, "echo-dc1")

	// dc1's instance goes critical: traffic moves to dc2.
	critical := mark()
	setCheck(api.HealthCritical)
	switched := waitServed(critical, "echo-dc2")
	t.Logf("failover: %d requests between the check going critical and the first answer from dc2", switched-critical)
	echo1.Signal(syscall.SIGKILL) // dc1's instance dies: nothing may still reach it
	echo1.Wait(5 * time.Second)
	if dc := servingDatacenter(c, admin, key); dc != "dc2" {
		t.Errorf("/status serving datacenter after failover = %q, want dc2", dc)
	}
	time.Sleep(500 * time.Millisecond) // traffic served by dc2
	afterSwitch("failover", switched, mark(), "echo-dc2")

	// dc1's instance comes back and passes: traffic returns.
	harness.StartEcho(t, dc1Addr, "echo-dc1")
	back := mark()
	setCheck(api.HealthPassing)
	returned := waitServed(back, "echo-dc1")
	t.Logf("return: %d requests between the check passing and the first answer from dc1", returned-back)
	time.Sleep(500 * time.Millisecond)
	afterSwitch("return", returned, mark(), "echo-dc1")
	if dc := servingDatacenter(c, admin, key); dc != "dc1" {
		t.Errorf("/status serving datacenter after the return = %q, want dc1", dc)
	}
	close(stop)
	<-done
	mu.Lock()
	defer mu.Unlock()
	failed := 0
	for _, a := range answers {
		if a.err != "" {
			failed++
		}
	}
	if failed > 0 {
		t.Errorf("%d of %d requests failed in all", failed, len(answers))
	}
}
