package httpbroker

import (
	"context"
	"runtime/debug"
	"slices"
	"sort"
	"strings"
	"sync"
	"time"

	"go.uber.org/zap"

	"github.com/sidecarlb/sidecar/pubsub"
	"github.com/sidecarlb/sidecar/pubsub/internal/seqtab"
	"github.com/sidecarlb/sidecar/pubsub/store"
)

const (
	// lanesInFlight bounds the batches one lane has out at once.
	lanesInFlight = 8
	// maxBatch bounds the messages in one batch, whatever max_in_flight is.
	maxBatch = 256
	// pauseDelay is a lane's first pause when no instance can be reached;
	// it doubles to maxPauseDelay.
	pauseDelay    = 100 * time.Millisecond
	maxPauseDelay = 2 * time.Second
	// requeueDelay is the first wait before sending a message that never
	// reached an app again; it doubles to maxRequeueDelay.
	requeueDelay    = 100 * time.Millisecond
	maxRequeueDelay = 2 * time.Second
)

// Dispatcher is the publishing side: it takes custody of published messages
// (it is the publish API's pubsub.Sink) and delivers each to every group
// subscribed to its topic. Safe for concurrent use.
type Dispatcher struct {
	store   *store.Store
	reg     *Registry
	picker  *picker
	peers   *peerPools
	metrics *pubsub.Metrics
	log     *zap.Logger
	now     func() time.Time
	// goneAfter: see DispatcherOptions.GoneAfter.
	goneAfter time.Duration

	mu      sync.Mutex
	ctx     context.Context // set by Run; nil before
	sendCtx context.Context // batches out: outlives ctx by stopGrace
	wg      sync.WaitGroup
	// open holds, for each message in the outbox, the groups (and
	// broadcast instances) without a final outcome: 4 bytes a message.
	// Everything else the lanes hold, in their items.
	open    *seqtab.Table[int32]
	waiting []unassigned // not yet assigned to groups: the registry has not synced
	lanes   map[laneKey]*lane
}

// unassigned is a message in the outbox not yet handed to its groups'
// lanes: its topic, ordering key, when it came, and the stored state of
// the groups that have one (after a restart).
type unassigned struct {
	seq      uint64
	topic    string // interned: one string per topic
	ordering string // the ordering key, "" for none
	at       int64  // unix nanoseconds
	groups   map[string]store.GroupState
}

type laneKey struct{ topic, group string }

// DispatcherOptions configure a Dispatcher.
type DispatcherOptions struct {
	Metrics *pubsub.Metrics
	Now     func() time.Time // if nil, time.Now
	// GoneAfter is how long an instance of a broadcast group may be missing
	// from the live set before the messages waiting for it are given up;
	// if zero, 30s.
	GoneAfter time.Duration
}

// NewDispatcher returns a Dispatcher over st, delivering through cache. It
// owns a Registry over kv; Run starts both.
func NewDispatcher(st *store.Store, kv KV, cache Watcher, opts DispatcherOptions, log *zap.Logger) *Dispatcher {
	d := &Dispatcher{
		store:   st,
		picker:  newPicker(cache),
		peers:   newPeerPools(),
		metrics: opts.Metrics,
		log:     log,
		now:     opts.Now,
		open:    seqtab.New[int32](),
		lanes:   map[laneKey]*lane{},
	}
	if d.now == nil {
		d.now = time.Now
	}
	d.goneAfter = opts.GoneAfter
	if d.goneAfter == 0 {
		d.goneAfter = defaultGoneAfter
	}
	d.reg = NewRegistry(kv, d.assignWaiting, log)
	return d
}

// Registry returns the dispatcher's view of the subscriptions.
func (d *Dispatcher) Registry() *Registry { return d.reg }

