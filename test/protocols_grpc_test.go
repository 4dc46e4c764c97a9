package test

import (
	"context"
	"errors"
	"fmt"
	"io"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/sidecarlb/sidecar/internal/leakcheck"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/interop/grpc_testing"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	"github.com/sidecarlb/sidecar/proxy"
	"github.com/sidecarlb/sidecar/test/consulagent"
)

// TestProtocolGRPC carries every kind of gRPC call through an upstream
// listener (protocol grpc) to a real grpc-go server.
func TestProtocolGRPC(t *testing.T) {
	leakcheck.Check(t)
	node := protoGRPC(t, "node-0")
	res := protoStatic(t, map[string][]string{"grpc-echo": {node.addr}})
	addr := protoUpstream(t, res, proxy.RouteConfig{Service: "grpc-echo", Protocol: "grpc"})
	client := protoDialGRPC(t, addr)

	tests := []struct {
		name string
		run  func(t *testing.T, ctx context.Context)
	}{
		{"unary", func(t *testing.T, ctx context.Context) {
			var hdr metadata.MD
			body := []byte("hello through the sidecar")
			resp, err := client.UnaryCall(ctx, &grpc_testing.SimpleRequest{Payload: &grpc_testing.Payload{Body: body}}, grpc.Header(&hdr))
			if err != nil {
				t.Fatalf("UnaryCall() error = %v", err)
			}
			if resp.GetServerId() != node.id || string(resp.GetPayload().GetBody()) != string(body) {
				t.Errorf("UnaryCall() = %q from %q, want %q from %q", resp.GetPayload().GetBody(), resp.GetServerId(), body, node.id)
			}
			if got := hdr.Get("x-node"); len(got) != 1 || got[0] != node.id {
				t.Errorf("header x-node = %v, want [%s]", got, node.id)
			}
		}},
		{"server streaming", func(t *testing.T, ctx context.Context) {
			sizes := []int32{0, 1, 100, 16 << 10, 1 << 20, 7, 64 << 10}
			req := &grpc_testing.StreamingOutputCallRequest{}
			for _, s := range sizes {
				req.ResponseParameters = append(req.ResponseParameters, &grpc_testing.ResponseParameters{Size: s})
			}
			stream, err := client.StreamingOutputCall(ctx, req)
			if err != nil {
				t.Fatalf("StreamingOutputCall() error = %v", err)
			}
			for i, s := range sizes {
				resp, err := stream.Recv()
				if err != nil {
					t.Fatalf("Recv() #%d error = %v", i, err)
				}
				want := strings.Repeat(string(rune('a'+i)), int(s))
				if got := string(resp.GetPayload().GetBody()); got != want {
					t.Fatalf("Recv() #%d = %d bytes, want %d bytes of %q", i, len(got), s, rune('a'+i))
				}
			}
			if _, err := stream.Recv(); !errors.Is(err, io.EOF) {
				t.Fatalf("Recv() after the last message error = %v, want io.EOF", err)
			}
		}},
		{"client streaming", func(t *testing.T, ctx context.Context) {
			stream, err := client.StreamingInputCall(ctx)
			if err != nil {
				t.Fatalf("StreamingInputCall() error = %v", err)
			}
			var want int32
			for i := range 50 {
				body := make([]byte, 1000+i)
				want += int32(len(body))
				if err := stream.Send(&grpc_testing.StreamingInputCallRequest{Payload: &grpc_testing.Payload{Body: body}}); err != nil {
					t.Fatalf("Send() #%d error = %v", i, err)
				}
			}
			resp, err := stream.CloseAndRecv()
			if err != nil {
				t.Fatalf("CloseAndRecv() error = %v", err)
			}
			if got := resp.GetAggregatedPayloadSize(); got != want {
				t.Errorf("AggregatedPayloadSize = %d, want %d", got, want)
			}
		}},
		{"bidi streaming lockstep", func(t *testing.T, ctx context.Context) {
			stream, err := client.FullDuplexCall(ctx)
			if err != nil {
				t.Fatalf("FullDuplexCall() error = %v", err)
			}
			for i := range 20 {
				msg := fmt.Sprintf("ping %d", i)
				if err := stream.Send(protoBidiReq(msg)); err != nil {
					t.Fatalf("Send(%q) error = %v", msg, err)
				}
				resp, err := stream.Recv()
				if err != nil {
					t.Fatalf("Recv() after %q error = %v", msg, err)
				}
				if got := string(resp.GetPayload().GetBody()); got != msg {
					t.Fatalf("Recv() = %q, want %q", got, msg)
				}
			}
			protoCloseBidi(t, stream)
		}},
		{"bidi streaming 1000 messages", func(t *testing.T, ctx context.Context) {
			stream, err := client.FullDuplexCall(ctx)
			if err != nil {
				t.Fatalf("FullDuplexCall() error = %v", err)
			}
			const n = 1000
			sent := make(chan error, 1)
			go func() {
				for i := range n {
					if err := stream.Send(protoBidiReq(protoBidiMsg(i))); err != nil {
						sent <- fmt.Errorf("Send() #%d error = %w", i, err)
						return
					}
				}
				sent <- stream.CloseSend()
			}()
			for i := range n {
				resp, err := stream.Recv()
				if err != nil {
					t.Fatalf("Recv() #%d error = %v", i, err)
				}
				if got, want := string(resp.GetPayload().GetBody()), protoBidiMsg(i); got != want {
					t.Fatalf("Recv() #%d = %q, want %q", i, got, want)
				}
			}
			if _, err := stream.Recv(); !errors.Is(err, io.EOF) {
				t.Fatalf("Recv() after %d messages error = %v, want io.EOF", n, err)
			}
			if err := <-sent; err != nil {
				t.Fatal(err)
			}
		}},
		{"client deadline reaches the server", func(t *testing.T, ctx context.Context) {
			ctx, cancel := context.WithTimeout(ctx, 300*time.Millisecond)
			defer cancel()
			ctx = metadata.AppendToOutgoingContext(ctx, "x-sleep", "10s")
			_, err := client.UnaryCall(ctx, &grpc_testing.SimpleRequest{})
			if got := status.Code(err); got != codes.DeadlineExceeded {
				t.Fatalf("UnaryCall() code = %v (%v), want %v", got, err, codes.DeadlineExceeded)
			}
			if d := time.Duration(node.deadline.Load()); d <= 0 || d > 300*time.Millisecond {
				t.Errorf("server saw a deadline %v away, want within (0, 300ms]", d)
			}
		}},
		{"no client deadline", func(t *testing.T, ctx context.Context) {
			if _, err := client.UnaryCall(context.Background(), &grpc_testing.SimpleRequest{}); err != nil {
				t.Fatalf("UnaryCall() error = %v", err)
			}
			if d := node.deadline.Load(); d != -1 {
				t.Errorf("server saw a deadline %v away, want none", time.Duration(d))
			}
		}},
		{"status code and message", func(t *testing.T, ctx context.Context) {
			const msg = "no such widget: ünïcode, 100% and\nnewline"
			_, err := client.UnaryCall(ctx, &grpc_testing.SimpleRequest{
				ResponseStatus: &grpc_testing.EchoStatus{Code: int32(codes.NotFound), Message: msg},
			})
			st, _ := status.FromError(err)
			if st.Code() != codes.NotFound || st.Message() != msg {
				t.Errorf("UnaryCall() status = %v %q, want %v %q", st.Code(), st.Message(), codes.NotFound, msg)
			}
		}},
		{"metadata both ways", func(t *testing.T, ctx context.Context) {
			ctx = metadata.AppendToOutgoingContext(ctx,
				"x-echo", "round trip",
				"x-request-id", "req-42",
				"x-blob-bin", string([]byte{0, 1, 2, 0xff}))
			var hdr, trl metadata.MD
			if _, err := client.UnaryCall(ctx, &grpc_testing.SimpleRequest{}, grpc.Header(&hdr), grpc.Trailer(&trl)); err != nil {
				t.Fatalf("UnaryCall() error = %v", err)
			}
			md := node.md()
			for k, want := range map[string]string{
				"x-echo": "round trip", "x-request-id": "req-42", "x-blob-bin": string([]byte{0, 1, 2, 0xff}),
			} {
				if got := md.Get(k); len(got) != 1 || got[0] != want {
					t.Errorf("server metadata %s = %q, want [%q]", k, got, want)
				}
			}
			if got := md.Get("x-forwarded-for"); len(got) != 1 || got[0] != "127.0.0.1" {
				t.Errorf("server metadata x-forwarded-for = %q, want [127.0.0.1]", got)
			}
			if got := hdr.Get("x-echo-header"); len(got) != 1 || got[0] != "round trip" {
				t.Errorf("header x-echo-header = %q, want [\"round trip\"]", got)
			}
			if got := trl.Get("x-echo-trailer"); len(got) != 1 || got[0] != "round trip" {
				t.Errorf("trailer x-echo-trailer = %q, want [\"round trip\"]", got)
			}
		}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			tc.run(t, protoCtx(t, 10*time.Second))
		})
	}
}

