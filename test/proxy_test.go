package test

// TestProxyHTTP runs the HTTP/1.1 proxy path end to end with real processes
// on loopback: a Consul dev agent, three echo instances each registered by
// its own sidecar, and a client-only sidecar with two upstream listeners
// for echo (round_robin, and hash by X-User) and the forward proxy.

import (
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptrace"
	"net/url"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/sidecarlb/sidecar/test/consulagent"
	"github.com/sidecarlb/sidecar/test/harness"
)

// Health settings of the backend sidecars.
const (
	pxCheckInterval = 200 * time.Millisecond
	pxTTL           = 2 * time.Second
	pxDrain         = time.Second
)

// pxBackend is one echo instance and the sidecar registering it.
type pxBackend struct {
	name    string // echo's -name, its X-Instance header
	addr    string
	admin   string
	echo    *harness.Proc
	sidecar *harness.Proc
}

func pxLoopback(t *testing.T) string {
	t.Helper()
	return "127.0.0.1:" + strconv.Itoa(consulagent.FreePort(t))
}

func pxStartBackend(t *testing.T, consulAddr string, i int) *pxBackend {
	t.Helper()
	b := &pxBackend{name: fmt.Sprintf("echo-%d", i), addr: pxLoopback(t), admin: pxLoopback(t)}
	_, port, _ := net.SplitHostPort(b.addr)
	b.echo = harness.StartEcho(t, b.addr, b.name)
	b.sidecar = harness.StartSidecar(t, b.admin, fmt.Sprintf(`service:
  name: echo
  id: %s
  address: 127.0.0.1
  port: %s
  check:
    http: http://%s/health
    interval: %s
  ttl: %s
  drain: %s
consul:
  address: %s
admin:
  listen: %s
log:
  level: info
`, b.name, port, b.addr, pxCheckInterval, pxTTL, pxDrain, consulAddr, b.admin))
	return b
}

// pxClientSidecar is the client-only sidecar.
type pxClientSidecar struct {
	roundRobin string // base URL of the round_robin upstream listener
	hash       string // base URL of the hash upstream listener
	proxy      *url.URL
	proc       *harness.Proc
}

func pxStartClientSidecar(t *testing.T, consulAddr string) *pxClientSidecar {
	t.Helper()
	admin, proxyAddr, rr, hash := pxLoopback(t), pxLoopback(t), pxLoopback(t), pxLoopback(t)
	c := &pxClientSidecar{roundRobin: "http://" + rr, hash: "http://" + hash, proxy: &url.URL{Scheme: "http", Host: proxyAddr}}
	c.proc = harness.StartSidecar(t, admin, fmt.Sprintf(`consul:
  address: %s
admin:
  listen: %s
log:
  level: info
proxy:
  listen: %s
upstreams:
  - name: echo
    listen: %s
    balancer: round_robin
  - name: echo
    listen: %s
    balancer: hash
    hash_key: header:X-User
`, consulAddr, admin, proxyAddr, rr, hash))
	return c
}

// pxHTTPClient returns a keep-alive client whose idle connections close
// when the test ends. If proxy is not nil, requests go through it.
func pxHTTPClient(t *testing.T, proxy *url.URL) *http.Client {
	tr := &http.Transport{MaxIdleConnsPerHost: 16, DisableCompression: true}
	if proxy != nil {
		tr.Proxy = http.ProxyURL(proxy)
	}
	t.Cleanup(tr.CloseIdleConnections)
	return &http.Client{Transport: tr, Timeout: 10 * time.Second}
}

type pxResponse struct {
	status   int
	instance string // X-Instance
	body     string
	reused   bool // the request rode a kept-alive connection
}

func pxDo(c *http.Client, method, target string, header http.Header) (pxResponse, error) {
	var reused bool
	trace := &httptrace.ClientTrace{GotConn: func(i httptrace.GotConnInfo) { reused = i.Reused }}
	req, err := http.NewRequest(method, target, nil)
	if err != nil {
		return pxResponse{}, err
	}
	req = req.WithContext(httptrace.WithClientTrace(req.Context(), trace))
	for k, vv := range header {
		req.Header[k] = vv
	}
	resp, err := c.Do(req)
	if err != nil {
		return pxResponse{}, err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		return pxResponse{}, fmt.Errorf("read body: %w", err)
	}
	return pxResponse{status: resp.StatusCode, instance: resp.Header.Get("X-Instance"), body: string(body), reused: reused}, nil
}

