package store

import (
	"bufio"
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"testing"
	"time"

	bolt "go.etcd.io/bbolt"
)

// lastSegment returns the path of the newest segment in dir.
func lastSegment(t *testing.T, dir string) string {
	t.Helper()
	ids, err := listSegments(dir)
	if err != nil || len(ids) == 0 {
		t.Fatalf("listSegments(%s) = %v, %v; want at least one", dir, ids, err)
	}
	return segPath(dir, ids[len(ids)-1])
}

func TestTornTailDropped(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name   string
		damage func(path string, size int64) error
		// The damage hit the last acknowledged record: here it stands
		// for one whose write the crash tore.
		lastTorn bool
	}{
		{"cut mid-record", func(path string, size int64) error { return os.Truncate(path, size-7) }, true},
		{"cut mid-header", func(path string, size int64) error { return writeAt(path, size, []byte{1, 2, 3}) }, false},
		{"checksum mismatch", func(path string, size int64) error { return writeAt(path, size-1, []byte{'X'}) }, true},
		{"garbage length", func(path string, size int64) error { return writeAt(path, size, bytes.Repeat([]byte{0xff}, 16)) }, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			dir := t.TempDir()
			s, err := Open(dir, Options{})
			if err != nil {
				t.Fatal(err)
			}
			var acked []uint64
			for i := range 20 {
				res, err := s.Append([]Entry{{Key: fmt.Sprint("k", i), Topic: "orders", Body: []byte(fmt.Sprint("body-", i))}})
				if err != nil {
					t.Fatal(err)
				}
				acked = append(acked, res[0].Seq)
			}
			if err := s.Close(); err != nil {
				t.Fatal(err)
			}
			path := lastSegment(t, dir)
			fi, err := os.Stat(path)
			if err != nil {
				t.Fatal(err)
			}
			if err := tc.damage(path, fi.Size()); err != nil {
				t.Fatal(err)
			}
			want := acked
			if tc.lastTorn {
				want = acked[:len(acked)-1]
			}
			s = open(t, dir, Options{})
			if s.Pending() != len(want) {
				t.Errorf("Pending() after reopen = %d, want %d", s.Pending(), len(want))
			}
			for i, seq := range want {
				_, body, ok, err := s.Get(seq)
				if err != nil || !ok || string(body) != fmt.Sprint("body-", i) {
					t.Errorf("Get(%d) = %q, %v, %v; want body-%d", seq, body, ok, err, i)
				}
			}
			// The log goes on after the dropped tail; keys before it are
			// remembered; seqs are not reused.
			res, err := s.Append([]Entry{{Key: "k0", Topic: "orders"}, {Topic: "orders", Body: []byte("after")}})
			if err != nil {
				t.Fatal(err)
			}
			if !res[0].Duplicate || res[0].Seq != acked[0] {
				t.Errorf("Append(k0) = %+v, want duplicate of %d", res[0], acked[0])
			}
			if res[1].Seq <= want[len(want)-1] {
				t.Errorf("Append() seq = %d, want above %d", res[1].Seq, want[len(want)-1])
			}
			if err := s.Close(); err != nil {
				t.Fatal(err)
			}
			s = open(t, dir, Options{})
			if _, body, ok, _ := s.Get(res[1].Seq); !ok || string(body) != "after" {
				t.Errorf("Get(%d) after second reopen = %q, %v; want after", res[1].Seq, body, ok)
			}
		})
	}
}

func writeAt(path string, off int64, b []byte) error {
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		return err
	}
	if _, err := f.WriteAt(b, off); err != nil {
		_ = f.Close()
		return err
	}
	return f.Close()
}

