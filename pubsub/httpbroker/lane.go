package httpbroker

import (
	"container/heap"
	"context"
	"encoding/json"
	"errors"
	"slices"
	"strconv"
	"sync"
	"time"

	"go.uber.org/zap"

	"github.com/sidecarlb/sidecar/config"
	"github.com/sidecarlb/sidecar/pubsub"
	"github.com/sidecarlb/sidecar/pubsub/store"
)

// batchSize is the messages per batch for a subscription's max_in_flight:
// a quarter of it, so a lane's lanesInFlight (8) batches put at most twice
// max_in_flight messages at one instance. A message then waits for a slot
// at most one round of deliveries, which the request's timeout (twice the
// subscription's, plus 5s) covers: a slow handler does not make the
// publisher give up on messages the peer is about to deliver, and send them
// again (Dapr's redelivery storm, dapr#8321).
func batchSize(maxInFlight int) int {
	return min(max((maxInFlight+3)/4, 1), maxBatch)
}

// item is one message waiting in a lane: 24 bytes. Its ordering key, if
// it has one, is in lane.keys, and its next send, while it waits for a
// retry, in the retry heap's entry.
type item struct {
	seq      uint64
	at       int64 // published, unix nanoseconds
	attempts int32 // deliveries that reached the app
	missed   int32 // sends in a row that did not reach it
}

// retryItem is an item waiting for its next send, at due (unix
// nanoseconds).
type retryItem struct {
	due int64
	it  item
}

// age is the seconds from at (unix nanoseconds) to now.
func age(now time.Time, at int64) float64 {
	return max(float64(now.UnixNano()-at)/1e9, 0)
}

// retryHeap orders items by due time.
type retryHeap []retryItem

func (h retryHeap) Len() int           { return len(h) }
func (h retryHeap) Less(i, j int) bool { return h[i].due < h[j].due }
func (h retryHeap) Swap(i, j int)      { h[i], h[j] = h[j], h[i] }
func (h *retryHeap) Push(x any)        { *h = append(*h, x.(retryItem)) }
func (h *retryHeap) Pop() any {
	old := *h
	x := old[len(old)-1]
	*h = old[:len(old)-1]
	return x
}

// lane delivers one topic's messages to one group.
type lane struct {
	d    *Dispatcher
	key  laneKey
	wake chan struct{}

	mu       sync.Mutex
	rec      Record
	ready    []item
	retry    retryHeap
	inflight map[uint64]int64 // seq → published, of items out in batches
	// keys holds the ordering key of each item of the lane that has one,
	// from push until the item is done here (forget).
	keys map[uint64]string
	// held maps an ordering key to the message that holds it, with
	// ordering per_key: from its first send until its final outcome no
	// other message of the key is sent.
	held map[string]uint64
	// pauseUntil (unix nanoseconds) stops take until then; pauses counts
	// the pauses in a row.
	pauseUntil int64
	pauses     int
	// goneSince is when a broadcast instance's lane first found its
	// instance missing from the live set; 0 while it is live.
	goneSince int64
}

func newLane(d *Dispatcher, k laneKey, r Record) *lane {
	return &lane{d: d, key: k, rec: r, wake: make(chan struct{}, 1), inflight: map[uint64]int64{}, held: map[string]uint64{}, keys: map[uint64]string{}}
}

func (l *lane) setRecord(r Record) {
	l.mu.Lock()
	l.rec = r
	l.mu.Unlock()
}

// push adds a message to the lane, with its ordering key ("" for none).
// A paused lane is not woken: its timer runs take at the pause's end, and
// a wake per published message would only make it set that timer again.
func (l *lane) push(it item, key string) {
	l.mu.Lock()
	l.ready = append(l.ready, it)
	if key != "" {
		l.keys[it.seq] = key
	}
	paused := l.pauseUntil != 0 && l.d.now().UnixNano() < l.pauseUntil
	l.mu.Unlock()
	if !paused {
		l.signal()
	}
}

