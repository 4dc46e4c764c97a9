package proxy

import (
	"bytes"
	"context"
	"encoding/base64"
	"encoding/binary"
	"encoding/json"
	"errors"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"connectrpc.com/connect"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/encoding"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protoreflect"
	"google.golang.org/protobuf/types/dynamicpb"

	"github.com/sidecarlb/sidecar/config"
	"github.com/sidecarlb/sidecar/internal/h2/h2test"
	"github.com/sidecarlb/sidecar/internal/leakcheck"
	"github.com/sidecarlb/sidecar/transcode/transcodetest"
)

// transcoding is an upstream listener with codec.transcode on, in front
// of nodes.
type transcoding struct {
	*testServer
	metrics *Metrics
}

func startTranscoding(t testing.TB, codec config.Codec, addrs ...string) *transcoding {
	t.Helper()
	codec.Transcode = true
	return startRoute(t, RouteConfig{Service: "echo", Protocol: config.ProtocolGRPC, Codec: codec}, addrs...)
}

func startRoute(t testing.TB, cfg RouteConfig, addrs ...string) *transcoding {
	t.Helper()
	m := NewMetrics(prometheus.NewRegistry())
	h, err := New(staticCache(t, map[string][]string{"echo": addrs}), m, testLogger(t)).Upstream("upstream", cfg)
	if err != nil {
		t.Fatalf("Upstream() error = %v", err)
	}
	return &transcoding{testServer: startProxyServer(t, h), metrics: m}
}

// fetches is the schema fetch count the metric shows for result.
func (s *transcoding) fetches(source, result string) float64 {
	return testutil.ToFloat64(s.metrics.schemaFetches.WithLabelValues("upstream", "echo", source, result))
}