// TestProtocolGRPCRouteTimeout: the route's request timeout ends a call the
// client set no deadline for, and the client sees DEADLINE_EXCEEDED.
func TestProtocolGRPCRouteTimeout(t *testing.T) {
	leakcheck.Check(t)
	node := protoGRPC(t, "node-0")
	res := protoStatic(t, map[string][]string{"grpc-echo": {node.addr}})
	addr := protoUpstream(t, res, proxy.RouteConfig{Service: "grpc-echo", Protocol: "grpc",
		Timeouts: proxy.Timeouts{Request: 200 * time.Millisecond}})
	client := protoDialGRPC(t, addr)

	ctx := metadata.AppendToOutgoingContext(protoCtx(t, 10*time.Second), "x-sleep", "10s")
	_, err := client.UnaryCall(ctx, &grpc_testing.SimpleRequest{})
	if got := status.Code(err); got != codes.DeadlineExceeded {
		t.Fatalf("UnaryCall() code = %v (%v), want %v", got, err, codes.DeadlineExceeded)
	}
}

// TestProtocolGRPCSpread: 300 unary calls on one client connection are
// spread call by call, not connection by connection: round_robin gives each
// of 3 nodes exactly 100.
func TestProtocolGRPCSpread(t *testing.T) {
	leakcheck.Check(t)
	nodes := protoGRPCNodes(t, 3)
	res := protoStatic(t, map[string][]string{"grpc-echo": protoAddrs(nodes)})
	addr := protoUpstream(t, res, proxy.RouteConfig{Service: "grpc-echo", Protocol: "grpc", Balancer: "round_robin"})
	client := protoDialGRPC(t, addr)
	ctx := protoCtx(t, 20*time.Second)

	const calls, workers = 300, 10
	var wg sync.WaitGroup
	errc := make(chan error, calls)
	for range workers {
		wg.Go(func() {
			for range calls / workers {
				if _, err := protoUnary(ctx, client); err != nil {
					errc <- err
				}
			}
		})
	}
	wg.Wait()
	close(errc)
	for err := range errc {
		t.Fatalf("UnaryCall() error = %v", err)
	}
	for _, n := range nodes {
		if got := n.unary.Load(); got != calls/3 {
			t.Errorf("node %s served %d calls, want %d", n.id, got, calls/3)
		}
	}
}