// keyOf returns the ordering key of the lane's message seq.
func (l *lane) keyOf(seq uint64) string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.keys[seq]
}

func (l *lane) later(it item, d time.Duration) {
	due := l.d.now().Add(d).UnixNano()
	l.mu.Lock()
	heap.Push(&l.retry, retryItem{due, it})
	l.mu.Unlock()
	l.signal()
}

func (l *lane) signal() {
	select {
	case l.wake <- struct{}{}:
	default:
	}
}

// take moves due retries to ready and returns up to n ready items, with
// the lane's record, or the time of the next retry when none is ready.
func (l *lane) take() ([]item, Record, time.Time) {
	now := l.d.now()
	l.mu.Lock()
	defer l.mu.Unlock()
	for len(l.retry) > 0 && l.retry[0].due <= now.UnixNano() {
		l.ready = append(l.ready, heap.Pop(&l.retry).(retryItem).it)
	}
	if now.UnixNano() < l.pauseUntil {
		return nil, l.rec, time.Unix(0, l.pauseUntil)
	}
	n := batchSize(l.rec.MaxInFlight)
	if len(l.ready) == 0 {
		var next time.Time
		if len(l.retry) > 0 {
			next = time.Unix(0, l.retry[0].due)
		}
		return nil, l.rec, next
	}
	var batch []item
	if l.rec.Ordering == config.OrderingPerKey {
		batch = l.takeOrdered(n)
	} else {
		n = min(n, len(l.ready))
		batch = make([]item, n)
		copy(batch, l.ready[:n])
		l.ready = l.ready[n:]
	}
	switch {
	case len(l.ready) == 0:
		l.ready = nil // let the backing array go
	case cap(l.ready) >= 4096 && len(l.ready) < cap(l.ready)/4:
		l.ready = slices.Clone(l.ready) // drop the taken prefix
	}
	for _, it := range batch {
		l.inflight[it.seq] = it.at
	}
	var next time.Time
	if len(batch) == 0 && len(l.retry) > 0 {
		next = time.Unix(0, l.retry[0].due)
	}
	return batch, l.rec, next
}

// maxOrderedScan bounds the ready messages takeOrdered looks at per call.
const maxOrderedScan = 4096

// takeOrdered takes up to n ready messages, skipping those whose ordering
// key another message holds: a key's messages go one at a time, the
// earliest first (ready is in publish order, and a message back from a
// retry still holds its key). l.mu must be held.
func (l *lane) takeOrdered(n int) []item {
	var batch []item
	var keep []item // the skipped ones, at most maxOrderedScan
	i := 0
	for ; i < len(l.ready) && len(batch) < n && i < maxOrderedScan; i++ {
		it := l.ready[i]
		if key := l.keys[it.seq]; key != "" {
			if holder, ok := l.held[key]; ok && holder != it.seq {
				keep = append(keep, it)
				continue
			}
			l.held[key] = it.seq
		}
		batch = append(batch, it)
	}
	// The skipped messages go back just before the unscanned ones, in
	// their order, in place: no copy of the backlog per take.
	start := i - len(keep)
	copy(l.ready[start:i], keep)
	l.ready = l.ready[start:]
	return batch
}

func (l *lane) status(now time.Time) GroupStatus {
	l.mu.Lock()
	defer l.mu.Unlock()
	s := GroupStatus{Topic: l.key.topic, Group: l.key.group, Pending: len(l.ready) + len(l.retry) + len(l.inflight), InFlight: len(l.inflight)}
	oldest := func(at int64) { s.OldestSeconds = max(s.OldestSeconds, age(now, at)) }
	for _, it := range l.ready {
		oldest(it.at)
	}
	for _, r := range l.retry {
		oldest(r.it.at)
	}
	for _, at := range l.inflight {
		oldest(at)
	}
	return s
}

