package natsbroker

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	lru "github.com/hashicorp/golang-lru/v2"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"go.uber.org/zap"

	"github.com/sidecarlb/sidecar/pubsub"
	"github.com/sidecarlb/sidecar/pubsub/store"
)

// ErrUnavailable is returned by Publish while NATS cannot be reached.
var ErrUnavailable = errors.New("nats unavailable")

// duplicateWindow is the stream's Nats-Msg-Id window: the API's 10 minutes
// of Idempotency-Key dedup.
const duplicateWindow = 10 * time.Minute

// broadcastIdle is how long the server keeps a broadcast instance's
// consumer without it.
const broadcastIdle = time.Hour

// Options configure a Broker; they mirror pubsub.nats.
type Options struct {
	URLs            []string
	CredentialsFile string
	Stream          string        // if empty, SIDECAR
	SubjectPrefix   string        // if empty, sidecar
	Replicas        int           // if zero, 1
	MaxAge          time.Duration // if zero, 168h
	AckWait         time.Duration // if zero, 30s
	// Name is the connection's name, shown by the server.
	Name string
	// Instance names this sidecar's broadcast consumers (service.id).
	Instance string
	// PublishTimeout bounds one Publish; if zero, 5s.
	PublishTimeout time.Duration
	// PublishWindow bounds the messages published and not yet acknowledged
	// by JetStream, across every Publish of this sidecar (a Publish past it
	// waits for acks, within PublishTimeout); if zero,
	// pubsub.MaxBulkEntries, room for a whole bulk request.
	PublishWindow int
	Metrics       *pubsub.Metrics
	// Spool, if set, takes the messages Publish cannot hand to JetStream
	// (pubsub.nats.on_unavailable: spool); Run forwards them. If nil,
	// Publish fails while NATS is unreachable (reject).
	Spool *store.Store
}

// Subscription is one topic and group this sidecar consumes.
type Subscription struct {
	Topic       string
	Group       string
	Broadcast   bool
	MaxInFlight int
	Policy      pubsub.Policy
	DeadLetter  string // the dead-letter topic
	// PerKey (ordering: per_key) makes the group's consumer give out one
	// message at a time, in stream order, so a key's next message waits
	// for the one before to have a final outcome, retries included, across
	// instances. It holds for every key at once: the group gets no
	// concurrency.
	PerKey bool
}

// Broker publishes to and consumes from JetStream. Publish is safe for
// concurrent use.
type Broker struct {
	opts Options
	nc   *nats.Conn
	js   jetstream.JetStream
	app  *pubsub.App
	subs []Subscription
	log  *zap.Logger

	streamMu    sync.Mutex
	streamReady atomic.Bool
	inFlight    []atomic.Int64 // per subscription

	// refused counts, per message still unsettled here, the deliveries
	// JetStream made that never reached the app (unhealthy, not listening):
	// they are not attempts, and the attempt number leaves them out as the
	// http broker's does. Bounded (the least recently seen go first; a
	// stream sequence never comes back, so settled ones need no removal);
	// a refusal by another instance of the group is not known here.
	refused *lru.Cache[refusalKey, int]
}

// refusalKey names a message of one subscription.
type refusalKey struct {
	topic, group string
	seq          uint64 // the stream sequence
}

// maxRefusals bounds Broker.refused.
const maxRefusals = 4096

// New connects to NATS (in the background: a server that is down now is
// retried for ever) and returns the broker. app delivers to the local app;
// nil, with no subs, for a sidecar that only publishes.
func New(opts Options, app *pubsub.App, subs []Subscription, log *zap.Logger) (*Broker, error) {
	if opts.Stream == "" {
		opts.Stream = "SIDECAR"
	}
	if opts.SubjectPrefix == "" {
		opts.SubjectPrefix = "sidecar"
	}
	if opts.Replicas == 0 {
		opts.Replicas = 1
	}
	if opts.MaxAge == 0 {
		opts.MaxAge = 168 * time.Hour
	}
	if opts.AckWait == 0 {
		opts.AckWait = 30 * time.Second
	}
	if opts.PublishTimeout == 0 {
		opts.PublishTimeout = 5 * time.Second
	}
	if opts.PublishWindow == 0 {
		opts.PublishWindow = pubsub.MaxBulkEntries
	}
	refused, _ := lru.New[refusalKey, int](maxRefusals)
	b := &Broker{opts: opts, app: app, subs: subs, log: log, inFlight: make([]atomic.Int64, len(subs)), refused: refused}
	nopts := []nats.Option{
		nats.Name(opts.Name),
		nats.MaxReconnects(-1),
		nats.RetryOnFailedConnect(true),
		nats.ReconnectWait(250 * time.Millisecond),
		// No buffering while disconnected: a publish then fails at once
		// (503) rather than being sent later, after its answer.
		nats.ReconnectBufSize(-1),
		nats.ReconnectJitter(100*time.Millisecond, time.Second),
		nats.DisconnectErrHandler(func(_ *nats.Conn, err error) {
			log.Warn("nats disconnected", zap.Error(err))
		}),
		nats.ReconnectHandler(func(c *nats.Conn) {
			log.Info("nats reconnected", zap.String("server", c.ConnectedUrlRedacted()))
		}),
	}
	if opts.CredentialsFile != "" {
		nopts = append(nopts, nats.UserCredentials(opts.CredentialsFile))
	}
	nc, err := nats.Connect(strings.Join(opts.URLs, ","), nopts...)
	if err != nil {
		return nil, fmt.Errorf("connect to nats %v: %w", opts.URLs, err)
	}
	js, err := jetstream.New(nc,
		// The in-flight window every publish of this sidecar shares: one
		// connection pipelining them all; a publish past it waits.
		jetstream.WithPublishAsyncMaxPending(opts.PublishWindow),
		// A publish that got no ack in time gives up its slot.
		jetstream.WithPublishAsyncTimeout(opts.PublishTimeout))
	if err != nil {
		nc.Close()
		return nil, fmt.Errorf("jetstream: %w", err)
	}
	b.nc, b.js = nc, js
	return b, nil
}

