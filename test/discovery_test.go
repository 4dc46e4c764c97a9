package test

import (
	"context"
	"fmt"
	"runtime"
	"slices"
	"sort"
	"sync"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"
	"go.uber.org/zap"
	"go.uber.org/zap/zaptest"

	"github.com/sidecarlb/sidecar/discovery"
	"github.com/sidecarlb/sidecar/test/consulagent"
)

// discHealth wraps a discovery.HealthClient to count the queries per
// service, and how many ran at once.
type discHealth struct {
	h discovery.HealthClient

	mu       sync.Mutex
	calls    map[string]int
	inflight map[string]int
	peak     map[string]int
}

func newDiscHealth(h discovery.HealthClient) *discHealth {
	return &discHealth{h: h, calls: map[string]int{}, inflight: map[string]int{}, peak: map[string]int{}}
}

func (d *discHealth) Service(service, tag string, passingOnly bool, q *api.QueryOptions) ([]*api.ServiceEntry, *api.QueryMeta, error) {
	d.mu.Lock()
	d.calls[service]++
	d.inflight[service]++
	d.peak[service] = max(d.peak[service], d.inflight[service])
	d.mu.Unlock()
	defer func() {
		d.mu.Lock()
		d.inflight[service]--
		d.mu.Unlock()
	}()
	return d.h.Service(service, tag, passingOnly, q)
}

func (d *discHealth) State(state string, q *api.QueryOptions) (api.HealthChecks, *api.QueryMeta, error) {
	return d.h.State(state, q)
}

// maxPeak returns the most queries one service had in flight at once.
func (d *discHealth) maxPeak() int {
	d.mu.Lock()
	defer d.mu.Unlock()
	n := 0
	for _, p := range d.peak {
		n = max(n, p)
	}
	return n
}

func (d *discHealth) callCount(service string) int {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.calls[service]
}

// discSetup returns a discovery cache over the agent, its health counter and
// an API client.
func discSetup(t *testing.T, a *consulagent.Agent, opts discovery.ConsulOptions, cacheOpts discovery.CacheOptions, log *zap.Logger) (*discovery.Cache, *discHealth, *api.Client) {
	t.Helper()
	client := a.Client()
	health := newDiscHealth(client.Health())
	b := discovery.NewConsul(health, client.Catalog(), opts, log)
	c := discovery.NewCache(b, cacheOpts, log)
	t.Cleanup(c.Close)
	return c, health, client
}

func discIDs(s *discovery.Snapshot) []string {
	out := []string{}
	for _, e := range s.Endpoints {
		out = append(out, e.ID)
	}
	return out
}

// discWaitIDs waits until w's snapshot holds exactly want, fresh.
func discWaitIDs(t *testing.T, w *discovery.Watch, want ...string) {
	t.Helper()
	consulagent.WaitFor(t, 5*time.Second, fmt.Sprintf("endpoints %v", want), func() bool {
		s := w.Snapshot()
		return !s.Stale && slices.Equal(discIDs(s), want)
	})
}

func discRegister(t *testing.T, client *api.Client, id string, port int, ttl bool) {
	t.Helper()
	reg := &api.AgentServiceRegistration{
		ID: id, Name: "web", Address: "127.0.0.1", Port: port,
		Tags: []string{"v1"}, Meta: map[string]string{"id": id},
		Weights: &api.AgentWeights{Passing: 3, Warning: 1},
	}
	if ttl {
		reg.Check = &api.AgentServiceCheck{TTL: "10m", Status: api.HealthPassing}
	}
	if err := client.Agent().ServiceRegister(reg); err != nil {
		t.Fatalf("register %s: %v", id, err)
	}
}

