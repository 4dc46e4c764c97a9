package httpbroker

import (
	"context"
	"encoding/json"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hashicorp/consul/api"
	"go.uber.org/zap"

	"github.com/sidecarlb/sidecar/config"
	"github.com/sidecarlb/sidecar/internal/backoff"
	"github.com/sidecarlb/sidecar/pubsub"
)

// KVPrefix is where subscription records live in Consul KV.
const KVPrefix = "sidecar/pubsub/subscriptions/"

// ServiceName is the Consul service a group's peer listeners register as.
func ServiceName(group string) string { return "pubsub-" + group }

// Record is one group's subscription to a topic, as publishers see it.
type Record struct {
	Topic       string        `json:"topic"`
	Group       string        `json:"group"`
	Service     string        `json:"service"` // the group's peer service in Consul
	Delivery    string        `json:"delivery"`
	MaxInFlight int           `json:"max_in_flight"`
	Timeout     time.Duration `json:"timeout"`
	MaxAttempts int           `json:"max_attempts"`
	Backoff     time.Duration `json:"backoff"`
	MaxBackoff  time.Duration `json:"max_backoff"`
	DeadLetter  string        `json:"dead_letter_topic"`
	Ordering    string        `json:"ordering"` // none or per_key
	// Instance, set on the records of a broadcast group's per-instance
	// lanes only, is the instance (Consul service ID) the lane delivers to.
	Instance string `json:"-"`
}

// target is the name a lane and the stored delivery state use: the group,
// or "group@instance" for one instance of a broadcast group.
func (r *Record) target() string {
	if r.Instance != "" {
		return r.Group + "@" + r.Instance
	}
	return r.Group
}

// broadcast reports whether r is a broadcast group's fan-out record.
func (r *Record) broadcast() bool { return r.Delivery == config.DeliveryBroadcast && r.Instance == "" }

func (r *Record) policy() pubsub.Policy {
	return pubsub.Policy{MaxAttempts: r.MaxAttempts, Backoff: r.Backoff, MaxBackoff: r.MaxBackoff}
}

// sanitize replaces values no valid config gives with safe ones, so a
// hand-edited record cannot make a lane spin or dead-letter at once.
func (r *Record) sanitize() {
	r.MaxInFlight = max(r.MaxInFlight, 1)
	r.MaxAttempts = max(r.MaxAttempts, 1)
	if r.Backoff <= 0 {
		r.Backoff = 200 * time.Millisecond
	}
	r.MaxBackoff = max(r.MaxBackoff, r.Backoff)
	if r.Timeout <= 0 {
		r.Timeout = 30 * time.Second
	}
	if r.DeadLetter == "" {
		r.DeadLetter = r.Topic + ".dlq"
	}
}

func (r *Record) key() string { return KVPrefix + r.Topic + "/" + r.Group }

// KV is the part of *api.KV the broker uses.
type KV interface {
	List(prefix string, q *api.QueryOptions) (api.KVPairs, *api.QueryMeta, error)
	Put(p *api.KVPair, q *api.WriteOptions) (*api.WriteMeta, error)
}

// Registry follows the subscription records in Consul KV with a blocking
// query. Its methods are safe for concurrent use.
type Registry struct {
	kv       KV
	log      *zap.Logger
	onChange func()
	topics   atomic.Pointer[map[string][]Record]
	synced   chan struct{}
	once     sync.Once
}

// NewRegistry returns a Registry; onChange, if not nil, is called after
// each change of the records (and after the first answer).
func NewRegistry(kv KV, onChange func(), log *zap.Logger) *Registry {
	return &Registry{kv: kv, log: log, onChange: onChange, synced: make(chan struct{})}
}

// Groups returns the records of topic's groups, and whether the registry
// has heard from Consul at least once. It does not block.
func (r *Registry) Groups(topic string) ([]Record, bool) {
	m := r.topics.Load()
	if m == nil {
		return nil, false
	}
	return (*m)[topic], true
}

