package natsbroker

import (
	"encoding/json"
	"reflect"
	"testing"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/sidecarlb/sidecar/pubsub"
	"github.com/sidecarlb/sidecar/test/natsserver"
)

func TestWireRoundTrip(t *testing.T) {
	t.Parallel()
	at := time.Date(2026, 12, 7, 22, 40, 1, 123456789, time.UTC)
	for _, tc := range []struct {
		name    string
		m       pubsub.Message
		headers bool // stored in binary mode
	}{
		{"plain", pubsub.Message{ID: "id-1", Source: "svc", Type: pubsub.DefaultType, Time: at, DataContentType: "application/octet-stream", Topic: "orders", PubsubName: "pubsub", Data: []byte{0, 1, 2, 0xff}}, true},
		{"extensions and ordering key", pubsub.Message{ID: "id-2", Source: "svc", Type: "t", Time: at, DataContentType: "application/json", Topic: "orders", PubsubName: "pubsub", Data: []byte(`{"a":1}`),
			OrderingKey: "cust-7", Extensions: map[string]json.RawMessage{"traceparent": json.RawMessage(`"00-ab"`), "n": json.RawMessage(`12`)}}, true},
		{"space at the end of type", pubsub.Message{ID: "id-4", Source: "svc", Type: "t ", Time: at, DataContentType: "text/plain", Topic: "orders", Data: []byte("hi")}, false},
		{"DEL in an extension", pubsub.Message{ID: "id-5", Source: "svc", Type: "t", Time: at, DataContentType: "text/plain", Topic: "orders", Data: []byte("hi"),
			Extensions: map[string]json.RawMessage{"x": json.RawMessage("\"a\x7fb\"")}}, false},
		{"line break in source", pubsub.Message{ID: "id-3", Source: "a\r\nNats-Msg-Id: x", Type: "t", Time: at, DataContentType: "text/plain", Topic: "orders", Data: []byte("hi")}, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			msg, err := encodeMsg("sidecar.orders", &tc.m)
			if err != nil {
				t.Fatal(err)
			}
			if got := msg.Header.Get(hdrSpec) != ""; got != tc.headers {
				t.Errorf("encodeMsg() binary mode = %v, want %v", got, tc.headers)
			}
			got, err := decodeMsg(msg.Header, msg.Data)
			if err != nil {
				t.Fatalf("decodeMsg() = %v", err)
			}
			if !reflect.DeepEqual(*got, tc.m) {
				t.Errorf("decodeMsg(encodeMsg(m)) = %+v, want %+v", *got, tc.m)
			}
		})
	}
}

func TestWireReadsJSON(t *testing.T) {
	t.Parallel()
	m := pubsub.Message{ID: "old", Source: "svc", Type: "t", Time: time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC), DataContentType: "text/plain", Topic: "orders", Data: []byte("x")}
	b, _ := m.Marshal()
	got, err := decodeMsg(nats.Header{}, b)
	if err != nil || !reflect.DeepEqual(*got, m) {
		t.Errorf("decodeMsg(JSON of an earlier version) = %+v, %v; want %+v", got, err, m)
	}
	if _, err := decodeMsg(nats.Header{hdrSpec: {"1.0"}, hdrID: {"x"}, hdrTopic: {"orders"}, hdrTime: {"yesterday"}}, nil); err == nil {
		t.Error("decodeMsg() with a bad Ce-Time = nil error, want one")
	}
}

// TestWireThroughServer: a message published by the broker reads back the
// same from what a plain NATS subscriber receives, headers through a real
// nats-server and nats.go's parser included.
func TestWireThroughServer(t *testing.T) {
	t.Parallel()
	srv := natsserver.Start(t)
	b := newBroker(t, srv.URL(), nil, nil, Options{})
	nc, err := nats.Connect(srv.URL())
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()
	sub, err := nc.SubscribeSync(Subject(b.opts.SubjectPrefix, "orders"))
	if err != nil {
		t.Fatal(err)
	}
	if err := nc.Flush(); err != nil {
		t.Fatal(err)
	}
	m := pubsub.Message{ID: "id-1", Source: "svc", Type: "t", Time: time.Date(2026, 12, 7, 1, 2, 3, 4, time.UTC), DataContentType: "application/json",
		Topic: "orders", PubsubName: "pubsub", Data: []byte(`{"a":1}`), OrderingKey: "cust-7",
		Extensions: map[string]json.RawMessage{"traceparent": json.RawMessage(`"00-ab"`), "n": json.RawMessage(`12`)}}
	if _, err := b.Publish([]pubsub.Publication{{Msg: &m}}); err != nil {
		t.Fatal(err)
	}
	got, err := sub.NextMsg(5 * time.Second)
	if err != nil {
		t.Fatal(err)
	}
	if got.Header.Get(hdrSpec) == "" {
		t.Errorf("stored message has no %s header, want binary mode", hdrSpec)
	}
	dm, err := decodeMsg(got.Header, got.Data)
	if err != nil || !reflect.DeepEqual(*dm, m) {
		t.Errorf("decodeMsg(received) = %+v, %v; want %+v", dm, err, m)
	}
}
