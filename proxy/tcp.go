package proxy

import (
	"context"
	"errors"
	"fmt"
	"net"
	"sync"
	"sync/atomic"
	"time"

	"go.uber.org/zap"

	"github.com/sidecarlb/sidecar/balancer"
	"github.com/sidecarlb/sidecar/internal/rawio"
)

// proxyProtocolV2 is the RouteConfig.ProxyProtocol value that sends the
// PROXY protocol v2 header (rawio.AppendProxyV2).
const proxyProtocolV2 = "v2"

// TCPServer proxies raw TCP connections for one upstream: each connection
// goes to a node picked for it, bytes are copied both ways, and a half-close
// on one side is passed to the other. A dial that fails counts against the
// node's breaker and toward its ejection, and one that connects as a
// success, as a request's would. With RouteConfig.ProxyProtocol "v2",
// each connection to a node starts with a PROXY protocol v2 header naming
// the client's address and the listener address it connected to.
type TCPServer struct {
	p        *Proxy
	listener string
	route    atomic.Pointer[route] // swapped by Update; each connection loads it once

	mu     sync.Mutex
	ln     net.Listener
	conns  map[net.Conn]struct{}
	closed bool
	wg     sync.WaitGroup
	// abort ends the tries of connections still picking a node (their
	// backoff, a wait for a connection slot) when Shutdown gives up
	// waiting.
	abort      context.Context
	abortTries context.CancelFunc
}

// TCP returns the server of a per-upstream TCP listener for cfg.Service.
// cfg.Timeouts.Connect bounds each dial and cfg.Timeouts.Idle closes a
// connection with no traffic either way for that long.
func (p *Proxy) TCP(listener string, cfg RouteConfig) (*TCPServer, error) {
	cfg.Timeouts = cfg.Timeouts.withDefaults()
	if cfg.ProxyProtocol != "" && cfg.ProxyProtocol != proxyProtocolV2 {
		return nil, fmt.Errorf("upstream %q on %s: unknown proxy protocol %q (want %s or none)",
			cfg.Service, listener, cfg.ProxyProtocol, proxyProtocolV2)
	}
	rt, err := newRoute(p, listener, cfg)
	if err != nil {
		return nil, fmt.Errorf("upstream %q on %s: %w", cfg.Service, listener, err)
	}
	p.addRoute(rt)
	s := &TCPServer{p: p, listener: listener, conns: make(map[net.Conn]struct{})}
	s.abort, s.abortTries = context.WithCancel(context.Background())
	s.route.Store(rt)
	return s, nil
}

// Update makes connections accepted from now on follow cfg; connections
// already open keep the route they started with, and the old route's node
// connections close as those end. On error nothing changes. It does not
// block, and is safe for concurrent use with Serve.
func (s *TCPServer) Update(cfg RouteConfig) error {
	cfg.Timeouts = cfg.Timeouts.withDefaults()
	if cfg.ProxyProtocol != "" && cfg.ProxyProtocol != proxyProtocolV2 {
		return fmt.Errorf("upstream %q on %s: unknown proxy protocol %q (want %s or none)",
			cfg.Service, s.listener, cfg.ProxyProtocol, proxyProtocolV2)
	}
	return s.p.swapRoute(&s.route, s.listener, cfg)
}

// Retire drops the route from Status and its metrics, and lets its node
// connections close as their client connections end. Call it once the
// listener is shut down.
func (s *TCPServer) Retire() { s.p.retireRoute(s.route.Load(), true) }

// Serve accepts connections on ln until Shutdown. It returns
// net.ErrClosed after Shutdown.
func (s *TCPServer) Serve(ln net.Listener) error {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return net.ErrClosed
	}
	s.ln = ln
	s.mu.Unlock()
	var delay time.Duration
	for {
		c, err := ln.Accept()
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return net.ErrClosed
			}
			// Out of file descriptors and the like: back off, as net/http does.
			delay = min(max(2*delay, 5*time.Millisecond), time.Second)
			s.p.log.Warn("accept failed", zap.String("listener", s.listener), zap.Error(err))
			time.Sleep(delay)
			continue
		}
		delay = 0
		c = rawio.Wrap(c)
		if !s.track(c, true) {
			c.Close()
			return net.ErrClosed
		}
		s.wg.Add(1)
		go s.handle(c)
	}
}

// Shutdown stops accepting, then waits for open connections to end until
// ctx is done, when it closes them.
func (s *TCPServer) Shutdown(ctx context.Context) error {
	s.mu.Lock()
	s.closed = true
	if s.ln != nil {
		s.ln.Close()
	}
	s.mu.Unlock()
	done := make(chan struct{})
	go func() { s.wg.Wait(); close(done) }()
	select {
	case <-done:
		return nil
	case <-ctx.Done():
	}
	s.abortTries()
	s.mu.Lock()
	for c := range s.conns {
		c.Close()
	}
	s.mu.Unlock()
	<-done
	return ctx.Err()
}

func (s *TCPServer) track(c net.Conn, add bool) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if add {
		if s.closed {
			return false
		}
		s.conns[c] = struct{}{}
	} else {
		delete(s.conns, c)
	}
	return true
}

