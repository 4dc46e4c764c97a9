package test

import (
	"bufio"
	"bytes"
	"context"
	"encoding/binary"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/netip"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/sidecarlb/sidecar/internal/leakcheck"

	"go.uber.org/zap"

	"github.com/sidecarlb/sidecar/proxy"
	"github.com/sidecarlb/sidecar/test/consulagent"
	"github.com/sidecarlb/sidecar/test/harness"
)

// protoTCPNode is a TCP echo node: it first writes its id and a newline,
// then echoes what it reads, and half-closes its side once the client has.
type protoTCPNode struct {
	id   string
	addr string
}

func (n *protoTCPNode) address() string { return n.addr }

// protoTCP starts a TCP echo node on loopback. It stops when the test ends,
// closing the connections still open.
func protoTCP(tb testing.TB, id string) *protoTCPNode {
	tb.Helper()
	addr := protoTCPServe(tb, func(c net.Conn) {
		if _, err := io.WriteString(c, id+"\n"); err != nil {
			return
		}
		protoTCPEcho(c)
	})
	return &protoTCPNode{id: id, addr: addr}
}

// protoTCPServe serves each connection accepted on a loopback listener with
// handle, then closes it, and returns the listener's address. It stops when
// the test ends, closing the connections still open.
func protoTCPServe(tb testing.TB, handle func(net.Conn)) string {
	tb.Helper()
	ln := protoListen(tb)
	var (
		wg    sync.WaitGroup
		mu    sync.Mutex
		conns = map[net.Conn]struct{}{}
	)
	wg.Go(func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			mu.Lock()
			conns[c] = struct{}{}
			mu.Unlock()
			wg.Go(func() {
				defer func() {
					mu.Lock()
					delete(conns, c)
					mu.Unlock()
					c.Close()
				}()
				handle(c)
			})
		}
	})
	tb.Cleanup(func() {
		ln.Close()
		mu.Lock()
		for c := range conns {
			c.Close()
		}
		mu.Unlock()
		wg.Wait()
	})
	return ln.Addr().String()
}

// protoTCPEcho echoes what c reads, half-closes c once the client has, and
// waits for the client to close.
func protoTCPEcho(c net.Conn) {
	if _, err := io.Copy(c, c); err != nil {
		return
	}
	_ = c.(*net.TCPConn).CloseWrite()
	_, _ = io.Copy(io.Discard, c)
}

// protoTCPUpstream starts a TCP upstream listener of the sidecar and
// returns its address.
func protoTCPUpstream(tb testing.TB, addrs []string, balancer string) string {
	tb.Helper()
	res := protoStatic(tb, map[string][]string{"tcp-echo": addrs})
	px := proxy.New(res, nil, zap.NewNop())
	srv, err := px.TCP("upstream-tcp-echo", proxy.RouteConfig{Service: "tcp-echo", Protocol: "tcp", Balancer: balancer})
	if err != nil {
		tb.Fatal(err)
	}
	ln := protoListen(tb)
	protoServeOn(tb, func() error { return srv.Serve(ln) }, func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		if err := srv.Shutdown(ctx); err != nil {
			tb.Errorf("Shutdown() error = %v", err)
		}
	})
	return ln.Addr().String()
}

// protoTCPSession dials addr through the sidecar, sends payload while
// reading the echo, half-closes, and returns the node that answered and
// what came back up to EOF.
func protoTCPSession(tb testing.TB, addr string, payload []byte) (string, []byte) {
	tb.Helper()
	c, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		tb.Fatalf("dial %s: %v", addr, err)
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(10 * time.Second))
	r := bufio.NewReader(c)
	id, err := r.ReadString('\n')
	if err != nil {
		tb.Fatalf("read node id: %v", err)
	}
	werr := make(chan error, 1)
	go func() {
		_, err := c.Write(payload)
		if err == nil {
			err = c.(*net.TCPConn).CloseWrite()
		}
		werr <- err
	}()
	got, err := io.ReadAll(r) // up to the node's EOF
	if err != nil {
		tb.Fatalf("read echo: %v", err)
	}
	if err := <-werr; err != nil {
		tb.Fatalf("write and half-close: %v", err)
	}
	return strings.TrimSuffix(id, "\n"), got
}

