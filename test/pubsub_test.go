package test

// Integration tests of pub/sub over the http broker: real sidecar
// processes, real app HTTP servers in the test, a real Consul dev agent.

import (
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/sidecarlb/sidecar/test/consulagent"
	"github.com/sidecarlb/sidecar/test/harness"
)

// adminHTTP is the client of the tests' calls to a sidecar's admin and
// publish listeners: bounded, so that a sidecar that accepts and never
// answers fails the WaitFor around the call instead of hanging the test.
var adminHTTP = &http.Client{Timeout: 10 * time.Second}

// subApp is an app that records the messages its sidecar delivers.
type subApp struct {
	t    *testing.T
	addr string
	port int
	srv  *http.Server

	mu sync.Mutex
	// got maps a message id to the attempt numbers it was delivered with,
	// by route.
	got map[string]map[string][]int
	// events keeps the last CloudEvent per route and id.
	events map[string]map[string]map[string]any
	// answer decides the status for one delivery; nil answers 200.
	answer func(route, id string, attempt int) int
	delay  time.Duration
}

func startSubApp(t *testing.T) *subApp {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	a := &subApp{t: t, addr: ln.Addr().String(), port: ln.Addr().(*net.TCPAddr).Port, got: map[string]map[string][]int{}, events: map[string]map[string]map[string]any{}}
	a.srv = &http.Server{Handler: http.HandlerFunc(a.serve)}
	go func() { _ = a.srv.Serve(ln) }()
	t.Cleanup(func() { _ = a.srv.Close() })
	return a
}

func (a *subApp) serve(w http.ResponseWriter, r *http.Request) {
	if r.URL.Path == "/health" {
		return
	}
	body, _ := io.ReadAll(r.Body)
	var ev map[string]any
	if err := json.Unmarshal(body, &ev); err != nil {
		a.t.Errorf("app got a body that is not a CloudEvent: %q", body)
		w.WriteHeader(400)
		return
	}
	id, _ := ev["id"].(string)
	attempt, _ := strconv.Atoi(r.Header.Get("Sidecar-Delivery-Attempt"))
	a.mu.Lock()
	if a.got[r.URL.Path] == nil {
		a.got[r.URL.Path] = map[string][]int{}
		a.events[r.URL.Path] = map[string]map[string]any{}
	}
	a.got[r.URL.Path][id] = append(a.got[r.URL.Path][id], attempt)
	a.events[r.URL.Path][id] = ev
	answer, delay := a.answer, a.delay
	a.mu.Unlock()
	time.Sleep(delay)
	if answer != nil {
		w.WriteHeader(answer(r.URL.Path, id, attempt))
	}
}

// ids returns the ids delivered at route with their attempts.
func (a *subApp) ids(route string) map[string][]int {
	a.mu.Lock()
	defer a.mu.Unlock()
	out := map[string][]int{}
	for id, at := range a.got[route] {
		out[id] = append([]int(nil), at...)
	}
	return out
}

// psNode is one sidecar with pub/sub on.
type psNode struct {
	t       *testing.T
	admin   string
	api     string
	peer    string
	dataDir string
	cfg     string
	proc    *harness.Proc
	app     *subApp
}

type psSub struct{ topic, route, group, extra string }

// newPSNode configures a sidecar on the http broker; with app it registers
// service name for it and subscribes to subs.
func newPSNode(t *testing.T, consulAddr, name string, app *subApp, subs ...psSub) *psNode {
	return newPSNodeOn(t, consulAddr, "", name, app, subs...)
}

// newPSNodeOn is newPSNode on the nats broker when natsURL is set.
func newPSNodeOn(t *testing.T, consulAddr, natsURL, name string, app *subApp, subs ...psSub) *psNode {
	n := &psNode{
		t: t, app: app,
		admin:   fmt.Sprintf("127.0.0.1:%d", consulagent.FreePort(t)),
		api:     fmt.Sprintf("127.0.0.1:%d", consulagent.FreePort(t)),
		peer:    fmt.Sprintf("127.0.0.1:%d", consulagent.FreePort(t)),
		dataDir: t.TempDir(),
	}
	var b strings.Builder
	if app != nil {
		fmt.Fprintf(&b, `service:
  name: %s
  id: %s-%d
  address: 127.0.0.1
  port: %d
  check: {http: "http://%s/health", interval: 200ms, timeout: 1s}
  ttl: 2s
  drain: 1s
`, name, name, app.port, app.port, app.addr)
	}
	fmt.Fprintf(&b, `consul: {address: %s}
admin: {listen: %s}
log: {level: debug}
pubsub:
  listen: %s
  data_dir: %s
  http: {listen: %s}
`, consulAddr, n.admin, n.api, n.dataDir, n.peer)
	if natsURL != "" {
		fmt.Fprintf(&b, "  broker: nats\n  nats: {urls: [%q], ack_wait: 5s, on_unavailable: reject}\n", natsURL)
	}
	if len(subs) > 0 {
		b.WriteString("subscriptions:\n")
		for _, s := range subs {
			fmt.Fprintf(&b, "  - {topic: %s, route: %s, group: %s, retry: {backoff: 20ms, max_backoff: 200ms}%s}\n", s.topic, s.route, s.group, s.extra)
		}
	}
	n.cfg = b.String()
	return n
}