// Load reads the outbox left by a previous run into memory. Call it once,
// before Run.
func (d *Dispatcher) Load() error {
	now := d.now().UnixNano()
	topics := map[string]string{}
	d.waiting = slices.Grow(d.waiting, d.store.Pending()) // no garbage of a growing slice
	return d.store.Load(func(seq uint64, topic, ordering string, groups map[string]store.GroupState) error {
		if t, ok := topics[topic]; ok {
			topic = t
		} else {
			topics[topic] = topic
		}
		d.open.Set(seq, 0)
		d.waiting = append(d.waiting, unassigned{seq: seq, topic: topic, ordering: ordering, at: now, groups: groups})
		return nil
	})
}

// stopGrace is how long batches out when Run's context ends may take to
// come back before they are cancelled (and their messages sent again by
// the next run).
const stopGrace = 5 * time.Second

// Run delivers until ctx ends, then waits for the batches out to finish,
// at most stopGrace.
func (d *Dispatcher) Run(ctx context.Context) {
	sendCtx, cancelSends := context.WithCancel(context.WithoutCancel(ctx))
	defer cancelSends()
	d.mu.Lock()
	d.ctx, d.sendCtx = ctx, sendCtx
	for _, l := range d.lanes {
		d.startLane(l)
	}
	d.mu.Unlock()
	d.reg.Run(ctx)
	t := time.AfterFunc(stopGrace, cancelSends)
	defer t.Stop()
	d.wg.Wait()
}

// Publish stores pubs durably, then assigns them to their groups. It is the
// publish API's Sink.
func (d *Dispatcher) Publish(pubs []pubsub.Publication) ([]bool, error) {
	entries := make([]store.Entry, len(pubs))
	for i, p := range pubs {
		b, err := p.Msg.Marshal()
		if err != nil {
			return nil, err
		}
		entries[i] = store.Entry{Key: p.Key, Topic: p.Msg.Topic, Ordering: p.Msg.OrderingKey, Body: b}
	}
	res, err := d.store.Append(entries)
	if err != nil {
		return nil, err
	}
	dup := make([]bool, len(res))
	now := d.now().UnixNano()
	d.mu.Lock()
	defer d.mu.Unlock()
	for i, r := range res {
		dup[i] = r.Duplicate
		if !r.Duplicate {
			d.addLocked(r.Seq, entries[i].Topic, entries[i].Ordering, now)
		}
	}
	return dup, nil
}

// addLocked takes a newly stored message into memory. d.mu must be held.
func (d *Dispatcher) addLocked(seq uint64, topic, ordering string, at int64) {
	d.open.Set(seq, 0)
	u := unassigned{seq: seq, topic: topic, ordering: ordering, at: at}
	if _, synced := d.reg.Groups(topic); !synced || len(d.waiting) > 0 {
		d.waiting = append(d.waiting, u)
		return
	}
	d.assignLocked(u)
}

// assignWaiting assigns the messages waiting for the registry; the
// registry calls it after every change.
func (d *Dispatcher) assignWaiting() {
	d.mu.Lock()
	defer d.mu.Unlock()
	for _, l := range d.lanes {
		recs, _ := d.reg.Groups(l.key.topic)
		for _, r := range recs {
			if inst, ok := strings.CutPrefix(l.key.group, r.Group+"@"); ok && r.broadcast() {
				r.Instance = inst
			}
			if r.target() == l.key.group {
				l.setRecord(r)
			}
		}
	}
	w := d.waiting
	d.waiting = nil
	for _, u := range w {
		d.assignLocked(u)
	}
}

