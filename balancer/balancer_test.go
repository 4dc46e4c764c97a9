package balancer

import (
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync"
	"testing"

	"github.com/sidecarlb/sidecar/discovery"
)

// testEndpoints returns n endpoints of weight 1, sorted by ID like a
// discovery.Snapshot.
func testEndpoints(n int) []discovery.Endpoint {
	return weightedEndpoints(slices.Repeat([]int{1}, n)...)
}

// weightedEndpoints returns one endpoint per weight, sorted by ID.
func weightedEndpoints(weights ...int) []discovery.Endpoint {
	eps := make([]discovery.Endpoint, len(weights))
	for i, w := range weights {
		eps[i] = discovery.NewEndpoint(fmt.Sprintf("node-%05d", i),
			fmt.Sprintf("10.0.%d.%d", i/256, i%256), 8080, nil, nil, w)
	}
	return eps
}

// without returns a copy of eps lacking the endpoint with the given ID.
func without(eps []discovery.Endpoint, id string) []discovery.Endpoint {
	return slices.DeleteFunc(slices.Clone(eps), func(e discovery.Endpoint) bool { return e.ID == id })
}

// pickID picks once, calls Done and returns the endpoint's ID.
// val is the request r points to, or the zero request for nil.
func val(r *Request) Request {
	if r == nil {
		return Request{}
	}
	return *r
}

func pickID(t testing.TB, b Balancer, r *Request) string {
	t.Helper()
	p, err := b.Pick(val(r))
	if err != nil {
		t.Fatalf("Pick() error = %v, want nil", err)
	}
	if p.Done != nil {
		p.Done(Result{})
	}
	return p.Endpoint.ID
}

func newBalancer(t testing.TB, name string) Balancer {
	t.Helper()
	b, err := New(name, Options{})
	if err != nil {
		t.Fatalf("New(%q) error = %v", name, err)
	}
	return b
}

func TestNew(t *testing.T) {
	want := []string{"hash", "least_request", "random", "round_robin"}
	if got := Names(); !slices.Equal(got, want) {
		t.Errorf("Names() = %v, want %v", got, want)
	}
	for _, name := range want {
		if b, err := New(name, Options{}); err != nil || b == nil {
			t.Errorf("New(%q) = %v, %v, want a balancer", name, b, err)
		}
	}
	_, err := New("fastest", Options{})
	if err == nil || !strings.Contains(err.Error(), `"fastest"`) {
		t.Errorf("New(%q) error = %v, want one naming it", "fastest", err)
	}
}

func TestPickEmpty(t *testing.T) {
	for _, name := range Names() {
		t.Run(name, func(t *testing.T) {
			b := newBalancer(t, name)
			reqs := []*Request{nil, {}, {Key: 7, HasKey: true}, {Exclude: []string{"node-00000"}}}
			for _, eps := range [][]discovery.Endpoint{nil, {}, testEndpoints(3)[:0]} {
				b.Update(eps)
				for _, r := range reqs {
					if p, err := b.Pick(val(r)); !errors.Is(err, ErrNoEndpoints) {
						t.Errorf("Pick(%+v) = %v, %v, want %v", r, p, err, ErrNoEndpoints)
					}
				}
			}
			// Before any Update, too.
			if _, err := newBalancer(t, name).Pick(Request{}); !errors.Is(err, ErrNoEndpoints) {
				t.Errorf("Pick() before Update error = %v, want %v", err, ErrNoEndpoints)
			}
		})
	}
}

func TestPickExclude(t *testing.T) {
	tests := []struct {
		name    string
		eps     []discovery.Endpoint
		exclude []string
		allowed []string // IDs Pick may return
	}{
		{"one excluded", testEndpoints(3), []string{"node-00000"}, []string{"node-00001", "node-00002"}},
		{"all but one", testEndpoints(3), []string{"node-00002", "node-00000"}, []string{"node-00001"}},
		{"weighted, heavy excluded", weightedEndpoints(5, 1, 1), []string{"node-00000"}, []string{"node-00001", "node-00002"}},
		{"unknown IDs", testEndpoints(2), []string{"gone", "node-00001", "other"}, []string{"node-00000"}},
		{"all excluded", testEndpoints(2), []string{"node-00000", "node-00001"}, []string{"node-00000", "node-00001"}},
		{"single", testEndpoints(1), []string{"node-00000"}, []string{"node-00000"}},
	}
	for _, name := range Names() {
		for _, tc := range tests {
			t.Run(name+"/"+tc.name, func(t *testing.T) {
				b := newBalancer(t, name)
				b.Update(tc.eps)
				for i := range 300 {
					r := &Request{Exclude: tc.exclude, Key: uint64(i), HasKey: i%2 == 0}
					if got := pickID(t, b, r); !slices.Contains(tc.allowed, got) {
						t.Fatalf("Pick(%+v) = %v, want one of %v", r, got, tc.allowed)
					}
				}
			})
		}
	}
}

// TestPickConcurrent hammers every balancer with Picks from several
// goroutines while another one keeps replacing the set. Run it with -race.
func TestPickConcurrent(t *testing.T) {
	sets := [][]discovery.Endpoint{
		testEndpoints(3),
		weightedEndpoints(5, 1, 1, 2),
		nil,
		testEndpoints(10),
		{},
		weightedEndpoints(1, 100),
		testEndpoints(1),
	}
	for _, name := range Names() {
		t.Run(name, func(t *testing.T) {
			b := newBalancer(t, name)
			b.Update(sets[0])
			var wg sync.WaitGroup
			stop := make(chan struct{})
			wg.Go(func() {
				for i := 0; ; i++ {
					select {
					case <-stop:
						return
					default:
					}
					b.Update(sets[i%len(sets)])
				}
			})
			var pickers sync.WaitGroup
			for g := range 4 {
				pickers.Go(func() {
					for i := range 3000 {
						r := &Request{Key: uint64(g*10000 + i), HasKey: i%3 != 0}
						if i%5 == 0 {
							r.Exclude = []string{"node-00000"}
						}
						p, err := b.Pick(val(r))
						if err != nil {
							if !errors.Is(err, ErrNoEndpoints) {
								t.Errorf("Pick() error = %v, want nil or %v", err, ErrNoEndpoints)
							}
							continue
						}
						if p.Endpoint == nil {
							t.Errorf("Pick() = %+v, want an endpoint", p)
						}
						if p.Done != nil {
							p.Done(Result{})
						}
					}
				})
			}
			pickers.Wait()
			close(stop)
			wg.Wait()
			if lr, ok := b.(*LeastRequest); ok {
				st := lr.state.Load()
				for i, n := range st.nodes {
					if got := n.inflight.Load(); got != 0 {
						t.Errorf("in flight on %s = %d, want 0", st.eps[i].ID, got)
					}
				}
			}
		})
	}
}
