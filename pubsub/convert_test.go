package pubsub

import (
	"encoding/json"
	"errors"
	"testing"
)

func TestProtoJSON(t *testing.T) {
	var asked []string
	convert := ProtoJSON(func(name string, data []byte) ([]byte, error) {
		asked = append(asked, name)
		if name != "shop.v1.Order" {
			return nil, errors.New("unknown type " + name)
		}
		return []byte(`{"id":"` + string(data) + `"}`), nil
	})
	msg := func(ct, schema string) *Message {
		m := &Message{ID: "m1", DataContentType: ct, Data: []byte("o-7")}
		if schema != "" {
			m.Extensions = map[string]json.RawMessage{"dataschema": json.RawMessage(`"` + schema + `"`)}
		}
		return m
	}
	for _, tc := range []struct {
		name, ct, schema string
		wantData, wantCT string
		wantErr          bool
	}{
		{"bare name", "application/protobuf", "shop.v1.Order", `{"id":"o-7"}`, "application/json", false},
		{"type URL", "application/x-protobuf", "type.googleapis.com/shop.v1.Order", `{"id":"o-7"}`, "application/json", false},
		{"URN", "application/protobuf; proto=x", "urn:proto:shop.v1.Order", `{"id":"o-7"}`, "application/json", false},
		{"not protobuf", "application/octet-stream", "shop.v1.Order", "o-7", "application/octet-stream", false},
		{"no dataschema", "application/protobuf", "", "o-7", "application/protobuf", false},
		{"unknown type", "application/protobuf", "shop.v1.Refund", "o-7", "application/protobuf", true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			in := msg(tc.ct, tc.schema)
			out, err := convert(in)
			if (err != nil) != tc.wantErr {
				t.Fatalf("err = %v, want error %v", err, tc.wantErr)
			}
			if string(out.Data) != tc.wantData || out.DataContentType != tc.wantCT {
				t.Errorf("got %q as %s, want %q as %s", out.Data, out.DataContentType, tc.wantData, tc.wantCT)
			}
			if string(in.Data) != "o-7" || in.DataContentType != tc.ct {
				t.Errorf("the stored message changed: %q as %s", in.Data, in.DataContentType)
			}
		})
	}
	if len(asked) != 4 {
		t.Errorf("asked for %q, want the four protobuf payloads with a dataschema only", asked)
	}
}