func TestDiscoveryConsulFollowsHealth(t *testing.T) {
	a := consulagent.Start(t, consulagent.Options{})
	c, _, client := discSetup(t, a, discovery.ConsulOptions{}, discovery.CacheOptions{}, zaptest.NewLogger(t))
	ctx := context.Background()

	discRegister(t, client, "web-1", 9001, true)
	discRegister(t, client, "web-2", 9002, true)
	w, err := c.Watch(ctx, "web")
	if err != nil {
		t.Fatalf("Watch(web) error = %v", err)
	}
	discWaitIDs(t, w, "web-1", "web-2")
	e := w.Snapshot().Endpoints[0]
	if e.Addr != "127.0.0.1:9001" || e.Weight != 3 || !slices.Equal(e.Tags, []string{"v1"}) || e.Meta["id"] != "web-1" {
		t.Errorf("endpoint = %+v", e)
	}

	steps := []struct {
		status string
		want   []string
	}{
		{api.HealthWarning, []string{"web-1"}}, // warning is not passing
		{api.HealthCritical, []string{"web-1"}},
		{api.HealthPassing, []string{"web-1", "web-2"}},
	}
	for _, st := range steps {
		if err := client.Agent().UpdateTTL("service:web-2", "", st.status); err != nil {
			t.Fatalf("UpdateTTL(%s) error = %v", st.status, err)
		}
		discWaitIDs(t, w, st.want...)
	}

	if err := client.Agent().ServiceDeregister("web-1"); err != nil {
		t.Fatal(err)
	}
	discWaitIDs(t, w, "web-2")
	if err := client.Agent().ServiceDeregister("web-2"); err != nil {
		t.Fatal(err)
	}
	discWaitIDs(t, w)
}

func TestDiscoveryConsulPropagation(t *testing.T) {
	a := consulagent.Start(t, consulagent.Options{})
	c, health, client := discSetup(t, a, discovery.ConsulOptions{}, discovery.CacheOptions{}, zaptest.NewLogger(t))
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()

	discRegister(t, client, "web-0", 9000, false)
	w, err := c.Watch(ctx, "web")
	if err != nil {
		t.Fatal(err)
	}
	discWaitIDs(t, w, "web-0")

	const changes = 20
	lat := make([]time.Duration, 0, changes)
	register := func(i int) time.Duration {
		id := fmt.Sprintf("web-%d", i)
		start := time.Now()
		discRegister(t, client, id, 9000+i, false)
		deadline := start.Add(5 * time.Second) // a sanity limit, not a speed claim
		for !slices.Contains(discIDs(w.Snapshot()), id) {
			if time.Now().After(deadline) {
				t.Fatalf("registration %d not seen after 5s", i)
			}
			time.Sleep(100 * time.Microsecond)
		}
		return time.Since(start)
	}
	for i := 1; i <= changes; i++ {
		lat = append(lat, register(i))
	}
	slices.Sort(lat)
	t.Logf("registration → snapshot over %d changes (register call included): min %v, median %v, max %v",
		changes, lat[0], lat[len(lat)/2], lat[len(lat)-1])

	// Request-path callers hammer the cache while the set changes: still
	// one query per change.
	calls := health.callCount("web")
	var wg sync.WaitGroup
	for range 32 {
		wg.Go(func() {
			for ctx.Err() == nil {
				if _, err := c.Watch(ctx, "web"); err != nil && ctx.Err() == nil {
					t.Errorf("Watch(web) error = %v", err)
					return
				}
				time.Sleep(10 * time.Microsecond)
			}
		})
	}
	for i := changes + 1; i <= changes+10; i++ {
		register(i)
	}
	cancel()
	wg.Wait()
	t.Logf("health queries for web during 10 changes with 32 callers: %d; most in flight at once: %d",
		health.callCount("web")-calls, health.maxPeak())
	if p := health.maxPeak(); p != 1 {
		t.Errorf("%d health queries for one service in flight at once, want 1", p)
	}
}

