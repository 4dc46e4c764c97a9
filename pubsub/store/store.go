// Package store keeps the pub/sub messages a sidecar has answered for, in
// an append-only log under pubsub.data_dir: the outbox (each message until
// every group has a final outcome), the delivery state of each message for
// each group (attempts made, done), and the Idempotency-Key dedup table.
//
// Every write goes through one committer goroutine that takes whatever
// writes are waiting, appends their records to the log in one write and
// fdatasyncs once (group commit): one fsync per batch, where bbolt paid two
// per commit. A writer waits for its commit: when Append returns nil, the
// messages are on disk. The committer does not wait for company: an idle
// store commits at once, so a lone publisher pays one fsync, and a busy one
// batches everything that queued during the previous fsync.
//
// Memory holds only what delivery needs: for each pending message its
// topic, ordering key, group states and where its body lies in the log, not
// the body; Get reads the body back from the file. The log is split into
// segments; a segment whose messages are all finished is removed (its live
// Idempotency-Keys carried over first), and one whose messages are mostly
// finished has the rest copied forward so that it can be.
package store

import (
	"cmp"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"

	"github.com/sidecarlb/sidecar/pubsub/internal/seqtab"
)

var (
	// ErrFull is returned by Append when the outbox holds MaxPending
	// messages.
	ErrFull = errors.New("store full")
	// ErrClosed is returned after Close.
	ErrClosed = errors.New("store closed")
)

// maxBatch bounds the writes applied in one commit.
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
	// SegmentSize is the size at which the log moves to a new segment
	// file; if zero, 64 MiB.
	SegmentSize int64
}

// Store is the durable state of one sidecar's pub/sub. It is safe for
// concurrent use.
type Store struct {
	dir     string
	opts    Options
	lock    *os.File // flock held while open
	ops     chan *op
	quit    chan struct{}
	stopped chan struct{}
	once    sync.Once
	pending atomic.Int64 // messages in the outbox
	commits atomic.Int64 // group commits (fsyncs)
	writes  atomic.Int64 // writes committed in them

	mu    sync.RWMutex // guards msgs, extra and segs; held by readers of a body
	msgs  *seqtab.Table[msg]
	extra map[uint64]*msgExtra // of the messages with an ordering key or a group state
	segs  []*segment           // oldest first; the last is written to

	// Committer only.
	dedup   map[string]dedupEntry
	dedupQ  []dedupExp // in expiry order
	nextSeq uint64
	buf     []byte
	broken  error // a failed write or fsync: nothing more is acknowledged
	swept   time.Time
	names   map[string]string // interned group names
	topicID map[string]uint32 // topic → index in topics
	topics  []string
}

type segment struct {
	id        uint64
	f         *os.File
	size      int64
	live      int   // messages whose current copy is in this segment
	liveBytes int64 // about their append records' bytes
}

// msg is what memory holds of a pending message: 24 bytes in a
// seqtab.Table (about 25 a message), and an entry in Store.extra only for
// a message with an ordering key or a group state.
type msg struct {
	seg   *segment
	off   int64 // of the body in seg's file
	n     uint32
	topic uint32 // index in Store.topics
}

type msgExtra struct {
	ordering string
	groups   []groupState
}

func (s *Store) ordering(seq uint64) string {
	if x := s.extra[seq]; x != nil {
		return x.ordering
	}
	return ""
}

func (s *Store) groups(seq uint64) []groupState {
	if x := s.extra[seq]; x != nil {
		return x.groups
	}
	return nil
}

// recLen is about the bytes of the append record of message seq, m (its
// key not counted), for the accounting of live bytes per segment.
func (s *Store) recLen(seq uint64, m *msg) int64 {
	return recHeader + int64(appendHeadLen("", s.topics[m.topic], s.ordering(seq))) + int64(m.n)
}

// addMsg puts message seq, a body of n bytes at off in seg, in memory.
func (s *Store) addMsg(seq uint64, seg *segment, off int64, n int, topic, ordering string) {
	m := msg{seg: seg, off: off, n: uint32(n), topic: s.topicIndex(topic)}
	if ordering != "" {
		s.extra[seq] = &msgExtra{ordering: strings.Clone(ordering)}
	}
	s.msgs.Set(seq, m)
	seg.live++
	seg.liveBytes += s.recLen(seq, &m)
}

// topicIndex returns topic's index in s.topics, adding it if new.
func (s *Store) topicIndex(topic string) uint32 {
	if i, ok := s.topicID[topic]; ok {
		return i
	}
	i := uint32(len(s.topics))
	topic = strings.Clone(topic)
	s.topicID[topic] = i
	s.topics = append(s.topics, topic)
	return i
}