// Connected reports whether the connection to NATS is up.
func (b *Broker) Connected() bool { return b.nc.IsConnected() }

// Close closes the connection; call it after Run has returned.
func (b *Broker) Close() { b.nc.Close() }

// Subject is the subject a topic's messages are published to:
// "<prefix>.<topic>", a topic's dots separating tokens and an empty token
// written "%" (no topic contains '%', so every topic has its own subject).
func Subject(prefix, topic string) string {
	toks := strings.Split(topic, ".")
	for i, t := range toks {
		if t == "" {
			toks[i] = "%"
		}
	}
	return prefix + "." + strings.Join(toks, ".")
}

// ConsumerName is the durable consumer of a group on a topic; instance is
// "" for a queue group, the sidecar's instance for a broadcast one.
func ConsumerName(topic, group, instance string) string {
	h := sha256.Sum256([]byte(topic + "\x00" + group + "\x00" + instance))
	clean := func(s string, n int) string {
		s = strings.NewReplacer(".", "_", "*", "_", ">", "_", " ", "_", "/", "_", "\\", "_").Replace(s)
		if len(s) > n {
			s = s[:n]
		}
		return s
	}
	name := clean(group, 40) + "__" + clean(topic, 60)
	if instance != "" {
		name += "__" + clean(instance, 40)
	}
	return name + "__" + hex.EncodeToString(h[:4])
}

// ensureStream creates the stream if it does not exist; an existing stream
// is left as it is.
func (b *Broker) ensureStream(ctx context.Context) error {
	if b.streamReady.Load() {
		return nil
	}
	b.streamMu.Lock()
	defer b.streamMu.Unlock()
	if b.streamReady.Load() {
		return nil
	}
	_, err := b.js.Stream(ctx, b.opts.Stream)
	if errors.Is(err, jetstream.ErrStreamNotFound) {
		_, err = b.js.CreateStream(ctx, jetstream.StreamConfig{
			Name:        b.opts.Stream,
			Description: "sidecar pub/sub",
			Subjects:    []string{b.opts.SubjectPrefix + ".>"},
			Storage:     jetstream.FileStorage,
			Replicas:    b.opts.Replicas,
			MaxAge:      b.opts.MaxAge,
			Duplicates:  duplicateWindow,
			Retention:   jetstream.LimitsPolicy,
			Discard:     jetstream.DiscardOld,
		})
		if errors.Is(err, jetstream.ErrStreamNameAlreadyInUse) {
			err = nil
		}
	}
	if err != nil {
		return fmt.Errorf("stream %s: %w", b.opts.Stream, err)
	}
	b.streamReady.Store(true)
	return nil
}

// Publish implements pubsub.Sink: it returns once JetStream has
// acknowledged every message. A message whose Nats-Msg-Id the server saw
// within the duplicate window is reported in dup. On an error some
// messages may be stored: they are delivered, which at-least-once allows.
func (b *Broker) Publish(pubs []pubsub.Publication) ([]bool, error) {
	dup, err := b.publishAll(pubs)
	if err != nil && b.opts.Spool != nil {
		return b.spool(pubs)
	}
	return dup, err
}

