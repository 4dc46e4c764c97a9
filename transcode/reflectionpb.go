package transcode

import (
	"fmt"

	"google.golang.org/protobuf/encoding/protowire"
)

// The few messages of grpc/reflection/v1/reflection.proto a fetch uses,
// encoded by hand with protowire: importing the generated package would
// link grpc-go's client and transport (about 9 MB) for them. v1alpha's
// messages are the same on the wire.

// reflectionRequest is a ServerReflectionRequest holding one of its string
// requests.
type reflectionRequest struct {
	field protowire.Number // which request
	value string
}

// ServerReflectionRequest's fields.
const (
	reqFileByFilename       protowire.Number = 3
	reqFileContainingSymbol protowire.Number = 4
	reqListServices         protowire.Number = 7
)

func (r reflectionRequest) marshal() []byte {
	b := protowire.AppendTag(nil, r.field, protowire.BytesType)
	return protowire.AppendString(b, r.value)
}

// reflectionResponse is what a fetch reads of a ServerReflectionResponse.
type reflectionResponse struct {
	files      [][]byte // file_descriptor_response.file_descriptor_proto
	services   []string // list_services_response.service[].name
	isErr      bool     // error_response was set
	errCode    int32
	errMessage string
}

// ServerReflectionResponse's fields, and those of the messages in them.
const (
	respFileDescriptor protowire.Number = 4 // FileDescriptorResponse{repeated bytes file_descriptor_proto = 1}
	respListServices   protowire.Number = 6 // ListServiceResponse{repeated ServiceResponse service = 1}, ServiceResponse{string name = 1}
	respError          protowire.Number = 7 // ErrorResponse{int32 error_code = 1; string error_message = 2}
)

func parseReflectionResponse(b []byte) (*reflectionResponse, error) {
	r := &reflectionResponse{}
	err := eachField(b, func(num protowire.Number, typ protowire.Type, v []byte, _ uint64) error {
		if typ != protowire.BytesType {
			return nil
		}
		switch num {
		case respFileDescriptor:
			return eachField(v, func(num protowire.Number, typ protowire.Type, v []byte, _ uint64) error {
				if num == 1 && typ == protowire.BytesType {
					r.files = append(r.files, v)
				}
				return nil
			})
		case respListServices:
			return eachField(v, func(num protowire.Number, typ protowire.Type, v []byte, _ uint64) error {
				if num != 1 || typ != protowire.BytesType {
					return nil
				}
				return eachField(v, func(num protowire.Number, typ protowire.Type, v []byte, _ uint64) error {
					if num == 1 && typ == protowire.BytesType {
						r.services = append(r.services, string(v))
					}
					return nil
				})
			})
		case respError:
			r.isErr = true
			return eachField(v, func(num protowire.Number, typ protowire.Type, v []byte, n uint64) error {
				switch {
				case num == 1 && typ == protowire.VarintType:
					r.errCode = int32(n)
				case num == 2 && typ == protowire.BytesType:
					r.errMessage = string(v)
				}
				return nil
			})
		}
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("read a reflection response: %w", err)
	}
	return r, nil
}

// eachField calls f with each field of the message b: its number, wire
// type, and its bytes (BytesType) or number (VarintType); other types are
// skipped over.
func eachField(b []byte, f func(num protowire.Number, typ protowire.Type, v []byte, n uint64) error) error {
	for len(b) > 0 {
		num, typ, k := protowire.ConsumeTag(b)
		if k < 0 {
			return protowire.ParseError(k)
		}
		b = b[k:]
		var v []byte
		var n uint64
		switch typ {
		case protowire.BytesType:
			v, k = protowire.ConsumeBytes(b)
		case protowire.VarintType:
			n, k = protowire.ConsumeVarint(b)
		default:
			k = protowire.ConsumeFieldValue(num, typ, b)
		}
		if k < 0 {
			return protowire.ParseError(k)
		}
		b = b[k:]
		if err := f(num, typ, v, n); err != nil {
			return err
		}
	}
	return nil
}
