package transcode

import (
	"slices"
	"testing"

	rpb "google.golang.org/grpc/reflection/grpc_reflection_v1"
	"google.golang.org/protobuf/proto"
)

// TestReflectionMessages: the hand-encoded requests read as grpc-go's
// generated ServerReflectionRequest, and its generated responses read back.
func TestReflectionMessages(t *testing.T) {
	for _, tc := range []struct {
		req  reflectionRequest
		want *rpb.ServerReflectionRequest
	}{
		{reflectionRequest{reqFileContainingSymbol, "a.B"}, &rpb.ServerReflectionRequest{MessageRequest: &rpb.ServerReflectionRequest_FileContainingSymbol{FileContainingSymbol: "a.B"}}},
		{reflectionRequest{reqFileByFilename, "a/b.proto"}, &rpb.ServerReflectionRequest{MessageRequest: &rpb.ServerReflectionRequest_FileByFilename{FileByFilename: "a/b.proto"}}},
		{reflectionRequest{reqListServices, "*"}, &rpb.ServerReflectionRequest{MessageRequest: &rpb.ServerReflectionRequest_ListServices{ListServices: "*"}}},
	} {
		var got rpb.ServerReflectionRequest
		if err := proto.Unmarshal(tc.req.marshal(), &got); err != nil || !proto.Equal(&got, tc.want) {
			t.Errorf("marshal(%v) reads as %v, %v; want %v", tc.req, &got, err, tc.want)
		}
	}
	resp := func(m *rpb.ServerReflectionResponse) *reflectionResponse {
		b, _ := proto.Marshal(m)
		r, err := parseReflectionResponse(b)
		if err != nil {
			t.Fatalf("parseReflectionResponse() error = %v", err)
		}
		return r
	}
	r := resp(&rpb.ServerReflectionResponse{ValidHost: "h", MessageResponse: &rpb.ServerReflectionResponse_FileDescriptorResponse{
		FileDescriptorResponse: &rpb.FileDescriptorResponse{FileDescriptorProto: [][]byte{[]byte("a"), []byte("bc")}}}})
	if len(r.files) != 2 || string(r.files[1]) != "bc" || r.isErr {
		t.Errorf("file descriptor response = %+v, want files a, bc", r)
	}
	r = resp(&rpb.ServerReflectionResponse{MessageResponse: &rpb.ServerReflectionResponse_ListServicesResponse{
		ListServicesResponse: &rpb.ListServiceResponse{Service: []*rpb.ServiceResponse{{Name: "a.B"}, {Name: "c.D"}}}}})
	if !slices.Equal(r.services, []string{"a.B", "c.D"}) {
		t.Errorf("services = %q, want a.B, c.D", r.services)
	}
	r = resp(&rpb.ServerReflectionResponse{MessageResponse: &rpb.ServerReflectionResponse_ErrorResponse{
		ErrorResponse: &rpb.ErrorResponse{ErrorCode: 5, ErrorMessage: "nope"}}})
	if !r.isErr || r.errCode != 5 || r.errMessage != "nope" {
		t.Errorf("error response = %+v, want 5 nope", r)
	}
	if _, err := parseReflectionResponse([]byte{0x22, 0x05, 0x01}); err == nil {
		t.Error("a truncated response read without error")
	}
}

// FuzzReflectionResponse: whatever a node sends reads or fails, never
// panics.
func FuzzReflectionResponse(f *testing.F) {
	b, _ := proto.Marshal(&rpb.ServerReflectionResponse{MessageResponse: &rpb.ServerReflectionResponse_ListServicesResponse{
		ListServicesResponse: &rpb.ListServiceResponse{Service: []*rpb.ServiceResponse{{Name: "a.B"}}}}})
	f.Add(b)
	f.Add([]byte{0x3a, 0x04, 0x08, 0x05, 0x12, 0x00})
	f.Fuzz(func(t *testing.T, b []byte) {
		_, _ = parseReflectionResponse(b)
	})
}
