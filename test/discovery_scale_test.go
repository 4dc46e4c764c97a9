package test

import (
	"bufio"
	"flag"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"

	"github.com/sidecarlb/sidecar/test/consulagent"
	"github.com/sidecarlb/sidecar/test/harness"
)

// scaleServices is how many services TestDiscoveryScale registers: 300 in
// make test (the reproduction, past the agent's default 200
// connections per client); the fleet-scale figures come from
//
//	make build && SIDECAR_TEST_BIN=$PWD/bin go test -count=1 -run TestDiscoveryScale -v ./test/ -scale.services=5000
//
// (the sidecar built without the race detector, for its memory).
var scaleServices = flag.Int("scale.services", 300, "services TestDiscoveryScale registers and resolves")

// scaleMemory is the sidecar's limits.memory in TestDiscoveryScale; empty
// for none.
var scaleMemory = flag.String("scale.memory", "", "limits.memory of the sidecar TestDiscoveryScale starts")

// scaleRegister registers services svc-0000… with one instance each, spread
// over 10 nodes, all at target, each with a passing check, through the
// transaction API (64 operations at a time).
func scaleRegister(t *testing.T, client *api.Client, services int, target string) {
	t.Helper()
	host, portStr, _ := strings.Cut(target, ":")
	port, _ := strconv.Atoi(portStr)
	var ops api.TxnOps
	flush := func() {
		ok, resp, _, err := client.Txn().Txn(ops, nil)
		if err != nil || !ok {
			t.Fatalf("register: %v %+v", err, resp)
		}
		ops = ops[:0]
	}
	for n := range 10 {
		ops = append(ops, &api.TxnOp{Node: &api.NodeTxnOp{Verb: api.NodeSet, Node: api.Node{
			Node: fmt.Sprintf("node-%02d", n), Address: host}}})
	}
	flush()
	for s := range services {
		ops = append(ops, &api.TxnOp{Service: &api.ServiceTxnOp{Verb: api.ServiceSet, Node: scaleNode(s),
			Service: api.AgentService{ID: scaleName(s), Service: scaleName(s), Address: host, Port: port}}})
		ops = append(ops, scaleCheck(s, api.HealthPassing))
		if len(ops) >= 64 {
			flush()
		}
	}
	if len(ops) > 0 {
		flush()
	}
}

func scaleName(s int) string { return fmt.Sprintf("svc-%04d", s) }
func scaleNode(s int) string { return fmt.Sprintf("node-%02d", s%10) }

func scaleCheck(s int, status string) *api.TxnOp {
	return &api.TxnOp{Check: &api.CheckTxnOp{Verb: api.CheckSet, Check: api.HealthCheck{
		Node: scaleNode(s), CheckID: "check-" + scaleName(s), Name: "alive", Status: status,
		ServiceID: scaleName(s), ServiceName: scaleName(s)}}}
}

// scaleSetCheck sets the status of service s's check.
func scaleSetCheck(t *testing.T, client *api.Client, s int, status string) {
	t.Helper()
	ok, resp, _, err := client.Txn().Txn(api.TxnOps{scaleCheck(s, status)}, nil)
	if err != nil || !ok {
		t.Fatalf("set check of %s: %v %+v", scaleName(s), err, resp)
	}
}

// agentConns counts pid's TCP connections to the local port, from the
// socket inodes among its open files and the kernel's TCP tables.
func agentConns(pid, port int) (int, error) {
	fds, err := os.ReadDir(fmt.Sprintf("/proc/%d/fd", pid))
	if err != nil {
		return 0, err
	}
	inodes := make(map[string]bool, len(fds))
	for _, fd := range fds {
		l, err := os.Readlink(filepath.Join(fmt.Sprintf("/proc/%d/fd", pid), fd.Name()))
		if err == nil && strings.HasPrefix(l, "socket:[") {
			inodes[strings.TrimSuffix(strings.TrimPrefix(l, "socket:["), "]")] = true
		}
	}
	n := 0
	hexPort := fmt.Sprintf(":%04X", port)
	for _, table := range []string{"/proc/net/tcp", "/proc/net/tcp6"} {
		f, err := os.Open(table)
		if err != nil {
			continue
		}
		sc := bufio.NewScanner(f)
		for sc.Scan() {
			fields := strings.Fields(sc.Text())
			// sl local rem st tx:rx tr:when retrnsmt uid timeout inode
			if len(fields) < 10 || !strings.HasSuffix(fields[2], hexPort) {
				continue
			}
			if inodes[fields[9]] {
				n++
			}
		}
		f.Close()
	}
	return n, nil
}

