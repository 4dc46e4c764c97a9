package config

import (
	"fmt"
	"net/url"
	"os"
	"strings"
	"time"
)

// BrokerNATS is pubsub.broker's NATS JetStream broker.
const BrokerNATS = "nats"

// What pubsub.nats.on_unavailable accepts.
const (
	UnavailableSpool  = "spool"
	UnavailableReject = "reject"
)

var unavailables = []string{UnavailableSpool, UnavailableReject}

// PubSubNATS configures the NATS JetStream broker (pubsub.broker: nats).
type PubSubNATS struct {
	// URLs are the NATS servers; default ["nats://127.0.0.1:4222"].
	URLs []string `yaml:"urls"`
	// CredentialsFile is a NATS .creds file; default none.
	CredentialsFile string `yaml:"credentials_file"`
	// Stream is the JetStream stream, created if missing with the subjects
	// "<subject_prefix>.>"; default SIDECAR.
	Stream string `yaml:"stream"`
	// SubjectPrefix is the first token of every subject; default sidecar.
	SubjectPrefix string `yaml:"subject_prefix"`
	// Replicas of a stream the sidecar creates; default 1.
	Replicas int `yaml:"replicas"`
	// MaxAge is the stream's retention; default 168h.
	MaxAge time.Duration `yaml:"max_age"`
	// AckWait is how long JetStream waits for an ack before redelivering;
	// the sidecar sends in-progress acks while the app works. Default 30s.
	AckWait time.Duration `yaml:"ack_wait"`
	// OnUnavailable says what publishing does while NATS is down: spool
	// (the default) or reject (503 with Retry-After).
	OnUnavailable string `yaml:"on_unavailable"`
}

func defaultPubSubNATS() PubSubNATS {
	return PubSubNATS{
		URLs: []string{"nats://127.0.0.1:4222"}, Stream: "SIDECAR", SubjectPrefix: "sidecar",
		Replicas: 1, MaxAge: 168 * time.Hour, AckWait: 30 * time.Second, OnUnavailable: UnavailableSpool,
	}
}

// validateNATS checks pubsub.nats; only when the broker is nats.
func (p *parser) validateNATS(c *Config) {
	n := &c.PubSub.NATS
	if len(n.URLs) == 0 {
		p.errorf("pubsub.nats.urls", "at least one NATS server URL is required, such as nats://127.0.0.1:4222")
	}
	for i, s := range n.URLs {
		path := fmt.Sprintf("pubsub.nats.urls[%d]", i)
		u, err := url.Parse(s)
		switch {
		case err != nil:
			p.errorf(path, "%v", err)
		case u.Scheme != "nats" && u.Scheme != "tls" && u.Scheme != "ws" && u.Scheme != "wss":
			p.errorf(path, "want a nats://, tls://, ws:// or wss:// URL, got %q", s)
		case u.Host == "":
			p.errorf(path, "no host in %q", s)
		}
	}
	if n.CredentialsFile != "" {
		if _, err := os.Stat(n.CredentialsFile); err != nil {
			p.errorf("pubsub.nats.credentials_file", "%v", err)
		}
	}
	if err := checkNATSName(n.Stream); err != nil {
		p.errorf("pubsub.nats.stream", "%v", err)
	}
	if n.SubjectPrefix == "" {
		p.errorf("pubsub.nats.subject_prefix", "required (the first token of every subject, such as sidecar)")
	}
	for _, tok := range strings.Split(n.SubjectPrefix, ".") {
		if err := checkNATSName(tok); err != nil && n.SubjectPrefix != "" {
			p.errorf("pubsub.nats.subject_prefix", "token %q of %q: %v", tok, n.SubjectPrefix, err)
			break
		}
	}
	if n.Replicas < 1 || n.Replicas > 5 {
		p.errorf("pubsub.nats.replicas", "must be between 1 and 5, got %d", n.Replicas)
	}
	p.positive("pubsub.nats.max_age", n.MaxAge)
	if n.AckWait < time.Second {
		p.errorf("pubsub.nats.ack_wait", "must be at least 1s, got %s", n.AckWait)
	}
	p.oneOf("pubsub.nats.on_unavailable", n.OnUnavailable, unavailables)
}

// checkNATSName accepts a stream name or subject token: 1-64 characters
// from A-Z, a-z, 0-9, '_' and '-'.
func checkNATSName(s string) error {
	if s == "" || len(s) > 64 {
		return fmt.Errorf("want 1-64 characters, got %d", len(s))
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '_' || c == '-') {
			return fmt.Errorf("invalid character %q in %q (allowed: A-Z, a-z, 0-9, '_', '-')", c, s)
		}
	}
	return nil
}
