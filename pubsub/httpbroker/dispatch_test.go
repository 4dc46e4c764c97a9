package httpbroker

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"
	"go.uber.org/zap"

	"github.com/sidecarlb/sidecar/discovery"
	"github.com/sidecarlb/sidecar/pubsub"
	"github.com/sidecarlb/sidecar/pubsub/store"
)

// publishClient is the tests' app client: its own Transport, since
// httptest.Server.Close (of a parallel test) closes the idle connections of
// http.DefaultTransport, and a request picking one up just then fails.
var publishClient = &http.Client{Transport: &http.Transport{}}

func post(t *testing.T, url, key, body string) int {
	t.Helper()
	req, _ := http.NewRequest("POST", url+"/v1.0/publish/pubsub/orders", strings.NewReader(body))
	req.Header.Set("Content-Type", "application/json")
	if key != "" {
		req.Header.Set("Idempotency-Key", key)
	}
	resp, err := publishClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	_, _ = io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	return resp.StatusCode
}

// TestDispatchRetryThenDeadLetter: a handler answering 503 gets
// max_attempts (5) deliveries, numbered 1..5, then the message leaves the
// outbox as a dead letter (no group subscribes to orders.dlq here, so the
// dead letter is finished too).
func TestDispatchRetryThenDeadLetter(t *testing.T) {
	t.Parallel()
	var mu sync.Mutex
	var attempts []string
	r := newRig(t, t.TempDir(), http.HandlerFunc(func(w http.ResponseWriter, req *http.Request) {
		mu.Lock()
		attempts = append(attempts, req.Header.Get("Sidecar-Delivery-Attempt"))
		mu.Unlock()
		w.WriteHeader(503)
	}), true)
	if code := post(t, r.api.URL, "k", `{}`); code != 204 {
		t.Fatalf("publish = %d, want 204", code)
	}
	waitFor(t, 10*time.Second, "the outbox to empty", func() bool { return r.store.Pending() == 0 })
	mu.Lock()
	defer mu.Unlock()
	if got := strings.Join(attempts, ","); got != "1,2,3,4,5" {
		t.Errorf("attempts = %s, want 1,2,3,4,5", got)
	}
}

// TestDispatchRestart: messages stored by one dispatcher whose subscriber
// could not be reached are delivered by the next one over the same store.
func TestDispatchRestart(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	var got sync.Map
	handler := http.HandlerFunc(func(w http.ResponseWriter, req *http.Request) {
		b, _ := io.ReadAll(req.Body)
		got.Store(string(b), true)
	})
	r := newRigPeer(t, dir, handler, true, false)
	for i := range 20 {
		if code := post(t, r.api.URL, fmt.Sprint("k", i), fmt.Sprintf(`{"i":%d}`, i)); code != 204 {
			t.Fatalf("publish = %d", code)
		}
	}
	r.close()
	r2 := newRig(t, dir, handler, true)
	waitFor(t, 10*time.Second, "the outbox to empty", func() bool { return r2.store.Pending() == 0 })
	n := 0
	got.Range(func(any, any) bool { n++; return true })
	if n != 20 {
		t.Errorf("delivered %d distinct messages after the restart, want 20", n)
	}
	if s := r2.disp.Status(); s.Outbox != 0 || len(s.Groups) != 1 || s.Groups[0].Pending != 0 {
		t.Errorf("Status() = %+v, want an empty outbox and one idle group", s)
	}
}

// TestRegistryKeepsGroups: a group missing from a later answer stays, and
// a changed record replaces the old one.
func TestRegistryKeepsGroups(t *testing.T) {
	t.Parallel()
	r := NewRegistry(newFakeKV(), nil, zap.NewNop())
	a, b := benchRecord("orders", "a"), benchRecord("orders", "b")
	pairs := func(recs ...Record) api.KVPairs {
		return newFakeKV(recs...).pairs
	}
	r.set(pairs(a, b))
	a.MaxAttempts = 7
	r.set(pairs(a))
	got, synced := r.Groups("orders")
	if !synced || len(got) != 2 || got[0].MaxAttempts != 7 || got[1].Group != "b" {
		t.Errorf("Groups() = %+v, %v; want a (7 attempts) and b", got, synced)
	}
	r.set(api.KVPairs{{Key: KVPrefix + "x/y", Value: []byte("not json")}})
	if got, _ := r.Groups("x"); len(got) != 0 {
		t.Errorf("a bad record was taken: %+v", got)
	}
}

