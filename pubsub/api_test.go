package pubsub

import (
	"encoding/json"
	"errors"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"testing/iotest"
	"time"

	"go.uber.org/zap"
)

// fakeSink stores in memory, dedups keys, and fails on demand.
type fakeSink struct {
	mu   sync.Mutex
	msgs []*Message
	keys map[string]bool
	err  error
}

func (f *fakeSink) Publish(pubs []Publication) ([]bool, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.err != nil {
		return nil, f.err
	}
	if f.keys == nil {
		f.keys = map[string]bool{}
	}
	dup := make([]bool, len(pubs))
	for i, p := range pubs {
		if p.Key != "" && f.keys[p.Key] {
			dup[i] = true
			continue
		}
		f.keys[p.Key] = p.Key != ""
		f.msgs = append(f.msgs, p.Msg)
	}
	return dup, nil
}

var testNow = time.Date(2026, 12, 7, 10, 0, 0, 0, time.UTC)

func newTestAPI(sink Sink) *API {
	return NewAPI(sink, APIOptions{Name: "pubsub", Source: "orders", MaxBytes: 1024, Now: func() time.Time { return testNow }}, zap.NewNop())
}

func do(h http.Handler, method, path, ct string, body string, hdr ...string) *httptest.ResponseRecorder {
	r := httptest.NewRequest(method, path, strings.NewReader(body))
	if ct != "" {
		r.Header.Set("Content-Type", ct)
	}
	for i := 0; i+1 < len(hdr); i += 2 {
		r.Header.Set(hdr[i], hdr[i+1])
	}
	w := httptest.NewRecorder()
	h.ServeHTTP(w, r)
	return w
}

func TestPublishStatus(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name, method, path, ct, body string
		sinkErr                      error
		want                         int
	}{
		{"text", "POST", "/v1.0/publish/pubsub/orders", "text/plain", "hello", nil, 204},
		{"no content type", "POST", "/v1.0/publish/pubsub/orders", "", "hello", nil, 204},
		{"cloudevent", "POST", "/v1.0/publish/pubsub/orders", "application/cloudevents+json", `{"specversion":"1.0","id":"e1","data":{"a":1}}`, nil, 204},
		{"unknown pubsub", "POST", "/v1.0/publish/other/orders", "text/plain", "x", nil, 404},
		{"bad topic", "POST", "/v1.0/publish/pubsub/a%20b", "text/plain", "x", nil, 400},
		{"long topic", "POST", "/v1.0/publish/pubsub/" + strings.Repeat("a", 250), "text/plain", "x", nil, 400},
		{"bad cloudevent", "POST", "/v1.0/publish/pubsub/orders", "application/cloudevents+json", `{"specversion":"0.3"}`, nil, 400},
		{"cloudevent not json", "POST", "/v1.0/publish/pubsub/orders", "application/cloudevents+json", `nope`, nil, 400},
		{"too large", "POST", "/v1.0/publish/pubsub/orders", "text/plain", strings.Repeat("x", 1025), nil, 413},
		{"cloudevent data too large", "POST", "/v1.0/publish/pubsub/orders", "application/cloudevents+json", `{"data":"` + strings.Repeat("x", 1025) + `","datacontenttype":"text/plain"}`, nil, 413},
		{"store full", "POST", "/v1.0/publish/pubsub/orders", "text/plain", "x", errors.New("store full"), 503},
		{"wrong method", "GET", "/v1.0/publish/pubsub/orders", "", "", nil, 405},
		{"healthz", "GET", "/v1.0/healthz", "", "", nil, 204},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			sink := &fakeSink{err: tc.sinkErr}
			w := do(newTestAPI(sink), tc.method, tc.path, tc.ct, tc.body)
			if w.Code != tc.want {
				t.Fatalf("%s %s = %d %s, want %d", tc.method, tc.path, w.Code, w.Body, tc.want)
			}
			if tc.want == 503 && w.Header().Get("Retry-After") == "" {
				t.Errorf("503 without Retry-After")
			}
			if tc.want == 204 && strings.HasPrefix(tc.path, "/v1.0/publish") {
				if len(sink.msgs) != 1 || w.Header().Get("Sidecar-Message-Id") != sink.msgs[0].ID {
					t.Errorf("stored %d messages, Sidecar-Message-Id %q; want 1 with that id", len(sink.msgs), w.Header().Get("Sidecar-Message-Id"))
				}
			}
			if tc.want >= 400 && tc.want != 405 && len(sink.msgs) != 0 {
				t.Errorf("stored %d messages on a %d", len(sink.msgs), tc.want)
			}
		})
	}
}

