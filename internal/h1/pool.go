package h1

import (
	"bufio"
	"context"
	"errors"
	"io"
	"net"
	"net/http"
	"net/http/httputil"
	"net/textproto"
	"sync"
	"time"

	"github.com/sidecarlb/sidecar/internal/httpwire"
	"github.com/sidecarlb/sidecar/internal/rawio"
)

const (
	poolMaxIdle        = 1024    // idle connections kept per endpoint
	poolMaxHeaderBytes = 1 << 20 // as the transport's MaxResponseHeaderBytes
	poolReadBuffer     = 8 << 10
	poolWriteBuffer    = 8 << 10
	// MaxStreamedBody bounds the request bodies not held in memory that
	// the pool takes: socket buffers absorb them.
	MaxStreamedBody = 64 << 10
	// poolCheckIdleAfter is how long a connection must have been idle for
	// take to check that the node has not closed it. The check is a system
	// call (3 µs on the bench VM); a connection back in use sooner skips
	// it, as the pool's most recently used one always is under a steady
	// load, down to about 100 req/s a node: servers close keep-alive
	// connections idle for seconds (Node.js 5 s, Apache 5 s, nginx 75 s),
	// and one closing within 10 ms races a request as it would with any
	// client. At 1 ms, a 1,000 req/s load paid the check on every request.
	poolCheckIdleAfter = 10 * time.Millisecond
)

// Pool is a plain-text HTTP/1.1 keep-alive connection pool for one
// endpoint. Unlike http.Transport it writes the request and reads the
// response on the caller's goroutine, with buffers reused per connection.
// It is safe for concurrent use.
type Pool struct {
	// Handshake, if set, is called on each new connection to addr before
	// it is used or counted (a service mesh's mTLS handshake), and returns
	// the connection to speak over; on error it has closed c. Set it
	// before the first RoundTrip.
	Handshake func(ctx context.Context, c net.Conn, addr string) (net.Conn, error)

	dialer net.Dialer
	idleTO time.Duration // 0: no limit

	mu     sync.Mutex
	idle   []*ClientConn // most recently used last
	closed bool
	sweep  *time.Timer

	// lim bounds the pool's connections; see connect.
	lim     Limits
	handoff chan *ClientConn // a connection put back, to a request waiting for one
	waiters int              // requests waiting for a connection; under mu
}

// NewPool returns a pool whose dials time out after connect, whose
// connections idle longer than idle are closed (0: no limit), and whose
// connections count against lim (nil: no limits).
func NewPool(connect, idle time.Duration, lim Limits) *Pool {
	if lim == nil {
		lim = noLimits{}
	}
	return &Pool{dialer: net.Dialer{Timeout: connect, KeepAlive: 30 * time.Second}, idleTO: idle,
		lim: lim, handoff: make(chan *ClientConn)}
}

// Qualifies reports whether an ordinary request may go over a Pool
// (the proxy sends plaintext upgrades over it itself): no upgrade, no
// Expect: 100-continue, no request trailers, and a body that is absent,
// held in memory, or of a known length of at most MaxStreamedBody. The
// body is written in full before the response is read, so a longer one
// could deadlock with a node that answers as it reads (a full-duplex echo).
func Qualifies(out *http.Request, b Body) bool {
	if out.Method == http.MethodConnect || len(out.Trailer) > 0 || out.URL.Opaque != "" {
		return false
	}
	if _, ok := out.Header["Upgrade"]; ok {
		return false
	}
	if _, ok := out.Header["Expect"]; ok {
		return false
	}
	return b == nil || b.Bytes() != nil || (out.ContentLength > 0 && out.ContentLength <= MaxStreamedBody)
}

// ClientConn is one connection of an Pool.
type ClientConn struct {
	pool   *Pool
	c      net.Conn
	raw    *rawio.Conn // c, when it is one: to check it before reuse
	lr     limitReader
	br     *bufio.Reader
	bw     *bufio.Writer
	tp     textproto.Reader
	head   []byte    // scratch for a response head
	bufs   *connBufs // br, bw and head, held while an exchange is on the connection
	idleAt time.Time
	reused bool
	// interrupt unblocks the connection's I/O when a request's context ends.
	interrupt func()
}

// connBufs are the buffers of a connection in use. A connection takes them
// for an exchange and gives them back when it goes idle, as net/http's
// server and fasthttp do, so the idle connections of thousands of routes
// (the forward proxy's) cost their sockets, not 16 KiB of buffers each.
type connBufs struct {
	br   *bufio.Reader
	bw   *bufio.Writer
	head []byte
}

var clientBufs = sync.Pool{New: func() any {
	return &connBufs{br: bufio.NewReaderSize(nil, poolReadBuffer), bw: bufio.NewWriterSize(nil, poolWriteBuffer)}
}}

// holdBufs gives pc its buffers for an exchange, if it has none.
func (pc *ClientConn) holdBufs() {
	if pc.bufs != nil {
		return
	}
	b := clientBufs.Get().(*connBufs)
	b.br.Reset(&pc.lr)
	b.bw.Reset(pc.c)
	pc.bufs, pc.br, pc.bw, pc.head = b, b.br, b.bw, b.head
	pc.tp.R = b.br
}