func post(t testing.TB, c *http.Client, url, contentType, body string, header ...string) response {
	t.Helper()
	req, err := http.NewRequest(http.MethodPost, url, strings.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("Content-Type", contentType)
	for i := 0; i+1 < len(header); i += 2 {
		req.Header.Set(header[i], header[i+1])
	}
	return do(t, c, req)
}

// TestTranscodeConnectJSON: a plain net/http client calls the gRPC node
// with a Connect JSON body over HTTP/1.1; metadata goes both ways; the
// schema is fetched once for all calls.
func TestTranscodeConnectJSON(t *testing.T) {
	leakcheck.Check(t)
	node := transcodetest.Start(t, 1, transcodetest.ReflectionV1, "")
	px := startTranscoding(t, config.Codec{}, node.Addr)
	c := newClient(t, nil)
	for i := range 20 {
		r := post(t, c, px.URL+"/test.v1.Echo/Say", "application/json", `{"text":"hi","at":"2026-01-02T03:04:05Z"}`,
			"X-App", "a1", "Connect-Protocol-Version", "1", "Connect-Timeout-Ms", "5000")
		if r.status != http.StatusOK || r.body != `{"text":"hi"}` {
			t.Fatalf("call %d = %d %q, want 200 {\"text\":\"hi\"}", i, r.status, r.body)
		}
		if ct := r.header.Get("Content-Type"); ct != "application/json" {
			t.Errorf("Content-Type = %q, want application/json", ct)
		}
		if got := r.header.Get("X-Node"); got != node.Addr {
			t.Errorf("X-Node = %q, want the node's header %q", got, node.Addr)
		}
		if got := r.header.Get("Trailer-X-Trailer"); got != "t" {
			t.Errorf("Trailer-X-Trailer = %q, want the node's trailer t", got)
		}
	}
	md := *node.LastMetadata.Load()
	if got := md.Get("x-app"); len(got) != 1 || got[0] != "a1" {
		t.Errorf("node metadata x-app = %v, want [a1]", got)
	}
	if got := md.Get("connect-protocol-version"); len(got) != 0 {
		t.Errorf("node metadata connect-protocol-version = %v, want none", got)
	}
	if n := node.ReflectionCalls.Load(); n != 1 {
		t.Errorf("reflection calls on the node after 20 calls = %d, want 1", n)
	}
	if n := px.fetches("reflection", "ok"); n != 1 {
		t.Errorf("sidecar_codec_schema_fetches_total{result=ok} = %v, want 1", n)
	}
}

// compact drops the spaces protojson puts in at random.
func compact(s string) string {
	var b bytes.Buffer
	if err := json.Compact(&b, []byte(s)); err != nil {
		return s
	}
	return b.String()
}

// TestTranscodeRefusals: what the sidecar refuses itself sends nothing to
// the node and answers in Connect's shape.
func TestTranscodeRefusals(t *testing.T) {
	node := transcodetest.Start(t, 1, transcodetest.ReflectionV1, "")
	bare := transcodetest.Start(t, 1, transcodetest.ReflectionNone, "")
	px := startTranscoding(t, config.Codec{}, node.Addr)
	pxBare := startTranscoding(t, config.Codec{}, bare.Addr)
	c := newClient(t, nil)
	for _, tc := range []struct {
		name, url, body string
		status          int
		code            string
	}{
		{"malformed JSON", px.URL + "/test.v1.Echo/Say", `{"text":`, 400, "invalid_argument"},
		{"unknown field", px.URL + "/test.v1.Echo/Say", `{"nope":1}`, 400, "invalid_argument"},
		{"wrong type", px.URL + "/test.v1.Echo/Say", `{"code":"x"}`, 400, "invalid_argument"},
		{"unknown method", px.URL + "/test.v1.Echo/Nope", `{}`, 501, "unimplemented"},
		{"unknown service", px.URL + "/test.v1.Nope/Say", `{}`, 501, "unimplemented"},
		{"not a method path", px.URL + "/just-a-path", `{}`, 501, "unimplemented"},
		{"streaming method as unary", px.URL + "/test.v1.Echo/Count", `{}`, 501, "unimplemented"},
		{"no reflection, no descriptor set", pxBare.URL + "/test.v1.Echo/Say", `{}`, 415, "unimplemented"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := post(t, c, tc.url, "application/json", tc.body)
			var e struct{ Code, Message string }
			if err := json.Unmarshal([]byte(r.body), &e); err != nil {
				t.Fatalf("body %q is not a Connect error: %v", r.body, err)
			}
			if r.status != tc.status || e.Code != tc.code || e.Message == "" {
				t.Errorf("answer = %d %s, want %d %s with a message", r.status, r.body, tc.status, tc.code)
			}
			if got := r.header.Get("X-Sidecar-Error"); got != "transcode_"+tc.code {
				t.Errorf("X-Sidecar-Error = %q, want transcode_%s: the sidecar answered itself", got, tc.code)
			}
		})
	}
	if n := node.Calls.Load() + bare.Calls.Load(); n != 0 {
		t.Errorf("calls that reached a node = %d, want 0", n)
	}
	if !strings.Contains(post(t, c, pxBare.URL+"/test.v1.Echo/Say", "application/json", `{}`).body, "reflection") {
		t.Error("415 body does not say the node has no reflection")
	}
}

// TestTranscodeStatusCodes: each of the 16 gRPC error codes from the node
// becomes Connect's code name and HTTP status, details included.
func TestTranscodeStatusCodes(t *testing.T) {
	node := transcodetest.Start(t, 1, transcodetest.ReflectionV1, "")
	px := startTranscoding(t, config.Codec{}, node.Addr)
	c := newClient(t, nil)
	for _, tc := range []struct {
		code   codes.Code
		name   string
		status int
	}{
		{codes.Canceled, "canceled", 499},
		{codes.Unknown, "unknown", 500},
		{codes.InvalidArgument, "invalid_argument", 400},
		{codes.DeadlineExceeded, "deadline_exceeded", 504},
		{codes.NotFound, "not_found", 404},
		{codes.AlreadyExists, "already_exists", 409},
		{codes.PermissionDenied, "permission_denied", 403},
		{codes.ResourceExhausted, "resource_exhausted", 429},
		{codes.FailedPrecondition, "failed_precondition", 400},
		{codes.Aborted, "aborted", 409},
		{codes.OutOfRange, "out_of_range", 400},
		{codes.Unimplemented, "unimplemented", 501},
		{codes.Internal, "internal", 500},
		{codes.Unavailable, "unavailable", 503},
		{codes.DataLoss, "data_loss", 500},
		{codes.Unauthenticated, "unauthenticated", 401},
	} {
		t.Run(tc.name, func(t *testing.T) {
			body, _ := json.Marshal(map[string]any{"text": "boom é%", "code": int(tc.code)})
			r := post(t, c, px.URL+"/test.v1.Echo/Say", "application/json", string(body))
			var e struct {
				Code, Message string
				Details       []struct{ Type, Value string }
			}
			if err := json.Unmarshal([]byte(r.body), &e); err != nil {
				t.Fatalf("body %q: %v", r.body, err)
			}
			if r.status != tc.status || e.Code != tc.name || e.Message != "boom é%" {
				t.Errorf("answer = %d %s, want %d %s with message %q", r.status, r.body, tc.status, tc.name, "boom é%")
			}
			if len(e.Details) != 1 || e.Details[0].Type != "google.rpc.ErrorInfo" {
				t.Fatalf("details = %+v, want one google.rpc.ErrorInfo", e.Details)
			}
			b, err := base64.RawStdEncoding.DecodeString(e.Details[0].Value)
			var info errdetails.ErrorInfo
			if err != nil || proto.Unmarshal(b, &info) != nil || info.Reason != "TEST" {
				t.Errorf("detail value %q = %v (%v), want ErrorInfo reason TEST", e.Details[0].Value, &info, err)
			}
		})
	}
}

