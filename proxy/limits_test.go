package proxy

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/sidecarlb/sidecar/internal/h2/h2test"
	"github.com/sidecarlb/sidecar/internal/wait"

	"github.com/sidecarlb/sidecar/config"
	"github.com/sidecarlb/sidecar/internal/leakcheck"
	"github.com/sidecarlb/sidecar/internal/rawio"
)

// limitNode is a node serving HTTP/1.1 and h2c that tracks how many
// connections are open to it at once (the peak) and how many requests it
// is running. With hold set, it keeps each request until release.
type limitNode struct {
	addr              string
	open, peak        atomic.Int64
	accepts           atomic.Int64
	running, requests atomic.Int64
	hold              atomic.Bool
	delay             time.Duration
	release           chan struct{}
}

func startLimitNode(t testing.TB, conf *http.HTTP2Config) *limitNode {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	n := &limitNode{addr: ln.Addr().String(), release: make(chan struct{})}
	protocols := new(http.Protocols)
	protocols.SetHTTP1(true)
	protocols.SetUnencryptedHTTP2(true)
	srv := &http.Server{Handler: n, Protocols: protocols, HTTP2: conf}
	done := make(chan struct{})
	go func() {
		defer close(done)
		_ = srv.Serve(&peakListener{Listener: ln, n: n})
	}()
	t.Cleanup(func() {
		n.unhold()
		srv.Close()
		<-done
	})
	return n
}

// unhold lets held requests, and those to come, go on.
func (n *limitNode) unhold() {
	if n.hold.CompareAndSwap(true, false) {
		close(n.release)
	}
}

func (n *limitNode) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	n.requests.Add(1)
	n.running.Add(1)
	defer n.running.Add(-1)
	if n.hold.Load() {
		select {
		case <-n.release:
		case <-time.After(20 * time.Second):
		}
	}
	if n.delay > 0 {
		time.Sleep(n.delay)
	}
	io.WriteString(w, "ok")
}

type peakListener struct {
	net.Listener
	n *limitNode
}

func (l *peakListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err != nil {
		return nil, err
	}
	l.n.accepts.Add(1)
	open := l.n.open.Add(1)
	for {
		p := l.n.peak.Load()
		if open <= p || l.n.peak.CompareAndSwap(p, open) {
			break
		}
	}
	return &peakConn{Conn: c, n: l.n}, nil
}

type peakConn struct {
	net.Conn
	n    *limitNode
	once sync.Once
}

func (c *peakConn) Close() error {
	c.once.Do(func() { c.n.open.Add(-1) })
	return c.Conn.Close()
}

// limitRoute is a route config for service "svc" with the default
// resilience and lim as its limits.
func limitRoute(t testing.TB, protocol string, lim config.Limits, connect time.Duration) RouteConfig {
	res := resDefaults(t)
	res.Limits = lim
	res.Retries.Attempts = 0
	return RouteConfig{Service: "svc", Protocol: protocol, Resilience: res,
		Timeouts: Timeouts{Connect: connect}}
}