func TestCorruptOlderSegmentRefused(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	s, err := Open(dir, Options{SegmentSize: 4096})
	if err != nil {
		t.Fatal(err)
	}
	for range 20 {
		if _, err := s.Append([]Entry{{Topic: "t", Body: make([]byte, 1000)}}); err != nil {
			t.Fatal(err)
		}
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	ids, _ := listSegments(dir)
	if len(ids) < 2 {
		t.Fatalf("%d segments, want several", len(ids))
	}
	first := segPath(dir, ids[0])
	f, err := os.OpenFile(first, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.WriteAt([]byte{'X'}, 100); err != nil {
		t.Fatal(err)
	}
	_ = f.Close()
	before, _ := os.ReadFile(first)
	if _, err := Open(dir, Options{}); err == nil {
		t.Fatal("Open() with a corrupt older segment = nil error, want one")
	}
	if after, _ := os.ReadFile(first); !bytes.Equal(before, after) {
		t.Error("Open() changed the corrupt segment; want it left as it was")
	}
}

func TestSegmentsReclaimed(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	s, err := Open(dir, Options{SegmentSize: 8 << 10})
	if err != nil {
		t.Fatal(err)
	}
	var seqs []uint64
	for i := range 200 {
		res, err := s.Append([]Entry{{Key: fmt.Sprint("k", i), Topic: "t", Body: bytes.Repeat([]byte{byte(i)}, 500)}})
		if err != nil {
			t.Fatal(err)
		}
		seqs = append(seqs, res[0].Seq)
	}
	// Keep message 5 (in the first segment) with a group state; finish
	// the rest.
	var ups []Update
	for i, seq := range seqs {
		if i == 5 {
			ups = append(ups, Update{Seq: seq, Group: "billing", Attempts: 2})
			continue
		}
		ups = append(ups, Update{Seq: seq, Delete: true})
	}
	if _, err := s.Apply(ups, nil); err != nil {
		t.Fatal(err)
	}
	// One more commit to let the committer reclaim.
	if _, err := s.Append([]Entry{{Topic: "t", Body: []byte("last")}}); err != nil {
		t.Fatal(err)
	}
	if ids, _ := listSegments(dir); len(ids) > 2 {
		t.Errorf("%d segments left, want at most 2 (the copy of message 5 and the newest)", len(ids))
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	s = open(t, dir, Options{SegmentSize: 8 << 10})
	if s.Pending() != 2 {
		t.Errorf("Pending() = %d, want 2", s.Pending())
	}
	if _, body, ok, err := s.Get(seqs[5]); err != nil || !ok || !bytes.Equal(body, bytes.Repeat([]byte{5}, 500)) {
		t.Errorf("Get(%d) = %d bytes, %v, %v; want message 5", seqs[5], len(body), ok, err)
	}
	if g := loadAll(t, s)[seqs[5]].groups; g["billing"] != (GroupState{Attempts: 2}) {
		t.Errorf("Load() groups of message 5 = %v, want billing with 2 attempts", g)
	}
	res, err := s.Append([]Entry{{Key: "k0", Topic: "t"}, {Topic: "t"}})
	if err != nil {
		t.Fatal(err)
	}
	if !res[0].Duplicate || res[0].Seq != seqs[0] {
		t.Errorf("Append(k0) after its segment went = %+v, want duplicate of %d", res[0], seqs[0])
	}
	if res[1].Seq <= seqs[len(seqs)-1]+1 {
		t.Errorf("Append() seq = %d, want above %d (no reuse)", res[1].Seq, seqs[len(seqs)-1]+1)
	}
}

func TestImportBolt(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	db, err := bolt.Open(filepath.Join(dir, "pubsub.db"), 0o600, nil)
	if err != nil {
		t.Fatal(err)
	}
	exp := time.Now().Add(time.Hour).UnixNano()
	err = db.Update(func(tx *bolt.Tx) error {
		ob, _ := tx.CreateBucket(boltOutbox)
		mb, _ := tx.CreateBucket(boltMeta)
		st, _ := tx.CreateBucket(boltState)
		dd, _ := tx.CreateBucket(boltDedup)
		for seq := uint64(1); seq <= 3; seq++ {
			_, _ = ob.NextSequence()
		}
		_ = ob.Put(seqKey(3), []byte("three"))
		_ = mb.Put(seqKey(3), append(append([]byte{6}, "orders"...), append([]byte{2}, "c7"...)...))
		_ = st.Put(append(seqKey(3), "billing"...), []byte{0, 0, 0, 4, 1})
		_ = dd.Put([]byte("key-1"), append(be64(uint64(exp)), be64(1)...))
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	_ = db.Close()
	s := open(t, dir, Options{})
	got := loadAll(t, s)
	if l := got[3]; len(got) != 1 || l.topic != "orders" || l.ordering != "c7" || l.groups["billing"] != (GroupState{Attempts: 4, Done: true}) {
		t.Errorf("Load() after import = %+v, want message 3 on orders, c7, billing done after 4", got)
	}
	if _, body, ok, _ := s.Get(3); !ok || string(body) != "three" {
		t.Errorf("Get(3) = %q, %v; want three", body, ok)
	}
	res, err := s.Append([]Entry{{Key: "key-1", Topic: "orders"}, {Topic: "orders"}})
	if err != nil {
		t.Fatal(err)
	}
	if !res[0].Duplicate || res[0].Seq != 1 || res[1].Seq != 4 {
		t.Errorf("Append() after import = %+v, want key-1 a duplicate of 1, then seq 4", res)
	}
	if _, err := os.Stat(filepath.Join(dir, "pubsub.db.imported")); err != nil {
		t.Errorf("pubsub.db not renamed after import: %v", err)
	}
}

func seqKey(seq uint64) []byte { return be64(seq) }

func be64(v uint64) []byte {
	b := make([]byte, 8)
	for i := range b {
		b[7-i] = byte(v >> (8 * i))
	}
	return b
}

// TestCrashKeepsAcknowledged kills a process appending to the store with
// SIGKILL mid-stream (the test binary re-run as a writer) and checks that
// every append it reported acknowledged is there after reopening.
func TestCrashKeepsAcknowledged(t *testing.T) {
	if dir := os.Getenv("STORE_CRASH_WRITER"); dir != "" {
		crashWriter(dir)
		return
	}
	t.Parallel()
	dir := t.TempDir()
	for round := range 3 {
		cmd := exec.Command(os.Args[0], "-test.run=^TestCrashKeepsAcknowledged$")
		cmd.Env = append(os.Environ(), "STORE_CRASH_WRITER="+dir)
		out, err := cmd.StdoutPipe()
		if err != nil {
			t.Fatal(err)
		}
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		acked := map[uint64]string{}
		sc := bufio.NewScanner(out)
		for sc.Scan() && len(acked) < 300 {
			var seq uint64
			var body string
			if _, err := fmt.Sscan(sc.Text(), &seq, &body); err == nil {
				acked[seq] = body
			}
		}
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
		if len(acked) < 300 {
			t.Fatalf("round %d: writer acknowledged %d appends before it ended, want 300", round, len(acked))
		}
		s, err := Open(dir, Options{})
		if err != nil {
			t.Fatalf("round %d: Open() after kill -9 = %v", round, err)
		}
		for seq, want := range acked {
			if _, body, ok, err := s.Get(seq); err != nil || !ok || string(body) != want {
				t.Errorf("round %d: Get(%d) = %q, %v, %v; want %q", round, seq, body, ok, err, want)
			}
		}
		if err := s.Close(); err != nil {
			t.Fatal(err)
		}
	}
}

// crashWriter appends from 8 goroutines until killed, printing "seq body"
// for each acknowledged append.
func crashWriter(dir string) {
	s, err := Open(dir, Options{SegmentSize: 64 << 10})
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	lines := make(chan string, 1024)
	for g := range 8 {
		go func() {
			for i := 0; ; i++ {
				body := strconv.Itoa(g) + "-" + strconv.Itoa(i) + "-" + string(bytes.Repeat([]byte{'x'}, 300))
				res, err := s.Append([]Entry{{Topic: "t", Body: []byte(body)}})
				if err != nil {
					if !errors.Is(err, ErrClosed) {
						fmt.Fprintln(os.Stderr, err)
					}
					return
				}
				lines <- fmt.Sprint(res[0].Seq, " ", body)
			}
		}()
	}
	w := bufio.NewWriter(os.Stdout)
	for l := range lines {
		_, _ = w.WriteString(l + "\n")
		if len(lines) == 0 {
			_ = w.Flush()
		}
	}
}

// TestUnreadableRecordRefused: a whole record (its checksum holds) that
// this version cannot decode, as a newer version's kind would be, at the
// end of the newest segment is not taken for a torn tail: Open refuses,
// and the file, and every record after it, stays as it was.
func TestUnreadableRecordRefused(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	s, err := Open(dir, Options{})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := s.Append([]Entry{{Key: "k", Topic: "orders", Body: []byte("body")}}); err != nil {
		t.Fatal(err)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	path := lastSegment(t, dir)
	payload := append([]byte{0x7f}, make([]byte, 8)...) // an unknown kind, seq 0
	rec := make([]byte, recHeader, recHeader+len(payload))
	binary.BigEndian.PutUint32(rec[4:], uint32(len(payload)))
	binary.BigEndian.PutUint32(rec[:4], crc32.Update(crc32.Checksum(rec[4:], crcTable), crcTable, payload))
	rec = append(rec, payload...)
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_APPEND, 0)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.Write(rec); err != nil {
		t.Fatal(err)
	}
	f.Close()
	before, _ := os.ReadFile(path)
	if s, err := Open(dir, Options{}); err == nil {
		s.Close()
		t.Fatal("Open with an unreadable whole record = nil error, want a refusal")
	}
	if after, _ := os.ReadFile(path); !bytes.Equal(before, after) {
		t.Errorf("Open changed the segment: %d bytes before, %d after", len(before), len(after))
	}
}
