package h2

// Tests of the sidecar's own HTTP/2 engine (conn.go, server.go,
// client.go): real Go h2c peers where the behaviour is end to end, and raw
// framers, as client or node, where a test needs frames the Go peers never
// send or must see exactly which frames the sidecar sends.

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/net/http2"

	"github.com/sidecarlb/sidecar/internal/h2/h2test"
	"github.com/sidecarlb/sidecar/internal/leakcheck"
)

// TestH2PoolRetired: a request that reaches a pool just retired (it picked
// the node before the node left) is still served, on a connection of its
// own that closes once it is done, as on the HTTP/1.1 pool.
func TestH2PoolRetired(t *testing.T) {
	leakcheck.Check(t)
	node := h2test.StartH2C(t, nodeHandler("node-0"), nil)
	p := NewPool(time.Second, 0, nil, testLogger(t))
	get := func() error {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		req, _ := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+node.Addr+"/r", nil)
		errc := make(chan error, 1)
		go func() {
			resp, err := p.RoundTrip(req)
			if err != nil {
				errc <- err
				return
			}
			body, err := io.ReadAll(resp.Body)
			resp.Body.Close()
			if err == nil && (resp.StatusCode != http.StatusOK || string(body) != "node-0 GET /r") {
				err = fmt.Errorf("answer %d %q, want 200", resp.StatusCode, body)
			}
			errc <- err
		}()
		select {
		case err := <-errc:
			return err
		case <-time.After(10 * time.Second):
			return errors.New("roundTrip did not return")
		}
	}
	if err := get(); err != nil {
		t.Fatal(err)
	}
	p.Retire()
	resWait(t, 5*time.Second, "the idle connection to close", func() bool { return node.Closes.Load() == 1 })
	if err := get(); err != nil {
		t.Fatalf("request on the retired pool: %v", err)
	}
	if got := node.Accepts.Load(); got != 2 {
		t.Errorf("node connections = %d, want 2: one for the request on the retired pool", got)
	}
	resWait(t, 5*time.Second, "its connection to close", func() bool { return node.Closes.Load() == 2 })
}

// TestH2SilentNodePinged: a node that stops answering altogether, neither
// its stream nor pings, as a vanished host does, has its connection closed
// once a ping goes unanswered. The request in flight fails naming the ping
// instead of hanging (it has no deadline), and the next request dials the
// node afresh.
func TestH2SilentNodePinged(t *testing.T) {
	leakcheck.Check(t)
	stop := make(chan struct{})
	var streams atomic.Int64
	silent := h2test.StartRawNode(t, func(fr *http2.Framer, f *http2.MetaHeadersFrame) {
		streams.Add(1)
		<-stop // reads nothing more: no answer, no ping ack
	})
	t.Cleanup(func() { close(stop) }) // runs before the node's cleanup
	p := NewPool(time.Second, 0, nil, testLogger(t))
	p.SetPing(100*time.Millisecond, 100*time.Millisecond)
	t.Cleanup(p.Retire)
	for i := range 2 {
		start := time.Now()
		req, _ := http.NewRequest(http.MethodGet, "http://"+silent.Addr+"/hang", nil)
		resp, err := p.RoundTrip(req)
		if err == nil {
			resp.Body.Close()
		}
		took := time.Since(start)
		if err == nil || !strings.Contains(err.Error(), "did not answer a ping") {
			t.Errorf("request %d to a silent node: error = %v, want one saying the ping went unanswered", i, err)
		}
		if took > 5*time.Second {
			t.Errorf("request %d took %v, want it ended by the ping timeout (≈ 0.3 s)", i, took)
		}
	}
	if got := streams.Load(); got != 2 {
		t.Errorf("silent node got %d streams, want 2: one per request", got)
	}
}

// TestH2PoolIdleClose: a pooled HTTP/2 connection with no stream open for
// the idle timeout is closed, timed from the end of its last stream (one
// stream outlasts the timeout here), with no request coming to find it.
func TestH2PoolIdleClose(t *testing.T) {
	leakcheck.Check(t)
	const idle = 200 * time.Millisecond
	node := h2test.StartH2C(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		time.Sleep(2 * idle)
		io.WriteString(w, "slow")
	}), nil)
	p := NewPool(time.Second, idle, nil, testLogger(t))
	t.Cleanup(p.Retire)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	req, _ := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+node.Addr+"/slow", nil)
	resp, err := p.RoundTrip(req)
	if err != nil {
		t.Fatal(err)
	}
	body, err := io.ReadAll(resp.Body)
	resp.Body.Close()
	if err != nil || string(body) != "slow" {
		t.Fatalf("body = %q, %v; want \"slow\"", body, err)
	}
	if got := node.Closes.Load(); got != 0 {
		t.Fatalf("node connections closed as the stream ended = %d, want 0 (idle for less than %v)", got, idle)
	}
	resWait(t, 5*time.Second, "the idle connection to close", func() bool { return node.Closes.Load() == 1 })
}
