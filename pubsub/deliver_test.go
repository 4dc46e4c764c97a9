package pubsub

import (
	"context"
	"encoding/json"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"go.uber.org/zap"
)

func testSub(mode string) Subscription {
	return Subscription{Topic: "orders", Group: "billing", Route: "/events", ContentMode: mode, MaxInFlight: 4, Timeout: 300 * time.Millisecond}
}

func testMsg() *Message {
	return &Message{ID: "m1", Source: "shop", Type: DefaultType, Time: testNow, DataContentType: "application/json", Topic: "orders", PubsubName: "pubsub", Data: []byte(`{"n":1}`),
		Extensions: map[string]json.RawMessage{}}
}

func appAt(t *testing.T, h http.HandlerFunc, subs ...Subscription) *App {
	t.Helper()
	srv := httptest.NewServer(h)
	t.Cleanup(srv.Close)
	return NewApp(strings.TrimPrefix(srv.URL, "http://"), subs, nil, NewMetrics(nil), zap.NewNop())
}

func TestDeliverOutcomes(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name   string
		status int
		body   string
		hdr    string
		want   Outcome
		after  time.Duration
	}{
		{"empty 200", 200, "", "", Success, 0},
		{"204", 204, "", "", Success, 0},
		{"SUCCESS", 200, `{"status":"SUCCESS"}`, "", Success, 0},
		{"other body", 200, `ok`, "", Success, 0},
		{"RETRY", 200, `{"status":"RETRY"}`, "", Retry, 0},
		{"DROP", 200, `{"status":"DROP"}`, "", Drop, 0},
		{"DEADLETTER", 200, `{"status":"DEADLETTER"}`, "", DeadLetter, 0},
		{"unknown status", 200, `{"status":"MAYBE"}`, "", Retry, 0},
		{"500", 500, "", "", Retry, 0},
		{"503 retry-after", 503, "", "7", Retry, 7 * time.Second},
		{"408", 408, "", "", Retry, 0},
		{"429", 429, "", "2", Retry, 2 * time.Second},
		{"404", 404, "", "", DeadLetter, 0},
		{"400", 400, "", "", DeadLetter, 0},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			a := appAt(t, func(w http.ResponseWriter, r *http.Request) {
				if tc.hdr != "" {
					w.Header().Set("Retry-After", tc.hdr)
				}
				w.WriteHeader(tc.status)
				_, _ = io.WriteString(w, tc.body)
			}, testSub("structured"))
			r := a.Deliver(context.Background(), "billing", testMsg(), 1)
			if r.Outcome != tc.want || r.RetryAfter != tc.after {
				t.Errorf("Deliver() = %+v, want %v with RetryAfter %v", r, tc.want, tc.after)
			}
		})
	}
}

// TestDeliverKeepsConnections: deliveries reuse keep-alive connections,
// never more at once than the subscription's max_in_flight.
func TestDeliverKeepsConnections(t *testing.T) {
	t.Parallel()
	var conns atomic.Int32
	srv := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		_, _ = io.Copy(io.Discard, r.Body)
		time.Sleep(time.Millisecond)
	}))
	srv.Config.ConnState = func(_ net.Conn, s http.ConnState) {
		if s == http.StateNew {
			conns.Add(1)
		}
	}
	srv.Start()
	t.Cleanup(srv.Close)
	sub := testSub("structured") // max_in_flight 4
	a := NewApp(strings.TrimPrefix(srv.URL, "http://"), []Subscription{sub}, nil, nil, zap.NewNop())
	var wg sync.WaitGroup
	for range 16 {
		wg.Go(func() {
			for range 10 {
				if r := a.Deliver(context.Background(), "billing", testMsg(), 1); r.Outcome != Success {
					t.Errorf("Deliver() = %+v, want success", r)
				}
			}
		})
	}
	wg.Wait()
	if n := conns.Load(); n < 1 || n > int32(sub.MaxInFlight) {
		t.Errorf("160 deliveries opened %d connections, want 1 to max_in_flight (%d)", n, sub.MaxInFlight)
	}
}

func TestDeliverTimeoutAndUnreachable(t *testing.T) {
	t.Parallel()
	a := appAt(t, func(w http.ResponseWriter, r *http.Request) {
		_, _ = io.Copy(io.Discard, r.Body) // so the server notices the client leave
		select {
		case <-r.Context().Done():
		case <-time.After(5 * time.Second):
		}
	}, testSub("raw"))
	if r := a.Deliver(context.Background(), "billing", testMsg(), 1); r.Outcome != Retry || !strings.HasPrefix(r.Reason, "timeout after") {
		t.Errorf("Deliver() to a stalled app = %+v, want retry after a timeout", r)
	}
	srv := httptest.NewServer(http.NotFoundHandler())
	addr := strings.TrimPrefix(srv.URL, "http://")
	srv.Close()
	b := NewApp(addr, []Subscription{testSub("raw")}, nil, nil, zap.NewNop())
	if r := b.Deliver(context.Background(), "billing", testMsg(), 1); r.Outcome != NotDelivered {
		t.Errorf("Deliver() to a closed port = %+v, want not_delivered", r)
	}
	if r := b.Deliver(context.Background(), "other", testMsg(), 1); r.Outcome != NotDelivered {
		t.Errorf("Deliver() for an unknown group = %+v, want not_delivered", r)
	}
}