// TestProtocolTCP carries raw TCP through a tcp upstream: bytes both ways,
// half-close passed on, one node per connection.
func TestProtocolTCP(t *testing.T) {
	leakcheck.Check(t)
	nodes := []*protoTCPNode{protoTCP(t, "node-0"), protoTCP(t, "node-1"), protoTCP(t, "node-2")}

	t.Run("half-close echo", func(t *testing.T) {
		addr := protoTCPUpstream(t, protoAddrs(nodes[:1]), "")
		payload := make([]byte, 4<<20)
		for i := range payload {
			payload[i] = byte(rand.Uint32())
		}
		for _, p := range [][]byte{payload, []byte("x"), nil} {
			id, got := protoTCPSession(t, addr, p)
			if id != nodes[0].id {
				t.Errorf("connection reached %q, want %q", id, nodes[0].id)
			}
			if !bytes.Equal(got, p) {
				t.Errorf("echo = %d bytes, want the %d bytes sent", len(got), len(p))
			}
		}
	})

	t.Run("connections spread over nodes", func(t *testing.T) {
		addr := protoTCPUpstream(t, protoAddrs(nodes), "round_robin")
		count := map[string]int{}
		for range 30 {
			id, got := protoTCPSession(t, addr, []byte("ping"))
			if string(got) != "ping" {
				t.Fatalf("echo = %q, want %q", got, "ping")
			}
			count[id]++
		}
		for _, n := range nodes {
			if count[n.id] != 10 {
				t.Errorf("node %s got %d connections, want 10 (all: %v)", n.id, count[n.id], count)
			}
		}
	})

	t.Run("refused dial moves on", func(t *testing.T) {
		dead := protoDeadPort(t)
		addr := protoTCPUpstream(t, []string{nodes[0].addr, dead, nodes[1].addr}, "round_robin")
		count := map[string]int{}
		for range 21 {
			id, got := protoTCPSession(t, addr, []byte("ping"))
			if string(got) != "ping" {
				t.Fatalf("echo = %q, want %q", got, "ping")
			}
			count[id]++
		}
		if count[nodes[0].id] == 0 || count[nodes[1].id] == 0 || count[nodes[0].id]+count[nodes[1].id] != 21 {
			t.Errorf("connections per node = %v, want all 21 on %s and %s", count, nodes[0].id, nodes[1].id)
		}
	})
}

// protoPPSignature opens a PROXY protocol v2 header (HAProxy's spec,
// section 2.2).
var protoPPSignature = [12]byte{'\r', '\n', '\r', '\n', 0, '\r', '\n', 'Q', 'U', 'I', 'T', '\n'}

// protoPPNode is a TCP node that parses a PROXY protocol v2 header itself,
// as a node behind HAProxy would. It waits for the connection's first 12
// bytes. When they are the v2 signature, it reads the rest of the header
// and writes "proxy SRC DST PEER\n", SRC and DST from the header and PEER
// the connection's own remote address (or "local\n" for a LOCAL header);
// otherwise it writes "no header\n" and those 12 bytes back. Either way it
// then echoes, and half-closes once the client has.
type protoPPNode struct {
	addr     string
	accepted atomic.Int64
}

// protoPPTCP starts a protoPPNode on loopback. It stops when the test ends,
// closing the connections still open.
func protoPPTCP(tb testing.TB) *protoPPNode {
	tb.Helper()
	n := &protoPPNode{}
	n.addr = protoTCPServe(tb, func(c net.Conn) {
		n.accepted.Add(1)
		_ = c.SetDeadline(time.Now().Add(10 * time.Second))
		var first [12]byte
		if _, err := io.ReadFull(c, first[:]); err != nil {
			return
		}
		if first != protoPPSignature {
			if _, err := io.WriteString(c, "no header\n"); err != nil {
				return
			}
			if _, err := c.Write(first[:]); err != nil {
				return
			}
		} else {
			line, err := protoPPRead(c)
			if err != nil {
				_, _ = io.WriteString(c, "bad header: "+err.Error()+"\n")
				return
			}
			if _, err := io.WriteString(c, line+"\n"); err != nil {
				return
			}
		}
		protoTCPEcho(c)
	})
	return n
}

// protoPPRead reads the rest of a PROXY protocol v2 header from c, after
// its signature, and describes it.
func protoPPRead(c net.Conn) (string, error) {
	var fixed [4]byte
	if _, err := io.ReadFull(c, fixed[:]); err != nil {
		return "", err
	}
	verCmd, family := fixed[0], fixed[1]
	block := make([]byte, binary.BigEndian.Uint16(fixed[2:]))
	if _, err := io.ReadFull(c, block); err != nil {
		return "", err
	}
	var src, dst netip.AddrPort
	switch {
	case verCmd == 0x20: // LOCAL: the receiver ignores the address block
		return "local", nil
	case verCmd != 0x21:
		return "", fmt.Errorf("version and command %#x, want 0x21 (v2 PROXY)", verCmd)
	case family == 0x11 && len(block) >= 12: // TCP over IPv4
		src = netip.AddrPortFrom(netip.AddrFrom4([4]byte(block[0:4])), binary.BigEndian.Uint16(block[8:10]))
		dst = netip.AddrPortFrom(netip.AddrFrom4([4]byte(block[4:8])), binary.BigEndian.Uint16(block[10:12]))
	case family == 0x21 && len(block) >= 36: // TCP over IPv6
		src = netip.AddrPortFrom(netip.AddrFrom16([16]byte(block[0:16])), binary.BigEndian.Uint16(block[32:34]))
		dst = netip.AddrPortFrom(netip.AddrFrom16([16]byte(block[16:32])), binary.BigEndian.Uint16(block[34:36]))
	default:
		return "", fmt.Errorf("family %#x with %d address bytes", family, len(block))
	}
	return fmt.Sprintf("proxy %s %s %s", src, dst, c.RemoteAddr()), nil
}

// protoPPResult is what one connection through the sidecar saw.
type protoPPResult struct {
	line          string // the node's first line
	echo          []byte // what came back after it, up to EOF
	local, remote string // the client connection's own addresses
}