func (n *psNode) start() *psNode {
	n.t.Helper()
	n.proc = harness.StartSidecar(n.t, n.admin, n.cfg)
	return n
}

// publish posts one message with an Idempotency-Key and returns the status.
func (n *psNode) publish(topic, key, body string) int {
	req, _ := http.NewRequest("POST", "http://"+n.api+"/v1.0/publish/pubsub/"+topic, strings.NewReader(body))
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("Idempotency-Key", key)
	resp, err := adminHTTP.Do(req)
	if err != nil {
		n.t.Fatalf("publish %s: %v", key, err)
	}
	resp.Body.Close()
	return resp.StatusCode
}

// status returns the pubsub section of the sidecar's /status.
func (n *psNode) status() (s struct {
	Outbox  int `json:"outbox"`
	Spooled int `json:"spooled"` // the nats broker's spool
	Groups  []struct {
		Topic, Group string
		Pending      int
	} `json:"groups"`
}) {
	resp, err := adminHTTP.Get("http://" + n.admin + "/status")
	if err != nil {
		return s
	}
	defer resp.Body.Close()
	var all struct {
		Pubsub json.RawMessage `json:"pubsub"`
	}
	_ = json.NewDecoder(resp.Body).Decode(&all)
	_ = json.Unmarshal(all.Pubsub, &s)
	return s
}

// metric returns the value of the sample line starting with series (name
// and labels as the exposition format writes them, labels sorted), or -1.
func (n *psNode) metric(series string) float64 {
	resp, err := adminHTTP.Get("http://" + n.admin + "/metrics")
	if err != nil {
		return -1
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, series+" "); ok {
			f, err := strconv.ParseFloat(v, 64)
			if err == nil {
				return f
			}
		}
	}
	return -1
}

// waitPeers waits until Consul has want passing instances of the group's
// peer service, and the subscription records are in KV.
func waitPeers(t *testing.T, agent *consulagent.Agent, group string, want int, topics ...string) {
	t.Helper()
	c := agent.Client()
	consulagent.WaitFor(t, 20*time.Second, fmt.Sprintf("%d passing pubsub-%s", want, group), func() bool {
		es, _, err := c.Health().Service("pubsub-"+group, "", true, nil)
		return err == nil && len(es) == want
	})
	for _, topic := range topics {
		consulagent.WaitFor(t, 10*time.Second, "subscription record "+topic+"/"+group, func() bool {
			p, _, err := c.KV().Get("sidecar/pubsub/subscriptions/"+topic+"/"+group, nil)
			return err == nil && p != nil
		})
	}
}

// union merges the deliveries seen by several instances, each message's
// attempts sorted.
func union(maps ...map[string][]int) map[string][]int {
	out := map[string][]int{}
	for _, m := range maps {
		for id, at := range m {
			out[id] = append(out[id], at...)
		}
	}
	for _, at := range out {
		slices.Sort(at)
	}
	return out
}

// TestPubSubGroups, for each broker: two instances of one group share a topic's messages,
// a second group gets its own copy of each, nothing is lost; a handler that
// fails k times is delivered exactly k+1 times with attempts 1..k+1; a
// message the app rejects reaches the dead-letter topic's subscribers with
// its reason.
func TestPubSubGroups(t *testing.T) { forBrokers(t, testPubSubGroups) }

