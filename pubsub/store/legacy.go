package store

import (
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"time"

	bolt "go.etcd.io/bbolt"
)

// The bbolt file of earlier versions: its buckets.
var (
	boltOutbox = []byte("outbox") // seq → body
	boltMeta   = []byte("meta")   // seq → topic length, topic, ordering key length, key
	boltState  = []byte("state")  // seq, group → attempts (4), done (1)
	boltDedup  = []byte("dedup")  // key → expiry (8), seq (8)
)

// importBolt moves what an earlier version left in pubsub.db into the
// log: every pending message with its group states and every unexpired
// Idempotency-Key, in one fsynced segment. Only then is the file renamed
// to pubsub.db.imported, so a crash during the import repeats it.
func (s *Store) importBolt() error {
	path := filepath.Join(s.dir, "pubsub.db")
	if _, err := os.Stat(path); errors.Is(err, os.ErrNotExist) {
		return nil
	}
	db, err := bolt.Open(path, 0o600, &bolt.Options{Timeout: 2 * time.Second, ReadOnly: true})
	if err != nil {
		return fmt.Errorf("open %s to import it: %w", path, err)
	}
	defer db.Close()
	now := s.opts.Now().UnixNano()
	var buf []byte
	err = db.View(func(tx *bolt.Tx) error {
		mb, ob, st, dd := tx.Bucket(boltMeta), tx.Bucket(boltOutbox), tx.Bucket(boltState), tx.Bucket(boltDedup)
		if mb == nil || ob == nil || st == nil || dd == nil {
			return nil
		}
		if seq := ob.Sequence(); seq >= s.nextSeq {
			s.nextSeq = seq + 1
		}
		buf = encodeSeq(buf, recSeq, s.nextSeq)
		c := mb.Cursor()
		for k, v := c.First(); k != nil; k, v = c.Next() {
			seq := binary.BigEndian.Uint64(k)
			topic, ordering, err := decodeBoltMeta(v)
			if err != nil {
				return fmt.Errorf("message %d: %w", seq, err)
			}
			buf = encodeAppend(buf, seq, 0, "", topic, ordering, ob.Get(k))
			sc := st.Cursor()
			for sk, sv := sc.Seek(k); len(sk) >= 8 && string(sk[:8]) == string(k); sk, sv = sc.Next() {
				if len(sv) == 5 {
					buf = encodeState(buf, seq, string(sk[8:]), binary.BigEndian.Uint32(sv), sv[4] == 1)
				}
			}
		}
		return dd.ForEach(func(k, v []byte) error {
			if len(v) == 16 && int64(binary.BigEndian.Uint64(v)) > now {
				buf = encodeDedup(buf, binary.BigEndian.Uint64(v[8:]), int64(binary.BigEndian.Uint64(v)), string(k))
			}
			return nil
		})
	})
	if err != nil {
		return fmt.Errorf("import %s: %w", path, err)
	}
	// Written whole under another name first, so that a crash leaves
	// either no segment (and the import runs again) or all of it.
	tmp := filepath.Join(s.dir, "pubsub-import.tmp")
	_ = os.Remove(tmp)
	if err := writeFileSync(tmp, buf); err != nil {
		return fmt.Errorf("import %s: %w", path, err)
	}
	if err := os.Rename(tmp, segPath(s.dir, 1)); err != nil {
		return fmt.Errorf("import %s: %w", path, err)
	}
	// The segment's name is durable before the old file's goes: a crash
	// between the two renames must not leave neither.
	if err := syncDir(s.dir); err != nil {
		return fmt.Errorf("import %s: %w", path, err)
	}
	if err := os.Rename(path, path+".imported"); err != nil {
		return fmt.Errorf("import %s: %w", path, err)
	}
	if err := syncDir(s.dir); err != nil {
		return fmt.Errorf("import %s: %w", path, err)
	}
	// Replay what was written, as Open would.
	return s.load()
}

func writeFileSync(path string, b []byte) error {
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return err
	}
	if _, err := f.Write(b); err != nil {
		_ = f.Close()
		return err
	}
	if err := f.Sync(); err != nil {
		_ = f.Close()
		return err
	}
	return f.Close()
}

func decodeBoltMeta(v []byte) (topic, ordering string, err error) {
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
