// Package store keeps the pub/sub messages a sidecar has answered for, in a
// bbolt file under pubsub.data_dir: the outbox (each message until every
// group has a final outcome), the delivery state of each message for each
// group (attempts made, done), and the Idempotency-Key dedup table.
//
// Every write goes through one committer goroutine that takes whatever
// writes are waiting, applies them in one transaction and fsyncs once
// (group commit). A writer waits for its commit: when Append returns nil,
// the messages are on disk. The committer does not wait for company the way
// bbolt's DB.Batch does (MaxBatchDelay, 10ms by default): an idle store
// commits at once, so a lone publisher pays one fsync, and a busy one
// batches everything that queued during the previous fsync.
package store

import (
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"time"

	bolt "go.etcd.io/bbolt"
)

var (
	// ErrFull is returned by Append when the outbox holds MaxPending
	// messages.
	ErrFull = errors.New("store full")
	// ErrClosed is returned after Close.
	ErrClosed = errors.New("store closed")
)

var (
	bucketOutbox   = []byte("outbox")    // seq → body
	bucketMeta     = []byte("meta")      // seq → topic length, topic, ordering key length, key
	bucketState    = []byte("state")     // seq, group → attempts (4), done (1)
	bucketDedup    = []byte("dedup")     // key → expiry (8), seq (8)
	bucketDedupExp = []byte("dedup_exp") // expiry (8), key → nothing
)

// maxBatch bounds the writes applied in one transaction.
const maxBatch = 4096

// Options tune a Store. Zero values select the documented defaults.
type Options struct {
	// DedupFor is how long an Idempotency-Key is remembered; if zero, 10m.
	DedupFor time.Duration
	// MaxPending bounds the messages in the outbox; if zero, 1,000,000.
	MaxPending int
	// Now is the clock; if nil, time.Now.
	Now func() time.Time
	// NoSync skips fsync, for benchmarks that measure everything else.
	NoSync bool
}

// Store is the durable state of one sidecar's pub/sub. It is safe for
// concurrent use.
type Store struct {
	db      *bolt.DB
	opts    Options
	ops     chan *op
	quit    chan struct{}
	stopped chan struct{}
	once    sync.Once
	pending atomic.Int64 // messages in the outbox
	commits atomic.Int64 // transactions committed
	writes  atomic.Int64 // writes committed in them
	swept   time.Time    // committer only
}

type op struct {
	fn   func(tx *bolt.Tx) error
	done chan error
}

// Open opens or creates the store in dir.
func Open(dir string, opts Options) (*Store, error) {
	if opts.DedupFor == 0 {
		opts.DedupFor = 10 * time.Minute
	}
	if opts.MaxPending == 0 {
		opts.MaxPending = 1_000_000
	}
	if opts.Now == nil {
		opts.Now = time.Now
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("create data dir: %w", err)
	}
	path := filepath.Join(dir, "pubsub.db")
	db, err := bolt.Open(path, 0o600, &bolt.Options{
		Timeout:        2 * time.Second, // another process holds the file
		NoFreelistSync: true,
		FreelistType:   bolt.FreelistMapType,
		// Address space only: no remap (which waits for every reader)
		// until the file passes 256MiB.
		InitialMmapSize: 256 << 20,
		NoSync:          opts.NoSync,
	})
	if err != nil {
		return nil, fmt.Errorf("open %s: %w", path, err)
	}
	var n int
	err = db.Update(func(tx *bolt.Tx) error {
		for _, b := range [][]byte{bucketOutbox, bucketMeta, bucketState, bucketDedup, bucketDedupExp} {
			if _, err := tx.CreateBucketIfNotExists(b); err != nil {
				return err
			}
		}
		n = tx.Bucket(bucketMeta).Stats().KeyN // small records: no body is read
		return nil
	})
	if err != nil {
		_ = db.Close()
		return nil, fmt.Errorf("open %s: %w", path, err)
	}
	s := &Store{db: db, opts: opts, ops: make(chan *op, maxBatch), quit: make(chan struct{}), stopped: make(chan struct{})}
	s.pending.Store(int64(n))
	go s.commit()
	return s, nil
}

// Close stops the committer and closes the file. Writes waiting for a
// commit that did not happen get ErrClosed.
func (s *Store) Close() error {
	s.once.Do(func() { close(s.quit) })
	<-s.stopped
	return s.db.Close()
}

// Commits returns the number of group commits so far and of the writes
// they carried: their ratio is the mean batch.
func (s *Store) Commits() (commits, writes int64) { return s.commits.Load(), s.writes.Load() }

// Pending returns the number of messages in the outbox.
func (s *Store) Pending() int { return int(s.pending.Load()) }

// Entry is a message to append.
type Entry struct {
	// Key is the Idempotency-Key; "" for none.
	Key   string
	Topic string
	// Ordering is the ordering key; "" for none. At most 255 bytes.
	Ordering string
	Body     []byte
}

// Appended is what Append did with one Entry.
type Appended struct {
	Seq uint64
	// Duplicate is true when Key was seen within DedupFor: nothing was
	// stored and Seq is the first message's.
	Duplicate bool
}