// run sends batches until ctx ends, at most lanesInFlight at once. A
// batch gives its slot back as soon as the peer has answered, before its
// outcomes are committed (send's release): the next batch goes out during
// that fsync rather than after it. At most lanesInFlight answered batches
// wait for their commit (recording); past that, a batch keeps its slot
// until one of them is done, so a slow disk slows the lane down rather than
// letting answered batches pile up in memory.
func (l *lane) run(ctx context.Context) {
	slots := make(chan struct{}, lanesInFlight)
	recording := make(chan struct{}, lanesInFlight)
	var wg sync.WaitGroup
	defer wg.Wait()
	for {
		select {
		case slots <- struct{}{}:
		case <-ctx.Done():
			return
		}
		batch, rec, next := l.take()
		if len(batch) == 0 {
			<-slots
			if !l.wait(ctx, next) {
				return
			}
			continue
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			held := true
			release := func() {
				recording <- struct{}{}
				<-slots
				held = false
			}
			l.send(l.d.sendCtx, batch, rec, release)
			if held {
				<-slots
			} else {
				<-recording
			}
		}()
	}
}

// wait waits for a signal, or until next if it is set; false when ctx ends.
func (l *lane) wait(ctx context.Context, next time.Time) bool {
	var timer <-chan time.Time
	if !next.IsZero() {
		t := time.NewTimer(max(next.Sub(l.d.now()), time.Millisecond))
		defer t.Stop()
		timer = t.C
	}
	select {
	case <-l.wake:
	case <-timer:
	case <-ctx.Done():
		return false
	}
	return true
}

// send delivers one batch to one instance of the group and records each
// message's outcome. It calls release, if at all, once the peer has
// answered and before the outcomes are committed.
func (l *lane) send(ctx context.Context, batch []item, rec Record, release func()) {
	log := l.d.log.With(zap.String("topic", rec.Topic), zap.String("group", rec.Group))
	if rec.broadcast() {
		l.fanOut(ctx, batch, rec, log)
		return
	}
	// The instance first: while none is live the messages stay on disk.
	var addr string
	var err error
	if rec.Instance != "" {
		addr, err = l.pickInstance(ctx, rec)
		if errors.Is(err, errInstanceGone) {
			l.finishGone(batch, rec, log)
			return
		}
	} else {
		addr, err = l.d.picker.pick(ctx, rec.Service)
	}
	if err != nil {
		l.pause(batch, err, log)
		return
	}
	req := &deliverRequest{Topic: rec.Topic, Group: rec.Group, Messages: make([]peerMessage, 0, len(batch))}
	bodies := make([][]byte, 0, len(batch))
	live := batch[:0:0]
	var gone []item
	seqs := make([]uint64, len(batch))
	for i, it := range batch {
		seqs[i] = it.seq
	}
	// The batch's bodies in one read where they lie together in the log;
	// should that fail, one by one, so that one bad read holds back only
	// its own message.
	many, manyErr := l.d.store.GetMany(seqs)
	for i, it := range batch {
		var body []byte
		var ok bool
		var err error
		if manyErr == nil {
			body, ok = many[i], many[i] != nil
		} else {
			_, body, ok, err = l.d.store.Get(it.seq)
		}
		switch {
		case err != nil:
			log.Error("read message failed", zap.Uint64("seq", it.seq), zap.Error(err))
			l.requeue(it)
			continue
		case !ok:
			gone = append(gone, it) // finished by a lane that could not tell us
			continue
		}
		live = append(live, it)
		bodies = append(bodies, body)
		req.Messages = append(req.Messages, peerMessage{Attempt: int(it.attempts) + 1, Message: body})
	}
	l.forget(gone)
	if len(live) == 0 {
		return
	}
	// A batch may wait behind another for the app's slots.
	results, err := send(ctx, l.d.peers.pool(addr), addr, req, 2*rec.Timeout+5*time.Second)
	if err != nil {
		if ctx.Err() == nil {
			log.Debug("batch not delivered", zap.String("peer", addr), zap.Int("messages", len(live)), zap.Error(err))
		}
		l.pause(live, err, log)
		return
	}
	l.resume()
	release()
	l.record(rec, live, bodies, results, log)
}

