package store

import (
	"fmt"
	"os"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// commit is the committer goroutine: each round it writes the records of
// every waiting write in one write and fdatasyncs once. A failed write or
// fsync fails the round and every later write: after a failed fsync the
// kernel may have dropped the pages, so nothing more can be promised.
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
		err := s.broken
		if err == nil {
			err = s.commitBatch(batch)
		}
		if err == nil {
			s.commits.Add(1)
			s.writes.Add(int64(len(batch)))
		}
		for _, o := range batch {
			o.done <- err
		}
		if err == nil {
			s.maintain()
		}
	}
}

// commitBatch encodes the batch, applies it to memory, writes it to the
// newest segment and fsyncs.
func (s *Store) commitBatch(batch []*op) error {
	now := s.opts.Now().UnixNano()
	act := s.segs[len(s.segs)-1]
	s.buf = s.buf[:0]
	s.mu.Lock()
	for _, o := range batch {
		// Entries before updates: a torn write keeps a dead letter rather
		// than the finish of the message it stands for.
		o.delta = s.encodeEntries(o, act, now) + s.encodeUpdates(o.updates)
	}
	_, err := act.f.WriteAt(s.buf, act.size)
	if err == nil {
		act.size += int64(len(s.buf))
	}
	s.mu.Unlock()
	if err != nil {
		s.broken = fmt.Errorf("write log: %w", err)
		return s.broken
	}
	return s.sync(act.f)
}

func (s *Store) encodeEntries(o *op, act *segment, now int64) (added int64) {
	exp := now + int64(s.opts.DedupFor)
	for i, e := range o.entries {
		if e.Key != "" {
			if d, ok := s.dedup[e.Key]; ok && d.exp > now {
				o.out[i] = Appended{Seq: d.seq, Duplicate: true}
				continue
			}
		}
		seq := s.nextSeq
		s.nextSeq++
		var kexp int64
		if e.Key != "" {
			kexp = exp
		}
		s.buf = encodeAppend(s.buf, seq, kexp, e.Key, e.Topic, e.Ordering, e.Body)
		s.addMsg(seq, act, act.size+int64(len(s.buf)-len(e.Body)), len(e.Body), e.Topic, e.Ordering)
		added++
		if e.Key != "" {
			key := strings.Clone(e.Key)
			s.dedup[key] = dedupEntry{exp: kexp, seq: seq, seg: act}
			s.dedupQ = append(s.dedupQ, dedupExp{kexp, key})
		}
		o.out[i] = Appended{Seq: seq}
	}
	return added
}

func (s *Store) encodeUpdates(updates []Update) (deleted int64) {
	for _, u := range updates {
		if u.Delete {
			if s.drop(u.Seq) {
				deleted--
				s.buf = encodeSeq(s.buf, recDelete, u.Seq)
			}
			continue
		}
		if _, ok := s.msgs.Get(u.Seq); !ok {
			continue // finished already: its state has no reader
		}
		s.setGroup(u.Seq, s.intern([]byte(u.Group)), uint32(u.Attempts), u.Done)
		s.buf = encodeState(s.buf, u.Seq, u.Group, uint32(u.Attempts), u.Done)
	}
	return deleted
}

func (s *Store) sync(f *os.File) error {
	if s.opts.NoSync {
		return nil
	}
	if err := unix.Fdatasync(int(f.Fd())); err != nil {
		s.broken = fmt.Errorf("fsync log: %w", err)
		return s.broken
	}
	return nil
}

// maintain runs after a commit: it forgets expired Idempotency-Keys every
// 10s, moves to a new segment when the newest is full, and removes old
// segments that hold nothing pending.
func (s *Store) maintain() {
	now := s.opts.Now()
	if now.Sub(s.swept) > 10*time.Second {
		s.sweepDedup(now.UnixNano())
		s.swept = now
	}
	if s.segs[len(s.segs)-1].size >= s.opts.SegmentSize {
		if err := s.rotate(); err != nil {
			s.broken = err
			return
		}
	}
	for len(s.segs) > 1 && s.reclaimable(s.segs[0]) {
		if err := s.reclaim(now.UnixNano()); err != nil {
			s.broken = err
			return
		}
	}
}

