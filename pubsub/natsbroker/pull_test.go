package natsbroker

import (
	"context"
	"net"
	"net/http"
	"net/http/httptest"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"go.uber.org/zap"

	"github.com/sidecarlb/sidecar/pubsub"
	"github.com/sidecarlb/sidecar/test/natsserver"
)

// nextMsg reads the puller's next message, failing the test after 5s.
func nextMsg(t *testing.T, p *puller) *nats.Msg {
	t.Helper()
	select {
	case m := <-p.msgs:
		return m
	case <-time.After(5 * time.Second):
		t.Fatal("no message from the pull inbox in 5s")
		return nil
	}
}

// TestPullerCredit: the puller's count of messages asked for and not
// received follows the messages and the server's 408 (with what the
// expired request had left), a message not asked for is a stray, and a
// request past its deadline with no word from the server stops counting.
func TestPullerCredit(t *testing.T) {
	t.Parallel()
	srv := natsserver.Start(t)
	nc, err := nats.Connect(srv.URL())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(nc.Close)
	js, err := jetstream.New(nc)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	if _, err := js.CreateStream(ctx, jetstream.StreamConfig{Name: "P", Subjects: []string{"p.>"}}); err != nil {
		t.Fatal(err)
	}
	if _, err := js.CreateOrUpdateConsumer(ctx, "P", jetstream.ConsumerConfig{Durable: "c", AckPolicy: jetstream.AckExplicitPolicy}); err != nil {
		t.Fatal(err)
	}
	for i := range 6 {
		if _, err := js.Publish(ctx, "p.x", []byte(strconv.Itoa(i))); err != nil {
			t.Fatal(err)
		}
	}
	p, err := newPuller(nc, "P", "c", 8, 300*time.Millisecond)
	if err != nil {
		t.Fatal(err)
	}
	now := time.Now()
	if err := p.pull(4, now); err != nil {
		t.Fatal(err)
	}
	if err := p.pull(4, now); err != nil {
		t.Fatal(err)
	}
	if p.asked != 8 {
		t.Fatalf("asked = %d after two pulls of 4, want 8", p.asked)
	}
	for i := range 6 {
		m := nextMsg(t, p)
		if k := p.take(m); k != kindMsg {
			t.Fatalf("message %d: take() = %d, want kindMsg", i, k)
		}
		_ = m.Ack()
	}
	if p.asked != 2 {
		t.Fatalf("asked = %d after 6 of 8 came, want 2", p.asked)
	}
	// The stream is empty: the requests expire with a 408 each, saying
	// what they had left (the server spreads a batch over the waiting
	// requests, so both may have some).
	for range 2 {
		if p.asked == 0 {
			break
		}
		m := nextMsg(t, p)
		if k := p.take(m); k != kindStatus || m.Header.Get("Status") != "408" {
			t.Fatalf("take(%v) = %d, want kindStatus for a 408", m.Header, k)
		}
	}
	if p.asked != 0 {
		t.Fatalf("asked = %d after the 408s, want 0", p.asked)
	}
	if k := p.take(&nats.Msg{Subject: "p.x", Data: []byte("late")}); k != kindStray {
		t.Errorf("take(a message not asked for) = %d, want kindStray", k)
	}
	if p.asked != 0 {
		t.Errorf("asked = %d after a stray, want 0", p.asked)
	}

	// A request the server lost: nothing comes, and past its deadline
	// its credit is back.
	p.reqs = append(p.reqs, pullReq{id: 99, n: 3, deadline: now})
	p.live += 3
	p.asked += 3
	p.expire(now.Add(-time.Millisecond))
	if p.asked != 3 {
		t.Errorf("asked = %d before the deadline, want 3", p.asked)
	}
	p.expire(now.Add(time.Millisecond))
	if p.asked != 0 || len(p.reqs) != 0 {
		t.Errorf("asked = %d with %d requests past every deadline, want 0 and 0", p.asked, len(p.reqs))
	}
	p.stop()
}

