package pubsub

import (
	"bytes"
	"encoding/base64"
	"encoding/json"
	"mime"
	"strings"
	"testing"
	"time"
	"unicode/utf8"
)

// structuredRef is Structured as it was written with encoding/json field
// by field: the reference the append-based encoder must match.
func structuredRef(m *Message) []byte {
	var b bytes.Buffer
	field := func(name string, v any) {
		if b.Len() > 1 {
			b.WriteByte(',')
		}
		b.WriteString(`"` + name + `":`)
		switch v := v.(type) {
		case json.RawMessage:
			b.Write(v)
		default:
			enc, _ := json.Marshal(v)
			b.Write(enc)
		}
	}
	b.WriteByte('{')
	field("specversion", SpecVersion)
	field("id", m.ID)
	field("source", m.Source)
	field("type", m.Type)
	field("time", m.Time.UTC().Format(time.RFC3339Nano))
	field("datacontenttype", m.DataContentType)
	field("topic", m.Topic)
	field("pubsubname", m.PubsubName)
	for name, v := range m.Extensions {
		field(name, v)
	}
	switch {
	case len(m.Data) == 0:
	case isJSON(m.DataContentType) && json.Valid(m.Data):
		field("data", json.RawMessage(m.Data))
	case isText(m.DataContentType) && utf8.Valid(m.Data):
		field("data", string(m.Data))
	default:
		field("data_base64", base64.StdEncoding.EncodeToString(m.Data))
	}
	b.WriteByte('}')
	return b.Bytes()
}

// TestMarshalMatchesEncodingJSON: the append-based encoders write the
// bytes encoding/json writes, for plain strings and for those it escapes.
func TestMarshalMatchesEncodingJSON(t *testing.T) {
	at := time.Date(2026, 12, 7, 23, 4, 5, 123456789, time.FixedZone("x", 3600))
	for _, tc := range []struct {
		name string
		m    Message
	}{
		{"plain", Message{ID: "0b6f-1", Source: "orders", Type: DefaultType, Time: at, DataContentType: "application/octet-stream", Topic: "orders", PubsubName: "pubsub", Data: []byte{0, 1, 2, 255}}},
		{"no data, ordering key", Message{ID: "k", Source: "s", Type: "t", Time: at.UTC(), DataContentType: "text/plain", Topic: "a.b-c_d", PubsubName: "p", OrderingKey: "customer-7"}},
		{"escaped", Message{ID: `a"b\c<d>&e`, Source: "é\u2028", Type: "t\n", Time: at, DataContentType: `text/plain; charset="utf-8"`, Topic: "t", PubsubName: "p", Data: []byte(`"quoted" <b>`), OrderingKey: "\x00\x7f"}},
		{"invalid utf-8", Message{ID: "\xff\xfe", Source: "s", Type: "t", Time: at, DataContentType: "text/plain", Topic: "t", PubsubName: "p", Data: []byte("\xff")}},
		{"json data", Message{ID: "j", Source: "s", Type: "t", Time: at, DataContentType: "application/json", Topic: "t", PubsubName: "p", Data: []byte(`{"a":[1,2]}`)}},
		{"zero time", Message{ID: "z", Topic: "t"}},
		{"extension", Message{ID: "x", Source: "s", Type: "t", Time: at, Topic: "t", PubsubName: "p", Extensions: map[string]json.RawMessage{"b": json.RawMessage(` 1 `), "a": json.RawMessage(`"v"`)}}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := tc.m.Marshal()
			if err != nil {
				t.Fatal(err)
			}
			want, _ := json.Marshal(&tc.m)
			if !bytes.Equal(got, want) {
				t.Errorf("Marshal() = %s, want %s", got, want)
			}
			back, err := Unmarshal(got)
			if err != nil {
				t.Fatalf("Unmarshal(Marshal()) = %v", err)
			}
			if again, _ := back.Marshal(); !bytes.Equal(again, mustJSON(back)) {
				t.Errorf("Marshal(Unmarshal(Marshal())) = %s, want %s", again, mustJSON(back))
			}
			if len(tc.m.Extensions) <= 1 {
				if got, want := tc.m.Structured(), structuredRef(&tc.m); !bytes.Equal(got, want) {
					t.Errorf("Structured() = %s, want %s", got, want)
				}
			}
		})
	}
	// A year encoding/json refuses is refused alike.
	m := Message{ID: "y", Time: time.Date(10000, 1, 1, 0, 0, 0, 0, time.UTC)}
	if _, err := m.Marshal(); err == nil {
		t.Errorf("Marshal() of year 10000 = nil error, want encoding/json's")
	}
	// So is a zone offset of a day or more, which RFC 3339 cannot hold.
	m = Message{ID: "z", Time: time.Date(2026, 1, 1, 0, 0, 0, 0, time.FixedZone("far", 25*3600))}
	if _, err := m.Marshal(); err == nil {
		t.Errorf("Marshal() with a +25:00 offset = nil error, want encoding/json's")
	}
}

func mustJSON(m *Message) []byte {
	b, _ := json.Marshal(m)
	return b
}

// BenchmarkEncode: the two encodings a delivered message costs.
func BenchmarkEncode(b *testing.B) {
	m := Message{ID: NewID(), Source: "orders", Type: DefaultType, Time: time.Now(), DataContentType: "application/octet-stream", Topic: "orders", PubsubName: "pubsub", Data: make([]byte, 1024)}
	b.Run("Marshal", func(b *testing.B) {
		b.ReportAllocs()
		for range b.N {
			_, _ = m.Marshal()
		}
	})
	b.Run("Structured", func(b *testing.B) {
		b.ReportAllocs()
		for range b.N {
			_ = m.Structured()
		}
	})
}

// TestMediaTypeFastPath: a bare media type skips mime.ParseMediaType with
// the same answer.
func TestMediaTypeFastPath(t *testing.T) {
	for _, ct := range []string{"application/json", "text/plain", "application/cloudevents+json", "application/vnd.a-b.c+xml", "Application/JSON", "text/plain; charset=utf-8", " text/plain", "a/b/c", "/x", "x/", "", "text/", "application/x_y"} {
		want, _, err := mime.ParseMediaType(ct)
		if err != nil {
			mt, _, _ := strings.Cut(ct, ";")
			want = strings.ToLower(strings.TrimSpace(mt))
		}
		if got := mediaType(ct); got != want {
			t.Errorf("mediaType(%q) = %q, want %q", ct, got, want)
		}
	}
}