// echoMessages returns the test service's request and response
// descriptors.
func echoMessages(version int) (req, resp protoreflect.MessageDescriptor) {
	d, _ := transcodetest.Schema(version).FindDescriptorByName(transcodetest.Service)
	m := d.(protoreflect.ServiceDescriptor).Methods().ByName("Say")
	return m.Input(), m.Output()
}

func echoRequest(t testing.TB, text string) *dynamicpb.Message {
	in, _ := echoMessages(1)
	m := dynamicpb.NewMessage(in)
	if err := protojson.Unmarshal([]byte(`{"text":"`+text+`"}`), m); err != nil {
		t.Fatal(err)
	}
	return m
}

func textOf(m proto.Message) string {
	r := m.ProtoReflect()
	return r.Get(r.Descriptor().Fields().ByName("text")).String()
}

// TestTranscodeConnectProto: application/proto bodies pass through as
// protobuf, answered as application/proto.
func TestTranscodeConnectProto(t *testing.T) {
	node := transcodetest.Start(t, 1, transcodetest.ReflectionV1, "")
	px := startTranscoding(t, config.Codec{}, node.Addr)
	b, _ := proto.Marshal(echoRequest(t, "bin"))
	r := post(t, newClient(t, nil), px.URL+"/test.v1.Echo/Say", "application/proto", string(b))
	_, out := echoMessages(1)
	m := dynamicpb.NewMessage(out)
	if r.status != 200 || r.header.Get("Content-Type") != "application/proto" || proto.Unmarshal([]byte(r.body), m) != nil || textOf(m) != "bin" {
		t.Errorf("answer = %d %q %q, want 200 application/proto with text bin", r.status, r.header.Get("Content-Type"), r.body)
	}
}

// connectClient is a connect-go client of one Echo method over dynamic
// messages.
func connectClient(t testing.TB, hc *http.Client, url, method string, opts ...connect.ClientOption) *connect.Client[dynamicpb.Message, dynamicpb.Message] {
	d, _ := transcodetest.Schema(1).FindDescriptorByName(transcodetest.Service)
	md := d.(protoreflect.ServiceDescriptor).Methods().ByName(protoreflect.Name(method))
	opts = append(opts, connect.WithSchema(md), connect.WithResponseInitializer(func(_ connect.Spec, msg any) error {
		*msg.(*dynamicpb.Message) = *dynamicpb.NewMessage(md.Output())
		return nil
	}))
	return connect.NewClient[dynamicpb.Message, dynamicpb.Message](hc, url+"/"+transcodetest.Service+"/"+method, opts...)
}

