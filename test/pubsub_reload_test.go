package test

import (
	"encoding/json"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/sidecarlb/sidecar/test/consulagent"
)

// withSubs is n's file with subs in place of its subscriptions.
func (n *psNode) withSubs(subs ...psSub) string {
	cfg, _, _ := strings.Cut(n.cfg, "subscriptions:\n")
	if len(subs) == 0 {
		return cfg
	}
	var b strings.Builder
	b.WriteString(cfg + "subscriptions:\n")
	for _, s := range subs {
		fmt.Fprintf(&b, "  - {topic: %s, route: %s, group: %s, retry: {backoff: 20ms, max_backoff: 200ms}%s}\n", s.topic, s.route, s.group, s.extra)
	}
	return b.String()
}

// TestPubSubReloadSubscriptions changes a subscriber's subscriptions by
// SIGHUP while it runs: an added topic's messages arrive, a changed route
// takes the messages published after the reload (and the KV record
// follows), and a removed subscription hands its messages to the group's
// other instance: nothing lost, nothing dead-lettered. Removing the last
// subscription of a group takes its endpoint out of Consul.
func TestPubSubReloadSubscriptions(t *testing.T) {
	if testing.Short() {
		t.Skip("integration test")
	}
	t.Parallel()
	agent := consulagent.Start(t, consulagent.Options{})
	appA, appB := startSubApp(t), startSubApp(t)
	orders := psSub{"orders", "/orders", "ledger", ""}
	a := newPSNode(t, agent.Addr(), "ledger", appA, orders)
	sa := rlStart(t, a.admin, a.cfg)
	a.proc = sa.proc
	waitPeers(t, agent, "ledger", 1, "orders")
	pub := newPSNode(t, agent.Addr(), "", nil).start()
	publish := func(p *psNode, topic, prefix string, from, to int) {
		t.Helper()
		for i := from; i < to; i++ {
			if code := p.publish(topic, fmt.Sprintf("%s-%d", prefix, i), `{}`); code != 204 {
				t.Fatalf("publish %s-%d = %d, want 204", prefix, i, code)
			}
		}
	}
	publish(pub, "orders", "o", 0, 50)
	consulagent.WaitFor(t, 20*time.Second, "the first orders at /orders", func() bool { return len(appA.ids("/orders")) == 50 })

	// Added: a second topic's subscription starts.
	payments := psSub{"payments", "/payments", "ledger", ""}
	sa.hup(t, a.withSubs(orders, payments), "ok")
	waitPeers(t, agent, "ledger", 1, "payments")
	// A publisher started now knows the record from its first answer.
	pub2 := newPSNode(t, agent.Addr(), "", nil).start()
	publish(pub2, "payments", "p", 0, 100)
	consulagent.WaitFor(t, 20*time.Second, "every payment at /payments", func() bool { return len(appA.ids("/payments")) == 100 })

	// Changed: the route takes the messages published after the reload,
	// and the record publishers follow is rewritten.
	ordersV2 := psSub{"orders", "/v2/orders", "ledger", ", max_in_flight: 4"}
	sa.hup(t, a.withSubs(ordersV2, payments), "ok")
	consulagent.WaitFor(t, 10*time.Second, "the orders record with max_in_flight 4", func() bool {
		p, _, err := agent.Client().KV().Get("sidecar/pubsub/subscriptions/orders/ledger", nil)
		var rec struct {
			MaxInFlight int `json:"max_in_flight"`
		}
		return err == nil && p != nil && json.Unmarshal(p.Value, &rec) == nil && rec.MaxInFlight == 4
	})
	publish(pub, "orders", "o", 50, 100)
	consulagent.WaitFor(t, 20*time.Second, "the later orders at /v2/orders", func() bool { return len(appA.ids("/v2/orders")) == 50 })
	for id := range appA.ids("/orders") {
		var i int
		if _, err := fmt.Sscanf(id, "o-%d", &i); err != nil || i >= 50 {
			t.Errorf("%s delivered at the old route /orders after the reload", id)
		}
	}

	// Removed while messages flow: a second instance of the group takes
	// them all, none is lost or dead-lettered.
	newPSNode(t, agent.Addr(), "ledger", appB, ordersV2, psSub{"orders.dlq", "/dlq", "ledger", ""}).start()
	waitPeers(t, agent, "ledger", 2, "orders", "orders.dlq")
	appA.mu.Lock()
	appA.delay = 20 * time.Millisecond // so some are in flight at the reload
	appA.mu.Unlock()
	const n = 400
	publish(pub, "orders", "o", 100, 100+n)
	consulagent.WaitFor(t, 20*time.Second, "a share of the orders at the first instance", func() bool {
		return len(appA.ids("/v2/orders")) >= 50+20
	})
	sa.hup(t, a.withSubs(payments), "ok")
	publish(pub, "orders", "late", 0, 100) // after the reload: all to the second instance
	all := func() map[string][]int {
		return union(appA.ids("/orders"), appA.ids("/v2/orders"), appB.ids("/v2/orders"))
	}
	consulagent.WaitFor(t, 60*time.Second, "every order delivered", func() bool { return len(all()) == 100+n+100 })
	consulagent.WaitFor(t, 30*time.Second, "the outbox to empty", func() bool { return pub.status().Outbox == 0 })
	if d := union(appA.ids("/dlq"), appB.ids("/dlq")); len(d) != 0 {
		t.Errorf("%d dead letters, want none", len(d))
	}
	for id := range appA.ids("/v2/orders") {
		if strings.HasPrefix(id, "late-") {
			t.Errorf("%s delivered to the instance that unsubscribed before it was published", id)
		}
	}
	if got := len(appB.ids("/v2/orders")); got < 100 {
		t.Errorf("second instance got %d orders, want at least the 100 published after the reload", got)
	}
	// The group stays durable in KV for its other instances.
	if p, _, err := agent.Client().KV().Get("sidecar/pubsub/subscriptions/orders/ledger", nil); err != nil || p == nil {
		t.Errorf("orders/ledger record gone from KV (err %v)", err)
	}

	// Its last subscription removed, the instance leaves the group.
	sa.hup(t, a.withSubs(), "ok")
	waitPeers(t, agent, "ledger", 1)
}