func TestDiscoveryConsulOutage(t *testing.T) {
	a := consulagent.Start(t, consulagent.Options{})
	c, _, client := discSetup(t, a, discovery.ConsulOptions{BackoffMax: 500 * time.Millisecond}, discovery.CacheOptions{}, zaptest.NewLogger(t))
	ctx := context.Background()

	discRegister(t, client, "web-1", 9001, false)
	consulagent.WaitFor(t, 5*time.Second, "web known", func() bool { ok, _ := c.Known(ctx, "web"); return ok })
	w, err := c.Watch(ctx, "web")
	if err != nil {
		t.Fatal(err)
	}
	discWaitIDs(t, w, "web-1")
	fresh := w.Snapshot()

	a.Stop()
	consulagent.WaitFor(t, 5*time.Second, "a stale snapshot", func() bool { return w.Snapshot().Stale })
	s := w.Snapshot()
	if !slices.Equal(discIDs(s), []string{"web-1"}) || s.Err == nil || s.Endpoints[0].Addr != fresh.Endpoints[0].Addr {
		t.Fatalf("Snapshot() with the agent down = %+v, want web-1, stale, with an error", s)
	}
	t.Logf("while down: %v", s.Err)
	time.Sleep(300 * time.Millisecond)
	if w2, err := c.Watch(ctx, "web"); err != nil || w2 != w {
		t.Errorf("Watch(web) while down = %p, %v; want the same watch", w2, err)
	}
	if ok, err := c.Known(ctx, "web"); !ok || err != nil {
		t.Errorf("Known(web) while down = %v, %v; want the last list", ok, err)
	}
	st := c.Snapshots()
	if len(st) != 1 || !st[0].Stale || st[0].AgeSeconds < 0.3 || st[0].Error == "" {
		t.Errorf("Snapshots() while down = %+v, want web stale for 300ms or more, with an error", st)
	}

	restarted := time.Now()
	a.Start() // a dev agent comes back empty
	consulagent.WaitFor(t, 5*time.Second, "an answer from the restarted agent", func() bool {
		return w.Confirmed().After(restarted)
	})
	s = w.Snapshot()
	// The agent came back empty: the last set keeps serving, stale, and the
	// name stays known.
	if !s.Stale || s.Err != nil || !slices.Equal(discIDs(s), []string{"web-1"}) {
		t.Errorf("Snapshot() after restart = %+v, want web-1 stale without error", s)
	}
	if ok, err := c.Known(ctx, "web"); !ok || err != nil {
		t.Errorf("Known(web) after restart = %v, %v; want true", ok, err)
	}

	discRegister(t, client, "web-1", 9001, false)
	discWaitIDs(t, w, "web-1")
	consulagent.WaitFor(t, 5*time.Second, "web known again", func() bool { ok, _ := c.Known(ctx, "web"); return ok })
	discRegister(t, client, "web-2", 9002, false)
	discWaitIDs(t, w, "web-1", "web-2")
}

func TestDiscoveryConsulKnown(t *testing.T) {
	a := consulagent.Start(t, consulagent.Options{})
	c, _, client := discSetup(t, a, discovery.ConsulOptions{}, discovery.CacheOptions{}, zaptest.NewLogger(t))
	ctx := context.Background()
	discRegister(t, client, "web-1", 9001, false)
	consulagent.WaitFor(t, 5*time.Second, "web known", func() bool { ok, _ := c.Known(ctx, "web"); return ok })
	for _, tc := range []struct {
		service string
		want    bool
	}{{"web", true}, {"consul", true}, {"nope", false}, {"", false}} {
		if ok, err := c.Known(ctx, tc.service); ok != tc.want || err != nil {
			t.Errorf("Known(%q) = %v, %v; want %v", tc.service, ok, err, tc.want)
		}
	}

	if err := client.Agent().ServiceRegister(&api.AgentServiceRegistration{ID: "late-1", Name: "late", Port: 1}); err != nil {
		t.Fatal(err)
	}
	consulagent.WaitFor(t, 5*time.Second, "late known", func() bool { ok, _ := c.Known(ctx, "late"); return ok })
	if err := client.Agent().ServiceDeregister("late-1"); err != nil {
		t.Fatal(err)
	}
	consulagent.WaitFor(t, 5*time.Second, "late unknown", func() bool { ok, _ := c.Known(ctx, "late"); return !ok })
}

