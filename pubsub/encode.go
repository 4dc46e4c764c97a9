package pubsub

import (
	"encoding/base64"
	"encoding/json"
	"time"
	"unicode/utf8"
)

// The hot paths encode a Message twice per delivery: Marshal when it is
// published (the store's and the peers' form) and Structured when it is
// delivered. Both append to one buffer with the fields in a fixed order;
// a string is written as it is when encoding/json would write it so
// (plain printable ASCII), and through encoding/json otherwise, so the
// bytes are encoding/json's (TestMarshalMatchesEncodingJSON).

// plainJSON reports whether encoding/json writes s between quotes
// unchanged: printable ASCII without '"', '\\' or the HTML characters it
// escapes.
func plainJSON(s string) bool {
	for i := 0; i < len(s); i++ {
		switch c := s[i]; {
		case c < 0x20 || c >= 0x7f, c == '"', c == '\\', c == '<', c == '>', c == '&':
			return false
		}
	}
	return true
}

// appendJSONString appends s as a JSON string, as encoding/json writes it.
func appendJSONString(b []byte, s string) []byte {
	if plainJSON(s) {
		b = append(b, '"')
		b = append(b, s...)
		return append(b, '"')
	}
	enc, _ := json.Marshal(s) // a string always encodes
	return append(b, enc...)
}

// appendField appends ,"name": after a previous field.
func appendField(b []byte, name string) []byte {
	b = append(b, ',', '"')
	b = append(b, name...)
	return append(b, '"', ':')
}

// Marshal encodes m for the store and the wire between sidecars: the JSON
// encoding/json writes for a Message, Data as base64.
func (m *Message) Marshal() ([]byte, error) {
	if _, off := m.Time.Zone(); len(m.Extensions) > 0 || m.Time.Year() < 0 || m.Time.Year() > 9999 || off <= -86400 || off >= 86400 {
		// Rare: extensions are sorted and compacted there, and a time
		// RFC 3339 cannot hold is refused there, as before.
		return json.Marshal(m)
	}
	b := make([]byte, 0, 192+len(m.ID)+len(m.Source)+len(m.Type)+len(m.DataContentType)+len(m.Topic)+
		len(m.PubsubName)+len(m.OrderingKey)+base64.StdEncoding.EncodedLen(len(m.Data)))
	b = append(b, `{"id":`...)
	b = appendJSONString(b, m.ID)
	b = appendField(b, "source")
	b = appendJSONString(b, m.Source)
	b = appendField(b, "type")
	b = appendJSONString(b, m.Type)
	b = appendField(b, "time")
	b = append(b, '"')
	b = m.Time.AppendFormat(b, time.RFC3339Nano)
	b = append(b, '"')
	b = appendField(b, "datacontenttype")
	b = appendJSONString(b, m.DataContentType)
	b = appendField(b, "topic")
	b = appendJSONString(b, m.Topic)
	b = appendField(b, "pubsubname")
	b = appendJSONString(b, m.PubsubName)
	if len(m.Data) > 0 {
		b = appendField(b, "data")
		b = append(b, '"')
		b = base64.StdEncoding.AppendEncode(b, m.Data)
		b = append(b, '"')
	}
	if m.OrderingKey != "" {
		b = appendField(b, "ordering_key")
		b = appendJSONString(b, m.OrderingKey)
	}
	return append(b, '}'), nil
}

// Structured encodes m as a structured-mode CloudEvent
// (application/cloudevents+json): data as JSON when it is JSON, as a string
// when it is text, else data_base64.
func (m *Message) Structured() []byte {
	b := make([]byte, 0, 256+len(m.ID)+len(m.Source)+len(m.Type)+len(m.DataContentType)+len(m.Topic)+
		len(m.PubsubName)+base64.StdEncoding.EncodedLen(len(m.Data)))
	b = append(b, `{"specversion":"`+SpecVersion+`"`...)
	b = appendField(b, "id")
	b = appendJSONString(b, m.ID)
	b = appendField(b, "source")
	b = appendJSONString(b, m.Source)
	b = appendField(b, "type")
	b = appendJSONString(b, m.Type)
	b = appendField(b, "time")
	b = append(b, '"')
	b = m.Time.UTC().AppendFormat(b, time.RFC3339Nano)
	b = append(b, '"')
	b = appendField(b, "datacontenttype")
	b = appendJSONString(b, m.DataContentType)
	b = appendField(b, "topic")
	b = appendJSONString(b, m.Topic)
	b = appendField(b, "pubsubname")
	b = appendJSONString(b, m.PubsubName)
	for name, v := range m.Extensions {
		b = appendField(b, name)
		b = append(b, v...)
	}
	switch {
	case len(m.Data) == 0:
	case isJSON(m.DataContentType) && json.Valid(m.Data):
		b = appendField(b, "data")
		b = append(b, m.Data...)
	case isText(m.DataContentType) && utf8.Valid(m.Data):
		b = appendField(b, "data")
		b = appendJSONString(b, string(m.Data))
	default:
		b = appendField(b, "data_base64")
		b = append(b, '"')
		b = base64.StdEncoding.AppendEncode(b, m.Data)
		b = append(b, '"')
	}
	return append(b, '}')
}
