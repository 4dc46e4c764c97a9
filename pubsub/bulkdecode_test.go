package pubsub

import (
	"bytes"
	"encoding/json"
	"errors"
	"reflect"
	"strings"
	"testing"
)

// sameAsEncodingJSON fails t unless entries (the fast path's) are what
// encoding/json decodes from body, and each text is its event's string.
func sameAsEncodingJSON(t *testing.T, body []byte, entries []bulkEntry) {
	t.Helper()
	var want []bulkEntry
	if err := json.Unmarshal(body, &want); err != nil {
		t.Fatalf("fast path accepted %q, encoding/json refuses it: %v", body, err)
	}
	if len(entries) != len(want) {
		t.Fatalf("decodeBulkFast(%q) = %d entries, encoding/json %d", body, len(entries), len(want))
	}
	for i, e := range entries {
		w := want[i]
		if e.EntryID != w.EntryID || e.ContentType != w.ContentType || !bytes.Equal(e.Event, w.Event) ||
			len(e.Metadata) != len(w.Metadata) || (len(w.Metadata) > 0 && !reflect.DeepEqual(e.Metadata, w.Metadata)) ||
			(e.Metadata == nil) != (w.Metadata == nil) {
			t.Fatalf("decodeBulkFast(%q)[%d] = %+v, encoding/json %+v", body, i, e, w)
		}
		if e.text != nil {
			var s string
			if err := json.Unmarshal(w.Event, &s); err != nil || s != string(e.text) {
				t.Fatalf("decodeBulkFast(%q)[%d].text = %q, encoding/json reads %q (%v)", body, i, e.text, s, err)
			}
		}
	}
}

func TestDecodeBulk(t *testing.T) {
	for _, tc := range []struct {
		name string
		body string
		fast bool // the one-pass path takes it
	}{
		{"text events", `[{"entryId":"1","event":"hello","contentType":"text/plain"},{"entryId":"2","event":"wörld"}]`, true},
		{"json event and metadata", ` [ {"entryId":"a", "event":{"x":[1,"}"]}, "contentType":"application/json", "metadata":{"idempotencyKey":"k","orderingKey":"o"}} ] `, true},
		{"cloudevent", `[{"entryId":"a","event":{"specversion":"1.0","data":"x\"y"},"contentType":"application/cloudevents+json"}]`, true},
		{"array event", `[{"entryId":"a","event":[1,2]}]`, true},
		{"empty", `[]`, true},
		{"escaped text", `[{"entryId":"1","event":"a\nb \u003c\"q\""}]`, true},
		{"number event", `[{"entryId":"1","event":12}]`, false},
		{"null event", `[{"entryId":"1","event":null}]`, false},
		{"unknown key", `[{"entryId":"1","event":"x","other":1}]`, false},
		{"key in another case", `[{"EntryID":"1","event":"x"}]`, false},
		{"key twice", `[{"entryId":"1","entryId":"2","event":"x"}]`, false},
		{"metadata key twice", `[{"entryId":"1","event":"x","metadata":{"a":"1","a":"2"}}]`, false},
		{"metadata null", `[{"entryId":"1","event":"x","metadata":null}]`, false},
		{"invalid utf-8 event", "[{\"entryId\":\"1\",\"event\":\"\xff\"}]", true}, // kept raw, as encoding/json keeps it
		{"invalid utf-8 id", "[{\"entryId\":\"\xff\",\"event\":\"x\"}]", false},
		{"escaped id", `[{"entryId":"\u0031","event":"x"}]`, false},
		{"bad escape", `[{"entryId":"1","event":"\q"}]`, false},
		{"invalid json event", `[{"entryId":"1","event":{"x":}}]`, false},
		{"trailing bytes", `[{"entryId":"1","event":"x"}]x`, false},
		{"trailing comma", `[{"entryId":"1","event":"x"},]`, false},
		{"not an array", `{"entryId":"1"}`, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			entries, ok := decodeBulkFast([]byte(tc.body), MaxBulkEntries)
			if ok != tc.fast {
				t.Fatalf("decodeBulkFast(%q) ok = %v, want %v", tc.body, ok, tc.fast)
			}
			if ok {
				sameAsEncodingJSON(t, []byte(tc.body), entries)
			}
			// decodeBulk answers as encoding/json does, either way.
			got, err := decodeBulk([]byte(tc.body), MaxBulkEntries)
			var want []bulkEntry
			werr := json.Unmarshal([]byte(tc.body), &want)
			if (err == nil) != (werr == nil) || len(got) != len(want) {
				t.Fatalf("decodeBulk(%q) = %d entries, %v; encoding/json %d, %v", tc.body, len(got), err, len(want), werr)
			}
		})
	}
}

