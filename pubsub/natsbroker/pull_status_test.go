package natsbroker

import (
	"context"
	"net"
	"net/http"
	"net/http/httptest"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"go.uber.org/zap"

	"github.com/sidecarlb/sidecar/pubsub"
	"github.com/sidecarlb/sidecar/test/natsserver"
)

// pullSetup starts a server with the stream "P" (subjects "p.>") and the
// durable consumer cfg, and returns the connection and a puller on it.
func pullSetup(t *testing.T, cfg jetstream.ConsumerConfig) (*nats.Conn, jetstream.JetStream, *puller) {
	t.Helper()
	srv := natsserver.Start(t)
	nc, err := nats.Connect(srv.URL(), nats.ReconnectWait(50*time.Millisecond), nats.MaxReconnects(-1))
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
	cfg.Durable, cfg.AckPolicy = "c", jetstream.AckExplicitPolicy
	if _, err := js.CreateOrUpdateConsumer(ctx, "P", cfg); err != nil {
		t.Fatal(err)
	}
	p, err := newPuller(nc, "P", "c", 8, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(p.stop)
	return nc, js, p
}

// TestPullerStoredStatus: an empty stored message a publisher gave a
// Status header (408, 503, 100) is a message to deliver, not a status
// ending a request.
func TestPullerStoredStatus(t *testing.T) {
	t.Parallel()
	_, js, p := pullSetup(t, jetstream.ConsumerConfig{})
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	for _, code := range []string{"408", "503", "100"} {
		m := nats.NewMsg("p.x")
		m.Header.Set("Status", code)
		if _, err := js.PublishMsg(ctx, m); err != nil {
			t.Fatal(err)
		}
	}
	if err := p.pull(3, time.Now()); err != nil {
		t.Fatal(err)
	}
	for range 3 {
		m := nextMsg(t, p)
		if k := p.take(m); k != kindMsg {
			t.Fatalf("take(stored empty message with Status %q) = %d, want kindMsg", m.Header.Get("Status"), k)
		}
		_ = m.Ack()
	}
	if p.asked != 0 {
		t.Errorf("asked = %d after the 3 messages asked for came, want 0", p.asked)
	}
}

// TestPullerRefusedRequest: a request the server refuses on arrival (409
// Exceeded MaxRequestBatch, no Nats-Pending-Messages) gives back all it
// asked for at once, not what the requests still live could bring.
func TestPullerRefusedRequest(t *testing.T) {
	t.Parallel()
	_, js, p := pullSetup(t, jetstream.ConsumerConfig{MaxRequestBatch: 2})
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	if _, err := js.Publish(ctx, "p.x", []byte("one")); err != nil {
		t.Fatal(err)
	}
	if err := p.pull(2, time.Now()); err != nil {
		t.Fatal(err)
	}
	m := nextMsg(t, p)
	if k := p.take(m); k != kindMsg {
		t.Fatalf("take(the stored message) = %d, want kindMsg", k)
	}
	_ = m.Ack()
	// The first request still waits for its second message.
	if err := p.pull(3, time.Now()); err != nil {
		t.Fatal(err)
	}
	m = nextMsg(t, p)
	if k := p.take(m); k != kindStatus || m.Header.Get("Status") != "409" {
		t.Fatalf("take(%v) = %d, want kindStatus for a 409", m.Header, k)
	}
	if p.asked != 1 {
		t.Errorf("asked = %d after the refused request of 3, want 1 (the first request's)", p.asked)
	}
}

// TestPullerReconnect: after a reconnect the requests sent before are
// forgotten (the server dropped them without a word), so the slots are
// free at once and not only past their deadlines.
func TestPullerReconnect(t *testing.T) {
	t.Parallel()
	nc, _, p := pullSetup(t, jetstream.ConsumerConfig{})
	if err := p.pull(4, time.Now()); err != nil {
		t.Fatal(err)
	}
	if err := nc.ForceReconnect(); err != nil {
		t.Fatal(err)
	}
	for deadline := time.Now().Add(10 * time.Second); nc.Stats().Reconnects == 0 || !nc.IsConnected(); {
		if time.Now().After(deadline) {
			t.Fatal("no reconnect in 10s")
		}
		time.Sleep(10 * time.Millisecond)
	}
	p.expire(time.Now())
	if p.asked != 0 || len(p.reqs) != 0 {
		t.Errorf("asked = %d with %d requests after a reconnect, want 0 and 0", p.asked, len(p.reqs))
	}
}

// TestDrainedIsNotAnAttempt: a message that came for a draining
// subscription and was nak'd unstarted is not an attempt: its next
// delivery reaches the app as attempt 1.
func TestDrainedIsNotAnAttempt(t *testing.T) {
	t.Parallel()
	srv := natsserver.Start(t)
	attempts := make(chan string, 4)
	app := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		attempts <- r.Header.Get("Sidecar-Delivery-Attempt")
	}))
	t.Cleanup(app.Close)
	a := pubsub.NewApp(app.Listener.Addr().(*net.TCPAddr).AddrPort().String(), []pubsub.Subscription{{Topic: "drained", Group: "g", Route: "/", ContentMode: "raw", MaxInFlight: 1, Timeout: 5 * time.Second}}, nil, nil, zap.NewNop())
	sub := Subscription{Topic: "drained", Group: "g", MaxInFlight: 1, Policy: pubsub.Policy{MaxAttempts: 5, Backoff: 10 * time.Millisecond, MaxBackoff: 10 * time.Millisecond}, DeadLetter: "drained.dlq"}
	b := newBroker(t, srv.URL(), a, []Subscription{sub}, Options{})
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	if !b.consumer(ctx, sub, zap.NewNop()) {
		t.Fatal("no consumer")
	}
	if _, err := b.Publish([]pubsub.Publication{{Msg: msg("drained", "d-1")}}); err != nil {
		t.Fatal(err)
	}
	p, err := newPuller(b.nc, b.opts.Stream, b.consumerName(sub), 1, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	if err := p.pull(1, time.Now()); err != nil {
		t.Fatal(err)
	}
	for deadline := time.Now().Add(5 * time.Second); len(p.msgs) == 0; time.Sleep(10 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("no message in 5s")
		}
	}
	b.drain(sub, p) // the message came and was not started

	p, err = newPuller(b.nc, b.opts.Stream, b.consumerName(sub), 1, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(p.stop)
	if err := p.pull(1, time.Now()); err != nil {
		t.Fatal(err)
	}
	m := nextMsg(t, p)
	if meta, err := m.Metadata(); err != nil || meta.NumDelivered != 2 {
		t.Fatalf("metadata %+v, %v: want the second delivery", meta, err)
	}
	w := &working{msgs: map[*nats.Msg]struct{}{}}
	b.handle(ctx, sub, m, w, zap.NewNop())
	if got := <-attempts; got != "1" {
		t.Errorf("attempt the app saw = %q after a drained delivery, want 1", got)
	}
}