func testPubSubGroups(t *testing.T, env *psEnv) {
	const k = 3
	billingApps := []*subApp{startSubApp(t), startSubApp(t)}
	for _, a := range billingApps {
		a.answer = func(route, id string, attempt int) int {
			switch {
			case route == "/flaky" && attempt <= k:
				return 503
			case route == "/poison":
				return 404
			}
			return 200
		}
	}
	shipApp := startSubApp(t)
	var nodes []*psNode
	for _, a := range billingApps {
		nodes = append(nodes, env.node(t, "billing", a,
			psSub{"orders", "/orders", "billing", ""}, psSub{"flaky", "/flaky", "billing", ""},
			psSub{"poison", "/poison", "billing", ""}, psSub{"prices", "/prices", "pricecache", ", delivery: broadcast"}).start())
	}
	nodes = append(nodes, env.node(t, "shipping", shipApp,
		psSub{"orders", "/orders", "shipping", ", max_in_flight: 4"}, psSub{"poison.dlq", "/dlq", "shipping", ""}).start())
	env.waitGroup(t, "billing", 2, false, "orders", "flaky", "poison")
	env.waitGroup(t, "shipping", 1, false, "orders", "poison.dlq")
	env.waitGroup(t, "pricecache", 2, true, "prices")
	pub := env.node(t, "", nil).start()

	const n = 300
	for i := range n {
		if code := pub.publish("orders", fmt.Sprintf("o-%d", i), fmt.Sprintf(`{"n":%d}`, i)); code != 204 {
			t.Fatalf("publish o-%d = %d, want 204", i, code)
		}
	}
	// A repeat of a key is not published again.
	if code := pub.publish("orders", "o-0", `{"n":0}`); code != 204 {
		t.Fatalf("publish o-0 again = %d, want 204", code)
	}
	for i := range 5 {
		pub.publish("flaky", fmt.Sprintf("f-%d", i), `{}`)
	}
	pub.publish("poison", "p-0", `{"bad":true}`)
	for i := range 20 {
		pub.publish("prices", fmt.Sprintf("pr-%d", i), `{}`)
	}

	consulagent.WaitFor(t, 30*time.Second, "every order at both groups", func() bool {
		return len(union(billingApps[0].ids("/orders"), billingApps[1].ids("/orders"))) == n && len(shipApp.ids("/orders")) == n
	})
	consulagent.WaitFor(t, 30*time.Second, "every price at both instances (broadcast)", func() bool {
		return len(billingApps[0].ids("/prices")) == 20 && len(billingApps[1].ids("/prices")) == 20
	})
	consulagent.WaitFor(t, 30*time.Second, "the outbox to empty", func() bool { return pub.status().Outbox == 0 })
	env.waitSettled(t, nodes...)
	for i, a := range billingApps {
		for id, at := range a.ids("/prices") {
			if len(at) != 1 {
				t.Errorf("billing instance %d got price %s %d times, want once", i, id, len(at))
			}
		}
		if got := len(a.ids("/orders")); got == 0 || got == n {
			t.Errorf("billing instance %d got %d of %d orders, want a share", i, got, n)
		}
	}
	// Nothing failed, so each order reached each group once, attempt 1.
	for group, got := range map[string]map[string][]int{"billing": union(billingApps[0].ids("/orders"), billingApps[1].ids("/orders")), "shipping": shipApp.ids("/orders")} {
		for id, at := range got {
			if len(at) != 1 || at[0] != 1 {
				t.Errorf("%s got %s with attempts %v, want [1]", group, id, at)
			}
		}
	}
	flaky := union(billingApps[0].ids("/flaky"), billingApps[1].ids("/flaky"))
	if len(flaky) != 5 {
		t.Errorf("flaky messages delivered: %d, want 5", len(flaky))
	}
	for id, at := range flaky {
		if fmt.Sprint(at) != fmt.Sprint([]int{1, 2, 3, 4}) {
			t.Errorf("flaky %s delivered with attempts %v, want [1 2 3 4] (k+1 = %d deliveries)", id, at, k+1)
		}
	}
	consulagent.WaitFor(t, 20*time.Second, "the dead letter", func() bool { return len(shipApp.ids("/dlq")) == 1 })
	shipApp.mu.Lock()
	ev := shipApp.events["/dlq"]["p-0"]
	shipApp.mu.Unlock()
	if ev == nil || ev["topic"] != "poison.dlq" || !strings.Contains(fmt.Sprint(ev["deadletterreason"]), "404") || fmt.Sprint(ev["deadletterattempts"]) != "1" {
		t.Errorf("dead letter = %v, want topic poison.dlq, a reason naming 404, 1 attempt", ev)
	}

	if env.nats != nil {
		checkNATSCounts(t, pub, nodes, n, k)
		return
	}
	// The counts, in /metrics and /status.
	consulagent.WaitFor(t, 10*time.Second, "the dead letter's outcome", func() bool { return pub.status().Outbox == 0 })
	for series, want := range map[string]float64{
		`sidecar_pubsub_published_total{result="ok",topic="orders"}`:                           n + 1,
		`sidecar_pubsub_outcomes_total{group="billing",outcome="success",topic="orders"}`:      n,
		`sidecar_pubsub_outcomes_total{group="shipping",outcome="success",topic="orders"}`:     n,
		`sidecar_pubsub_attempts_total{group="billing",topic="flaky"}`:                         5 * (k + 1),
		`sidecar_pubsub_dead_letters_total{group="billing",reason="rejected",topic="poison"}`:  1,
		`sidecar_pubsub_outcomes_total{group="shipping",outcome="success",topic="poison.dlq"}`: 1,
		`sidecar_pubsub_outbox_messages`:                                                       0,
	} {
		if got := pub.metric(series); got != want {
			t.Errorf("publisher %s = %v, want %v", series, got, want)
		}
	}
	if got := nodes[2].metric(`sidecar_pubsub_delivered_total{group="shipping",outcome="success",topic="orders"}`); got != n {
		t.Errorf("shipping's delivered_total for orders = %v, want %d", got, n)
	}
	groups := map[string]int{}
	for _, g := range pub.status().Groups {
		groups[g.Topic+"/"+g.Group] = g.Pending
	}
	// 5 queue groups, the broadcast group's fan-out and its 2 instances.
	if len(groups) != 8 || groups["orders/billing"] != 0 || groups["orders/shipping"] != 0 || groups["prices/pricecache"] != 0 {
		t.Errorf("/status groups = %v, want 8 lanes with nothing pending", groups)
	}
}