// releaseBufs gives pc's buffers back, empty, when it goes idle.
func (pc *ClientConn) releaseBufs() {
	b := pc.bufs
	if b == nil {
		return
	}
	b.br.Reset(nil)
	b.bw.Reset(nil)
	b.head = pc.head
	pc.bufs, pc.br, pc.bw, pc.head = nil, nil, nil, nil
	pc.tp.R = nil
	clientBufs.Put(b)
}

// errHeaderTooLong fails a response head longer than poolMaxHeaderBytes.
var errHeaderTooLong = errors.New("upstream response header too long")

// take returns an idle connection, or nil. It closes those idle too long,
// and those idle for poolCheckIdleAfter that the node closed meanwhile
// (rawio.Conn.IdleBroken): a request sent on one would fail with nothing read,
// which only an idempotent request could then be retried after.
func (p *Pool) take(now time.Time) *ClientConn {
	for {
		var stale []*ClientConn
		var pc *ClientConn
		p.mu.Lock()
		for n := len(p.idle); n > 0; n = len(p.idle) {
			c := p.idle[n-1]
			p.idle[n-1] = nil
			p.idle = p.idle[:n-1]
			if p.idleTO > 0 && now.Sub(c.idleAt) > p.idleTO {
				stale = append(stale, c)
				continue
			}
			pc = c
			break
		}
		p.mu.Unlock()
		for _, c := range stale {
			c.c.Close()
		}
		if pc == nil || pc.raw == nil || now.Sub(pc.idleAt) < poolCheckIdleAfter || !pc.raw.IdleBroken() {
			return pc
		}
		pc.c.Close()
	}
}

// put returns a connection whose exchange ended cleanly, or closes it when
// the pool is closed or full.
func (p *Pool) put(pc *ClientConn) {
	if pc.bufs != nil && (pc.br.Buffered() > 0 || pc.bw.Buffered() > 0) { // bytes nobody asked for: not trustworthy
		pc.c.Close()
		return
	}
	pc.releaseBufs() // taken again by the next exchange, from any connection
	pc.idleAt = time.Now()
	pc.reused = true
	p.mu.Lock()
	if p.closed || len(p.idle) >= poolMaxIdle {
		p.mu.Unlock()
		pc.c.Close()
		return
	}
	if p.waiters > 0 {
		p.mu.Unlock()
		p.handOver(pc)
		return
	}
	p.idle = append(p.idle, pc)
	if p.sweep == nil && p.idleTO > 0 {
		p.sweep = time.AfterFunc(p.idleTO, p.sweepIdle)
	}
	p.mu.Unlock()
}

// sweepIdle closes the connections idle longer than the idle timeout.
func (p *Pool) sweepIdle() {
	now := time.Now()
	var stale []*ClientConn
	p.mu.Lock()
	keep := p.idle[:0]
	for _, c := range p.idle { // oldest first
		if now.Sub(c.idleAt) > p.idleTO {
			stale = append(stale, c)
		} else {
			keep = append(keep, c)
		}
	}
	clear(p.idle[len(keep):])
	p.idle = keep
	p.sweep = nil
	if len(p.idle) > 0 && !p.closed {
		p.sweep = time.AfterFunc(p.idleTO-now.Sub(p.idle[0].idleAt)+time.Millisecond, p.sweepIdle)
	}
	p.mu.Unlock()
	for _, c := range stale {
		c.c.Close()
	}
}

// CloseIdle closes the idle connections. It does not block.
func (p *Pool) CloseIdle() {
	p.mu.Lock()
	idle := p.idle
	p.idle = nil
	p.mu.Unlock()
	for _, c := range idle {
		c.c.Close()
	}
}

// Retire closes the idle connections and makes the pool close the busy
// ones when their exchange ends. It does not block.
func (p *Pool) Retire() {
	p.mu.Lock()
	p.closed = true
	if p.sweep != nil {
		p.sweep.Stop()
		p.sweep = nil
	}
	p.mu.Unlock()
	p.CloseIdle()
}

func (p *Pool) dial(ctx context.Context, addr string) (*ClientConn, error) {
	c, err := p.dialer.DialContext(ctx, "tcp", addr)
	if err != nil {
		return nil, err
	}
	c = rawio.Wrap(c)
	if p.Handshake != nil {
		raw := c
		if c, err = p.Handshake(ctx, c, addr); err != nil {
			return nil, err
		}
		p.lim.Attach(raw) // closing c closes raw
	} else {
		p.lim.Attach(c)
	}
	pc := &ClientConn{pool: p, c: c, lr: limitReader{c: c, err: errHeaderTooLong}}
	pc.raw, _ = c.(*rawio.Conn)
	pc.interrupt = func() { _ = c.SetDeadline(aLongTimeAgo) }
	return pc, nil
}

