package test

// Shared fixtures of the protocol tests (TestProtocol…, BenchmarkProtocol…):
// the sidecar's proxy runs in-process on loopback listeners, in front of real
// gRPC, HTTP/2, WebSocket and TCP servers, reached by real clients.

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

	"github.com/hashicorp/consul/api"
	"go.uber.org/zap"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/interop/grpc_testing"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	"github.com/sidecarlb/sidecar/discovery"
	"github.com/sidecarlb/sidecar/proxy"
	"github.com/sidecarlb/sidecar/test/consulagent"
)

// protoListen returns a loopback listener closed when the test ends.
func protoListen(tb testing.TB) net.Listener {
	tb.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { ln.Close() })
	return ln
}

// protoDeadPort returns a loopback address nothing listens on: dials to it
// are refused.
func protoDeadPort(_ testing.TB) string {
	// Port 1 on a fresh loopback address: nothing binds there, so dials are
	// refused, and no other test can take it over as it can a freed port.
	n := deadAddrs.Add(1)
	return fmt.Sprintf("127.1.%d.%d:1", n/250, n%250+1)
}

var deadAddrs atomic.Int64

// protoStatic returns a discovery cache over a fixed map of services.
func protoStatic(tb testing.TB, services map[string][]string) *discovery.Cache {
	tb.Helper()
	b, err := discovery.NewStatic(services)
	if err != nil {
		tb.Fatal(err)
	}
	c := discovery.NewCache(b, discovery.CacheOptions{}, zap.NewNop())
	tb.Cleanup(c.Close)
	return c
}

// protoConsul starts a Consul dev agent and returns a discovery cache that
// follows it, and an API client to register nodes with.
func protoConsul(t *testing.T) (*discovery.Cache, *api.Client) {
	t.Helper()
	a := consulagent.Start(t, consulagent.Options{})
	client := a.Client()
	b := discovery.NewConsul(client.Health(), client.Catalog(), discovery.ConsulOptions{}, zap.NewNop())
	c := discovery.NewCache(b, discovery.CacheOptions{}, zap.NewNop())
	t.Cleanup(c.Close)
	return c, client
}

// protoRegister registers a node of service at addr, with no check, which
// Consul counts as passing.
func protoRegister(t *testing.T, client *api.Client, service, id, addr string) {
	t.Helper()
	host, port := protoSplit(t, addr)
	reg := &api.AgentServiceRegistration{ID: id, Name: service, Address: host, Port: port}
	if err := client.Agent().ServiceRegister(reg); err != nil {
		t.Fatalf("register %s: %v", id, err)
	}
}

func protoSplit(tb testing.TB, addr string) (string, int) {
	tb.Helper()
	tcp, err := net.ResolveTCPAddr("tcp", addr)
	if err != nil {
		tb.Fatal(err)
	}
	return tcp.IP.String(), tcp.Port
}

// protoServeOn runs serve (a server's Serve on its listener) until the test
// ends; the test's cleanup then calls stop and waits for serve to return.
func protoServeOn(tb testing.TB, serve func() error, stop func()) {
	done := make(chan struct{})
	go func() {
		defer close(done)
		_ = serve()
	}()
	tb.Cleanup(func() {
		stop()
		<-done
	})
}

// protoServe serves h on a loopback listener with the sidecar's listener
// server (HTTP/1.1 and h2c on one port) and returns its address.
func protoServe(tb testing.TB, h http.Handler) string {
	tb.Helper()
	ln := protoListen(tb)
	srv := proxy.NewServer(h, proxy.ServerOptions{}, zap.NewNop())
	protoServeOn(tb, func() error { return srv.Serve(ln) }, func() { srv.Close() })
	return ln.Addr().String()
}

// protoUpstream starts an upstream listener of the sidecar for cfg.Service
// and returns its address.
func protoUpstream(tb testing.TB, r proxy.Resolver, cfg proxy.RouteConfig) string {
	tb.Helper()
	px := proxy.New(r, nil, zap.NewNop())
	h, err := px.Upstream("upstream-"+cfg.Service, cfg)
	if err != nil {
		tb.Fatal(err)
	}
	return protoServe(tb, h)
}

// protoForward starts the sidecar's forward-proxy listener and returns its
// address.
func protoForward(tb testing.TB, r proxy.Resolver, defaults proxy.RouteConfig) string {
	tb.Helper()
	px := proxy.New(r, nil, zap.NewNop())
	h, err := px.Forward("forward", defaults)
	if err != nil {
		tb.Fatal(err)
	}
	return protoServe(tb, h)
}

// protoGRPCNode is a gRPC TestService backend that says which node it is in
// SimpleResponse.ServerId and in the "x-node" header of every call, and
// counts what it serves.
//
// Requests steer it with metadata: "x-sleep" (a duration) delays a unary
// answer until then or until its context ends; "x-echo" comes back as the
// "x-echo-header" header and the "x-echo-trailer" trailer. A unary
// ResponseStatus is returned as the call's status.
type protoGRPCNode struct {
	grpc_testing.UnimplementedTestServiceServer
	id   string
	addr string

	unary    atomic.Int64 // unary calls received
	streams  atomic.Int64 // bidi streams open now
	deadline atomic.Int64 // time left (ns) of the last unary call's deadline; -1 if none

	mu     sync.Mutex
	lastMD metadata.MD // incoming metadata of the last unary call
}

// protoGRPC starts a gRPC TestService node on loopback. It stops when the
// test ends.
func protoGRPC(tb testing.TB, id string) *protoGRPCNode {
	tb.Helper()
	ln := protoListen(tb)
	n := &protoGRPCNode{id: id, addr: ln.Addr().String()}
	srv := grpc.NewServer()
	grpc_testing.RegisterTestServiceServer(srv, n)
	protoServeOn(tb, func() error { return srv.Serve(ln) }, srv.Stop)
	return n
}