// TestPubSubCustody: messages published while the only group's instances
// are all down wait in the publisher's outbox; the publisher's sidecar is
// killed (-9) after its 204s and restarted on the same data_dir; the group
// comes back and gets every message. A subscriber sidecar killed (-9)
// mid-stream loses nothing and dead-letters nothing. Publishing keeps
// answering 204 while Consul is down.
// checkNATSCounts checks TestPubSubGroups' counts on the nats broker,
// where the subscribers' sidecars own the outcomes: /metrics of the
// publisher and the subscribers, and the subscribers' /status.
func checkNATSCounts(t *testing.T, pub *psNode, nodes []*psNode, n, k int) {
	t.Helper()
	if got := pub.metric(`sidecar_pubsub_published_total{result="ok",topic="orders"}`); got != float64(n+1) {
		t.Errorf("publisher's published_total for orders = %v, want %d", got, n+1)
	}
	sum := func(series string, ns ...*psNode) float64 {
		total := 0.0
		for _, node := range ns {
			total += max(node.metric(series), 0)
		}
		return total
	}
	billing := nodes[:2]
	consulagent.WaitFor(t, 10*time.Second, "the counts", func() bool {
		return sum(`sidecar_pubsub_outcomes_total{group="shipping",outcome="success",topic="poison.dlq"}`, nodes[2]) == 1
	})
	for series, want := range map[string]float64{
		`sidecar_pubsub_outcomes_total{group="billing",outcome="success",topic="orders"}`:     float64(n),
		`sidecar_pubsub_attempts_total{group="billing",topic="flaky"}`:                        float64(5 * (k + 1)),
		`sidecar_pubsub_dead_letters_total{group="billing",reason="rejected",topic="poison"}`: 1,
	} {
		if got := sum(series, billing...); got != want {
			t.Errorf("billing %s = %v, want %v", series, got, want)
		}
	}
	if got := nodes[2].metric(`sidecar_pubsub_delivered_total{group="shipping",outcome="success",topic="orders"}`); got != float64(n) {
		t.Errorf("shipping's delivered_total for orders = %v, want %d", got, n)
	}
	for _, g := range nodes[2].status().Groups {
		if g.Pending != 0 {
			t.Errorf("shipping /status %s/%s pending = %d, want 0", g.Topic, g.Group, g.Pending)
		}
	}
}

