package config

import (
	"fmt"
	"net"
	"strings"
	"time"
)

// Brokers accepted by pubsub.broker.
const (
	BrokerHTTP = "http"
)

// Subscription delivery modes, content modes and orderings.
const (
	DeliveryQueue     = "queue"
	DeliveryBroadcast = "broadcast"

	ContentStructured = "structured"
	ContentBinary     = "binary"
	ContentRaw        = "raw"

	OrderingNone   = "none"
	OrderingPerKey = "per_key"
)

// MaxMessageBytesLimit is the largest pubsub.max_message_bytes accepted.
const MaxMessageBytesLimit = 64 << 20

var (
	brokers      = []string{BrokerHTTP, BrokerNATS}
	deliveries   = []string{DeliveryQueue, DeliveryBroadcast}
	contentModes = []string{ContentStructured, ContentBinary, ContentRaw}
	orderings    = []string{OrderingNone, OrderingPerKey}
)

// PubSub is the publish API on localhost and the broker behind it.
type PubSub struct {
	// Listen is the app's publish API (Dapr's paths). Empty (the default)
	// turns pub/sub off.
	Listen string `yaml:"listen"`
	// Name is the {pubsub} segment of the API paths; default "pubsub".
	Name string `yaml:"name"`
	// Broker carries messages between sidecars; default http.
	Broker string `yaml:"broker"`
	// DataDir holds the durable store (outbox, retry state, dedup).
	// Required with pub/sub.
	DataDir string `yaml:"data_dir"`
	// MaxMessageBytes bounds one message's data, as a size ("1MiB").
	// Default 1MiB.
	MaxMessageBytes string `yaml:"max_message_bytes"`
	// MaxMessageBytesN is MaxMessageBytes resolved by Load.
	MaxMessageBytesN int64      `yaml:"-"`
	HTTP             PubSubHTTP `yaml:"http"`
	NATS             PubSubNATS `yaml:"nats"`
}

// PubSubHTTP configures the http broker's peer listener.
type PubSubHTTP struct {
	// Listen is where peer sidecars deliver to this one; required when
	// there are subscriptions.
	Listen string `yaml:"listen"`
	// Advertise is the host:port peers dial. Default service.address and
	// Listen's port (no address when service.address is empty: Consul gives
	// peers the node's).
	Advertise string `yaml:"advertise"`
}

// Subscription is one topic the local app receives, at Route.
type Subscription struct {
	Topic string `yaml:"topic"` // required
	Route string `yaml:"route"` // required, starts with '/'
	// Group defaults to service.name: the instances of one group share the
	// messages.
	Group string `yaml:"group"`
	// Delivery queue (the default) gives each message to one instance of
	// the group; broadcast to every live instance.
	Delivery    string `yaml:"delivery"`
	ContentMode string `yaml:"content_mode"` // structured (default), binary or raw
	// MaxInFlight bounds concurrent deliveries to the app; default 32.
	MaxInFlight int `yaml:"max_in_flight"`
	// Timeout bounds one delivery attempt; default 30s.
	Timeout time.Duration `yaml:"timeout"`
	// Ordering per_key makes a group get the messages of one
	// Sidecar-Ordering-Key from one publisher one at a time, in publish
	// order; none (the default) sends them as they come.
	Ordering string      `yaml:"ordering"`
	Retry    RetryPolicy `yaml:"retry"`
	// DeadLetterTopic defaults to "<topic>.dlq".
	DeadLetterTopic string `yaml:"dead_letter_topic"`
	// DeliverContentType application/json delivers protobuf payloads as
	// JSON (protojson) when the event's dataschema names a message type of
	// DescriptorSet; "" (the default) delivers the payload as published.
	DeliverContentType string `yaml:"deliver_content_type"`
	// DescriptorSet is a FileDescriptorSet file (protoc --include_imports
	// --descriptor_set_out); required with deliver_content_type.
	DescriptorSet string `yaml:"descriptor_set"`
}

// DeliverJSON is the one deliver_content_type there is besides "".
const DeliverJSON = "application/json"