// vmRSS is pid's resident set size in bytes.
func vmRSS(pid int) int64 {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0
	}
	for line := range strings.SplitSeq(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, "VmRSS:"); ok {
			kb, _ := strconv.ParseInt(strings.TrimSpace(strings.TrimSuffix(strings.TrimSpace(v), "kB")), 10, 64)
			return kb << 10
		}
	}
	return 0
}

// scaleMemStats is a summary of the Go runtime's memory statistics of the
// sidecar whose admin listener (with pprof) is at admin, from the tail of
// /debug/pprof/heap?debug=1, and its goroutine count; "" when unavailable.
func scaleMemStats(admin string) string {
	r, err := http.Get("http://" + admin + "/debug/pprof/heap?debug=1")
	if err != nil {
		return ""
	}
	defer r.Body.Close()
	stats := map[string]int64{}
	sc := bufio.NewScanner(r.Body)
	sc.Buffer(make([]byte, 0, 64<<10), 1<<20)
	for sc.Scan() {
		k, v, ok := strings.Cut(strings.TrimPrefix(sc.Text(), "# "), " = ")
		if !ok {
			continue
		}
		v, _, _ = strings.Cut(v, " ") // "Stack = inuse / sys"
		if n, err := strconv.ParseInt(v, 10, 64); err == nil {
			stats[k] = n
		}
	}
	var b strings.Builder
	for _, k := range []string{"HeapAlloc", "HeapInuse", "HeapIdle", "HeapReleased", "Stack", "NextGC", "Sys"} {
		fmt.Fprintf(&b, "%s %.1f MiB, ", k, float64(stats[k])/(1<<20))
	}
	if g, err := http.Get("http://" + admin + "/debug/pprof/goroutine?debug=1"); err == nil {
		line, _ := bufio.NewReader(g.Body).ReadString('\n')
		g.Body.Close()
		b.WriteString(strings.TrimSpace(line))
	}
	return b.String()
}

