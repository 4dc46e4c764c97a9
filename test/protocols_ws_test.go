package test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net/http"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/sidecarlb/sidecar/internal/leakcheck"

	"github.com/coder/websocket"

	"github.com/sidecarlb/sidecar/proxy"
	"github.com/sidecarlb/sidecar/test/consulagent"
)

// protoWSNode is a WebSocket echo node that names itself in the X-Node
// header of its handshake. The text message "close-me" makes it close the
// connection with status 4000.
type protoWSNode struct {
	id   string
	addr string

	closeStatus atomic.Int32 // the status of the last close the node received
}

const protoWSReadLimit = 4 << 20

// protoWS starts a WebSocket echo node on loopback (HTTP/1.1). It stops
// when the test ends, once every connection has ended.
func protoWS(tb testing.TB, id string) *protoWSNode {
	tb.Helper()
	n := &protoWSNode{id: id}
	n.closeStatus.Store(-1)
	var conns sync.WaitGroup
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("X-Node", id)
		c, err := websocket.Accept(w, r, nil)
		if err != nil {
			return
		}
		conns.Add(1)
		defer conns.Done()
		defer c.CloseNow()
		c.SetReadLimit(protoWSReadLimit)
		ctx := context.Background()
		for {
			typ, data, err := c.Read(ctx)
			if err != nil {
				n.closeStatus.Store(int32(websocket.CloseStatus(err)))
				return
			}
			if typ == websocket.MessageText && string(data) == "close-me" {
				_ = c.Close(4000, "asked to close")
				return
			}
			if err := c.Write(ctx, typ, data); err != nil {
				return
			}
		}
	})}
	ln := protoListen(tb)
	n.addr = ln.Addr().String()
	tb.Cleanup(conns.Wait) // after the server's cleanup below: cleanups run last first
	protoServeOn(tb, func() error { return srv.Serve(ln) }, func() { srv.Close() })
	return n
}

func (n *protoWSNode) address() string { return n.addr }

// protoDialWS opens a WebSocket to addr with header and returns it with the
// node that answered the handshake. It is closed when the test ends.
func protoDialWS(tb testing.TB, ctx context.Context, addr string, header http.Header) (*websocket.Conn, string) {
	tb.Helper()
	c, resp, err := websocket.Dial(ctx, "ws://"+addr+"/echo", &websocket.DialOptions{
		HTTPClient: &http.Client{Transport: &http.Transport{}},
		HTTPHeader: header,
	})
	if err != nil {
		tb.Fatalf("websocket.Dial(%s) error = %v", addr, err)
	}
	tb.Cleanup(func() { c.CloseNow() })
	c.SetReadLimit(protoWSReadLimit)
	return c, resp.Header.Get("X-Node")
}

// protoWSEcho sends a message and expects it back.
func protoWSEcho(tb testing.TB, ctx context.Context, c *websocket.Conn, typ websocket.MessageType, data []byte) {
	tb.Helper()
	if err := c.Write(ctx, typ, data); err != nil {
		tb.Fatalf("Write(%v, %d bytes) error = %v", typ, len(data), err)
	}
	gotTyp, got, err := c.Read(ctx)
	if err != nil {
		tb.Fatalf("Read() after %v of %d bytes error = %v", typ, len(data), err)
	}
	if gotTyp != typ || !bytes.Equal(got, data) {
		tb.Fatalf("Read() = %v of %d bytes, want %v of %d bytes", gotTyp, len(got), typ, len(data))
	}
}

