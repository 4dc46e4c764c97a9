package balancer

import (
	"math"
	"math/rand/v2"
	"sync/atomic"
	"time"

	"github.com/sidecarlb/sidecar/discovery"
)

// failurePenalty is the latency a failed request counts as, so that a node
// answering errors instantly looks slow rather than fast.
const failurePenalty = time.Second

// LeastRequest is the balancer configured as "least_request": power of two
// choices on a latency-aware cost. Of two distinct endpoints drawn at
// random it picks the one with the lower
//
//	cost = peak-EWMA latency × (requests in flight + 1) / slow-start ramp
//
// Peak EWMA (Finagle's and Linkerd's): a sample above the average replaces
// it at once, so a node that turns slow sheds traffic on its first slow
// answer, while samples below it pull the average down with time constant
// DecayTime. Failures count as failurePenalty, so a node that fails fast
// does not attract traffic. An average not refreshed decays towards zero as
// it ages, so a node that was slow gets probed again now and then and can
// win its share back.
//
// An endpoint that joins a running set starts from the set's mean latency
// and its cost is divided by a ramp growing from 0.1 to 1 over SlowStart, so
// a cold node is not flooded.
//
// Sampling two rather than scanning for the global minimum keeps Pick O(1)
// and avoids the herd that every proxy sending to the same idle endpoint
// would cause.
type LeastRequest struct {
	now func() time.Time
	// last is the latest time seen (unix nanoseconds): when a request
	// ended, or Update ran. Pick ages averages by it instead of reading
	// the clock, which costs more than the rest of Pick on some VMs; under
	// load it trails the clock by one request at most.
	last      atomic.Int64
	slowStart time.Duration
	tau       float64 // DecayTime in nanoseconds
	state     atomic.Pointer[leastRequestState]
}

// leastRequestState is an immutable snapshot built by Update; the nodes it
// points to are shared with the snapshots before and after it.
type leastRequestState struct {
	eps []discovery.Endpoint
	// nodes[i] is the load state of eps[i].
	nodes []*lrNode
}

// lrNode is the per-endpoint load state. It outlives the snapshots: Update
// hands it on to the next snapshot while its endpoint stays, and a Done that
// arrives after its endpoint left updates a node nobody reads any more.
type lrNode struct {
	lr       *LeastRequest
	inflight atomic.Int64
	ewma     atomic.Uint64 // float64 bits: latency average in nanoseconds
	stamp    atomic.Int64  // unix nanoseconds of the last sample
	joined   int64         // unix nanoseconds when it joined; 0: no slow start
	// done is n.release, bound once so that Pick hands it out without
	// allocating a closure per request.
	done func(Result)
	// The padding keeps the counters of different nodes on different
	// cache lines, so Picks on different endpoints do not contend.
	_ [64]byte
}

func (lr *LeastRequest) newNode(ewma float64, now int64, slowStart bool) *lrNode {
	n := &lrNode{lr: lr}
	n.done = n.release
	n.ewma.Store(math.Float64bits(ewma))
	n.stamp.Store(now)
	if slowStart {
		n.joined = now
	}
	return n
}

// release ends one request started by Pick and folds its latency into the
// node's average.
func (n *lrNode) release(r Result) {
	n.inflight.Add(-1)
	if r.Latency <= 0 && r.Err == nil {
		return // never sent
	}
	rtt := float64(r.Latency)
	if r.Err != nil {
		rtt = max(rtt, float64(failurePenalty))
	}
	at := r.At
	if at.IsZero() {
		at = n.lr.now()
	}
	now := at.UnixNano()
	n.lr.seen(now)
	last := n.stamp.Swap(now)
	w := math.Exp(-float64(max(now-last, 0)) / n.lr.tau)
	for {
		old := n.ewma.Load()
		// Start from the aged average cost() has been using, so a node
		// that recovers while out of favour is judged on fresh samples.
		avg := math.Float64frombits(old) * w
		next := rtt
		if rtt < avg {
			next = avg*w + rtt*(1-w)
		}
		if n.ewma.CompareAndSwap(old, math.Float64bits(next)) {
			return
		}
	}
}