// TestFanOutBoundedByLimits reproduces issue 23's fan-out: 4 client h2c
// connections × 200 streams to one slow HTTP/1.1 node opened a node
// connection each, and connects that timed out then opened the node's
// breaker. With max_connections 4 the node never has more than 4; the
// requests past the limits are answered 503 local_limit, counted by limit;
// the breaker stays closed and the next request succeeds.
func TestFanOutBoundedByLimits(t *testing.T) {
	leakcheck.Check(t)
	node := startLimitNode(t, nil)
	node.hold.Store(true)
	const (
		clients, streams = 4, 200
		maxConns         = 4
		total            = clients * streams
	)
	lim := config.Limits{MaxConnections: maxConns, MaxPendingRequests: 50, MaxRequests: 100}
	sc := startH2Sidecar(t, staticCache(t, map[string][]string{"svc": {node.addr}}),
		limitRoute(t, "http", lim, 2*time.Second), ServerOptions{})

	type answer struct {
		status int
		code   string
		err    error
	}
	answers := make(chan answer, total)
	var wg sync.WaitGroup
	for range clients {
		c := h2test.NewClient(t, nil)
		for range streams {
			wg.Add(1)
			go func() {
				defer wg.Done()
				resp, err := c.Get(sc.URL + "/slow")
				if err != nil {
					answers <- answer{err: err}
					return
				}
				io.Copy(io.Discard, resp.Body)
				resp.Body.Close()
				answers <- answer{status: resp.StatusCode, code: resp.Header.Get("X-Sidecar-Error")}
			}()
		}
	}
	// Every request is either answered or running at the node; then the
	// node lets its own go.
	wait.For(t, 15*time.Second, "requests answered or at the node", func() bool {
		return int64(len(answers))+node.running.Load() == total
	})
	node.unhold()
	wg.Wait()
	close(answers)

	var ok, refused int
	for a := range answers {
		switch {
		case a.err != nil:
			t.Errorf("request failed: %v", a.err)
		case a.status == http.StatusOK:
			ok++
		case a.status == http.StatusServiceUnavailable && a.code == "local_limit":
			refused++
		default:
			t.Errorf("answer = %d %q, want 200 or 503 local_limit", a.status, a.code)
		}
	}
	if p := node.peak.Load(); p > maxConns {
		t.Errorf("node connections at once = %d, want at most max_connections %d", p, maxConns)
	}
	if ok == 0 || refused == 0 || ok+refused != total {
		t.Errorf("answers: %d ok, %d refused, want both, %d in all", ok, refused, total)
	}
	t.Logf("node connections: peak %d, accepted %d; answers: %d ok, %d local_limit", node.peak.Load(), node.accepts.Load(), ok, refused)
	// 4 run, 50 wait for a connection the connect timeout long, the rest
	// are refused at once: max_requests, past the two, is not reached.
	for _, limit := range []string{"max_connections", "max_pending_requests"} {
		if v := sc.metric(t, "sidecar_upstream_overflows_total", map[string]string{"endpoint": node.addr, "limit": limit}); v == 0 {
			t.Errorf("sidecar_upstream_overflows_total{limit=%q} = 0, want > 0", limit)
		}
	}
	st := (&resSetup{px: sc.px}).endpoint(t, node.addr)
	if st.Breaker != "closed" || st.ConsecutiveFailures != 0 || st.EjectedUntil != nil {
		t.Errorf("endpoint after the fan-out = %+v, want breaker closed, no failures, not ejected", st)
	}
	resp, err := h2test.NewClient(t, nil).Get(sc.URL + "/after")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Errorf("request after the fan-out: status = %d (%s), want 200", resp.StatusCode, resp.Header.Get("X-Sidecar-Error"))
	}
}

// TestLimitsMaxRequests: past max_requests in flight to a node (HTTP/2
// streams on one connection here) a request is refused at once, without
// reaching the node, and the breaker stays closed.
func TestLimitsMaxRequests(t *testing.T) {
	leakcheck.Check(t)
	node := startLimitNode(t, nil)
	const maxRequests, n = 3, 10
	lim := config.Limits{MaxConnections: 10, MaxPendingRequests: 10, MaxRequests: maxRequests}
	rc := limitRoute(t, "http2", lim, 10*time.Second)
	rc.Resilience.Breaker.ConsecutiveFailures = 1
	rc.Resilience.Outlier.ConsecutiveFailures = 1
	s := resProxy(t, []string{node.addr}, rc)
	node.hold.Store(true)
	answers := make(chan resResponse, n)
	for i := range n {
		go func() { answers <- s.do(t, http.MethodGet, fmt.Sprintf("/%d", i), nil) }()
	}
	for range n - maxRequests {
		if r := <-answers; r.status != http.StatusServiceUnavailable || r.header.Get("X-Sidecar-Error") != "local_limit" {
			t.Errorf("answer past max_requests = %d %q, want 503 local_limit", r.status, r.header.Get("X-Sidecar-Error"))
		}
	}
	wait.For(t, 5*time.Second, "max_requests at the node", func() bool { return node.running.Load() == maxRequests })
	if st := s.endpoint(t, node.addr); st.ActiveRequests != maxRequests || st.Connections != 1 || st.PendingRequests != 0 {
		t.Errorf("status while held: %d active, %d connections, %d pending, want %d, 1, 0",
			st.ActiveRequests, st.Connections, st.PendingRequests, maxRequests)
	}
	node.unhold()
	for range maxRequests {
		if r := <-answers; r.status != http.StatusOK {
			t.Errorf("held answer = %d, want 200", r.status)
		}
	}
	if v := s.metric(t, "sidecar_upstream_overflows_total", map[string]string{"limit": "max_requests"}); v != n-maxRequests {
		t.Errorf("sidecar_upstream_overflows_total{limit=max_requests} = %v, want %d", v, n-maxRequests)
	}
	if st := s.endpoint(t, node.addr); st.Breaker != "closed" || st.EjectedUntil != nil {
		t.Errorf("endpoint = %+v, want breaker closed, not ejected", st)
	}
	if r := s.do(t, http.MethodGet, "/after", nil); r.status != http.StatusOK {
		t.Errorf("request after: status = %d, want 200", r.status)
	}
}