// TestTranscodeConnectClients: connect-go clients in Connect JSON,
// Connect protobuf, gRPC-Web protobuf and gRPC-Web JSON, over HTTP/1.1.
func TestTranscodeConnectClients(t *testing.T) {
	node := transcodetest.Start(t, 1, transcodetest.ReflectionV1, "")
	px := startTranscoding(t, config.Codec{}, node.Addr)
	hc := newClient(t, nil)
	for _, tc := range []struct {
		name string
		opts []connect.ClientOption
	}{
		{"connect json", []connect.ClientOption{connect.WithProtoJSON()}},
		{"connect proto", nil},
		{"grpc-web proto", []connect.ClientOption{connect.WithGRPCWeb()}},
		{"grpc-web json", []connect.ClientOption{connect.WithGRPCWeb(), connect.WithProtoJSON()}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cl := connectClient(t, hc, px.URL, "Say", tc.opts...)
			resp, err := cl.CallUnary(context.Background(), connect.NewRequest(echoRequest(t, tc.name)))
			if err != nil {
				t.Fatalf("CallUnary() error = %v", err)
			}
			if got := textOf(resp.Msg); got != tc.name {
				t.Errorf("text = %q, want %q", got, tc.name)
			}
			if got := resp.Header().Get("X-Node"); got != node.Addr {
				t.Errorf("header X-Node = %q, want %q", got, node.Addr)
			}
			if got := resp.Trailer().Get("X-Trailer"); got != "t" {
				t.Errorf("trailer X-Trailer = %q, want t", got)
			}

			req := echoRequest(t, "gone")
			req.Set(req.Descriptor().Fields().ByName("code"), protoreflect.ValueOfInt32(int32(codes.NotFound)))
			_, err = cl.CallUnary(context.Background(), connect.NewRequest(req))
			var ce *connect.Error
			if !errors.As(err, &ce) || ce.Code() != connect.CodeNotFound || ce.Message() != "gone" || len(ce.Details()) != 1 {
				t.Errorf("error = %v, want not_found \"gone\" with one detail", err)
			}

			stream, err := connectClient(t, hc, px.URL, "Count", tc.opts...).CallServerStream(context.Background(),
				connect.NewRequest(countRequest(t, "n", 3)))
			if err != nil {
				t.Fatalf("CallServerStream() error = %v", err)
			}
			var got []string
			for stream.Receive() {
				got = append(got, textOf(stream.Msg()))
			}
			if err := stream.Err(); err != nil || strings.Join(got, ",") != "n 1,n 2,n 3" {
				t.Errorf("stream = %q, %v; want n 1,n 2,n 3", got, err)
			}
		})
	}
}

func countRequest(t testing.TB, text string, n int) *dynamicpb.Message {
	m := echoRequest(t, text)
	m.Set(m.Descriptor().Fields().ByName("count"), protoreflect.ValueOfInt32(int32(n)))
	return m
}

// jsonCodec is a grpc-go codec for content subtype json.
type jsonCodec struct{}

func (jsonCodec) Marshal(v any) ([]byte, error)   { return protojson.Marshal(v.(proto.Message)) }
func (jsonCodec) Unmarshal(b []byte, v any) error { return protojson.Unmarshal(b, v.(proto.Message)) }
func (jsonCodec) Name() string                    { return "json" }

