package test

// Benchmarks of the proxy's protocol paths against the same server reached
// directly. They report figures; compare the proxy and direct runs with
// benchstat or by eye. Run them without -race:
//
//	go test -run '^$' -bench BenchmarkProtocol -benchtime 3s ./test/

import (
	"context"
	"errors"
	"io"
	"runtime"
	"sync"
	"testing"
	"time"

	"github.com/coder/websocket"
	"google.golang.org/grpc/interop/grpc_testing"

	"github.com/sidecarlb/sidecar/proxy"
)

// protoBenchPaths are the ways a benchmark reaches its node.
var protoBenchPaths = []string{"direct", "proxy"}

// protoBenchTarget returns the address to reach node at: node itself, or an
// upstream listener of the sidecar in front of it.
func protoBenchTarget(b *testing.B, path, node, protocol string) string {
	b.Helper()
	if path == "direct" {
		return node
	}
	res := protoStatic(b, map[string][]string{"bench": {node}})
	return protoUpstream(b, res, proxy.RouteConfig{Service: "bench", Protocol: protocol})
}

// BenchmarkProtocolGRPCUnary: unary calls from 64 goroutines sharing one
// client connection, so 64 concurrent streams on it.
func BenchmarkProtocolGRPCUnary(b *testing.B) {
	const streams = 64
	for _, path := range protoBenchPaths {
		b.Run(path, func(b *testing.B) {
			node := protoGRPC(b, "node-0")
			client := protoDialGRPC(b, protoBenchTarget(b, path, node.addr, "grpc"))
			ctx := context.Background()
			req := &grpc_testing.SimpleRequest{Payload: &grpc_testing.Payload{Body: make([]byte, 64)}}
			// Open the connections before timing.
			var wg sync.WaitGroup
			for range streams {
				wg.Go(func() {
					if _, err := client.UnaryCall(ctx, req); err != nil {
						b.Error(err)
					}
				})
			}
			wg.Wait()
			procs := runtime.GOMAXPROCS(0)
			b.SetParallelism((streams + procs - 1) / procs)
			b.ReportAllocs()
			b.ResetTimer()
			b.RunParallel(func(pb *testing.PB) {
				for pb.Next() {
					if _, err := client.UnaryCall(ctx, req); err != nil {
						b.Error(err)
						return
					}
				}
			})
		})
	}
}

// BenchmarkProtocolGRPCBidi: messages echoed on one bidi stream, sent as
// fast as flow control allows while the answers are read.
func BenchmarkProtocolGRPCBidi(b *testing.B) {
	for _, path := range protoBenchPaths {
		b.Run(path, func(b *testing.B) {
			node := protoGRPC(b, "node-0")
			client := protoDialGRPC(b, protoBenchTarget(b, path, node.addr, "grpc"))
			ctx, cancel := context.WithCancel(context.Background())
			defer cancel()
			stream, err := client.FullDuplexCall(ctx)
			if err != nil {
				b.Fatal(err)
			}
			req := &grpc_testing.StreamingOutputCallRequest{Payload: &grpc_testing.Payload{Body: make([]byte, 64)}}
			if err := stream.Send(req); err != nil {
				b.Fatal(err)
			}
			if _, err := stream.Recv(); err != nil {
				b.Fatal(err)
			}
			b.ReportAllocs()
			b.ResetTimer()
			start := time.Now()
			sent := make(chan error, 1)
			go func() {
				for range b.N {
					if err := stream.Send(req); err != nil {
						sent <- err
						return
					}
				}
				sent <- stream.CloseSend()
			}()
			for range b.N {
				if _, err := stream.Recv(); err != nil {
					b.Fatal(err)
				}
			}
			elapsed := time.Since(start)
			b.StopTimer()
			b.ReportMetric(float64(b.N)/elapsed.Seconds(), "msgs/s")
			if err := <-sent; err != nil {
				b.Fatal(err)
			}
			if _, err := stream.Recv(); !errors.Is(err, io.EOF) {
				b.Fatalf("Recv() at the end error = %v, want io.EOF", err)
			}
		})
	}
}

// BenchmarkProtocolWebSocket: 64-byte binary messages echoed on one
// WebSocket, sent while the answers are read.
func BenchmarkProtocolWebSocket(b *testing.B) {
	for _, path := range protoBenchPaths {
		b.Run(path, func(b *testing.B) {
			node := protoWS(b, "node-0")
			ctx, cancel := context.WithCancel(context.Background())
			defer cancel()
			c, _ := protoDialWS(b, ctx, protoBenchTarget(b, path, node.addr, "http"), nil)
			msg := make([]byte, 64)
			protoWSEcho(b, ctx, c, websocket.MessageBinary, msg)
			b.ReportAllocs()
			b.ResetTimer()
			start := time.Now()
			sent := make(chan error, 1)
			go func() {
				for range b.N {
					if err := c.Write(ctx, websocket.MessageBinary, msg); err != nil {
						sent <- err
						return
					}
				}
				sent <- nil
			}()
			for range b.N {
				if _, _, err := c.Read(ctx); err != nil {
					b.Fatal(err)
				}
			}
			elapsed := time.Since(start)
			b.StopTimer()
			b.ReportMetric(float64(b.N)/elapsed.Seconds(), "msgs/s")
			if err := <-sent; err != nil {
				b.Fatal(err)
			}
			if err := c.Close(websocket.StatusNormalClosure, ""); err != nil {
				b.Fatalf("Close() error = %v", err)
			}
		})
	}
}
