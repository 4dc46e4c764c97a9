// Package seqtab is a map from message sequence numbers to small values,
// made for seqs handed out in increasing order and mostly finished in that
// order, as an outbox's are: values lie in pages of pageSize consecutive
// seqs, so a pending message costs its value and a bit, where a Go map
// costs its key, its value and the table's slack (about 2.5 times as
// much for a 24-byte value).
//
// A page emptied below a sixteenth of its seqs (messages left behind by
// the ones around them, a retried or slow one) moves what it still holds
// to a plain map and goes, so that a few stragglers do not keep whole
// pages alive: a value never costs more than about sixteen times its size.
//
// A Table is not safe for concurrent use; its owner locks around it.
package seqtab

import (
	"iter"
	"maps"
	"math/bits"
	"slices"
)

const (
	pageBits = 9
	pageSize = 1 << pageBits
	// sparse is the live count under which a page, other than the newest,
	// moves its values to the overflow map.
	sparse = pageSize / 16
)

// Table maps seqs to values of type T. The zero value is not ready for
// use: call New.
type Table[T any] struct {
	pages    map[uint64]*page[T]
	overflow map[uint64]T // values of pages gone sparse
	newest   uint64       // the highest page index that has held a value
	n        int
}

type page[T any] struct {
	used [pageSize / 64]uint64
	n    int
	vals [pageSize]T
}

// New returns an empty Table.
func New[T any]() *Table[T] {
	return &Table[T]{pages: map[uint64]*page[T]{}, overflow: map[uint64]T{}}
}

// Len returns the number of values.
func (t *Table[T]) Len() int { return t.n }

func slot(seq uint64) (pi uint64, i int, word int, bit uint64) {
	i = int(seq & (pageSize - 1))
	return seq >> pageBits, i, i / 64, 1 << (i % 64)
}

// Get returns seq's value and whether it has one.
func (t *Table[T]) Get(seq uint64) (T, bool) {
	pi, i, w, b := slot(seq)
	if p := t.pages[pi]; p != nil {
		if p.used[w]&b == 0 {
			var zero T
			return zero, false
		}
		return p.vals[i], true
	}
	v, ok := t.overflow[seq]
	return v, ok
}

// Set gives seq the value v.
func (t *Table[T]) Set(seq uint64, v T) {
	pi, i, w, b := slot(seq)
	p := t.pages[pi]
	if p == nil {
		// Below the newest page, a page that is not there may have gone
		// sparse, its values in the overflow: a new page would hide
		// them. So a seq set there (a store's replay of a reclaimed
		// record, a commit undone) goes to the overflow too; only pages
		// at or above the newest are made, and no overflow value is
		// ever on one.
		if _, ok := t.overflow[seq]; ok || pi < t.newest {
			if !ok {
				t.n++
			}
			t.overflow[seq] = v
			return
		}
		p = &page[T]{}
		t.pages[pi] = p
		if old := t.newest; pi > old {
			t.newest = pi
			// The page that was newest is checked now, as Delete checks
			// the others: one straggler must not keep it alive.
			if op := t.pages[old]; op != nil && op.n < sparse {
				t.spill(old, op)
			}
		}
	}
	if p.used[w]&b == 0 {
		p.used[w] |= b
		p.n++
		t.n++
	}
	p.vals[i] = v
}

// Delete removes seq's value, reporting whether it had one.
func (t *Table[T]) Delete(seq uint64) bool {
	pi, i, w, b := slot(seq)
	p := t.pages[pi]
	if p == nil {
		if _, ok := t.overflow[seq]; !ok {
			return false
		}
		delete(t.overflow, seq)
		t.n--
		return true
	}
	if p.used[w]&b == 0 {
		return false
	}
	p.used[w] &^= b
	var zero T
	p.vals[i] = zero // let go of what it points to
	p.n--
	t.n--
	switch {
	case p.n == 0:
		delete(t.pages, pi)
	case p.n < sparse && pi < t.newest:
		t.spill(pi, p)
	}
	return true
}

// spill moves the values of page pi, below the newest, to the overflow
// and drops the page.
func (t *Table[T]) spill(pi uint64, p *page[T]) {
	for j, x := range p.used {
		for ; x != 0; x &= x - 1 {
			k := j*64 + bits.TrailingZeros64(x)
			t.overflow[pi<<pageBits|uint64(k)] = p.vals[k]
		}
	}
	delete(t.pages, pi)
}

// All yields every seq and its value, in increasing seq order. The table
// must not change during the iteration.
func (t *Table[T]) All() iter.Seq2[uint64, T] {
	return func(yield func(uint64, T) bool) {
		pis := slices.Sorted(maps.Keys(t.pages))
		over := slices.Sorted(maps.Keys(t.overflow))
		for _, pi := range pis {
			p := t.pages[pi]
			// The overflow's seqs below this page first.
			for len(over) > 0 && over[0] < pi<<pageBits {
				if !yield(over[0], t.overflow[over[0]]) {
					return
				}
				over = over[1:]
			}
			for j, x := range p.used {
				for ; x != 0; x &= x - 1 {
					k := j*64 + bits.TrailingZeros64(x)
					if !yield(pi<<pageBits|uint64(k), p.vals[k]) {
						return
					}
				}
			}
		}
		for _, seq := range over {
			if !yield(seq, t.overflow[seq]) {
				return
			}
		}
	}
}
