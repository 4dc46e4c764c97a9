//go:build !linux

package rawio

import (
	"errors"
	"sync/atomic"
)

// Pair is Linux's: elsewhere, relays copy with a goroutine per
// direction (relay).
type Pair struct{}

func NewPair(a, b *Conn, aHeld, bHeld []byte, halfClose bool, last *atomic.Int64) (*Pair, error) {
	return nil, errors.ErrUnsupported
}

func (p *Pair) Wait() error { return nil }

func (p *Pair) Transferred() (aToB, bToA int64) { return 0, 0 }

func (p *Pair) Close() {}
