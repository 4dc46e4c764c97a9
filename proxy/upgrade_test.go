package proxy

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/coder/websocket"

	"github.com/sidecarlb/sidecar/config"
	"github.com/sidecarlb/sidecar/internal/leakcheck"
	"github.com/sidecarlb/sidecar/internal/rawio"
)

// TestUpgradeRelay drives a protocol upgrade through the proxy with raw
// sockets on both sides: bytes that ride along with either handshake,
// thousands of strict ping-pong rounds (where a relay that waited without
// reading after a message would stall), a message larger than the relay's
// buffer, and half-close both ways.
func TestUpgradeRelay(t *testing.T) {
	t.Run("idle", testUpgradeRelay)
	t.Run("busy", func(t *testing.T) {
		rawio.StartRequest() // ordinary system calls, as under load
		rawio.StartRequest()
		defer rawio.EndRequest()
		defer rawio.EndRequest()
		testUpgradeRelay(t)
	})
}

func testUpgradeRelay(t *testing.T) {
	leakcheck.Check(t)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	nodeDone := make(chan error, 1)
	go func() {
		nodeDone <- func() error {
			c, err := ln.Accept()
			if err != nil {
				return err
			}
			defer c.Close()
			c.SetDeadline(time.Now().Add(20 * time.Second))
			br := bufio.NewReader(c)
			req, err := http.ReadRequest(br)
			if err != nil {
				return err
			}
			if got := upgradeType(req.Header); got != "x-echo" {
				return fmt.Errorf("node got Upgrade %q, want x-echo", got)
			}
			// The 101 and the node's first bytes in one write.
			if _, err := io.WriteString(c, "HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: x-echo\r\n\r\nnode-hello\n"); err != nil {
				return err
			}
			// Echo lines until the client half-closes, then half-close too.
			for {
				line, err := br.ReadString('\n')
				if err == io.EOF && line == "" {
					return c.(*net.TCPConn).CloseWrite()
				}
				if err != nil {
					return err
				}
				if _, err := io.WriteString(c, line); err != nil {
					return err
				}
			}
		}()
	}()

	c := dialUpgradeProxy(t, ln.Addr().String())
	c.SetDeadline(time.Now().Add(20 * time.Second))
	// The handshake and the client's first line in one write.
	if _, err := io.WriteString(c, "GET /x HTTP/1.1\r\nHost: echo\r\nConnection: Upgrade\r\nUpgrade: x-echo\r\n\r\nclient-early\n"); err != nil {
		t.Fatal(err)
	}
	br := bufio.NewReader(c)
	resp, err := http.ReadResponse(br, nil)
	if err != nil || resp.StatusCode != http.StatusSwitchingProtocols {
		t.Fatalf("handshake: %v, %v; want 101", resp, err)
	}
	for _, want := range []string{"node-hello\n", "client-early\n"} {
		if got, err := br.ReadString('\n'); got != want {
			t.Fatalf("read %q, %v; want %q", got, err, want)
		}
	}
	for i := range 3000 {
		msg := fmt.Sprintf("ping %d\n", i)
		if _, err := io.WriteString(c, msg); err != nil {
			t.Fatalf("round %d: write: %v", i, err)
		}
		if got, err := br.ReadString('\n'); got != msg {
			t.Fatalf("round %d: read %q, %v; want %q", i, got, err, msg)
		}
	}
	big := strings.Repeat("b", 200<<10) + "\n" // past the relay's 32 KiB buffer
	go io.WriteString(c, big)
	if got, err := br.ReadString('\n'); got != big {
		t.Fatalf("big message: read %d bytes, %v; want %d", len(got), err, len(big))
	}
	c.(*net.TCPConn).CloseWrite()
	if rest, err := io.ReadAll(br); err != nil || len(rest) != 0 {
		t.Fatalf("after half-close: read %q, %v; want a clean EOF", rest, err)
	}
	if err := <-nodeDone; err != nil {
		t.Fatalf("node: %v", err)
	}
}