// TestPublishPathAsTheMux: the publish path's shortcut past the mux
// answers every path as the mux alone does (the mux's route calls the same
// handler), odd ones included.
func TestPublishPathAsTheMux(t *testing.T) {
	t.Parallel()
	for _, path := range []string{
		"/v1.0/publish/pubsub/orders", "/v1.0/publish/other/orders", "/v1.0/publish/pubsub/orders/more",
		"/v1.0/publish/pubsub/", "/v1.0/publish/pubsub", "/v1.0/publish//orders", "/v1.0/publish/pubsub//orders",
		"/v1.0/publish/pubsub/.", "/v1.0/publish/pubsub/..", "/v1.0/publish/./orders", "/v1.0/publish/pubsub/a%2Fb",
		"/v1.0/publish/pubsub/a%20b", "/v1.0/publish/pubsub/orders.v1", "/v1.0/publish/pubsub/orders?x=1",
	} {
		got := do(newTestAPI(&fakeSink{}), "POST", path, "text/plain", "x")
		want := do(newTestAPI(&fakeSink{}).mux, "POST", path, "text/plain", "x")
		if got.Code != want.Code || got.Body.String() != want.Body.String() || got.Header().Get("Location") != want.Header().Get("Location") {
			t.Errorf("POST %s = %d %q (Location %q), the mux answers %d %q (Location %q)", path, got.Code, got.Body, got.Header().Get("Location"),
				want.Code, want.Body, want.Header().Get("Location"))
		}
	}
}

func TestPublishMessage(t *testing.T) {
	t.Parallel()
	sink := &fakeSink{}
	a := newTestAPI(sink)
	w := do(a, "POST", "/v1.0/publish/pubsub/orders", "application/json", `{"n":1}`, "Idempotency-Key", "k1")
	if w.Code != 204 || w.Header().Get("Sidecar-Message-Id") != "k1" {
		t.Fatalf("publish = %d, id %q; want 204, k1", w.Code, w.Header().Get("Sidecar-Message-Id"))
	}
	w = do(a, "POST", "/v1.0/publish/pubsub/orders", "application/json", `{"n":2}`, "Idempotency-Key", "k1")
	if w.Code != 204 || w.Header().Get("Sidecar-Message-Id") != "k1" || len(sink.msgs) != 1 {
		t.Fatalf("repeat = %d, id %q, %d stored; want 204, k1, 1 stored", w.Code, w.Header().Get("Sidecar-Message-Id"), len(sink.msgs))
	}
	m := sink.msgs[0]
	want := Message{ID: "k1", Source: "orders", Type: DefaultType, Time: testNow, DataContentType: "application/json", Topic: "orders", PubsubName: "pubsub", Data: []byte(`{"n":1}`)}
	if got, _ := json.Marshal(m); string(got) != string(must(json.Marshal(want))) {
		t.Errorf("message = %s, want %+v", got, want)
	}
	if w := do(a, "POST", "/v1.0/publish/pubsub/orders", "", "x", "Sidecar-Ordering-Key", strings.Repeat("k", 256)); w.Code != 400 {
		t.Errorf("publish with a 256-byte ordering key = %d, want 400", w.Code)
	}
	w = do(a, "POST", "/v1.0/publish/pubsub/orders", "", "x", "Sidecar-Ordering-Key", "cust-7")
	if id := w.Header().Get("Sidecar-Message-Id"); sink.msgs[1].OrderingKey != "cust-7" {
		t.Errorf("ordering key = %q, want cust-7 (id %s)", sink.msgs[1].OrderingKey, id)
	}
	w = do(a, "POST", "/v1.0/publish/pubsub/orders", "", "x")
	sink.msgs = sink.msgs[1:]
	if id := w.Header().Get("Sidecar-Message-Id"); len(id) != 36 || sink.msgs[1].DataContentType != "text/plain" {
		t.Errorf("unkeyed id = %q (want a UUID), content type %q (want text/plain)", id, sink.msgs[1].DataContentType)
	}
}

func must[T any](v T, err error) T {
	if err != nil {
		panic(err)
	}
	return v
}

func TestBulk(t *testing.T) {
	t.Parallel()
	sink := &fakeSink{}
	a := newTestAPI(sink)
	body := `[{"entryId":"1","event":"hello","contentType":"text/plain"},
	{"entryId":"2","event":{"a":1},"contentType":"application/json"},
	{"entryId":"3","event":{"specversion":"1.0","id":"ce3","type":"t","source":"s","data":"x","datacontenttype":"text/plain"},"contentType":"application/cloudevents+json"}]`
	if w := do(a, "POST", "/v1.0-alpha1/publish/bulk/pubsub/orders", "application/json", body); w.Code != 204 {
		t.Fatalf("bulk = %d %s, want 204", w.Code, w.Body)
	}
	if len(sink.msgs) != 3 || string(sink.msgs[0].Data) != "hello" || string(sink.msgs[1].Data) != `{"a":1}` || sink.msgs[2].ID != "ce3" || string(sink.msgs[2].Data) != "x" {
		t.Errorf("bulk stored %+v", sink.msgs)
	}
	if w := do(a, "POST", "/v1.0-alpha1/publish/bulk/pubsub/orders", "application/json", `[{"entryId":"1","event":"x"},{"entryId":"1","event":"y"}]`); w.Code != 400 {
		t.Errorf("bulk with a repeated entryId = %d, want 400", w.Code)
	}
	if w := do(a, "POST", "/v1.0-alpha1/publish/bulk/pubsub/orders", "application/json", `{}`); w.Code != 400 {
		t.Errorf("bulk of an object = %d, want 400", w.Code)
	}
	sink.err = errors.New("disk failed")
	w := do(a, "POST", "/v1.0-alpha1/publish/bulk/pubsub/orders", "application/json", `[{"entryId":"a","event":"x"},{"entryId":"b","event":"y"}]`)
	var resp struct {
		FailedEntries []failedEntry `json:"failedEntries"`
	}
	_ = json.Unmarshal(w.Body.Bytes(), &resp)
	if w.Code != 500 || len(resp.FailedEntries) != 2 || resp.FailedEntries[1].EntryID != "b" {
		t.Errorf("bulk on a failing store = %d %s, want 500 listing a and b", w.Code, w.Body)
	}
}

