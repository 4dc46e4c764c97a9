package store

import (
	"bufio"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
)

// The log is a sequence of segment files, pubsub-<first id, 16 hex>.log,
// each a sequence of records:
//
//	crc32c (4) | payload length (4) | payload
//
// where the checksum covers the length and the payload, and the payload's
// first byte is its kind. A record that is short or fails its checksum at
// the end of the newest segment is a write the crash cut off: it was never
// acknowledged, and Open drops it (truncating the file there). Anywhere
// else it is corruption, and Open refuses the directory.
const (
	recAppend byte = 1 // seq (8), dedup expiry (8), key len (2), key, topic len (1), topic, ordering len (1), ordering, body
	recState  byte = 2 // seq (8), attempts (4), done (1), group
	recDelete byte = 3 // seq (8)
	recDedup  byte = 4 // seq (8), expiry (8), key: a key carried over from a removed segment
	recSeq    byte = 5 // next seq (8): the first record of every segment
)

const recHeader = 8

// maxRecord bounds a record's payload, so that a corrupt length cannot make
// Open allocate gigabytes.
const maxRecord = 256 << 20

var crcTable = crc32.MakeTable(crc32.Castagnoli)

// errTorn marks a record cut off or damaged.
var errTorn = errors.New("torn or corrupt record")

// errUnreadable marks a whole record (its checksum holds) this version
// cannot decode.
var errUnreadable = errors.New("unreadable record")

func segName(id uint64) string { return fmt.Sprintf("pubsub-%016x.log", id) }

// listSegments returns the ids of the segment files in dir, oldest first.
func listSegments(dir string) ([]uint64, error) {
	ents, err := os.ReadDir(dir)
	if err != nil {
		return nil, err
	}
	var ids []uint64
	for _, e := range ents {
		n := e.Name()
		if !strings.HasPrefix(n, "pubsub-") || !strings.HasSuffix(n, ".log") {
			continue
		}
		id, err := strconv.ParseUint(strings.TrimSuffix(strings.TrimPrefix(n, "pubsub-"), ".log"), 16, 64)
		if err != nil {
			continue
		}
		ids = append(ids, id)
	}
	slices.Sort(ids)
	return ids, nil
}

// appendRecord frames payload (whose first byte is its kind, written by
// fill) onto buf. fill appends the payload to its argument.
func beginRecord(buf []byte) ([]byte, int) {
	start := len(buf)
	return append(buf, 0, 0, 0, 0, 0, 0, 0, 0), start
}

func endRecord(buf []byte, start int) []byte {
	binary.BigEndian.PutUint32(buf[start+4:], uint32(len(buf)-start-recHeader))
	binary.BigEndian.PutUint32(buf[start:], crc32.Checksum(buf[start+4:], crcTable))
	return buf
}

// appendHeadLen is the payload bytes of an append record before its body.
func appendHeadLen(key, topic, ordering string) int {
	return 1 + 8 + 8 + 2 + len(key) + 1 + len(topic) + 1 + len(ordering)
}

func encodeAppend(buf []byte, seq uint64, exp int64, key, topic, ordering string, body []byte) []byte {
	buf, start := beginRecord(buf)
	buf = append(buf, recAppend)
	buf = binary.BigEndian.AppendUint64(buf, seq)
	buf = binary.BigEndian.AppendUint64(buf, uint64(exp))
	buf = binary.BigEndian.AppendUint16(buf, uint16(len(key)))
	buf = append(buf, key...)
	buf = append(buf, byte(len(topic)))
	buf = append(buf, topic...)
	buf = append(buf, byte(len(ordering)))
	buf = append(buf, ordering...)
	buf = append(buf, body...)
	return endRecord(buf, start)
}

func encodeState(buf []byte, seq uint64, group string, attempts uint32, done bool) []byte {
	buf, start := beginRecord(buf)
	buf = append(buf, recState)
	buf = binary.BigEndian.AppendUint64(buf, seq)
	buf = binary.BigEndian.AppendUint32(buf, attempts)
	d := byte(0)
	if done {
		d = 1
	}
	buf = append(buf, d)
	buf = append(buf, group...)
	return endRecord(buf, start)
}

func encodeSeq(buf []byte, kind byte, seq uint64) []byte {
	buf, start := beginRecord(buf)
	buf = append(buf, kind)
	buf = binary.BigEndian.AppendUint64(buf, seq)
	return endRecord(buf, start)
}

