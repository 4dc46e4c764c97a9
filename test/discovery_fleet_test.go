package test

import (
	"fmt"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/sidecarlb/sidecar/test/consulagent"
	"github.com/sidecarlb/sidecar/test/harness"
)

// TestDiscoveryFleet runs 50 client sidecars on one agent with Consul's
// default limit of 200 connections per client address (every process here
// shares 127.0.0.1), each with 20 upstreams, under traffic for a few
// seconds: no request fails and the agent answers no 429. The sidecars
// are built without the race detector (harness.SidecarNoRace): 50 race
// builds would take about 1.5 GB. They run discovery.max_connections: 3,
// as the README advises past about 40 sidecars per agent (50 at the
// default 4 would take all 200 connections, leaving none for anyone else).
func TestDiscoveryFleet(t *testing.T) {
	const sidecars, upstreams = 50, 20
	if testing.Short() {
		t.Skip("50 sidecars")
	}
	a := consulagent.Start(t, consulagent.Options{MaxConnsPerClient: 200})
	harness.Binaries(t) // echo
	bin := harness.SidecarNoRace(t)
	echo := pxLoopback(t)
	harness.StartEcho(t, echo, "echo")
	scaleRegister(t, a.Client(), upstreams, echo)

	began := time.Now()
	listeners := make([][]string, sidecars)
	procs := make([]*harness.Proc, sidecars)
	for i := range sidecars {
		admin := pxLoopback(t)
		var cfg strings.Builder
		fmt.Fprintf(&cfg, "consul: {address: %s}\nadmin: {listen: %s}\nlog: {level: warn}\ndiscovery: {max_connections: 3}\nupstreams:\n", a.Addr(), admin)
		for s := range upstreams {
			l := pxLoopback(t)
			listeners[i] = append(listeners[i], l)
			fmt.Fprintf(&cfg, "  - {name: %s, listen: %q}\n", scaleName(s), l)
		}
		procs[i] = harness.StartSidecarBin(t, bin, admin, cfg.String())
	}
	t.Logf("%d sidecars with %d upstreams each started in %v", sidecars, upstreams, time.Since(began).Round(time.Millisecond))

	tr := &http.Transport{MaxIdleConns: sidecars * upstreams, MaxIdleConnsPerHost: 2, DisableCompression: true}
	t.Cleanup(tr.CloseIdleConnections)
	c := &http.Client{Transport: tr, Timeout: 10 * time.Second}
	// Every upstream answers once before the traffic (the first lookups).
	for i := range sidecars {
		for _, l := range listeners[i] {
			consulagent.WaitFor(t, 15*time.Second, "upstream "+l, func() bool {
				r, err := pxDo(c, http.MethodGet, "http://"+l+"/", nil)
				return err == nil && r.status == http.StatusOK
			})
		}
	}

	const traffic = 3 * time.Second
	var total, failed atomic.Int64
	var firstErr sync.Once
	var first string
	stop := time.Now().Add(traffic)
	var wg sync.WaitGroup
	for i := range sidecars {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for n := 0; time.Now().Before(stop); n++ {
				r, err := pxDo(c, http.MethodGet, "http://"+listeners[i][n%upstreams]+"/", nil)
				total.Add(1)
				if err != nil || r.status != http.StatusOK {
					failed.Add(1)
					firstErr.Do(func() { first = fmt.Sprintf("%v %d %s", err, r.status, r.body) })
				}
			}
		}()
	}
	wg.Wait()
	t.Logf("%d requests in %v through %d sidecars, %d failed", total.Load(), traffic, sidecars, failed.Load())
	if failed.Load() > 0 {
		t.Errorf("%d of %d requests failed; first: %s", failed.Load(), total.Load(), first)
	}
	for i, p := range procs {
		if out := p.Output(); strings.Contains(out, "429") {
			t.Errorf("sidecar %d saw a 429 from the agent:\n%s", i, out)
			break
		}
	}
	if log := strings.ToLower(a.Log()); strings.Contains(log, "too many") || strings.Contains(log, "429") {
		t.Errorf("the agent refused connections:\n%s", a.Log())
	}
}