// TestUpgradeTeardownStuckNode: the node half-closes and never reads
// while the client keeps sending, so the client-to-node relay blocks in a
// write. The session must still end, and the client's connection close.
func TestUpgradeTeardownStuckNode(t *testing.T) {
	leakcheck.Check(t)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	release := make(chan struct{})
	stalled := make(chan struct{}) // the client's writes stopped getting through
	nodeDone := make(chan struct{})
	go func() {
		defer close(nodeDone)
		c, err := ln.Accept()
		if err != nil {
			return
		}
		defer c.Close()
		if _, err := http.ReadRequest(bufio.NewReader(c)); err != nil {
			return
		}
		io.WriteString(c, "HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: x-echo\r\n\r\n")
		<-stalled
		c.(*net.TCPConn).CloseWrite()
		<-release // never reads
	}()
	t.Cleanup(func() { close(release); <-nodeDone })

	c := dialUpgradeProxy(t, ln.Addr().String())
	c.SetDeadline(time.Now().Add(10 * time.Second))
	io.WriteString(c, "GET /x HTTP/1.1\r\nHost: echo\r\nConnection: Upgrade\r\nUpgrade: x-echo\r\n\r\n")
	br := bufio.NewReader(c)
	if resp, err := http.ReadResponse(br, nil); err != nil || resp.StatusCode != http.StatusSwitchingProtocols {
		t.Fatalf("handshake: %v, %v; want 101", resp, err)
	}
	// Fill the node's socket buffers until the relay's write blocks.
	writeErr := make(chan error, 1)
	var sent atomic.Int64
	go func() {
		chunk := make([]byte, 64<<10)
		for {
			n, err := c.Write(chunk)
			sent.Add(int64(n))
			if err != nil {
				writeErr <- err
				return
			}
		}
	}()
	for last := int64(-1); ; {
		time.Sleep(100 * time.Millisecond)
		if n := sent.Load(); n == last {
			break // every buffer on the way is full: the relay's write blocks
		} else {
			last = n
		}
	}
	close(stalled)
	// The node's half-close ends the session: the client sees EOF, then
	// its connection closed under its writes.
	if _, err := io.ReadAll(br); err != nil {
		t.Fatalf("read after the node half-closed: %v, want EOF", err)
	}
	select {
	case err := <-writeErr:
		if errors.Is(err, os.ErrDeadlineExceeded) {
			t.Fatal("the sidecar never closed the client's connection: its teardown is stuck")
		}
	case <-time.After(15 * time.Second):
		t.Fatal("client writes never failed")
	}
}