// TestLimitsQueueForConnections: requests past max_connections wait for a
// connection to come free and are then served, over HTTP/1.1 (a connection
// put back is handed over) and over HTTP/2 (a stream ending makes room on
// a connection at the node's concurrency limit), without more connections
// than the limit.
func TestLimitsQueueForConnections(t *testing.T) {
	leakcheck.Check(t)
	for _, tc := range []struct {
		name, protocol string
		maxConns       int
		conf           *http.HTTP2Config
	}{
		{"http1", "http", 2, nil},
		// One connection, whose SETTINGS a first request waits for: the
		// pool takes 100 streams until the node's come.
		{"http2", "http2", 1, &http.HTTP2Config{MaxConcurrentStreams: 3}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			node := startLimitNode(t, tc.conf)
			node.delay = 5 * time.Millisecond
			maxConns := int64(tc.maxConns)
			const n = 60
			lim := config.Limits{MaxConnections: tc.maxConns, MaxPendingRequests: n, MaxRequests: n}
			s := resProxy(t, []string{node.addr}, limitRoute(t, tc.protocol, lim, 10*time.Second))
			if r := s.do(t, http.MethodGet, "/first", nil); r.status != http.StatusOK {
				t.Fatalf("first request: status = %d, want 200", r.status)
			}
			var wg sync.WaitGroup
			statuses := make(chan string, n)
			for i := range n {
				wg.Add(1)
				go func() {
					defer wg.Done()
					r := s.do(t, http.MethodGet, fmt.Sprintf("/%d", i), nil)
					statuses <- fmt.Sprintf("%d %s", r.status, r.header.Get("X-Sidecar-Error"))
				}()
			}
			wg.Wait()
			close(statuses)
			for st := range statuses {
				if st != "200 " {
					t.Errorf("answer = %q, want 200", st)
				}
			}
			if p := node.peak.Load(); p > maxConns {
				t.Errorf("node connections at once = %d, want at most %d", p, maxConns)
			}
			if got := node.requests.Load(); got != n+1 {
				t.Errorf("node served %d requests, want %d", got, n+1)
			}
		})
	}
}

