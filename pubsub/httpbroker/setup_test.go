package httpbroker

import (
	"context"
	"encoding/json"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"
	"go.uber.org/zap"

	"github.com/sidecarlb/sidecar/discovery"
	"github.com/sidecarlb/sidecar/internal/h1"
	"github.com/sidecarlb/sidecar/internal/rawio"
	"github.com/sidecarlb/sidecar/pubsub"
	"github.com/sidecarlb/sidecar/pubsub/store"
)

// fakeKV serves a fixed set of records: the first List answers at once,
// later ones block until the query's context ends.
type fakeKV struct {
	mu    sync.Mutex
	pairs api.KVPairs
	index uint64
	puts  []string
}

func newFakeKV(recs ...Record) *fakeKV {
	kv := &fakeKV{index: 1}
	for _, r := range recs {
		r.sanitize()
		b, _ := json.Marshal(r)
		kv.pairs = append(kv.pairs, &api.KVPair{Key: r.key(), Value: b})
	}
	return kv
}

func (f *fakeKV) List(prefix string, q *api.QueryOptions) (api.KVPairs, *api.QueryMeta, error) {
	f.mu.Lock()
	pairs, index := f.pairs, f.index
	f.mu.Unlock()
	if q.WaitIndex >= index {
		<-q.Context().Done()
		return nil, nil, q.Context().Err()
	}
	return pairs, &api.QueryMeta{LastIndex: index}, nil
}

func (f *fakeKV) Put(p *api.KVPair, q *api.WriteOptions) (*api.WriteMeta, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.puts = append(f.puts, p.Key)
	return &api.WriteMeta{}, nil
}

// rig is a publisher and one subscriber in one process: a store and a
// dispatcher, a peer Server delivering to app, reached through a static
// discovery cache.
type rig struct {
	store *store.Store
	disp  *Dispatcher
	api   *engineServer // the publish API
	peer  *engineServer
	cache *discovery.Cache
	ctx   context.Context
	stop  context.CancelFunc
	done  chan struct{}
}

func benchRecord(topic, group string) Record {
	return Record{Topic: topic, Group: group, Service: ServiceName(group), MaxInFlight: 64, Timeout: 5 * time.Second,
		MaxAttempts: 5, Backoff: 10 * time.Millisecond, MaxBackoff: 50 * time.Millisecond}
}

// newRig starts a rig whose app is handler, over the store in dir.
func newRig(tb testing.TB, dir string, handler http.Handler, noSync bool) *rig {
	return newRigPeer(tb, dir, handler, noSync, true)
}

// newRigPeer is newRig, with the group's only instance unreachable unless
// reachable: messages then stay in the outbox.
func newRigPeer(tb testing.TB, dir string, handler http.Handler, noSync, reachable bool) *rig {
	return newRigSub(tb, dir, handler, noSync, reachable, 64, 5*time.Second)
}

// newRigSub is newRigPeer with the subscription's max_in_flight and
// timeout.
func newRigSub(tb testing.TB, dir string, handler http.Handler, noSync, reachable bool, maxInFlight int, timeout time.Duration, mods ...func(*Record)) *rig {
	tb.Helper()
	app := httptest.NewServer(handler)
	tb.Cleanup(app.Close)
	st, err := store.Open(dir, store.Options{NoSync: noSync})
	if err != nil {
		tb.Fatal(err)
	}
	sub := pubsub.Subscription{Topic: "orders", Group: "billing", Route: "/orders", ContentMode: "structured", MaxInFlight: maxInFlight, Timeout: timeout}
	pa := pubsub.NewApp(strings.TrimPrefix(app.URL, "http://"), []pubsub.Subscription{sub}, nil, nil, zap.NewNop())
	peer := newEngineServer(tb, NewServer(pa, zap.NewNop()))
	peerAddr := strings.TrimPrefix(peer.URL, "http://")
	if !reachable {
		peerAddr = "127.0.0.1:1"
	}
	static, err := discovery.NewStatic(map[string][]string{ServiceName("billing"): {peerAddr}})
	if err != nil {
		tb.Fatal(err)
	}
	cache := discovery.NewCache(static, discovery.CacheOptions{}, zap.NewNop())
	rec := benchRecord("orders", "billing")
	rec.MaxInFlight, rec.Timeout = maxInFlight, timeout
	for _, mod := range mods {
		mod(&rec)
	}
	d := NewDispatcher(st, newFakeKV(rec), cache, DispatcherOptions{}, zap.NewNop())
	if err := d.Load(); err != nil {
		tb.Fatal(err)
	}
	r := &rig{store: st, disp: d, peer: peer, cache: cache, done: make(chan struct{})}
	r.api = newEngineServer(tb, pubsub.NewAPI(d, pubsub.APIOptions{Name: "pubsub", MaxBytes: 1 << 20}, zap.NewNop()))
	r.ctx, r.stop = context.WithCancel(context.Background())
	go func() { defer close(r.done); d.Run(r.ctx) }()
	<-d.Registry().Synced()
	tb.Cleanup(r.close)
	return r
}

func (r *rig) close() {
	r.api.Close()
	r.stop()
	<-r.done
	r.peer.Close()
	r.cache.Close()
	_ = r.store.Close()
}

// engineServer serves a handler on loopback through the sidecar's own
// HTTP/1.1 engine (internal/h1), as the sidecar serves pubsub.listen and
// pubsub.http.listen (cmd/sidecar's bind), so that benchmarks measure the
// server the sidecar runs rather than net/http's.
type engineServer struct {
	URL    string
	ln     net.Listener
	srv    *h1.Server
	cancel context.CancelFunc
	conns  sync.WaitGroup
	served chan struct{}
	once   sync.Once
}

func newEngineServer(tb testing.TB, h http.Handler) *engineServer {
	tb.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		tb.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	s := &engineServer{URL: "http://" + ln.Addr().String(), ln: ln, cancel: cancel, served: make(chan struct{}),
		srv: h1.NewServer(ctx, h, h1.Options{ReadHeaderTimeout: 10 * time.Second, IdleTimeout: time.Minute}, zap.NewNop())}
	go func() {
		defer close(s.served)
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			s.conns.Go(func() { s.srv.ServeConn(rawio.Wrap(c), nil) })
		}
	}()
	tb.Cleanup(s.Close)
	return s
}

// Close stops accepting, closes every connection and waits for their
// goroutines. It may be called more than once.
func (s *engineServer) Close() {
	s.once.Do(func() {
		s.ln.Close()
		<-s.served
		s.srv.Close()
		s.conns.Wait()
		s.cancel()
	})
}

func waitFor(tb testing.TB, within time.Duration, what string, cond func() bool) {
	tb.Helper()
	deadline := time.Now().Add(within)
	for !cond() {
		if time.Now().After(deadline) {
			tb.Fatalf("timed out after %v waiting for %s", within, what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

type publication struct {
	topic string
	body  []byte
}

// append stores messages straight into the outbox.
func (r *rig) append(pubs []publication) error {
	ps := make([]pubsub.Publication, len(pubs))
	for i, p := range pubs {
		ps[i] = pubsub.Publication{Msg: &pubsub.Message{ID: pubsub.NewID(), Source: "bench", Type: pubsub.DefaultType, Time: time.Now(), DataContentType: "application/octet-stream", Topic: p.topic, PubsubName: "pubsub", Data: p.body}}
	}
	_, err := r.disp.Publish(ps)
	return err
}
