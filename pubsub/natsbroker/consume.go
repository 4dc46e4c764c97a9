package natsbroker

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"runtime/debug"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/nats-io/nats.go/jetstream"
	"go.uber.org/zap"

	"github.com/sidecarlb/sidecar/pubsub"
)

// Timings of the consume loop.
const (
	fetchWait    = 5 * time.Second        // one pull request's life
	retryWait    = 500 * time.Millisecond // after an error, before trying again
	notReadyWait = 200 * time.Millisecond // while the app is unhealthy or draining
	// notDeliveredDelay is the nak delay of a message that did not reach
	// an app that is not listening.
	notDeliveredDelay = time.Second
	// maxAckPending bounds the messages a consumer has out, in flight or
	// waiting for their retry delay, across the group's instances.
	maxAckPending = 100_000
)

// consume runs the i-th subscription until ctx ends, then waits for its
// deliveries.
func (b *Broker) consume(ctx context.Context, i int) {
	sub := b.subs[i]
	log := b.log.With(zap.String("topic", sub.Topic), zap.String("group", sub.Group))
	cons := b.consumer(ctx, sub, log)
	if cons == nil {
		return
	}
	// out counts the messages pulled and not yet settled, at most
	// MaxInFlight; a pull asks for the free slots once a quarter of them
	// (or all, when nothing is out) are free, so pulls come in batches.
	var out atomic.Int64
	freed := make(chan struct{}, 1)
	// The in-progress acks outlive ctx as long as a delivery does.
	working := &working{msgs: map[jetstream.Msg]struct{}{}}
	stopWorking := make(chan struct{})
	var wg, wgWorking sync.WaitGroup
	wgWorking.Go(func() { working.run(stopWorking, b.opts.AckWait/3) })
	defer func() {
		wg.Wait()
		close(stopWorking)
		wgWorking.Wait()
	}()
	limit := int64(sub.MaxInFlight)
	minBatch := max(1, limit/4)
	for ctx.Err() == nil {
		if b.app != nil && !b.app.Ready() {
			sleep(ctx, notReadyWait)
			continue
		}
		busy := out.Load()
		if free := limit - busy; free < minBatch && busy > 0 {
			select {
			case <-freed:
			case <-ctx.Done():
			}
			continue
		}
		n := int(limit - busy)
		out.Add(int64(n))
		fctx, cancel := context.WithTimeout(ctx, fetchWait)
		batch, err := cons.Fetch(n, jetstream.FetchContext(fctx))
		if err != nil {
			cancel()
			out.Add(-int64(n))
			if ctx.Err() == nil {
				log.Debug("pull failed", zap.Error(err))
				sleep(ctx, retryWait)
			}
			continue
		}
		got := 0
		for msg := range batch.Messages() {
			got++
			b.inFlight[i].Add(1)
			wg.Go(func() {
				defer func() {
					b.inFlight[i].Add(-1)
					out.Add(-1)
					select {
					case freed <- struct{}{}:
					default:
					}
				}()
				defer recoverLog(log)
				b.handle(ctx, sub, msg, working, log)
			})
		}
		cancel()
		out.Add(-int64(n - got))
		if err := batch.Error(); err != nil && ctx.Err() == nil && !errors.Is(err, context.DeadlineExceeded) && !errors.Is(err, jetstream.ErrNoHeartbeat) {
			log.Debug("pull ended", zap.Error(err))
			if got == 0 {
				sleep(ctx, retryWait)
			}
		}
	}
}

// consumer creates (or updates) the subscription's durable consumer,
// retrying until ctx ends; nil then.
func (b *Broker) consumer(ctx context.Context, sub Subscription, log *zap.Logger) jetstream.Consumer {
	cfg := jetstream.ConsumerConfig{
		Durable:       b.consumerName(sub),
		Description:   "sidecar: " + sub.Topic + " for " + sub.Group,
		FilterSubject: Subject(b.opts.SubjectPrefix, sub.Topic),
		DeliverPolicy: jetstream.DeliverNewPolicy,
		AckPolicy:     jetstream.AckExplicitPolicy,
		AckWait:       b.opts.AckWait,
		MaxDeliver:    -1, // the sidecar dead-letters; a limit here would drop without a dead letter
		MaxAckPending: maxAckPending,
	}
	if sub.Broadcast {
		cfg.InactiveThreshold = broadcastIdle
	}
	if sub.PerKey {
		cfg.MaxAckPending = 1
	}
	for wait := retryWait; ; wait = min(2*wait, 10*time.Second) {
		cctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		err := b.ensureStream(cctx)
		var cons jetstream.Consumer
		if err == nil {
			cons, err = b.js.CreateOrUpdateConsumer(cctx, b.opts.Stream, cfg)
		}
		cancel()
		if err == nil {
			log.Info("consuming", zap.String("consumer", cfg.Durable), zap.String("subject", cfg.FilterSubject))
			return cons
		}
		if ctx.Err() != nil {
			return nil
		}
		log.Warn("create consumer failed", zap.String("consumer", cfg.Durable), zap.Error(err))
		if !sleep(ctx, wait) {
			return nil
		}
	}
}