func TestDeliverRequestEncode(t *testing.T) {
	t.Parallel()
	req := &deliverRequest{Topic: "orders", Group: "billing", Messages: []peerMessage{
		{Attempt: 1, Message: []byte(`{"id":"a","data":"eyJ9"}`)}, {Attempt: 3, Message: []byte(`{"id":"b"}`)},
	}}
	var got deliverRequest
	if err := json.Unmarshal(req.encode(), &got); err != nil {
		t.Fatalf("encode() is not JSON: %v\n%s", err, req.encode())
	}
	want, _ := json.Marshal(req)
	if again, _ := json.Marshal(got); string(again) != string(want) {
		t.Errorf("encode() decodes to %s, want %s", again, want)
	}
}

// TestSlowHandlerNoRedelivery: with ten times max_in_flight messages
// published at once to a slow handler, the app never has more than
// max_in_flight deliveries and gets each message once: messages waiting at
// the peer for a slot are not given up on and sent again.
func TestSlowHandlerNoRedelivery(t *testing.T) {
	t.Parallel()
	var mu sync.Mutex
	seen := map[string]int{}
	var cur, peak int
	r := newRigSub(t, t.TempDir(), http.HandlerFunc(func(w http.ResponseWriter, req *http.Request) {
		b, _ := io.ReadAll(req.Body)
		mu.Lock()
		seen[string(b)]++
		cur++
		peak = max(peak, cur)
		mu.Unlock()
		time.Sleep(50 * time.Millisecond)
		mu.Lock()
		cur--
		mu.Unlock()
	}), true, true, 4, 2*time.Second)
	for i := range 40 {
		if code := post(t, r.api.URL, fmt.Sprint("s", i), fmt.Sprintf(`{"i":%d}`, i)); code != 204 {
			t.Fatalf("publish = %d", code)
		}
	}
	waitFor(t, 20*time.Second, "the outbox to empty", func() bool { return r.store.Pending() == 0 })
	mu.Lock()
	defer mu.Unlock()
	if len(seen) != 40 {
		t.Errorf("delivered %d distinct messages, want 40", len(seen))
	}
	for body, n := range seen {
		if n != 1 {
			t.Errorf("%s delivered %d times, want once", body, n)
		}
	}
	if peak > 4 {
		t.Errorf("peak deliveries at the app = %d, want at most max_in_flight 4", peak)
	}
}

