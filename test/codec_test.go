package test

import (
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"

	"github.com/sidecarlb/sidecar/test/consulagent"
	"github.com/sidecarlb/sidecar/test/harness"
	"github.com/sidecarlb/sidecar/transcode/transcodetest"
)

// TestCodecTranscode runs the sidecar binary against a Consul agent, with
// a grpc upstream whose codec transcodes, in front of two grpc-go nodes:
// one with reflection v1, one with v1alpha only. A plain net/http client
// calls them with Connect JSON; a malformed body is refused with nothing
// sent; the admin metrics show one schema fetch for all the calls.
func TestCodecTranscode(t *testing.T) {
	agent := consulagent.Start(t, consulagent.Options{})
	harness.Binaries(t)
	a := transcodetest.Start(t, 1, transcodetest.ReflectionV1, "")
	b := transcodetest.Start(t, 1, transcodetest.ReflectionV1Alpha, "")
	consul := agent.Client()
	protoRegister(t, consul, "codec-echo", "codec-a", a.Addr)
	protoRegister(t, consul, "codec-echo", "codec-b", b.Addr)
	consulagent.WaitFor(t, 10*time.Second, "both nodes of codec-echo passing", func() bool {
		entries, _, err := consul.Health().Service("codec-echo", "", true, nil)
		return err == nil && len(entries) == 2
	})
	admin, listen := pxLoopback(t), pxLoopback(t)
	harness.StartSidecar(t, admin, fmt.Sprintf(`consul:
  address: %s
admin:
  listen: %s
upstreams:
  - name: codec-echo
    listen: %s
    protocol: grpc
    codec: {transcode: true, refresh: 1m}
`, agent.Addr(), admin, listen))

	c := &http.Client{Timeout: 10 * time.Second}
	post := func(body string) (int, string) {
		t.Helper()
		resp, err := c.Post("http://"+listen+"/test.v1.Echo/Say", "application/json", strings.NewReader(body))
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, string(b)
	}
	for i := range 10 {
		if status, body := post(`{"text":"hello"}`); status != 200 || body != `{"text":"hello"}` {
			t.Fatalf("call %d = %d %s, want 200 {\"text\":\"hello\"}", i, status, body)
		}
	}
	if a.Calls.Load() == 0 || b.Calls.Load() == 0 {
		t.Errorf("calls per node = %d, %d; want both nodes balanced to", a.Calls.Load(), b.Calls.Load())
	}
	calls := a.Calls.Load() + b.Calls.Load()
	if status, body := post(`{"text":"hello","nope":1}`); status != 400 || !strings.Contains(body, `"code":"invalid_argument"`) {
		t.Errorf("unknown field = %d %s, want 400 invalid_argument", status, body)
	}
	if n := a.Calls.Load() + b.Calls.Load(); n != calls {
		t.Errorf("node calls after a refused call = %d, want %d", n, calls)
	}
	if n := a.ReflectionCalls.Load() + b.ReflectionCalls.Load(); n != 1 {
		t.Errorf("reflection streams on the nodes = %d, want 1 for 11 calls", n)
	}
	resp, err := c.Get("http://" + admin + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	metrics, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	want := `sidecar_codec_schema_fetches_total{listener="codec-echo",result="ok",service="codec-echo",source="reflection"} 1` // the upstream's name
	if !strings.Contains(string(metrics), want) {
		t.Errorf("metrics lack %s", want)
	}
}

// TestCodecSchemaPerVersion: two grpc-go nodes of one service serve
// different schemas (version 3 moves "text" to another field number) and
// say so in their Consul meta (version) or tags (version=V). The sidecar
// fetches one schema per version, each from a node of that version, and
// keeps each call to the nodes of the version it was turned for: every
// call gets its text back from both nodes.
func TestCodecSchemaPerVersion(t *testing.T) {
	agent := consulagent.Start(t, consulagent.Options{})
	harness.Binaries(t)
	a := transcodetest.Start(t, 1, transcodetest.ReflectionV1, "")
	b := transcodetest.Start(t, 3, transcodetest.ReflectionV1, "")
	consul := agent.Client()
	for _, n := range []struct {
		id, addr string
		tags     []string
		meta     map[string]string
	}{
		{"codec-v1", a.Addr, nil, map[string]string{"version": "1"}},
		{"codec-v3", b.Addr, []string{"version=3"}, nil},
	} {
		host, port := protoSplit(t, n.addr)
		reg := &api.AgentServiceRegistration{ID: n.id, Name: "codec-versions", Address: host, Port: port, Tags: n.tags, Meta: n.meta}
		if err := consul.Agent().ServiceRegister(reg); err != nil {
			t.Fatalf("register %s: %v", n.id, err)
		}
	}
	consulagent.WaitFor(t, 10*time.Second, "both nodes of codec-versions passing", func() bool {
		entries, _, err := consul.Health().Service("codec-versions", "", true, nil)
		return err == nil && len(entries) == 2
	})
	admin, listen := pxLoopback(t), pxLoopback(t)
	harness.StartSidecar(t, admin, fmt.Sprintf(`consul:
  address: %s
admin:
  listen: %s
upstreams:
  - name: codec-versions
    listen: %s
    protocol: grpc
    codec: {transcode: true}
`, agent.Addr(), admin, listen))

	c := &http.Client{Timeout: 10 * time.Second}
	for i := range 30 {
		resp, err := c.Post("http://"+listen+"/test.v1.Echo/Say", "application/json", strings.NewReader(`{"text":"hello"}`))
		if err != nil {
			t.Fatal(err)
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != 200 || string(body) != `{"text":"hello"}` {
			t.Fatalf("call %d = %d %s, want 200 {\"text\":\"hello\"} (calls on nodes: v1 %d, v3 %d)",
				i, resp.StatusCode, body, a.Calls.Load(), b.Calls.Load())
		}
	}
	if a.Calls.Load() == 0 || b.Calls.Load() == 0 {
		t.Errorf("calls per node = v1 %d, v3 %d; want both versions called", a.Calls.Load(), b.Calls.Load())
	}
	if na, nb := a.ReflectionCalls.Load(), b.ReflectionCalls.Load(); na != 1 || nb != 1 {
		t.Errorf("reflection streams = v1 %d, v3 %d; want one on each (a schema per version)", na, nb)
	}
}

// TestCodecForwardProxy: the sidecar binary's forward listener, with
// proxy.services marking a Consul service grpc with a codec, transcodes a
// plain net/http client's Connect JSON call named by Host header and by an
// absolute-form URL (HTTP_PROXY style).
func TestCodecForwardProxy(t *testing.T) {
	agent := consulagent.Start(t, consulagent.Options{})
	harness.Binaries(t)
	node := transcodetest.Start(t, 1, transcodetest.ReflectionV1, "")
	consul := agent.Client()
	protoRegister(t, consul, "codec-fwd", "codec-fwd-1", node.Addr)
	consulagent.WaitFor(t, 10*time.Second, "codec-fwd passing", func() bool {
		entries, _, err := consul.Health().Service("codec-fwd", "", true, nil)
		return err == nil && len(entries) == 1
	})
	admin, forward := pxLoopback(t), pxLoopback(t)
	harness.StartSidecar(t, admin, fmt.Sprintf(`consul:
  address: %s
admin:
  listen: %s
proxy:
  listen: %s
  services:
    - name: Codec-Fwd
      protocol: grpc
      codec: {transcode: true}
`, agent.Addr(), admin, forward))

	check := func(name string, c *http.Client, req *http.Request) {
		t.Helper()
		req.Header.Set("Content-Type", "application/json")
		resp, err := c.Do(req)
		if err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != 200 || string(body) != `{"text":"fwd"}` {
			t.Errorf("%s = %d %s, want 200 {\"text\":\"fwd\"}", name, resp.StatusCode, body)
		}
	}
	req, _ := http.NewRequest(http.MethodPost, "http://"+forward+"/test.v1.Echo/Say", strings.NewReader(`{"text":"fwd"}`))
	req.Host = "codec-fwd.service.consul"
	check("Host header", &http.Client{Timeout: 10 * time.Second}, req)
	proxyURL, _ := url.Parse("http://" + forward)
	req, _ = http.NewRequest(http.MethodPost, "http://codec-fwd/test.v1.Echo/Say", strings.NewReader(`{"text":"fwd"}`))
	check("absolute-form URL", &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{Proxy: http.ProxyURL(proxyURL)}}, req)
	if n := node.Calls.Load(); n != 2 {
		t.Errorf("node calls = %d, want 2", n)
	}
}

// TestCodecValidate: sidecar validate refuses a codec on a non-grpc
// upstream and a descriptor set that does not read, naming each key, and
// exits 2.
func TestCodecValidate(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "config.yaml")
	cfg := `discovery: {backend: static, static: {a: ["127.0.0.1:1"], b: ["127.0.0.1:2"]}}
upstreams:
  - {name: a, listen: 127.0.0.1:15002, protocol: http, codec: {transcode: true}}
  - {name: b, listen: 127.0.0.1:15003, protocol: grpc, codec: {transcode: true, descriptors: file, descriptor_set: ` + filepath.Join(dir, "none.pb") + `}}
`
	if err := os.WriteFile(path, []byte(cfg), 0o600); err != nil {
		t.Fatal(err)
	}
	p := harness.Start(t, "sidecar", "validate", "-config", path)
	if code := p.Wait(30 * time.Second); code != 2 {
		t.Errorf("sidecar validate exit = %d, want 2\n%s", code, p.Output())
	}
	for _, want := range []string{"upstreams[0].codec.transcode: not supported with protocol http", "upstreams[1].codec.descriptor_set: open "} {
		if !strings.Contains(p.Output(), want) {
			t.Errorf("validate output lacks %q:\n%s", want, p.Output())
		}
	}
}