// TestDiscoveryScale registers -scale.services services in an agent with
// Consul's default limit of 200 connections per client, and resolves each
// once through one sidecar's forward proxy, 64 at a time: every one answers,
// and the sidecar never holds more than discovery.max_connections (4)
// connections to the agent. Then 50 health flips, spread over the services,
// each take the service out of rotation, and a deregistration is seen. The
// figures (flip latency, RSS) are logged, not asserted.
func TestDiscoveryScale(t *testing.T) {
	services := *scaleServices
	agent := consulagent.Start(t, consulagent.Options{MaxConnsPerClient: 200})
	harness.Binaries(t)
	client := agent.Client()
	echoAddr := pxLoopback(t)
	harness.StartEcho(t, echoAddr, "echo")
	start := time.Now()
	scaleRegister(t, client, services, echoAddr)
	t.Logf("registered %d services in %v", services, time.Since(start))

	admin, proxyAddr := pxLoopback(t), pxLoopback(t)
	sc := harness.StartSidecar(t, admin, fmt.Sprintf(`consul:
  address: %s
admin:
  listen: %s
  pprof: true
log:
  level: warn
discovery:
  cache_size: %d
proxy:
  listen: %s
limits:
  memory: %q
`, agent.Addr(), admin, services+100, proxyAddr, *scaleMemory))

	// Count the sidecar's connections to the agent throughout.
	var peak, samples atomic.Int64
	stop := make(chan struct{})
	var sampler sync.WaitGroup
	sampler.Go(func() {
		for {
			if n, err := agentConns(sc.Pid(), agent.Ports.HTTP); err == nil {
				samples.Add(1)
				for {
					p := peak.Load()
					if int64(n) <= p || peak.CompareAndSwap(p, int64(n)) {
						break
					}
				}
			}
			select {
			case <-stop:
				return
			case <-time.After(5 * time.Millisecond):
			}
		}
	})
	stopSampler := sync.OnceFunc(func() { close(stop); sampler.Wait() })
	defer stopSampler()

	pc := pxHTTPClient(t, &url.URL{Scheme: "http", Host: proxyAddr})
	get := func(s int) int {
		r, err := pc.Get("http://" + scaleName(s) + "/")
		if err != nil {
			return 0
		}
		_, _ = io.Copy(io.Discard, r.Body)
		r.Body.Close()
		return r.StatusCode
	}

	start = time.Now()
	var answered atomic.Int64
	var failed sync.Map
	next := make(chan int)
	var wg sync.WaitGroup
	for range 64 {
		wg.Go(func() {
			for s := range next {
				if code := get(s); code == http.StatusOK {
					answered.Add(1)
				} else {
					failed.Store(scaleName(s), code)
				}
			}
		})
	}
	for s := range services {
		next <- s
	}
	close(next)
	wg.Wait()
	resolveTime := time.Since(start)
	if n := answered.Load(); n != int64(services) {
		var some []string
		failed.Range(func(k, v any) bool {
			if len(some) < 10 {
				some = append(some, fmt.Sprintf("%s: %v", k, v))
			}
			return true
		})
		t.Errorf("%d of %d services answered 200 through the forward proxy; some failures: %v", n, services, some)
	}
	t.Logf("%d of %d services resolved and answered through the forward proxy in %v (64 at a time)",
		answered.Load(), services, resolveTime)
	time.Sleep(time.Second) // settle, for the memory figure
	t.Logf("sidecar RSS with %d services watched: %.1f MiB", services, float64(vmRSS(sc.Pid()))/(1<<20))
	if ms := scaleMemStats(admin); ms != "" {
		t.Logf("sidecar runtime memory: %s", ms)
	}
	if path := os.Getenv("SCALE_HEAP_PROFILE"); path != "" {
		if r, err := http.Get("http://" + admin + "/debug/pprof/heap"); err == nil {
			b, _ := io.ReadAll(r.Body)
			r.Body.Close()
			_ = os.WriteFile(path, b, 0o644)
		}
	}

	// Health flips, spread over the services: each out of rotation.
	const flips = 50
	lat := make([]time.Duration, 0, flips)
	for i := range flips {
		s := (i*services/flips + i) % services
		start := time.Now()
		scaleSetCheck(t, client, s, api.HealthCritical)
		deadline := start.Add(10 * time.Second) // a sanity limit, not a speed claim
		for get(s) == http.StatusOK {
			if time.Now().After(deadline) {
				t.Fatalf("%s still answered 10s after its check went critical", scaleName(s))
			}
			time.Sleep(2 * time.Millisecond)
		}
		lat = append(lat, time.Since(start))
		scaleSetCheck(t, client, s, api.HealthPassing)
		consulagent.WaitFor(t, 10*time.Second, scaleName(s)+" back in rotation", func() bool { return get(s) == http.StatusOK })
	}
	slices.Sort(lat)
	t.Logf("health flip → out of rotation over %d flips (check write included, probed every 2ms through the proxy): "+
		"median %v, p99 %v, max %v", flips, lat[len(lat)/2], lat[len(lat)*99/100], lat[len(lat)-1])

	// A deregistration of an early service is seen.
	if _, err := client.Catalog().Deregister(&api.CatalogDeregistration{Node: scaleNode(0), ServiceID: scaleName(0)}, nil); err != nil {
		t.Fatalf("deregister: %v", err)
	}
	consulagent.WaitFor(t, 10*time.Second, "svc-0000 out of rotation after its deregistration",
		func() bool { return get(0) != http.StatusOK })

	stopSampler()
	t.Logf("connections from the sidecar to the agent: at most %d over %d samples", peak.Load(), samples.Load())
	if samples.Load() == 0 {
		t.Fatal("no sample of the sidecar's connections")
	}
	if p := peak.Load(); p > 4 {
		t.Errorf("the sidecar held %d connections to the agent at once, want at most discovery.max_connections (4)", p)
	}
	// The agent answers 429 to a client past its limit; the sidecar would
	// log it (as a failed query, or Go's unsolicited-response line).
	for _, log := range []string{agent.Log(), sc.Output()} {
		if strings.Contains(log, "too many concurrent connections") || strings.Contains(log, "Too Many Requests") {
			t.Errorf("the agent refused connections:\n%s", log)
		}
	}
}
