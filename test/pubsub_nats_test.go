package test

// Failure tests of the nats broker: real sidecars and a real nats-server.

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/sidecarlb/sidecar/test/consulagent"
	"github.com/sidecarlb/sidecar/test/natsserver"
)

func newNATSEnv(t *testing.T) *psEnv {
	if testing.Short() {
		t.Skip("integration test")
	}
	t.Parallel()
	return &psEnv{broker: "nats", agent: consulagent.Start(t, consulagent.Options{}), nats: natsserver.Start(t)}
}

// TestPubSubNATSKillSubscriber: one of a group's two subscriber sidecars is
// killed (-9) mid-stream: what it had pulled comes again after ack_wait and
// the other instance gets everything; nothing lost, nothing dead-lettered.
// The killed sidecar comes back and takes its share again.
func TestPubSubNATSKillSubscriber(t *testing.T) {
	env := newNATSEnv(t)
	apps := []*subApp{startSubApp(t), startSubApp(t)}
	var subs []*psNode
	for _, a := range apps {
		a.delay = 5 * time.Millisecond
		subs = append(subs, env.node(t, "audit", a, psSub{"events", "/events", "audit", ", max_in_flight: 8"}, psSub{"events.dlq", "/dlq", "audit", ""}).start())
	}
	env.waitGroup(t, "audit", 2, false, "events")
	pub := env.node(t, "", nil).start()
	const n = 600
	for i := range n {
		if code := pub.publish("events", fmt.Sprintf("e-%d", i), `{}`); code != 204 {
			t.Fatalf("publish e-%d = %d, want 204", i, code)
		}
		if i == n/3 {
			subs[1].proc.Signal(syscall.SIGKILL)
			subs[1].proc.Wait(5 * time.Second)
		}
	}
	all := func() map[string][]int { return union(apps[0].ids("/events"), apps[1].ids("/events")) }
	consulagent.WaitFor(t, 60*time.Second, "every event delivered", func() bool { return len(all()) == n })
	if d := union(apps[0].ids("/dlq"), apps[1].ids("/dlq")); len(d) != 0 {
		t.Errorf("%d dead letters, want none", len(d))
	}
	before := len(apps[1].ids("/events"))
	subs[1].start()
	env.waitGroup(t, "audit", 2, false, "events")
	for i := n; i < n+200; i++ {
		if code := pub.publish("events", fmt.Sprintf("e-%d", i), `{}`); code != 204 {
			t.Fatalf("publish e-%d = %d, want 204", i, code)
		}
	}
	consulagent.WaitFor(t, 30*time.Second, "every event delivered after the restart", func() bool { return len(all()) == n+200 })
	if after := len(apps[1].ids("/events")); after == before {
		t.Errorf("the restarted instance got nothing of the last 200")
	}
	env.waitSettled(t, subs...)
}

// TestPubSubNATSUnavailable: with on_unavailable: reject, publishing
// answers 503 with Retry-After while nats-server is down (killed -9), and
// 204 again once it is back on the same store; what was published before
// the crash is delivered after it, with what was published since.
func TestPubSubNATSUnavailable(t *testing.T) {
	env := newNATSEnv(t)
	app := startSubApp(t)
	sub := env.node(t, "stock", app, psSub{"moves", "/moves", "stock", ""}).start()
	env.waitGroup(t, "stock", 1, false, "moves")
	pub := env.node(t, "", nil).start()
	app.mu.Lock()
	app.delay = 50 * time.Millisecond // some still unacked at the crash
	app.mu.Unlock()
	for i := range 50 {
		if code := pub.publish("moves", fmt.Sprintf("m-%d", i), `{}`); code != 204 {
			t.Fatalf("publish m-%d = %d, want 204", i, code)
		}
	}
	env.nats.Kill()
	consulagent.WaitFor(t, 10*time.Second, "503 with NATS down", func() bool {
		req, _ := http.NewRequest("POST", "http://"+pub.api+"/v1.0/publish/pubsub/moves", strings.NewReader(`{}`))
		req.Header.Set("Idempotency-Key", "down")
		resp, err := adminHTTP.Do(req)
		if err != nil {
			return false
		}
		resp.Body.Close()
		if resp.StatusCode == 503 && resp.Header.Get("Retry-After") == "" {
			t.Errorf("503 without Retry-After")
		}
		return resp.StatusCode == 503
	})
	if got := pub.metric("sidecar_pubsub_nats_connected"); got != 0 {
		t.Errorf("sidecar_pubsub_nats_connected with NATS down = %v, want 0", got)
	}
	if s := pub.natsStatus(); s.Connected {
		t.Errorf("/status connected = true with NATS down")
	}
	env.nats.Start()
	consulagent.WaitFor(t, 20*time.Second, "204 with NATS back", func() bool { return pub.publish("moves", "m-50", `{}`) == 204 })
	for i := 51; i < 100; i++ {
		if code := pub.publish("moves", fmt.Sprintf("m-%d", i), `{}`); code != 204 {
			t.Fatalf("publish m-%d = %d, want 204", i, code)
		}
	}
	consulagent.WaitFor(t, 60*time.Second, "every move delivered", func() bool { return len(app.ids("/moves")) == 100 })
	if got := pub.metric("sidecar_pubsub_nats_connected"); got != 1 {
		t.Errorf("sidecar_pubsub_nats_connected with NATS back = %v, want 1", got)
	}
	if _, ok := app.ids("/moves")["down"]; ok {
		t.Errorf("the message answered 503 was delivered")
	}
	env.waitSettled(t, sub)
}