func (s *TCPServer) handle(client net.Conn) {
	defer s.wg.Done()
	defer s.track(client, false)
	defer client.Close()
	defer func() {
		if v := recover(); v != nil {
			s.p.log.Error("tcp connection panicked", zap.Any("panic", v), zap.Stack("stack"))
		}
	}()
	rt := s.route.Load()
	m := &rt.metrics
	m.inflight.Inc()
	defer m.inflight.Dec()
	start := time.Now()

	var key uint64
	var hasKey bool
	if rt.key.kind == hashClientIP {
		if host, _, err := net.SplitHostPort(client.RemoteAddr().String()); err == nil {
			key, hasKey = fnv64(host), true
		}
	}
	var header []byte
	if rt.cfg.ProxyProtocol == proxyProtocolV2 {
		header = rawio.AppendProxyV2(make([]byte, 0, rawio.ProxyV2MaxLen), client.RemoteAddr(), client.LocalAddr())
	}
	var l tryLoop
	l.init(s.p, s.abort, rt, key, hasKey, start)
	l.kind, l.tcp = tryTCP, tcpTry{header: header}
	c := &l.tcp
	defer l.next.cancel(rt)
	if err := l.run(); err != nil {
		_, code := classify(err)
		m.refused(code)
		if pe := (*proxyError)(nil); !errors.As(err, &pe) {
			err = &proxyError{rt.cfg.Service, err}
		}
		s.p.logRefused(m.listener, rt.cfg.Service, nil, code, err)
		if s.p.obs.Access != nil {
			s.p.logTCPAccess(m.listener, rt.cfg.Service, client.RemoteAddr().String(), "", l.sent, code, start, 0, 0)
		}
		return
	}
	backend, e := c.backend, c.e
	var in, out int64 // bytes from the client and from the node
	if s.p.obs.Access != nil {
		defer func() {
			s.p.logTCPAccess(m.listener, rt.cfg.Service, client.RemoteAddr().String(), e.Addr, l.sent, "", start, in, out)
		}()
	}
	defer done(c.pk, nil, start)
	defer backend.Close()
	m.tcpConnections.WithLabelValues(m.endpoint(e.Addr)).Inc()
	defer func() { m.tcpDuration.WithLabelValues().Observe(time.Since(start).Seconds()) }()

	var last atomic.Int64
	defer closeWhenIdle(rt.cfg.Timeouts.Idle, &last, client, backend).Stop()

	if cr, ok := client.(*rawio.Conn); ok {
		if br, ok := backend.(*rawio.Conn); ok {
			if pr, err := rawio.NewPair(cr, br, nil, nil, true, &last); err == nil {
				pr.Wait()
				in, out = pr.Transferred()
				return
			}
		}
	}
	var wg sync.WaitGroup
	wg.Go(func() { in = pipe(backend, client, &last) })
	wg.Go(func() { out = pipe(client, backend, &last) })
	wg.Wait()
}

// tcpTry is a TCP connection's side of the tryLoop: a dial to the node,
// and the PROXY protocol header, if any. A dial that fails never reached
// the node with a client byte, so another node may always take the
// connection, as retries.attempts (at least tcpMinRetries) and the backoff
// allow.
type tcpTry struct {
	header []byte

	// The node connected to, set by the try that ends the loop.
	backend net.Conn
	e       *endpoint
	pk      balancer.Pick
}

// attempt dials e.
func (c *tcpTry) attempt(l *tryLoop, e *endpoint, pk balancer.Pick, breakerDone func(error)) outcome {
	conn, err := dialNode(l.ctx, e, c.header, l.rt.cfg.Timeouts.Connect)
	if errors.Is(err, ErrLocalLimit) {
		refuseTry(breakerDone, pk)
		return outcome{verdict: tryRefused, err: err}
	}
	l.rt.reportTry(e, breakerDone, err != nil, err != nil)
	if err != nil {
		done(pk, err, l.start)
		return outcome{verdict: tryFailed, err: err, reason: "connect_failed", allowed: true, neverSent: true}
	}
	c.backend, c.e, c.pk = conn, e, pk
	return outcome{verdict: tryDone}
}

// dialNode connects to node e and writes header, if any, before anything
// else, so the node has it even when the client never sends a byte. Both
// steps are bounded by the connect timeout. A header that cannot be
// written fails the dial: no client byte has gone out yet, so the caller
// may move on to another node. At e's max_connections it first waits for
// a slot, up to the connect timeout, and fails with ErrLocalLimit.
func dialNode(ctx context.Context, e *endpoint, header []byte, connect time.Duration) (net.Conn, error) {
	addr := e.Addr
	if err := e.limits.acquireConn(ctx, connect); err != nil {
		return nil, err
	}
	deadline := time.Now().Add(connect)
	d := net.Dialer{Deadline: deadline, KeepAlive: 30 * time.Second}
	c, err := d.Dial("tcp", addr)
	if err != nil {
		e.limits.endConn()
		return nil, err
	}
	c = rawio.Wrap(c)
	if conf := e.poolConfig.meshH1; conf != nil {
		tc, err := meshHandshake(ctx, c, conf, addr, max(time.Until(deadline), time.Millisecond)) // what the dial left of connect
		if err != nil {
			e.limits.endConn()
			return nil, err
		}
		e.limits.attach(c) // closing tc closes c
		c = tc
	} else {
		e.limits.attach(c)
	}
	if len(header) == 0 {
		return c, nil
	}
	_ = c.SetWriteDeadline(deadline)
	if _, err := c.Write(header); err != nil {
		c.Close()
		return nil, fmt.Errorf("write proxy protocol header to %s: %w", addr, err)
	}
	_ = c.SetWriteDeadline(time.Time{})
	return c, nil
}

// pipe copies src to dst, stamping last on every transfer, and half-closes
// dst when src ends so the far side sees EOF while the other direction goes
// on. It returns the bytes copied.
func pipe(dst, src net.Conn, last *atomic.Int64) int64 {
	n, err := relay(dst, nil, src, last)
	if err != nil {
		// A reset or a closed peer: nothing more flows either way.
		closeBoth(dst, src)
		return n
	}
	rawio.CloseWrite(dst)
	return n
}

// errTriedAll: every node a connection could go to was tried.
var errTriedAll = errors.New("every node tried")
