package proxy

import (
	"context"
	"fmt"
	"io"
	"net"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/sidecarlb/sidecar/balancer"
	"github.com/sidecarlb/sidecar/config"
	"github.com/sidecarlb/sidecar/internal/wait"
)

// failCounter wraps a route's balancer and counts, per endpoint address,
// the picks whose Done reported an error: the tries that failed on that
// node. A pick passed over for an open breaker reports none.
type failCounter struct {
	balancer.Balancer

	mu     sync.Mutex
	failed map[string]int
}

// countFailures puts a failCounter in front of rt's balancer. Call it
// before rt takes any traffic.
func countFailures(rt *route) *failCounter {
	fc := &failCounter{Balancer: rt.bal, failed: map[string]int{}}
	rt.bal = fc
	return fc
}

func (b *failCounter) Pick(req balancer.Request) (balancer.Pick, error) {
	pk, err := b.Balancer.Pick(req)
	if err != nil {
		return pk, err
	}
	inner, addr := pk.Done, pk.Endpoint.Addr
	pk.Done = func(r balancer.Result) {
		if r.Err != nil {
			b.mu.Lock()
			b.failed[addr]++
			b.mu.Unlock()
		}
		if inner != nil {
			inner(r)
		}
	}
	return pk, nil
}

// failures returns how many tries failed on the node at addr so far.
func (b *failCounter) failures(addr string) int {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.failed[addr]
}

// tcpNode is a TCP echo node that can be stopped, so that dials to its
// address are refused, and started again on the same address.
type tcpNode struct {
	addr string
	ln   net.Listener
	wg   sync.WaitGroup
}

// startTCPNode starts an echo node on a fresh loopback port; it stops when
// the test ends.
func startTCPNode(t testing.TB) *tcpNode {
	t.Helper()
	n := &tcpNode{addr: "127.0.0.1:0"}
	n.start(t)
	t.Cleanup(func() {
		n.stop()
		n.wg.Wait()
	})
	return n
}

// start listens on n.addr again and echoes each connection until the
// client closes it.
func (n *tcpNode) start(t testing.TB) {
	t.Helper()
	ln, err := net.Listen("tcp", n.addr)
	if err != nil {
		t.Fatal(err)
	}
	n.ln, n.addr = ln, ln.Addr().String()
	n.wg.Go(func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			n.wg.Go(func() {
				defer c.Close()
				c.SetDeadline(time.Now().Add(10 * time.Second))
				io.Copy(c, c)
			})
		}
	})
}

// stop closes n's listener: dials to its address are refused.
func (n *tcpNode) stop() { n.ln.Close() }

// tcpSetup is a TCP route for service "svc" and its listener.
type tcpSetup struct {
	*resSetup
	ts   *TCPServer
	addr string
	fc   *failCounter
}

// startTCPRoute serves a TCP route to service svc on addrs with res, and
// counts the failed tries per node.
func startTCPRoute(t testing.TB, addrs []string, res config.Resilience) *tcpSetup {
	t.Helper()
	px, reg := staticProxy(t, addrs)
	ts, err := px.TCP("test", RouteConfig{Service: "svc", Protocol: "tcp", Resilience: res})
	if err != nil {
		t.Fatal(err)
	}
	fc := countFailures(ts.route.Load())
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	served := make(chan struct{})
	go func() {
		defer close(served)
		ts.Serve(ln)
	}()
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		ts.Shutdown(ctx)
		<-served
	})
	return &tcpSetup{resSetup: &resSetup{px: px, reg: reg}, ts: ts, addr: ln.Addr().String(), fc: fc}
}

