package store

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

func open(t *testing.T, dir string, opts Options) *Store {
	t.Helper()
	s, err := Open(dir, opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = s.Close() })
	return s
}

type loaded struct {
	topic, ordering string
	groups          map[string]GroupState
}

func loadAll(t *testing.T, s *Store) map[uint64]loaded {
	t.Helper()
	got := map[uint64]loaded{}
	if err := s.Load(func(seq uint64, topic, ordering string, g map[string]GroupState) error {
		got[seq] = loaded{topic, ordering, g}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	return got
}

func TestAppendGetReopen(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	s, err := Open(dir, Options{})
	if err != nil {
		t.Fatal(err)
	}
	res, err := s.Append([]Entry{{Topic: "orders", Ordering: "cust-7", Body: []byte("one")}, {Topic: "audit", Body: []byte("two")}})
	if err != nil {
		t.Fatal(err)
	}
	if res[0].Seq == 0 || res[1].Seq != res[0].Seq+1 || res[0].Duplicate {
		t.Fatalf("Append() = %+v, want two fresh consecutive seqs", res)
	}
	if _, err := s.Apply([]Update{{Seq: res[0].Seq, Group: "billing", Attempts: 3}, {Seq: res[0].Seq, Group: "ship", Attempts: 1, Done: true}}, nil); err != nil {
		t.Fatal(err)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	s = open(t, dir, Options{})
	if s.Pending() != 2 {
		t.Errorf("Pending() after reopen = %d, want 2", s.Pending())
	}
	topic, body, ok, err := s.Get(res[1].Seq)
	if err != nil || !ok || topic != "audit" || string(body) != "two" {
		t.Errorf("Get(%d) = %q, %q, %v, %v; want audit, two", res[1].Seq, topic, body, ok, err)
	}
	got := loadAll(t, s)
	want := map[string]GroupState{"billing": {Attempts: 3}, "ship": {Attempts: 1, Done: true}}
	if l := got[res[0].Seq]; l.topic != "orders" || l.ordering != "cust-7" || fmt.Sprint(l.groups) != fmt.Sprint(want) {
		t.Errorf("Load() message %d = %+v, want orders, cust-7, with %v", res[0].Seq, l, want)
	}
	if l := got[res[1].Seq]; l.topic != "audit" || l.groups != nil {
		t.Errorf("Load() message %d = %+v, want audit without state", res[1].Seq, l)
	}
}

func TestDeleteAndDeadLetterAtomic(t *testing.T) {
	t.Parallel()
	s := open(t, t.TempDir(), Options{})
	res, _ := s.Append([]Entry{{Topic: "orders", Body: []byte("x")}})
	seq := res[0].Seq
	if _, err := s.Apply([]Update{{Seq: seq, Group: "g", Attempts: 2}}, nil); err != nil {
		t.Fatal(err)
	}
	dl, err := s.Apply([]Update{{Seq: seq, Delete: true}}, []Entry{{Topic: "orders.dlq", Body: []byte("x")}})
	if err != nil {
		t.Fatal(err)
	}
	got := loadAll(t, s)
	if len(got) != 1 || got[dl[0].Seq].topic != "orders.dlq" {
		t.Errorf("Load() = %+v, want only the dead letter %d", got, dl[0].Seq)
	}
	if _, _, ok, _ := s.Get(seq); ok {
		t.Errorf("Get(%d) found the deleted message", seq)
	}
	if s.Pending() != 1 {
		t.Errorf("Pending() = %d, want 1", s.Pending())
	}
}

func TestDedup(t *testing.T) {
	t.Parallel()
	now := time.Unix(1000, 0)
	var mu sync.Mutex
	clock := func() time.Time { mu.Lock(); defer mu.Unlock(); return now }
	s := open(t, t.TempDir(), Options{Now: clock, DedupFor: 10 * time.Minute})
	first, _ := s.Append([]Entry{{Key: "k1", Topic: "t", Body: []byte("a")}})
	again, _ := s.Append([]Entry{{Key: "k1", Topic: "t", Body: []byte("b")}, {Key: "k1", Topic: "t", Body: []byte("c")}})
	for i, a := range again {
		if !a.Duplicate || a.Seq != first[0].Seq {
			t.Errorf("Append(k1 again)[%d] = %+v, want duplicate of %d", i, a, first[0].Seq)
		}
	}
	if s.Pending() != 1 {
		t.Errorf("Pending() = %d, want 1", s.Pending())
	}
	mu.Lock()
	now = now.Add(10*time.Minute + time.Second)
	mu.Unlock()
	later, _ := s.Append([]Entry{{Key: "k1", Topic: "t", Body: []byte("d")}})
	if later[0].Duplicate {
		t.Errorf("Append(k1 after 10m) = %+v, want a fresh message", later[0])
	}
}

func TestFull(t *testing.T) {
	t.Parallel()
	s := open(t, t.TempDir(), Options{MaxPending: 2})
	if _, err := s.Append([]Entry{{Topic: "t"}, {Topic: "t"}}); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Append([]Entry{{Topic: "t"}}); !errors.Is(err, ErrFull) {
		t.Errorf("Append() past MaxPending = %v, want ErrFull", err)
	}
}

func TestClosed(t *testing.T) {
	t.Parallel()
	s, err := Open(t.TempDir(), Options{})
	if err != nil {
		t.Fatal(err)
	}
	_ = s.Close()
	if _, err := s.Append([]Entry{{Topic: "t"}}); !errors.Is(err, ErrClosed) {
		t.Errorf("Append() after Close = %v, want ErrClosed", err)
	}
}

// TestConcurrentAppend: many writers share commits and every message gets
// its own sequence number.
func TestConcurrentAppend(t *testing.T) {
	t.Parallel()
	s := open(t, t.TempDir(), Options{NoSync: true})
	var wg sync.WaitGroup
	seqs := make(chan uint64, 64*50)
	for w := 0; w < 64; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; i < 50; i++ {
				r, err := s.Append([]Entry{{Key: fmt.Sprintf("%d-%d", w, i), Topic: "t", Body: []byte("x")}})
				if err != nil {
					t.Error(err)
					return
				}
				seqs <- r[0].Seq
			}
		}()
	}
	wg.Wait()
	close(seqs)
	seen := map[uint64]bool{}
	for q := range seqs {
		if seen[q] {
			t.Fatalf("seq %d handed out twice", q)
		}
		seen[q] = true
	}
	if len(seen) != 3200 || s.Pending() != 3200 {
		t.Errorf("got %d seqs, Pending() = %d; want 3200", len(seen), s.Pending())
	}
}

func BenchmarkAppend(b *testing.B) {
	s, err := Open(b.TempDir(), Options{})
	if err != nil {
		b.Fatal(err)
	}
	defer s.Close()
	body := make([]byte, 1024)
	b.ReportAllocs()
	b.SetParallelism(32)
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			if _, err := s.Append([]Entry{{Topic: "t", Body: body}}); err != nil {
				b.Error(err)
				return
			}
		}
	})
}