// TestDiscoveryConsulHeap watches 1,000 services of 10 nodes each and
// reports the heap it takes.
func TestDiscoveryConsulHeap(t *testing.T) {
	if testing.Short() {
		t.Skip("registers 10,000 instances")
	}
	const services, nodes = 1000, 10
	a := consulagent.Start(t, consulagent.Options{})
	client := a.Client()

	// Registered through the transaction API, 64 operations at a time: the
	// catalog endpoint takes one raft write per instance.
	start := time.Now()
	var ops api.TxnOps
	flush := func() {
		ok, resp, _, err := client.Txn().Txn(ops, nil)
		if err != nil || !ok {
			t.Fatalf("register: %v %+v", err, resp)
		}
		ops = ops[:0]
	}
	for n := range nodes {
		ops = append(ops, &api.TxnOp{Node: &api.NodeTxnOp{Verb: api.NodeSet, Node: api.Node{
			Node: fmt.Sprintf("node-%02d", n), Address: fmt.Sprintf("10.1.0.%d", n+1)}}})
	}
	flush()
	for j := range services * nodes {
		s, n := j/nodes, j%nodes
		ops = append(ops, &api.TxnOp{Service: &api.ServiceTxnOp{Verb: api.ServiceSet, Node: fmt.Sprintf("node-%02d", n),
			Service: api.AgentService{
				ID: fmt.Sprintf("svc-%04d-%02d", s, n), Service: fmt.Sprintf("svc-%04d", s),
				Port: 8000 + s, Tags: []string{"v1"}, Meta: map[string]string{"n": fmt.Sprint(n)},
			}}})
		if len(ops) == 64 {
			flush()
		}
	}
	if len(ops) > 0 {
		flush()
	}
	t.Logf("registered %d instances in %v", services*nodes, time.Since(start))

	var before, after runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&before)
	goroutines := runtime.NumGoroutine()

	// The first lookups race 1,000 new connections to the agent; the
	// timeout is for heap, not speed.
	c, health, _ := discSetup(t, a, discovery.ConsulOptions{},
		discovery.CacheOptions{Size: 2 * services, ResolveTimeout: time.Minute}, zap.NewNop())
	ctx := context.Background()
	start = time.Now()
	names := make(chan string)
	var wg sync.WaitGroup
	for range 64 {
		wg.Go(func() {
			for name := range names {
				w, err := c.Watch(ctx, name)
				if err != nil {
					t.Errorf("Watch(%s) error = %v", name, err)
					continue
				}
				if n := len(w.Snapshot().Endpoints); n != nodes {
					t.Errorf("Watch(%s) has %d endpoints, want %d", name, n, nodes)
				}
			}
		})
	}
	for s := range services {
		names <- fmt.Sprintf("svc-%04d", s)
	}
	close(names)
	wg.Wait()
	t.Logf("first lookup of %d services in %v", services, time.Since(start))
	// Let every watch park its blocking query.
	time.Sleep(time.Second)

	runtime.GC()
	runtime.ReadMemStats(&after)
	st := c.Snapshots()
	if len(st) != services {
		t.Errorf("Snapshots() lists %d services, want %d", len(st), services)
	}
	sort.Slice(st, func(i, j int) bool { return st[i].Endpoints < st[j].Endpoints })
	if st[0].Endpoints != nodes {
		t.Errorf("a service has %d endpoints, want %d", st[0].Endpoints, nodes)
	}
	heap := int64(after.HeapInuse) - int64(before.HeapInuse)
	stack := int64(after.StackInuse) - int64(before.StackInuse)
	t.Logf("%d services × %d nodes watched: HeapInuse +%.1f MiB (%.1f KiB per service), StackInuse +%.1f MiB, goroutines +%d; "+
		"includes the API client's HTTP connections (at most discovery.max_connections)",
		services, nodes, float64(heap)/(1<<20), float64(heap)/services/1024, float64(stack)/(1<<20),
		runtime.NumGoroutine()-goroutines)
	t.Logf("most health queries in flight for one service: %d", health.maxPeak())
	if p := health.maxPeak(); p != 1 {
		t.Errorf("%d health queries for one service in flight at once, want 1", p)
	}
}
