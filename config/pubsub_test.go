package config

import (
	"strings"
	"testing"
	"time"
)

const pubsubBase = "service: {name: orders, port: 9001, address: 10.0.0.7}\n"

func TestPubSubDefaults(t *testing.T) {
	t.Parallel()
	yaml := pubsubBase + `pubsub:
  listen: 127.0.0.1:15200
  data_dir: /tmp/ps
  http: {listen: 0.0.0.0:15300}
subscriptions:
  - {topic: orders, route: /events/orders}
`
	c, err := ParseEnv([]byte(yaml), "config.yaml", nil)
	if err != nil {
		t.Fatal(err)
	}
	ps := c.PubSub
	if ps.Name != "pubsub" || ps.Broker != "http" || ps.MaxMessageBytesN != 1<<20 || ps.HTTP.Advertise != "10.0.0.7:15300" {
		t.Errorf("PubSub = %+v, want name pubsub, broker http, 1MiB, advertise 10.0.0.7:15300", ps)
	}
	want := Subscription{
		Topic: "orders", Route: "/events/orders", Group: "orders", Delivery: "queue", ContentMode: "structured",
		MaxInFlight: 32, Timeout: 30 * time.Second, Ordering: "none",
		Retry:           RetryPolicy{MaxAttempts: 10, Backoff: 200 * time.Millisecond, MaxBackoff: 30 * time.Second},
		DeadLetterTopic: "orders.dlq",
	}
	if got := c.Subscriptions[0]; got != want {
		t.Errorf("Subscriptions[0] = %+v, want %+v", got, want)
	}
}

func TestPubSubErrors(t *testing.T) {
	t.Parallel()
	on := "pubsub: {listen: 127.0.0.1:15200, data_dir: /tmp/ps, http: {listen: 127.0.0.1:15300}}\n"
	tests := []struct {
		name string
		yaml string
		want []string
	}{
		{
			name: "subscription without service",
			yaml: on + "subscriptions: [{topic: a, route: /a}]",
			want: []string{`config.yaml: subscriptions: needs service: (deliveries go to service.address:service.port)`},
		},
		{
			name: "pubsub off",
			yaml: pubsubBase + "subscriptions: [{topic: a, route: /a}]",
			want: []string{`config.yaml: subscriptions: needs pubsub.listen: pub/sub is off`},
		},
		{
			name: "no data_dir, unknown broker, bad size",
			yaml: pubsubBase + "pubsub: {listen: 127.0.0.1:15200, broker: kafka, max_message_bytes: 1XB, name: 'a b'}",
			want: []string{
				`config.yaml: pubsub.max_message_bytes: unknown unit in "1XB" (want e.g. 512MiB, 512M, 1GB or a number of bytes)`,
				`config.yaml: pubsub.name: invalid name "a b": use letters, digits, '-', '_' and '.'`,
				`config.yaml: pubsub.broker: unknown "kafka" (want http or nats)`,
				`config.yaml: pubsub.data_dir: required when pubsub.listen is set (the durable outbox, retry state and dedup live there)`,
			},
		},
		{
			name: "no peer listener",
			yaml: pubsubBase + "pubsub: {listen: 127.0.0.1:15200, data_dir: /x}\nsubscriptions: [{topic: a, route: /a}]",
			want: []string{`config.yaml: pubsub.http.listen: required when there are subscriptions (where peer sidecars deliver)`},
		},
		{
			name: "every subscription key",
			yaml: pubsubBase + on + `subscriptions:
  - topic: "a b"
    route: events
    group: "x y"
    delivery: fanout
    content_mode: json
    max_in_flight: 0
    timeout: 0s
    ordering: random
    retry: {max_attempts: 0, backoff: 1s, max_backoff: 10ms}
    dead_letter_topic: "d/l"
  - {topic: t, route: /t, dead_letter_topic: t}
  - {topic: t, route: /u}
`,
			want: []string{
				`config.yaml: subscriptions[0].topic: invalid character ' ' in "a b" (allowed: A-Z, a-z, 0-9, '.', '_', '-')`,
				`config.yaml: subscriptions[0].route: must start with /, got "events"`,
				`config.yaml: subscriptions[0].group: invalid name "x y": use letters, digits, '-', '_' and '.'`,
				`config.yaml: subscriptions[0].delivery: unknown "fanout" (want queue or broadcast)`,
				`config.yaml: subscriptions[0].content_mode: unknown "json" (want structured, binary or raw)`,
				`config.yaml: subscriptions[0].max_in_flight: must be at least 1, got 0`,
				`config.yaml: subscriptions[0].timeout: must be greater than 0, got 0s`,
				`config.yaml: subscriptions[0].ordering: unknown "random" (want none or per_key)`,
				`config.yaml: subscriptions[0].retry.max_attempts: must be at least 1 (it counts the first delivery), got 0`,
				`config.yaml: subscriptions[0].retry.max_backoff: must be at least retry.backoff (1s), got 10ms`,
				`config.yaml: subscriptions[0].dead_letter_topic: invalid character '/' in "d/l" (allowed: A-Z, a-z, 0-9, '.', '_', '-')`,
				`config.yaml: subscriptions[1].dead_letter_topic: must differ from the topic "t"`,
				`config.yaml: subscriptions[2]: topic "t" and group "orders" are already subscribed by subscriptions[1]`,
			},
		},
		{
			name: "deliver_content_type",
			yaml: pubsubBase + on + `subscriptions:
  - {topic: a, route: /a, deliver_content_type: application/xml}
  - {topic: b, route: /b, deliver_content_type: application/json}
  - {topic: c, route: /c, deliver_content_type: application/json, descriptor_set: /nonexistent/set.pb}
  - {topic: d, route: /d, descriptor_set: /nonexistent/set.pb}
`,
			want: []string{
				`config.yaml: subscriptions[0].deliver_content_type: unknown "application/xml" (want application/json, or leave it unset to deliver payloads as published)`,
				`config.yaml: subscriptions[1].descriptor_set: required with deliver_content_type: application/json (the message types the payloads are)`,
				`config.yaml: subscriptions[2].descriptor_set: open /nonexistent/set.pb: no such file or directory`,
				`config.yaml: subscriptions[3].descriptor_set: is only used with deliver_content_type: application/json`,
			},
		},
		{
			name: "listener conflict",
			yaml: pubsubBase + "pubsub: {listen: 127.0.0.1:15100, data_dir: /x}",
			want: []string{`config.yaml: pubsub.listen: 127.0.0.1:15100 conflicts with admin.listen (127.0.0.1:15100)`},
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			_, err := ParseEnv([]byte(tc.yaml), "config.yaml", nil)
			if err == nil {
				t.Fatal("ParseEnv() = nil error, want problems")
			}
			if got, want := err.Error(), strings.Join(tc.want, "\n"); got != want {
				t.Errorf("ParseEnv() error:\n%s\nwant:\n%s", got, want)
			}
		})
	}
}

func TestCheckTopic(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		topic string
		ok    bool
	}{
		{"orders", true}, {"a.b-c_D9", true}, {strings.Repeat("a", 249), true},
		{"", false}, {strings.Repeat("a", 250), false}, {"a/b", false}, {"é", false},
	} {
		if err := CheckTopic(tc.topic); (err == nil) != tc.ok {
			t.Errorf("CheckTopic(%q) = %v, want ok %v", tc.topic, err, tc.ok)
		}
	}
}