func TestDeliverModes(t *testing.T) {
	t.Parallel()
	type seen struct {
		hdr  http.Header
		body string
	}
	for _, mode := range []string{"structured", "binary", "raw"} {
		t.Run(mode, func(t *testing.T) {
			t.Parallel()
			got := make(chan seen, 1)
			a := appAt(t, func(w http.ResponseWriter, r *http.Request) {
				b, _ := io.ReadAll(r.Body)
				got <- seen{r.Header.Clone(), string(b)}
			}, testSub(mode))
			m := testMsg()
			m.Extensions["deadletterreason"] = json.RawMessage(`"status 404"`)
			if r := a.Deliver(context.Background(), "billing", m, 3); r.Outcome != Success {
				t.Fatalf("Deliver() = %+v", r)
			}
			s := <-got
			if s.hdr.Get("Sidecar-Delivery-Attempt") != "3" {
				t.Errorf("Sidecar-Delivery-Attempt = %q, want 3", s.hdr.Get("Sidecar-Delivery-Attempt"))
			}
			switch mode {
			case "structured":
				if s.hdr.Get("Content-Type") != "application/cloudevents+json" || !strings.Contains(s.body, `"data":{"n":1}`) || !strings.Contains(s.body, `"deadletterreason":"status 404"`) {
					t.Errorf("structured delivery %v %s", s.hdr, s.body)
				}
			case "binary":
				if s.body != `{"n":1}` || s.hdr.Get("Content-Type") != "application/json" || s.hdr.Get("ce-id") != "m1" || s.hdr.Get("ce-source") != "shop" ||
					s.hdr.Get("ce-type") != DefaultType || s.hdr.Get("ce-specversion") != "1.0" || s.hdr.Get("ce-topic") != "orders" || s.hdr.Get("ce-time") == "" ||
					s.hdr.Get("ce-deadletterreason") != "status 404" {
					t.Errorf("binary delivery %v %s", s.hdr, s.body)
				}
			case "raw":
				if s.body != `{"n":1}` || s.hdr.Get("Content-Type") != "application/json" || s.hdr.Get("ce-id") != "m1" || s.hdr.Get("ce-source") != "" {
					t.Errorf("raw delivery %v %s", s.hdr, s.body)
				}
			}
		})
	}
}

// TestMaxInFlight: 20 concurrent deliveries never have more than
// max_in_flight (4) requests at the app at once.
func TestMaxInFlight(t *testing.T) {
	t.Parallel()
	var cur, peak atomic.Int32
	a := appAt(t, func(w http.ResponseWriter, r *http.Request) {
		n := cur.Add(1)
		for {
			p := peak.Load()
			if n <= p || peak.CompareAndSwap(p, n) {
				break
			}
		}
		time.Sleep(20 * time.Millisecond)
		cur.Add(-1)
	}, testSub("raw"))
	var wg sync.WaitGroup
	for range 20 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if r := a.Deliver(context.Background(), "billing", testMsg(), 1); r.Outcome != Success {
				t.Errorf("Deliver() = %+v", r)
			}
		}()
	}
	wg.Wait()
	if p := peak.Load(); p != 4 {
		t.Errorf("peak in flight = %d, want 4", p)
	}
}

func TestDeliverUnhealthyAndDraining(t *testing.T) {
	t.Parallel()
	var calls atomic.Int32
	release := make(chan struct{})
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		calls.Add(1)
		<-release
	}))
	t.Cleanup(srv.Close)
	var healthy atomic.Bool
	a := NewApp(strings.TrimPrefix(srv.URL, "http://"), []Subscription{testSub("raw")}, healthy.Load, nil, zap.NewNop())
	if r := a.Deliver(context.Background(), "billing", testMsg(), 1); r.Outcome != NotDelivered || calls.Load() != 0 {
		t.Fatalf("Deliver() while unhealthy = %+v after %d calls, want not_delivered and none", r, calls.Load())
	}
	healthy.Store(true)
	done := make(chan Result)
	go func() { done <- a.Deliver(context.Background(), "billing", testMsg(), 1) }()
	for calls.Load() == 0 {
		time.Sleep(time.Millisecond)
	}
	drained := make(chan error)
	go func() { drained <- a.Drain(context.Background()) }()
	for !a.draining.Load() {
		time.Sleep(time.Millisecond)
	}
	if r := a.Deliver(context.Background(), "billing", testMsg(), 1); r.Outcome != NotDelivered {
		t.Errorf("Deliver() while draining = %+v, want not_delivered", r)
	}
	select {
	case <-drained:
		t.Fatal("Drain returned with a delivery in flight")
	case <-time.After(20 * time.Millisecond):
	}
	close(release)
	if r := <-done; r.Outcome != Success {
		t.Errorf("in-flight delivery = %+v, want success", r)
	}
	if err := <-drained; err != nil {
		t.Errorf("Drain() = %v", err)
	}
}

