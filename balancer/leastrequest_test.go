package balancer

import (
	"testing"
	"time"
)

// hold picks the endpoint with the given ID n times, by excluding every
// other one, and returns the Done callbacks without calling them.
func hold(t *testing.T, lr *LeastRequest, id string, n int) []func(Result) {
	t.Helper()
	var others []string
	for _, e := range lr.state.Load().eps {
		if e.ID != id {
			others = append(others, e.ID)
		}
	}
	dones := make([]func(Result), n)
	for i := range dones {
		p, err := lr.Pick(Request{Exclude: others})
		if err != nil || p.Endpoint.ID != id {
			t.Fatalf("Pick() = %v, %v, want %s", p.Endpoint, err, id)
		}
		dones[i] = p.Done
	}
	return dones
}

// inflight returns the in-flight count of the endpoint with the given ID, or
// -1 if it is not in the set.
func inflight(lr *LeastRequest, id string) int64 {
	st := lr.state.Load()
	for i, e := range st.eps {
		if e.ID == id {
			return st.nodes[i].inflight.Load()
		}
	}
	return -1
}

func TestLeastRequestPrefersIdle(t *testing.T) {
	tests := []struct {
		name string
		n    int
	}{{"2 endpoints", 2}, {"3 endpoints", 3}, {"10 endpoints", 10}}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			lr := NewLeastRequest(Options{})
			lr.Update(testEndpoints(tc.n))
			busy := "node-00000"
			dones := hold(t, lr, busy, 50)
			// Both candidates are distinct, so the busy endpoint
			// always loses to the idle one it is paired with.
			for range 1000 {
				if got := pickID(t, lr, &Request{}); got == busy {
					t.Fatalf("Pick() = %v, want any endpoint but the one with 50 in flight", got)
				}
			}
			for _, done := range dones {
				done(Result{Latency: time.Millisecond})
			}
			if got := inflight(lr, busy); got != 0 {
				t.Errorf("in flight on %s after Done = %d, want 0", busy, got)
			}
		})
	}
}

func TestLeastRequestSpread(t *testing.T) {
	lr := NewLeastRequest(Options{})
	eps := testEndpoints(3)
	lr.Update(eps)
	// Picks held open spread evenly: each goes to a less loaded endpoint.
	counts := map[string]int{}
	for range 300 {
		p, err := lr.Pick(Request{})
		if err != nil {
			t.Fatalf("Pick() error = %v", err)
		}
		counts[p.Endpoint.ID]++
	}
	for _, e := range eps {
		if got := counts[e.ID]; got < 90 || got > 110 {
			t.Errorf("picks held on %s = %d, want about 100", e.ID, got)
		}
	}
}

func TestLeastRequestClock(t *testing.T) {
	if NewLeastRequest(Options{}).now == nil {
		t.Errorf("clock with zero Options = nil, want time.Now")
	}
	fixed := time.Unix(42, 0)
	if got := NewLeastRequest(Options{Now: func() time.Time { return fixed }}).now(); !got.Equal(fixed) {
		t.Errorf("clock() = %v, want %v", got, fixed)
	}
}

func TestLeastRequestUpdate(t *testing.T) {
	lr := NewLeastRequest(Options{Now: func() time.Time { return time.Unix(0, 0) }})
	eps := testEndpoints(3)
	lr.Update(eps)
	kept := hold(t, lr, "node-00000", 10)
	removed := hold(t, lr, "node-00002", 5)

	// Counters carry over for endpoints that stay.
	lr.Update(append(without(eps, "node-00002"), testEndpoints(4)[3]))
	if got := inflight(lr, "node-00000"); got != 10 {
		t.Errorf("in flight on kept endpoint after Update = %d, want 10", got)
	}
	if got := inflight(lr, "node-00003"); got != 0 {
		t.Errorf("in flight on added endpoint = %d, want 0", got)
	}
	for range 100 {
		if got := pickID(t, lr, &Request{}); got == "node-00000" {
			t.Fatalf("Pick() = %v, want any endpoint but the one with 10 in flight", got)
		}
	}

	// Done for a removed endpoint is harmless, and an endpoint that comes
	// back starts from zero.
	for _, done := range removed {
		done(Result{})
	}
	lr.Update(eps)
	if got := inflight(lr, "node-00002"); got != 0 {
		t.Errorf("in flight on re-added endpoint = %d, want 0", got)
	}
	for _, done := range kept {
		done(Result{})
	}
	for _, e := range eps {
		if got := inflight(lr, e.ID); got != 0 {
			t.Errorf("in flight on %s = %d, want 0", e.ID, got)
		}
	}

	// Emptying the set and refilling it keeps working.
	lr.Update(nil)
	lr.Update(eps)
	if got := pickID(t, lr, nil); got == "" {
		t.Errorf("Pick() after refill = %q, want an endpoint", got)
	}
}