// TestTCPConnectionLimit: a TCP route holds at most max_connections to a
// node; a connection past it waits the connect timeout, is closed, and
// counts neither for the breaker nor for ejection.
func TestTCPConnectionLimit(t *testing.T) {
	leakcheck.Check(t)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	var accepts atomic.Int64
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			accepts.Add(1)
			go func() { io.Copy(c, c); c.Close() }()
		}
	}()
	res := resDefaults(t)
	res.Limits = config.Limits{MaxConnections: 1, MaxPendingRequests: 1, MaxRequests: 1}
	res.Breaker.ConsecutiveFailures = 1
	res.Outlier.ConsecutiveFailures = 1
	px, _ := staticProxy(t, []string{ln.Addr().String()})
	srv, err := px.TCP("tcp", RouteConfig{Service: "svc", Protocol: "tcp", Resilience: res,
		Timeouts: Timeouts{Connect: 200 * time.Millisecond}})
	if err != nil {
		t.Fatal(err)
	}
	pl, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go srv.Serve(pl)
	t.Cleanup(func() { srv.Shutdown(context.Background()) })

	echo := func(c net.Conn) error {
		c.SetDeadline(time.Now().Add(5 * time.Second))
		if _, err := c.Write([]byte("ping")); err != nil {
			return err
		}
		b := make([]byte, 4)
		_, err := io.ReadFull(c, b)
		return err
	}
	first, err := net.Dial("tcp", pl.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	if err := echo(first); err != nil {
		t.Fatalf("first connection: %v", err)
	}
	second, err := net.Dial("tcp", pl.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	if err := echo(second); err == nil {
		t.Error("second connection past max_connections 1 echoed, want it closed")
	}
	second.Close()
	if got := accepts.Load(); got != 1 {
		t.Errorf("node accepted %d connections, want 1", got)
	}
	first.Close()
	st := (&resSetup{px: px}).endpoint(t, ln.Addr().String())
	if st.Breaker != "closed" || st.EjectedUntil != nil {
		t.Errorf("endpoint = %+v, want breaker closed, not ejected", st)
	}
	var third net.Conn
	wait.For(t, 5*time.Second, "a connection once the first closed", func() bool {
		c, err := net.Dial("tcp", pl.Addr().String())
		if err != nil {
			return false
		}
		if echo(c) != nil {
			c.Close()
			return false
		}
		third = c
		return true
	})
	third.Close()
}

func TestNodeLimits(t *testing.T) {
	t.Run("max_requests", func(t *testing.T) {
		l := newNodeLimits(config.Limits{MaxRequests: 2}, nil, "")
		for i, want := range []error{nil, nil, errMaxRequests, errMaxRequests} {
			if err := l.startRequest(); err != want {
				t.Errorf("startRequest() #%d = %v, want %v", i+1, err, want)
			}
		}
		l.endRequest()
		if err := l.startRequest(); err != nil {
			t.Errorf("startRequest() after endRequest = %v, want nil", err)
		}
		if got := l.requests.Load(); got != 2 {
			t.Errorf("requests = %d, want 2", got)
		}
	})
	t.Run("defaults", func(t *testing.T) {
		l := newNodeLimits(config.Limits{}, nil, "")
		if cap(l.conns) != defaultLimit || l.maxPending != defaultLimit || l.maxRequests != defaultLimit {
			t.Errorf("zero limits = %d, %d, %d, want %d each", cap(l.conns), l.maxPending, l.maxRequests, defaultLimit)
		}
	})
	t.Run("nil limits nothing", func(t *testing.T) {
		var l *nodeLimits
		if err := l.startRequest(); err != nil || !l.tryConn() {
			t.Errorf("nil limits refused")
		}
		l.endRequest()
		l.endConn()
	})
	t.Run("pending", func(t *testing.T) {
		l := newNodeLimits(config.Limits{MaxConnections: 1, MaxPendingRequests: 1}, nil, "")
		if !l.tryConn() || l.tryConn() {
			t.Fatal("tryConn: want one slot")
		}
		got := make(chan error, 1)
		go func() { got <- l.acquireConn(context.Background(), 10*time.Second) }()
		wait.For(t, 5*time.Second, "a pending request", func() bool { return l.pending.Load() == 1 })
		if err := l.acquireConn(context.Background(), 10*time.Second); err != errMaxPending {
			t.Errorf("acquireConn past max_pending_requests = %v, want %v", err, errMaxPending)
		}
		l.endConn() // the waiter takes the slot
		if err := <-got; err != nil {
			t.Errorf("pending acquireConn = %v, want nil", err)
		}
		if err := l.acquireConn(context.Background(), 10*time.Millisecond); !errors.Is(err, ErrLocalLimit) {
			t.Errorf("acquireConn timed out = %v, want ErrLocalLimit", err)
		}
		ctx, cancel := context.WithCancel(context.Background())
		cancel()
		if err := l.acquireConn(ctx, 10*time.Second); !errors.Is(err, ErrLocalLimit) || !errors.Is(err, context.Canceled) {
			t.Errorf("acquireConn on a context ended = %v, want ErrLocalLimit and context.Canceled", err)
		}
		if got := l.pending.Load(); got != 0 {
			t.Errorf("pending = %d after the waits, want 0", got)
		}
	})
	t.Run("close gives the slot back once", func(t *testing.T) {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		defer ln.Close()
		l := newNodeLimits(config.Limits{MaxConnections: 2}, nil, "")
		var conns []net.Conn
		for range 2 {
			if !l.tryConn() {
				t.Fatal("tryConn = false, want a slot")
			}
			c, err := net.Dial("tcp", ln.Addr().String())
			if err != nil {
				t.Fatal(err)
			}
			c = rawio.Wrap(c)
			l.attach(c)
			conns = append(conns, c)
		}
		if l.tryConn() {
			t.Fatal("tryConn past max_connections = true")
		}
		conns[0].Close()
		conns[0].Close()
		if got := len(l.conns); got != 1 {
			t.Errorf("slots taken after closing one connection twice = %d, want 1", got)
		}
		conns[1].Close()
	})
	t.Run("no allocation", func(t *testing.T) {
		l := newNodeLimits(config.Limits{}, nil, "")
		if n := testing.AllocsPerRun(100, func() {
			if l.startRequest() == nil {
				l.endRequest()
			}
			if l.tryConn() {
				l.endConn()
			}
		}); n != 0 {
			t.Errorf("allocs per request = %v, want 0", n)
		}
	})
}

// TestLocalLimitClassified: a refusal is a 503 with its own code.
func TestLocalLimitClassified(t *testing.T) {
	for _, err := range []error{errMaxConnections, errMaxPending, errMaxRequests,
		&proxyError{"svc", fmt.Errorf("%w: %w", errMaxConnections, context.DeadlineExceeded)}} {
		if status, code := classify(err); status != http.StatusServiceUnavailable || code != "local_limit" {
			t.Errorf("classify(%v) = %d %s, want 503 local_limit", err, status, code)
		}
		if strings.Contains(err.Error(), "%!") {
			t.Errorf("error text %q is malformed", err)
		}
	}
}

// TestTransportConnectionLimit: the http.Transport pools (TLS, and requests
// the HTTP/1.1 fast path does not take) count their connections too: a
// request that needs a connection past max_connections waits, and fails
// with ErrLocalLimit when none comes free.
func TestTransportConnectionLimit(t *testing.T) {
	leakcheck.Check(t)
	node := startLimitNode(t, nil)
	node.hold.Store(true)
	lim := newNodeLimits(config.Limits{MaxConnections: 1, MaxPendingRequests: 1}, nil, "")
	tr := newTransport(&poolConfig{timeouts: Timeouts{Connect: 100 * time.Millisecond}.withDefaults()}, false, lim)
	defer tr.CloseIdleConnections()
	get := func() (*http.Response, error) {
		req, err := http.NewRequest(http.MethodGet, "http://"+node.addr+"/", nil)
		if err != nil {
			t.Fatal(err)
		}
		return tr.RoundTrip(req)
	}
	first := make(chan error, 1)
	go func() {
		resp, err := get()
		if err == nil {
			io.Copy(io.Discard, resp.Body)
			resp.Body.Close()
		}
		first <- err
	}()
	wait.For(t, 5*time.Second, "the first request at the node", func() bool { return node.running.Load() == 1 })
	if _, err := get(); !errors.Is(err, ErrLocalLimit) {
		t.Errorf("second request past max_connections 1: error = %v, want ErrLocalLimit", err)
	}
	node.unhold()
	if err := <-first; err != nil {
		t.Errorf("first request: %v", err)
	}
	if p := node.peak.Load(); p != 1 {
		t.Errorf("node connections at once = %d, want 1", p)
	}
}

// TestLimitsReclaimIdle: at max_connections, a request that needs a
// connection of another pool than the one holding the node's connections
// idle has one of them closed for its slot, rather than waiting the
// connect timeout and being refused.
func TestLimitsReclaimIdle(t *testing.T) {
	leakcheck.Check(t)
	node := startLimitNode(t, nil)
	lim := config.Limits{MaxConnections: 1, MaxPendingRequests: 1, MaxRequests: 10}
	s := resProxy(t, []string{node.addr}, limitRoute(t, "http", lim, 10*time.Second))
	// A GET leaves its connection idle in the HTTP/1.1 pool.
	if r := s.do(t, http.MethodGet, "/get", nil); r.status != http.StatusOK {
		t.Fatalf("GET: status = %d, want 200", r.status)
	}
	// A body of unknown length goes over the Transport's pool.
	pr, pw := io.Pipe()
	go func() {
		pw.Write([]byte("streamed"))
		pw.Close()
	}()
	req, err := http.NewRequest(http.MethodPost, s.url+"/post", pr)
	if err != nil {
		t.Fatal(err)
	}
	c := &http.Client{Timeout: 5 * time.Second}
	resp, err := c.Do(req)
	if err != nil {
		t.Fatalf("POST: %v", err)
	}
	io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Errorf("POST past max_connections with a connection idle: status = %d %q, want 200",
			resp.StatusCode, resp.Header.Get("X-Sidecar-Error"))
	}
	// The idle connection was closed for the POST's (the node may count
	// both for the moment it takes to read the first one's end).
	if got := node.accepts.Load(); got != 2 {
		t.Errorf("node accepted %d connections, want 2", got)
	}
	wait.For(t, 5*time.Second, "one connection open at the node", func() bool { return node.open.Load() <= 1 })
}
