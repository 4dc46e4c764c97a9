package proxy

import (
	"bytes"
	"compress/gzip"
	"context"
	"encoding/base64"
	"encoding/binary"
	"io"
	"net/http"
	"net/url"
	"strings"
	"sync"
	"testing"

	"connectrpc.com/connect"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/encoding"
	grpcgzip "google.golang.org/grpc/encoding/gzip"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/dynamicpb"

	"github.com/sidecarlb/sidecar/config"
	"github.com/sidecarlb/sidecar/discovery"
	"github.com/sidecarlb/sidecar/transcode/transcodetest"
)

// frames splits a body of length-prefixed frames into "flag:payload"
// strings, inflating compressed payloads.
func frames(t testing.TB, b []byte) []string {
	t.Helper()
	var out []string
	for len(b) > 0 {
		if len(b) < 5 || int(binary.BigEndian.Uint32(b[1:5])) > len(b)-5 {
			t.Fatalf("truncated frame in %q", b)
		}
		flag, msg := b[0], b[5:5+binary.BigEndian.Uint32(b[1:5])]
		b = b[5+len(msg):]
		if flag&1 != 0 {
			zr, err := gzip.NewReader(bytes.NewReader(msg))
			if err != nil {
				t.Fatalf("compressed frame: %v", err)
			}
			if msg, err = io.ReadAll(zr); err != nil {
				t.Fatalf("compressed frame: %v", err)
			}
		}
		out = append(out, string(rune('0'+flag>>4))+string(rune('0'+flag&0xf))+":"+string(msg))
	}
	return out
}

// framed is msg in one length-prefixed frame.
func framed(flag byte, msg []byte) []byte {
	f := append([]byte{flag, 0, 0, 0, 0}, msg...)
	binary.BigEndian.PutUint32(f[1:5], uint32(len(msg)))
	return f
}

