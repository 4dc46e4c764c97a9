//go:build !linux

package proxy

import (
	"errors"
	"sync/atomic"
)

// relayPair is Linux's: elsewhere, relays copy with a goroutine per
// direction (relay).
type relayPair struct{}

func newRelayPair(a, b *rawConn, aHeld, bHeld []byte, halfClose bool, last *atomic.Int64) (*relayPair, error) {
	return nil, errors.ErrUnsupported
}

func (p *relayPair) wait() error { return nil }

func (p *relayPair) Close() {}
