package natsbroker

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"slices"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"go.uber.org/zap"

	"github.com/sidecarlb/sidecar/pubsub"
	"github.com/sidecarlb/sidecar/pubsub/store"
	"github.com/sidecarlb/sidecar/test/natsserver"
)

func TestSubject(t *testing.T) {
	t.Parallel()
	tests := []struct{ topic, want string }{
		{"orders", "sidecar.orders"},
		{"orders.dlq", "sidecar.orders.dlq"},
		{"a..b", "sidecar.a.%.b"},
		{".a", "sidecar.%.a"},
		{"a.", "sidecar.a.%"},
	}
	for _, tc := range tests {
		if got := Subject("sidecar", tc.topic); got != tc.want {
			t.Errorf("Subject(%q) = %q, want %q", tc.topic, got, tc.want)
		}
	}
}

func TestConsumerName(t *testing.T) {
	t.Parallel()
	seen := map[string]string{}
	for _, in := range [][3]string{{"a.b", "g", ""}, {"a_b", "g", ""}, {"a.b", "g", "i-1"}, {"a.b", "h", ""}, {"a", "b.c", ""}, {"a.b", "c", ""}} {
		name := ConsumerName(in[0], in[1], in[2])
		if prev, dup := seen[name]; dup {
			t.Errorf("ConsumerName%v = %q, the same as for %s", in, name, prev)
		}
		seen[name] = name
		for _, c := range name {
			if c == '.' || c == '*' || c == '>' || c == ' ' || c == '/' {
				t.Errorf("ConsumerName%v = %q holds %q", in, name, c)
			}
		}
	}
}

func newBroker(t *testing.T, url string, app *pubsub.App, subs []Subscription, opts Options) *Broker {
	t.Helper()
	opts.URLs = []string{url}
	opts.Instance = "test-1"
	opts.PublishTimeout = 2 * time.Second
	b, err := New(opts, app, subs, zaptestLogger(t))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(b.Close)
	return b
}

func msg(topic, id string) *pubsub.Message {
	return &pubsub.Message{ID: id, Source: "test", Type: pubsub.DefaultType, Time: time.Now(), DataContentType: "text/plain", Topic: topic, PubsubName: "pubsub", Data: []byte("x")}
}

