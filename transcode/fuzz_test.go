package transcode_test

import (
	"bytes"
	"context"
	"io"
	"net/http"
	"net/http/httptest"
	"testing"

	"github.com/sidecarlb/sidecar/transcode"
	"github.com/sidecarlb/sidecar/transcode/transcodetest"
)

// FuzzDecode: whatever a client sends (content type, path, body), Decode
// answers with a Call or an error, never a panic, and a Call's request
// body and error answer can be produced.
func FuzzDecode(f *testing.F) {
	for _, seed := range []struct{ ct, path, body string }{
		{"application/json", "/test.v1.Echo/Say", `{"text":"a"}`},
		{"application/proto", "/test.v1.Echo/Say", "\x0a\x01a"},
		{"application/connect+json", "/test.v1.Echo/Chat", "\x00\x00\x00\x00\x02{}\x02\x00\x00\x00\x00"},
		{"application/grpc-web+json", "/test.v1.Echo/Count", "\x00\x00\x00\x00\x0b{\"count\":2}"},
		{"application/grpc+json", "/test.v1.Echo/Collect", "\x00\x00\x00\x00\x02{}"},
		{"application/json-rpc", "/", `{"method":"Echo.Say","params":[{}],"id":1}`},
		{"application/json", "/test.v1.Echo/Say", `{"at":"2026-13-45T99:00:00Z"}`},
		{"application/grpc-web-text", "/test.v1.Echo/Say", "AAAAAAMKAWE="},
		{"application/grpc-web", "/test.v1.Echo/Say", "\x01\x00\x00\x00\x03\x0a\x01a"},
	} {
		f.Add(seed.ct, seed.path, []byte(seed.body))
	}
	file, err := transcode.LoadFileFromBytes(transcodetest.DescriptorSet(1))
	if err != nil {
		f.Fatal(err)
	}
	s := transcode.NewSchemas([]transcode.Source{file}, transcode.SchemaOptions{})
	defer s.Close()
	tc := transcode.New(s)
	f.Fuzz(func(t *testing.T, ct, path string, body []byte) {
		r, err := http.NewRequest(http.MethodPost, "http://sidecar/", bytes.NewReader(body))
		if err != nil {
			return
		}
		r.URL.Path = path
		r.Header.Set("Content-Type", ct)
		call, err := tc.Decode(context.Background(), r)
		if call == nil {
			t.Fatalf("Decode() returned no Call (error %v)", err)
		}
		if err != nil {
			call.WriteError(httptest.NewRecorder(), err)
			return
		}
		out := call.Request(r)
		if _, err := io.ReadAll(out.Body); err != nil {
			call.WriteError(httptest.NewRecorder(), err)
		}
	})
}