// protoGRPCNodes starts n nodes named node-0, node-1, …
func protoGRPCNodes(tb testing.TB, n int) []*protoGRPCNode {
	nodes := make([]*protoGRPCNode, n)
	for i := range nodes {
		nodes[i] = protoGRPC(tb, fmt.Sprintf("node-%d", i))
	}
	return nodes
}

func protoAddrs[T interface{ address() string }](nodes []T) []string {
	out := make([]string, len(nodes))
	for i, n := range nodes {
		out[i] = n.address()
	}
	return out
}

func (n *protoGRPCNode) address() string { return n.addr }

func (n *protoGRPCNode) md() metadata.MD {
	n.mu.Lock()
	defer n.mu.Unlock()
	return n.lastMD
}

func (n *protoGRPCNode) UnaryCall(ctx context.Context, req *grpc_testing.SimpleRequest) (*grpc_testing.SimpleResponse, error) {
	n.unary.Add(1)
	md, _ := metadata.FromIncomingContext(ctx)
	n.mu.Lock()
	n.lastMD = md
	n.mu.Unlock()
	if dl, ok := ctx.Deadline(); ok {
		n.deadline.Store(int64(time.Until(dl)))
	} else {
		n.deadline.Store(-1)
	}
	header := metadata.Pairs("x-node", n.id)
	if v := md.Get("x-echo"); len(v) > 0 {
		header.Set("x-echo-header", v...)
		if err := grpc.SetTrailer(ctx, metadata.Pairs("x-echo-trailer", v[0])); err != nil {
			return nil, err
		}
	}
	if err := grpc.SetHeader(ctx, header); err != nil {
		return nil, err
	}
	if v := md.Get("x-sleep"); len(v) > 0 {
		d, err := time.ParseDuration(v[0])
		if err != nil {
			return nil, status.Errorf(codes.InvalidArgument, "x-sleep: %v", err)
		}
		select {
		case <-time.After(d):
		case <-ctx.Done():
			return nil, status.FromContextError(ctx.Err()).Err()
		}
	}
	if s := req.GetResponseStatus(); s != nil && s.Code != 0 {
		return nil, status.Error(codes.Code(s.Code), s.Message)
	}
	return &grpc_testing.SimpleResponse{ServerId: n.id, Payload: req.GetPayload()}, nil
}

// StreamingOutputCall sends one message per response parameter, of that
// size, filled with the letter of its position.
func (n *protoGRPCNode) StreamingOutputCall(req *grpc_testing.StreamingOutputCallRequest, stream grpc.ServerStreamingServer[grpc_testing.StreamingOutputCallResponse]) error {
	if err := stream.SendHeader(metadata.Pairs("x-node", n.id)); err != nil {
		return err
	}
	for i, p := range req.GetResponseParameters() {
		body := []byte(strings.Repeat(string(rune('a'+i%26)), int(p.GetSize())))
		if err := stream.Send(&grpc_testing.StreamingOutputCallResponse{Payload: &grpc_testing.Payload{Body: body}}); err != nil {
			return err
		}
	}
	return nil
}

// StreamingInputCall answers with the total size of the payloads received.
func (n *protoGRPCNode) StreamingInputCall(stream grpc.ClientStreamingServer[grpc_testing.StreamingInputCallRequest, grpc_testing.StreamingInputCallResponse]) error {
	if err := stream.SendHeader(metadata.Pairs("x-node", n.id)); err != nil {
		return err
	}
	var total int32
	for {
		req, err := stream.Recv()
		if errors.Is(err, io.EOF) {
			return stream.SendAndClose(&grpc_testing.StreamingInputCallResponse{AggregatedPayloadSize: total})
		}
		if err != nil {
			return err
		}
		total += int32(len(req.GetPayload().GetBody()))
	}
}

// FullDuplexCall echoes each message's payload as it arrives.
func (n *protoGRPCNode) FullDuplexCall(stream grpc.BidiStreamingServer[grpc_testing.StreamingOutputCallRequest, grpc_testing.StreamingOutputCallResponse]) error {
	n.streams.Add(1)
	defer n.streams.Add(-1)
	if err := stream.SendHeader(metadata.Pairs("x-node", n.id)); err != nil {
		return err
	}
	for {
		req, err := stream.Recv()
		if errors.Is(err, io.EOF) {
			return nil
		}
		if err != nil {
			return err
		}
		if err := stream.Send(&grpc_testing.StreamingOutputCallResponse{Payload: req.GetPayload()}); err != nil {
			return err
		}
	}
}

// protoDialGRPC returns a TestService client on one connection to addr,
// closed when the test ends.
func protoDialGRPC(tb testing.TB, addr string, opts ...grpc.DialOption) grpc_testing.TestServiceClient {
	tb.Helper()
	opts = append([]grpc.DialOption{grpc.WithTransportCredentials(insecure.NewCredentials())}, opts...)
	cc, err := grpc.NewClient(addr, opts...)
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { cc.Close() })
	return grpc_testing.NewTestServiceClient(cc)
}

// protoCtx returns a context that ends after d or with the test.
func protoCtx(tb testing.TB, d time.Duration) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	tb.Cleanup(cancel)
	return ctx
}

// protoUnary makes one unary call and returns the node that answered.
func protoUnary(ctx context.Context, c grpc_testing.TestServiceClient) (string, error) {
	resp, err := c.UnaryCall(ctx, &grpc_testing.SimpleRequest{})
	if err != nil {
		return "", err
	}
	return resp.GetServerId(), nil
}
