package seqtab

import (
	"math/rand/v2"
	"slices"
	"testing"
)

// TestTableMatchesMap drives a Table and a map with the same random
// operations, seqs mostly increasing and finished mostly in order with
// stragglers, and checks that they agree after each.
func TestTableMatchesMap(t *testing.T) {
	r := rand.New(rand.NewPCG(1, 2))
	tab := New[int]()
	want := map[uint64]int{}
	var next uint64 = 1
	reached := false // a page went sparse at some step
	for step := range 200_000 {
		if step%97 == 0 && next > 2 { // an old seq set again (a replayed copy, a commit undone)
			seq := 1 + uint64(r.IntN(int(next-1)))
			tab.Set(seq, step)
			want[seq] = step
		}
		switch op := r.IntN(10); {
		case op < 5: // a new message
			tab.Set(next, step)
			want[next] = step
			next++
		case op < 8: // the oldest few finish, most of the time
			for seq := range want {
				if seq < next-uint64(r.IntN(3000)) || r.IntN(50) == 0 {
					if !tab.Delete(seq) {
						t.Fatalf("Delete(%d) = false, want true", seq)
					}
					delete(want, seq)
					break
				}
			}
		case op < 9: // an update of any
			if len(want) > 0 {
				seq := next - 1 - uint64(r.IntN(int(min(next-1, 5000))))
				if _, ok := want[seq]; ok {
					tab.Set(seq, -step)
					want[seq] = -step
				}
			}
		default: // a Delete of something not there
			if tab.Delete(next + 7) {
				t.Fatalf("Delete(%d) of an absent seq = true", next+7)
			}
		}
		if tab.Len() != len(want) {
			t.Fatalf("step %d: Len() = %d, want %d", step, tab.Len(), len(want))
		}
		reached = reached || len(tab.overflow) > 0
	}
	for seq, v := range want {
		if got, ok := tab.Get(seq); !ok || got != v {
			t.Fatalf("Get(%d) = %d, %v, want %d, true", seq, got, ok, v)
		}
	}
	var seqs []uint64
	for seq, v := range tab.All() {
		if want[seq] != v {
			t.Fatalf("All() yields %d: %d, want %d", seq, v, want[seq])
		}
		seqs = append(seqs, seq)
	}
	if len(seqs) != len(want) || !slices.IsSorted(seqs) {
		t.Fatalf("All() yields %d seqs (sorted %v), want %d in order", len(seqs), slices.IsSorted(seqs), len(want))
	}
	if !reached {
		t.Errorf("no page went sparse: the test does not reach the overflow")
	}
}

// TestSparsePagesGo: stragglers left one per page do not keep their pages.
func TestSparsePagesGo(t *testing.T) {
	tab := New[[3]uint64]()
	for seq := uint64(1); seq <= 100*pageSize; seq++ {
		tab.Set(seq, [3]uint64{seq})
	}
	for seq := uint64(1); seq <= 100*pageSize; seq++ {
		if seq%pageSize != 5 {
			tab.Delete(seq)
		}
	}
	if len(tab.pages) > 1 {
		t.Errorf("%d pages kept for %d values, want at most the newest", len(tab.pages), tab.Len())
	}
	if v, ok := tab.Get(3*pageSize + 5); !ok || v[0] != 3*pageSize+5 {
		t.Errorf("Get of a straggler = %v, %v", v, ok)
	}
}

func BenchmarkTableSetDelete(b *testing.B) {
	b.ReportAllocs()
	tab := New[[3]uint64]()
	for i := range b.N {
		seq := uint64(i) + 1
		tab.Set(seq, [3]uint64{seq})
		if seq > 1000 {
			tab.Delete(seq - 1000)
		}
	}
}

// TestSetBelowSparsePage: a seq set on a page that went sparse (its values
// in the overflow) keeps the page's other values found, whether the page
// had gone sparse by Delete or as the newest when a newer one opened.
func TestSetBelowSparsePage(t *testing.T) {
	tab := New[int]()
	for seq := uint64(301); seq < 1200; seq++ {
		tab.Set(seq, int(seq))
	}
	for seq := uint64(311); seq < 512; seq++ {
		tab.Delete(seq) // page 0 keeps 301..310: sparse
	}
	tab.Set(1, 1) // a reclaimed record's copy, replayed
	for seq := uint64(301); seq <= 310; seq++ {
		if v, ok := tab.Get(seq); !ok || v != int(seq) {
			t.Fatalf("Get(%d) = %d, %v after Set(1), want %d, true", seq, v, ok, seq)
		}
	}
	if v, ok := tab.Get(1); !ok || v != 1 {
		t.Fatalf("Get(1) = %d, %v, want 1, true", v, ok)
	}
	if n := tab.Len(); n != 11+1200-512 {
		t.Fatalf("Len() = %d, want %d", n, 11+1200-512)
	}

	// The newest page left with one straggler when a newer one opens.
	tab = New[int]()
	for seq := uint64(0); seq < 512; seq++ {
		tab.Set(seq, 0)
	}
	for seq := uint64(1); seq < 512; seq++ {
		tab.Delete(seq)
	}
	tab.Set(512, 0)
	if len(tab.pages) != 1 || len(tab.overflow) != 1 {
		t.Fatalf("pages %d, overflow %d after a newer page opened; want the straggler's page spilled", len(tab.pages), len(tab.overflow))
	}
}