// assignLocked hands message p to a lane per group of its topic, skipping
// groups already done; with no group at all the message is finished.
func (d *Dispatcher) assignLocked(p unassigned) {
	seq := p.seq
	open, ok := d.open.Get(seq)
	if !ok {
		return
	}
	recs, _ := d.reg.Groups(p.topic)
	for _, r := range recs {
		gs := p.groups[r.Group]
		if gs.Done {
			if r.broadcast() {
				open += d.assignInstancesLocked(p, r)
			}
			continue
		}
		open++
		d.laneLocked(r).push(item{seq: seq, attempts: int32(gs.Attempts), at: p.at}, p.ordering)
	}
	d.open.Set(seq, open)
	if open == 0 {
		d.open.Delete(seq)
		d.wg.Add(1)
		go func() {
			defer d.wg.Done()
			if _, err := d.store.Apply([]store.Update{{Seq: seq, Delete: true}}, nil); err != nil {
				d.log.Error("drop message without subscribers failed", zap.Uint64("seq", seq), zap.Error(err))
			}
		}()
		if d.metrics != nil && len(recs) == 0 {
			d.metrics.Outcomes.WithLabelValues(p.topic, "", "no_subscribers").Inc()
		}
	}
}

// finishLocked counts a final outcome of message seq for one group (or
// broadcast instance), reporting whether it was the last the message
// waited for: it is then forgotten, and the caller deletes it from the
// store. d.mu must be held.
func (d *Dispatcher) finishLocked(seq uint64) (last bool) {
	open, ok := d.open.Get(seq)
	if !ok {
		return false
	}
	if open--; open <= 0 {
		d.open.Delete(seq)
		return true
	}
	d.open.Set(seq, open)
	return false
}

// unfinishLocked undoes finishLocked(seq), which returned last, after the
// outcome failed to commit. d.mu must be held.
func (d *Dispatcher) unfinishLocked(seq uint64, last bool) {
	if last {
		d.open.Set(seq, 1)
		return
	}
	if open, ok := d.open.Get(seq); ok {
		d.open.Set(seq, open+1)
	}
}

func (d *Dispatcher) laneLocked(r Record) *lane {
	k := laneKey{r.Topic, r.target()}
	l := d.lanes[k]
	if l == nil {
		l = newLane(d, k, r)
		d.lanes[k] = l
		if d.ctx != nil {
			d.startLane(l)
		}
	}
	return l
}

func (d *Dispatcher) startLane(l *lane) {
	d.wg.Add(1)
	go func() {
		defer d.wg.Done()
		defer func() {
			if r := recover(); r != nil {
				d.log.Error("lane panicked", zap.Any("panic", r), zap.ByteString("stack", debug.Stack()))
			}
		}()
		l.run(d.ctx)
	}()
}

// GroupStatus is one lane's state for /status.
type GroupStatus struct {
	Topic         string  `json:"topic"`
	Group         string  `json:"group"`
	Pending       int     `json:"pending"`
	InFlight      int     `json:"in_flight"`
	OldestSeconds float64 `json:"oldest_pending_seconds"`
}

// Status is the dispatcher's state for /status.
type Status struct {
	Outbox        int           `json:"outbox"` // messages in the store
	OldestSeconds float64       `json:"oldest_pending_seconds"`
	Unassigned    int           `json:"waiting_for_subscriptions"`
	Groups        []GroupStatus `json:"groups"`
}

// Status returns a snapshot of the outbox and each lane. It walks every
// pending message: meant for /status and scrapes, not a hot path.
func (d *Dispatcher) Status() Status {
	now := d.now()
	d.mu.Lock()
	s := Status{Outbox: d.store.Pending(), Unassigned: len(d.waiting)}
	for _, u := range d.waiting {
		s.OldestSeconds = max(s.OldestSeconds, age(now, u.at))
	}
	lanes := make([]*lane, 0, len(d.lanes))
	for _, l := range d.lanes {
		lanes = append(lanes, l)
	}
	d.mu.Unlock()
	for _, l := range lanes {
		g := l.status(now)
		s.OldestSeconds = max(s.OldestSeconds, g.OldestSeconds) // every assigned message is in a lane
		s.Groups = append(s.Groups, g)
	}
	sort.Slice(s.Groups, func(i, j int) bool {
		a, b := s.Groups[i], s.Groups[j]
		return a.Topic < b.Topic || a.Topic == b.Topic && a.Group < b.Group
	})
	return s
}

var _ pubsub.Broker = (*Dispatcher)(nil)
