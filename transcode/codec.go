package transcode

import (
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protoreflect"
	"google.golang.org/protobuf/types/dynamicpb"
)

// messageCodec turns a client's encoding of one message into protobuf wire
// bytes and back, given the message's descriptor. This is the seam where
// connectrpc.com/vanguard could stand instead (see the README): the
// framing around it is the protocol's, in protocol.go.
type messageCodec interface {
	// toProto appends the client's message b, encoded as protobuf, to
	// dst. An error means the client's message is malformed
	// (invalid_argument).
	toProto(dst []byte, md protoreflect.MessageDescriptor, b []byte) ([]byte, error)
	// fromProto encodes the node's protobuf message b as the client's.
	fromProto(md protoreflect.MessageDescriptor, b []byte) ([]byte, error)
}

// jsonCodec is protojson over dynamicpb messages: unknown fields are an
// error, field names are protojson's (lowerCamelCase out, either in).
type jsonCodec struct{}

var (
	jsonIn  = protojson.UnmarshalOptions{}
	jsonOut = protojson.MarshalOptions{}
)

func (jsonCodec) toProto(dst []byte, md protoreflect.MessageDescriptor, b []byte) ([]byte, error) {
	m := dynamicpb.NewMessage(md)
	if err := jsonIn.Unmarshal(b, m); err != nil {
		return nil, err
	}
	return proto.MarshalOptions{}.MarshalAppend(dst, m)
}

func (jsonCodec) fromProto(md protoreflect.MessageDescriptor, b []byte) ([]byte, error) {
	m := dynamicpb.NewMessage(md)
	if err := (proto.UnmarshalOptions{DiscardUnknown: true}).Unmarshal(b, m); err != nil {
		return nil, err
	}
	return jsonOut.Marshal(m)
}

// protoCodec passes protobuf through: the node checks what it reads.
type protoCodec struct{}

func (protoCodec) toProto(dst []byte, _ protoreflect.MessageDescriptor, b []byte) ([]byte, error) {
	return append(dst, b...), nil
}
func (protoCodec) fromProto(_ protoreflect.MessageDescriptor, b []byte) ([]byte, error) {
	return b, nil
}