type groupState struct {
	name     string
	attempts uint32
	done     bool
}

type dedupEntry struct {
	exp int64
	seq uint64
	seg *segment
}

type dedupExp struct {
	exp int64
	key string
}

// opPool recycles ops and their done channels (buffered, and empty when
// an op goes back): two allocations less per write.
var opPool = sync.Pool{New: func() any { return &op{done: make(chan error, 1)} }}

type op struct {
	updates []Update
	entries []Entry
	out     []Appended
	delta   int64 // messages added less those finished, set by the committer
	done    chan error
}

// Open opens or creates the store in dir. It replays the log: a record torn
// by a crash at the end of the newest segment is dropped; damage anywhere
// else is an error, and nothing is removed.
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
	if opts.SegmentSize == 0 {
		opts.SegmentSize = 64 << 20
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("create data dir: %w", err)
	}
	lock, err := lockDir(dir)
	if err != nil {
		return nil, err
	}
	s := &Store{
		dir: dir, opts: opts, lock: lock,
		ops: make(chan *op, maxBatch), quit: make(chan struct{}), stopped: make(chan struct{}),
		msgs: seqtab.New[msg](), extra: map[uint64]*msgExtra{}, dedup: map[string]dedupEntry{}, names: map[string]string{}, topicID: map[string]uint32{},
		nextSeq: 1,
	}
	if err := s.load(); err != nil {
		s.closeFiles()
		return nil, err
	}
	s.pending.Store(int64(s.msgs.Len()))
	s.swept = opts.Now()
	go s.commit()
	return s, nil
}

