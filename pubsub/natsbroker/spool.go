package natsbroker

import (
	"cmp"
	"context"
	"fmt"
	"time"

	"github.com/nats-io/nats.go/jetstream"
	"go.uber.org/zap"

	"github.com/sidecarlb/sidecar/pubsub"
	"github.com/sidecarlb/sidecar/pubsub/store"
)

// Timings of the spool's forwarder.
const (
	forwardEvery = 200 * time.Millisecond
	forwardBatch = 256 // messages read, sent and deleted per round
)

// spool stores pubs durably in the spool (pubsub.nats.on_unavailable:
// spool), to be forwarded once NATS is back.
func (b *Broker) spool(pubs []pubsub.Publication) ([]bool, error) {
	entries := make([]store.Entry, len(pubs))
	for i, p := range pubs {
		body, err := p.Msg.Marshal()
		if err != nil {
			return nil, err
		}
		entries[i] = store.Entry{Key: p.Key, Topic: p.Msg.Topic, Body: body}
	}
	out, err := b.opts.Spool.Append(entries)
	if err != nil {
		return nil, err
	}
	dup := make([]bool, len(out))
	for i, a := range out {
		dup[i] = a.Duplicate
	}
	return dup, nil
}

// forward sends the spooled messages to JetStream, oldest first (a round
// of forwardBatch sent at once on the one connection, so in order), each with
// its message id as Nats-Msg-Id (so one the server already had, from a
// publish that timed out, is not stored twice), and deletes each once the
// server has acknowledged it. It runs until ctx ends.
func (b *Broker) forward(ctx context.Context) {
	log := b.log.Named("spool")
	for sleep(ctx, forwardEvery) {
		if b.opts.Spool.Pending() == 0 || !b.nc.IsConnected() {
			continue
		}
		var seqs []uint64
		err := b.opts.Spool.Load(func(seq uint64, _, _ string, _ map[string]store.GroupState) error {
			if len(seqs) < forwardBatch {
				seqs = append(seqs, seq)
			}
			return nil
		})
		if err != nil {
			log.Error("read spool failed", zap.Error(err))
			continue
		}
		// The round's messages go out at once and their acks are awaited
		// after: one round trip per round, not per message.
		type out struct {
			seq uint64
			f   jetstream.PubAckFuture
		}
		pctx, cancel := context.WithTimeout(ctx, b.opts.PublishTimeout)
		if err := b.ensureStream(pctx); err != nil {
			cancel()
			log.Warn("forward spooled messages failed", zap.Error(err))
			continue
		}
		outs := make([]out, 0, len(seqs))
		for _, seq := range seqs {
			_, body, ok, err := b.opts.Spool.Get(seq)
			if err != nil || !ok {
				log.Error("read spooled message failed", zap.Uint64("seq", seq), zap.Error(err))
				continue
			}
			m, err := pubsub.Unmarshal(body)
			if err != nil {
				log.Error("spooled message undecodable: kept in the spool", zap.Uint64("seq", seq), zap.Error(err))
				continue
			}
			msg, err := b.natsMsg(m, m.ID)
			if err == nil {
				var f jetstream.PubAckFuture
				if f, err = b.publishAsync(pctx, msg); err == nil {
					outs = append(outs, out{seq, f})
					continue
				}
			}
			log.Warn("forward spooled message failed", zap.Uint64("seq", seq), zap.Error(err))
			break
		}
		// Those without an ack stay in the spool for the next round (one
		// log line for them all).
		var sent []store.Update
		var failed int
		var firstErr error
	acks:
		for i, o := range outs {
			select {
			case <-o.f.Ok():
				sent = append(sent, store.Update{Seq: o.seq, Delete: true})
			case err := <-o.f.Err():
				firstErr = cmp.Or(firstErr, err)
				failed++
			case <-pctx.Done():
				firstErr = cmp.Or(firstErr, fmt.Errorf("no ack from nats: %w", pctx.Err()))
				failed += len(outs) - i
				break acks
			}
		}
		cancel()
		if failed > 0 {
			log.Warn("forward spooled messages failed", zap.Int("messages", failed), zap.Error(firstErr))
		}
		if len(sent) == 0 {
			continue
		}
		if _, err := b.opts.Spool.Apply(sent, nil); err != nil {
			log.Error("delete forwarded messages failed: they will be sent again", zap.Error(err))
			continue
		}
		log.Info("forwarded spooled messages", zap.Int("messages", len(sent)), zap.Int("left", b.opts.Spool.Pending()))
	}
}
