package discovery

import (
	"context"
	"fmt"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"
)

// fakeConsul is a scripted Consul: one raft-like index for everything, a set
// of passing instances per service, and blocking queries that return when
// the index moves, on poke (like a wait-time expiry), on q.WaitTime, or when
// q.Context() is done. It satisfies HealthClient and CatalogClient.
type fakeConsul struct {
	mu       sync.Mutex
	index    uint64
	services map[string][]inst
	err      error
	wake     chan struct{} // closed and replaced on every change
	pokes    int

	calls       map[string]int // health queries per service; "" counts catalog queries
	answers     map[string]int // successful ones
	inflight    map[string]int
	maxInflight map[string]int
	waits       map[string][]uint64 // WaitIndex of each query
	queries     []api.QueryOptions  // every health query, for its options
	states      []api.QueryOptions  // every state query
	catalogs    []api.QueryOptions  // every catalog query
	passingOnly []bool

	critical map[string]bool // nodes whose own check is critical
	filtered map[string]bool // services whose answers ACLs filter
	denied   map[string]bool // services whose queries ACLs deny
	delay    time.Duration   // how long each health fetch takes
	total    int             // queries of any kind in flight
	maxTotal int
	fetching int // health fetches in flight
	maxFetch int
}

// inst is one scripted instance.
type inst struct {
	id, node, addr, nodeAddr string
	port, weight             int
	tags                     []string
	meta                     map[string]string
	noCheck                  bool // registered without a check of its own
}

func newFakeConsul() *fakeConsul {
	return &fakeConsul{
		services:    make(map[string][]inst),
		wake:        make(chan struct{}),
		calls:       make(map[string]int),
		answers:     make(map[string]int),
		inflight:    make(map[string]int),
		maxInflight: make(map[string]int),
		waits:       make(map[string][]uint64),
		critical:    make(map[string]bool),
		filtered:    make(map[string]bool),
		denied:      make(map[string]bool),
	}
}

// setNode moves the index and sets whether node's own check is critical.
func (f *fakeConsul) setNode(index uint64, node string, critical bool) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.index = index
	f.critical[node] = critical
	f.changed()
}

// peaks returns the most queries of any kind, and the most health fetches,
// in flight at once.
func (f *fakeConsul) peaks() (total, fetches int) {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.maxTotal, f.maxFetch
}

// nodeCheck is node's own check, as the fake reports it.
func (f *fakeConsul) nodeCheck(node string) *api.HealthCheck {
	status := api.HealthPassing
	if f.critical[node] {
		status = api.HealthCritical
	}
	return &api.HealthCheck{Node: node, CheckID: "serfHealth", Status: status}
}

func (f *fakeConsul) changed() {
	close(f.wake)
	f.wake = make(chan struct{})
}

// set moves the index and sets the instances of service.
func (f *fakeConsul) set(index uint64, service string, insts ...inst) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.index = index
	f.services[service] = insts
	f.changed()
}

// setQuiet changes the instances of service without moving the index.
func (f *fakeConsul) setQuiet(service string, insts ...inst) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.services[service] = insts
}

func (f *fakeConsul) setErr(err error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.err = err
	f.changed()
}

// poke makes every parked query return with the current index, as a
// wait-time expiry does.
func (f *fakeConsul) poke() {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.pokes++
	f.changed()
}

func (f *fakeConsul) callCount(service string) int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.calls[service]
}

func (f *fakeConsul) answerCount(service string) int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.answers[service]
}

func (f *fakeConsul) maxInFlight(service string) int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.maxInflight[service]
}

func (f *fakeConsul) waitIndexes(service string) []uint64 {
	f.mu.Lock()
	defer f.mu.Unlock()
	return slices.Clone(f.waits[service])
}

// block waits, with f.mu held on entry and exit, until the query may answer.
func (f *fakeConsul) block(key string, q *api.QueryOptions) (uint64, error) {
	f.calls[key]++
	f.inflight[key]++
	f.maxInflight[key] = max(f.maxInflight[key], f.inflight[key])
	f.waits[key] = append(f.waits[key], q.WaitIndex)
	f.total++
	f.maxTotal = max(f.maxTotal, f.total)
	defer func() { f.inflight[key]--; f.total-- }()
	index, err := f.blockLocked(q)
	if err == nil {
		f.answers[key]++
	}
	return index, err
}

func (f *fakeConsul) blockLocked(q *api.QueryOptions) (uint64, error) {
	var timeout <-chan time.Time
	if q.WaitTime > 0 {
		t := time.NewTimer(q.WaitTime)
		defer t.Stop()
		timeout = t.C
	}
	pokes := f.pokes
	for {
		if f.err != nil {
			return 0, f.err
		}
		if q.WaitIndex == 0 || q.WaitIndex != f.index || f.pokes != pokes {
			return f.index, nil
		}
		wake := f.wake
		f.mu.Unlock()
		select {
		case <-wake:
			f.mu.Lock()
		case <-timeout:
			f.mu.Lock()
			return f.index, nil
		case <-q.Context().Done():
			f.mu.Lock()
			return 0, q.Context().Err()
		}
	}
}

