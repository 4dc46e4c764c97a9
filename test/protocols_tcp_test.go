package test

import (
	"bufio"
	"bytes"
	"context"
	"io"
	"math/rand/v2"
	"net"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/sidecarlb/sidecar/internal/leakcheck"

	"go.uber.org/zap"

	"github.com/sidecarlb/sidecar/proxy"
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
	ln := protoListen(tb)
	n := &protoTCPNode{id: id, addr: ln.Addr().String()}
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
				if _, err := io.WriteString(c, id+"\n"); err != nil {
					return
				}
				if _, err := io.Copy(c, c); err != nil {
					return
				}
				_ = c.(*net.TCPConn).CloseWrite()
				// Wait for the client to close before closing.
				_, _ = io.Copy(io.Discard, c)
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
	return n
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
	done := make(chan struct{})
	go func() {
		defer close(done)
		_ = srv.Serve(ln)
	}()
	tb.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		if err := srv.Shutdown(ctx); err != nil {
			tb.Errorf("Shutdown() error = %v", err)
		}
		<-done
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
