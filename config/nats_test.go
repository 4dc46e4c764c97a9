package config

import (
	"reflect"
	"strings"
	"testing"
	"time"
)

func TestPubSubNATSDefaults(t *testing.T) {
	t.Parallel()
	yaml := pubsubBase + `pubsub:
  listen: 127.0.0.1:15200
  data_dir: /tmp/ps
  broker: nats
subscriptions:
  - {topic: orders, route: /events/orders}
`
	c, err := ParseEnv([]byte(yaml), "config.yaml", nil)
	if err != nil {
		t.Fatal(err)
	}
	want := PubSubNATS{
		URLs: []string{"nats://127.0.0.1:4222"}, Stream: "SIDECAR", SubjectPrefix: "sidecar",
		Replicas: 1, MaxAge: 168 * time.Hour, AckWait: 30 * time.Second, OnUnavailable: "spool",
	}
	if got := c.PubSub.NATS; !reflect.DeepEqual(got, want) {
		t.Errorf("PubSub.NATS = %+v, want %+v", got, want)
	}

	c, err = ParseEnv([]byte(pubsubBase+`pubsub:
  listen: 127.0.0.1:15200
  data_dir: /tmp/ps
  broker: nats
  nats: {urls: ["nats://a:4222", "tls://b:4222"], stream: ORDERS, subject_prefix: acme.events, replicas: 3, max_age: 24h, ack_wait: 5s, on_unavailable: reject}
`), "config.yaml", nil)
	if err != nil {
		t.Fatal(err)
	}
	want = PubSubNATS{
		URLs: []string{"nats://a:4222", "tls://b:4222"}, Stream: "ORDERS", SubjectPrefix: "acme.events",
		Replicas: 3, MaxAge: 24 * time.Hour, AckWait: 5 * time.Second, OnUnavailable: "reject",
	}
	if got := c.PubSub.NATS; !reflect.DeepEqual(got, want) {
		t.Errorf("PubSub.NATS = %+v, want %+v", got, want)
	}
}

func TestPubSubNATSErrors(t *testing.T) {
	t.Parallel()
	yaml := pubsubBase + `pubsub:
  listen: 127.0.0.1:15200
  data_dir: /tmp/ps
  broker: nats
  nats:
    urls: ["http://a:80", "nats://"]
    credentials_file: /nonexistent/x.creds
    stream: "a.b"
    subject_prefix: "a..b"
    replicas: 7
    max_age: 0s
    ack_wait: 10ms
    on_unavailable: drop
subscriptions:
  - {topic: orders, route: /events/orders}
`
	_, err := ParseEnv([]byte(yaml), "config.yaml", nil)
	if err == nil {
		t.Fatal("ParseEnv() = nil error, want problems")
	}
	want := []string{
		`config.yaml: pubsub.nats.urls[0]: want a nats://, tls://, ws:// or wss:// URL, got "http://a:80"`,
		`config.yaml: pubsub.nats.urls[1]: no host in "nats://"`,
		`config.yaml: pubsub.nats.credentials_file: stat /nonexistent/x.creds: no such file or directory`,
		`config.yaml: pubsub.nats.stream: invalid character '.' in "a.b" (allowed: A-Z, a-z, 0-9, '_', '-')`,
		`config.yaml: pubsub.nats.subject_prefix: token "" of "a..b": want 1-64 characters, got 0`,
		`config.yaml: pubsub.nats.replicas: must be between 1 and 5, got 7`,
		`config.yaml: pubsub.nats.max_age: must be greater than 0, got 0s`,
		`config.yaml: pubsub.nats.ack_wait: must be at least 1s, got 10ms`,
		`config.yaml: pubsub.nats.on_unavailable: unknown "drop" (want spool or reject)`,
	}
	for _, w := range want {
		if !strings.Contains(err.Error(), w) {
			t.Errorf("ParseEnv() error:\n%s\nwant a line:\n%s", err, w)
		}
	}
}