// echo opens a connection through the route, sends a line and reads it
// back. It fails when the sidecar closes the connection instead, as it
// does when no node takes it.
func (s *tcpSetup) echo() error {
	c, err := net.Dial("tcp", s.addr)
	if err != nil {
		return err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := io.WriteString(c, "ping\n"); err != nil {
		return fmt.Errorf("write: %w", err)
	}
	buf := make([]byte, 5)
	if _, err := io.ReadFull(c, buf); err != nil {
		return fmt.Errorf("read: %w", err)
	}
	if string(buf) != "ping\n" {
		return fmt.Errorf("read %q, want the echo of %q", buf, "ping\n")
	}
	return nil
}

// connResilience are the resilience settings under which a node whose
// dials are refused must be kept out of the way after 3 of them, and how
// to tell it is: by its breaker, or by its ejection.
var connResilience = []struct {
	name  string
	tune  func(*config.Resilience)
	check func(t *testing.T, s *resSetup, dead string)
}{
	{
		name: "breaker",
		tune: func(r *config.Resilience) {
			r.Breaker.Enabled = true
			r.Breaker.ConsecutiveFailures = 3
			r.Breaker.OpenFor = time.Minute
		},
		check: func(t *testing.T, s *resSetup, dead string) {
			t.Helper()
			if got := s.endpoint(t, dead).Breaker; got != "open" {
				t.Errorf("dead node's breaker = %q, want open", got)
			}
			if got := s.metric(t, "sidecar_breaker_state", map[string]string{"endpoint": dead}); got != 2 {
				t.Errorf("sidecar_breaker_state = %v, want 2 (open)", got)
			}
		},
	},
	{
		name: "outlier ejection",
		tune: func(r *config.Resilience) {
			r.Outlier.Enabled = true
			r.Outlier.ConsecutiveFailures = 3
			r.Outlier.BaseEjection = time.Minute
		},
		check: func(t *testing.T, s *resSetup, dead string) {
			t.Helper()
			if got := s.ejected(); !slices.Equal(got, []string{dead}) {
				t.Errorf("ejected endpoints = %v, want [%s]", got, dead)
			}
			if got := s.metric(t, "sidecar_outlier_ejections_total", map[string]string{"endpoint": dead}); got != 1 {
				t.Errorf("sidecar_outlier_ejections_total = %v, want 1", got)
			}
		},
	},
}

// connResDefaults returns the default resilience with breakers and outlier
// ejection off, for connResilience's tune to turn one on.
func connResDefaults(t testing.TB) config.Resilience {
	res := resDefaults(t)
	res.Breaker.Enabled = false
	res.Outlier.Enabled = false
	res.Retries.Backoff = time.Millisecond
	return res
}

// TestTCPRefusedDialsOpenBreaker: on a TCP route, dials a node refuses
// count against its breaker and toward its ejection as a request's connect
// errors do, so that after the threshold new connections no longer try it.
func TestTCPRefusedDialsOpenBreaker(t *testing.T) {
	for _, tc := range connResilience {
		t.Run(tc.name, func(t *testing.T) {
			res := connResDefaults(t)
			tc.tune(&res)
			live := startTCPNode(t)
			dead := resDeadAddr(t)
			s := startTCPRoute(t, []string{live.addr, dead}, res)
			for i := range 20 {
				if err := s.echo(); err != nil {
					t.Fatalf("connection #%d: %v", i, err)
				}
			}
			tc.check(t, s.resSetup, dead)
			if got := s.fc.failures(dead); got != 3 {
				t.Errorf("dials to the dead node = %d, want 3: none once it is out of the way", got)
			}
			if got := s.endpoint(t, live.addr); got.Breaker == "open" || got.EjectedUntil != nil {
				t.Errorf("live node = %+v, want it in use", got)
			}
		})
	}
}

// TestTCPConnectResetsFailures: a connection made ends a node's run of
// failed dials, for its breaker and for outlier detection alike, as an
// answered request does.
func TestTCPConnectResetsFailures(t *testing.T) {
	res := connResDefaults(t)
	res.Breaker.Enabled = true
	res.Breaker.ConsecutiveFailures = 3
	res.Breaker.OpenFor = time.Minute
	res.Outlier.Enabled = true
	res.Outlier.ConsecutiveFailures = 3
	node := startTCPNode(t)
	s := startTCPRoute(t, []string{node.addr}, res)
	fail := func(n int) {
		t.Helper()
		for i := range n {
			if err := s.echo(); err == nil {
				t.Fatalf("connection #%d to a stopped node: echoed, want it closed", i)
			}
		}
	}

	node.stop()
	fail(2)
	if got := s.endpoint(t, node.addr).ConsecutiveFailures; got != 2 {
		t.Fatalf("after 2 refused dials consecutive_failures = %d, want 2", got)
	}
	node.start(t)
	if err := s.echo(); err != nil {
		t.Fatalf("connection after the node came back: %v", err)
	}
	if got := s.endpoint(t, node.addr).ConsecutiveFailures; got != 0 {
		t.Errorf("after a connection made consecutive_failures = %d, want 0", got)
	}
	node.stop()
	fail(2)
	if got := s.endpoint(t, node.addr); got.Breaker != "closed" || got.ConsecutiveFailures != 2 {
		t.Errorf("after 2+1+2 dials = %+v, want breaker closed and 2 consecutive failures: the connection between ended the run", got)
	}
	if got := s.fc.failures(node.addr); got != 4 {
		t.Errorf("failed dials = %d, want 4", got)
	}
}

// TestTCPEveryBreakerOpen: once the only node's breaker is open, a
// connection is closed without a dial, and counted as breaker_open.
func TestTCPEveryBreakerOpen(t *testing.T) {
	res := connResDefaults(t)
	res.Breaker.Enabled = true
	res.Breaker.ConsecutiveFailures = 2
	res.Breaker.OpenFor = time.Minute
	dead := resDeadAddr(t)
	s := startTCPRoute(t, []string{dead}, res)
	for i := range 5 {
		if err := s.echo(); err == nil {
			t.Fatalf("connection #%d to a dead node: echoed, want it closed", i)
		}
	}
	if got := s.fc.failures(dead); got != 2 {
		t.Errorf("dials = %d, want 2: none once the breaker opened", got)
	}
	for reason, want := range map[string]float64{"connect_failed": 2, "breaker_open": 3} {
		if got := s.metric(t, "sidecar_proxy_errors_total", map[string]string{"reason": reason}); got != want {
			t.Errorf("sidecar_proxy_errors_total{reason=%q} = %v, want %v", reason, got, want)
		}
	}
}

// plainListener hands out its connections as a type other than
// *net.TCPConn, still able to half-close: the TCP route cannot make them
// raw connections, so it copies with a goroutine each way instead of
// handing the pair to the relay loop.
type plainListener struct{ net.Listener }

type plainConn struct{ *net.TCPConn }

func (l plainListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err != nil {
		return nil, err
	}
	return plainConn{c.(*net.TCPConn)}, nil
}

// TestTCPCopyHalfClose: on the copy path (no relay loop), a half-close
// from either side reaches the other while the opposite direction goes
// on: the node's FIN reaches the client as EOF, and what the client sends
// after that still reaches the node, followed by the client's FIN.
func TestTCPCopyHalfClose(t *testing.T) {
	nodeLn, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	got := make(chan string, 1)
	var wg sync.WaitGroup
	t.Cleanup(func() { nodeLn.Close(); wg.Wait() })
	wg.Go(func() {
		c, err := nodeLn.Accept()
		if err != nil {
			got <- "accept: " + err.Error()
			return
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(10 * time.Second))
		io.WriteString(c, "hello")
		c.(*net.TCPConn).CloseWrite()
		b, err := io.ReadAll(c) // until the client's FIN
		if err != nil {
			got <- "read: " + err.Error()
			return
		}
		got <- string(b)
	})

	px, _ := staticProxy(t, []string{nodeLn.Addr().String()})
	ts, err := px.TCP("test", RouteConfig{Service: "svc", Protocol: "tcp", Resilience: connResDefaults(t)})
	if err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	served := make(chan struct{})
	go func() {
		defer close(served)
		ts.Serve(plainListener{ln})
	}()
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		ts.Shutdown(ctx)
		<-served
	})

	c, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(5 * time.Second))
	b, err := io.ReadAll(c)
	if err != nil || string(b) != "hello" {
		t.Fatalf("client read %q, %v; want \"hello\" then EOF (the node's half-close)", b, err)
	}
	if _, err := io.WriteString(c, "after the node's FIN"); err != nil {
		t.Fatalf("client write after the node's half-close: %v", err)
	}
	c.(*net.TCPConn).CloseWrite()
	select {
	case s := <-got:
		if s != "after the node's FIN" {
			t.Errorf("node read %q, want %q then EOF (the client's half-close)", s, "after the node's FIN")
		}
	case <-time.After(5 * time.Second):
		t.Fatal("node saw no EOF after the client's half-close")
	}
}