// RetryPolicy says how often and how fast a failed delivery is retried.
type RetryPolicy struct {
	// MaxAttempts counts every delivery, the first included; default 10.
	MaxAttempts int `yaml:"max_attempts"`
	// Backoff is the first delay, doubling and jittered; default 200ms.
	Backoff time.Duration `yaml:"backoff"`
	// MaxBackoff caps the delay; default 30s.
	MaxBackoff time.Duration `yaml:"max_backoff"`
}

func defaultPubSub() PubSub {
	return PubSub{Name: "pubsub", Broker: BrokerHTTP, MaxMessageBytes: "1MiB", NATS: defaultPubSubNATS()}
}

// setDefaults is called by the decoder on each new subscriptions element.
func (s *Subscription) setDefaults() {
	s.Delivery = DeliveryQueue
	s.ContentMode = ContentStructured
	s.MaxInFlight = 32
	s.Timeout = 30 * time.Second
	s.Ordering = OrderingNone
	s.Retry = RetryPolicy{MaxAttempts: 10, Backoff: 200 * time.Millisecond, MaxBackoff: 30 * time.Second}
}

// Enabled reports whether pub/sub is on.
func (ps *PubSub) Enabled() bool { return ps.Listen != "" }

// resolvePubSub parses sizes and fills the defaults that depend on other
// sections.
func (p *parser) resolvePubSub(c *Config) {
	ps := &c.PubSub
	if n, err := ParseBytes(ps.MaxMessageBytes); err != nil {
		p.errorf("pubsub.max_message_bytes", "%v", err)
	} else {
		ps.MaxMessageBytesN = n
	}
	if ps.HTTP.Advertise == "" && ps.HTTP.Listen != "" && c.Service != nil {
		if _, port, err := net.SplitHostPort(ps.HTTP.Listen); err == nil {
			ps.HTTP.Advertise = net.JoinHostPort(c.Service.Address, port)
		}
	}
	for i := range c.Subscriptions {
		s := &c.Subscriptions[i]
		if s.Group == "" && c.Service != nil {
			s.Group = c.Service.Name
		}
		if s.DeadLetterTopic == "" && s.Topic != "" {
			s.DeadLetterTopic = s.Topic + ".dlq"
		}
	}
}

func (p *parser) validatePubSub(c *Config) {
	ps := &c.PubSub
	on := ps.Listen != ""
	if on {
		p.hostPort("pubsub.listen", ps.Listen)
	}
	p.name("pubsub.name", ps.Name)
	p.oneOf("pubsub.broker", ps.Broker, brokers)
	if on && ps.DataDir == "" {
		p.errorf("pubsub.data_dir", "required when pubsub.listen is set (the durable outbox, retry state and dedup live there)")
	}
	if n, err := ParseBytes(ps.MaxMessageBytes); err == nil && (n < 1 || n > MaxMessageBytesLimit) {
		p.errorf("pubsub.max_message_bytes", "must be between 1 and 64MiB, got %q", ps.MaxMessageBytes)
	}
	if ps.HTTP.Listen != "" {
		p.hostPort("pubsub.http.listen", ps.HTTP.Listen)
	}
	if p.present("pubsub.http.advertise") && ps.HTTP.Advertise != "" {
		p.hostPort("pubsub.http.advertise", ps.HTTP.Advertise)
	}
	if ps.Broker == BrokerNATS {
		p.validateNATS(c)
	}
	if len(c.Subscriptions) == 0 {
		return
	}
	switch {
	case c.Service == nil:
		p.errorf("subscriptions", "needs service: (deliveries go to service.address:service.port)")
	case !on:
		p.errorf("subscriptions", "needs pubsub.listen: pub/sub is off")
	case ps.HTTP.Listen == "" && ps.Broker == BrokerHTTP:
		p.errorf("pubsub.http.listen", "required when there are subscriptions (where peer sidecars deliver)")
	}
	seen := map[string]int{}
	for i := range c.Subscriptions {
		p.validateSubscription(fmt.Sprintf("subscriptions[%d]", i), &c.Subscriptions[i], seen, i)
	}
}