// TestProtocolWebSocket carries WebSocket sessions through an upstream
// listener (protocol http) to a real echo server.
func TestProtocolWebSocket(t *testing.T) {
	leakcheck.Check(t)
	node := protoWS(t, "node-0")
	res := protoStatic(t, map[string][]string{"ws-echo": {node.addr}})
	addr := protoUpstream(t, res, proxy.RouteConfig{Service: "ws-echo", Protocol: "http"})

	t.Run("messages both ways", func(t *testing.T) {
		ctx := protoCtx(t, 10*time.Second)
		c, id := protoDialWS(t, ctx, addr, nil)
		if id != node.id {
			t.Errorf("handshake X-Node = %q, want %q", id, node.id)
		}
		protoWSEcho(t, ctx, c, websocket.MessageText, []byte("hello, ünïcode"))
		bin := make([]byte, 256)
		for i := range bin {
			bin[i] = byte(i)
		}
		protoWSEcho(t, ctx, c, websocket.MessageBinary, bin)
		protoWSEcho(t, ctx, c, websocket.MessageBinary, bytes.Repeat([]byte{0xA5}, 1<<20))
		protoWSEcho(t, ctx, c, websocket.MessageText, []byte{})

		// Many in flight at once, in order.
		const n = 200
		errc := make(chan error, 1)
		go func() {
			for i := range n {
				if err := c.Write(ctx, websocket.MessageText, []byte(protoBidiMsg(i))); err != nil {
					errc <- err
					return
				}
			}
			errc <- nil
		}()
		for i := range n {
			_, got, err := c.Read(ctx)
			if err != nil {
				t.Fatalf("Read() #%d error = %v", i, err)
			}
			if want := protoBidiMsg(i); string(got) != want {
				t.Fatalf("Read() #%d = %q, want %q", i, got, want)
			}
		}
		if err := <-errc; err != nil {
			t.Fatalf("Write() error = %v", err)
		}

		if err := c.Close(websocket.StatusNormalClosure, "done"); err != nil {
			t.Errorf("Close() error = %v, want a clean close handshake", err)
		}
		consulagent.WaitFor(t, 5*time.Second, "the node to see the close", func() bool {
			return websocket.StatusCode(node.closeStatus.Load()) == websocket.StatusNormalClosure
		})
	})

	t.Run("node closes", func(t *testing.T) {
		ctx := protoCtx(t, 10*time.Second)
		c, _ := protoDialWS(t, ctx, addr, nil)
		protoWSEcho(t, ctx, c, websocket.MessageText, []byte("before"))
		if err := c.Write(ctx, websocket.MessageText, []byte("close-me")); err != nil {
			t.Fatalf("Write() error = %v", err)
		}
		_, _, err := c.Read(ctx)
		var ce websocket.CloseError
		if !errors.As(err, &ce) || ce.Code != 4000 || ce.Reason != "asked to close" {
			t.Errorf("Read() error = %v, want close 4000 %q", err, "asked to close")
		}
	})
}

// TestProtocolWebSocketHash: with the hash balancer keyed on a header, every
// connection of one user reaches the same node, picked at the handshake.
func TestProtocolWebSocketHash(t *testing.T) {
	leakcheck.Check(t)
	nodes := []*protoWSNode{protoWS(t, "node-0"), protoWS(t, "node-1"), protoWS(t, "node-2")}
	res := protoStatic(t, map[string][]string{"ws-echo": protoAddrs(nodes)})
	addr := protoUpstream(t, res, proxy.RouteConfig{Service: "ws-echo", Protocol: "http",
		Balancer: "hash", HashKey: "header:X-User"})
	ctx := protoCtx(t, 20*time.Second)

	used := map[string]bool{}
	for u := range 12 {
		user := fmt.Sprintf("user-%d", u)
		first := ""
		for i := range 4 {
			c, id := protoDialWS(t, ctx, addr, http.Header{"X-User": {user}})
			protoWSEcho(t, ctx, c, websocket.MessageText, []byte(user))
			if err := c.Close(websocket.StatusNormalClosure, ""); err != nil {
				t.Errorf("Close() error = %v", err)
			}
			if i == 0 {
				first = id
			} else if id != first {
				t.Errorf("connection %d of %s reached %q, want %q like the first", i, user, id, first)
			}
		}
		used[first] = true
	}
	if len(used) < 2 {
		t.Errorf("12 users reached nodes %v, want them spread over more than one", used)
	}
}
