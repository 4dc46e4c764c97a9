package balancer

import (
	"math/rand/v2"
	"sync/atomic"
	"time"

	"github.com/sidecarlb/sidecar/discovery"
)

// LeastRequest picks the less loaded of two distinct endpoints drawn at
// random ("power of two choices"), where load is the number of requests in
// flight through this balancer. It is the balancer configured as
// "least_request". Weights are not used yet.
//
// Sampling two rather than scanning for the global minimum keeps Pick O(1)
// and avoids the herd that every proxy sending to the same idle endpoint
// would cause.
type LeastRequest struct {
	// now is the clock for latency-aware variants; unused for now.
	now   func() time.Time
	state atomic.Pointer[leastRequestState]
}

// leastRequestState is an immutable snapshot built by Update; the counters it
// points to are shared with the snapshots before and after it.
type leastRequestState struct {
	eps []discovery.Endpoint
	// nodes[i] is the load state of eps[i].
	nodes []*lrNode
}

// lrNode is the per-endpoint load state. It outlives the snapshots: Update
// hands it on to the next snapshot while its endpoint stays, and a Done that
// arrives after its endpoint left updates a node nobody reads any more.
// Latency tracking (peak EWMA) and slow start belong here.
type lrNode struct {
	inflight atomic.Int64
	// done is n.release, bound once so that Pick hands it out without
	// allocating a closure per request.
	done func(Result)
	// The padding keeps the counters of different nodes on different
	// cache lines, so Picks on different endpoints do not contend.
	_ [64]byte
}

func newLRNode() *lrNode {
	n := &lrNode{}
	n.done = n.release
	return n
}

// release ends one request started by Pick.
func (n *lrNode) release(Result) {
	n.inflight.Add(-1)
}

// NewLeastRequest returns a LeastRequest balancer with no endpoints.
func NewLeastRequest(opts Options) *LeastRequest {
	lr := &LeastRequest{now: opts.now()}
	lr.state.Store(&leastRequestState{})
	return lr
}

// Update replaces the endpoint set. Endpoints that stay, by ID, keep their
// in-flight counts.
func (lr *LeastRequest) Update(endpoints []discovery.Endpoint) {
	old := lr.state.Load()
	prev := make(map[string]*lrNode, len(old.eps))
	for i := range old.eps {
		prev[old.eps[i].ID] = old.nodes[i]
	}
	st := &leastRequestState{
		eps:   endpoints,
		nodes: make([]*lrNode, len(endpoints)),
	}
	for i := range endpoints {
		n, ok := prev[endpoints[i].ID]
		if !ok {
			n = newLRNode()
		}
		st.nodes[i] = n
	}
	lr.state.Store(st)
}

// Pick chooses the endpoint with fewer requests in flight out of two distinct
// random ones not in req.Exclude (while any such remain) and counts the
// request against it until Pick.Done is called, which the caller must do
// exactly once. It is safe for concurrent use and does not block.
func (lr *LeastRequest) Pick(req *Request) (Pick, error) {
	st := lr.state.Load()
	n := len(st.eps)
	if n == 0 {
		return Pick{}, ErrNoEndpoints
	}
	var ex []string
	if req != nil {
		ex = req.Exclude
	}
	i := 0
	if n > 1 {
		a := rand.IntN(n)
		b := rand.IntN(n - 1)
		if b >= a {
			b++
		}
		i = st.lessLoaded(a, b, ex)
	}
	node := st.nodes[i]
	node.inflight.Add(1)
	return Pick{Endpoint: &st.eps[i], Done: node.done}, nil
}

// lessLoaded returns whichever of a and b has fewer requests in flight (a on
// ties), after moving each forward past excluded endpoints.
func (st *leastRequestState) lessLoaded(a, b int, ex []string) int {
	if len(ex) > 0 {
		x := nextAllowed(st.eps, a, ex)
		if x < 0 {
			return a
		}
		y := nextAllowed(st.eps, b, ex)
		a, b = x, y
		if a == b {
			return a
		}
	}
	if st.nodes[b].inflight.Load() < st.nodes[a].inflight.Load() {
		return b
	}
	return a
}
