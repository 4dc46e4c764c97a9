package proxy

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httputil"
	"net/textproto"
	"os"
	"sync"
	"time"

	"github.com/sidecarlb/sidecar/internal/httpwire"
	"github.com/sidecarlb/sidecar/internal/rawio"
)

// useH1Pool sends plain HTTP/1.1 requests that qualify (see h1Qualifies)
// over h1Pool instead of the endpoint's http.Transport.
const useH1Pool = true

const (
	h1MaxIdle        = 1024    // idle connections kept per endpoint
	h1MaxHeaderBytes = 1 << 20 // as the transport's MaxResponseHeaderBytes
	h1ReadBuffer     = 8 << 10
	h1WriteBuffer    = 8 << 10
	// h1MaxStreamedBody bounds the request bodies not held in memory that
	// the pool takes: socket buffers absorb them.
	h1MaxStreamedBody = 64 << 10
	// h1CheckIdleAfter is how long a connection must have been idle for
	// take to check that the node has not closed it. The check is a system
	// call (3 µs on the bench VM); a connection back in use sooner skips
	// it, as the pool's most recently used one always is under a steady
	// load, down to about 100 req/s a node: servers close keep-alive
	// connections idle for seconds (Node.js 5 s, Apache 5 s, nginx 75 s),
	// and one closing within 10 ms races a request as it would with any
	// client. At 1 ms, a 1,000 req/s load paid the check on every request.
	h1CheckIdleAfter = 10 * time.Millisecond
)

// h1Pool is a plain-text HTTP/1.1 keep-alive connection pool for one
// endpoint. Unlike http.Transport it writes the request and reads the
// response on the caller's goroutine, with buffers reused per connection.
// It is safe for concurrent use.
type h1Pool struct {
	dialer net.Dialer
	idleTO time.Duration // 0: no limit

	mu     sync.Mutex
	idle   []*h1Conn // most recently used last
	closed bool
	sweep  *time.Timer

	// lim bounds the pool's connections (nil: no limit); see connect.
	lim     *nodeLimits
	handoff chan *h1Conn // a connection put back, to a request waiting for one
	waiters int          // requests waiting for a connection; under mu
}

func newH1Pool(t Timeouts) *h1Pool {
	return &h1Pool{dialer: net.Dialer{Timeout: t.Connect, KeepAlive: 30 * time.Second}, idleTO: t.Idle}
}

// h1Qualifies reports whether an ordinary request may go over an h1Pool
// (serveUpgrade sends plaintext upgrades over it itself): no upgrade, no
// Expect: 100-continue, no request trailers, and a body that is absent,
// held in memory, or of a known length of at most h1MaxStreamedBody. The
// body is written in full before the response is read, so a longer one
// could deadlock with a node that answers as it reads (a full-duplex echo).
func h1Qualifies(out *http.Request, b *body) bool {
	if out.Method == http.MethodConnect || len(out.Trailer) > 0 || out.URL.Opaque != "" {
		return false
	}
	if _, ok := out.Header["Upgrade"]; ok {
		return false
	}
	if _, ok := out.Header["Expect"]; ok {
		return false
	}
	return b == nil || b.buf != nil || (out.ContentLength > 0 && out.ContentLength <= h1MaxStreamedBody)
}

// hasIdempotencyKey reports whether the client marked a request as safe to
// send twice, as net/http's Transport honours.
func hasIdempotencyKey(h http.Header) bool {
	_, a := h["Idempotency-Key"]
	_, b := h["X-Idempotency-Key"]
	return a || b
}

// h1Conn is one connection of an h1Pool.
type h1Conn struct {
	pool   *h1Pool
	c      net.Conn
	raw    *rawio.Conn // c, when it is one: to check it before reuse
	lr     limitReader
	br     *bufio.Reader
	bw     *bufio.Writer
	tp     textproto.Reader
	head   []byte // scratch for a response head
	idleAt time.Time
	reused bool
	// interrupt unblocks the connection's I/O when a request's context ends.
	interrupt func()
}

// limitReader bounds how much a message's header may read from the
// connection: past n bytes, reads fail with err.
// The HTTP/1.1 pool reads responses through one, the server requests.
type limitReader struct {
	c   net.Conn
	n   int64
	err error
}

var errHeaderTooLong = errors.New("upstream response header too long")

func (l *limitReader) Read(p []byte) (int, error) {
	if l.n <= 0 {
		return 0, l.err
	}
	if int64(len(p)) > l.n {
		p = p[:l.n]
	}
	n, err := l.c.Read(p)
	l.n -= int64(n)
	return n, err
}

const noLimit = 1 << 62