func TestParseEvent(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name, body string
		ok         bool
		check      func(*Message) bool
	}{
		{"json data", `{"data":{"a":1}}`, true, func(m *Message) bool { return m.DataContentType == "application/json" && string(m.Data) == `{"a":1}` }},
		{"text data", `{"data":"hi","datacontenttype":"text/plain"}`, true, func(m *Message) bool { return string(m.Data) == "hi" }},
		{"base64", `{"data_base64":"AAE="}`, true, func(m *Message) bool {
			return string(m.Data) == "\x00\x01" && m.DataContentType == "application/octet-stream"
		}},
		{"fields", `{"id":"x","source":"s","type":"t","time":"2026-01-02T03:04:05Z","traceparent":"00-a","n":1}`, true, func(m *Message) bool {
			return m.ID == "x" && m.Source == "s" && m.Type == "t" && m.Time.Year() == 2026 && string(m.Extensions["traceparent"]) == `"00-a"` && string(m.Extensions["n"]) == "1"
		}},
		{"both data", `{"data":1,"data_base64":"AA=="}`, false, nil},
		{"bad base64", `{"data_base64":"!!"}`, false, nil},
		{"bad time", `{"time":"yesterday"}`, false, nil},
		{"empty id", `{"id":""}`, false, nil},
		{"id not string", `{"id":1}`, false, nil},
		{"bad ext name", `{"Trace-Id":"x"}`, false, nil},
		{"object ext", `{"ext":{"a":1}}`, false, nil},
		{"array", `[1]`, false, nil},
		{"trailing", `{} {}`, false, nil},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			m := &Message{}
			err := ParseEvent([]byte(tc.body), m)
			if (err == nil) != tc.ok {
				t.Fatalf("ParseEvent(%s) = %v, want ok %v", tc.body, err, tc.ok)
			}
			if tc.ok && !tc.check(m) {
				t.Errorf("ParseEvent(%s) = %+v", tc.body, m)
			}
			if !tc.ok && !errors.Is(err, ErrBadEvent) {
				t.Errorf("ParseEvent(%s) error %v does not wrap ErrBadEvent", tc.body, err)
			}
		})
	}
}

func TestStructured(t *testing.T) {
	t.Parallel()
	base := Message{ID: "1", Source: "s", Type: "t", Time: testNow, Topic: "orders", PubsubName: "pubsub"}
	for _, tc := range []struct {
		ct, data, field, want string
	}{
		{"application/json", `{"a":1}`, "data", `{"a":1}`},
		{"text/plain; charset=utf-8", "hi", "data", `"hi"`},
		{"application/octet-stream", "\x00", "data_base64", `"AA=="`},
		{"application/json", `not json`, "data_base64", `"bm90IGpzb24="`},
	} {
		m := base
		m.DataContentType, m.Data = tc.ct, []byte(tc.data)
		var got map[string]json.RawMessage
		if err := json.Unmarshal(m.Structured(), &got); err != nil {
			t.Fatalf("Structured() is not JSON: %v", err)
		}
		if string(got[tc.field]) != tc.want || string(got["specversion"]) != `"1.0"` || string(got["topic"]) != `"orders"` || string(got["pubsubname"]) != `"pubsub"` {
			t.Errorf("Structured(%s, %q) = %s, want %s %s", tc.ct, tc.data, m.Structured(), tc.field, tc.want)
		}
	}
}

// TestReadAll: the body whatever its size hint, and the reader's error.
func TestReadAll(t *testing.T) {
	body := strings.Repeat("x", 3000)
	for _, hint := range []int64{-1, 0, 1, 2999, 3000, 3001, 1 << 30} {
		got, err := ReadAll(iotest.HalfReader(strings.NewReader(body)), hint)
		if err != nil || string(got) != body {
			t.Errorf("ReadAll(hint %d) = %d bytes, %v; want %d bytes", hint, len(got), err, len(body))
		}
	}
	boom := errors.New("boom")
	if _, err := ReadAll(iotest.ErrReader(boom), 10); !errors.Is(err, boom) {
		t.Errorf("ReadAll(failing reader) = %v, want %v", err, boom)
	}
}