// BenchmarkAppendOne: one 1 KiB message at a time, each waiting for its
// commit: the store's own latency, beside the fsync of a plain file.
func BenchmarkAppendOne(b *testing.B) {
	s, err := Open(b.TempDir(), Options{})
	if err != nil {
		b.Fatal(err)
	}
	defer s.Close()
	body := make([]byte, 1024)
	ds := make([]time.Duration, 0, b.N)
	b.ResetTimer()
	for range b.N {
		t0 := time.Now()
		if _, err := s.Append([]Entry{{Topic: "t", Body: body}}); err != nil {
			b.Fatal(err)
		}
		ds = append(ds, time.Since(t0))
	}
	slices.Sort(ds)
	b.ReportMetric(float64(ds[len(ds)/2].Microseconds()), "p50-µs")
	b.ReportMetric(float64(ds[len(ds)*99/100].Microseconds()), "p99-µs")
}

// BenchmarkFsync is the baseline for BenchmarkAppendOne, in the same run:
// 1 KiB appended to a file in a directory like the store's, then
// fdatasync, once per iteration.
func BenchmarkFsync(b *testing.B) {
	f, err := os.Create(filepath.Join(b.TempDir(), "fsync"))
	if err != nil {
		b.Fatal(err)
	}
	defer f.Close()
	buf := make([]byte, 1024)
	ds := make([]time.Duration, 0, b.N)
	b.ResetTimer()
	for range b.N {
		t0 := time.Now()
		if _, err := f.Write(buf); err != nil {
			b.Fatal(err)
		}
		if err := unix.Fdatasync(int(f.Fd())); err != nil {
			b.Fatal(err)
		}
		ds = append(ds, time.Since(t0))
	}
	slices.Sort(ds)
	b.ReportMetric(float64(ds[len(ds)/2].Microseconds()), "p50-µs")
	b.ReportMetric(float64(ds[len(ds)*99/100].Microseconds()), "p99-µs")
}