// protoPPSession connects to the sidecar listener at addr with d and sends
// payload, then half-closes. When silent, it first reads the node's line
// without having sent a byte.
func protoPPSession(t *testing.T, d *net.Dialer, addr string, payload []byte, silent bool) protoPPResult {
	t.Helper()
	c, err := d.Dial("tcp", addr)
	if err != nil {
		t.Fatalf("dial %s: %v", addr, err)
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(10 * time.Second))
	res := protoPPResult{local: c.LocalAddr().String(), remote: c.RemoteAddr().String()}
	r := bufio.NewReader(c)
	readLine := func() {
		line, err := r.ReadString('\n')
		if err != nil {
			t.Fatalf("read the node's first line: %v (got %q)", err, line)
		}
		res.line = strings.TrimSuffix(line, "\n")
	}
	if silent {
		readLine()
	}
	if _, err := c.Write(payload); err != nil {
		t.Fatalf("write: %v", err)
	}
	if err := c.(*net.TCPConn).CloseWrite(); err != nil {
		t.Fatalf("half-close: %v", err)
	}
	if !silent {
		readLine()
	}
	if res.echo, err = io.ReadAll(r); err != nil {
		t.Fatalf("read echo: %v", err)
	}
	return res
}

// TestProtocolTCPProxyProtocol runs the sidecar binary against a Consul
// agent, with two tcp upstreams of one service: one with proxy_protocol: v2
// and one without. Its node parses PROXY v2 itself. With v2, the node reads
// the app's own source address and the listener address from the header
// before the app has sent a byte, exactly once per connection, also on
// connections that first tried a node refusing them. Without it, the node
// reads the app's bytes and nothing else.
func TestProtocolTCPProxyProtocol(t *testing.T) {
	agent := consulagent.Start(t, consulagent.Options{})
	harness.Binaries(t)
	node := protoPPTCP(t)
	dead := protoDeadPort(t)
	consul := agent.Client()
	protoRegister(t, consul, "pp-echo", "pp-live", node.addr)
	protoRegister(t, consul, "pp-echo", "pp-dead", dead)
	consulagent.WaitFor(t, 10*time.Second, "both nodes of pp-echo passing", func() bool {
		entries, _, err := consul.Health().Service("pp-echo", "", true, nil)
		return err == nil && len(entries) == 2
	})
	admin, on, off := pxLoopback(t), pxLoopback(t), pxLoopback(t)
	harness.StartSidecar(t, admin, fmt.Sprintf(`consul:
  address: %s
admin:
  listen: %s
upstreams:
  - name: pp-echo
    listen: %s
    protocol: tcp
    proxy_protocol: v2
  - name: pp-echo
    listen: %s
    protocol: tcp
`, agent.Addr(), admin, on, off))
	// The app connects from 127.0.0.2, the sidecar reaches the node from
	// 127.0.0.1: the header's source can only be the app's.
	d := &net.Dialer{Timeout: 5 * time.Second, LocalAddr: &net.TCPAddr{IP: net.IPv4(127, 0, 0, 2)}}
	sessions := 0

	t.Run("v2 header names the app", func(t *testing.T) {
		// Round robin over the refusing and the live node advances on every
		// pick, the one after a refused dial included: of any two
		// connections, at least one dials the refusing node first and moves
		// on. (TCP dials feed no breaker or outlier state, so /status cannot
		// show it.)
		for i := range 4 {
			payload := fmt.Appendf(nil, "payload %d, sent after the header was read", i)
			res := protoPPSession(t, d, on, payload, true)
			sessions++
			f := strings.Fields(res.line)
			if len(f) != 4 || f[0] != "proxy" {
				t.Fatalf("connection %d: node's line = %q, want \"proxy SRC DST PEER\"", i, res.line)
			}
			if src, dst := f[1], f[2]; src != res.local || dst != res.remote {
				t.Errorf("connection %d: header src, dst = %s, %s; want the app's %s, %s", i, src, dst, res.local, res.remote)
			}
			if peer, _, _ := net.SplitHostPort(f[3]); peer != "127.0.0.1" {
				t.Errorf("connection %d: node's peer = %s, want the sidecar on 127.0.0.1", i, f[3])
			}
			if !bytes.Equal(res.echo, payload) {
				t.Errorf("connection %d: echo = %q, want only the payload %q", i, res.echo, payload)
			}
		}
	})

	t.Run("off sends no header", func(t *testing.T) {
		for i := range 2 {
			payload := fmt.Appendf(nil, "no header expected before these bytes %d", i)
			res := protoPPSession(t, d, off, payload, false)
			sessions++
			if got := append([]byte(res.line+"\n"), res.echo...); !bytes.Equal(got, append([]byte("no header\n"), payload...)) {
				t.Errorf("connection %d: node answered %q, want \"no header\\n\" and the payload %q", i, got, payload)
			}
		}
	})

	if got := node.accepted.Load(); got != int64(sessions) {
		t.Errorf("node accepted %d connections, want %d: one per app connection", got, sessions)
	}
}