// pause puts a batch that could not be sent (no live instance, the peer
// unreachable) back at the head of the lane, and stops the lane for
// pauseDelay doubling to maxPauseDelay: a group that is down costs
// nothing but a timer, whatever its backlog. Not an attempt.
func (l *lane) pause(batch []item, err error, log *zap.Logger) {
	now := l.d.now()
	l.mu.Lock()
	for _, it := range batch {
		delete(l.inflight, it.seq)
	}
	l.ready = append(slices.Clone(batch), l.ready...)
	d := pauseDelay
	for i := 0; i < l.pauses && d < maxPauseDelay; i++ {
		d *= 2
	}
	d = min(d, maxPauseDelay)
	if until := now.Add(d).UnixNano(); until > l.pauseUntil {
		l.pauseUntil = until
	}
	l.pauses++
	first := l.pauses == 1
	l.mu.Unlock()
	if first {
		log.Debug("lane paused", zap.Duration("for", d), zap.Error(err))
	}
	l.signal()
}

// resume ends the doubling of pauses after a batch got through.
func (l *lane) resume() {
	l.mu.Lock()
	l.pauses = 0
	l.mu.Unlock()
}

// requeue schedules an item that did not reach the app; not an attempt.
func (l *lane) requeue(it item) {
	d := requeueDelay
	for i := int32(0); i < it.missed && d < maxRequeueDelay; i++ {
		d *= 2
	}
	it.missed++
	l.mu.Lock()
	delete(l.inflight, it.seq)
	l.mu.Unlock()
	l.later(it, min(d, maxRequeueDelay))
}

func (l *lane) forget(items []item) {
	if len(items) == 0 {
		return
	}
	released := false
	l.mu.Lock()
	for _, it := range items {
		delete(l.inflight, it.seq)
		key, ok := l.keys[it.seq]
		if !ok {
			continue
		}
		delete(l.keys, it.seq)
		if l.held[key] == it.seq {
			delete(l.held, key)
			released = true
		}
	}
	l.mu.Unlock()
	if released {
		l.signal() // the key's next message may go
	}
}