// Synced is closed once the registry has heard from Consul.
func (r *Registry) Synced() <-chan struct{} { return r.synced }

// Run follows the records until ctx ends. While Consul is unreachable the
// last records stay in force.
func (r *Registry) Run(ctx context.Context) {
	var index uint64
	failures := 0
	for ctx.Err() == nil {
		q := (&api.QueryOptions{WaitIndex: index, WaitTime: 5 * time.Minute}).WithContext(ctx)
		pairs, meta, err := r.kv.List(KVPrefix, q)
		if err != nil {
			if ctx.Err() != nil {
				return
			}
			failures++
			r.log.Warn("watch subscriptions failed", zap.Int("attempt", failures), zap.Error(err))
			backoff.Wait(ctx, consulBackoff.Backoff(failures))
			continue
		}
		failures = 0
		// Consul's rule, as in discovery: an index of 0 is taken as 1, so
		// that the next query blocks rather than answering at once.
		last := max(meta.LastIndex, 1)
		if last < index {
			index = 0 // the index went backwards: start over
		} else if last == index && r.topics.Load() != nil {
			continue
		} else {
			index = last
		}
		r.set(pairs)
	}
}

// set merges the records in pairs into the current ones. A group once seen
// stays: an answer without it (a wiped or restored KV, an index reset) must
// not make publishers drop the messages of a durable group.
func (r *Registry) set(pairs api.KVPairs) {
	m := map[string][]Record{}
	if old := r.topics.Load(); old != nil {
		for t, recs := range *old {
			m[t] = slices.Clone(recs)
		}
	}
	for _, p := range pairs {
		var rec Record
		if err := json.Unmarshal(p.Value, &rec); err != nil || rec.Topic == "" || rec.Group == "" || rec.Service == "" || p.Key != rec.key() {
			r.log.Warn("ignoring a bad subscription record", zap.String("key", p.Key))
			continue
		}
		rec.sanitize()
		recs := m[rec.Topic]
		if i := slices.IndexFunc(recs, func(o Record) bool { return o.Group == rec.Group }); i >= 0 {
			recs[i] = rec
		} else {
			recs = append(recs, rec)
		}
		m[rec.Topic] = recs
	}
	r.topics.Store(&m)
	r.once.Do(func() { close(r.synced) })
	if r.onChange != nil {
		r.onChange()
	}
}

// Announce writes recs to Consul KV, retrying with backoff until every one
// is written, and writes them again every reannounce (a wiped KV learns
// them back) until ctx ends.
func Announce(ctx context.Context, kv KV, recs []Record, reannounce time.Duration, log *zap.Logger) {
	for first := true; ctx.Err() == nil; first = false {
		announce(ctx, kv, recs, first, log)
		backoff.Wait(ctx, reannounce)
	}
}

func announce(ctx context.Context, kv KV, recs []Record, first bool, log *zap.Logger) {
	for _, rec := range recs {
		val, err := json.Marshal(rec)
		if err != nil {
			panic(err) // a Record always encodes
		}
		for attempt := 1; ctx.Err() == nil; attempt++ {
			_, err := kv.Put(&api.KVPair{Key: rec.key(), Value: val}, (&api.WriteOptions{}).WithContext(ctx))
			if err == nil {
				if first {
					log.Info("subscription announced", zap.String("topic", rec.Topic), zap.String("group", rec.Group))
				}
				break
			}
			log.Warn("announce subscription failed", zap.String("topic", rec.Topic), zap.Int("attempt", attempt), zap.Error(err))
			backoff.Wait(ctx, consulBackoff.Backoff(attempt))
		}
	}
}

// consulBackoff spaces failed Consul calls: 200ms doubling to 5s, ±20%.
var consulBackoff = backoff.Exponential{Base: 200 * time.Millisecond, Max: 5 * time.Second, Jitter: 0.2}
