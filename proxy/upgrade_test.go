package proxy

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/sidecarlb/sidecar/internal/leakcheck"
)

// TestUpgradeRelay drives a protocol upgrade through the proxy with raw
// sockets on both sides: bytes that ride along with either handshake,
// thousands of strict ping-pong rounds (where a relay that waited without
// reading after a message would stall), a message larger than the relay's
// buffer, and half-close both ways.
func TestUpgradeRelay(t *testing.T) {
	t.Run("idle", testUpgradeRelay)
	t.Run("busy", func(t *testing.T) {
		inFlight.Add(2) // ordinary system calls, as under load
		defer inFlight.Add(-2)
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