func TestPubSubCustody(t *testing.T) {
	if testing.Short() {
		t.Skip("integration test")
	}
	t.Parallel()
	agent := consulagent.Start(t, consulagent.Options{})
	apps := []*subApp{startSubApp(t), startSubApp(t)}
	var subs []*psNode
	for _, a := range apps {
		a.delay = 2 * time.Millisecond
		subs = append(subs, newPSNode(t, agent.Addr(), "audit", a, psSub{"events", "/events", "audit", ""}, psSub{"events.dlq", "/dlq", "audit", ""}))
	}
	subs[0].start()
	waitPeers(t, agent, "audit", 1, "events")
	// The whole group goes away.
	subs[0].proc.Signal(syscall.SIGTERM)
	subs[0].proc.Wait(15 * time.Second)
	waitPeers(t, agent, "audit", 0)

	pub := newPSNode(t, agent.Addr(), "", nil).start()
	const n = 200
	for i := range n {
		if code := pub.publish("events", fmt.Sprintf("e-%d", i), `{}`); code != 204 {
			t.Fatalf("publish e-%d = %d, want 204", i, code)
		}
	}
	pub.proc.Signal(syscall.SIGKILL)
	pub.proc.Wait(5 * time.Second)
	pub.start() // same data_dir
	if s := pub.status(); s.Outbox != n {
		t.Errorf("outbox after kill -9 and restart = %d, want %d", s.Outbox, n)
	}
	// Both instances come back; one is killed mid-stream.
	subs[0].start()
	subs[1].start()
	waitPeers(t, agent, "audit", 2)
	for i := n; i < 3*n; i++ {
		if code := pub.publish("events", fmt.Sprintf("e-%d", i), `{}`); code != 204 {
			t.Fatalf("publish e-%d = %d, want 204", i, code)
		}
		if i == n+n/2 {
			subs[1].proc.Signal(syscall.SIGKILL)
		}
	}
	consulagent.WaitFor(t, 60*time.Second, "every event delivered", func() bool {
		return len(union(apps[0].ids("/events"), apps[1].ids("/events"))) == 3*n
	})
	consulagent.WaitFor(t, 30*time.Second, "the outbox to empty", func() bool { return pub.status().Outbox == 0 })
	if d := union(apps[0].ids("/dlq"), apps[1].ids("/dlq")); len(d) != 0 {
		t.Errorf("%d dead letters, want none", len(d))
	}

	// Consul goes down: publishing still answers 204, and delivery goes on
	// to the instance already known.
	agent.Stop()
	for i := 3 * n; i < 3*n+50; i++ {
		if code := pub.publish("events", fmt.Sprintf("e-%d", i), `{}`); code != 204 {
			t.Fatalf("publish e-%d with Consul down = %d, want 204", i, code)
		}
	}
	consulagent.WaitFor(t, 30*time.Second, "delivery with Consul down", func() bool {
		return len(union(apps[0].ids("/events"), apps[1].ids("/events"))) == 3*n+50
	})
}

// TestPubSubDrain, for each broker: mid-stream, one subscriber gets SIGTERM (it finishes
// what is in flight and hands the rest back) and another's app crashes;
// the third instance gets the rest: nothing lost, nothing dead-lettered,
// and the drained sidecar exits cleanly.
func TestPubSubDrain(t *testing.T) { forBrokers(t, testPubSubDrain) }

func testPubSubDrain(t *testing.T, env *psEnv) {
	var apps []*subApp
	var subs []*psNode
	for range 3 {
		a := startSubApp(t)
		a.delay = 20 * time.Millisecond
		apps = append(apps, a)
		subs = append(subs, env.node(t, "ledger", a, psSub{"entries", "/entries", "ledger", ", max_in_flight: 8"}, psSub{"entries.dlq", "/dlq", "ledger", ""}).start())
	}
	env.waitGroup(t, "ledger", 3, false, "entries", "entries.dlq")
	pub := env.node(t, "", nil).start()
	const n = 600
	for i := range n {
		if code := pub.publish("entries", fmt.Sprintf("l-%d", i), `{}`); code != 204 {
			t.Fatalf("publish l-%d = %d, want 204", i, code)
		}
	}
	all := func() map[string][]int {
		return union(apps[0].ids("/entries"), apps[1].ids("/entries"), apps[2].ids("/entries"))
	}
	consulagent.WaitFor(t, 30*time.Second, "a first share delivered", func() bool { return len(all()) >= n/6 })
	subs[0].proc.Signal(syscall.SIGTERM)
	_ = apps[1].srv.Close() // the app crashes
	if code := subs[0].proc.Wait(20 * time.Second); code != 0 {
		t.Errorf("drained sidecar exit code = %d, want 0", code)
	}
	consulagent.WaitFor(t, 90*time.Second, "every entry delivered", func() bool { return len(all()) == n })
	consulagent.WaitFor(t, 30*time.Second, "the outbox to empty", func() bool { return pub.status().Outbox == 0 })
	env.waitSettled(t, subs[2])
	if d := union(apps[0].ids("/dlq"), apps[1].ids("/dlq"), apps[2].ids("/dlq")); len(d) != 0 {
		t.Errorf("%d dead letters, want none", len(d))
	}
	if len(apps[2].ids("/entries")) == 0 {
		t.Errorf("the surviving instance got nothing")
	}
}
