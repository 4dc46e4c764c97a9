package proxy

import (
	"context"
	"net"
	"net/http"
	"slices"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/sidecarlb/sidecar/discovery"
)

// movingBackend serves one service whose set the test changes.
type movingBackend struct {
	mu      sync.Mutex
	snap    *discovery.Snapshot
	changed chan struct{}
}

func newMovingBackend(t testing.TB, addrs ...string) *movingBackend {
	b := &movingBackend{changed: make(chan struct{})}
	b.set(t, addrs...)
	return b
}

func (b *movingBackend) set(t testing.TB, addrs ...string) {
	t.Helper()
	eps := make([]discovery.Endpoint, 0, len(addrs))
	for _, a := range addrs {
		host, port, err := net.SplitHostPort(a)
		if err != nil {
			t.Fatal(err)
		}
		p, _ := strconv.Atoi(port)
		eps = append(eps, discovery.NewEndpoint(a, host, p, nil, nil, 1))
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	b.snap = &discovery.Snapshot{Service: "echo", Endpoints: eps, Updated: time.Now()}
	close(b.changed)
	b.changed = make(chan struct{})
}

func (b *movingBackend) Watch(ctx context.Context, _ string, sink discovery.Sink) {
	for {
		b.mu.Lock()
		snap, changed := b.snap, b.changed
		b.mu.Unlock()
		sink.Publish(snap)
		sink.Confirm(time.Now())
		select {
		case <-changed:
		case <-ctx.Done():
			return
		}
	}
}

func (b *movingBackend) Known(_ context.Context, service string) (bool, error) {
	return service == "echo", nil
}

func (b *movingBackend) Close() {}

// statusAddrs returns the endpoints Status shows for the only route.
func statusAddrs(px *Proxy) []string {
	var out []string
	for _, r := range px.Status() {
		for _, e := range r.Endpoints {
			out = append(out, e.Addr)
		}
	}
	slices.Sort(out)
	return out
}

// endpointSeries returns the endpoints sidecar_upstream_requests_total has
// series for.
func endpointSeries(t *testing.T, reg *prometheus.Registry) []string {
	t.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, mf := range mfs {
		if mf.GetName() != "sidecar_upstream_requests_total" {
			continue
		}
		for _, m := range mf.GetMetric() {
			for _, l := range m.GetLabel() {
				if l.GetName() == "endpoint" && !slices.Contains(out, l.GetValue()) {
					out = append(out, l.GetValue())
				}
			}
		}
	}
	slices.Sort(out)
	return out
}

// waitFor polls cond every 10ms for up to 5s.
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	for range 500 {
		if cond() {
			return
		}
		time.Sleep(10 * time.Millisecond)
	}
	t.Fatalf("timed out waiting for %s", what)
}

// TestFollowDropsLeftNode: with Follow running, a node that leaves the set
// goes from Status and from the per-endpoint series without a request on
// its route; a route with no request yet shows its nodes.
func TestFollowDropsLeftNode(t *testing.T) {
	nodes := startNodes(t, 2)
	a, b := nodes[0].Listener.Addr().String(), nodes[1].Listener.Addr().String()
	backend := newMovingBackend(t, a, b)
	cache := discovery.NewCache(backend, discovery.CacheOptions{}, testLogger(t))
	t.Cleanup(cache.Close)
	cache.Pin("echo")
	reg := prometheus.NewRegistry()
	px := New(cache, NewMetrics(reg), testLogger(t))
	h, err := px.Upstream("upstream", RouteConfig{Service: "echo", Timeouts: sidecarTimeouts()})
	if err != nil {
		t.Fatal(err)
	}
	srv := startProxyServer(t, h)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); px.Follow(ctx, 10*time.Millisecond) }()
	t.Cleanup(func() { cancel(); <-done })

	both := []string{a, b}
	slices.Sort(both)
	waitFor(t, "the nodes of a route with no request yet", func() bool { return slices.Equal(statusAddrs(px), both) })

	c := newClient(t, nil)
	for i := range 4 {
		if r := doGet(t, c, srv.URL+"/", nil); r.status != http.StatusOK {
			t.Fatalf("GET #%d: status %d, want 200", i, r.status)
		}
	}
	if got := endpointSeries(t, reg); !slices.Equal(got, both) {
		t.Fatalf("endpoint series = %v, want %v", got, both)
	}

	backend.set(t, a)
	waitFor(t, "the node that left to go from Status", func() bool { return slices.Equal(statusAddrs(px), []string{a}) })
	if got := endpointSeries(t, reg); !slices.Equal(got, []string{a}) {
		t.Errorf("endpoint series after %s left = %v, want [%s]", b, got, a)
	}
}

// TestFollowStops: Follow returns when its context ends.
func TestFollowStops(t *testing.T) {
	px := New(staticCache(t, map[string][]string{"echo": {"127.0.0.1:1"}}), nil, testLogger(t))
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); px.Follow(ctx, time.Millisecond) }()
	cancel()
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		t.Fatal("Follow did not return after its context ended")
	}
}

// TestFollowLeavesRetiredRoute: a route a reload replaced or closed is not
// rebuilt by Follow, which would make endpoints and series nothing retires.
func TestFollowLeavesRetiredRoute(t *testing.T) {
	nodes := startNodes(t, 2)
	a, b := nodes[0].Listener.Addr().String(), nodes[1].Listener.Addr().String()
	backend := newMovingBackend(t, a)
	cache := discovery.NewCache(backend, discovery.CacheOptions{}, testLogger(t))
	t.Cleanup(cache.Close)
	reg := prometheus.NewRegistry()
	px := New(cache, NewMetrics(reg), testLogger(t))
	h, err := px.Upstream("upstream", RouteConfig{Service: "echo", Timeouts: sidecarTimeouts()})
	if err != nil {
		t.Fatal(err)
	}
	rt := h.route.Load()
	rt.follow(context.Background(), time.Second)
	if got := endpointSeries(t, reg); !slices.Equal(got, []string{a}) {
		t.Fatalf("endpoint series = %v, want [%s]", got, a)
	}
	h.Retire()
	backend.set(t, a, b)
	waitFor(t, "the new set in the cache", func() bool {
		w, err := cache.Watch(context.Background(), "echo")
		return err == nil && len(w.Snapshot().Endpoints) == 2
	})
	rt.follow(context.Background(), time.Second)
	if got := endpointSeries(t, reg); len(got) != 0 {
		t.Errorf("endpoint series after following a retired route = %v, want none", got)
	}
}