// TestProtocolGRPCForward reaches gRPC services through the forward-proxy
// listener, named by the :authority; the sidecar answers a call it cannot
// place with a gRPC status of its own.
func TestProtocolGRPCForward(t *testing.T) {
	leakcheck.Check(t)
	node := protoGRPC(t, "node-0")
	res := protoStatic(t, map[string][]string{"echo": {node.addr}, "drained": {}})
	addr := protoForward(t, res, proxy.RouteConfig{})

	tests := []struct {
		authority string
		want      codes.Code
		wantMsg   string // a part of the status message, for the sidecar's own errors
	}{
		{"echo", codes.OK, ""},
		{"echo.service.consul", codes.OK, ""},
		{"nope", codes.Unimplemented, `sidecar: service "nope": unknown service`},
		{"drained", codes.Unavailable, `sidecar: service "drained": no endpoints`},
		{"localhost", codes.InvalidArgument, `sidecar: not a service name: "localhost"`},
	}
	for _, tc := range tests {
		t.Run(tc.authority, func(t *testing.T) {
			client := protoDialGRPC(t, addr, grpc.WithAuthority(tc.authority))
			id, err := protoUnary(protoCtx(t, 10*time.Second), client)
			st, _ := status.FromError(err)
			if st.Code() != tc.want {
				t.Fatalf("UnaryCall() code = %v (%v), want %v", st.Code(), err, tc.want)
			}
			if tc.want == codes.OK && id != node.id {
				t.Errorf("UnaryCall() answered by %q, want %q", id, node.id)
			}
			if !strings.Contains(st.Message(), tc.wantMsg) {
				t.Errorf("UnaryCall() message = %q, want it to contain %q", st.Message(), tc.wantMsg)
			}
		})
	}
}

