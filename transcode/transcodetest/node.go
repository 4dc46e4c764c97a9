// Package transcodetest runs real grpc-go nodes serving a small test
// service whose schema is built at run time (no generated code), with
// gRPC server reflection v1 and v1alpha, v1alpha alone, or none; and makes
// the same schema as a FileDescriptorSet.
package transcodetest

import (
	"context"
	"fmt"
	"io"
	"net"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/encoding/gzip"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/reflection"
	rpb "google.golang.org/grpc/reflection/grpc_reflection_v1"
	rpbalpha "google.golang.org/grpc/reflection/grpc_reflection_v1alpha"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protodesc"
	"google.golang.org/protobuf/reflect/protoreflect"
	"google.golang.org/protobuf/reflect/protoregistry"
	"google.golang.org/protobuf/types/descriptorpb"
	"google.golang.org/protobuf/types/dynamicpb"
	"google.golang.org/protobuf/types/known/timestamppb"
)

// Service is the test service's full name.
const Service = "test.v1.Echo"

// Schema returns the test service's files. Version 2 adds the field
// "extra" to both messages and the method Shout; version 3 also moves
// "text" to field 9 in both, so that a call turned with another version's
// schema loses its text.
//
//	message EchoRequest  { string text = 1; int32 code = 2; bytes pad = 3; int32 count = 5;
//	                       google.protobuf.Timestamp at = 6; int32 delay_ms = 7; string extra = 4 (v2) }
//	message EchoResponse { string text = 1; int32 n = 2; string extra = 4 (v2) }
//	service Echo {
//	  rpc Say(EchoRequest) returns (EchoResponse);              // NO_SIDE_EFFECTS; text back after delay_ms; code != 0: that status
//	  rpc Count(EchoRequest) returns (stream EchoResponse);     // count messages, n = 1..count
//	  rpc Collect(stream EchoRequest) returns (EchoResponse);   // texts joined
//	  rpc Chat(stream EchoRequest) returns (stream EchoResponse); // each text back
//	  rpc Shout(EchoRequest) returns (EchoResponse);            // v2: text upper-cased
//	}
//
// A call with the metadata x-compress is answered with gzip messages.
func Schema(version int) *protoregistry.Files {
	fd, err := protodesc.NewFile(fileProto(version), protoregistry.GlobalFiles)
	if err != nil {
		panic(err)
	}
	files := new(protoregistry.Files)
	if err := files.RegisterFile(timestamppb.File_google_protobuf_timestamp_proto); err != nil {
		panic(err)
	}
	if err := files.RegisterFile(fd); err != nil {
		panic(err)
	}
	return files
}

// DescriptorSet returns the schema of version as a serialized
// FileDescriptorSet, imports included.
func DescriptorSet(version int) []byte {
	set := &descriptorpb.FileDescriptorSet{File: []*descriptorpb.FileDescriptorProto{
		protodesc.ToFileDescriptorProto(timestamppb.File_google_protobuf_timestamp_proto),
		fileProto(version),
	}}
	b, err := proto.Marshal(set)
	if err != nil {
		panic(err)
	}
	return b
}