// TestTranscodeGRPCJSON: a grpc-go client with the JSON content subtype
// (application/grpc+json) calls unary and server-streaming methods over
// h2, and gets the node's status.
func TestTranscodeGRPCJSON(t *testing.T) {
	encoding.RegisterCodec(jsonCodec{})
	node := transcodetest.Start(t, 1, transcodetest.ReflectionV1, "")
	px := startTranscoding(t, config.Codec{}, node.Addr)
	cc, err := grpc.NewClient(px.Listener.Addr().String(), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer cc.Close()
	ctx := metadata.AppendToOutgoingContext(context.Background(), "x-app", "g1")
	_, outDesc := echoMessages(1)
	out := dynamicpb.NewMessage(outDesc)
	var header, trailer metadata.MD
	if err := cc.Invoke(ctx, "/test.v1.Echo/Say", echoRequest(t, "json"), out, grpc.CallContentSubtype("json"),
		grpc.Header(&header), grpc.Trailer(&trailer)); err != nil {
		t.Fatalf("Invoke() error = %v", err)
	}
	if textOf(out) != "json" || len(trailer.Get("x-trailer")) != 1 {
		t.Errorf("answer %v, trailer %v; want text json and x-trailer", out, trailer)
	}
	req := echoRequest(t, "denied")
	req.Set(req.Descriptor().Fields().ByName("code"), protoreflect.ValueOfInt32(int32(codes.PermissionDenied)))
	err = cc.Invoke(ctx, "/test.v1.Echo/Say", req, dynamicpb.NewMessage(outDesc), grpc.CallContentSubtype("json"))
	if st := status.Convert(err); st.Code() != codes.PermissionDenied || st.Message() != "denied" || len(st.Details()) != 1 {
		t.Errorf("error = %v, want PermissionDenied denied with one detail", err)
	}
	stream, err := cc.NewStream(ctx, &grpc.StreamDesc{ServerStreams: true}, "/test.v1.Echo/Count", grpc.CallContentSubtype("json"))
	if err != nil {
		t.Fatal(err)
	}
	if err := stream.SendMsg(countRequest(t, "s", 2)); err != nil {
		t.Fatal(err)
	}
	_ = stream.CloseSend()
	var got []string
	for {
		m := dynamicpb.NewMessage(outDesc)
		if err := stream.RecvMsg(m); err != nil {
			if err != io.EOF {
				t.Errorf("RecvMsg() error = %v", err)
			}
			break
		}
		got = append(got, textOf(m))
	}
	if strings.Join(got, ",") != "s 1,s 2" {
		t.Errorf("stream = %q, want s 1,s 2", got)
	}
	// Native protobuf calls still pass through untouched.
	if err := cc.Invoke(ctx, "/test.v1.Echo/Say", echoRequest(t, "native"), out); err != nil || textOf(out) != "native" {
		t.Errorf("native Invoke() = %v, %v", out, err)
	}
}

// TestTranscodeJSONRPC: go-micro's JSON-RPC 1.0 shape.
func TestTranscodeJSONRPC(t *testing.T) {
	node := transcodetest.Start(t, 1, transcodetest.ReflectionV1, "")
	px := startTranscoding(t, config.Codec{}, node.Addr)
	c := newClient(t, nil)
	r := post(t, c, px.URL+"/", "application/json-rpc", `{"method":"test.v1.Echo.Say","params":[{"text":"rpc"}],"id":7}`)
	if r.status != 200 || strings.TrimSpace(r.body) != `{"id":7,"result":{"text":"rpc"},"error":null}` {
		t.Errorf("answer = %d %s", r.status, r.body)
	}
	r = post(t, c, px.URL+"/", "application/json-rpc", `{"method":"test.v1.Echo.Say","params":[{"text":"no","code":5}],"id":"x"}`)
	if r.status != 200 || strings.TrimSpace(r.body) != `{"id":"x","result":null,"error":"no"}` {
		t.Errorf("error answer = %d %s", r.status, r.body)
	}
	// go-micro names the service without its package.
	r = post(t, c, px.URL+"/", "application/json-rpc", `{"method":"Echo.Say","params":[{"text":"short"}],"id":8}`)
	if r.status != 200 || strings.TrimSpace(r.body) != `{"id":8,"result":{"text":"short"},"error":null}` {
		t.Errorf("short name answer = %d %s", r.status, r.body)
	}
	r = post(t, c, px.URL+"/", "application/json-rpc", `{"method":"Nope.Say","params":[{}],"id":9}`)
	if r.status != 200 || !strings.Contains(r.body, `"error":"unknown service Nope"`) {
		t.Errorf("unknown short name answer = %d %s", r.status, r.body)
	}
	r = post(t, c, px.URL+"/", "application/json-rpc", `{"method":`)
	if r.status != 400 || !strings.Contains(r.body, `"error":"malformed JSON-RPC request`) {
		t.Errorf("malformed answer = %d %s, want 400 with an error", r.status, r.body)
	}
}

// TestTranscodeConnectStreamHTTP1: Connect server streaming over HTTP/1.1
// with a plain client: envelopes, then the end-of-stream message.
func TestTranscodeConnectStreamHTTP1(t *testing.T) {
	node := transcodetest.Start(t, 1, transcodetest.ReflectionV1, "")
	px := startTranscoding(t, config.Codec{}, node.Addr)
	msg := []byte(`{"text":"e","count":2}`)
	body := append([]byte{0, 0, 0, 0, byte(len(msg))}, msg...)
	r := post(t, newClient(t, nil), px.URL+"/test.v1.Echo/Count", "application/connect+json", string(body))
	var frames []string
	b := []byte(r.body)
	for len(b) >= 5 {
		n := binary.BigEndian.Uint32(b[1:5])
		frames = append(frames, string(rune('0'+b[0]))+compact(string(b[5:5+n])))
		b = b[5+n:]
	}
	want := []string{`0{"text":"e 1","n":1}`, `0{"text":"e 2","n":2}`, `2{}`}
	if r.status != 200 || strings.Join(frames, "|") != strings.Join(want, "|") {
		t.Errorf("stream = %d %q, want 200 %q", r.status, frames, want)
	}
}

// TestTranscodeSchemaChange: the node gains a field and a method; the
// sidecar, still running, picks both up.
func TestTranscodeSchemaChange(t *testing.T) {
	leakcheck.Check(t)
	node := transcodetest.Start(t, 1, transcodetest.ReflectionV1, "")
	px := startTranscoding(t, config.Codec{}, node.Addr)
	c := newClient(t, nil)
	if r := post(t, c, px.URL+"/test.v1.Echo/Say", "application/json", `{"text":"a","extra":"x"}`); r.status != 400 {
		t.Fatalf("new field before the change = %d %s, want 400", r.status, r.body)
	}
	node.Server.Stop()
	transcodetest.Start(t, 2, transcodetest.ReflectionV1, node.Addr)
	var r response
	for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline); time.Sleep(100 * time.Millisecond) {
		// Fetched again at most once a second (Retry).
		if r = post(t, c, px.URL+"/test.v1.Echo/Say", "application/json", `{"text":"a","extra":"x"}`); r.status == 200 {
			break
		}
	}
	if r.status != 200 || compact(r.body) != `{"text":"a","extra":"x"}` {
		t.Errorf("new field after the change = %d %s, want 200 with extra", r.status, r.body)
	}
	if r := post(t, c, px.URL+"/test.v1.Echo/Shout", "application/json", `{"text":"a"}`); r.status != 200 || r.body != `{"text":"A"}` {
		t.Errorf("new method = %d %s, want 200 {\"text\":\"A\"}", r.status, r.body)
	}
}

