package httpbroker

import (
	"bytes"
	"encoding/json"
	"fmt"
	"testing"
	"time"

	"github.com/sidecarlb/sidecar/pubsub"
)

func testBatch(tb testing.TB) *deliverRequest {
	tb.Helper()
	at := time.Date(2026, 12, 7, 23, 4, 5, 6, time.UTC)
	req := &deliverRequest{Topic: "orders", Group: "billing"}
	for i, m := range []pubsub.Message{
		{ID: "a", Source: "s", Type: pubsub.DefaultType, Time: at, DataContentType: "application/json", Topic: "orders", PubsubName: "pubsub", Data: []byte(`{"n":1}`)},
		{ID: "b", Source: "s", Type: pubsub.DefaultType, Time: at, DataContentType: "text/plain", Topic: "orders", PubsubName: "pubsub", OrderingKey: "k"},
		{ID: "c", Source: "s", Type: pubsub.DefaultType, Time: at, Topic: "other", PubsubName: "pubsub"},
	} {
		b, err := m.Marshal()
		if err != nil {
			tb.Fatal(err)
		}
		req.Messages = append(req.Messages, peerMessage{Attempt: i + 1, Message: b})
	}
	return req
}

// TestDecodeBatch: a delivery request as encode writes it is read by the
// fast path, with the messages encoding/json reads from it, and one of
// another topic than the request's marked bad; other shapes are left to
// encoding/json.
func TestDecodeBatch(t *testing.T) {
	req := testBatch(t)
	group, msgs, ok := decodeBatch(req.encode())
	if !ok {
		t.Fatalf("decodeBatch(%s) refused what encode wrote", req.encode())
	}
	if group != "billing" || len(msgs) != 3 {
		t.Fatalf("decodeBatch() = %q, %d messages, want billing, 3", group, len(msgs))
	}
	for i, bm := range msgs[:2] {
		want, _ := pubsub.Unmarshal(req.Messages[i].Message)
		if bm.attempt != i+1 || bm.m == nil || bm.m.ID != want.ID || !bytes.Equal(bm.m.Data, want.Data) || bm.m.OrderingKey != want.OrderingKey {
			t.Errorf("message %d = %d %+v, want %d %+v", i, bm.attempt, bm.m, i+1, want)
		}
	}
	if msgs[2].m != nil {
		t.Errorf("message of another topic = %+v, want nil (bad message)", msgs[2].m)
	}
	for _, b := range []string{
		`{"topic":"orders","group":"billing","messages":[]} `,
		`{"topic":"orders", "group":"billing","messages":[]}`,
		`{"topic":"orders","group":"billing","messages":[{"attempt":0,"message":{}}]}`,
		`{"topic":"ord\u0065rs","group":"billing","messages":[]}`,
	} {
		if _, _, ok := decodeBatch([]byte(b)); ok {
			t.Errorf("decodeBatch(%s) accepted it, want it left to encoding/json", b)
		}
	}
}

// FuzzDecodeBatch: what the fast path accepts, encoding/json reads as the
// same request.
func FuzzDecodeBatch(f *testing.F) {
	f.Add(testBatch(f).encode())
	f.Add([]byte(`{"topic":"t","group":"g","messages":[]}`))
	f.Fuzz(func(t *testing.T, b []byte) {
		group, msgs, ok := decodeBatch(b)
		if !ok {
			return
		}
		var req deliverRequest
		if err := json.Unmarshal(b, &req); err != nil {
			t.Fatalf("decodeBatch accepted %q, encoding/json: %v", b, err)
		}
		if req.Group != group || len(req.Messages) != len(msgs) {
			t.Fatalf("decodeBatch(%q) = %q, %d messages; encoding/json reads %q, %d", b, group, len(msgs), req.Group, len(req.Messages))
		}
		for i, pm := range req.Messages {
			m, err := pubsub.Unmarshal(pm.Message)
			if err != nil {
				t.Fatalf("decodeBatch accepted message %d of %q, encoding/json: %v", i, b, err)
			}
			if pm.Attempt != msgs[i].attempt {
				t.Fatalf("attempt %d = %d, want %d", i, msgs[i].attempt, pm.Attempt)
			}
			if (m.Topic == req.Topic) != (msgs[i].m != nil) {
				t.Fatalf("message %d: topic %q of %q, decoded %v", i, m.Topic, req.Topic, msgs[i].m)
			}
			if msgs[i].m != nil {
				got, _ := json.Marshal(msgs[i].m)
				want, _ := json.Marshal(m)
				if !bytes.Equal(got, want) {
					t.Fatalf("message %d = %s, want %s", i, got, want)
				}
			}
		}
	})
}

// TestPeerPoolsForgetUnused: past maxPeerPools, pools unused for the idle
// timeout go, the recently used stay, and an address asked for again gets
// its own pool back while it is kept.
func TestPeerPoolsForgetUnused(t *testing.T) {
	pp := newPeerPools()
	first := pp.pool("10.0.0.1:1")
	if pp.pool("10.0.0.1:1") != first {
		t.Fatal("pool() of the same address = a new pool, want the same")
	}
	for i := range maxPeerPools - 1 {
		pp.pool(fmt.Sprintf("10.0.1.%d:%d", i/250, i%250+1))
	}
	pp.mu.Lock()
	for a, p := range pp.pools {
		if a != "10.0.1.0:1" {
			p.used = p.used.Add(-2 * peerIdleTimeout)
		}
	}
	pp.mu.Unlock()
	pp.pool("10.0.2.1:1")
	pp.mu.Lock()
	defer pp.mu.Unlock()
	if len(pp.pools) != 2 {
		t.Errorf("%d pools after the sweep, want 2 (the recently used and the new)", len(pp.pools))
	}
	if _, ok := pp.pools["10.0.1.0:1"]; !ok {
		t.Errorf("a recently used pool went")
	}
}
