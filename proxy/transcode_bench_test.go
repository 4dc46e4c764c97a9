package proxy

import (
	"bytes"
	"context"
	"io"
	"net/http"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/protobuf/types/dynamicpb"

	"github.com/sidecarlb/sidecar/config"
	"github.com/sidecarlb/sidecar/transcode/transcodetest"
)

// BenchmarkTranscodeUnary1KiB: a unary call with a 1 KiB message each way
// through an upstream listener with codec.transcode on, to a grpc-go node:
// as native gRPC (passed through) and as Connect JSON over HTTP/1.1
// (transcoded). Client, sidecar and node share the process, so ns/op and
// allocs/op count all three; transcode's BenchmarkTranscodeConnectJSON
// isolates the sidecar's extra work.
func BenchmarkTranscodeUnary1KiB(b *testing.B) {
	node := transcodetest.Start(b, 1, transcodetest.ReflectionV1, "")
	px := startTranscoding(b, config.Codec{}, node.Addr)
	text := strings.Repeat("x", 1000)

	b.Run("grpc_native", func(b *testing.B) {
		cc, err := grpc.NewClient(px.Listener.Addr().String(), grpc.WithTransportCredentials(insecure.NewCredentials()))
		if err != nil {
			b.Fatal(err)
		}
		defer cc.Close()
		req := echoRequest(b, text)
		_, outDesc := echoMessages(1)
		b.ReportAllocs()
		b.ResetTimer()
		cpu := cpuTime()
		defer reportCPU(b, cpu)
		b.RunParallel(func(pb *testing.PB) {
			out := dynamicpb.NewMessage(outDesc)
			for pb.Next() {
				if err := cc.Invoke(context.Background(), "/test.v1.Echo/Say", req, out); err != nil {
					b.Error(err)
					return
				}
				if got := out.Get(outDesc.Fields().ByName("text")); len(got.String()) != len(text) {
					b.Errorf("text of %d bytes", len(got.String()))
					return
				}
				out.Clear(outDesc.Fields().ByName("text"))
			}
		})
	})
	b.Run("connect_json", func(b *testing.B) {
		c := newClient(b, func(tr *http.Transport) { tr.MaxIdleConnsPerHost = 64 })
		body := []byte(`{"text":"` + text + `"}`)
		b.ReportAllocs()
		b.ResetTimer()
		cpu := cpuTime()
		defer reportCPU(b, cpu)
		b.RunParallel(func(pb *testing.PB) {
			for pb.Next() {
				req, _ := http.NewRequest(http.MethodPost, px.URL+"/test.v1.Echo/Say", bytes.NewReader(body))
				req.Header["Content-Type"] = []string{"application/json"}
				resp, err := c.Do(req)
				if err != nil {
					b.Error(err)
					return
				}
				n, _ := io.Copy(io.Discard, resp.Body)
				resp.Body.Close()
				if resp.StatusCode != 200 || n < 1000 {
					b.Errorf("answer %d of %d bytes", resp.StatusCode, n)
					return
				}
			}
		})
	})
}

// reportCPU reports the process's CPU time per op from start on: unlike
// ns/op, it does not grow when other processes take the machine's cores.
func reportCPU(b *testing.B, start time.Duration) {
	b.ReportMetric(float64(cpuTime()-start)/float64(b.N), "cpu-ns/op")
}