func gz(t testing.TB, b []byte) []byte {
	t.Helper()
	var buf bytes.Buffer
	zw := gzip.NewWriter(&buf)
	_, _ = zw.Write(b)
	if err := zw.Close(); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

// TestTranscodeGRPCWebText: application/grpc-web-text requests in base64
// (whole, and in two padded pieces) are answered in base64, unary and
// server streaming, with the status in the base64 trailer frame.
func TestTranscodeGRPCWebText(t *testing.T) {
	node := transcodetest.Start(t, 1, transcodetest.ReflectionV1, "")
	px := startTranscoding(t, config.Codec{}, node.Addr)
	c := newClient(t, nil)
	say, _ := proto.Marshal(echoRequest(t, "txt"))
	count, _ := proto.Marshal(countRequest(t, "c", 2))
	whole := base64.StdEncoding.EncodeToString(framed(0, say))
	f := framed(0, say)
	pieces := base64.StdEncoding.EncodeToString(f[:4]) + "\r\n" + base64.StdEncoding.EncodeToString(f[4:])
	_, outDesc := echoMessages(1)
	text := func(payload string) string {
		m := dynamicpb.NewMessage(outDesc)
		if err := proto.Unmarshal([]byte(payload), m); err != nil {
			t.Fatalf("answer message: %v", err)
		}
		return textOf(m)
	}
	for _, tc := range []struct {
		name, ct, method, body string
		want                   []string
	}{
		{"unary", "application/grpc-web-text", "Say", whole, []string{"txt"}},
		{"unary in padded pieces", "application/grpc-web-text+proto", "Say", pieces, []string{"txt"}},
		{"server stream", "application/grpc-web-text", "Count", base64.StdEncoding.EncodeToString(framed(0, count)), []string{"c 1", "c 2"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := post(t, c, px.URL+"/test.v1.Echo/"+tc.method, tc.ct, tc.body)
			if r.status != 200 || r.header.Get("Content-Type") != tc.ct {
				t.Fatalf("answer = %d %q %q, want 200 %s", r.status, r.header.Get("Content-Type"), r.body, tc.ct)
			}
			// Each frame is its own padded base64 piece: decode them in turn.
			var raw []byte
			for s := r.body; s != ""; {
				end := len(s)
				if i := strings.IndexByte(s, '='); i >= 0 {
					end = i + strings.IndexFunc(s[i:]+"x", func(r rune) bool { return r != '=' })
				}
				b, err := base64.StdEncoding.DecodeString(s[:end])
				if err != nil {
					t.Fatalf("answer %q is not base64 pieces: %v", r.body, err)
				}
				raw, s = append(raw, b...), s[end:]
			}
			fs := frames(t, raw)
			if len(fs) != len(tc.want)+1 {
				t.Fatalf("frames = %q, want %d messages and a trailer", fs, len(tc.want))
			}
			for i, w := range tc.want {
				if got := text(fs[i][3:]); !strings.HasPrefix(fs[i], "00:") || got != w {
					t.Errorf("frame %d = %q (text %q), want a message %q", i, fs[i], got, w)
				}
			}
			if tr := fs[len(fs)-1]; !strings.HasPrefix(tr, "80:") || !strings.Contains(tr, "grpc-status: 0\r\n") {
				t.Errorf("last frame = %q, want a trailer frame with grpc-status: 0", tr)
			}
		})
	}
	r := post(t, c, px.URL+"/test.v1.Echo/Say", "application/grpc-web-text", "not base64!")
	if dec, _ := base64.StdEncoding.DecodeString(r.body); !strings.Contains(string(dec), "grpc-status: 3\r\n") {
		t.Errorf("a body not in base64 = %d %q, want grpc-status 3 (invalid_argument) in base64", r.status, dec)
	}
	if n := node.Calls.Load(); n != 3 {
		t.Errorf("node calls = %d, want 3 (the bad body sent nothing)", n)
	}
}

// headerRecorder keeps the header of the last answer its transport got.
type headerRecorder struct {
	http.RoundTripper
	mu   sync.Mutex
	last http.Header
}

func (h *headerRecorder) RoundTrip(r *http.Request) (*http.Response, error) {
	resp, err := h.RoundTripper.RoundTrip(r)
	if err == nil {
		h.mu.Lock()
		h.last = resp.Header.Clone()
		h.mu.Unlock()
	}
	return resp, err
}

func (h *headerRecorder) get(k string) string {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.last.Get(k)
}

// TestTranscodeCompressedClients: connect-go clients sending gzip
// (WithSendGzip) in Connect JSON, Connect protobuf and gRPC-Web, and a
// grpc-go client with UseCompressor(gzip) and the JSON subtype, are
// understood and answered in gzip; the node receives plain messages.
func TestTranscodeCompressedClients(t *testing.T) {
	node := transcodetest.Start(t, 1, transcodetest.ReflectionV1, "")
	px := startTranscoding(t, config.Codec{}, node.Addr)
	hc := newClient(t, nil)
	rec := &headerRecorder{RoundTripper: hc.Transport}
	hc.Transport = rec
	long := strings.Repeat("z", 2000) // past connect-go's least size to compress
	for _, tc := range []struct {
		name, encHeader string
		opts            []connect.ClientOption
	}{
		{"connect json", "Content-Encoding", []connect.ClientOption{connect.WithProtoJSON()}},
		{"connect proto", "Content-Encoding", nil},
		{"grpc-web proto", "Grpc-Encoding", []connect.ClientOption{connect.WithGRPCWeb()}},
		{"grpc-web json", "Grpc-Encoding", []connect.ClientOption{connect.WithGRPCWeb(), connect.WithProtoJSON()}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			opts := append(tc.opts, connect.WithSendGzip())
			resp, err := connectClient(t, hc, px.URL, "Say", opts...).CallUnary(context.Background(), connect.NewRequest(echoRequest(t, long)))
			if err != nil {
				t.Fatalf("CallUnary() error = %v", err)
			}
			if got := textOf(resp.Msg); got != long {
				t.Errorf("text = %d bytes, want the %d sent", len(got), len(long))
			}
			if got := rec.get(tc.encHeader); got != "gzip" {
				t.Errorf("answer %s = %q, want gzip", tc.encHeader, got)
			}
			streamOpts := opts
			if tc.encHeader == "Content-Encoding" {
				tc.encHeader = "Connect-Content-Encoding"
			}
			stream, err := connectClient(t, hc, px.URL, "Count", streamOpts...).CallServerStream(context.Background(),
				connect.NewRequest(countRequest(t, long, 2)))
			if err != nil {
				t.Fatalf("CallServerStream() error = %v", err)
			}
			n := 0
			for stream.Receive() {
				n++
			}
			if err := stream.Err(); err != nil || n != 2 {
				t.Errorf("stream = %d messages, %v; want 2", n, err)
			}
			if got := rec.get(tc.encHeader); got != "gzip" {
				t.Errorf("stream answer %s = %q, want gzip", tc.encHeader, got)
			}
		})
	}

	encoding.RegisterCodec(jsonCodec{})
	cc, err := grpc.NewClient(px.Listener.Addr().String(), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer cc.Close()
	_, outDesc := echoMessages(1)
	out := dynamicpb.NewMessage(outDesc)
	if err := cc.Invoke(context.Background(), "/test.v1.Echo/Say", echoRequest(t, "grpc gzip"), out,
		grpc.CallContentSubtype("json"), grpc.UseCompressor(grpcgzip.Name)); err != nil || textOf(out) != "grpc gzip" {
		t.Errorf("grpc-go gzip JSON Invoke() = %v, %v; want text grpc gzip", out, err)
	}
	if got := (*node.LastMetadata.Load()).Get("grpc-encoding"); len(got) != 0 {
		t.Errorf("node got grpc-encoding %v, want plain messages", got)
	}
}

// TestTranscodeCompressedNode: a node answering with gzip messages
// (grpc.SetSendCompressor, allowed by the grpc-accept-encoding the
// sidecar sends) is inflated for clients that did not ask for gzip.
func TestTranscodeCompressedNode(t *testing.T) {
	node := transcodetest.Start(t, 1, transcodetest.ReflectionV1, "")
	px := startTranscoding(t, config.Codec{}, node.Addr)
	c := newClient(t, nil)
	r := post(t, c, px.URL+"/test.v1.Echo/Say", "application/json", `{"text":"zipped"}`, "X-Compress", "1")
	if r.status != 200 || r.body != `{"text":"zipped"}` {
		t.Errorf("answer = %d %q, want 200 {\"text\":\"zipped\"}", r.status, r.body)
	}
	msg := []byte(`{"text":"s","count":2}`)
	r = post(t, c, px.URL+"/test.v1.Echo/Count", "application/connect+json", string(framed(0, msg)), "X-Compress", "1")
	if fs := frames(t, []byte(r.body)); r.status != 200 || len(fs) != 3 || !strings.HasPrefix(fs[0], "00:") || !strings.HasPrefix(fs[2], "02:{}") {
		t.Errorf("stream = %d %q, want two plain messages and a clean end", r.status, fs)
	}
	if n := node.Compressed.Load(); n != 2 {
		t.Errorf("calls the node answered in gzip = %d, want 2", n)
	}
}

// TestTranscodeEncodingRefusals: an encoding other than identity and gzip
// is refused with unimplemented, a compressed flag with no encoding with
// internal; nothing reaches the node.
func TestTranscodeEncodingRefusals(t *testing.T) {
	node := transcodetest.Start(t, 1, transcodetest.ReflectionV1, "")
	px := startTranscoding(t, config.Codec{}, node.Addr)
	c := newClient(t, nil)
	say, _ := proto.Marshal(echoRequest(t, "x"))
	jsonMsg := []byte(`{"text":"x"}`)
	for _, tc := range []struct {
		name, ct, body string
		header         []string
		want           string // in the answer's body
		accept         string // the accept-encoding header the answer names
	}{
		{"connect unary br", "application/json", `{"text":"x"}`, []string{"Content-Encoding", "br"}, `"code":"unimplemented"`, ""},
		{"connect stream br", "application/connect+json", string(framed(0, jsonMsg)), []string{"Connect-Content-Encoding", "br"}, `"code":"unimplemented"`, "Connect-Accept-Encoding"},
		{"grpc-web br", "application/grpc-web", string(framed(0, say)), []string{"Grpc-Encoding", "br"}, "grpc-status: 12\r\n", "Grpc-Accept-Encoding"},
		{"grpc-web compressed flag without encoding", "application/grpc-web", string(framed(1, say)), nil, "grpc-status: 13\r\n", ""},
		{"connect stream compressed flag without encoding", "application/connect+json", string(framed(1, jsonMsg)), nil, `"code":"internal"`, ""},
		{"grpc-web bad gzip", "application/grpc-web", string(framed(1, say)), []string{"Grpc-Encoding", "gzip"}, "grpc-status: 3\r\n", ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := post(t, c, px.URL+"/test.v1.Echo/Say", tc.ct, tc.body, tc.header...)
			if !strings.Contains(r.body, tc.want) {
				t.Errorf("answer = %d %q, want %q in it", r.status, r.body, tc.want)
			}
			if tc.accept != "" && r.header.Get(tc.accept) != "gzip" {
				t.Errorf("answer %s = %q, want gzip", tc.accept, r.header.Get(tc.accept))
			}
		})
	}
	// And a compressed grpc-web request that is right goes through.
	r := post(t, c, px.URL+"/test.v1.Echo/Say", "application/grpc-web", string(framed(1, gz(t, say))), "Grpc-Encoding", "gzip")
	if fs := frames(t, []byte(r.body)); len(fs) != 2 || !strings.Contains(fs[1], "grpc-status: 0\r\n") {
		t.Errorf("gzip grpc-web answer = %q, want a message and grpc-status 0", fs)
	}
	if n := node.Calls.Load(); n != 1 {
		t.Errorf("node calls = %d, want 1 (only the good one)", n)
	}
}