func pxGet(t *testing.T, c *http.Client, target string, header http.Header) pxResponse {
	t.Helper()
	r, err := pxDo(c, http.MethodGet, target, header)
	if err != nil {
		t.Fatalf("GET %s: %v", target, err)
	}
	return r
}

// pxRound sends n GETs and returns the instances that answered. Through a
// round_robin listener, n requests reach n different instances when the
// set has at least n.
func pxRound(t *testing.T, c *http.Client, target string, n int) map[string]bool {
	t.Helper()
	seen := map[string]bool{}
	for range n {
		r := pxGet(t, c, target, nil)
		if r.status != http.StatusOK {
			t.Fatalf("GET %s: status = %d, want 200; body %q", target, r.status, r.body)
		}
		seen[r.instance] = true
	}
	return seen
}

// pxCountingListener is a listener no test request should reach: it counts
// the connections it accepts and closes them.
type pxCountingListener struct {
	net.Listener
	accepts atomic.Int64
}

func pxDecoy(t *testing.T) *pxCountingListener {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	d := &pxCountingListener{Listener: ln}
	done := make(chan struct{})
	go func() {
		defer close(done)
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			d.accepts.Add(1)
			c.Close()
		}
	}()
	t.Cleanup(func() { ln.Close(); <-done })
	return d
}

// pxLoad is a steady, bounded load of GETs from a few goroutines, recording
// every outcome.
type pxLoad struct {
	stop chan struct{}
	wg   sync.WaitGroup

	mu       sync.Mutex
	total    int
	failures []string
	last     map[string]time.Time // instance → when it last answered
}

func pxStartLoad(t *testing.T, c *http.Client, target string, workers int) *pxLoad {
	l := &pxLoad{stop: make(chan struct{}), last: map[string]time.Time{}}
	for range workers {
		l.wg.Add(1)
		go func() {
			defer l.wg.Done()
			tick := time.NewTicker(5 * time.Millisecond)
			defer tick.Stop()
			for {
				select {
				case <-l.stop:
					return
				case <-tick.C:
				}
				r, err := pxDo(c, http.MethodGet, target, nil)
				now := time.Now()
				l.mu.Lock()
				l.total++
				switch {
				case err != nil:
					l.failures = append(l.failures, fmt.Sprintf("%s: %v", now.Format("15:04:05.000"), err))
				case r.status != http.StatusOK:
					l.failures = append(l.failures, fmt.Sprintf("%s: status %d: %q", now.Format("15:04:05.000"), r.status, r.body))
				default:
					l.last[r.instance] = now
				}
				l.mu.Unlock()
			}
		}()
	}
	t.Cleanup(l.halt)
	return l
}

func (l *pxLoad) halt() {
	select {
	case <-l.stop:
	default:
		close(l.stop)
	}
	l.wg.Wait()
}

// finish stops the load and fails the test if any request did not get a
// 200.
func (l *pxLoad) finish(t *testing.T) {
	t.Helper()
	l.halt()
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.total == 0 {
		t.Fatal("the load sent no request")
	}
	if len(l.failures) > 0 {
		t.Errorf("%d of %d requests failed, want none; first ones:\n%s", len(l.failures), l.total,
			strings.Join(l.failures[:min(len(l.failures), 10)], "\n"))
	}
}

func (l *pxLoad) lastAnswer(instance string) time.Time {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.last[instance]
}

// pxPassing counts the passing instances of echo in the agent's catalog, or
// -1 when the agent does not answer.
func pxPassing(agent *consulagent.Agent) int {
	entries, _, err := agent.Client().Health().Service("echo", "", true, nil)
	if err != nil {
		return -1
	}
	return len(entries)
}