func (s *Store) sweepDedup(now int64) {
	i := 0
	for ; i < len(s.dedupQ) && s.dedupQ[i].exp <= now; i++ {
		k := s.dedupQ[i]
		if e, ok := s.dedup[k.key]; ok && e.exp == k.exp {
			delete(s.dedup, k.key)
		}
	}
	s.dedupQ = append(s.dedupQ[:0], s.dedupQ[i:]...)
}

// reclaimable reports whether the oldest segment should go: it holds
// nothing pending, or its pending messages are under half its bytes and
// are worth copying forward.
func (s *Store) reclaimable(seg *segment) bool {
	return seg.live == 0 || seg.liveBytes < seg.size/2
}

// reclaim removes the oldest segment: it copies its pending messages (with
// their group states) and its unexpired Idempotency-Keys to the newest
// segment, fsyncs, then deletes the file. Records in later segments only
// refer to messages appended in this one or later, so replay after the
// removal needs nothing else from it.
func (s *Store) reclaim(now int64) error {
	old, act := s.segs[0], s.segs[len(s.segs)-1]
	s.buf = s.buf[:0]
	s.mu.Lock()
	defer s.mu.Unlock()
	moved := map[uint64]int64{} // seq → offset of its new body in act
	for seq, m := range s.msgs.All() {
		if m.seg != old {
			continue
		}
		body := make([]byte, m.n)
		if _, err := old.f.ReadAt(body, m.off); err != nil {
			return fmt.Errorf("copy message %d forward: %w", seq, err)
		}
		s.buf = encodeAppend(s.buf, seq, 0, "", s.topics[m.topic], s.ordering(seq), body)
		moved[seq] = act.size + int64(len(s.buf)-len(body))
		for _, g := range s.groups(seq) {
			s.buf = encodeState(s.buf, seq, g.name, g.attempts, g.done)
		}
	}
	var keys []string
	for k, e := range s.dedup {
		if e.seg == old && e.exp > now {
			s.buf = encodeDedup(s.buf, e.seq, e.exp, k)
			keys = append(keys, k)
		}
	}
	if len(s.buf) > 0 {
		if _, err := act.f.WriteAt(s.buf, act.size); err != nil {
			return fmt.Errorf("write log: %w", err)
		}
		act.size += int64(len(s.buf))
		if err := s.sync(act.f); err != nil {
			return err
		}
	}
	for seq, off := range moved {
		m, _ := s.msgs.Get(seq)
		m.seg, m.off = act, off
		s.msgs.Set(seq, m)
		act.live++
		act.liveBytes += s.recLen(seq, &m)
	}
	for _, k := range keys {
		e := s.dedup[k]
		e.seg = act
		s.dedup[k] = e
	}
	if err := old.f.Close(); err != nil {
		return fmt.Errorf("close segment: %w", err)
	}
	old.f = nil
	s.segs = s.segs[1:]
	if err := os.Remove(segPath(s.dir, old.id)); err != nil {
		return fmt.Errorf("remove segment: %w", err)
	}
	if s.opts.NoSync {
		return nil
	}
	return syncDir(s.dir)
}

// rotate starts a new segment, beginning with the next seq so that seqs
// are never reused even when every older segment is gone.
func (s *Store) rotate() error {
	var id uint64 = 1
	if n := len(s.segs); n > 0 {
		id = s.segs[n-1].id + 1
	}
	path := segPath(s.dir, id)
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return fmt.Errorf("create segment: %w", err)
	}
	b := encodeSeq(nil, recSeq, s.nextSeq)
	if _, err := f.Write(b); err != nil {
		_ = f.Close()
		return fmt.Errorf("write %s: %w", path, err)
	}
	if !s.opts.NoSync {
		if err := f.Sync(); err != nil {
			_ = f.Close()
			return fmt.Errorf("fsync %s: %w", path, err)
		}
		if err := syncDir(s.dir); err != nil {
			_ = f.Close()
			return fmt.Errorf("fsync data dir: %w", err)
		}
	}
	s.mu.Lock()
	s.segs = append(s.segs, &segment{id: id, f: f, size: int64(len(b))})
	s.mu.Unlock()
	return nil
}