// TestTCPIdleTimeout checks a TCP route closes a connection silent for the
// idle timeout, and keeps one whose traffic goes on past it.
func TestTCPIdleTimeout(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() { io.Copy(c, c); c.Close() }()
		}
	}()
	p := New(staticCache(t, map[string][]string{"echo": {ln.Addr().String()}}), nil, testLogger(t))
	const idle = 300 * time.Millisecond
	ts, err := p.TCP("test", RouteConfig{Service: "echo", Protocol: "tcp", Timeouts: Timeouts{Idle: idle}})
	if err != nil {
		t.Fatal(err)
	}
	pl, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go ts.Serve(pl)
	defer ts.Shutdown(t.Context())

	busy, err := net.Dial("tcp", pl.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer busy.Close()
	quiet, err := net.Dial("tcp", pl.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer quiet.Close()
	start := time.Now()
	buf := make([]byte, 4)
	for time.Since(start) < 3*idle {
		busy.SetDeadline(time.Now().Add(5 * time.Second))
		if _, err := busy.Write([]byte("ping")); err != nil {
			t.Fatalf("busy connection write after %v: %v", time.Since(start), err)
		}
		if _, err := io.ReadFull(busy, buf); err != nil {
			t.Fatalf("busy connection closed after %v: %v", time.Since(start), err)
		}
		time.Sleep(idle / 6)
	}
	quiet.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := quiet.Read(buf); err != io.EOF {
		t.Fatalf("quiet connection read = %v, want EOF from the idle timeout", err)
	}
}

// TestTCPRetriesFollowPolicy: a TCP connection goes through the same
// attempt loop as a request: a refused dial is retried on another node as
// retries.attempts allows, and at least twice (the three dials TCP routes
// always made), and each retry is counted in sidecar_retries_total.
func TestTCPRetriesFollowPolicy(t *testing.T) {
	t.Run("three dials with no retries configured", func(t *testing.T) {
		// As before the loop was shared: a failed dial never sent a
		// client byte, so at least two more nodes are tried.
		res := connResDefaults(t)
		res.Retries.Attempts = 0
		live := startTCPNode(t)
		dead1, dead2 := resDeadAddr(t), resDeadAddr(t)
		s := startTCPRoute(t, []string{dead1, dead2, live.addr}, res)
		for i := range 9 {
			if err := s.echo(); err != nil {
				t.Fatalf("connection #%d: %v", i, err)
			}
		}
		dials := s.fc.failures(dead1) + s.fc.failures(dead2)
		got := s.metric(t, "sidecar_retries_total", map[string]string{"reason": "connect_failed", "outcome": "retried"})
		if dials == 0 || int(got) != dials {
			t.Errorf(`sidecar_retries_total{reason="connect_failed",outcome="retried"} = %v, want one per failed dial (%d)`, got, dials)
		}
	})
	t.Run("more retries than three dials", func(t *testing.T) {
		res := connResDefaults(t)
		res.Retries.Attempts = 5
		live := startTCPNode(t)
		addrs := []string{live.addr}
		for range 5 {
			addrs = append(addrs, resDeadAddr(t))
		}
		s := startTCPRoute(t, addrs, res)
		for i := range 12 {
			if err := s.echo(); err != nil {
				t.Fatalf("connection #%d: %v", i, err)
			}
		}
		dials := 0
		for _, a := range addrs[1:] {
			dials += s.fc.failures(a)
		}
		got := s.metric(t, "sidecar_retries_total", map[string]string{"reason": "connect_failed", "outcome": "retried"})
		if dials == 0 || int(got) != dials {
			t.Errorf(`sidecar_retries_total{reason="connect_failed",outcome="retried"} = %v, want one per failed dial (%d)`, got, dials)
		}
	})
}

// TestTCPShutdownEndsBackoff: a connection whose dials failed and that
// waits out a retry's backoff is let go when Shutdown stops waiting, rather
// than holding Shutdown for the rest of the backoff.
func TestTCPShutdownEndsBackoff(t *testing.T) {
	res := connResDefaults(t)
	res.Retries.Attempts = 5
	res.Retries.Backoff = time.Minute
	dead := []string{resDeadAddr(t), resDeadAddr(t), resDeadAddr(t)}
	s := startTCPRoute(t, dead, res)
	c, err := net.Dial("tcp", s.addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	fc := s.fc
	// The first retry goes at once; the second waits its backoff.
	wait.For(t, 5*time.Second, "two failed dials", func() bool {
		return fc.failures(dead[0])+fc.failures(dead[1])+fc.failures(dead[2]) >= 2
	})
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	shut := make(chan error, 1)
	go func() { shut <- s.ts.Shutdown(ctx) }()
	select {
	case err := <-shut:
		if err != context.DeadlineExceeded {
			t.Errorf("Shutdown() = %v, want %v: a connection was still open", err, context.DeadlineExceeded)
		}
	case <-time.After(20 * time.Second):
		t.Fatal("Shutdown() still waiting for a connection in its retry backoff")
	}
}
