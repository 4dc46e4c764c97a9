package main

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"sync/atomic"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/interop/grpc_testing"
)

// h2cLoops runs GET /get over h2c with prior knowledge: one transport per
// target, opened with one request before the workers start, so the -c
// streams share one connection per target.
func h2cLoops(ctx context.Context, o options, phase *atomic.Int32) ([]func(*worker), func(), error) {
	transports := make([]*http.Transport, len(o.targets))
	for i, t := range o.targets {
		p := new(http.Protocols)
		p.SetUnencryptedHTTP2(true)
		tr := &http.Transport{Protocols: p, MaxIdleConnsPerHost: 1, HTTP2: &http.HTTP2Config{}}
		transports[i] = tr
		req, _ := http.NewRequestWithContext(ctx, "GET", "http://"+t+"/get", nil)
		if err := h2cDo(tr, req); err != nil {
			return nil, nil, fmt.Errorf("h2c warm request to %s: %w", t, err)
		}
	}
	loops := make([]func(*worker), o.workers)
	for i := range loops {
		tr := transports[i%len(transports)]
		req, _ := http.NewRequestWithContext(ctx, "GET", "http://"+o.targets[i%len(o.targets)]+"/get", nil)
		loops[i] = closedLoop(phase, func() error { return h2cDo(tr, req) })
	}
	cleanup := func() {
		for _, tr := range transports {
			tr.CloseIdleConnections()
		}
	}
	return loops, cleanup, nil
}

func h2cDo(tr *http.Transport, req *http.Request) error {
	resp, err := tr.RoundTrip(req)
	if err != nil {
		return err
	}
	_, err = io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	if err != nil {
		return err
	}
	if resp.ProtoMajor != 2 {
		return fmt.Errorf("answered over HTTP/%d, want HTTP/2", resp.ProtoMajor)
	}
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("%w %d", errStatus, resp.StatusCode)
	}
	return nil
}

// dialGRPC opens one client connection per target and makes one call on
// each, so the connection is up before timing.
func dialGRPC(ctx context.Context, targets []string) ([]grpc_testing.TestServiceClient, func(), error) {
	var conns []*grpc.ClientConn
	cleanup := func() {
		for _, cc := range conns {
			cc.Close()
		}
	}
	clients := make([]grpc_testing.TestServiceClient, len(targets))
	for i, t := range targets {
		cc, err := grpc.NewClient("passthrough:///"+t, grpc.WithTransportCredentials(insecure.NewCredentials()))
		if err != nil {
			cleanup()
			return nil, nil, err
		}
		conns = append(conns, cc)
		clients[i] = grpc_testing.NewTestServiceClient(cc)
		cctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		_, err = clients[i].UnaryCall(cctx, &grpc_testing.SimpleRequest{}, grpc.WaitForReady(true))
		cancel()
		if err != nil {
			cleanup()
			return nil, nil, fmt.Errorf("grpc warm call to %s: %w", t, err)
		}
	}
	return clients, cleanup, nil
}

func grpcUnaryLoops(ctx context.Context, o options, phase *atomic.Int32) ([]func(*worker), func(), error) {
	clients, cleanup, err := dialGRPC(ctx, o.targets)
	if err != nil {
		return nil, nil, err
	}
	req := &grpc_testing.SimpleRequest{Payload: &grpc_testing.Payload{Body: make([]byte, o.size)}}
	loops := make([]func(*worker), o.workers)
	for i := range loops {
		c := clients[i%len(clients)]
		loops[i] = closedLoop(phase, func() error {
			resp, err := c.UnaryCall(ctx, req)
			if err != nil {
				return err
			}
			if n := len(resp.GetPayload().GetBody()); n != o.size {
				return fmt.Errorf("payload of %d bytes, want %d", n, o.size)
			}
			return nil
		})
	}
	return loops, cleanup, nil
}

// grpcBidiLoops opens -c FullDuplexCall streams; on each, a sender keeps
// -depth messages in flight and the worker reads the echoes, timing each
// message from its send (streams keep order).
func grpcBidiLoops(ctx context.Context, o options, phase *atomic.Int32) ([]func(*worker), func(), error) {
	clients, cleanup, err := dialGRPC(ctx, o.targets)
	if err != nil {
		return nil, nil, err
	}
	msg := &grpc_testing.StreamingOutputCallRequest{Payload: &grpc_testing.Payload{Body: make([]byte, o.size)}}
	loops := make([]func(*worker), o.workers)
	for i := range loops {
		c := clients[i%len(clients)]
		stream, err := c.FullDuplexCall(ctx)
		if err != nil {
			cleanup()
			return nil, nil, fmt.Errorf("open stream %d: %w", i, err)
		}
		loops[i] = func(w *worker) {
			sent := make(chan time.Time, o.depth)
			senderDone := make(chan struct{})
			go func() {
				defer close(senderDone)
				defer close(sent)
				for phase.Load() != phaseStop {
					select {
					case sent <- time.Now(): // blocks while -depth are in flight
					case <-ctx.Done():
						return
					}
					if err := stream.Send(msg); err != nil {
						return
					}
				}
				_ = stream.CloseSend()
			}()
			for t0 := range sent {
				resp, err := stream.Recv()
				if err != nil {
					if phase.Load() == phaseMeasure && err != io.EOF {
						w.fail(err)
					}
					break
				}
				if phase.Load() != phaseMeasure || t0.IsZero() {
					continue
				}
				if len(resp.GetPayload().GetBody()) != o.size {
					w.fail(fmt.Errorf("payload of %d bytes, want %d", len(resp.GetPayload().GetBody()), o.size))
					continue
				}
				w.hist.record(time.Since(t0))
				w.n++
			}
			// Drain so the sender is not stuck on a full channel.
			go func() {
				for range sent {
				}
			}()
			<-senderDone
		}
	}
	return loops, cleanup, nil
}