// TestProtocolGRPCNodeJoins: a node registered in Consul while one client
// connection carries steady load gets its fair share of calls within 10s.
func TestProtocolGRPCNodeJoins(t *testing.T) {
	leakcheck.Check(t)
	res, consul := protoConsul(t)
	nodes := protoGRPCNodes(t, 3)
	for _, n := range nodes[:2] {
		protoRegister(t, consul, "grpc-join", n.id, n.addr)
	}
	addr := protoUpstream(t, res, proxy.RouteConfig{Service: "grpc-join", Protocol: "grpc"})
	client := protoDialGRPC(t, addr)
	ctx := protoCtx(t, 30*time.Second)

	// Steady load on one connection until the test is done with it.
	stop := make(chan struct{})
	var wg sync.WaitGroup
	var failed atomic.Int64
	var firstErr atomic.Pointer[error]
	for range 4 {
		wg.Go(func() {
			for {
				select {
				case <-stop:
					return
				default:
				}
				if _, err := protoUnary(ctx, client); err != nil {
					failed.Add(1)
					firstErr.CompareAndSwap(nil, &err)
				}
			}
		})
	}
	defer func() {
		select {
		case <-stop:
		default:
			close(stop)
		}
		wg.Wait()
	}()
	consulagent.WaitFor(t, 5*time.Second, "load on both first nodes", func() bool {
		return nodes[0].unary.Load() > 10 && nodes[1].unary.Load() > 10
	})

	joined := time.Now()
	protoRegister(t, consul, "grpc-join", nodes[2].id, nodes[2].addr)
	appeared := consulagent.WaitFor(t, 10*time.Second, "the new node's first call", func() bool {
		return nodes[2].unary.Load() > 0
	})

	// Its share over a window of at least 300 calls after it appeared.
	total := func() int64 { return nodes[0].unary.Load() + nodes[1].unary.Load() + nodes[2].unary.Load() }
	start, startNew := total(), nodes[2].unary.Load()
	consulagent.WaitFor(t, 10*time.Second-time.Since(joined), "300 calls after the node appeared", func() bool {
		return total()-start >= 300
	})
	window, windowNew := total()-start, nodes[2].unary.Load()-startNew
	took := time.Since(joined)
	close(stop)
	wg.Wait()

	share := float64(windowNew) / float64(window)
	t.Logf("new node: first call %v after registration; %d of %d calls (%.1f%%) in the next window; fair share reached within %v",
		appeared, windowNew, window, 100*share, took)
	if fair := 1.0 / 3; share < 0.8*fair {
		t.Errorf("new node served %.1f%% of calls, want at least 80%% of its fair share %.1f%%", 100*share, 100*fair)
	}
	if n := failed.Load(); n > 0 {
		t.Errorf("%d calls failed while the node joined; first: %v", n, *firstErr.Load())
	}
}

