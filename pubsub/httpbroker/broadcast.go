package httpbroker

import (
	"context"
	"errors"
	"strings"
	"time"

	"go.uber.org/zap"

	"github.com/sidecarlb/sidecar/pubsub/store"
)

// A broadcast group gets each message at every live instance. Its lane
// (the fan-out lane) sends nothing: it looks up the group's live instances
// and hands the message to one lane per instance (target "group@id"),
// storing in one commit that the fan-out is done and that each instance
// has the message pending, so a restart resumes each instance's delivery.
// An instance that leaves the live set for goneAfter gets no more of the
// messages waiting for it (outcome "gone"); while none is live, the
// fan-out waits, so the group stays durable.
// goneAfter is DispatcherOptions.GoneAfter.

// defaultGoneAfter is DispatcherOptions.GoneAfter's default.
const defaultGoneAfter = 30 * time.Second

var errInstanceGone = errors.New("instance not live")

// fanOut hands a batch of a broadcast group's messages to a lane per live
// instance.
func (l *lane) fanOut(ctx context.Context, batch []item, rec Record, log *zap.Logger) {
	ids, err := l.d.picker.instances(ctx, rec.Service)
	if err == nil && len(ids) == 0 {
		err = errors.New("no live instance")
	}
	if err != nil {
		l.pause(batch, err, log)
		return
	}
	d := l.d
	updates := make([]store.Update, 0, len(batch)*(1+len(ids)))
	for _, it := range batch {
		updates = append(updates, store.Update{Seq: it.seq, Group: rec.Group, Done: true})
		for _, id := range ids {
			updates = append(updates, store.Update{Seq: it.seq, Group: rec.Group + "@" + id})
		}
	}
	if _, err := d.store.Apply(updates, nil); err != nil {
		log.Error("record broadcast fan-out failed", zap.Error(err))
		for _, it := range batch {
			l.requeue(it)
		}
		return
	}
	d.mu.Lock()
	for _, it := range batch {
		open, ok := d.open.Get(it.seq)
		if !ok {
			continue
		}
		d.open.Set(it.seq, open+int32(len(ids))-1) // the fan-out is done, each instance pending
		key := l.keyOf(it.seq)
		for _, id := range ids {
			child := rec
			child.Instance = id
			d.laneLocked(child).push(item{seq: it.seq, at: it.at}, key)
		}
	}
	d.mu.Unlock()
	l.forget(batch)
}

// assignInstancesLocked puts message seq, whose fan-out to broadcast group
// r was done by an earlier run, back in the lane of each instance still
// pending, and returns how many it put back. d.mu must be held.
func (d *Dispatcher) assignInstancesLocked(p unassigned, r Record) (open int32) {
	for target, gs := range p.groups {
		inst, ok := strings.CutPrefix(target, r.Group+"@")
		if !ok || gs.Done {
			continue
		}
		child := r
		child.Instance = inst
		open++
		d.laneLocked(child).push(item{seq: p.seq, attempts: int32(gs.Attempts), at: p.at}, p.ordering)
	}
	return open
}

// pickInstance returns the address of the lane's instance, or
// errInstanceGone once it has been missing from the live set for
// GoneAfter.
func (l *lane) pickInstance(ctx context.Context, rec Record) (string, error) {
	addr, ok, err := l.d.picker.instance(ctx, rec.Service, rec.Instance)
	if err != nil {
		return "", err
	}
	now := l.d.now().UnixNano()
	l.mu.Lock()
	defer l.mu.Unlock()
	if ok {
		l.goneSince = 0
		return addr, nil
	}
	if l.goneSince == 0 {
		l.goneSince = now
	}
	if time.Duration(now-l.goneSince) >= l.d.goneAfter {
		return "", errInstanceGone
	}
	return "", errors.New("instance " + rec.Instance + " not live")
}

// finishGone gives up the messages waiting for an instance that left.
func (l *lane) finishGone(batch []item, rec Record, log *zap.Logger) {
	d := l.d
	updates := make([]store.Update, 0, len(batch))
	d.mu.Lock()
	for _, it := range batch {
		updates = append(updates, store.Update{Seq: it.seq, Group: rec.target(), Attempts: int(it.attempts), Done: true})
		if d.finishLocked(it.seq) {
			updates = append(updates, store.Update{Seq: it.seq, Delete: true})
		}
	}
	d.mu.Unlock()
	if _, err := d.store.Apply(updates, nil); err != nil {
		log.Error("record gone instance failed", zap.Error(err))
	}
	if d.metrics != nil {
		d.metrics.Outcomes.WithLabelValues(rec.Topic, rec.Group, "gone").Add(float64(len(batch)))
	}
	log.Info("instance gone: its broadcast messages are given up", zap.String("instance", rec.Instance), zap.Int("messages", len(batch)))
	l.forget(batch)
}