func (f *fakeConsul) Service(service, tag string, passingOnly bool, q *api.QueryOptions) ([]*api.ServiceEntry, *api.QueryMeta, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.fetching++
	f.maxFetch = max(f.maxFetch, f.fetching)
	defer func() { f.fetching-- }()
	if f.delay > 0 {
		f.total++
		f.maxTotal = max(f.maxTotal, f.total)
		f.mu.Unlock()
		time.Sleep(f.delay)
		f.mu.Lock()
		f.total--
	}
	f.queries = append(f.queries, *q)
	f.passingOnly = append(f.passingOnly, passingOnly)
	index, err := f.block(service, q)
	if err != nil {
		return nil, nil, err
	}
	if f.denied[service] {
		return nil, nil, api.StatusError{Code: 403, Body: "Permission denied"}
	}
	if f.filtered[service] {
		return nil, &api.QueryMeta{LastIndex: index, ResultsFilteredByACLs: true}, nil
	}
	// Fresh structs on every answer, as the real client decodes them.
	var out []*api.ServiceEntry
	for _, in := range f.services[service] {
		if passingOnly && f.critical[in.node] {
			continue
		}
		checks := api.HealthChecks{f.nodeCheck(in.node)}
		if !in.noCheck {
			checks = append(checks, &api.HealthCheck{Node: in.node, CheckID: "service:" + in.id, ServiceID: in.id,
				ServiceName: service, Status: api.HealthPassing})
		}
		out = append(out, &api.ServiceEntry{
			Node: &api.Node{Node: in.node, Address: in.nodeAddr},
			Service: &api.AgentService{
				ID: in.id, Service: service, Address: in.addr, Port: in.port,
				Tags: slices.Clone(in.tags), Meta: in.meta,
				Weights: api.AgentWeights{Passing: in.weight, Warning: 1},
			},
			Checks: checks,
		})
	}
	return out, &api.QueryMeta{LastIndex: index}, nil
}

// State answers the health of every instance's check, as
// /v1/health/state/any does: one passing check per instance.
func (f *fakeConsul) State(state string, q *api.QueryOptions) (api.HealthChecks, *api.QueryMeta, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.states = append(f.states, *q)
	index, err := f.block("state", q)
	if err != nil {
		return nil, nil, err
	}
	var out api.HealthChecks
	nodes := map[string]bool{}
	for service, insts := range f.services {
		for _, in := range insts {
			if !nodes[in.node] {
				nodes[in.node] = true
				out = append(out, f.nodeCheck(in.node))
			}
			if in.noCheck {
				continue
			}
			out = append(out, &api.HealthCheck{
				Node: in.node, CheckID: "service:" + in.id, ServiceID: in.id, ServiceName: service,
				Status: api.HealthPassing, ServiceTags: slices.Clone(in.tags),
			})
		}
	}
	return out, &api.QueryMeta{LastIndex: index}, nil
}

func (f *fakeConsul) Services(q *api.QueryOptions) (map[string][]string, *api.QueryMeta, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.catalogs = append(f.catalogs, *q)
	index, err := f.block("", q)
	if err != nil {
		return nil, nil, err
	}
	out := map[string][]string{"consul": nil}
	for name, insts := range f.services {
		for _, in := range insts {
			out[name] = append(out[name], in.tags...)
		}
		if len(insts) > 0 && out[name] == nil {
			out[name] = []string{}
		}
	}
	return out, &api.QueryMeta{LastIndex: index}, nil
}

// node returns an instance named id on its own node, at 10.0.0.n:8080.
func node(id string, n int) inst {
	return inst{id: id, node: fmt.Sprintf("node%d", n), addr: fmt.Sprintf("10.0.0.%d", n), port: 8080, weight: 1}
}

// recorder is a Sink keeping everything it is handed.
type recorder struct {
	mu       sync.Mutex
	snaps    []*Snapshot
	confirms int
	fails    []error
	acls     []error
}

func (r *recorder) ACL(err error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.acls = append(r.acls, err)
}

func (r *recorder) Publish(s *Snapshot) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.snaps = append(r.snaps, s)
}

func (r *recorder) Confirm(time.Time) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.confirms++
}

func (r *recorder) Fail(err error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.fails = append(r.fails, err)
}

func (r *recorder) last() *Snapshot {
	r.mu.Lock()
	defer r.mu.Unlock()
	if len(r.snaps) == 0 {
		return nil
	}
	return r.snaps[len(r.snaps)-1]
}

func (r *recorder) count() (snaps, confirms, fails int) {
	r.mu.Lock()
	defer r.mu.Unlock()
	return len(r.snaps), r.confirms, len(r.fails)
}

// waitUntil polls cond every 2ms for up to 5s.
func waitUntil(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(2 * time.Millisecond)
	}
}

// ids lists the endpoint IDs of s.
func ids(s *Snapshot) []string {
	if s == nil {
		return nil
	}
	out := make([]string, len(s.Endpoints))
	for i, e := range s.Endpoints {
		out[i] = e.ID
	}
	return out
}

// fakeClock is a clock tests move by hand.
type fakeClock struct {
	mu sync.Mutex
	t  time.Time
}

func newFakeClock() *fakeClock { return &fakeClock{t: time.Date(2025, 1, 1, 0, 0, 0, 0, time.UTC)} }

func (c *fakeClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.t
}

func (c *fakeClock) Add(d time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.t = c.t.Add(d)
}

// runWatch runs c.Watch(service) into a recorder until the test ends.
func runWatch(t *testing.T, c *Consul, service string) *recorder {
	t.Helper()
	rec := &recorder{}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		defer close(done)
		c.Watch(ctx, service, rec)
	}()
	t.Cleanup(func() {
		cancel()
		<-done
	})
	return rec
}