// TestProtocolGRPCNodeLeavesMidStream: a node deregistered from Consul gets
// no new calls, but a bidi stream open on it carries on and ends cleanly.
func TestProtocolGRPCNodeLeavesMidStream(t *testing.T) {
	leakcheck.Check(t)
	res, consul := protoConsul(t)
	nodes := protoGRPCNodes(t, 3)
	byID := map[string]*protoGRPCNode{}
	for _, n := range nodes {
		protoRegister(t, consul, "grpc-leave", n.id, n.addr)
		byID[n.id] = n
	}
	addr := protoUpstream(t, res, proxy.RouteConfig{Service: "grpc-leave", Protocol: "grpc"})
	client := protoDialGRPC(t, addr)
	ctx := protoCtx(t, 30*time.Second)

	// Let discovery see every node before the stream picks one.
	seen := map[string]bool{}
	consulagent.WaitFor(t, 5*time.Second, "calls reaching all 3 nodes", func() bool {
		id, err := protoUnary(ctx, client)
		if err != nil {
			t.Fatalf("UnaryCall() error = %v", err)
		}
		seen[id] = true
		return len(seen) == 3
	})

	stream, err := client.FullDuplexCall(ctx)
	if err != nil {
		t.Fatalf("FullDuplexCall() error = %v", err)
	}
	echo := func(i int) {
		t.Helper()
		msg := protoBidiMsg(i)
		if err := stream.Send(protoBidiReq(msg)); err != nil {
			t.Fatalf("Send(%q) error = %v", msg, err)
		}
		resp, err := stream.Recv()
		if err != nil {
			t.Fatalf("Recv() after %q error = %v", msg, err)
		}
		if got := string(resp.GetPayload().GetBody()); got != msg {
			t.Fatalf("Recv() = %q, want %q", got, msg)
		}
	}
	for i := range 10 {
		echo(i)
	}
	hdr, err := stream.Header()
	if err != nil {
		t.Fatalf("Header() error = %v", err)
	}
	x := byID[strings.Join(hdr.Get("x-node"), "")]
	if x == nil {
		t.Fatalf("stream header x-node = %q, want one of the nodes", hdr.Get("x-node"))
	}

	if err := consul.Agent().ServiceDeregister(x.id); err != nil {
		t.Fatalf("deregister %s: %v", x.id, err)
	}
	// New calls stop reaching x: a round of calls over the two nodes left
	// misses it.
	consulagent.WaitFor(t, 10*time.Second, "new calls to avoid the node that left", func() bool {
		before := x.unary.Load()
		for range 12 {
			if _, err := protoUnary(ctx, client); err != nil {
				t.Fatalf("UnaryCall() error = %v", err)
			}
		}
		return x.unary.Load() == before
	})
	if got := x.streams.Load(); got != 1 {
		t.Fatalf("node %s has %d streams open after it left, want 1", x.id, got)
	}

	// The stream open on x carries on and ends cleanly.
	for i := 10; i < 110; i++ {
		echo(i)
	}
	protoCloseBidi(t, stream)
	consulagent.WaitFor(t, 5*time.Second, "the stream to end on the node", func() bool {
		return x.streams.Load() == 0
	})
}

func protoBidiMsg(i int) string { return fmt.Sprintf("message %04d", i) }

func protoBidiReq(msg string) *grpc_testing.StreamingOutputCallRequest {
	return &grpc_testing.StreamingOutputCallRequest{Payload: &grpc_testing.Payload{Body: []byte(msg)}}
}

// protoCloseBidi half-closes a bidi stream and expects it to end with OK.
func protoCloseBidi(t *testing.T, stream grpc.BidiStreamingClient[grpc_testing.StreamingOutputCallRequest, grpc_testing.StreamingOutputCallResponse]) {
	t.Helper()
	if err := stream.CloseSend(); err != nil {
		t.Fatalf("CloseSend() error = %v", err)
	}
	if resp, err := stream.Recv(); !errors.Is(err, io.EOF) {
		t.Fatalf("Recv() after CloseSend = %v, %v, want io.EOF", resp, err)
	}
}