// TestTranscodeDescriptorSet: a node without reflection, described by a
// descriptor_set file.
func TestTranscodeDescriptorSet(t *testing.T) {
	node := transcodetest.Start(t, 1, transcodetest.ReflectionNone, "")
	path := filepath.Join(t.TempDir(), "echo.pb")
	if err := os.WriteFile(path, transcodetest.DescriptorSet(1), 0o600); err != nil {
		t.Fatal(err)
	}
	for _, desc := range []string{config.DescriptorsFile, config.DescriptorsReflection} {
		t.Run(desc, func(t *testing.T) {
			px := startTranscoding(t, config.Codec{Descriptors: desc, DescriptorSet: path}, node.Addr)
			r := post(t, newClient(t, nil), px.URL+"/test.v1.Echo/Say", "application/json", `{"text":"f"}`)
			if r.status != 200 || r.body != `{"text":"f"}` {
				t.Errorf("answer = %d %s", r.status, r.body)
			}
		})
	}
}

// TestTranscodeRetriesLikeNative: a transcoded call to a node that refuses
// connections is retried on the next one, as a native call is.
func TestTranscodeRetriesLikeNative(t *testing.T) {
	node := transcodetest.Start(t, 1, transcodetest.ReflectionV1, "")
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	dead := ln.Addr().String()
	ln.Close()
	px := startRoute(t, RouteConfig{Service: "echo", Protocol: config.ProtocolGRPC, Codec: config.Codec{Transcode: true},
		Resilience: config.Resilience{Retries: config.Retries{Attempts: 2,
			Budget: config.Budget{Percent: 100, MinPerSecond: 100, Window: 10 * time.Second}}}}, dead, node.Addr)
	c := newClient(t, nil)
	for i := range 6 {
		r := post(t, c, px.URL+"/test.v1.Echo/Say", "application/json", `{"text":"r"}`)
		if r.status != 200 {
			t.Fatalf("call %d = %d %s, want 200 (retried past the dead node)", i, r.status, r.body)
		}
	}
	if n := testutil.ToFloat64(px.metrics.retries.WithLabelValues("upstream", "echo", "connect_failed", "retried")); n == 0 {
		t.Error("no connect_failed retry counted")
	}
}