// TestPubSubNATSSpool: with on_unavailable: spool, publishing under load
// answers 204 for every message while nats-server is killed (-9) and
// restarted on the same store; the publisher's sidecar is itself killed
// (-9) while messages wait in its spool and restarted on the same
// data_dir; every message is delivered.
func TestPubSubNATSSpool(t *testing.T) {
	env := newNATSEnv(t)
	app := startSubApp(t)
	sub := env.node(t, "stock", app, psSub{"moves", "/moves", "stock", ""}).start()
	env.waitGroup(t, "stock", 1, false, "moves")
	pub := env.node(t, "", nil)
	pub.cfg = strings.Replace(pub.cfg, "on_unavailable: reject", "on_unavailable: spool", 1)
	pub.start()
	const n = 300
	for i := range n {
		switch i {
		case n / 3:
			env.nats.Kill()
		case n / 2:
			// Messages wait in the spool: the publisher's sidecar crashes.
			if s := pub.status(); s.Spooled == 0 {
				t.Errorf("spooled = 0 with NATS down, want some")
			}
			pub.proc.Signal(syscall.SIGKILL)
			pub.proc.Wait(5 * time.Second)
			pub.start()
		case 2 * n / 3:
			env.nats.Start()
		}
		if code := pub.publish("moves", fmt.Sprintf("m-%d", i), `{}`); code != 204 {
			t.Fatalf("publish m-%d = %d, want 204", i, code)
		}
	}
	consulagent.WaitFor(t, 60*time.Second, "every move delivered", func() bool { return len(app.ids("/moves")) == n })
	consulagent.WaitFor(t, 10*time.Second, "the spool to empty", func() bool { return pub.status().Spooled == 0 })
	env.waitSettled(t, sub)
}

// TestPubSubNATSCluster: a 3-node NATS cluster with replicas: 3 loses one
// node (kill -9) under publish load: with on_unavailable: spool no publish
// fails, and every message is delivered (0 lost).
func TestPubSubNATSCluster(t *testing.T) {
	if testing.Short() {
		t.Skip("integration test")
	}
	t.Parallel()
	nodes := natsserver.StartCluster(t, 3)
	env := &psEnv{broker: "nats", agent: consulagent.Start(t, consulagent.Options{}), nats: nodes[0]}
	var urls []string
	for _, n := range nodes {
		urls = append(urls, fmt.Sprintf("%q", n.URL()))
	}
	cluster := func(n *psNode) *psNode {
		n.cfg = strings.Replace(n.cfg, fmt.Sprintf("urls: [%q], ack_wait: 5s, on_unavailable: reject", nodes[0].URL()),
			"urls: ["+strings.Join(urls, ", ")+"], ack_wait: 5s, on_unavailable: spool, replicas: 3", 1)
		return n.start()
	}
	app := startSubApp(t)
	sub := cluster(env.node(t, "ledger", app, psSub{"entries", "/entries", "ledger", ""}))
	consulagent.WaitFor(t, 60*time.Second, "the consumer on the cluster", func() bool {
		for _, g := range sub.status().Groups {
			if g.Pending == 0 {
				return true
			}
		}
		return false
	})
	nc, err := nats.Connect(nodes[0].URL())
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()
	js, _ := jetstream.New(nc)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	st, err := js.Stream(ctx, "SIDECAR")
	if err != nil {
		t.Fatal(err)
	}
	if info := st.CachedInfo(); info.Config.Replicas != 3 || info.Cluster == nil || len(info.Cluster.Replicas) != 2 {
		t.Fatalf("stream replicas = %d, cluster %+v; want 3 (a leader and 2 replicas)", info.Config.Replicas, info.Cluster)
	}
	pub := cluster(env.node(t, "", nil))
	const n = 600
	for i := range n {
		if i == n/3 {
			nodes[2].Kill()
		}
		if code := pub.publish("entries", fmt.Sprintf("c-%d", i), `{}`); code != 204 {
			t.Fatalf("publish c-%d = %d, want 204", i, code)
		}
	}
	consulagent.WaitFor(t, 90*time.Second, "every entry delivered", func() bool { return len(app.ids("/entries")) == n })
	consulagent.WaitFor(t, 30*time.Second, "the spool to empty", func() bool { return pub.status().Spooled == 0 })
}

// natsStatus returns the nats broker's part of the sidecar's /status.
func (n *psNode) natsStatus() (s struct {
	Connected bool `json:"connected"`
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

// TestPubSubNATSGroupDown: a group that has subscribed once is durable:
// messages published while its only instance is down (SIGTERM) are
// delivered when it comes back, each once, attempt 1.
func TestPubSubNATSGroupDown(t *testing.T) {
	env := newNATSEnv(t)
	app := startSubApp(t)
	sub := env.node(t, "audit", app, psSub{"events", "/events", "audit", ""}).start()
	env.waitGroup(t, "audit", 1, false, "events")
	sub.proc.Signal(syscall.SIGTERM)
	if code := sub.proc.Wait(15 * time.Second); code != 0 {
		t.Errorf("drained sidecar exit code = %d, want 0", code)
	}
	pub := env.node(t, "", nil).start()
	const n = 100
	for i := range n {
		if code := pub.publish("events", fmt.Sprintf("e-%d", i), `{}`); code != 204 {
			t.Fatalf("publish e-%d = %d, want 204", i, code)
		}
	}
	sub.start()
	consulagent.WaitFor(t, 30*time.Second, "every event delivered", func() bool { return len(app.ids("/events")) == n })
	env.waitSettled(t, sub)
	for id, at := range app.ids("/events") {
		if len(at) != 1 || at[0] != 1 {
			t.Errorf("%s delivered with attempts %v, want [1]", id, at)
		}
	}
}