func fileProto(version int) *descriptorpb.FileDescriptorProto {
	opt := descriptorpb.FieldDescriptorProto_LABEL_OPTIONAL.Enum()
	field := func(name string, n int32, typ descriptorpb.FieldDescriptorProto_Type, typeName string) *descriptorpb.FieldDescriptorProto {
		f := &descriptorpb.FieldDescriptorProto{Name: proto.String(name), Number: proto.Int32(n), Type: typ.Enum(), Label: opt}
		if typeName != "" {
			f.TypeName = proto.String(typeName)
		}
		return f
	}
	req := &descriptorpb.DescriptorProto{Name: proto.String("EchoRequest"), Field: []*descriptorpb.FieldDescriptorProto{
		field("text", 1, descriptorpb.FieldDescriptorProto_TYPE_STRING, ""),
		field("code", 2, descriptorpb.FieldDescriptorProto_TYPE_INT32, ""),
		field("pad", 3, descriptorpb.FieldDescriptorProto_TYPE_BYTES, ""),
		field("count", 5, descriptorpb.FieldDescriptorProto_TYPE_INT32, ""),
		field("at", 6, descriptorpb.FieldDescriptorProto_TYPE_MESSAGE, ".google.protobuf.Timestamp"),
		field("delay_ms", 7, descriptorpb.FieldDescriptorProto_TYPE_INT32, ""),
	}}
	resp := &descriptorpb.DescriptorProto{Name: proto.String("EchoResponse"), Field: []*descriptorpb.FieldDescriptorProto{
		field("text", 1, descriptorpb.FieldDescriptorProto_TYPE_STRING, ""),
		field("n", 2, descriptorpb.FieldDescriptorProto_TYPE_INT32, ""),
	}}
	method := func(name string, cs, ss bool) *descriptorpb.MethodDescriptorProto {
		return &descriptorpb.MethodDescriptorProto{Name: proto.String(name), InputType: proto.String(".test.v1.EchoRequest"),
			OutputType: proto.String(".test.v1.EchoResponse"), ClientStreaming: proto.Bool(cs), ServerStreaming: proto.Bool(ss)}
	}
	say := method("Say", false, false)
	say.Options = &descriptorpb.MethodOptions{IdempotencyLevel: descriptorpb.MethodOptions_NO_SIDE_EFFECTS.Enum()}
	svc := &descriptorpb.ServiceDescriptorProto{Name: proto.String("Echo"), Method: []*descriptorpb.MethodDescriptorProto{
		say, method("Count", false, true), method("Collect", true, false), method("Chat", true, true),
	}}
	if version >= 3 {
		req.Field[0].Number = proto.Int32(9)
		resp.Field[0].Number = proto.Int32(9)
	}
	if version >= 2 {
		req.Field = append(req.Field, field("extra", 4, descriptorpb.FieldDescriptorProto_TYPE_STRING, ""))
		resp.Field = append(resp.Field, field("extra", 4, descriptorpb.FieldDescriptorProto_TYPE_STRING, ""))
		svc.Method = append(svc.Method, method("Shout", false, false))
	}
	return &descriptorpb.FileDescriptorProto{
		Name:        proto.String("test/v1/echo.proto"),
		Package:     proto.String("test.v1"),
		Dependency:  []string{"google/protobuf/timestamp.proto"},
		MessageType: []*descriptorpb.DescriptorProto{req, resp},
		Service:     []*descriptorpb.ServiceDescriptorProto{svc},
		Syntax:      proto.String("proto3"),
	}
}

// Reflection says which reflection services a node serves.
type Reflection int

const (
	ReflectionV1      Reflection = iota // v1 and v1alpha, as reflection.Register does
	ReflectionV1Alpha                   // v1alpha only, as older servers
	ReflectionNone
)

// Node is a running grpc-go node.
type Node struct {
	Addr   string
	Server *grpc.Server
	// ReflectionCalls counts the reflection streams opened on the node.
	ReflectionCalls atomic.Int64
	// Calls counts the Echo calls the node served.
	Calls atomic.Int64
	// LastMetadata is the metadata of the last Echo call.
	LastMetadata atomic.Pointer[metadata.MD]
	// Compressed counts the calls answered with gzip (x-compress).
	Compressed atomic.Int64
}

// Start starts a node serving schema version on 127.0.0.1, stopped when
// the test ends. addr, when not empty, is the address to listen on (to
// restart a node in place).
func Start(t testing.TB, version int, refl Reflection, addr string) *Node {
	t.Helper()
	if addr == "" {
		addr = "127.0.0.1:0"
	}
	var ln net.Listener
	var err error
	for range 50 { // the old node's port may take a moment to free
		if ln, err = net.Listen("tcp", addr); err == nil {
			break
		}
	}
	if err != nil {
		t.Fatal(err)
	}
	n := New(t, version, refl)
	n.Addr = ln.Addr().String()
	go func() { _ = n.Server.Serve(ln) }()
	t.Cleanup(n.Server.Stop)
	return n
}

// New returns a node serving schema version that is not yet serving: its
// Server may be run by the caller (as an http.Handler behind TLS, say).
func New(t testing.TB, version int, refl Reflection) *Node {
	t.Helper()
	n := &Node{}
	n.Server = grpc.NewServer(grpc.StreamInterceptor(func(srv any, ss grpc.ServerStream, info *grpc.StreamServerInfo, h grpc.StreamHandler) error {
		if strings.HasPrefix(info.FullMethod, "/grpc.reflection.") {
			n.ReflectionCalls.Add(1)
		}
		return h(srv, ss)
	}))
	files := Schema(version)
	d, err := files.FindDescriptorByName(Service)
	if err != nil {
		t.Fatal(err)
	}
	n.Server.RegisterService(serviceDesc(n, d.(protoreflect.ServiceDescriptor)), struct{}{})
	opts := reflection.ServerOptions{Services: n.Server, DescriptorResolver: files}
	switch refl {
	case ReflectionV1:
		rpb.RegisterServerReflectionServer(n.Server, reflection.NewServerV1(opts))
		rpbalpha.RegisterServerReflectionServer(n.Server, reflection.NewServer(opts))
	case ReflectionV1Alpha:
		rpbalpha.RegisterServerReflectionServer(n.Server, reflection.NewServer(opts))
	}
	return n
}

