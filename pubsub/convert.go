package pubsub

import (
	"mime"
	"strings"
)

// A Converter turns a message into the form a subscription asked to
// receive it in. It returns m itself when nothing applies, and an error
// when something should have applied and could not: the message is then
// delivered as published, since losing it is worse than its form.
type Converter func(m *Message) (*Message, error)

// protobufTypes are the datacontenttypes of a protobuf payload.
var protobufTypes = map[string]bool{
	"application/protobuf":            true,
	"application/x-protobuf":          true,
	"application/proto":               true,
	"application/vnd.google.protobuf": true,
}

// ProtoJSON returns the Converter of deliver_content_type:
// application/json. A protobuf payload whose dataschema names a message
// type becomes that message's JSON form (toJSON: the serialized message
// and its full name in, JSON out), with datacontenttype
// application/json; other payloads stay as they are. The dataschema may be
// the bare name (shop.v1.Order) or end with it after a '/' or ':', as in
// type.googleapis.com/shop.v1.Order.
func ProtoJSON(toJSON func(typeName string, data []byte) ([]byte, error)) Converter {
	return func(m *Message) (*Message, error) {
		mt, _, err := mime.ParseMediaType(m.DataContentType)
		if err != nil || !protobufTypes[mt] {
			return m, nil
		}
		schema, ok := m.Extensions["dataschema"]
		if !ok {
			return m, nil
		}
		name := extValue(schema)
		if i := strings.LastIndexAny(name, "/:"); i >= 0 {
			name = name[i+1:]
		}
		if name == "" {
			return m, nil
		}
		b, err := toJSON(name, m.Data)
		if err != nil {
			return m, err
		}
		c := *m
		c.Data, c.DataContentType = b, "application/json"
		return &c, nil
	}
}
