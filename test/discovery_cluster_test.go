package test

import (
	"fmt"
	"net/http"
	"sync"
	"testing"
	"time"

	"github.com/sidecarlb/sidecar/test/consulagent"
	"github.com/sidecarlb/sidecar/test/harness"
)

// loadGen sends GETs to one URL back to back, from one client, keeping
// every answer in order, until stopped (at the latest when the test ends).
type loadGen struct {
	mu      sync.Mutex
	answers []loadAnswer
	stop    chan struct{}
	done    chan struct{}
	once    sync.Once
}

type loadAnswer struct {
	instance string
	err      string
}

func startLoad(t *testing.T, c *http.Client, target string) *loadGen {
	g := &loadGen{stop: make(chan struct{}), done: make(chan struct{})}
	go func() {
		defer close(g.done)
		for {
			select {
			case <-g.stop:
				return
			default:
			}
			r, err := pxDo(c, http.MethodGet, target, nil)
			a := loadAnswer{instance: r.instance}
			switch {
			case err != nil:
				a.err = err.Error()
			case r.status != http.StatusOK:
				a.err = fmt.Sprintf("status %d: %s", r.status, r.body)
			}
			g.mu.Lock()
			g.answers = append(g.answers, a)
			g.mu.Unlock()
			time.Sleep(2 * time.Millisecond)
		}
	}()
	t.Cleanup(g.halt)
	return g
}

// halt stops the load and waits for the request in flight.
func (g *loadGen) halt() {
	g.once.Do(func() { close(g.stop) })
	<-g.done
}

// mark is the number of answers so far.
func (g *loadGen) mark() int {
	g.mu.Lock()
	defer g.mu.Unlock()
	return len(g.answers)
}

// waitInstance waits for an answer from instance after answer from.
func (g *loadGen) waitInstance(t *testing.T, from int, instance string, within time.Duration) {
	t.Helper()
	consulagent.WaitFor(t, within, "traffic to "+instance, func() bool {
		g.mu.Lock()
		defer g.mu.Unlock()
		for _, a := range g.answers[from:] {
			if a.instance == instance {
				return true
			}
		}
		return false
	})
}

// failures counts the failed answers from from on, and returns the first.
func (g *loadGen) failures(from int) (n, total int, first string) {
	g.mu.Lock()
	defer g.mu.Unlock()
	for _, a := range g.answers[from:] {
		if a.err != "" {
			if n == 0 {
				first = a.err
			}
			n++
		}
	}
	return n, len(g.answers) - from, first
}

// TestDiscoveryCluster runs a 3-server Consul cluster and a client agent;
// backend sidecars register echo instances and a client sidecar proxies to
// them, all through the client agent. Under steady traffic the leader is
// killed: no request fails, the backends' registrations stay passing, and
// an instance registered after the election reaches the balancer. Then the
// client agent is killed and brought back: again no request fails, and a
// registration after it reaches the balancer.
func TestDiscoveryCluster(t *testing.T) {
	cl := consulagent.StartCluster(t, consulagent.Options{})
	harness.Binaries(t)
	agent := cl.Client.Addr()
	pxStartBackend(t, agent, 1)
	pxStartBackend(t, agent, 2)
	cs := pxStartClientSidecar(t, agent)
	c := pxHTTPClient(t, nil)
	consulagent.WaitFor(t, 20*time.Second, "both instances through the upstream", func() bool {
		seen := map[string]bool{}
		for range 6 {
			if r, err := pxDo(c, http.MethodGet, cs.roundRobin+"/", nil); err == nil && r.status == http.StatusOK {
				seen[r.instance] = true
			}
		}
		return seen["echo-1"] && seen["echo-2"]
	})
	load := startLoad(t, c, cs.roundRobin+"/")

	// Kill the leader; a new one is elected and followed.
	old := cl.Leader()
	if old == nil {
		t.Fatal("no leader")
	}
	killed := time.Now()
	old.Kill()
	consulagent.WaitFor(t, 30*time.Second, "a new leader", func() bool {
		l := cl.Leader()
		return l != nil && l != old
	})
	t.Logf("new leader after %v", time.Since(killed).Round(time.Millisecond))
	from := load.mark()
	pxStartBackend(t, agent, 3) // registered after the election
	load.waitInstance(t, from, "echo-3", 20*time.Second)
	from = load.mark()
	for _, name := range []string{"echo-1", "echo-2", "echo-3"} {
		load.waitInstance(t, from, name, 10*time.Second) // still passing, still served
	}
	if n, total, first := load.failures(0); n > 0 {
		t.Errorf("leader election: %d of %d requests failed; first: %s", n, total, first)
	} else {
		t.Logf("leader election: 0 of %d requests failed", total)
	}

	// Kill the client agent and bring it back.
	from = load.mark()
	cl.Client.Kill()
	time.Sleep(2 * time.Second)
	cl.Client.Start()
	pxStartBackend(t, agent, 4)
	load.waitInstance(t, from, "echo-4", 30*time.Second)
	load.halt()
	if n, total, first := load.failures(from); n > 0 {
		t.Errorf("client agent restart: %d of %d requests failed; first: %s\n%s", n, total, first, cs.proc.Output())
	} else {
		t.Logf("client agent restart: 0 of %d requests failed", total)
	}
}
