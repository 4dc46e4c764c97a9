package main

import (
	"bytes"
	"encoding/base64"
	"fmt"
	"sync/atomic"
)

// connectPath is the backends' gRPC unary method, called as Connect JSON.
const connectPath = "/grpc.testing.TestService/UnaryCall"

// connectLoops calls the gRPC UnaryCall with a -size payload as a Connect
// unary JSON POST over HTTP/1.1 keep-alive (-c connections): the call a
// sidecar with codec.transcode turns into gRPC. Only a transcoding proxy
// answers it; a gRPC server reached directly does not speak it.
func connectLoops(o options, phase *atomic.Int32) []func(*worker) {
	body := fmt.Appendf(nil, `{"payload":{"body":%q}}`, base64.StdEncoding.EncodeToString(make([]byte, o.size)))
	loops := make([]func(*worker), o.workers)
	for i := range loops {
		var b bytes.Buffer
		fmt.Fprintf(&b, "POST %s HTTP/1.1\r\nHost: bench\r\nUser-Agent: sidecar-bench\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n",
			connectPath, len(body))
		b.Write(body)
		c := &h1Conn{addr: o.targets[i%len(o.targets)], req: b.Bytes()}
		loops[i] = func(w *worker) {
			defer c.close()
			closedLoop(phase, c.do)(w)
		}
	}
	return loops
}