// take returns an idle connection, or nil. It closes those idle too long,
// and those idle for h1CheckIdleAfter that the node closed meanwhile
// (rawio.Conn.IdleBroken): a request sent on one would fail with nothing read,
// which only an idempotent request could then be retried after.
func (p *h1Pool) take(now time.Time) *h1Conn {
	for {
		var stale []*h1Conn
		var pc *h1Conn
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
		if pc == nil || pc.raw == nil || now.Sub(pc.idleAt) < h1CheckIdleAfter || !pc.raw.IdleBroken() {
			return pc
		}
		pc.c.Close()
	}
}

// put returns a connection whose exchange ended cleanly, or closes it when
// the pool is closed or full.
func (p *h1Pool) put(pc *h1Conn) {
	if pc.br.Buffered() > 0 { // bytes nobody asked for: not trustworthy
		pc.c.Close()
		return
	}
	pc.idleAt = time.Now()
	pc.reused = true
	p.mu.Lock()
	if p.closed || len(p.idle) >= h1MaxIdle {
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
func (p *h1Pool) sweepIdle() {
	now := time.Now()
	var stale []*h1Conn
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

// closeIdle closes the idle connections.
func (p *h1Pool) closeIdle() {
	p.mu.Lock()
	idle := p.idle
	p.idle = nil
	p.mu.Unlock()
	for _, c := range idle {
		c.c.Close()
	}
}

// retire closes the idle connections and makes the pool close the busy
// ones when their exchange ends.
func (p *h1Pool) retire() {
	p.mu.Lock()
	p.closed = true
	if p.sweep != nil {
		p.sweep.Stop()
		p.sweep = nil
	}
	p.mu.Unlock()
	p.closeIdle()
}

func (p *h1Pool) dial(ctx context.Context, addr string) (*h1Conn, error) {
	c, err := p.dialer.DialContext(ctx, "tcp", addr)
	if err != nil {
		return nil, err
	}
	c = rawio.Wrap(c)
	p.lim.attach(c)
	pc := &h1Conn{pool: p, c: c, lr: limitReader{c: c, err: errHeaderTooLong}}
	pc.raw, _ = c.(*rawio.Conn)
	pc.br = bufio.NewReaderSize(&pc.lr, h1ReadBuffer)
	pc.bw = bufio.NewWriterSize(c, h1WriteBuffer)
	pc.tp.R = pc.br
	pc.interrupt = func() { _ = c.SetDeadline(aLongTimeAgo) }
	return pc, nil
}

// roundTrip sends out, whose body (if any) is b's buffer, and reads the
// response head. The response body reads the framed body from the
// connection, which goes back to the pool at its end. A reused connection
// that fails before any of the response arrives (the node closed it while
// idle) is replaced once by a new one, as net/http does: when the request
// never fully left, or may safely be applied twice (idempotent method or an
// Idempotency-Key header).
func (p *h1Pool) roundTrip(out *http.Request, b *body, now time.Time) (*http.Response, error) {
	if err := checkRequestLine(out); err != nil {
		return nil, err
	}
	ctx := out.Context()
	var body reqBody
	if b != nil {
		body = reqBody{buf: b.buf, n: int64(len(b.buf))}
		if b.buf == nil {
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
		if !pc.reused || !nothingRead || ctx.Err() != nil || (b != nil && !b.replayable()) ||
			!(unsent || idempotent(out.Method) || hasIdempotencyKey(out.Header)) {
			return nil, err
		}
		pc = nil // retry once on a new connection
	}
}

// roundTrip carries one exchange over pc. On error the caller closes pc;
// nothingRead says whether any of the response had arrived, and unsent
// whether writing the request failed, so the node cannot have acted on it.
func (pc *h1Conn) roundTrip(ctx context.Context, out *http.Request, body reqBody) (resp *http.Response, nothingRead, unsent bool, err error) {
	// Interrupt blocked I/O when ctx ends, until the body is done.
	x := exchange{ctx: ctx}
	x.deadline, x.hasDeadline = ctx.Deadline()
	if x.hasDeadline {
		_ = pc.c.SetDeadline(x.deadline)
	}
	x.arm(pc.interrupt)

	pc.lr.n = h1MaxHeaderBytes
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
		return nil, pc.lr.n == h1MaxHeaderBytes, unsent, x.wrap(err)
	}
	pc.lr.n = noLimit
	if resp.StatusCode == http.StatusSwitchingProtocols {
		// The connection now speaks the upgraded protocol and belongs to
		// the caller, for as long as it lasts: it never returns to the pool.
		x.stop()
		_ = pc.c.SetDeadline(time.Time{})
		resp.Body = &h1Upgraded{pc: pc}
		return resp, false, false, nil
	}

	rb := &h1Body{pc: pc, resp: resp, x: x}
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

// h1Upgraded is an upgraded connection to a node, as the body of its 101
// answer: what the node sent past the answer's head is read first.
type h1Upgraded struct{ pc *h1Conn }

func (u *h1Upgraded) Read(p []byte) (int, error) { return u.pc.br.Read(p) }

// RawBeneath makes a relay send what the pool's reader holds first, then
// read the raw connection beneath (rawio.Layered).
func (u *h1Upgraded) RawBeneath() (*rawio.Conn, []byte) {
	r, _ := u.pc.c.(*rawio.Conn)
	held, _ := u.pc.br.Peek(u.pc.br.Buffered())
	return r, held
}
func (u *h1Upgraded) Write(p []byte) (int, error) { return u.pc.c.Write(p) }
func (u *h1Upgraded) Close() error                { return u.pc.c.Close() }

// CloseWrite half-closes the connection, so the node sees the client's EOF.
func (u *h1Upgraded) CloseWrite() error { return closeWrite(u.pc.c) }

// exchange is the context of one request on a connection.
type exchange struct {
	ctx         context.Context
	deadline    time.Time
	hasDeadline bool
	// What interrupts the exchange's I/O when ctx ends: the app
	// connection's interrupter, or a context.AfterFunc.
	ci       *interrupter
	stopFunc func() bool
}

// arm makes the end of x.ctx call interrupt, until stop.
func (x *exchange) arm(interrupt func()) {
	if x.ctx.Done() == nil {
		return
	}
	if ci, _ := x.ctx.Value(interrupterKey{}).(*interrupter); ci != nil && ci.ctx == x.ctx && ci.arm(interrupt) {
		x.ci = ci
		return
	}
	x.stopFunc = context.AfterFunc(x.ctx, interrupt)
}

// stop undoes arm. It reports false when ctx ended and interrupt was
// called (or is being called), true otherwise.
func (x *exchange) stop() bool {
	switch {
	case x.ci != nil:
		ci := x.ci
		x.ci = nil
		return ci.stop()
	case x.stopFunc != nil:
		f := x.stopFunc
		x.stopFunc = nil
		return f()
	}
	return true
}

// interrupterKey is the context key of an app connection's interrupter.
type interrupterKey struct{}

// interrupter does for the exchanges of one app connection, one at a time,
// what a context.AfterFunc on their shared context would do, without the
// three allocations such a registration costs per request. The HTTP/1.1
// server makes one per connection, registered once with context.AfterFunc,
// and puts it in the connection's context (see withInterrupter). Its
// methods are safe for concurrent use and do not block.
type interrupter struct {
	ctx   context.Context // the context it serves, and no context derived from it
	mu    sync.Mutex
	fn    func() // armed
	ended bool   // ctx ended
}

// withInterrupter returns a context carrying a new interrupter for itself,
// and end, which does at once what the context's end would do to the
// interrupter, without the goroutine context.AfterFunc starts for that.
func withInterrupter(ctx context.Context) (context.Context, func()) {
	ci := &interrupter{}
	ci.ctx = context.WithValue(ctx, interrupterKey{}, ci)
	stop := context.AfterFunc(ci.ctx, ci.fire)
	return ci.ctx, func() {
		if stop() {
			ci.fire()
		}
	}
}

// arm sets fn to be called when ctx ends. It reports false, doing nothing,
// when an exchange already holds the interrupter.
func (ci *interrupter) arm(fn func()) bool {
	ci.mu.Lock()
	if ci.fn != nil {
		ci.mu.Unlock()
		return false
	}
	if ci.ended {
		ci.mu.Unlock()
		go fn() // as context.AfterFunc does for a context already done
		return true
	}
	ci.fn = fn
	ci.mu.Unlock()
	return true
}

// stop disarms the interrupter, reporting whether that kept fn from being
// called.
func (ci *interrupter) stop() bool {
	ci.mu.Lock()
	defer ci.mu.Unlock()
	stopped := ci.fn != nil && !ci.ended
	ci.fn = nil
	return stopped
}

func (ci *interrupter) fire() {
	ci.mu.Lock()
	ci.ended = true
	fn := ci.fn
	ci.mu.Unlock()
	if fn != nil {
		fn()
	}
}

// wrap names the context's error in err when the context ended, so that
// callers see a timeout or a cancellation rather than an I/O error.
func (x *exchange) wrap(err error) error {
	if cerr := x.ctx.Err(); cerr != nil {
		return fmt.Errorf("%w: %w", cerr, err)
	}
	if x.hasDeadline && errors.Is(err, os.ErrDeadlineExceeded) && !time.Now().Before(x.deadline) {
		return fmt.Errorf("%w: %w", context.DeadlineExceeded, err)
	}
	return err
}

var aLongTimeAgo = time.Unix(1, 0)

// reqBody is a request body of known length: buf, or n bytes of src.
type reqBody struct {
	buf []byte
	src io.Reader
	n   int64
}
