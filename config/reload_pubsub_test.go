package config

import (
	"strings"
	"testing"
	"time"
)

// reloadPubSubBase is a subscriber's running file the reload cases change.
const reloadPubSubBase = `
service: {name: web, port: 9001}
consul: {address: 127.0.0.1:8500}
admin: {listen: 127.0.0.1:15100}
pubsub:
  listen: 127.0.0.1:3500
  data_dir: /var/lib/sidecar
  http: {listen: 127.0.0.1:15200}
subscriptions:
  - {topic: orders, route: /orders}
  - {topic: users, route: /users, group: audit}
`

func TestNewReloadSubscriptions(t *testing.T) {
	tests := []struct {
		name          string
		edit          func(string) string
		nats          bool // both files with broker: nats
		live, restart []string
	}{
		{
			name:    "the nats broker: subscriptions wait for the restart",
			nats:    true,
			edit:    func(s string) string { return s + "  - {topic: payments, route: /payments}\n" },
			restart: []string{"subscriptions[2]"},
		},
		{
			name: "added",
			edit: func(s string) string { return s + "  - {topic: payments, route: /payments}\n" },
			live: []string{"subscriptions[2]"},
		},
		{
			name: "removed, named by its running index",
			edit: func(s string) string { return strings.Replace(s, "  - {topic: orders, route: /orders}\n", "", 1) },
			live: []string{"subscriptions[0]"},
		},
		{
			name: "changed, matched by topic and group whatever the order",
			edit: func(s string) string {
				s = strings.Replace(s, "  - {topic: orders, route: /orders}\n", "", 1)
				return s + "  - {topic: orders, route: /v2/orders, max_in_flight: 4, retry: {max_attempts: 3}, delivery: broadcast, ordering: per_key}\n"
			},
			live: []string{"subscriptions[1].route", "subscriptions[1].delivery", "subscriptions[1].max_in_flight",
				"subscriptions[1].ordering", "subscriptions[1].retry.max_attempts"},
		},
		{
			name: "another group is another subscription",
			edit: func(s string) string { return strings.Replace(s, "group: audit", "group: audit2", 1) },
			live: []string{"subscriptions[1]", "subscriptions[1]"},
		},
		{
			name: "max_message_bytes live, other pubsub keys not",
			edit: func(s string) string {
				return strings.Replace(s, "data_dir: /var/lib/sidecar", "data_dir: /tmp/x\n  max_message_bytes: 2MiB\n  name: ps", 1)
			},
			live:    []string{"pubsub.max_message_bytes"},
			restart: []string{"pubsub.name", "pubsub.data_dir"},
		},
		{
			name: "peer listener moved: subscriptions wait for the restart",
			edit: func(s string) string {
				return strings.Replace(s, "127.0.0.1:15200", "127.0.0.1:15201", 1) + "  - {topic: payments, route: /payments}\n"
			},
			restart: []string{"pubsub.http.listen", "pubsub.http.advertise", "subscriptions[2]"},
		},
		{
			name: "service renamed: the default group would move, so restart",
			edit: func(s string) string { return strings.Replace(s, "name: web", "name: shop", 1) },
			// service.id follows from the name; another group is another
			// subscription, the new one added and the running one removed.
			restart: []string{"service.name", "service.id", "subscriptions[0]", "subscriptions[0]"},
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			running := mustParse(t, reloadPubSubBase)
			next := mustParse(t, tc.edit(reloadPubSubBase))
			if tc.nats {
				running = mustParse(t, natsBase(reloadPubSubBase))
				next = mustParse(t, natsBase(tc.edit(reloadPubSubBase)))
			}
			r := NewReload(running, next)
			if !equalKeys(r.Live, tc.live) {
				t.Errorf("Live = %q, want %q", r.Live, tc.live)
			}
			if !equalKeys(r.Restart, tc.restart) {
				t.Errorf("Restart = %q, want %q", r.Restart, tc.restart)
			}
			again := NewReload(r.Effective, next)
			if len(again.Live) > 0 || !equalKeys(again.Restart, tc.restart) {
				t.Errorf("second reload: Live = %q, Restart = %q, want none and %q", again.Live, again.Restart, tc.restart)
			}
		})
	}
}

// natsBase is a file with the nats broker in place of the http one.
func natsBase(s string) string {
	return strings.Replace(s, "  data_dir: /var/lib/sidecar\n", "  data_dir: /var/lib/sidecar\n  broker: nats\n", 1)
}

func TestNewReloadSubscriptionsEffective(t *testing.T) {
	running := mustParse(t, reloadPubSubBase)
	next := mustParse(t, strings.Replace(strings.Replace(reloadPubSubBase,
		"{topic: orders, route: /orders}", "{topic: orders, route: /v2/orders, timeout: 5s}", 1),
		"data_dir: /var/lib/sidecar", "data_dir: /var/lib/sidecar\n  max_message_bytes: 2MiB\n  name: ps", 1)+
		"  - {topic: payments, route: /payments}\n")
	eff := NewReload(running, next).Effective
	if n := len(eff.Subscriptions); n != 3 {
		t.Fatalf("len(Effective.Subscriptions) = %d, want 3", n)
	}
	s := eff.Subscriptions[0]
	if s.Route != "/v2/orders" || s.Timeout != 5*time.Second || s.Group != "web" {
		t.Errorf("Effective.Subscriptions[0] = %+v, want route /v2/orders, timeout 5s, group web", s)
	}
	if s := eff.Subscriptions[2]; s.Topic != "payments" || s.DeadLetterTopic != "payments.dlq" {
		t.Errorf("Effective.Subscriptions[2] = %+v, want payments with its defaults", s)
	}
	if eff.PubSub.MaxMessageBytesN != 2<<20 {
		t.Errorf("Effective.PubSub.MaxMessageBytesN = %d, want 2MiB", eff.PubSub.MaxMessageBytesN)
	}
	if eff.PubSub.Name != "pubsub" {
		t.Errorf("Effective.PubSub.Name = %q, want the running pubsub", eff.PubSub.Name)
	}

	// Pub/sub off in the running file: nothing under pubsub or
	// subscriptions applies live.
	off := mustParse(t, reloadBase)
	r := NewReload(off, next)
	if len(r.Effective.Subscriptions) != 0 || r.Effective.PubSub.Enabled() {
		t.Errorf("from pub/sub off: Effective has %d subscriptions, pubsub on %v; want none, off", len(r.Effective.Subscriptions), r.Effective.PubSub.Enabled())
	}
}
