package h1

import (
	"context"
	"net"
	"slices"
	"time"
)

// Limits bounds the connections a Pool opens to its node, as the proxy's
// per-node limits (resilience.limits) do for every pool of the node. Its
// methods are safe for concurrent use.
type Limits interface {
	// TryConn takes a connection slot if one is free. It does not block.
	TryConn() bool
	// WaitConn waits, as a pending request, for a connection slot or for
	// a connection on more (one put back), for at most wait or until ctx
	// ends. It returns the connection, or nil when a slot was taken, or
	// an error of the limits' own (never one of the node's). It blocks.
	WaitConn(ctx context.Context, wait time.Duration, more <-chan *ClientConn) (*ClientConn, error)
	// EndConn gives back a slot TryConn or WaitConn took. It does not block.
	EndConn()
	// Attach makes c's Close give back the slot its dial took. It does
	// not block.
	Attach(c net.Conn)
}

// noLimits is the Limits of a pool given none: every slot is free.
type noLimits struct{}

func (noLimits) TryConn() bool { return true }
func (noLimits) WaitConn(context.Context, time.Duration, <-chan *ClientConn) (*ClientConn, error) {
	return nil, nil
}
func (noLimits) EndConn()        {}
func (noLimits) Attach(net.Conn) {}

// Body is a request body as the tries of one request share it (the
// proxy's replay body): the pool reads the bytes held in memory, or else
// out.Body, and asks whether the body may still be sent again. Its methods
// do not block.
type Body interface {
	// Bytes returns the whole body when it is held in memory, else nil.
	Bytes() []byte
	// Replayable reports whether the body may be sent again.
	Replayable() bool
}

// connect returns a new connection to addr. At max_connections it waits,
// as a pending request, for a slot (a connection closing) or for a
// connection put back (handed over by put), up to the connect timeout. A
// dial that fails gives its slot back.
func (p *Pool) connect(ctx context.Context, addr string) (*ClientConn, error) {
	if !p.lim.TryConn() {
		// put hands a connection to a waiter, or closes it when none is
		// ready to take it, which frees a slot; one put back before this
		// request counted itself a waiter is idle, and take finds it.
		p.mu.Lock()
		p.waiters++
		p.mu.Unlock()
		pc := p.take(time.Now())
		var err error
		if pc == nil {
			pc, err = p.lim.WaitConn(ctx, p.dialer.Timeout, p.handoff)
		}
		p.mu.Lock()
		p.waiters--
		p.mu.Unlock()
		if pc != nil || err != nil {
			return pc, err
		}
	}
	pc, err := p.dial(ctx, addr)
	if err != nil {
		p.lim.EndConn()
	}
	return pc, err
}

// handOver gives pc, put back, to a request waiting for a connection, or
// closes it when none is ready to take it: its slot is then the waiter's.
func (p *Pool) handOver(pc *ClientConn) {
	select {
	case p.handoff <- pc:
	default:
		pc.c.Close()
	}
}

// CloseOldest closes the least recently used idle connection, reporting
// whether there was one. It does not block.
func (p *Pool) CloseOldest() bool {
	p.mu.Lock()
	if len(p.idle) == 0 {
		p.mu.Unlock()
		return false
	}
	pc := p.idle[0]
	p.idle = slices.Delete(p.idle, 0, 1)
	p.mu.Unlock()
	pc.c.Close()
	return true
}