func pxPost(t *testing.T, target string) {
	t.Helper()
	resp, err := http.Post(target, "text/plain", nil)
	if err != nil {
		t.Fatalf("POST %s: %v", target, err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("POST %s: status = %d, want 200", target, resp.StatusCode)
	}
}

func TestProxyHTTP(t *testing.T) {
	agent := consulagent.Start(t, consulagent.Options{})
	harness.Binaries(t)
	backends := make([]*pxBackend, 3)
	for i := range backends {
		backends[i] = pxStartBackend(t, agent.Addr(), i)
	}
	client := pxStartClientSidecar(t, agent.Addr())
	c := pxHTTPClient(t, nil)
	consulagent.WaitFor(t, 20*time.Second, "the client sidecar to reach all three instances", func() bool {
		seen := map[string]bool{}
		for range 3 {
			r, err := pxDo(c, http.MethodGet, client.roundRobin+"/", nil)
			if err != nil || r.status != http.StatusOK {
				return false // not registered or not passing yet
			}
			seen[r.instance] = true
		}
		return len(seen) == 3
	})

	t.Run("RoundRobin", func(t *testing.T) {
		c := pxHTTPClient(t, nil)
		counts := map[string]int{}
		reused := 0
		for i := range 300 {
			r := pxGet(t, c, client.roundRobin+"/rr", nil)
			if r.status != http.StatusOK {
				t.Fatalf("request %d: status = %d, want 200; body %q", i, r.status, r.body)
			}
			if want := r.instance + " GET /rr\n"; r.body != want {
				t.Fatalf("request %d: body = %q, want %q", i, r.body, want)
			}
			counts[r.instance]++
			if r.reused {
				reused++
			}
		}
		for _, b := range backends {
			if counts[b.name] != 100 {
				t.Errorf("requests answered by %s = %d, want 100 (all: %v)", b.name, counts[b.name], counts)
			}
		}
		if reused != 299 {
			t.Errorf("requests on a kept-alive connection = %d, want 299", reused)
		}
	})

	t.Run("ForwardProxy", func(t *testing.T) {
		pc := pxHTTPClient(t, client.proxy)
		seen := map[string]bool{}
		// Service names are case-insensitive, in the catalog as in DNS.
		for _, target := range []string{"http://echo/fwd", "http://echo.service.consul/fwd", "http://echo:8080/fwd",
			"http://ECHO/fwd", "http://Echo.Service.Consul:80/fwd"} {
			for range 3 {
				r := pxGet(t, pc, target, nil)
				if r.status != http.StatusOK || r.body != r.instance+" GET /fwd\n" {
					t.Fatalf("GET %s via the forward proxy: status = %d, body %q; want 200 from echo", target, r.status, r.body)
				}
				seen[r.instance] = true
			}
		}
		if len(seen) != 3 {
			t.Errorf("instances reached through the forward proxy = %v, want 3", seen)
		}

		decoy := pxDecoy(t)
		port := decoy.Addr().(*net.TCPAddr).Port
		for _, tc := range []struct {
			target string
			status int
			named  string
		}{
			{fmt.Sprintf("http://nosuch:%d/x", port), http.StatusNotFound, `"nosuch"`},
			{fmt.Sprintf("http://NoSuch:%d/x", port), http.StatusNotFound, `"NoSuch"`},
			{fmt.Sprintf("http://127.0.0.1:%d/x", port), http.StatusBadRequest, "127.0.0.1"},
			{fmt.Sprintf("http://localhost:%d/x", port), http.StatusBadRequest, "localhost"},
		} {
			r := pxGet(t, pc, tc.target, nil)
			if r.status != tc.status || !strings.Contains(r.body, tc.named) {
				t.Errorf("GET %s via the forward proxy: status = %d, body %q; want %d naming %s",
					tc.target, r.status, r.body, tc.status, tc.named)
			}
		}
		if n := decoy.accepts.Load(); n != 0 {
			t.Errorf("connections to the unregistered host's port = %d, want 0", n)
		}
	})

	t.Run("HashStickiness", func(t *testing.T) {
		c := pxHTTPClient(t, nil)
		first := ""
		for i := range 50 {
			r := pxGet(t, c, client.hash+"/h", http.Header{"X-User": {"alice"}})
			if r.status != http.StatusOK {
				t.Fatalf("request %d: status = %d, want 200", i, r.status)
			}
			if i == 0 {
				first = r.instance
			} else if r.instance != first {
				t.Fatalf("request %d for alice answered by %s, earlier ones by %s", i, r.instance, first)
			}
		}
		spread := map[string]int{}
		for u := range 30 {
			spread[pxGet(t, c, client.hash+"/h", http.Header{"X-User": {"user-" + strconv.Itoa(u)}}).instance]++
		}
		if len(spread) < 2 {
			t.Errorf("30 users all answered by %v, want more than one instance", spread)
		}
		t.Logf("alice → %s; 30 users spread %v", first, spread)
	})

	t.Run("FailedCheckLeavesRotation", func(t *testing.T) {
		b := backends[0]
		c := pxHTTPClient(t, nil)
		pxPost(t, "http://"+b.addr+"/fail")
		// Three round_robin requests reach every instance in the set.
		left := consulagent.WaitFor(t, pxTTL+time.Second, b.name+" to leave rotation", func() bool {
			return !pxRound(t, c, client.roundRobin+"/", 3)[b.name]
		})
		t.Logf("%s left rotation %v after its health endpoint started failing (check interval %v, ttl %v)",
			b.name, left.Round(time.Millisecond), pxCheckInterval, pxTTL)
		if seen := pxRound(t, c, client.roundRobin+"/", 30); seen[b.name] || len(seen) != 2 {
			t.Errorf("instances answering after %s left = %v, want the other two", b.name, seen)
		}

		pxPost(t, "http://"+b.addr+"/recover")
		back := consulagent.WaitFor(t, pxTTL+time.Second, b.name+" to rejoin rotation", func() bool {
			return len(pxRound(t, c, client.roundRobin+"/", 3)) == 3
		})
		t.Logf("%s rejoined rotation %v after recovering", b.name, back.Round(time.Millisecond))
	})

	t.Run("SIGTERMBackendSidecarUnderLoad", func(t *testing.T) {
		b := backends[2]
		load := pxStartLoad(t, pxHTTPClient(t, nil), client.roundRobin+"/load", 4)
		time.Sleep(time.Second)
		if load.lastAnswer(b.name).IsZero() {
			t.Fatalf("%s answered nothing before SIGTERM", b.name)
		}
		sigterm := time.Now()
		b.sidecar.Signal(syscall.SIGTERM)
		time.Sleep(3 * time.Second) // past the drain and the exit
		load.finish(t)
		if code := b.sidecar.Wait(5 * time.Second); code != 0 {
			t.Errorf("%s's sidecar exit code = %d, want 0", b.name, code)
		}
		select {
		case <-b.echo.Exited():
			t.Errorf("%s's app exited with its sidecar", b.name)
		default:
		}
		last := load.lastAnswer(b.name).Sub(sigterm)
		t.Logf("%d requests, none lost; last one answered by %s %v after its sidecar's SIGTERM (drain %v)",
			load.total, b.name, last.Round(time.Millisecond), pxDrain)
		if last >= pxDrain {
			t.Errorf("%s still got requests %v after SIGTERM, past the drain of %v", b.name, last, pxDrain)
		}
		if seen := pxRound(t, pxHTTPClient(t, nil), client.roundRobin+"/", 30); seen[b.name] || len(seen) != 2 {
			t.Errorf("instances answering after %s deregistered = %v, want the other two", b.name, seen)
		}
	})

	t.Run("ConsulDownUnderLoad", func(t *testing.T) {
		live := []string{backends[0].name, backends[1].name}
		load := pxStartLoad(t, pxHTTPClient(t, nil), client.roundRobin+"/load", 4)
		time.Sleep(500 * time.Millisecond)
		agent.Stop()
		down := time.Now()
		time.Sleep(10 * time.Second)
		outage := pxRound(t, pxHTTPClient(t, nil), client.roundRobin+"/", 10)
		agent.Start()
		back := time.Now()
		reregistered := consulagent.WaitFor(t, 20*time.Second, "the backend sidecars to register again", func() bool {
			return pxPassing(agent) == len(live)
		})
		time.Sleep(time.Second) // load on the fresh set
		load.finish(t)
		t.Logf("%d requests over a %v Consul outage, none lost; backends registered again %v after the agent restarted",
			load.total, back.Sub(down).Round(time.Millisecond), reregistered.Round(time.Millisecond))
		for _, name := range live {
			if !outage[name] {
				t.Errorf("instances answering during the outage = %v, want %v", outage, live)
			}
			if at := load.lastAnswer(name); !at.After(back) {
				t.Errorf("%s answered nothing after Consul came back", name)
			}
		}
		after := pxRound(t, pxHTTPClient(t, nil), client.roundRobin+"/", 10)
		got := make([]string, 0, len(after))
		for name := range after {
			got = append(got, name)
		}
		sort.Strings(got)
		if strings.Join(got, ",") != strings.Join(live, ",") {
			t.Errorf("instances answering after the outage = %v, want %v", got, live)
		}
	})
}