// cost is the node's load score at now; lower is better.
func (n *lrNode) cost(now int64, slowStart time.Duration, tau float64) float64 {
	avg := math.Float64frombits(n.ewma.Load())
	// Age the average of a node not sampled lately; skip the exp while
	// samples are fresh, which is the common case under load.
	if age := float64(now - n.stamp.Load()); avg > 0 && age > tau/64 {
		avg *= math.Exp(-age / tau)
	}
	// A node with no sample yet still counts its queue.
	c := (avg + 1) * float64(n.inflight.Load()+1)
	if n.joined != 0 && slowStart > 0 {
		if since := time.Duration(now - n.joined); since < slowStart {
			c /= max(float64(since)/float64(slowStart), 0.1)
		}
	}
	return c
}

// seen moves lr.last forward to now.
func (lr *LeastRequest) seen(now int64) {
	for {
		last := lr.last.Load()
		if now <= last || lr.last.CompareAndSwap(last, now) {
			return
		}
	}
}

// NewLeastRequest returns a LeastRequest balancer with no endpoints.
func NewLeastRequest(opts Options) *LeastRequest {
	tau := opts.DecayTime
	if tau <= 0 {
		tau = 10 * time.Second
	}
	lr := &LeastRequest{now: opts.now(), slowStart: opts.SlowStart, tau: float64(tau)}
	lr.state.Store(&leastRequestState{})
	return lr
}

// Update replaces the endpoint set. Endpoints that stay, by ID, keep their
// in-flight counts and latency averages; endpoints that join a non-empty set
// start from its mean latency and ramp up over SlowStart.
func (lr *LeastRequest) Update(endpoints []discovery.Endpoint) {
	old := lr.state.Load()
	prev := make(map[string]*lrNode, len(old.eps))
	var sum float64
	for i := range old.eps {
		prev[old.eps[i].ID] = old.nodes[i]
		sum += math.Float64frombits(old.nodes[i].ewma.Load())
	}
	mean := 0.0
	if len(old.eps) > 0 {
		mean = sum / float64(len(old.eps))
	}
	now := lr.now().UnixNano()
	lr.seen(now)
	st := &leastRequestState{
		eps:   endpoints,
		nodes: make([]*lrNode, len(endpoints)),
	}
	for i := range endpoints {
		n, ok := prev[endpoints[i].ID]
		if !ok {
			n = lr.newNode(mean, now, len(old.eps) > 0)
		}
		st.nodes[i] = n
	}
	lr.state.Store(st)
}

// Pick chooses the cheaper of two distinct random endpoints not in
// req.Exclude (while any such remain) and counts the request against it
// until Pick.Done is called, which the caller must do exactly once. It is
// safe for concurrent use and does not block.
func (lr *LeastRequest) Pick(req Request) (Pick, error) {
	st := lr.state.Load()
	n := len(st.eps)
	if n == 0 {
		return Pick{}, ErrNoEndpoints
	}
	ex := req.Exclude
	i := 0
	if n > 1 {
		a := rand.IntN(n)
		b := rand.IntN(n - 1)
		if b >= a {
			b++
		}
		i = lr.cheaper(st, a, b, ex)
	} else if len(ex) > 0 {
		i = max(nextAllowed(st.eps, 0, ex), 0)
	}
	node := st.nodes[i]
	node.inflight.Add(1)
	return Pick{Endpoint: &st.eps[i], Done: node.done}, nil
}

// cheaper returns whichever of a and b costs less (a on ties), after moving
// each forward past excluded endpoints.
func (lr *LeastRequest) cheaper(st *leastRequestState, a, b int, ex []string) int {
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
	now := lr.last.Load()
	if st.nodes[b].cost(now, lr.slowStart, lr.tau) < st.nodes[a].cost(now, lr.slowStart, lr.tau) {
		return b
	}
	return a
}
