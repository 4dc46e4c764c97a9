package httpbroker

import (
	"context"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"

	"go.uber.org/zap"

	"github.com/sidecarlb/sidecar/discovery"
	"github.com/sidecarlb/sidecar/pubsub"
	"github.com/sidecarlb/sidecar/pubsub/store"
)

// TestBroadcast: every live instance of a broadcast group gets every
// message, each once, and the outbox empties; after a restart over the same
// store, an instance's pending messages still reach it.
func TestBroadcast(t *testing.T) {
	t.Parallel()
	type instance struct {
		mu   sync.Mutex
		got  map[string]int
		down bool
	}
	insts := []*instance{{got: map[string]int{}}, {got: map[string]int{}}}
	var peers []string
	for _, in := range insts {
		app := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			b, _ := io.ReadAll(r.Body)
			in.mu.Lock()
			defer in.mu.Unlock()
			if in.down {
				w.WriteHeader(503)
				return
			}
			in.got[string(b)]++
		}))
		t.Cleanup(app.Close)
		sub := pubsub.Subscription{Topic: "news", Group: "feed", Route: "/news", ContentMode: "raw", MaxInFlight: 8, Timeout: 5 * time.Second}
		peer := httptest.NewServer(NewServer(pubsub.NewApp(strings.TrimPrefix(app.URL, "http://"), []pubsub.Subscription{sub}, nil, nil, zap.NewNop()), zap.NewNop()))
		t.Cleanup(peer.Close)
		peers = append(peers, strings.TrimPrefix(peer.URL, "http://"))
	}
	static, _ := discovery.NewStatic(map[string][]string{ServiceName("feed"): peers})
	cache := discovery.NewCache(static, discovery.CacheOptions{}, zap.NewNop())
	t.Cleanup(cache.Close)
	rec := benchRecord("news", "feed")
	rec.Delivery = "broadcast"
	rec.MaxAttempts = 1000
	dir := t.TempDir()
	run := func() (*store.Store, *Dispatcher, func()) {
		st, err := store.Open(dir, store.Options{NoSync: true})
		if err != nil {
			t.Fatal(err)
		}
		d := NewDispatcher(st, newFakeKV(rec), cache, DispatcherOptions{}, zap.NewNop())
		if err := d.Load(); err != nil {
			t.Fatal(err)
		}
		ctx, cancel := context.WithCancel(context.Background())
		done := make(chan struct{})
		go func() { defer close(done); d.Run(ctx) }()
		<-d.Registry().Synced()
		return st, d, func() { cancel(); <-done; _ = st.Close() }
	}
	// The second instance fails until after the restart.
	insts[1].down = true
	st, d, stop := run()
	var pubs []pubsub.Publication
	for i := range 30 {
		pubs = append(pubs, pubsub.Publication{Msg: &pubsub.Message{ID: pubsub.NewID(), Topic: "news", Data: []byte{byte('a' + i%26), byte('0' + i/26)}}})
	}
	if _, err := d.Publish(pubs); err != nil {
		t.Fatal(err)
	}
	count := func(in *instance) int {
		in.mu.Lock()
		defer in.mu.Unlock()
		return len(in.got)
	}
	waitFor(t, 10*time.Second, "the first instance to get all", func() bool { return count(insts[0]) == 30 })
	if st.Pending() != 30 {
		t.Errorf("outbox = %d with the second instance failing, want 30", st.Pending())
	}
	stop()
	insts[1].mu.Lock()
	insts[1].down = false
	insts[1].mu.Unlock()
	st, _, stop = run()
	defer stop()
	waitFor(t, 10*time.Second, "the second instance to get all", func() bool { return count(insts[1]) == 30 })
	waitFor(t, 10*time.Second, "the outbox to empty", func() bool { return st.Pending() == 0 })
	for i, in := range insts {
		in.mu.Lock()
		for body, n := range in.got {
			if n != 1 {
				t.Errorf("instance %d got %q %d times, want once", i, body, n)
			}
		}
		in.mu.Unlock()
	}
}

// TestBroadcastGone: messages pending for an instance that left the live
// set are given up after GoneAfter, so the outbox empties.
func TestBroadcastGone(t *testing.T) {
	t.Parallel()
	app := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {}))
	t.Cleanup(app.Close)
	sub := pubsub.Subscription{Topic: "news", Group: "feed", Route: "/news", ContentMode: "raw", MaxInFlight: 8, Timeout: 5 * time.Second}
	peer := httptest.NewServer(NewServer(pubsub.NewApp(strings.TrimPrefix(app.URL, "http://"), []pubsub.Subscription{sub}, nil, nil, zap.NewNop()), zap.NewNop()))
	t.Cleanup(peer.Close)
	rec := benchRecord("news", "feed")
	rec.Delivery = "broadcast"
	dir := t.TempDir()
	st, err := store.Open(dir, store.Options{NoSync: true})
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	// The message is pending for an instance that is not live any more.
	res, _ := st.Append([]store.Entry{{Topic: "news", Body: must((&pubsub.Message{ID: "x", Topic: "news"}).Marshal())}})
	if _, err := st.Apply([]store.Update{{Seq: res[0].Seq, Group: "feed", Done: true}, {Seq: res[0].Seq, Group: "feed@old-instance"}}, nil); err != nil {
		t.Fatal(err)
	}
	static, _ := discovery.NewStatic(map[string][]string{ServiceName("feed"): {strings.TrimPrefix(peer.URL, "http://")}})
	cache := discovery.NewCache(static, discovery.CacheOptions{}, zap.NewNop())
	t.Cleanup(cache.Close)
	d := NewDispatcher(st, newFakeKV(rec), cache, DispatcherOptions{GoneAfter: 100 * time.Millisecond}, zap.NewNop())
	if err := d.Load(); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); d.Run(ctx) }()
	defer func() { cancel(); <-done }()
	waitFor(t, 10*time.Second, "the outbox to empty", func() bool { return st.Pending() == 0 })
}

func must[T any](v T, err error) T {
	if err != nil {
		panic(err)
	}
	return v
}
