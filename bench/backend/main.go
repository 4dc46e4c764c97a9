// Command backend is the benchmark node: one process serves HTTP/1.1 and
// h2c (prior knowledge) with a WebSocket echo on one port, and the gRPC
// TestService on another. It counts what it serves, so the harness can see
// how the proxies spread load.
//
//	backend -http 127.0.0.1:9101 -grpc 127.0.0.1:9201 -name b0
//
// HTTP paths:
//
//	GET  /get    100 bytes of text
//	POST /echo   the request body back
//	GET  /ws     WebSocket: every message echoed
//	GET  /count  JSON counters (not counted themselves)
//
// gRPC: UnaryCall echoes the payload; FullDuplexCall echoes every message.
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"io"
	"log"
	"net"
	"net/http"
	"os"
	"os/signal"
	"strconv"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/coder/websocket"
	"google.golang.org/grpc"
	"google.golang.org/grpc/interop/grpc_testing"
	"google.golang.org/grpc/reflection"
)

// Counts are what a backend has served since it started.
type Counts struct {
	HTTP     int64 `json:"http"`      // /get and /echo answers
	GRPC     int64 `json:"grpc"`      // unary calls
	GRPCMsgs int64 `json:"grpc_msgs"` // messages echoed on bidi streams
	WSConns  int64 `json:"ws_conns"`  // WebSocket sessions accepted
	WSMsgs   int64 `json:"ws_msgs"`   // WebSocket messages echoed
}

type counters struct {
	http, grpc, grpcMsgs, wsConns, wsMsgs atomic.Int64
}

func (c *counters) snapshot() Counts {
	return Counts{
		HTTP: c.http.Load(), GRPC: c.grpc.Load(), GRPCMsgs: c.grpcMsgs.Load(),
		WSConns: c.wsConns.Load(), WSMsgs: c.wsMsgs.Load(),
	}
}

var getBody = []byte("0123456789012345678901234567890123456789012345678901234567890123456789012345678901234567890123456\n\n\n")

func main() {
	httpAddr := flag.String("http", "127.0.0.1:9101", "HTTP/1.1, h2c and WebSocket address")
	grpcAddr := flag.String("grpc", "127.0.0.1:9201", "gRPC address")
	name := flag.String("name", "", "instance name (default: the HTTP address)")
	flag.Parse()
	if *name == "" {
		*name = *httpAddr
	}
	if len(getBody) != 100 {
		log.Fatalf("get body is %d bytes, want 100", len(getBody))
	}
	var c counters

	mux := http.NewServeMux()
	mux.HandleFunc("GET /get", func(w http.ResponseWriter, _ *http.Request) {
		c.http.Add(1)
		h := w.Header()
		h["Content-Type"] = textPlain
		h["Content-Length"] = len100
		_, _ = w.Write(getBody)
	})
	mux.HandleFunc("POST /echo", func(w http.ResponseWriter, r *http.Request) {
		c.http.Add(1)
		body, err := io.ReadAll(io.LimitReader(r.Body, 1<<20))
		if err != nil {
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		}
		h := w.Header()
		h["Content-Type"] = octetStream
		h["Content-Length"] = []string{strconv.Itoa(len(body))}
		_, _ = w.Write(body)
	})
	mux.HandleFunc("GET /ws", func(w http.ResponseWriter, r *http.Request) {
		conn, err := websocket.Accept(w, r, &websocket.AcceptOptions{CompressionMode: websocket.CompressionDisabled})
		if err != nil {
			return
		}
		c.wsConns.Add(1)
		defer conn.CloseNow()
		conn.SetReadLimit(1 << 20)
		ctx := r.Context()
		for {
			typ, msg, err := conn.Read(ctx)
			if err != nil {
				return
			}
			if err := conn.Write(ctx, typ, msg); err != nil {
				return
			}
			c.wsMsgs.Add(1)
		}
	})
	mux.HandleFunc("GET /count", func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		_ = json.NewEncoder(w).Encode(c.snapshot())
	})

	protocols := new(http.Protocols)
	protocols.SetHTTP1(true)
	protocols.SetUnencryptedHTTP2(true)
	hs := &http.Server{
		Handler:           mux,
		ReadHeaderTimeout: 10 * time.Second,
		IdleTimeout:       5 * time.Minute,
		Protocols:         protocols,
		HTTP2:             &http.HTTP2Config{MaxConcurrentStreams: 1000},
		ErrorLog:          log.New(io.Discard, "", 0),
	}
	hln, err := net.Listen("tcp", *httpAddr)
	if err != nil {
		log.Fatal(err)
	}
	gln, err := net.Listen("tcp", *grpcAddr)
	if err != nil {
		log.Fatal(err)
	}
	gs := grpc.NewServer(grpc.MaxConcurrentStreams(1000))
	grpc_testing.RegisterTestServiceServer(gs, &testService{name: *name, c: &c})
	reflection.Register(gs) // for a sidecar that transcodes (the codec scenarios)

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	errc := make(chan error, 2)
	go func() { errc <- hs.Serve(hln) }()
	go func() { errc <- gs.Serve(gln) }()
	select {
	case <-ctx.Done():
	case err := <-errc:
		if err != nil && !errors.Is(err, http.ErrServerClosed) {
			log.Print(err)
		}
	}
	sctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	_ = hs.Shutdown(sctx)
	gs.Stop()
	s := c.snapshot()
	out, _ := json.Marshal(s)
	log.Printf("%s served %s", *name, out)
}

var (
	textPlain   = []string{"text/plain"}
	octetStream = []string{"application/octet-stream"}
	len100      = []string{"100"}
)

// testService echoes payloads.
type testService struct {
	grpc_testing.UnimplementedTestServiceServer
	name string
	c    *counters
}

func (s *testService) UnaryCall(_ context.Context, req *grpc_testing.SimpleRequest) (*grpc_testing.SimpleResponse, error) {
	s.c.grpc.Add(1)
	return &grpc_testing.SimpleResponse{Payload: req.GetPayload()}, nil
}

func (s *testService) FullDuplexCall(stream grpc_testing.TestService_FullDuplexCallServer) error {
	for {
		req, err := stream.Recv()
		if err == io.EOF {
			return nil
		}
		if err != nil {
			return err
		}
		if err := stream.Send(&grpc_testing.StreamingOutputCallResponse{Payload: req.GetPayload()}); err != nil {
			return err
		}
		s.c.grpcMsgs.Add(1)
	}
}