// RoundTrip sends out, whose body (if any) is b, and reads the
// response head. The response body reads the framed body from the
// connection, which goes back to the pool at its end. A reused connection
// that fails before any of the response arrives (the node closed it while
// idle) is replaced once by a new one, as net/http does: when the request
// never fully left, or may safely be applied twice (idempotent method or an
// Idempotency-Key header). now is the time of the call, as the caller
// read it. RoundTrip blocks until the response head arrives or out's context ends;
// it is safe for concurrent use.
func (p *Pool) RoundTrip(out *http.Request, b Body, now time.Time) (*http.Response, error) {
	if err := checkRequestLine(out); err != nil {
		return nil, err
	}
	ctx := out.Context()
	var body reqBody
	if b != nil {
		buf := b.Bytes()
		body = reqBody{buf: buf, n: int64(len(buf))}
		if buf == nil {
			body.src, body.n = out.Body, out.ContentLength
		}
	}
	pc := p.take(now)
	for {
		if pc == nil {
			var err error
			if pc, err = p.connect(ctx, out.URL.Host); err != nil {
				return nil, err
			}
		}
		resp, nothingRead, unsent, err := pc.roundTrip(ctx, out, body)
		if err == nil {
			return resp, nil
		}
		pc.c.Close()
		if !pc.reused || !nothingRead || ctx.Err() != nil || (b != nil && !b.Replayable()) ||
			!(unsent || httpwire.Idempotent(out.Method) || httpwire.HasIdempotencyKey(out.Header)) {
			return nil, err
		}
		pc = nil // retry once on a new connection
	}
}

// roundTrip carries one exchange over pc. On error the caller closes pc;
// nothingRead says whether any of the response had arrived, and unsent
// whether writing the request failed, so the node cannot have acted on it.
func (pc *ClientConn) roundTrip(ctx context.Context, out *http.Request, body reqBody) (resp *http.Response, nothingRead, unsent bool, err error) {
	pc.holdBufs()
	// Interrupt blocked I/O when ctx ends, until the body is done.
	x := exchange{ctx: ctx}
	x.deadline, x.hasDeadline = ctx.Deadline()
	if x.hasDeadline {
		_ = pc.c.SetDeadline(x.deadline)
	}
	x.arm(pc.interrupt)

	pc.lr.n = poolMaxHeaderBytes
	if err = pc.writeRequest(out, body); err != nil {
		unsent = true
	} else if resp, err = pc.readResponse(out); err != nil {
		// The request's last write may be made by the first read
		// (rawio.Conn.HoldWrite): if that failed, the request is unsent.
		var ope *net.OpError
		unsent = errors.As(err, &ope) && ope.Op == "write"
	}
	if err != nil {
		x.stop()
		return nil, pc.lr.n == poolMaxHeaderBytes, unsent, x.wrap(err)
	}
	pc.lr.n = noLimit
	if resp.StatusCode == http.StatusSwitchingProtocols {
		// The connection now speaks the upgraded protocol and belongs to
		// the caller, for as long as it lasts: it never returns to the pool.
		x.stop()
		_ = pc.c.SetDeadline(time.Time{})
		resp.Body = &upgraded{pc: pc}
		return resp, false, false, nil
	}

	rb := &respBody{pc: pc, resp: resp, x: x}
	switch {
	case resp.ContentLength == 0 || out.Method == http.MethodHead || !httpwire.BodyAllowed(resp.StatusCode):
		resp.Body = http.NoBody
		rb.finish(nil)
		return resp, false, false, nil
	case resp.TransferEncoding != nil:
		rb.cr = httputil.NewChunkedReader(pc.br)
	case resp.ContentLength > 0:
		rb.remain = resp.ContentLength
	default:
		resp.Close = true // read to EOF
	}
	resp.Body = rb
	return resp, false, false, nil
}

// upgraded is an upgraded connection to a node, as the body of its 101
// answer: what the node sent past the answer's head is read first.
type upgraded struct{ pc *ClientConn }

func (u *upgraded) Read(p []byte) (int, error) { return u.pc.br.Read(p) }

// RawBeneath makes a relay send what the pool's reader holds first, then
// read the raw connection beneath (rawio.Layered).
func (u *upgraded) RawBeneath() (*rawio.Conn, []byte) {
	r, ok := u.pc.c.(*rawio.Conn)
	if !ok {
		// Under TLS (a mesh node): read through u, whose reader holds
		// what came first. Peek would write the reader's state, which
		// the relay's other direction must not race with.
		return nil, nil
	}
	held, _ := u.pc.br.Peek(u.pc.br.Buffered())
	return r, held
}
func (u *upgraded) Write(p []byte) (int, error) { return u.pc.c.Write(p) }
func (u *upgraded) Close() error                { return u.pc.c.Close() }

// CloseWrite half-closes the connection, so the node sees the client's EOF.
func (u *upgraded) CloseWrite() error { return rawio.CloseWrite(u.pc.c) }

// reqBody is a request body of known length: buf, or n bytes of src.
type reqBody struct {
	buf []byte
	src io.Reader
	n   int64
}