func (b *Broker) publishAll(pubs []pubsub.Publication) ([]bool, error) {
	if !b.nc.IsConnected() {
		return nil, ErrUnavailable
	}
	ctx, cancel := context.WithTimeout(context.Background(), b.opts.PublishTimeout)
	defer cancel()
	if err := b.ensureStream(ctx); err != nil {
		return nil, errors.Join(ErrUnavailable, err)
	}
	// Every message is sent before any ack is awaited: concurrent
	// requests and the entries of a bulk share the connection's pipeline
	// instead of waiting for one round trip each.
	var one [1]jetstream.PubAckFuture
	futures := one[:]
	if len(pubs) > 1 {
		futures = make([]jetstream.PubAckFuture, len(pubs))
	}
	for i, p := range pubs {
		msg, err := b.natsMsg(p.Msg, p.Msg.ID)
		if err != nil {
			return nil, err
		}
		if futures[i], err = b.publishAsync(ctx, msg); err != nil {
			return nil, fmt.Errorf("publish %d of %d: %w", i+1, len(pubs), err)
		}
	}
	dup := make([]bool, len(pubs))
	for i, f := range futures {
		select {
		case ack := <-f.Ok():
			dup[i] = ack.Duplicate
		case err := <-f.Err():
			if !b.nc.IsConnected() {
				err = errors.Join(ErrUnavailable, err)
			}
			return nil, fmt.Errorf("publish %d of %d: %w", i+1, len(pubs), err)
		case <-ctx.Done():
			return nil, fmt.Errorf("publish %d of %d: no ack from nats: %w", i+1, len(pubs), ctx.Err())
		}
	}
	return dup, nil
}

// publishAsync sends msg without waiting for its ack, waiting (until ctx
// ends) while PublishWindow messages are unacknowledged.
func (b *Broker) publishAsync(ctx context.Context, msg *nats.Msg) (jetstream.PubAckFuture, error) {
	for {
		f, err := b.js.PublishMsgAsync(msg)
		if !errors.Is(err, jetstream.ErrTooManyStalledMsgs) {
			if err != nil && !b.nc.IsConnected() {
				err = errors.Join(ErrUnavailable, err)
			}
			return f, err
		}
		if ctx.Err() != nil {
			return nil, fmt.Errorf("%w: %w", err, ctx.Err())
		}
	}
}

func (b *Broker) natsMsg(m *pubsub.Message, msgID string) (*nats.Msg, error) {
	msg, err := encodeMsg(Subject(b.opts.SubjectPrefix, m.Topic), m)
	if err != nil {
		return nil, err
	}
	msg.Header.Set(jetstream.MsgIDHeader, msgID)
	return msg, nil
}

func (b *Broker) publish(ctx context.Context, m *pubsub.Message, msgID string) (*jetstream.PubAck, error) {
	msg, err := b.natsMsg(m, msgID)
	if err != nil {
		return nil, err
	}
	ack, err := b.js.PublishMsg(ctx, msg)
	if err != nil {
		if !b.nc.IsConnected() {
			err = errors.Join(ErrUnavailable, err)
		}
		return nil, fmt.Errorf("publish to %s: %w", msg.Subject, err)
	}
	return ack, nil
}

// Run creates the stream and the consumers, retrying while NATS is down,
// forwards the spool, and delivers until ctx ends; then it returns once every delivery has
// come back (acked, or nak'd to be sent again).
func (b *Broker) Run(ctx context.Context) {
	var wg sync.WaitGroup
	if b.opts.Spool != nil {
		wg.Go(func() { b.forward(ctx) })
	}
	for i := range b.subs {
		wg.Go(func() { b.consume(ctx, i) })
	}
	wg.Wait()
}

// Status is the broker's state for /status.
type Status struct {
	Broker    string        `json:"broker"`
	Connected bool          `json:"connected"`
	Server    string        `json:"server,omitempty"`
	Stream    string        `json:"stream"`
	Spooled   int           `json:"spooled"` // messages waiting in the spool for NATS
	Groups    []GroupStatus `json:"groups"`
}

// GroupStatus is one subscription's consumer.
type GroupStatus struct {
	Topic    string `json:"topic"`
	Group    string `json:"group"`
	Consumer string `json:"consumer"`
	// Pending is what the consumer has not yet been given; -1 when
	// unknown (NATS unreachable).
	Pending  int64  `json:"pending"`
	InFlight int64  `json:"in_flight"`
	Error    string `json:"error,omitempty"`
}

// Status asks the server for each consumer's backlog, within 2s.
func (b *Broker) Status() Status {
	s := Status{Broker: "nats", Connected: b.nc.IsConnected(), Server: b.nc.ConnectedUrlRedacted(), Stream: b.opts.Stream}
	if b.opts.Spool != nil {
		s.Spooled = b.opts.Spool.Pending()
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	for i, sub := range b.subs {
		g := GroupStatus{Topic: sub.Topic, Group: sub.Group, Consumer: b.consumerName(sub), Pending: -1, InFlight: b.inFlight[i].Load()}
		if s.Connected {
			if c, err := b.js.Consumer(ctx, b.opts.Stream, g.Consumer); err != nil {
				g.Error = err.Error()
			} else if info := c.CachedInfo(); info != nil {
				if fresh, err := c.Info(ctx); err == nil {
					info = fresh
				}
				g.Pending = int64(info.NumPending) + int64(info.NumAckPending)
			}
		}
		s.Groups = append(s.Groups, g)
	}
	return s
}

func (b *Broker) consumerName(sub Subscription) string {
	if sub.Broadcast {
		return ConsumerName(sub.Topic, sub.Group, b.opts.Instance)
	}
	return ConsumerName(sub.Topic, sub.Group, "")
}