func TestPolicyDelay(t *testing.T) {
	t.Parallel()
	p := Policy{MaxAttempts: 10, Backoff: 100 * time.Millisecond, MaxBackoff: time.Second}
	for _, tc := range []struct {
		attempts int
		base     time.Duration
	}{{1, 100 * time.Millisecond}, {2, 200 * time.Millisecond}, {3, 400 * time.Millisecond}, {5, time.Second}, {50, time.Second}} {
		for range 20 {
			d := p.Delay(tc.attempts, 0)
			if d < tc.base*8/10 || d > tc.base*12/10 {
				t.Errorf("Delay(%d) = %v, want %v ±20%%", tc.attempts, d, tc.base)
			}
		}
	}
	if d := p.Delay(1, 5*time.Second); d != 5*time.Second {
		t.Errorf("Delay(1, Retry-After 5s) = %v, want 5s", d)
	}
}

func TestAppUpdate(t *testing.T) {
	t.Parallel()
	release := make(chan struct{})
	var mu sync.Mutex
	var paths []string
	a := appAt(t, func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		paths = append(paths, r.URL.Path)
		mu.Unlock()
		if r.URL.Path == "/events" {
			<-release // the delivery in flight across the updates
		}
	}, testSub("raw"))
	inflight := make(chan Result, 1)
	go func() { inflight <- a.Deliver(context.Background(), "billing", testMsg(), 1) }()
	for {
		mu.Lock()
		n := len(paths)
		mu.Unlock()
		if n == 1 {
			break
		}
		time.Sleep(time.Millisecond)
	}

	changed := testSub("raw")
	changed.Route = "/v2"
	payments := testSub("raw")
	payments.Topic, payments.Route = "payments", "/payments"
	a.Update([]Subscription{changed, payments})
	if r := a.Deliver(context.Background(), "billing", testMsg(), 1); r.Outcome != Success {
		t.Errorf("Deliver(changed) = %v (%s), want Success", r.Outcome, r.Reason)
	}
	pm := testMsg()
	pm.Topic = "payments"
	if r := a.Deliver(context.Background(), "billing", pm, 1); r.Outcome != Success {
		t.Errorf("Deliver(added) = %v (%s), want Success", r.Outcome, r.Reason)
	}

	a.Update([]Subscription{payments})
	if a.Has("orders", "billing") {
		t.Error(`Has("orders", "billing") = true after its removal`)
	}
	if r := a.Deliver(context.Background(), "billing", testMsg(), 1); r.Outcome != NotDelivered {
		t.Errorf("Deliver(removed) = %v, want NotDelivered", r.Outcome)
	}
	close(release)
	if r := <-inflight; r.Outcome != Success {
		t.Errorf("delivery in flight across the updates = %v (%s), want Success", r.Outcome, r.Reason)
	}
	mu.Lock()
	defer mu.Unlock()
	if want := []string{"/events", "/v2", "/payments"}; strings.Join(paths, " ") != strings.Join(want, " ") {
		t.Errorf("app got %q, want %q", paths, want)
	}
}

// TestAppUpdateKeepsSlots: a subscription whose max_in_flight stays keeps
// its slots, so the bound holds across an update.
func TestAppUpdateKeepsSlots(t *testing.T) {
	t.Parallel()
	var cur, peak atomic.Int32
	a := appAt(t, func(w http.ResponseWriter, r *http.Request) {
		n := cur.Add(1)
		for {
			p := peak.Load()
			if n <= p || peak.CompareAndSwap(p, n) {
				break
			}
		}
		time.Sleep(5 * time.Millisecond)
		cur.Add(-1)
	}, testSub("raw"))
	var wg sync.WaitGroup
	for range 40 {
		wg.Go(func() { a.Deliver(context.Background(), "billing", testMsg(), 1) })
	}
	for i := range 20 {
		s := testSub("raw")
		s.Route = "/r" + string(rune('a'+i))
		a.Update([]Subscription{s})
	}
	wg.Wait()
	if p := peak.Load(); p > 4 {
		t.Errorf("peak in flight = %d across updates, want at most max_in_flight 4", p)
	}
}

// TestDrainWhileDelivering: Drain races deliveries that start at the same
// moment (the race detector checks the WaitGroup's use); every delivery
// either ran to its end before Drain returned or answered NotDelivered.
func TestDrainWhileDelivering(t *testing.T) {
	for range 20 {
		var done atomic.Int64
		a := appAt(t, func(w http.ResponseWriter, _ *http.Request) { time.Sleep(time.Millisecond) }, testSub("raw"))
		var wg sync.WaitGroup
		start := make(chan struct{})
		for range 16 {
			wg.Go(func() {
				<-start
				if a.Deliver(context.Background(), "billing", testMsg(), 1).Outcome == Success {
					done.Add(1)
				}
			})
		}
		close(start)
		if err := a.Drain(context.Background()); err != nil {
			t.Fatal(err)
		}
		finished := done.Load()
		wg.Wait()
		if got := done.Load(); got != finished {
			t.Fatalf("%d deliveries succeeded after Drain returned, want 0", got-finished)
		}
	}
}
