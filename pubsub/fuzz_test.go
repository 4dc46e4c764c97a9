package pubsub

import (
	"bytes"
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"testing"
	"time"
)

// FuzzParseEvent: any body gives an event or ErrBadEvent, never a panic;
// an accepted event encodes as structured JSON.
func FuzzParseEvent(f *testing.F) {
	for _, s := range []string{`{}`, `{"data":{"a":1}}`, `{"data_base64":"AAE="}`, `{"specversion":"1.0","id":"x","time":"2026-01-02T03:04:05Z","ext":"v"}`, `[`, `{"data":"x","datacontenttype":"text/plain"}`} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, body []byte) {
		m := &Message{ID: "id", Source: "s", Type: "t", Topic: "orders", PubsubName: "pubsub"}
		if err := ParseEvent(body, m); err != nil {
			return
		}
		if !json.Valid(m.Structured()) {
			t.Fatalf("Structured() of %q is not JSON: %s", body, m.Structured())
		}
		enc, err := m.Marshal()
		if err != nil {
			t.Fatalf("Marshal() of an accepted event: %v", err)
		}
		if _, err := Unmarshal(enc); err != nil {
			t.Fatalf("Unmarshal(Marshal()) = %v", err)
		}
		if want, _ := json.Marshal(m); !bytes.Equal(enc, want) {
			t.Fatalf("Marshal() = %s, encoding/json writes %s", enc, want)
		}
		if len(m.Extensions) == 0 {
			if got, want := m.Structured(), structuredRef(m); !bytes.Equal(got, want) {
				t.Fatalf("Structured() = %s, want %s", got, want)
			}
		}
	})
}

// FuzzPublish: any body on either publish route gets an answer in 2xx-5xx
// and no panic; a 204 always stored what it answered for.
func FuzzPublish(f *testing.F) {
	f.Add(false, "application/cloudevents+json", []byte(`{"data":1}`))
	f.Add(true, "", []byte(`[{"entryId":"1","event":"x"}]`))
	f.Add(true, "", []byte(`[{"entryId":"1","event":{"id":1},"contentType":"application/cloudevents+json"}]`))
	f.Fuzz(func(t *testing.T, bulk bool, ct string, body []byte) {
		sink := &fakeSink{}
		a := newTestAPI(sink)
		path := "/v1.0/publish/pubsub/orders"
		if bulk {
			path = "/v1.0-alpha1/publish/bulk/pubsub/orders"
		}
		r := httptest.NewRequest(http.MethodPost, path, bytes.NewReader(body))
		r.Header.Set("Content-Type", ct)
		w := httptest.NewRecorder()
		a.ServeHTTP(w, r)
		if w.Code < 200 || w.Code > 599 {
			t.Fatalf("status %d", w.Code)
		}
		if w.Code == http.StatusNoContent && len(sink.msgs) == 0 {
			t.Fatalf("204 with nothing stored")
		}
		if w.Code != http.StatusNoContent && len(sink.msgs) != 0 {
			t.Fatalf("%d with %d stored", w.Code, len(sink.msgs))
		}
	})
}

// FuzzUnmarshalPrefix: what the fast path accepts, encoding/json reads as
// the same message; what Marshal writes without extensions, it accepts.
func FuzzUnmarshalPrefix(f *testing.F) {
	at := time.Date(2026, 12, 7, 23, 4, 5, 123456789, time.FixedZone("x", 3600))
	for _, m := range []Message{
		{ID: "0b6f-1", Source: "orders", Type: DefaultType, Time: at, DataContentType: "application/octet-stream", Topic: "orders", PubsubName: "pubsub", Data: []byte{0, 1, 2, 255}},
		{ID: "k", Source: "s", Type: "t", Time: at.UTC(), DataContentType: "text/plain", Topic: "a.b", PubsubName: "p", OrderingKey: "c-7"},
		{ID: `a"b`, Source: "é", Time: at},
	} {
		b, _ := m.Marshal()
		f.Add(b)
		f.Add(append(b, `,{"attempt":1}`...))
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		m, rest, ok := UnmarshalPrefix(b)
		if !ok {
			var m2 Message
			if json.Unmarshal(b, &m2) == nil && len(m2.Extensions) == 0 && m2.Time.Year() >= 0 && m2.Time.Year() <= 9999 {
				plain := plainJSON(m2.ID + m2.Source + m2.Type + m2.DataContentType + m2.Topic + m2.PubsubName + m2.OrderingKey)
				if enc, _ := m2.Marshal(); bytes.Equal(enc, b) && plain {
					t.Fatalf("UnmarshalPrefix refused %s, which Marshal writes", b)
				}
			}
			return
		}
		var m2 Message
		if err := json.Unmarshal(b[:len(b)-len(rest)], &m2); err != nil {
			t.Fatalf("UnmarshalPrefix accepted %q, encoding/json: %v", b, err)
		}
		got, _ := json.Marshal(m)
		want, _ := json.Marshal(&m2)
		if !bytes.Equal(got, want) || !m.Time.Equal(m2.Time) {
			t.Fatalf("UnmarshalPrefix(%q) = %s, encoding/json reads %s", b, got, want)
		}
	})
}