// TestEndpointVersion: a node's version is its meta "version", else a tag
// version=V or version:V.
func TestEndpointVersion(t *testing.T) {
	for _, tc := range []struct {
		name string
		tags []string
		meta map[string]string
		want string
	}{
		{"none", []string{"v1", "version"}, nil, ""},
		{"meta", []string{"version=2"}, map[string]string{"version": "1"}, "1"},
		{"tag =", []string{"blue", "version=2"}, nil, "2"},
		{"tag :", []string{"version:3"}, map[string]string{"zone": "a"}, "3"},
		{"empty tag value", []string{"version="}, nil, ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			e := discovery.NewEndpoint("a", "127.0.0.1", 1, tc.tags, tc.meta, 1)
			if got := endpointVersion(&e); got != tc.want {
				t.Errorf("endpointVersion(%v, %v) = %q, want %q", tc.tags, tc.meta, got, tc.want)
			}
		})
	}
}

// TestForwardTranscode: the forward proxy transcodes for a service that
// proxy.services marks grpc with a codec, reached by Host header (in any
// case, with Consul's DNS suffix) or by absolute-form URL; a service it
// does not list passes application/json through untouched.
func TestForwardTranscode(t *testing.T) {
	node := transcodetest.Start(t, 1, transcodetest.ReflectionV1, "")
	plain := startServer(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		b, _ := io.ReadAll(r.Body)
		w.Header().Set("Content-Type", "text/plain")
		_, _ = io.WriteString(w, r.Header.Get("Content-Type")+" "+string(b))
	}))
	m := NewMetrics(prometheus.NewRegistry())
	cache := staticCache(t, map[string][]string{"echo": {node.Addr}, "plain": {strings.TrimPrefix(plain.URL, "http://")}})
	h, err := New(cache, m, testLogger(t)).Forward("forward", RouteConfig{PerService: map[string]ServiceConfig{
		"echo": {Protocol: config.ProtocolGRPC, Codec: config.Codec{Transcode: true}},
	}})
	if err != nil {
		t.Fatalf("Forward() error = %v", err)
	}
	px := startProxyServer(t, h)
	c := newClient(t, nil)
	for _, host := range []string{"echo", "Echo.service.consul"} {
		req, _ := http.NewRequest(http.MethodPost, px.URL+"/test.v1.Echo/Say", strings.NewReader(`{"text":"fwd"}`))
		req.Host = host
		req.Header.Set("Content-Type", "application/json")
		if r := do(t, c, req); r.status != 200 || r.body != `{"text":"fwd"}` {
			t.Errorf("Host %s: answer = %d %q, want 200 {\"text\":\"fwd\"}", host, r.status, r.body)
		}
	}
	pu, _ := url.Parse(px.URL)
	viaProxy := newClient(t, func(tr *http.Transport) { tr.Proxy = http.ProxyURL(pu) })
	if r := post(t, viaProxy, "http://echo/test.v1.Echo/Count", "application/connect+json", string(framed(0, []byte(`{"text":"p","count":2}`)))); r.status != 200 || len(frames(t, []byte(r.body))) != 3 {
		t.Errorf("absolute-form Connect stream = %d %q, want two messages and the end", r.status, r.body)
	}
	if r := post(t, viaProxy, "http://plain/x", "application/json", `{"a":1}`); r.body != `application/json {"a":1}` {
		t.Errorf("unlisted service got %q, want application/json {\"a\":1} untouched", r.body)
	}
	if n := testutil.ToFloat64(m.schemaFetches.WithLabelValues("forward", "echo", "reflection", "ok")); n != 1 {
		t.Errorf("schema fetches = %v, want 1", n)
	}
}

// TestTranscodeTLSNode: a node reached over TLS (h2 by ALPN) gives its
// schema by reflection over TLS too, and calls are transcoded to it.
func TestTranscodeTLSNode(t *testing.T) {
	node := transcodetest.New(t, 1, transcodetest.ReflectionV1)
	ts, ca := tlsNodeWith(t, node.Server)
	addr := strings.TrimPrefix(ts.URL, "https://")
	px := startRoute(t, RouteConfig{Service: "echo", Protocol: config.ProtocolGRPC, Codec: config.Codec{Transcode: true},
		TLS: &config.TLS{CAFile: ca, ServerName: "example.com"}}, addr)
	r := post(t, newClient(t, nil), px.URL+"/test.v1.Echo/Say", "application/json", `{"text":"tls"}`)
	if r.status != 200 || r.body != `{"text":"tls"}` {
		t.Errorf("answer = %d %q, want 200 {\"text\":\"tls\"}", r.status, r.body)
	}
	if n := node.ReflectionCalls.Load(); n != 1 {
		t.Errorf("reflection streams = %d, want 1", n)
	}
}