// dialUpgradeProxy starts a proxy listener routing service "echo" to node
// and returns a client connection to it, closed when the test ends.
func dialUpgradeProxy(t *testing.T, node string) net.Conn {
	t.Helper()
	cache := staticCache(t, map[string][]string{"echo": {node}})
	p := New(cache, nil, testLogger(t))
	up, err := p.Upstream("upstream", RouteConfig{Service: "echo"})
	if err != nil {
		t.Fatal(err)
	}
	srv := startProxyServer(t, up)
	c, err := net.Dial("tcp", strings.TrimPrefix(srv.URL, "http://"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// wsNode is a WebSocket echo node on loopback.
type wsNode struct {
	addr string
	// ended gets the error that ended each session, as the node saw it.
	ended chan error
}

// startWSNode starts a wsNode, over TLS when useTLS; it stops when the test
// ends, after its sessions.
func startWSNode(t testing.TB, useTLS bool) *wsNode {
	t.Helper()
	n := &wsNode{ended: make(chan error, 16)}
	h := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		c, err := websocket.Accept(w, r, nil)
		if err != nil {
			return
		}
		defer c.CloseNow()
		ctx := context.Background()
		for {
			typ, data, err := c.Read(ctx)
			if err == nil {
				err = c.Write(ctx, typ, data)
			}
			if err != nil {
				n.ended <- err
				return
			}
		}
	})
	srv := httptest.NewUnstartedServer(h)
	if useTLS {
		srv.StartTLS()
	} else {
		srv.Start()
	}
	t.Cleanup(srv.Close)
	n.addr = srv.Listener.Addr().String()
	return n
}

// wsDial opens a WebSocket through the proxy listener at url.
func wsDial(t testing.TB, ctx context.Context, url string) *websocket.Conn {
	t.Helper()
	c, _, err := websocket.Dial(ctx, "ws"+strings.TrimPrefix(url, "http")+"/ws", &websocket.DialOptions{
		HTTPClient: &http.Client{Transport: &http.Transport{}},
	})
	if err != nil {
		t.Fatalf("websocket.Dial() error = %v", err)
	}
	t.Cleanup(func() { c.CloseNow() })
	return c
}

// wsEcho sends msg on c and reads it back.
func wsEcho(ctx context.Context, c *websocket.Conn, msg string) error {
	if err := c.Write(ctx, websocket.MessageText, []byte(msg)); err != nil {
		return fmt.Errorf("write: %w", err)
	}
	_, got, err := c.Read(ctx)
	if err != nil {
		return fmt.Errorf("read: %w", err)
	}
	if string(got) != msg {
		return fmt.Errorf("read %q, want %q", got, msg)
	}
	return nil
}

// TestUpgradeRefusedDialsOpenBreaker: a WebSocket handshake whose dial a
// node refuses counts against the node's breaker and toward its ejection,
// and goes to another node; after the threshold, handshakes no longer try
// the dead node.
func TestUpgradeRefusedDialsOpenBreaker(t *testing.T) {
	for _, tc := range connResilience {
		t.Run(tc.name, func(t *testing.T) {
			res := connResDefaults(t)
			tc.tune(&res)
			live := startWSNode(t, false)
			dead := resDeadAddr(t)
			s := resProxy(t, []string{live.addr, dead}, RouteConfig{Resilience: res})
			fc := countFailures(s.px.routes[0])
			ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
			defer cancel()
			for i := range 20 {
				c := wsDial(t, ctx, s.url)
				if err := wsEcho(ctx, c, fmt.Sprintf("hello %d", i)); err != nil {
					t.Fatalf("session #%d: %v", i, err)
				}
				c.Close(websocket.StatusNormalClosure, "")
			}
			tc.check(t, s, dead)
			if got := fc.failures(dead); got != 3 {
				t.Errorf("dials to the dead node = %d, want 3: none once it is out of the way", got)
			}
			if got := s.metric(t, "sidecar_retries_total", map[string]string{"reason": "connect_failed", "outcome": "retried"}); got != 3 {
				t.Errorf("sidecar_retries_total{connect_failed, retried} = %v, want 3", got)
			}
		})
	}
}

// TestUpgradeTunnelTimeout: an upgraded connection through which no byte
// has moved either way for timeouts.tunnel is closed, at the app's end and
// at the node's, while one whose messages go on past it stays open; both
// over a relay loop (a plaintext node) and over a goroutine per direction
// (a node reached over TLS).
func TestUpgradeTunnelTimeout(t *testing.T) {
	for _, tc := range []struct {
		name   string
		useTLS bool
	}{
		{"relay loop", false},
		{"goroutines", true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			leakcheck.Check(t)
			// Long beside the busy session's pings, so that a stall of a
			// loaded machine does not pass for silence.
			const tunnel = time.Second
			node := startWSNode(t, tc.useTLS)
			rc := RouteConfig{Service: "echo", Timeouts: Timeouts{Tunnel: tunnel}}
			if tc.useTLS {
				rc.TLS = &config.TLS{InsecureSkipVerify: true}
			}
			p := New(staticCache(t, map[string][]string{"echo": {node.addr}}), nil, testLogger(t))
			up, err := p.Upstream("upstream", rc)
			if err != nil {
				t.Fatal(err)
			}
			srv := startProxyServer(t, up)
			ctx, cancel := context.WithTimeout(t.Context(), 20*time.Second)
			defer cancel()

			busy := wsDial(t, ctx, srv.URL)
			quiet := wsDial(t, ctx, srv.URL)
			quietSince := time.Now()
			if err := wsEcho(ctx, quiet, "once"); err != nil {
				t.Fatalf("quiet session: %v", err)
			}
			for start := time.Now(); time.Since(start) < 2*tunnel; time.Sleep(tunnel / 10) {
				if err := wsEcho(ctx, busy, "ping"); err != nil {
					t.Fatalf("busy session after %v: %v", time.Since(start), err)
				}
			}

			readCtx, cancelRead := context.WithTimeout(ctx, 5*time.Second)
			defer cancelRead()
			_, _, err = quiet.Read(readCtx)
			if readCtx.Err() != nil {
				t.Fatalf("quiet session still open %v after the tunnel timeout (%v)", time.Since(quietSince)-tunnel, tunnel)
			}
			if err == nil {
				t.Fatal("quiet session read a message, want it closed")
			}
			if d := time.Since(quietSince); d < tunnel {
				t.Errorf("quiet session closed after %v, before the tunnel timeout (%v)", d, tunnel)
			}
			select {
			case <-node.ended:
			case <-time.After(5 * time.Second):
				t.Fatal("the node's end of the quiet session is still open")
			}
			if err := wsEcho(ctx, busy, "still there"); err != nil {
				t.Fatalf("busy session after the quiet one closed: %v", err)
			}
			busy.Close(websocket.StatusNormalClosure, "")
			select {
			case <-node.ended:
			case <-time.After(5 * time.Second):
				t.Fatal("the node's end of the busy session is still open after it closed")
			}
		})
	}
}