func encodeDedup(buf []byte, seq uint64, exp int64, key string) []byte {
	buf, start := beginRecord(buf)
	buf = append(buf, recDedup)
	buf = binary.BigEndian.AppendUint64(buf, seq)
	buf = binary.BigEndian.AppendUint64(buf, uint64(exp))
	buf = append(buf, key...)
	return endRecord(buf, start)
}

// record is one decoded record. Strings point into the reader's buffer
// until copied.
type record struct {
	kind     byte
	seq      uint64
	exp      int64
	attempts uint32
	done     bool
	key      []byte // append, dedup
	topic    []byte
	ordering []byte
	group    []byte
	bodyOff  int // offset of the body in the payload (append)
	bodyLen  int
}

func decodeRecord(p []byte) (record, error) {
	var r record
	if len(p) < 9 {
		return r, errTorn
	}
	r.kind, r.seq = p[0], binary.BigEndian.Uint64(p[1:9])
	q := p[9:]
	switch r.kind {
	case recSeq, recDelete:
		if len(q) != 0 {
			return r, errTorn
		}
	case recState:
		if len(q) < 5 {
			return r, errTorn
		}
		r.attempts, r.done, r.group = binary.BigEndian.Uint32(q), q[4] == 1, q[5:]
	case recDedup:
		if len(q) < 8 {
			return r, errTorn
		}
		r.exp, r.key = int64(binary.BigEndian.Uint64(q)), q[8:]
	case recAppend:
		if len(q) < 10 {
			return r, errTorn
		}
		r.exp = int64(binary.BigEndian.Uint64(q))
		n := int(binary.BigEndian.Uint16(q[8:]))
		q = q[10:]
		var ok bool
		if r.key, q, ok = cut(q, n); !ok {
			return r, errTorn
		}
		if len(q) < 1 {
			return r, errTorn
		}
		if r.topic, q, ok = cut(q[1:], int(q[0])); !ok || len(q) < 1 {
			return r, errTorn
		}
		if r.ordering, q, ok = cut(q[1:], int(q[0])); !ok {
			return r, errTorn
		}
		r.bodyOff, r.bodyLen = len(p)-len(q), len(q)
	default:
		return r, errTorn
	}
	return r, nil
}

func cut(b []byte, n int) (head, rest []byte, ok bool) {
	if len(b) < n {
		return nil, nil, false
	}
	return b[:n], b[n:], true
}

// readSegment calls fn for each record of the segment at path with the
// record's offset in the file. It returns the offset after the last good
// record and errTorn if a bad one follows it.
func readSegment(path string, fn func(off int64, r record) error) (int64, error) {
	f, err := os.Open(path)
	if err != nil {
		return 0, err
	}
	defer f.Close()
	br := bufio.NewReaderSize(f, 256<<10)
	var (
		off int64
		hdr [recHeader]byte
		buf []byte
	)
	for {
		if _, err := io.ReadFull(br, hdr[:]); err != nil {
			if err == io.EOF {
				return off, nil
			}
			if err == io.ErrUnexpectedEOF {
				return off, errTorn
			}
			return off, err
		}
		n := binary.BigEndian.Uint32(hdr[4:])
		if n > maxRecord {
			return off, errTorn
		}
		if cap(buf) < int(n) {
			buf = make([]byte, n)
		}
		buf = buf[:n]
		if _, err := io.ReadFull(br, buf); err != nil {
			if err == io.EOF || err == io.ErrUnexpectedEOF {
				return off, errTorn
			}
			return off, err
		}
		crc := crc32.Update(crc32.Checksum(hdr[4:], crcTable), crcTable, buf)
		if crc != binary.BigEndian.Uint32(hdr[:4]) {
			return off, errTorn
		}
		r, err := decodeRecord(buf)
		if err != nil {
			// Its checksum holds, so it was written whole: not a torn
			// tail but a record this version cannot read (a newer
			// version's kind), never to be dropped.
			return off, fmt.Errorf("%w at offset %d (%d bytes)", errUnreadable, off, len(buf))
		}
		if err := fn(off, r); err != nil {
			return off, err
		}
		off += recHeader + int64(n)
	}
}

// truncateSync cuts the file at path to size and makes the cut durable
// before anything is written after it.
func truncateSync(path string, size int64) error {
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		return err
	}
	err = f.Truncate(size)
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	return err
}

// syncDir makes a file's creation or removal in dir durable.
func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer d.Close()
	return d.Sync()
}

func segPath(dir string, id uint64) string { return filepath.Join(dir, segName(id)) }
