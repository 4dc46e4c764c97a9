package transcode_test

import (
	"bytes"
	"context"
	"encoding/binary"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"syscall"
	"testing"
	"time"

	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protoreflect"
	"google.golang.org/protobuf/types/dynamicpb"

	"github.com/sidecarlb/sidecar/transcode"
	"github.com/sidecarlb/sidecar/transcode/transcodetest"
)

// BenchmarkTranscodeConnectJSON is the sidecar's extra work for one 1 KiB
// Connect JSON unary call, schema cached: read and decode the JSON request
// into gRPC-framed protobuf, then turn the node's 1 KiB protobuf answer
// into JSON. No network: what it costs on top of a passthrough call.
func BenchmarkTranscodeConnectJSON(b *testing.B) {
	f, err := transcode.LoadFileFromBytes(transcodetest.DescriptorSet(1))
	if err != nil {
		b.Fatal(err)
	}
	s := transcode.NewSchemas([]transcode.Source{f}, transcode.SchemaOptions{})
	defer s.Close()
	tc := transcode.New(s)
	text := strings.Repeat("x", 1000)
	reqBody := []byte(`{"text":"` + text + `","code":0}`)

	d, _ := transcodetest.Schema(1).FindDescriptorByName(transcodetest.Service)
	out := d.(protoreflect.ServiceDescriptor).Methods().ByName("Say").Output()
	m := dynamicpb.NewMessage(out)
	m.Set(out.Fields().ByName("text"), protoreflect.ValueOfString(text))
	pb, _ := proto.Marshal(m)
	respBody := append([]byte{0, 0, 0, 0, 0}, pb...)
	binary.BigEndian.PutUint32(respBody[1:5], uint32(len(pb)))
	trailer := http.Header{"Grpc-Status": {"0"}}

	b.ReportAllocs()
	b.SetBytes(int64(len(reqBody)))
	b.ResetTimer()
	cpu := cpuTime(b)
	for b.Loop() {
		r := httptest.NewRequest(http.MethodPost, "/test.v1.Echo/Say", bytes.NewReader(reqBody))
		r.Header.Set("Content-Type", "application/json")
		call, err := tc.Decode(context.Background(), r)
		if err != nil {
			b.Fatal(err)
		}
		_ = call.Request(r)
		w := httptest.NewRecorder()
		resp := &http.Response{StatusCode: 200, Header: http.Header{"Content-Type": {"application/grpc"}},
			Body: io.NopCloser(bytes.NewReader(respBody)), Trailer: trailer}
		if err := call.Respond(w, resp); err != nil || w.Code != 200 {
			b.Fatal(err, w.Code)
		}
	}
	reportCPU(b, cpu)
}

// cpuTime is the CPU time (user and system) the process has used.
func cpuTime(b *testing.B) time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		b.Fatal(err)
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// reportCPU reports the process's CPU time per op from start on: unlike
// ns/op, it does not grow when other processes take the machine's cores.
func reportCPU(b *testing.B, start time.Duration) {
	b.ReportMetric(float64(cpuTime(b)-start)/float64(b.N), "cpu-ns/op")
}