// Update changes the delivery state of message Seq for Group.
type Update struct {
	Seq      uint64
	Group    string
	Attempts int  // deliveries that reached the app so far
	Done     bool // the group has a final outcome
	// Delete removes the message and all its state: every group is done.
	Delete bool
}

// Append stores entries durably and returns once they are fsynced. It may
// block for one commit; it is safe for concurrent use.
func (s *Store) Append(entries []Entry) ([]Appended, error) {
	if s.pending.Load()+int64(len(entries)) > int64(s.opts.MaxPending) {
		return nil, ErrFull
	}
	return s.Apply(nil, entries)
}

// Apply applies updates and appends entries in one transaction, so that a
// dead letter is stored in the same commit that finishes the original. It
// does not refuse entries at MaxPending, as Append does: they are the dead
// letters of messages it finishes, and refusing them would leave those
// messages to be delivered again for as long as the outbox stays full.
func (s *Store) Apply(updates []Update, entries []Entry) ([]Appended, error) {
	out := make([]Appended, len(entries))
	var added, deleted int64
	now := s.opts.Now()
	err := s.do(func(tx *bolt.Tx) error {
		added, deleted = 0, 0
		ob, mb, st := tx.Bucket(bucketOutbox), tx.Bucket(bucketMeta), tx.Bucket(bucketState)
		dd, de := tx.Bucket(bucketDedup), tx.Bucket(bucketDedupExp)
		for _, u := range updates {
			if u.Delete {
				if mb.Get(seqKey(u.Seq)) != nil {
					deleted++
				}
				if err := deleteMessage(ob, mb, st, u.Seq); err != nil {
					return err
				}
				continue
			}
			v := make([]byte, 5)
			binary.BigEndian.PutUint32(v, uint32(u.Attempts))
			if u.Done {
				v[4] = 1
			}
			if err := st.Put(stateKey(u.Seq, u.Group), v); err != nil {
				return err
			}
		}
		for i, e := range entries {
			if e.Key != "" {
				if v := dd.Get([]byte(e.Key)); len(v) == 16 && int64(binary.BigEndian.Uint64(v)) > now.UnixNano() {
					out[i] = Appended{Seq: binary.BigEndian.Uint64(v[8:]), Duplicate: true}
					continue
				}
			}
			seq, err := ob.NextSequence()
			if err != nil {
				return err
			}
			if len(e.Topic) > 255 || len(e.Ordering) > 255 {
				return fmt.Errorf("topic or ordering key longer than 255 bytes")
			}
			meta := make([]byte, 0, 2+len(e.Topic)+len(e.Ordering))
			meta = append(meta, byte(len(e.Topic)))
			meta = append(meta, e.Topic...)
			meta = append(meta, byte(len(e.Ordering)))
			meta = append(meta, e.Ordering...)
			if err := mb.Put(seqKey(seq), meta); err != nil {
				return err
			}
			if err := ob.Put(seqKey(seq), e.Body); err != nil {
				return err
			}
			added++
			out[i] = Appended{Seq: seq}
			if e.Key != "" {
				exp := uint64(now.Add(s.opts.DedupFor).UnixNano())
				dv := make([]byte, 16)
				binary.BigEndian.PutUint64(dv, exp)
				binary.BigEndian.PutUint64(dv[8:], seq)
				if err := dd.Put([]byte(e.Key), dv); err != nil {
					return err
				}
				ek := make([]byte, 8+len(e.Key))
				binary.BigEndian.PutUint64(ek, exp)
				copy(ek[8:], e.Key)
				if err := de.Put(ek, nil); err != nil {
					return err
				}
			}
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	s.pending.Add(added - deleted)
	return out, nil
}

func deleteMessage(ob, mb, st *bolt.Bucket, seq uint64) error {
	if err := ob.Delete(seqKey(seq)); err != nil {
		return err
	}
	if err := mb.Delete(seqKey(seq)); err != nil {
		return err
	}
	c := st.Cursor()
	prefix := seqKey(seq)
	for k, _ := c.Seek(prefix); len(k) >= 8 && string(k[:8]) == string(prefix); k, _ = c.Seek(prefix) {
		if err := c.Delete(); err != nil {
			return err
		}
	}
	return nil
}

// Get returns the topic and body of message seq, copied out of the file;
// ok is false when there is no such message.
func (s *Store) Get(seq uint64) (topic string, body []byte, ok bool, err error) {
	err = s.db.View(func(tx *bolt.Tx) error {
		v := tx.Bucket(bucketMeta).Get(seqKey(seq))
		b := tx.Bucket(bucketOutbox).Get(seqKey(seq))
		if v == nil || b == nil {
			return nil
		}
		t, _, derr := decodeMeta(v)
		if derr != nil {
			return fmt.Errorf("message %d: %w", seq, derr)
		}
		topic, body, ok = t, append([]byte(nil), b...), true
		return nil
	})
	return topic, body, ok, err
}

// GroupState is the stored delivery state of one message for one group.
type GroupState struct {
	Attempts int
	Done     bool
}

// Load calls fn for each message in the outbox, in publish order, with its
// topic, its ordering key and the state of each group that has one. It
// reads one snapshot and must not be called concurrently with fn writing to
// the store.
func (s *Store) Load(fn func(seq uint64, topic, ordering string, groups map[string]GroupState) error) error {
	return s.db.View(func(tx *bolt.Tx) error {
		sc := tx.Bucket(bucketState).Cursor()
		sk, sv := sc.First()
		c := tx.Bucket(bucketMeta).Cursor()
		for k, v := c.First(); k != nil; k, v = c.Next() {
			seq := binary.BigEndian.Uint64(k)
			topic, ordering, err := decodeMeta(v)
			if err != nil {
				return fmt.Errorf("message %d: %w", seq, err)
			}
			var groups map[string]GroupState
			for ; sk != nil && binary.BigEndian.Uint64(sk[:8]) <= seq; sk, sv = sc.Next() {
				if binary.BigEndian.Uint64(sk[:8]) != seq || len(sv) != 5 {
					continue
				}
				if groups == nil {
					groups = map[string]GroupState{}
				}
				groups[string(sk[8:])] = GroupState{Attempts: int(binary.BigEndian.Uint32(sv)), Done: sv[4] == 1}
			}
			if err := fn(seq, topic, ordering, groups); err != nil {
				return err
			}
		}
		return nil
	})
}

func decodeMeta(v []byte) (topic, ordering string, err error) {
	if len(v) < 1 || len(v) < 2+int(v[0]) {
		return "", "", errors.New("corrupt record")
	}
	n := int(v[0])
	topic, v = string(v[1:1+n]), v[1+n:]
	if len(v) != 1+int(v[0]) {
		return "", "", errors.New("corrupt record")
	}
	if n = int(v[0]); n > 0 {
		ordering = string(v[1:])
	}
	return topic, ordering, nil
}

func seqKey(seq uint64) []byte {
	k := make([]byte, 8)
	binary.BigEndian.PutUint64(k, seq)
	return k
}

func stateKey(seq uint64, group string) []byte {
	k := make([]byte, 8+len(group))
	binary.BigEndian.PutUint64(k, seq)
	copy(k[8:], group)
	return k
}

// do hands fn to the committer and waits for its commit.
func (s *Store) do(fn func(tx *bolt.Tx) error) error {
	o := &op{fn: fn, done: make(chan error, 1)}
	select {
	case s.ops <- o:
	case <-s.quit:
		return ErrClosed
	}
	select {
	case err := <-o.done:
		return err
	case <-s.stopped:
		// The committer may have answered just before stopping.
		select {
		case err := <-o.done:
			return err
		default:
			return ErrClosed
		}
	}
}

// commit is the committer goroutine: it applies the waiting writes in one
// transaction each round. If that transaction fails, each write is retried
// alone so one bad write fails only its own caller.
func (s *Store) commit() {
	defer close(s.stopped)
	batch := make([]*op, 0, maxBatch)
	for {
		batch = batch[:0]
		select {
		case o := <-s.ops:
			batch = append(batch, o)
		case <-s.quit:
			return
		}
	fill:
		for len(batch) < maxBatch {
			select {
			case o := <-s.ops:
				batch = append(batch, o)
			default:
				break fill
			}
		}
		now := s.opts.Now()
		sweep := now.Sub(s.swept) > 10*time.Second
		err := s.db.Update(func(tx *bolt.Tx) error {
			for _, o := range batch {
				if err := o.fn(tx); err != nil {
					return err
				}
			}
			if sweep {
				return sweepDedup(tx, now)
			}
			return nil
		})
		if err == nil {
			s.commits.Add(1)
			s.writes.Add(int64(len(batch)))
			if sweep {
				s.swept = now
			}
			for _, o := range batch {
				o.done <- nil
			}
			continue
		}
		if len(batch) == 1 {
			batch[0].done <- err
			continue
		}
		for _, o := range batch {
			o.done <- s.db.Update(o.fn)
		}
	}
}

// sweepDedup forgets keys whose time is up, at most 10,000 a commit.
func sweepDedup(tx *bolt.Tx, now time.Time) error {
	dd, de := tx.Bucket(bucketDedup), tx.Bucket(bucketDedupExp)
	c := de.Cursor()
	for i, k := 0, firstKey(c); k != nil && i < 10_000; i, k = i+1, firstKey(c) {
		if int64(binary.BigEndian.Uint64(k[:8])) > now.UnixNano() {
			break
		}
		key := append([]byte(nil), k[8:]...)
		if v := dd.Get(key); len(v) == 16 && binary.BigEndian.Uint64(v) == binary.BigEndian.Uint64(k[:8]) {
			if err := dd.Delete(key); err != nil {
				return err
			}
		}
		if err := c.Delete(); err != nil {
			return err
		}
	}
	return nil
}

func firstKey(c *bolt.Cursor) []byte {
	k, _ := c.First()
	return k
}