// TestTranscodeClientAndBidiStreams: connect-go clients over h2 (Connect
// JSON and gRPC-Web) stream to Collect, and ping-pong on Chat, each
// answer read before the next message is sent; a grpc-go JSON client
// does the same on Chat.
func TestTranscodeClientAndBidiStreams(t *testing.T) {
	leakcheck.Check(t)
	encoding.RegisterCodec(jsonCodec{})
	node := transcodetest.Start(t, 1, transcodetest.ReflectionV1, "")
	px := startTranscoding(t, config.Codec{}, node.Addr)
	hc := h2test.NewClient(t, nil)
	for _, tc := range []struct {
		name string
		opts []connect.ClientOption
	}{
		{"connect json", []connect.ClientOption{connect.WithProtoJSON()}},
		{"grpc-web json", []connect.ClientOption{connect.WithGRPCWeb(), connect.WithProtoJSON()}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ctx := context.Background()
			cs := connectClient(t, hc, px.URL, "Collect", tc.opts...).CallClientStream(ctx)
			for _, s := range []string{"a", "b", "c"} {
				if err := cs.Send(echoRequest(t, s)); err != nil {
					t.Fatalf("Send() error = %v", err)
				}
			}
			resp, err := cs.CloseAndReceive()
			if err != nil || textOf(resp.Msg) != "a,b,c" {
				t.Fatalf("Collect = %v, %v; want a,b,c", resp, err)
			}

			bs := connectClient(t, hc, px.URL, "Chat", tc.opts...).CallBidiStream(ctx)
			for _, s := range []string{"ping", "pong", "again"} {
				if err := bs.Send(echoRequest(t, s)); err != nil {
					t.Fatalf("Send(%s) error = %v", s, err)
				}
				m, err := bs.Receive()
				if err != nil || textOf(m) != s {
					t.Fatalf("Receive() = %v, %v; want %s", m, err, s)
				}
			}
			_ = bs.CloseRequest()
			if _, err := bs.Receive(); !errors.Is(err, io.EOF) {
				t.Errorf("Receive() after the last = %v, want EOF", err)
			}
			_ = bs.CloseResponse()
		})
	}

	t.Run("grpc json", func(t *testing.T) {
		cc, err := grpc.NewClient(px.Listener.Addr().String(), grpc.WithTransportCredentials(insecure.NewCredentials()))
		if err != nil {
			t.Fatal(err)
		}
		defer cc.Close()
		st, err := cc.NewStream(context.Background(), &grpc.StreamDesc{ClientStreams: true, ServerStreams: true},
			"/test.v1.Echo/Chat", grpc.CallContentSubtype("json"))
		if err != nil {
			t.Fatal(err)
		}
		_, outDesc := echoMessages(1)
		for _, s := range []string{"x", "y"} {
			if err := st.SendMsg(echoRequest(t, s)); err != nil {
				t.Fatal(err)
			}
			m := dynamicpb.NewMessage(outDesc)
			if err := st.RecvMsg(m); err != nil || textOf(m) != s {
				t.Fatalf("RecvMsg() = %v, %v; want %s", m, err, s)
			}
		}
		_ = st.CloseSend()
		if err := st.RecvMsg(dynamicpb.NewMessage(outDesc)); err != io.EOF {
			t.Errorf("RecvMsg() after the last = %v, want EOF", err)
		}
	})
}