// FuzzDecodeBulk: what the fast path accepts, encoding/json reads alike.
func FuzzDecodeBulk(f *testing.F) {
	for _, s := range []string{
		`[{"entryId":"1","event":"hello","contentType":"text/plain","metadata":{"k":"v"}}]`,
		`[{"entryId":"a","event":{"x":[1,"}\\"]"]}},{"entryId":"b","event":[]}]`,
		`[]`, `[{}]`, `[{"event":"\u00e9"}]`, "[{\"event\":\"\xc3\xa9\"}]",
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, body []byte) {
		entries, ok := decodeBulkFast(body, MaxBulkEntries)
		if !ok {
			return
		}
		sameAsEncodingJSON(t, body, entries)
	})
}

// TestDecodeBulkBound: both paths stop at more than max entries, before
// decoding the rest of the body; max entries are read.
func TestDecodeBulkBound(t *testing.T) {
	for _, body := range []string{
		`[{},{},{},{},{}]`,              // the fast path
		`[null,null,null,null,null]`,    // encoding/json's
		`[{"ENTRYID":"a"},{},{},{},{}]`, // encoding/json's, case-insensitive keys
	} {
		if got, err := decodeBulk([]byte(body), 4); !errors.Is(err, errTooManyEntries) {
			t.Errorf("decodeBulk(%s, 4) = %d entries, %v; want errTooManyEntries", body, len(got), err)
		}
		if got, err := decodeBulk([]byte(body), 5); err != nil || len(got) != 5 {
			t.Errorf("decodeBulk(%s, 5) = %d entries, %v; want 5", body, len(got), err)
		}
	}
	if got, err := decodeBulk([]byte(`[{"ENTRYID":"a"}]`), 5); err != nil || len(got) != 1 || got[0].EntryID != "a" {
		t.Errorf("decodeBulk of a case-insensitive key = %+v, %v; want entryId a", got, err)
	}
}

// BenchmarkDecodeBulk: a bulk of 100 text events of 1 KiB, per request.
func BenchmarkDecodeBulk(b *testing.B) {
	var body bytes.Buffer
	body.WriteString("[")
	for i := range 100 {
		if i > 0 {
			body.WriteString(",")
		}
		body.WriteString(`{"entryId":"` + strings.Repeat("1", i%3+1) + `","event":"` + strings.Repeat("x", 1024) + `","contentType":"text/plain"}`)
	}
	body.WriteString("]")
	for _, c := range []struct {
		name   string
		decode func([]byte) ([]bulkEntry, error)
	}{
		{"encoding-json", func(b []byte) ([]bulkEntry, error) {
			var e []bulkEntry
			return e, json.Unmarshal(b, &e)
		}},
		{"decodeBulk", func(b []byte) ([]bulkEntry, error) { return decodeBulk(b, MaxBulkEntries) }},
	} {
		b.Run(c.name, func(b *testing.B) {
			b.ReportAllocs()
			b.SetBytes(int64(body.Len()))
			for b.Loop() {
				if _, err := c.decode(body.Bytes()); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}