// lockDir takes an exclusive lock on dir/LOCK, waiting up to 2s for
// another process to let go of it.
func lockDir(dir string) (*os.File, error) {
	path := filepath.Join(dir, "LOCK")
	f, err := os.OpenFile(path, os.O_CREATE|os.O_RDWR, 0o600)
	if err != nil {
		return nil, fmt.Errorf("open %s: %w", path, err)
	}
	for deadline := time.Now().Add(2 * time.Second); ; {
		err = unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB)
		if err == nil {
			return f, nil
		}
		if err != unix.EWOULDBLOCK || time.Now().After(deadline) {
			_ = f.Close()
			return nil, fmt.Errorf("lock %s (another sidecar uses this data_dir?): %w", path, err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// load replays the segments, imports a bbolt file left by an older
// version, and opens the segment to write to.
func (s *Store) load() error {
	ids, err := listSegments(s.dir)
	if err != nil {
		return fmt.Errorf("read data dir: %w", err)
	}
	now := s.opts.Now().UnixNano()
	for i, id := range ids {
		path := segPath(s.dir, id)
		seg := &segment{id: id}
		s.segs = append(s.segs, seg)
		end, err := readSegment(path, func(off int64, r record) error {
			s.replay(seg, off, r, now)
			return nil
		})
		last := i == len(ids)-1
		switch {
		case errors.Is(err, errTorn) && last:
			// The write a crash cut off: never acknowledged.
			if err := truncateSync(path, end); err != nil {
				return fmt.Errorf("drop torn tail of %s: %w", path, err)
			}
		case errors.Is(err, errTorn):
			return fmt.Errorf("%s: corrupt record at offset %d", path, end)
		case err != nil:
			return fmt.Errorf("read %s: %w", path, err)
		}
		seg.size = end
		mode := os.O_RDONLY
		if last {
			mode = os.O_RDWR
		}
		if seg.f, err = os.OpenFile(path, mode, 0); err != nil {
			return fmt.Errorf("open %s: %w", path, err)
		}
	}
	for k, e := range s.dedup {
		s.dedupQ = append(s.dedupQ, dedupExp{e.exp, k})
	}
	slices.SortFunc(s.dedupQ, func(a, b dedupExp) int { return int(min(max(a.exp-b.exp, -1), 1)) })
	if len(s.segs) == 0 {
		if err := s.importBolt(); err != nil {
			return err
		}
	}
	if len(s.segs) == 0 || s.segs[len(s.segs)-1].size == 0 {
		return s.rotate()
	}
	return nil
}

// replay applies one record read from seg at off to memory.
func (s *Store) replay(seg *segment, off int64, r record, now int64) {
	switch r.kind {
	case recSeq:
		s.nextSeq = max(s.nextSeq, r.seq)
	case recAppend:
		s.drop(r.seq)
		s.addMsg(r.seq, seg, off+recHeader+int64(r.bodyOff), r.bodyLen, string(r.topic), string(r.ordering))
		s.nextSeq = max(s.nextSeq, r.seq+1)
		if len(r.key) > 0 && r.exp > now {
			s.dedup[string(r.key)] = dedupEntry{exp: r.exp, seq: r.seq, seg: seg}
		}
	case recState:
		if _, ok := s.msgs.Get(r.seq); ok {
			s.setGroup(r.seq, s.intern(r.group), r.attempts, r.done)
		}
	case recDelete:
		s.drop(r.seq)
	case recDedup:
		if r.exp > now {
			s.dedup[string(r.key)] = dedupEntry{exp: r.exp, seq: r.seq, seg: seg}
		}
	}
}

// drop forgets message seq, if it is pending.
func (s *Store) drop(seq uint64) bool {
	m, ok := s.msgs.Get(seq)
	if !ok {
		return false
	}
	m.seg.live--
	m.seg.liveBytes -= s.recLen(seq, &m)
	s.msgs.Delete(seq)
	delete(s.extra, seq)
	return true
}

// setGroup records the state of group name for pending message seq.
func (s *Store) setGroup(seq uint64, name string, attempts uint32, done bool) {
	x := s.extra[seq]
	if x == nil {
		x = &msgExtra{}
		s.extra[seq] = x
	}
	for i := range x.groups {
		if x.groups[i].name == name {
			x.groups[i].attempts, x.groups[i].done = attempts, done
			return
		}
	}
	x.groups = append(x.groups, groupState{name: name, attempts: attempts, done: done})
}

// intern returns the one copy of a group name (a few distinct ones, each
// in many messages).
func (s *Store) intern(b []byte) string {
	if t, ok := s.names[string(b)]; ok {
		return t
	}
	t := string(b)
	s.names[t] = t
	return t
}

// Close stops the committer and closes the files. Writes waiting for a
// commit that did not happen get ErrClosed.
func (s *Store) Close() error {
	s.once.Do(func() { close(s.quit) })
	<-s.stopped
	return s.closeFiles()
}

func (s *Store) closeFiles() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	var errs []error
	for _, seg := range s.segs {
		if seg.f != nil {
			errs = append(errs, seg.f.Close())
			seg.f = nil
		}
	}
	if s.lock != nil {
		errs = append(errs, s.lock.Close())
		s.lock = nil
	}
	return errors.Join(errs...)
}

// Commits returns the number of group commits so far and of the writes
// they carried: their ratio is the mean batch.
func (s *Store) Commits() (commits, writes int64) { return s.commits.Load(), s.writes.Load() }

// Pending returns the number of messages in the outbox.
func (s *Store) Pending() int { return int(s.pending.Load()) }

// Entry is a message to append.
type Entry struct {
	// Key is the Idempotency-Key; "" for none. At most 65,535 bytes.
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

// Apply applies updates and appends entries in one commit, so that a dead
// letter is stored in the same commit that finishes the original: the
// records of one call are written together, and a crash keeps all of them
// or (when they were never acknowledged) drops the torn rest. It does not
// refuse entries at MaxPending, as Append does: they are the dead letters
// of messages it finishes, and refusing them would leave those messages to
// be delivered again for as long as the outbox stays full.
func (s *Store) Apply(updates []Update, entries []Entry) ([]Appended, error) {
	for _, e := range entries {
		if len(e.Topic) > 255 || len(e.Ordering) > 255 {
			return nil, fmt.Errorf("topic or ordering key longer than 255 bytes")
		}
		if len(e.Key) > 0xffff {
			return nil, fmt.Errorf("idempotency key longer than 65535 bytes")
		}
		if len(e.Body) > maxRecord-appendHeadLen(e.Key, e.Topic, e.Ordering) {
			return nil, fmt.Errorf("message of %d bytes is over the store's %d", len(e.Body), maxRecord)
		}
	}
	o := opPool.Get().(*op)
	*o = op{updates: updates, entries: entries, out: make([]Appended, len(entries)), done: o.done}
	select {
	case s.ops <- o:
	case <-s.quit:
		opPool.Put(o) // never sent: nothing else holds it
		return nil, ErrClosed
	}
	var err error
	select {
	case err = <-o.done:
	case <-s.stopped:
		// The committer may have answered just before stopping.
		select {
		case err = <-o.done:
		default:
			err = ErrClosed
		}
	}
	if err != nil {
		return nil, err // o is not reused: the committer may not be done with it
	}
	// Counted here, once durable, just before the caller learns of it (as
	// the caller's own bookkeeping follows).
	s.pending.Add(o.delta)
	out := o.out
	// The committer answered o and will not touch it again; the caller
	// keeps out, which the next use of o does not share.
	*o = op{done: o.done}
	opPool.Put(o)
	return out, nil
}

// Get returns the topic and body of message seq, read from the log; ok is
// false when there is no such message.
func (s *Store) Get(seq uint64) (topic string, body []byte, ok bool, err error) {
	s.mu.RLock()
	defer s.mu.RUnlock()
	m, ok := s.msgs.Get(seq)
	if !ok {
		return "", nil, false, nil
	}
	if m.seg.f == nil {
		return "", nil, false, ErrClosed
	}
	body = make([]byte, m.n)
	if _, err := m.seg.f.ReadAt(body, m.off); err != nil {
		return "", nil, false, fmt.Errorf("read message %d: %w", seq, err)
	}
	return s.topics[m.topic], body, true, nil
}

// Bounds of one read of GetMany: bodies further apart than maxReadGap (the
// records between them are not pending) or a span past maxReadSpan are
// read separately.
const (
	maxReadGap  = 4 << 10
	maxReadSpan = 1 << 20
)

// GetMany returns the bodies of messages seqs, in their order, as Get
// would one by one; a message not in the store has a nil body. Bodies that
// lie close together in the log (a batch of messages published one after
// the other) are read with one pread, and share its buffer: a caller must
// not append to them. An error fails the whole call.
func (s *Store) GetMany(seqs []uint64) ([][]byte, error) {
	type loc struct {
		i int
		m msg
	}
	bodies := make([][]byte, len(seqs))
	locs := make([]loc, 0, len(seqs))
	s.mu.RLock()
	defer s.mu.RUnlock()
	for i, seq := range seqs {
		if m, ok := s.msgs.Get(seq); ok {
			if m.seg.f == nil {
				return nil, ErrClosed
			}
			locs = append(locs, loc{i, m})
		}
	}
	slices.SortFunc(locs, func(a, b loc) int {
		if a.m.seg != b.m.seg {
			return cmp.Compare(a.m.seg.id, b.m.seg.id)
		}
		return cmp.Compare(a.m.off, b.m.off)
	})
	for j := 0; j < len(locs); {
		first := locs[j].m
		start, end := first.off, first.off+int64(first.n)
		k := j + 1
		for ; k < len(locs); k++ {
			m := locs[k].m
			if m.seg != first.seg || m.off < end || m.off-end > maxReadGap || m.off+int64(m.n)-start > maxReadSpan {
				break
			}
			end = m.off + int64(m.n)
		}
		buf := make([]byte, end-start)
		if _, err := first.seg.f.ReadAt(buf, start); err != nil {
			return nil, fmt.Errorf("read messages %d…: %w", seqs[locs[j].i], err)
		}
		for _, l := range locs[j:k] {
			off := l.m.off - start
			bodies[l.i] = buf[off : off+int64(l.m.n) : off+int64(l.m.n)]
		}
		j = k
	}
	return bodies, nil
}

// GroupState is the stored delivery state of one message for one group.
type GroupState struct {
	Attempts int
	Done     bool
}

// Load calls fn for each message in the outbox, in publish order, with its
// topic, its ordering key and the state of each group that has one. fn may
// call Get; it must not be called concurrently with writes to the store.
func (s *Store) Load(fn func(seq uint64, topic, ordering string, groups map[string]GroupState) error) error {
	s.mu.RLock()
	seqs := make([]uint64, 0, s.msgs.Len())
	for seq := range s.msgs.All() { // in order
		seqs = append(seqs, seq)
	}
	s.mu.RUnlock()
	for _, seq := range seqs {
		s.mu.RLock()
		m, ok := s.msgs.Get(seq)
		var groups map[string]GroupState
		var topic, ordering string
		if ok {
			topic, ordering = s.topics[m.topic], s.ordering(seq)
		}
		if gs := s.groups(seq); ok && len(gs) > 0 {
			groups = make(map[string]GroupState, len(gs))
			for _, g := range gs {
				groups[g.name] = GroupState{Attempts: int(g.attempts), Done: g.done}
			}
		}
		s.mu.RUnlock()
		if !ok {
			continue
		}
		if err := fn(seq, topic, ordering, groups); err != nil {
			return err
		}
	}
	return nil
}