func (p *parser) validateSubscription(path string, s *Subscription, seen map[string]int, i int) {
	if err := CheckTopic(s.Topic); err != nil {
		p.errorf(path+".topic", "%v", err)
	}
	switch {
	case s.Route == "":
		p.errorf(path+".route", "required (a path on the app, such as /events/orders)")
	case !strings.HasPrefix(s.Route, "/"):
		p.errorf(path+".route", "must start with /, got %q", s.Route)
	case strings.ContainsAny(s.Route, " \t\r\n?#"):
		p.errorf(path+".route", "must be a plain path, got %q", s.Route)
	}
	if s.Group != "" || p.present(path+".group") {
		p.name(path+".group", s.Group)
	}
	p.oneOf(path+".delivery", s.Delivery, deliveries)
	p.oneOf(path+".content_mode", s.ContentMode, contentModes)
	if s.MaxInFlight < 1 {
		p.errorf(path+".max_in_flight", "must be at least 1, got %d", s.MaxInFlight)
	}
	p.positive(path+".timeout", s.Timeout)
	p.oneOf(path+".ordering", s.Ordering, orderings)
	if s.Retry.MaxAttempts < 1 {
		p.errorf(path+".retry.max_attempts", "must be at least 1 (it counts the first delivery), got %d", s.Retry.MaxAttempts)
	}
	p.positive(path+".retry.backoff", s.Retry.Backoff)
	if s.Retry.MaxBackoff < s.Retry.Backoff {
		p.errorf(path+".retry.max_backoff", "must be at least retry.backoff (%s), got %s", s.Retry.Backoff, s.Retry.MaxBackoff)
	}
	if err := CheckTopic(s.DeadLetterTopic); err != nil && s.Topic != "" {
		p.errorf(path+".dead_letter_topic", "%v", err)
	} else if s.DeadLetterTopic == s.Topic && s.Topic != "" {
		p.errorf(path+".dead_letter_topic", "must differ from the topic %q", s.Topic)
	}
	p.checkDeliverContentType(path, s)
	key := s.Topic + "\x00" + s.Group
	if j, dup := seen[key]; dup {
		p.errorf(path, "topic %q and group %q are already subscribed by subscriptions[%d]", s.Topic, s.Group, j)
	} else {
		seen[key] = i
	}
}

// checkDeliverContentType checks a subscription's deliver_content_type
// and the descriptor set it needs.
func (p *parser) checkDeliverContentType(path string, s *Subscription) {
	switch s.DeliverContentType {
	case "":
		if s.DescriptorSet != "" {
			p.errorf(path+".descriptor_set", "is only used with deliver_content_type: %s", DeliverJSON)
		}
		return
	case DeliverJSON:
	default:
		p.errorf(path+".deliver_content_type", "unknown %q (want %s, or leave it unset to deliver payloads as published)", s.DeliverContentType, DeliverJSON)
		return
	}
	if s.DescriptorSet == "" {
		p.errorf(path+".descriptor_set", "required with deliver_content_type: %s (the message types the payloads are)", DeliverJSON)
	} else if err := checkDescriptorSet(s.DescriptorSet); err != nil {
		p.errorf(path+".descriptor_set", "%v", err)
	}
}

// CheckTopic accepts a topic name: 1-249 characters from [A-Za-z0-9._-].
func CheckTopic(t string) error {
	switch {
	case t == "":
		return fmt.Errorf("required (1-249 characters from A-Z, a-z, 0-9, '.', '_', '-')")
	case len(t) > 249:
		return fmt.Errorf("longer than 249 characters (%d)", len(t))
	}
	for i := 0; i < len(t); i++ {
		c := t[i]
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '.' || c == '_' || c == '-') {
			return fmt.Errorf("invalid character %q in %q (allowed: A-Z, a-z, 0-9, '.', '_', '-')", c, t)
		}
	}
	return nil
}