// TestPullBound: under an app slower than the messages come, the messages
// the deliveries running at once never exceed max_in_flight, nor does
// what the group's consumer has out to this sidecar (the server's
// NumAckPending: pulled and not settled), but for acks on their way; and
// every message is still delivered once.
func TestPullBound(t *testing.T) {
	t.Parallel()
	srv := natsserver.Start(t)
	const inFlight, total = 4, 40
	var mu sync.Mutex
	got := map[string]int{}
	running, most := 0, 0
	app := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		running++
		most = max(most, running)
		got[r.Header.Get("ce-id")]++
		mu.Unlock()
		time.Sleep(50 * time.Millisecond)
		mu.Lock()
		running--
		mu.Unlock()
	}))
	t.Cleanup(app.Close)
	a := pubsub.NewApp(app.Listener.Addr().(*net.TCPAddr).AddrPort().String(), []pubsub.Subscription{{Topic: "bound", Group: "g", Route: "/", ContentMode: "raw", MaxInFlight: inFlight, Timeout: 10 * time.Second}}, nil, nil, zap.NewNop())
	sub := Subscription{Topic: "bound", Group: "g", MaxInFlight: inFlight, Policy: pubsub.Policy{MaxAttempts: 3, Backoff: 10 * time.Millisecond, MaxBackoff: 10 * time.Millisecond}, DeadLetter: "bound.dlq"}
	b := newBroker(t, srv.URL(), a, []Subscription{sub}, Options{AckWait: 5 * time.Second})
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { b.Run(ctx); close(done) }()
	defer func() { cancel(); <-done }()
	waitFor(t, 10*time.Second, "the consumer", func() bool { return b.Status().Groups[0].Pending == 0 })

	nc, err := nats.Connect(srv.URL())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(nc.Close)
	js, err := jetstream.New(nc)
	if err != nil {
		t.Fatal(err)
	}
	ictx, icancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer icancel()
	cons, err := js.Consumer(ictx, b.opts.Stream, b.consumerName(sub))
	if err != nil {
		t.Fatal(err)
	}
	pubs := make([]pubsub.Publication, total)
	for i := range pubs {
		pubs[i] = pubsub.Publication{Msg: msg("bound", "b-"+strconv.Itoa(i))}
	}
	if _, err := b.Publish(pubs); err != nil {
		t.Fatal(err)
	}
	mostPending, samples := 0, 0
	var mostHeld int64 // received and not settled, as the sidecar counts
	for deadline := time.Now().Add(20 * time.Second); time.Now().Before(deadline); samples++ {
		info, err := cons.Info(ictx)
		if err != nil {
			t.Fatal(err)
		}
		mostPending = max(mostPending, info.NumAckPending)
		mostHeld = max(mostHeld, b.inFlight[0].Load())
		mu.Lock()
		all := len(got) == total && running == 0
		mu.Unlock()
		if all && info.NumAckPending == 0 {
			break
		}
		time.Sleep(5 * time.Millisecond)
	}
	mu.Lock()
	defer mu.Unlock()
	if len(got) != total {
		t.Fatalf("%d of %d messages delivered", len(got), total)
	}
	for id, n := range got {
		if n != 1 {
			t.Errorf("%s delivered %d times, want once", id, n)
		}
	}
	// The server's count can run ahead of the sidecar's by the acks on
	// their way: an ack is a plain publish (AckSync would cost a round
	// trip a message), and the server may take the next pull before it
	// has applied an ack sent just before it. The sidecar's own bound is
	// what it holds, received and not settled (mostHeld), below.
	if mostPending > 2*inFlight {
		t.Errorf("the consumer had %d messages pulled and not settled, want at most max_in_flight %d (and %d acks on their way)", mostPending, inFlight, inFlight)
	}
	if most > inFlight {
		t.Errorf("%d deliveries ran at once, want at most %d", most, inFlight)
	}
	if mostHeld > inFlight {
		t.Errorf("the sidecar held %d messages received and not settled, want at most %d", mostHeld, inFlight)
	}
	t.Logf("most pulled and unsettled %d (server), most held %d (sidecar), most running %d, over %d samples", mostPending, mostHeld, most, samples)
}

// TestConsumerDeleted: a group's consumer deleted under a running
// subscriber (by hand, or a broadcast one removed by the server) is made
// again, and what is published after comes to the app.
func TestConsumerDeleted(t *testing.T) {
	t.Parallel()
	srv := natsserver.Start(t)
	var mu sync.Mutex
	got := map[string]int{}
	app := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		got[r.Header.Get("ce-id")]++
		mu.Unlock()
	}))
	t.Cleanup(app.Close)
	a := pubsub.NewApp(app.Listener.Addr().(*net.TCPAddr).AddrPort().String(), []pubsub.Subscription{{Topic: "del", Group: "g", Route: "/", ContentMode: "raw", MaxInFlight: 4, Timeout: 10 * time.Second}}, nil, nil, zap.NewNop())
	sub := Subscription{Topic: "del", Group: "g", MaxInFlight: 4, Policy: pubsub.Policy{MaxAttempts: 3, Backoff: 10 * time.Millisecond, MaxBackoff: 10 * time.Millisecond}, DeadLetter: "del.dlq"}
	b := newBroker(t, srv.URL(), a, []Subscription{sub}, Options{})
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { b.Run(ctx); close(done) }()
	defer func() { cancel(); <-done }()
	waitFor(t, 10*time.Second, "the consumer", func() bool { return b.Status().Groups[0].Pending == 0 })

	nc, err := nats.Connect(srv.URL())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(nc.Close)
	js, err := jetstream.New(nc)
	if err != nil {
		t.Fatal(err)
	}
	ictx, icancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer icancel()
	if err := js.DeleteConsumer(ictx, b.opts.Stream, b.consumerName(sub)); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 15*time.Second, "the consumer made again", func() bool {
		_, err := js.Consumer(ictx, b.opts.Stream, b.consumerName(sub))
		return err == nil
	})
	if _, err := b.Publish([]pubsub.Publication{{Msg: msg("del", "d-1")}}); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 15*time.Second, "the delivery", func() bool {
		mu.Lock()
		defer mu.Unlock()
		return got["d-1"] == 1
	})
}
