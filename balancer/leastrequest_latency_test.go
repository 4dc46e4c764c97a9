package balancer

import (
	"errors"
	"testing"
	"time"
)

// fakeClock is a clock tests move by hand.
type fakeClock struct{ t time.Time }

func (c *fakeClock) now() time.Time          { return c.t }
func (c *fakeClock) advance(d time.Duration) { c.t = c.t.Add(d) }

// serve runs n sequential requests through lr, each answered by answer for
// the endpoint picked, with the clock moving by the latency, and returns the
// picks per endpoint ID.
func serve(lr *LeastRequest, clock *fakeClock, n int, answer func(id string) (time.Duration, error)) map[string]int {
	got := map[string]int{}
	for i := 0; i < n; i++ {
		pk, err := lr.Pick(Request{})
		if err != nil {
			panic(err)
		}
		id := pk.Endpoint.ID
		got[id]++
		lat, err := answer(id)
		clock.advance(lat)
		pk.Done(Result{Latency: lat, Err: err})
	}
	return got
}

func TestLeastRequestAvoidsSlowNode(t *testing.T) {
	clock := &fakeClock{t: time.Unix(1000, 0)}
	lr := NewLeastRequest(Options{Now: clock.now})
	eps := testEndpoints(3)
	lr.Update(eps)
	slow := eps[2].ID
	got := serve(lr, clock, 3000, func(id string) (time.Duration, error) {
		if id == slow {
			return 50 * time.Millisecond, nil
		}
		return time.Millisecond, nil
	})
	if share := float64(got[slow]) / 3000; share > 0.15 {
		t.Errorf("slow node share = %.3f (%v), want <= 0.15", share, got)
	}
}

func TestLeastRequestAvoidsFastFailingNode(t *testing.T) {
	clock := &fakeClock{t: time.Unix(1000, 0)}
	lr := NewLeastRequest(Options{Now: clock.now})
	eps := testEndpoints(3)
	lr.Update(eps)
	bad := eps[0].ID
	got := serve(lr, clock, 3000, func(id string) (time.Duration, error) {
		if id == bad {
			return 100 * time.Microsecond, errors.New("503")
		}
		return 2 * time.Millisecond, nil
	})
	if share := float64(got[bad]) / 3000; share > 0.05 {
		t.Errorf("failing node share = %.3f (%v), want <= 0.05", share, got)
	}
}

func TestLeastRequestRecoveredNodeWinsTrafficBack(t *testing.T) {
	clock := &fakeClock{t: time.Unix(1000, 0)}
	lr := NewLeastRequest(Options{Now: clock.now, DecayTime: time.Second})
	eps := testEndpoints(2)
	lr.Update(eps)
	slowNow := true
	answer := func(id string) (time.Duration, error) {
		if id == eps[1].ID && slowNow {
			return 100 * time.Millisecond, nil
		}
		return time.Millisecond, nil
	}
	serve(lr, clock, 500, answer)
	slowNow = false
	clock.advance(5 * time.Second)
	got := serve(lr, clock, 2000, answer)
	if got[eps[1].ID] < 600 {
		t.Errorf("recovered node got %d of 2000, want >= 600 (%v)", got[eps[1].ID], got)
	}
}

func TestLeastRequestSlowStart(t *testing.T) {
	clock := &fakeClock{t: time.Unix(1000, 0)}
	lr := NewLeastRequest(Options{Now: clock.now, SlowStart: 10 * time.Second})
	eps := testEndpoints(3)
	lr.Update(eps[:2])
	fast := func(string) (time.Duration, error) { return time.Millisecond, nil }
	serve(lr, clock, 200, fast)
	lr.Update(eps)
	newID := eps[2].ID
	// Right after joining the new node is far from its fair third.
	early := serve(lr, clock, 300, fast)
	if early[newID] > 60 {
		t.Errorf("new node got %d of 300 right after joining, want <= 60 (%v)", early[newID], early)
	}
	clock.advance(10 * time.Second)
	late := serve(lr, clock, 3000, fast)
	if late[newID] < 800 {
		t.Errorf("new node got %d of 3000 after slow start, want >= 800 (%v)", late[newID], late)
	}
}

func TestLeastRequestNotSentTakesNoSample(t *testing.T) {
	clock := &fakeClock{t: time.Unix(1000, 0)}
	lr := NewLeastRequest(Options{Now: clock.now})
	lr.Update(testEndpoints(1))
	pk, _ := lr.Pick(Request{})
	pk.Done(Result{})
	n := lr.state.Load().nodes[0]
	if got := n.inflight.Load(); got != 0 {
		t.Errorf("inflight = %d, want 0", got)
	}
	if got := n.ewma.Load(); got != 0 {
		t.Errorf("ewma bits = %d, want 0 (no sample for a request never sent)", got)
	}
}
