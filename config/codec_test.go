package config

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protodesc"
	"google.golang.org/protobuf/types/descriptorpb"
	"google.golang.org/protobuf/types/known/timestamppb"
)

// TestCodec: upstreams[].codec decodes, and each bad value is reported on
// its own key.
func TestCodec(t *testing.T) {
	dir := t.TempDir()
	good := filepath.Join(dir, "good.pb")
	b, _ := proto.Marshal(&descriptorpb.FileDescriptorSet{File: []*descriptorpb.FileDescriptorProto{
		protodesc.ToFileDescriptorProto(timestamppb.File_google_protobuf_timestamp_proto)}})
	if err := os.WriteFile(good, b, 0o600); err != nil {
		t.Fatal(err)
	}
	// A file whose import is missing: made without --include_imports.
	orphan := filepath.Join(dir, "orphan.pb")
	b, _ = proto.Marshal(&descriptorpb.FileDescriptorSet{File: []*descriptorpb.FileDescriptorProto{{
		Name: proto.String("a.proto"), Dependency: []string{"google/protobuf/empty.proto"}}}})
	if err := os.WriteFile(orphan, b, 0o600); err != nil {
		t.Fatal(err)
	}
	garbage := filepath.Join(dir, "garbage.pb")
	if err := os.WriteFile(garbage, []byte("\xff\xff\xff"), 0o600); err != nil {
		t.Fatal(err)
	}

	c, err := ParseEnv([]byte(`
upstreams:
  - {name: a, listen: 127.0.0.1:15002, protocol: grpc, codec: {transcode: true}}
  - {name: b, listen: 127.0.0.1:15003, protocol: grpc, codec: {transcode: true, descriptors: file, descriptor_set: `+good+`, refresh: 1m}}
  - {name: c, listen: 127.0.0.1:15004, protocol: grpc}
`), "config.yaml", env(nil))
	if err != nil {
		t.Fatalf("ParseEnv() error = %v", err)
	}
	for i, want := range []Codec{
		{Transcode: true},
		{Transcode: true, Descriptors: DescriptorsFile, DescriptorSet: good, Refresh: time.Minute},
		{},
	} {
		if got := c.Upstreams[i].Codec; got != want {
			t.Errorf("Upstreams[%d].Codec = %+v, want %+v", i, got, want)
		}
	}

	_, err = ParseEnv([]byte(`
upstreams:
  - {name: a, listen: 127.0.0.1:15002, protocol: http, codec: {transcode: true}}
  - {name: b, listen: 127.0.0.1:15003, protocol: grpc, codec: {descriptors: dwarf}}
  - {name: c, listen: 127.0.0.1:15004, protocol: grpc, codec: {descriptors: file}}
  - {name: d, listen: 127.0.0.1:15005, protocol: grpc, codec: {descriptor_set: `+orphan+`}}
  - {name: e, listen: 127.0.0.1:15006, protocol: grpc, codec: {descriptor_set: `+garbage+`}}
  - {name: f, listen: 127.0.0.1:15007, protocol: grpc, codec: {descriptor_set: `+filepath.Join(dir, "none.pb")+`}}
  - {name: g, listen: 127.0.0.1:15008, protocol: grpc, codec: {refresh: 0s}}
`), "config.yaml", env(nil))
	if err == nil {
		t.Fatal("ParseEnv() error = nil, want one per bad codec key")
	}
	for _, want := range []string{
		`upstreams[0].codec.transcode: not supported with protocol http (only with grpc)`,
		`upstreams[1].codec.descriptors: unknown "dwarf" (want reflection or file)`,
		`upstreams[2].codec.descriptor_set: required with descriptors: file`,
		`upstreams[3].codec.descriptor_set: ` + orphan + `:`,
		`upstreams[4].codec.descriptor_set: ` + garbage + ` is not a FileDescriptorSet`,
		`upstreams[5].codec.descriptor_set: open `,
		`upstreams[6].codec.refresh: `,
	} {
		if !strings.Contains(err.Error(), "config.yaml: "+want) {
			t.Errorf("ParseEnv() error:\n%v\nwant a line with %q", err, want)
		}
	}
}

// TestProxyServices: proxy.services decodes with protocol http by default,
// and each bad entry is reported on its own key.
func TestProxyServices(t *testing.T) {
	c, err := ParseEnv([]byte(`
proxy:
  listen: 127.0.0.1:15001
  services:
    - {name: greeter, protocol: grpc, codec: {transcode: true, refresh: 1m}}
    - {name: web}
`), "config.yaml", env(nil))
	if err != nil {
		t.Fatalf("ParseEnv() error = %v", err)
	}
	want := []ForwardService{
		{Name: "greeter", Protocol: ProtocolGRPC, Codec: Codec{Transcode: true, Refresh: time.Minute}},
		{Name: "web", Protocol: ProtocolHTTP},
	}
	if got := c.Proxy.Services; len(got) != 2 || got[0] != want[0] || got[1] != want[1] {
		t.Errorf("Proxy.Services = %+v, want %+v", got, want)
	}

	_, err = ParseEnv([]byte(`
proxy:
  services:
    - {protocol: grpc}
    - {name: a, protocol: tcp}
    - {name: b, codec: {transcode: true}}
    - {name: B, protocol: grpc, codec: {descriptors: dwarf}}
`), "config.yaml", env(nil))
	if err == nil {
		t.Fatal("ParseEnv() error = nil, want one per bad key")
	}
	for _, want := range []string{
		`proxy.services[0].name: required`,
		`proxy.services[1].protocol: unknown "tcp"`,
		`proxy.services[2].codec.transcode: not supported with protocol http (only with grpc)`,
		`proxy.services[3].name: "B" is listed twice`,
		`proxy.services[3].codec.descriptors: unknown "dwarf"`,
	} {
		if !strings.Contains(err.Error(), "config.yaml: "+want) {
			t.Errorf("ParseEnv() error:\n%v\nwant a line with %q", err, want)
		}
	}
}