// TestOrderingPerKey: with ordering per_key, the messages of one key reach
// the app one at a time and succeed in publish order, though some fail
// once and are retried; messages of other keys go meanwhile.
func TestOrderingPerKey(t *testing.T) {
	t.Parallel()
	var mu sync.Mutex
	done := map[string][]int{} // key → message numbers, in order of success
	busy := map[string]bool{}
	r := newRigSub(t, t.TempDir(), http.HandlerFunc(func(w http.ResponseWriter, req *http.Request) {
		var ev struct {
			Data struct {
				K string
				I int
			}
		}
		_ = json.NewDecoder(req.Body).Decode(&ev)
		k, i := ev.Data.K, ev.Data.I
		mu.Lock()
		if busy[k] {
			t.Errorf("two messages of key %s at the app at once", k)
		}
		busy[k] = true
		mu.Unlock()
		time.Sleep(time.Millisecond)
		mu.Lock()
		defer mu.Unlock()
		busy[k] = false
		if i%3 == 0 && req.Header.Get("Sidecar-Delivery-Attempt") == "1" {
			w.WriteHeader(503)
			return
		}
		done[k] = append(done[k], i)
	}), true, true, 16, 5*time.Second, func(rec *Record) { rec.Ordering = "per_key" })
	for i := range 60 {
		k := fmt.Sprint("k", i%4)
		req, _ := http.NewRequest("POST", r.api.URL+"/v1.0/publish/pubsub/orders", strings.NewReader(fmt.Sprintf(`{"K":%q,"I":%d}`, k, i)))
		req.Header.Set("Content-Type", "application/json")
		req.Header.Set("Sidecar-Ordering-Key", k)
		resp, err := publishClient.Do(req)
		if err != nil || resp.StatusCode != 204 {
			t.Fatalf("publish %d: %v %v", i, err, resp)
		}
		resp.Body.Close()
	}
	waitFor(t, 20*time.Second, "the outbox to empty", func() bool { return r.store.Pending() == 0 })
	mu.Lock()
	defer mu.Unlock()
	for k, got := range done {
		if len(got) != 15 || !slices.IsSorted(got) {
			t.Errorf("key %s succeeded in the order %v, want its 15 messages in publish order", k, got)
		}
	}
}

// downKV fails every List until up is set, as Consul does during an
// outage.
type downKV struct {
	*fakeKV
	up atomic.Bool
}

func (k *downKV) List(prefix string, q *api.QueryOptions) (api.KVPairs, *api.QueryMeta, error) {
	if !k.up.Load() {
		return nil, nil, errors.New("connection refused")
	}
	return k.fakeKV.List(prefix, q)
}

// TestPublishBeforeSubscriptionsKnown: while Consul cannot say which groups
// exist, published messages are stored and answered 204, then delivered
// once the subscriptions are known.
func TestPublishBeforeSubscriptionsKnown(t *testing.T) {
	t.Parallel()
	var got atomic.Int32
	app := httptest.NewServer(http.HandlerFunc(func(http.ResponseWriter, *http.Request) { got.Add(1) }))
	t.Cleanup(app.Close)
	sub := pubsub.Subscription{Topic: "orders", Group: "billing", Route: "/o", ContentMode: "raw", MaxInFlight: 8, Timeout: 5 * time.Second}
	peer := httptest.NewServer(NewServer(pubsub.NewApp(strings.TrimPrefix(app.URL, "http://"), []pubsub.Subscription{sub}, nil, nil, zap.NewNop()), zap.NewNop()))
	t.Cleanup(peer.Close)
	static, _ := discovery.NewStatic(map[string][]string{ServiceName("billing"): {strings.TrimPrefix(peer.URL, "http://")}})
	cache := discovery.NewCache(static, discovery.CacheOptions{}, zap.NewNop())
	t.Cleanup(cache.Close)
	st, err := store.Open(t.TempDir(), store.Options{NoSync: true})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = st.Close() })
	kv := &downKV{fakeKV: newFakeKV(benchRecord("orders", "billing"))}
	d := NewDispatcher(st, kv, cache, DispatcherOptions{}, zap.NewNop())
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); d.Run(ctx) }()
	t.Cleanup(func() { cancel(); <-done })
	pubAPI := httptest.NewServer(pubsub.NewAPI(d, pubsub.APIOptions{Name: "pubsub", MaxBytes: 1 << 20}, zap.NewNop()))
	t.Cleanup(pubAPI.Close)
	for i := range 10 {
		if code := post(t, pubAPI.URL, fmt.Sprint("k", i), `{}`); code != 204 {
			t.Fatalf("publish with Consul down = %d, want 204", code)
		}
	}
	if s := d.Status(); s.Outbox != 10 || s.Unassigned != 10 || got.Load() != 0 {
		t.Fatalf("Status() = %+v with %d delivered, want 10 stored and waiting, none delivered", s, got.Load())
	}
	kv.up.Store(true)
	waitFor(t, 15*time.Second, "delivery once Consul answers", func() bool { return got.Load() == 10 && st.Pending() == 0 })
}