// BenchmarkPendingIndex: the heap the store holds for 100,000 pending
// messages of 1 KiB (no ordering key, no group state yet), after opening
// the log they were written to, as a restart does. Bodies stay on disk.
func BenchmarkPendingIndex(b *testing.B) {
	const n = 100_000
	dir := b.TempDir()
	s, err := Open(dir, Options{NoSync: true})
	if err != nil {
		b.Fatal(err)
	}
	body := make([]byte, 1024)
	entries := make([]Entry, 1000)
	for i := range entries {
		entries[i] = Entry{Topic: "orders", Body: body}
	}
	for i := 0; i < n; i += len(entries) {
		if _, err := s.Append(entries); err != nil {
			b.Fatal(err)
		}
	}
	if err := s.Close(); err != nil {
		b.Fatal(err)
	}
	for range b.N {
		runtime.GC()
		var before, after runtime.MemStats
		runtime.ReadMemStats(&before)
		s, err := Open(dir, Options{NoSync: true})
		if err != nil {
			b.Fatal(err)
		}
		runtime.GC()
		runtime.ReadMemStats(&after)
		b.ReportMetric(float64(after.HeapInuse-before.HeapInuse)/(1<<20), "heap-MiB")
		b.ReportMetric(float64(after.HeapInuse-before.HeapInuse)/n, "heap-B/msg")
		if s.Pending() != n {
			b.Fatalf("Pending() = %d, want %d", s.Pending(), n)
		}
		_ = s.Close()
	}
}

// TestGetMany: bodies in the order asked, nil for a finished or unknown
// message, the same bytes as Get, across segments and over the gap and
// span bounds that split a read.
func TestGetMany(t *testing.T) {
	t.Parallel()
	s := open(t, t.TempDir(), Options{NoSync: true, SegmentSize: 64 << 10})
	var seqs []uint64
	for i := range 300 {
		body := []byte(fmt.Sprintf("message %d ", i))
		for len(body) < 100+i*37%9000 { // some bodies over maxReadGap
			body = append(body, byte('a'+i%26))
		}
		res, err := s.Append([]Entry{{Topic: "orders", Ordering: fmt.Sprint("k", i%3), Body: body}})
		if err != nil {
			t.Fatal(err)
		}
		seqs = append(seqs, res[0].Seq)
	}
	var gone []Update
	for i := 0; i < len(seqs); i += 7 {
		gone = append(gone, Update{Seq: seqs[i], Delete: true})
	}
	if _, err := s.Apply(gone, nil); err != nil {
		t.Fatal(err)
	}
	ask := slices.Clone(seqs)
	slices.Reverse(ask[100:200]) // out of log order
	ask = append(ask, seqs[len(seqs)-1]+1000, seqs[3])
	got, err := s.GetMany(ask)
	if err != nil {
		t.Fatal(err)
	}
	if len(got) != len(ask) {
		t.Fatalf("GetMany() = %d bodies, want %d", len(got), len(ask))
	}
	for i, seq := range ask {
		_, want, ok, err := s.Get(seq)
		if err != nil {
			t.Fatal(err)
		}
		if !ok {
			want = nil
		}
		if (got[i] == nil) != !ok || string(got[i]) != string(want) {
			t.Errorf("GetMany()[%d] (seq %d) = %q, want %q (found %v)", i, seq, got[i], want, ok)
		}
	}
}