// TestPublishPastWindow: concurrent publishes, single and bulk, of many
// more messages than the in-flight window all succeed (a publish past the
// window waits for acks rather than failing), each stored once.
func TestPublishPastWindow(t *testing.T) {
	t.Parallel()
	srv := natsserver.Start(t)
	b := newBroker(t, srv.URL(), nil, nil, Options{PublishWindow: 8})
	const bulks, perBulk, singles = 4, 100, 64
	var wg sync.WaitGroup
	errs := make(chan error, bulks+singles)
	for i := range bulks {
		wg.Go(func() {
			pubs := make([]pubsub.Publication, perBulk)
			for j := range pubs {
				pubs[j] = pubsub.Publication{Msg: msg("window", fmt.Sprintf("b%d-%d", i, j))}
			}
			if dup, err := b.Publish(pubs); err != nil {
				errs <- fmt.Errorf("bulk %d: %w", i, err)
			} else if slices.Contains(dup, true) {
				errs <- fmt.Errorf("bulk %d: dup = %v, want none", i, dup)
			}
		})
	}
	for i := range singles {
		wg.Go(func() {
			if _, err := b.Publish([]pubsub.Publication{{Msg: msg("window", fmt.Sprintf("s%d", i))}}); err != nil {
				errs <- fmt.Errorf("single %d: %w", i, err)
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}

	// A publish that finds the window full for longer than nats.go's
	// stall wait (200ms) still goes through once a slot frees: here the
	// one slot is held for about 500ms by a message to a subject no stream
	// takes (nats.go retries it twice, 250ms apart).
	b1 := newBroker(t, srv.URL(), nil, nil, Options{PublishWindow: 1})
	if _, err := b1.Publish([]pubsub.Publication{{Msg: msg("window", "warm")}}); err != nil {
		t.Fatal(err)
	}
	held, err := b1.js.PublishMsgAsync(nats.NewMsg("nostream.x"))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := b1.Publish([]pubsub.Publication{{Msg: msg("window", "after-stall")}}); err != nil {
		t.Errorf("Publish() with the window full = %v, want nil once it frees", err)
	}
	select {
	case <-held.Err():
	default:
		t.Error("the publish went through before the window freed")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	st, err := b.js.Stream(ctx, "SIDECAR")
	if err != nil {
		t.Fatal(err)
	}
	info, err := st.Info(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if want := uint64(bulks*perBulk + singles + 2); info.State.Msgs != want {
		t.Errorf("stream holds %d messages, want %d", info.State.Msgs, want)
	}
}

// TestPublishDedup: a repeated id within the window is reported as a
// duplicate, alone or in a batch; with the server down Publish fails at
// once with ErrUnavailable.
func TestPublishDedup(t *testing.T) {
	t.Parallel()
	srv := natsserver.Start(t)
	b := newBroker(t, srv.URL(), nil, nil, Options{})
	dup, err := b.Publish([]pubsub.Publication{{Key: "k", Msg: msg("orders", "k")}})
	if err != nil || dup[0] {
		t.Fatalf("Publish() = %v, %v, want [false], nil", dup, err)
	}
	dup, err = b.Publish([]pubsub.Publication{{Key: "k", Msg: msg("orders", "k")}, {Msg: msg("orders", "x1")}, {Msg: msg("orders", "x2")}})
	if err != nil || !dup[0] || dup[1] || dup[2] {
		t.Fatalf("Publish() = %v, %v, want [true false false], nil", dup, err)
	}
	srv.Kill()
	deadline := time.Now().Add(5 * time.Second)
	for {
		_, err = b.Publish([]pubsub.Publication{{Msg: msg("orders", "y")}})
		if errors.Is(err, ErrUnavailable) || time.Now().After(deadline) {
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	if !errors.Is(err, ErrUnavailable) {
		t.Fatalf("Publish() with the server down = %v, want ErrUnavailable", err)
	}
}

// TestSlowHandler: a delivery that runs for more than twice ack_wait is
// not redelivered meanwhile (in-progress acks), though a pull for a free
// slot is waiting; and no more than max_in_flight run at once.
func TestSlowHandler(t *testing.T) {
	t.Parallel()
	srv := natsserver.Start(t)
	var mu sync.Mutex
	got := map[string]int{}
	running, most := 0, 0
	app := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		running++
		most = max(most, running)
		got[r.Header.Get("ce-id")]++
		mu.Unlock()
		time.Sleep(2500 * time.Millisecond)
		mu.Lock()
		running--
		mu.Unlock()
	}))
	t.Cleanup(app.Close)
	const inFlight = 3
	a := pubsub.NewApp(app.Listener.Addr().(*net.TCPAddr).AddrPort().String(), []pubsub.Subscription{{Topic: "slow", Group: "g", Route: "/", ContentMode: "raw", MaxInFlight: inFlight, Timeout: 10 * time.Second}}, nil, nil, zap.NewNop())
	b := newBroker(t, srv.URL(), a, []Subscription{{Topic: "slow", Group: "g", MaxInFlight: inFlight, Policy: pubsub.Policy{MaxAttempts: 3, Backoff: 10 * time.Millisecond, MaxBackoff: 10 * time.Millisecond}, DeadLetter: "slow.dlq"}}, Options{AckWait: time.Second})
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { b.Run(ctx); close(done) }()
	defer func() { cancel(); <-done }()
	waitFor(t, 10*time.Second, "the consumer", func() bool { return b.Status().Groups[0].Pending == 0 })
	publish := func(from, to int) {
		for i := from; i < to; i++ {
			if _, err := b.Publish([]pubsub.Publication{{Msg: msg("slow", "s-"+strconv.Itoa(i))}}); err != nil {
				t.Fatal(err)
			}
		}
		waitFor(t, 20*time.Second, "the deliveries done", func() bool {
			mu.Lock()
			defer mu.Unlock()
			return len(got) == to && running == 0
		})
	}
	publish(0, 2)                       // a slot stays free: its pull would get a redelivery
	time.Sleep(1500 * time.Millisecond) // more than ack_wait: a redelivery would show
	publish(2, 8)
	mu.Lock()
	defer mu.Unlock()
	for id, n := range got {
		if n != 1 {
			t.Errorf("%s delivered %d times, want once", id, n)
		}
	}
	if most > inFlight {
		t.Errorf("%d deliveries ran at once, want at most %d", most, inFlight)
	}
}

func waitFor(t *testing.T, within time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(within)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %v waiting for %s", within, what)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// TestOrderingPerKey: with PerKey, the messages of each key reach the app
// one at a time, in publish order, though some fail their first attempt
// and are retried, and though two brokers (two instances) share the group.
func TestOrderingPerKey(t *testing.T) {
	t.Parallel()
	srv := natsserver.Start(t)
	var mu sync.Mutex
	var order []string // successful deliveries, in the order they ended
	running := 0
	bad := false
	app := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		id := r.Header.Get("ce-id")
		mu.Lock()
		running++
		bad = bad || running > 1
		mu.Unlock()
		time.Sleep(time.Millisecond)
		mu.Lock()
		defer mu.Unlock()
		running--
		n, _ := strconv.Atoi(id[2:])
		if n%3 == 0 && r.Header.Get("Sidecar-Delivery-Attempt") == "1" {
			w.WriteHeader(http.StatusServiceUnavailable)
			return
		}
		order = append(order, id)
	}))
	t.Cleanup(app.Close)
	addr := app.Listener.Addr().(*net.TCPAddr).AddrPort().String()
	sub := Subscription{Topic: "keyed", Group: "g", MaxInFlight: 8, PerKey: true, Policy: pubsub.Policy{MaxAttempts: 5, Backoff: 5 * time.Millisecond, MaxBackoff: 5 * time.Millisecond}, DeadLetter: "keyed.dlq"}
	var brokers []*Broker
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	defer func() { cancel(); wg.Wait() }()
	for range 2 {
		a := pubsub.NewApp(addr, []pubsub.Subscription{{Topic: "keyed", Group: "g", Route: "/", ContentMode: "raw", MaxInFlight: 8, Timeout: 5 * time.Second}}, nil, nil, zap.NewNop())
		b := newBroker(t, srv.URL(), a, []Subscription{sub}, Options{AckWait: 2 * time.Second})
		brokers = append(brokers, b)
		wg.Go(func() { b.Run(ctx) })
	}
	waitFor(t, 10*time.Second, "the consumer", func() bool { return brokers[0].Status().Groups[0].Pending == 0 })
	const n = 60
	for i := range n {
		m := msg("keyed", fmt.Sprintf("%c-%d", 'a'+i%3, i))
		m.OrderingKey = string(rune('a' + i%3))
		if _, err := brokers[i%2].Publish([]pubsub.Publication{{Msg: m}}); err != nil {
			t.Fatal(err)
		}
	}
	waitFor(t, 30*time.Second, "every message", func() bool {
		mu.Lock()
		defer mu.Unlock()
		return len(order) == n
	})
	mu.Lock()
	defer mu.Unlock()
	last := map[byte]int{}
	for _, id := range order {
		k := id[0]
		i, _ := strconv.Atoi(id[2:])
		if prev, ok := last[k]; ok && i <= prev {
			t.Errorf("key %c: %s after %c-%d, want publish order", k, id, k, prev)
		}
		last[k] = i
	}
	if bad {
		t.Errorf("two deliveries of the group ran at once")
	}
}

// TestForwardSpool: messages spooled while NATS was unreachable go into the
// stream once it is back, over several forwarding rounds, in the order
// they were spooled, each once, and leave the spool.
func TestForwardSpool(t *testing.T) {
	t.Parallel()
	srv := natsserver.Start(t)
	sp, err := store.Open(t.TempDir(), store.Options{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = sp.Close() })
	b := newBroker(t, srv.URL(), nil, nil, Options{Spool: sp})
	const n = 2*forwardBatch + 10
	pubs := make([]pubsub.Publication, n)
	for i := range pubs {
		pubs[i] = pubsub.Publication{Msg: msg("spooled", fmt.Sprintf("f-%d", i))}
	}
	if _, err := b.spool(pubs); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { b.Run(ctx); close(done) }()
	defer func() { cancel(); <-done }()
	waitFor(t, 20*time.Second, "the spool to empty", func() bool { return sp.Pending() == 0 })
	sctx, scancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer scancel()
	st, err := b.js.Stream(sctx, "SIDECAR")
	if err != nil {
		t.Fatal(err)
	}
	for i := range n + 1 {
		m, err := st.GetMsg(sctx, uint64(i+1))
		if i == n {
			if err == nil {
				t.Errorf("stream holds more than %d messages: %s", n, m.Header.Get(hdrID))
			}
			break
		}
		if err != nil {
			t.Fatalf("message %d: %v", i+1, err)
		}
		if got, want := m.Header.Get(hdrID), fmt.Sprintf("f-%d", i); got != want {
			t.Fatalf("message %d = %s, want %s", i+1, got, want)
		}
	}
}

// TestRefusalIsNotAnAttempt: deliveries JetStream made that never reached
// the app (here: nothing listening yet) are not attempts: the app's first
// sight of the message carries attempt 1, and a failure after it 2.
func TestRefusalIsNotAnAttempt(t *testing.T) {
	t.Parallel()
	srv := natsserver.Start(t)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close() // nobody listens until two deliveries were refused
	var mu sync.Mutex
	var attempts []string
	app := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		attempts = append(attempts, r.Header.Get("Sidecar-Delivery-Attempt"))
		first := len(attempts) == 1
		mu.Unlock()
		if first {
			w.WriteHeader(http.StatusServiceUnavailable) // one real failure
		}
	}))
	a := pubsub.NewApp(addr, []pubsub.Subscription{{Topic: "blip", Group: "g", Route: "/", ContentMode: "raw", MaxInFlight: 1, Timeout: 5 * time.Second}}, nil, nil, zap.NewNop())
	b := newBroker(t, srv.URL(), a, []Subscription{{Topic: "blip", Group: "g", MaxInFlight: 1, Policy: pubsub.Policy{MaxAttempts: 5, Backoff: 10 * time.Millisecond, MaxBackoff: 10 * time.Millisecond}, DeadLetter: "blip.dlq"}}, Options{})
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { b.Run(ctx); close(done) }()
	defer func() { cancel(); <-done }()
	waitFor(t, 10*time.Second, "the consumer", func() bool { return b.Status().Groups[0].Pending == 0 })
	if _, err := b.Publish([]pubsub.Publication{{Msg: msg("blip", "b-1")}}); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 15*time.Second, "two refused deliveries", func() bool {
		n := 0
		for _, v := range b.refused.Values() {
			n += v
		}
		return n >= 2
	})
	if app.Listener, err = net.Listen("tcp", addr); err != nil {
		t.Fatal(err)
	}
	app.Start()
	t.Cleanup(app.Close)
	waitFor(t, 15*time.Second, "two deliveries to the app", func() bool {
		mu.Lock()
		defer mu.Unlock()
		return len(attempts) >= 2
	})
	time.Sleep(200 * time.Millisecond) // a third would show
	mu.Lock()
	defer mu.Unlock()
	if want := []string{"1", "2"}; !slices.Equal(attempts, want) {
		t.Errorf("attempts the app saw = %q, want %q", attempts, want)
	}
}

func zaptestLogger(t *testing.T) *zap.Logger {
	if os.Getenv("NATSBROKER_DEBUG") != "" {
		l, _ := zap.NewDevelopment()
		return l
	}
	return zap.NewNop()
}