// TestUpgradeGatewayAnswerEjects: a node that answers a handshake with a
// 503 has the answer relayed, and counted toward its ejection as any
// request's 503 is.
func TestUpgradeGatewayAnswerEjects(t *testing.T) {
	res := connResDefaults(t)
	res.Outlier.Enabled = true
	res.Outlier.ConsecutiveFailures = 3
	res.Outlier.BaseEjection = time.Minute
	live := startWSNode(t, false)
	bad := resStartNodes(t, 1)[0]
	bad.status.Store(http.StatusServiceUnavailable)
	s := resProxy(t, []string{live.addr, bad.addr}, RouteConfig{Resilience: res})
	ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
	defer cancel()
	refused := 0
	for i := range 20 {
		c, resp, err := websocket.Dial(ctx, "ws"+strings.TrimPrefix(s.url, "http")+"/ws", nil)
		if err != nil {
			if resp == nil || resp.StatusCode != http.StatusServiceUnavailable {
				t.Fatalf("handshake #%d: %v, want a 101 or the node's 503", i, err)
			}
			refused++
			continue
		}
		if err := wsEcho(ctx, c, "hello"); err != nil {
			t.Fatalf("session #%d: %v", i, err)
		}
		c.Close(websocket.StatusNormalClosure, "")
	}
	if refused != 3 {
		t.Errorf("handshakes answered 503 = %d, want 3, then the node ejected", refused)
	}
	if got := s.ejected(); len(got) != 1 || got[0] != bad.addr {
		t.Errorf("ejected endpoints = %v, want [%s]", got, bad.addr)
	}
}

// TestUpgradeRetryCountedWhenSent: a WebSocket handshake whose dial is
// refused is retried on another node, and the retry counts in
// sidecar_retries_total once a node is picked for it; one decided on when
// no node is left is never sent, and not counted. The handshake fails with
// a 502.
func TestUpgradeRetryCountedWhenSent(t *testing.T) {
	tests := []struct {
		name  string
		nodes int // all refusing
		want  float64
	}{
		{"the only node refuses", 1, 0},
		{"both nodes refuse", 2, 1},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			res := connResDefaults(t)
			res.Retries.Attempts = 3
			var addrs []string
			for range tc.nodes {
				addrs = append(addrs, resDeadAddr(t))
			}
			s := resProxy(t, addrs, RouteConfig{Resilience: res})
			ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
			defer cancel()
			const handshakes = 3
			for i := range handshakes {
				c, resp, err := websocket.Dial(ctx, "ws"+strings.TrimPrefix(s.url, "http")+"/ws", &websocket.DialOptions{
					HTTPClient: &http.Client{Transport: &http.Transport{}},
				})
				if err == nil {
					c.CloseNow()
					t.Fatalf("handshake %d: websocket.Dial() succeeded, want a 502", i)
				}
				if resp == nil || resp.StatusCode != http.StatusBadGateway {
					t.Fatalf("handshake %d: websocket.Dial() = %v, %v; want a 502", i, resp, err)
				}
			}
			if got, want := s.metric(t, "sidecar_retries_total", map[string]string{"reason": "connect_failed", "outcome": "retried"}), tc.want*handshakes; got != want {
				t.Errorf("sidecar_retries_total{connect_failed, retried} = %v, want %v: only the retries sent to a node", got, want)
			}
		})
	}
}