// TestTranscodeConnectGet: Connect's GET for a NO_SIDE_EFFECTS method,
// from net/http and from a connect-go client with WithHTTPGet; POST-only
// methods refuse it with 405.
func TestTranscodeConnectGet(t *testing.T) {
	node := transcodetest.Start(t, 1, transcodetest.ReflectionV1, "")
	px := startTranscoding(t, config.Codec{}, node.Addr)
	c := newClient(t, nil)
	r := doGet(t, c, px.URL+"/test.v1.Echo/Say?connect=v1&encoding=json&message=%7B%22text%22%3A%22g%22%7D", nil)
	if r.status != 200 || r.body != `{"text":"g"}` {
		t.Errorf("GET = %d %s, want 200 {\"text\":\"g\"}", r.status, r.body)
	}
	b, _ := proto.Marshal(echoRequest(t, "b64"))
	r = doGet(t, c, px.URL+"/test.v1.Echo/Say?encoding=proto&base64=1&message="+base64.RawURLEncoding.EncodeToString(b), nil)
	if r.status != 200 || r.header.Get("Content-Type") != "application/proto" {
		t.Errorf("GET proto = %d %q, want 200 application/proto", r.status, r.header.Get("Content-Type"))
	}
	r = doGet(t, c, px.URL+"/test.v1.Echo/Collect?encoding=json&message=%7B%7D", nil)
	if r.status != 501 {
		t.Errorf("GET of a streaming method = %d %s, want 501", r.status, r.body)
	}

	node2 := transcodetest.Start(t, 2, transcodetest.ReflectionV1, "")
	px2 := startTranscoding(t, config.Codec{}, node2.Addr)
	if r := doGet(t, c, px2.URL+"/test.v1.Echo/Shout?encoding=json&message=%7B%7D", nil); r.status != 405 || !strings.Contains(r.body, "NO_SIDE_EFFECTS") {
		t.Errorf("GET of a method not marked NO_SIDE_EFFECTS = %d %s, want 405", r.status, r.body)
	}

	cl := connectClient(t, c, px.URL, "Say", connect.WithProtoJSON(), connect.WithHTTPGet(),
		connect.WithIdempotency(connect.IdempotencyNoSideEffects))
	resp, err := cl.CallUnary(context.Background(), connect.NewRequest(echoRequest(t, "via get")))
	if err != nil || textOf(resp.Msg) != "via get" {
		t.Errorf("CallUnary() with GET = %v, %v", resp, err)
	}
	if n := node.Calls.Load(); n != 3 {
		t.Errorf("node calls = %d, want 3", n)
	}
}

// TestTranscodeDeadline: Connect-Timeout-Ms bounds the call: the node
// sees the deadline, and the client gets deadline_exceeded (504).
func TestTranscodeDeadline(t *testing.T) {
	leakcheck.Check(t)
	node := transcodetest.Start(t, 1, transcodetest.ReflectionV1, "")
	px := startTranscoding(t, config.Codec{}, node.Addr)
	c := newClient(t, nil)
	start := time.Now()
	r := post(t, c, px.URL+"/test.v1.Echo/Say", "application/json", `{"text":"slow","delayMs":10000}`, "Connect-Timeout-Ms", "100")
	if r.status != http.StatusGatewayTimeout || !strings.Contains(r.body, `"code":"deadline_exceeded"`) {
		t.Errorf("answer = %d %s, want 504 deadline_exceeded", r.status, r.body)
	}
	if d := time.Since(start); d > 5*time.Second {
		t.Errorf("answered after %v, want about 100ms", d)
	}
	if n := node.Calls.Load(); n != 1 {
		t.Errorf("node calls = %d, want 1", n)
	}
}

// TestTranscodeReloadKeepsSchemas: a reload that keeps the codec keeps the
// schemas fetched: no new reflection call; one that changes it fetches
// again.
func TestTranscodeReloadKeepsSchemas(t *testing.T) {
	node := transcodetest.Start(t, 1, transcodetest.ReflectionV1, "")
	cfg := RouteConfig{Service: "echo", Protocol: config.ProtocolGRPC, Codec: config.Codec{Transcode: true}}
	u, err := New(staticCache(t, map[string][]string{"echo": {node.Addr}}), nil, testLogger(t)).Upstream("upstream", cfg)
	if err != nil {
		t.Fatal(err)
	}
	px := startProxyServer(t, u)
	c := newClient(t, nil)
	call := func() {
		t.Helper()
		if r := post(t, c, px.URL+"/test.v1.Echo/Say", "application/json", `{"text":"r"}`); r.status != 200 {
			t.Fatalf("call = %d %s", r.status, r.body)
		}
	}
	call()
	cfg.Balancer = "least_request"
	if err := u.Update(cfg); err != nil {
		t.Fatal(err)
	}
	call()
	if n := node.ReflectionCalls.Load(); n != 1 {
		t.Errorf("reflection calls after a reload keeping the codec = %d, want 1", n)
	}
	cfg.Codec.Refresh = time.Hour
	if err := u.Update(cfg); err != nil {
		t.Fatal(err)
	}
	call()
	if n := node.ReflectionCalls.Load(); n != 2 {
		t.Errorf("reflection calls after a reload changing the codec = %d, want 2", n)
	}
}
