package natsbroker

import (
	"context"
	"encoding/json"
	"fmt"
	"runtime/debug"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/nats-io/nats.go"
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

// consume runs the i-th subscription until ctx ends, then naks what came
// and was not started and waits for its deliveries.
func (b *Broker) consume(ctx context.Context, i int) {
	sub := b.subs[i]
	log := b.log.With(zap.String("topic", sub.Topic), zap.String("group", sub.Group))
	if !b.consumer(ctx, sub, log) {
		return
	}
	limit := sub.MaxInFlight
	var p *puller
	for p == nil {
		var err error
		if p, err = newPuller(b.nc, b.opts.Stream, b.consumerName(sub), limit, fetchWait); err != nil {
			log.Warn("pull subscription failed", zap.Error(err))
			if !sleep(ctx, retryWait) {
				return
			}
		}
	}
	// The in-progress acks outlive ctx as long as a delivery does.
	working := &working{msgs: map[*nats.Msg]struct{}{}}
	stopWorking := make(chan struct{})
	var wg, wgWorking sync.WaitGroup
	wgWorking.Go(func() { working.run(stopWorking, b.opts.AckWait/3) })
	defer func() {
		wg.Wait()
		close(stopWorking)
		wgWorking.Wait()
	}()
	// running counts the messages received and not yet settled, and
	// p.asked those pulled and not yet received: running + p.asked never
	// exceeds max_in_flight. Each settled delivery gives its slot back on
	// finished; a pull asks for the free slots once a quarter of them are
	// free, or at once when no pull is outstanding.
	running := 0
	finished := make(chan struct{}, limit)
	minBatch := max(1, limit/4)
	tick := time.NewTicker(notReadyWait)
	defer tick.Stop()
	var st pullState
	for {
		if free := limit - running - p.asked; free > 0 && (free >= minBatch || p.asked == 0) {
			if !b.maybePull(ctx, sub, p, &st, free, log) {
				break
			}
		}
		select {
		case <-ctx.Done():
		case <-finished:
			running--
			continue
		case <-tick.C:
			p.expire(time.Now())
			continue
		case m := <-p.msgs:
			switch p.take(m) {
			case kindMsg:
				running++
				b.inFlight[i].Add(1)
				wg.Go(func() {
					defer func() {
						b.inFlight[i].Add(-1)
						finished <- struct{}{}
					}()
					defer recoverLog(log)
					b.handle(ctx, sub, m, working, log)
				})
			case kindStray:
				b.refuse(sub, m)
				_ = m.Nak()
			case kindStatus:
				st.onStatus(m, log)
			}
			continue
		}
		break
	}
	b.drain(sub, p)
}

// pullState is what consume's loop knows of its pulls' failures.
type pullState struct {
	pause    time.Time // no pull before it: the last one failed
	recreate bool      // the consumer is to be made again before the next pull
}

// maybePull asks for free slots unless the loop must wait: ctx ended, the
// last pull failed not long ago, the app is not ready, or the consumer is
// to be made again (after a 503 or its deletion; a broadcast one may have
// been removed while this instance was away) and pulls are still
// outstanding. It returns false when the consumer could not be made again
// before ctx ended.
func (b *Broker) maybePull(ctx context.Context, sub Subscription, p *puller, st *pullState, free int, log *zap.Logger) bool {
	now := time.Now()
	if ctx.Err() != nil || now.Before(st.pause) || (b.app != nil && !b.app.Ready()) || (st.recreate && p.asked != 0) {
		return true
	}
	if st.recreate {
		if !b.consumer(ctx, sub, log) {
			return false
		}
		st.recreate = false
	}
	if err := p.pull(free, now); err != nil {
		log.Debug("pull failed", zap.Error(err))
		st.pause = now.Add(retryWait)
	}
	return true
}

// onStatus notes a pull's end other than an expiry (408): no responders
// (503), the consumer deleted or its leader changed (409), a bad request.
func (st *pullState) onStatus(m *nats.Msg, log *zap.Logger) {
	code := m.Header.Get("Status")
	if code == "408" {
		return
	}
	log.Debug("pull ended", zap.String("status", code), zap.String("description", m.Header.Get("Description")))
	st.pause = time.Now().Add(retryWait)
	st.recreate = st.recreate || code == "503" || strings.Contains(strings.ToLower(m.Header.Get("Description")), "deleted")
}

// drain ends p's subscription: whatever arrived and was not started goes
// back at once, and is not an attempt.
func (b *Broker) drain(sub Subscription, p *puller) {
	p.stop()
	for {
		select {
		case m := <-p.msgs:
			if k := p.take(m); k == kindMsg || k == kindStray {
				b.refuse(sub, m)
				_ = m.Nak()
			}
			continue
		default:
		}
		break
	}
}

// consumer creates (or updates) the subscription's durable consumer,
// retrying until ctx ends; false then.
func (b *Broker) consumer(ctx context.Context, sub Subscription, log *zap.Logger) bool {
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
		if err == nil {
			_, err = b.js.CreateOrUpdateConsumer(cctx, b.opts.Stream, cfg)
		}
		cancel()
		if err == nil {
			log.Info("consuming", zap.String("consumer", cfg.Durable), zap.String("subject", cfg.FilterSubject))
			return true
		}
		if ctx.Err() != nil {
			return false
		}
		log.Warn("create consumer failed", zap.String("consumer", cfg.Durable), zap.Error(err))
		if !sleep(ctx, wait) {
			return false
		}
	}
}

// handle delivers one message and settles it with JetStream.
func (b *Broker) handle(ctx context.Context, sub Subscription, msg *nats.Msg, working *working, log *zap.Logger) {
	meta, err := msg.Metadata()
	if err != nil {
		log.Error("message without metadata", zap.Error(err))
		_ = msg.Nak()
		return
	}
	key := refusalKey{sub.Topic, sub.Group, meta.Sequence.Stream}
	attempt := int(meta.NumDelivered)
	if attempt > 1 {
		if n, ok := b.refused.Get(key); ok {
			attempt = max(1, attempt-n)
		}
	}
	m, err := decodeMsg(msg.Header, msg.Data)
	if err != nil {
		// Not a sidecar message: dead-letter its bytes as they are.
		m = &pubsub.Message{
			ID: fmt.Sprintf("%s-%d", b.opts.Stream, meta.Sequence.Stream), Source: pubsub.DefaultSource, Type: pubsub.DefaultType,
			Time: meta.Timestamp, DataContentType: "application/octet-stream", Topic: sub.Topic, Data: msg.Data,
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
		b.refuse(sub, msg)
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

// refuse records a delivery of msg that never reached the app (not
// delivered, a stray or a message drained unstarted, each nak'd), so the
// attempt number leaves it out: JetStream counted it in NumDelivered.
func (b *Broker) refuse(sub Subscription, msg *nats.Msg) {
	meta, err := msg.Metadata()
	if err != nil {
		return
	}
	key := refusalKey{sub.Topic, sub.Group, meta.Sequence.Stream}
	n, _ := b.refused.Get(key)
	b.refused.Add(key, n+1)
}

// deadLetter publishes m to the subscription's dead-letter topic, then
// acknowledges msg; if the publish fails, msg is nak'd and comes again.
func (b *Broker) deadLetter(sub Subscription, msg *nats.Msg, m *pubsub.Message, reason, detail string, attempts int, log *zap.Logger) {
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
	if err := msg.AckSync(nats.Context(ctx)); err != nil {
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