// serviceDesc is the Echo service's handlers over dynamic messages.
func serviceDesc(n *Node, sd protoreflect.ServiceDescriptor) *grpc.ServiceDesc {
	in, out := sd.Methods().Get(0).Input(), sd.Methods().Get(0).Output()
	newIn := func() *dynamicpb.Message { return dynamicpb.NewMessage(in) }
	reply := func(text string, num int32) *dynamicpb.Message {
		m := dynamicpb.NewMessage(out)
		m.Set(out.Fields().ByName("text"), protoreflect.ValueOfString(text))
		if num != 0 {
			m.Set(out.Fields().ByName("n"), protoreflect.ValueOfInt32(num))
		}
		return m
	}
	text := func(m *dynamicpb.Message) string { return m.Get(in.Fields().ByName("text")).String() }
	record := func(ctx context.Context) {
		n.Calls.Add(1)
		md, _ := metadata.FromIncomingContext(ctx)
		n.LastMetadata.Store(&md)
		if len(md.Get("x-compress")) > 0 {
			// The caller asks for a gzip answer (it must accept gzip).
			if grpc.SetSendCompressor(ctx, gzip.Name) == nil {
				n.Compressed.Add(1)
			}
		}
	}
	unary := func(name string, f func(ctx context.Context, m *dynamicpb.Message) (any, error)) grpc.MethodDesc {
		return grpc.MethodDesc{MethodName: name, Handler: func(_ any, ctx context.Context, dec func(any) error, _ grpc.UnaryServerInterceptor) (any, error) {
			m := newIn()
			if err := dec(m); err != nil {
				return nil, err
			}
			record(ctx)
			return f(ctx, m)
		}}
	}
	desc := &grpc.ServiceDesc{ServiceName: Service, HandlerType: (*any)(nil), Metadata: "test/v1/echo.proto"}
	desc.Methods = append(desc.Methods, unary("Say", func(ctx context.Context, m *dynamicpb.Message) (any, error) {
		if d := m.Get(in.Fields().ByName("delay_ms")).Int(); d > 0 {
			select {
			case <-time.After(time.Duration(d) * time.Millisecond):
			case <-ctx.Done():
				return nil, status.FromContextError(ctx.Err()).Err()
			}
		}
		if code := m.Get(in.Fields().ByName("code")).Int(); code != 0 {
			st := status.New(codes.Code(code), text(m))
			st, _ = st.WithDetails(&errdetails.ErrorInfo{Reason: "TEST", Domain: "sidecar.test"})
			return nil, st.Err()
		}
		_ = grpc.SetHeader(ctx, metadata.Pairs("x-node", n.Addr))
		_ = grpc.SetTrailer(ctx, metadata.Pairs("x-trailer", "t"))
		r := reply(text(m), 0)
		if f := out.Fields().ByName("extra"); f != nil {
			if fi := in.Fields().ByName("extra"); fi != nil {
				r.Set(f, m.Get(fi))
			}
		}
		return r, nil
	}))
	if sd.Methods().ByName("Shout") != nil {
		desc.Methods = append(desc.Methods, unary("Shout", func(_ context.Context, m *dynamicpb.Message) (any, error) {
			return reply(strings.ToUpper(text(m)), 0), nil
		}))
	}
	desc.Streams = []grpc.StreamDesc{
		{StreamName: "Count", ServerStreams: true, Handler: func(_ any, ss grpc.ServerStream) error {
			m := newIn()
			if err := ss.RecvMsg(m); err != nil {
				return err
			}
			record(ss.Context())
			for i := int32(1); i <= int32(m.Get(in.Fields().ByName("count")).Int()); i++ {
				if err := ss.SendMsg(reply(fmt.Sprintf("%s %d", text(m), i), i)); err != nil {
					return err
				}
			}
			return nil
		}},
		{StreamName: "Collect", ClientStreams: true, Handler: func(_ any, ss grpc.ServerStream) error {
			record(ss.Context())
			var texts []string
			for {
				m := newIn()
				err := ss.RecvMsg(m)
				if err == io.EOF {
					return ss.SendMsg(reply(strings.Join(texts, ","), int32(len(texts))))
				}
				if err != nil {
					return err
				}
				texts = append(texts, text(m))
			}
		}},
		{StreamName: "Chat", ClientStreams: true, ServerStreams: true, Handler: func(_ any, ss grpc.ServerStream) error {
			record(ss.Context())
			for i := int32(1); ; i++ {
				m := newIn()
				err := ss.RecvMsg(m)
				if err == io.EOF {
					return nil
				}
				if err != nil {
					return err
				}
				if err := ss.SendMsg(reply(text(m), i)); err != nil {
					return err
				}
			}
		}},
	}
	return desc
}