// handle delivers one message and settles it with JetStream.
func (b *Broker) handle(ctx context.Context, sub Subscription, msg jetstream.Msg, working *working, log *zap.Logger) {
	meta, err := msg.Metadata()
	if err != nil {
		log.Error("message without metadata", zap.Error(err))
		_ = msg.Nak()
		return
	}
	attempt := int(meta.NumDelivered)
	m, err := decodeMsg(msg.Headers(), msg.Data())
	if err != nil {
		// Not a sidecar message: dead-letter its bytes as they are.
		m = &pubsub.Message{
			ID: fmt.Sprintf("%s-%d", b.opts.Stream, meta.Sequence.Stream), Source: pubsub.DefaultSource, Type: pubsub.DefaultType,
			Time: meta.Timestamp, DataContentType: "application/octet-stream", Topic: sub.Topic, Data: msg.Data(),
		}
		b.deadLetter(sub, msg, m, "undecodable", err.Error(), attempt, log)
		return
	}
	working.add(msg)
	r := b.app.Deliver(ctx, sub.Group, m, attempt)
	working.remove(msg)
	mt := b.opts.Metrics
	if mt != nil && r.Outcome != pubsub.NotDelivered {
		mt.Attempts.WithLabelValues(sub.Topic, sub.Group).Inc()
	}
	switch r.Outcome {
	case pubsub.Success, pubsub.Drop:
		// A plain ack: if it is lost, the message comes again (the
		// duplicate window between the app's success and its record).
		if err := msg.Ack(); err != nil {
			log.Warn("ack failed: the message will come again", zap.String("id", m.ID), zap.Error(err))
			return
		}
		if mt != nil {
			mt.Outcomes.WithLabelValues(sub.Topic, sub.Group, r.Outcome.String()).Inc()
		}
	case pubsub.NotDelivered:
		if ctx.Err() != nil || !b.app.Ready() {
			_ = msg.Nak() // draining: another instance takes it now
		} else {
			_ = msg.NakWithDelay(notDeliveredDelay)
		}
		log.Debug("not delivered", zap.String("id", m.ID), zap.String("reason", r.Reason))
	case pubsub.Retry:
		if attempt < sub.Policy.MaxAttempts {
			_ = msg.NakWithDelay(sub.Policy.Delay(attempt, r.RetryAfter))
			log.Debug("retry", zap.String("id", m.ID), zap.Int("attempt", attempt), zap.String("reason", r.Reason))
			return
		}
		b.deadLetter(sub, msg, m, "max_attempts", r.Reason, attempt, log)
	case pubsub.DeadLetter:
		b.deadLetter(sub, msg, m, "rejected", r.Reason, attempt, log)
	}
}

// deadLetter publishes m to the subscription's dead-letter topic, then
// acknowledges msg; if the publish fails, msg is nak'd and comes again.
func (b *Broker) deadLetter(sub Subscription, msg jetstream.Msg, m *pubsub.Message, reason, detail string, attempts int, log *zap.Logger) {
	dead := *m
	dead.Extensions = make(map[string]json.RawMessage, len(m.Extensions)+4)
	for k, v := range m.Extensions {
		dead.Extensions[k] = v
	}
	why := reason
	if detail != "" {
		why += ": " + detail
	}
	q, _ := json.Marshal(why)
	dead.Extensions[pubsub.ExtDeadLetterReason] = q
	dead.Extensions[pubsub.ExtDeadLetterAttempts] = json.RawMessage(strconv.Itoa(attempts))
	dead.Extensions["deadlettertopic"], _ = json.Marshal(m.Topic)
	dead.Extensions["deadlettergroup"], _ = json.Marshal(sub.Group)
	dead.Topic = sub.DeadLetter
	ctx, cancel := context.WithTimeout(context.Background(), b.opts.PublishTimeout)
	defer cancel()
	// Its own Nats-Msg-Id: the original's id would be taken for a repeat.
	if _, err := b.publish(ctx, &dead, m.ID+" dlq "+sub.Group); err != nil {
		log.Warn("dead-letter publish failed: the message will come again", zap.String("id", m.ID), zap.Error(err))
		_ = msg.NakWithDelay(sub.Policy.Delay(attempts, 0))
		return
	}
	if err := msg.DoubleAck(ctx); err != nil {
		log.Warn("ack of a dead-lettered message failed: it will come again", zap.String("id", m.ID), zap.Error(err))
	}
	if mt := b.opts.Metrics; mt != nil {
		mt.Outcomes.WithLabelValues(sub.Topic, sub.Group, "deadletter").Inc()
		mt.DeadLetters.WithLabelValues(sub.Topic, sub.Group, reason).Inc()
	}
	log.Info("dead-lettered", zap.String("id", m.ID), zap.String("reason", reason), zap.String("detail", detail), zap.Int("attempts", attempts), zap.String("dead_letter_topic", sub.DeadLetter))
}

// sleep waits d or until ctx ends; false if ctx ended.
func sleep(ctx context.Context, d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return true
	case <-ctx.Done():
		return false
	}
}

func recoverLog(log *zap.Logger) {
	if r := recover(); r != nil {
		log.Error("delivery panicked", zap.Any("panic", r), zap.ByteString("stack", debug.Stack()))
	}
}