// record stores the outcome of each message of a delivered batch in one
// commit (dead letters included), then updates memory.
func (l *lane) record(rec Record, live []item, bodies [][]byte, results []pubsub.Result, log *zap.Logger) {
	var updates []store.Update
	var dead []store.Entry
	type next struct {
		it    item
		delay time.Duration
	}
	var retries []next
	var finished, missed []item
	m := l.d.metrics
	for i, it := range live {
		r := results[i]
		if r.Outcome != pubsub.NotDelivered {
			it.attempts++
			it.missed = 0
			if m != nil {
				m.Attempts.WithLabelValues(rec.Topic, rec.Group).Inc()
			}
		}
		reason := ""
		switch r.Outcome {
		case pubsub.NotDelivered:
			missed = append(missed, it)
			continue
		case pubsub.Success, pubsub.Drop:
			finished = append(finished, it)
			updates = append(updates, store.Update{Seq: it.seq, Group: rec.target(), Attempts: int(it.attempts), Done: true})
			if m != nil {
				m.Outcomes.WithLabelValues(rec.Topic, rec.Group, r.Outcome.String()).Inc()
			}
			continue
		case pubsub.Retry:
			if int(it.attempts) < rec.MaxAttempts {
				retries = append(retries, next{it, rec.policy().Delay(int(it.attempts), r.RetryAfter)})
				updates = append(updates, store.Update{Seq: it.seq, Group: rec.target(), Attempts: int(it.attempts)})
				continue
			}
			reason = "max_attempts"
		case pubsub.DeadLetter:
			reason = "rejected"
		}
		body, err := deadLetter(bodies[i], rec, reason, r.Reason, int(it.attempts))
		if err != nil {
			log.Error("build dead letter failed", zap.Uint64("seq", it.seq), zap.Error(err))
			retries = append(retries, next{it, rec.policy().Delay(int(it.attempts), 0)})
			continue
		}
		finished = append(finished, it)
		updates = append(updates, store.Update{Seq: it.seq, Group: rec.target(), Attempts: int(it.attempts), Done: true})
		dead = append(dead, store.Entry{Topic: rec.DeadLetter, Ordering: l.keyOf(it.seq), Body: body})
		if m != nil {
			m.Outcomes.WithLabelValues(rec.Topic, rec.Group, "deadletter").Inc()
			m.DeadLetters.WithLabelValues(rec.Topic, rec.Group, reason).Inc()
		}
		log.Info("dead-lettered", zap.String("reason", reason), zap.String("detail", r.Reason), zap.Int32("attempts", it.attempts), zap.String("dead_letter_topic", rec.DeadLetter))
	}
	// A message whose last group is finishing here is deleted in the same
	// commit.
	d := l.d
	d.mu.Lock()
	var lastSeqs []uint64
	last := make([]bool, len(finished))
	for i, it := range finished {
		if last[i] = d.finishLocked(it.seq); last[i] {
			lastSeqs = append(lastSeqs, it.seq)
		}
	}
	d.mu.Unlock()
	for _, seq := range lastSeqs {
		updates = append(updates, store.Update{Seq: seq, Delete: true})
	}
	res, err := d.store.Apply(updates, dead)
	if err != nil {
		log.Error("record outcomes failed; the batch will be sent again", zap.Error(err))
		d.mu.Lock()
		for i, it := range finished {
			d.unfinishLocked(it.seq, last[i])
		}
		d.mu.Unlock()
		for _, it := range live {
			l.requeue(it)
		}
		return
	}
	now := d.now().UnixNano()
	if len(res) > 0 {
		d.mu.Lock()
		for i, r := range res {
			if !r.Duplicate {
				d.addLocked(r.Seq, dead[i].Topic, dead[i].Ordering, now)
			}
		}
		d.mu.Unlock()
	}
	l.forget(finished)
	for _, n := range retries {
		l.mu.Lock()
		delete(l.inflight, n.it.seq)
		l.mu.Unlock()
		l.later(n.it, n.delay)
	}
	for _, it := range missed {
		l.requeue(it)
	}
}

// deadLetter returns the stored message body moved to rec's dead-letter
// topic, with the reason and attempts as extension attributes.
func deadLetter(body []byte, rec Record, reason, detail string, attempts int) ([]byte, error) {
	m, err := pubsub.Unmarshal(body)
	if err != nil {
		// A stored body that no longer reads: dead-letter its bytes as they
		// are (as the nats broker does), so the message ends rather than
		// being retried past max_attempts for ever.
		m = &pubsub.Message{ID: pubsub.NewID(), Source: pubsub.DefaultSource, Type: pubsub.DefaultType,
			Time: time.Now(), DataContentType: "application/octet-stream", Topic: rec.Topic, Data: body}
		detail = "undecodable: " + err.Error()
	}
	if m.Extensions == nil {
		m.Extensions = map[string]json.RawMessage{}
	}
	why := reason
	if detail != "" {
		why += ": " + detail
	}
	q, _ := json.Marshal(why)
	m.Extensions[pubsub.ExtDeadLetterReason] = q
	m.Extensions[pubsub.ExtDeadLetterAttempts] = json.RawMessage(strconv.Itoa(attempts))
	m.Extensions["deadlettertopic"], _ = json.Marshal(m.Topic)
	m.Extensions["deadlettergroup"], _ = json.Marshal(rec.Group)
	m.Topic = rec.DeadLetter
	return m.Marshal()
}
