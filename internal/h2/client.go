package h2

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"go.uber.org/zap"
	"golang.org/x/net/http2"

	"github.com/sidecarlb/sidecar/internal/httpwire"
	"github.com/sidecarlb/sidecar/internal/rawio"
	"github.com/sidecarlb/sidecar/internal/replay"
)

var (
	// ErrRefusedStream: the node refused the stream (REFUSED_STREAM, or a
	// GOAWAY naming an earlier stream) before processing it, so it is as
	// safe to send elsewhere as a refused dial.
	ErrRefusedStream = errors.New("http2: stream refused by the node before processing")
	errConnUnusable  = errors.New("http2: connection takes no new streams")
	errH2RespClosed  = errors.New("http2: response body closed")
)

// streamError is a stream the node reset.
type streamError struct{ code http2.ErrCode }

func (e streamError) Error() string { return "http2: stream reset by the node: " + e.code.String() }

// Pool is the h2c connections to one node. Streams go to the first
// connection with room under the node's concurrency limit; a new connection
// is dialled, one at a time, when none has. It is safe for concurrent use.
type Pool struct {
	dialer net.Dialer    // its Timeout is the connect timeout
	idle   time.Duration // a connection with no stream this long closes; 0: never
	log    *zap.Logger   // for panics of the connections' goroutines
	// pingAfter and pingTimeout: h2PingAfter and h2PingTimeout when the
	// pool was made.
	pingAfter, pingTimeout time.Duration

	mu      sync.Mutex
	conns   []*clientConn
	dialing *dialCall
	retired bool

	// lim bounds the pool's connections; see poolWait.
	lim     Limits
	waiters atomic.Int32  // requests waiting for a stream or a connection slot
	room    chan struct{} // a stream ended while requests waited; cap 1
}

type dialCall struct {
	done chan struct{}
	err  error
}

// NewPool returns a pool whose dials, and waits for a connection slot,
// time out after connect, whose connections idle longer than idle close
// (0: no limit), and whose connections count against lim (nil: no
// limits). If log is nil, nothing is logged.
func NewPool(connect, idle time.Duration, lim Limits, log *zap.Logger) *Pool {
	if log == nil {
		log = zap.NewNop()
	}
	if lim == nil {
		lim = noLimits{}
	}
	return &Pool{dialer: net.Dialer{Timeout: connect, KeepAlive: 30 * time.Second}, idle: idle,
		log: log, pingAfter: h2PingAfter, pingTimeout: h2PingTimeout, room: make(chan struct{}, 1),
		lim: lim}
}

// SetPing sets how long a connection to the node may stay silent before
// it is pinged (after), and how long the ping may go unanswered before the
// connection closes, failing its streams (timeout). Zero keeps the
// default: 30 s and 10 s. Call it before the pool's first RoundTrip.
func (p *Pool) SetPing(after, timeout time.Duration) {
	if after > 0 {
		p.pingAfter = after
	}
	if timeout > 0 {
		p.pingTimeout = timeout
	}
}

// Limits bounds the connections a Pool opens to its node, as h1.Limits
// bounds an h1.Pool's; the proxy's per-node limits implement both.
// Its methods are safe for concurrent use.
type Limits interface {
	// TryConn takes a connection slot if one is free. It does not block.
	TryConn() bool
	// EndConn gives back a slot taken. It does not block.
	EndConn()
	// Attach makes c's Close give back the slot its dial took. It does
	// not block.
	Attach(c net.Conn)
	// StartPending counts a request waiting for a connection, or fails,
	// counting nothing, when too many wait. It does not block.
	StartPending() error
	// EndPending stops counting a request StartPending counted.
	EndPending()
	// Reclaim closes an idle connection of the node's pools, if there is
	// one, so that its slot comes free. It does not block.
	Reclaim()
	// WaitSlot waits for a connection slot (slot true), a value on room
	// or timeout, or ctx's end. It fails, at timeout or ctx's end, with an
	// error of the limits' own, never one of the node's.
	WaitSlot(ctx context.Context, room <-chan struct{}, timeout <-chan time.Time) (slot bool, err error)
}

// noLimits is the Limits of a pool given none: every slot is free.
type noLimits struct{}

func (noLimits) TryConn() bool       { return true }
func (noLimits) EndConn()            {}
func (noLimits) Attach(net.Conn)     {}
func (noLimits) StartPending() error { return nil }
func (noLimits) EndPending()         {}
func (noLimits) Reclaim()            {}
func (noLimits) WaitSlot(context.Context, <-chan struct{}, <-chan time.Time) (bool, error) {
	return true, nil
}

// RoundTrip sends req on a connection to req.URL.Host and returns the
// response once its header arrives. It blocks, for a connection slot at
// the limits and for the answer's header, until req's context ends.
func (p *Pool) RoundTrip(req *http.Request) (*http.Response, error) {
	for attempt := 0; ; attempt++ {
		cc, err := p.conn(req.Context(), req.URL.Host)
		if err != nil {
			return nil, err
		}
		resp, err := cc.roundTrip(req)
		if errors.Is(err, errConnUnusable) && attempt < 3 {
			continue // it went away between reserving and sending
		}
		return resp, err
	}
}

// conn returns a connection with a stream reserved on it. At
// max_connections it waits as a pending request (see poolWait).
func (p *Pool) conn(ctx context.Context, addr string) (*clientConn, error) {
	var w poolWait
	defer w.end(p)
	for {
		p.mu.Lock()
		for _, cc := range p.conns {
			if cc.reserve() {
				p.mu.Unlock()
				return cc, nil
			}
		}
		d := p.dialing
		if d == nil {
			if !w.slot && !p.lim.TryConn() {
				p.mu.Unlock()
				if err := w.wait(ctx, p); err != nil {
					return nil, err
				}
				continue
			}
			w.slot = false // the dial's now
			d = &dialCall{done: make(chan struct{})}
			p.dialing = d
			p.mu.Unlock()
			cc, err := p.dial(addr)
			p.mu.Lock()
			p.dialing = nil
			d.err = err
			// The dialler's stream goes first, even on a retired pool: a
			// request that reached the pool as it retired is served, and
			// its connection closes once it is done.
			mine := err == nil && cc.reserve()
			if err == nil {
				p.conns = append(p.conns, cc)
				if p.retired {
					cc.retire()
				}
			}
			close(d.done)
			p.mu.Unlock()
			if err != nil {
				return nil, err
			}
			if mine {
				return cc, nil
			}
			continue
		}
		p.mu.Unlock()
		select {
		case <-d.done:
			if d.err != nil {
				return nil, d.err
			}
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	}
}

// dial connects to addr on a connection slot taken, which it gives back
// if the dial fails.
func (p *Pool) dial(addr string) (*clientConn, error) {
	nc, err := p.dialer.Dial("tcp", addr)
	if err != nil {
		p.lim.EndConn()
		return nil, err
	}
	nc = rawio.Wrap(nc)
	p.lim.Attach(nc)
	return p.start(nc), nil
}

// start speaks h2c over nc, a new connection to a node: it sends the
// preface and the sidecar's settings, and starts the connection's timers,
// writer and read loop.
func (p *Pool) start(nc net.Conn) *clientConn {
	cc := &clientConn{
		conn:    newConn(nc, p.log),
		pool:    p,
		streams: make(map[uint32]*clientStream),
		nextID:  1,
	}
	cc.mu.Lock()
	cc.out = append(cc.out, http2.ClientPreface...)
	cc.writeSettingsLocked(
		http2.Setting{ID: http2.SettingEnablePush, Val: 0},
		http2.Setting{ID: http2.SettingInitialWindowSize, Val: h2StreamWindow},
		http2.Setting{ID: http2.SettingMaxHeaderListSize, Val: h2MaxHeaderList},
	)
	cc.writeWindowUpdateLocked(0, h2ConnWindow-h2InitialWindow)
	cc.flushLocked()
	cc.idle = newIdleTimer(p.idle, cc.closeIfIdle)
	cc.health = time.AfterFunc(p.pingAfter, cc.checkHealth)
	cc.mu.Unlock()
	go cc.writeLoop()
	go cc.readLoop()
	return cc
}

// A connection to a node that has sent nothing for h2PingAfter is pinged,
// and closed when nothing comes back within h2PingTimeout: its streams fail
// (and may be retried) instead of waiting on a node that is gone without a
// word, as a vanished host or a silent network partition leaves it.
var (
	h2PingAfter   = 30 * time.Second
	h2PingTimeout = 10 * time.Second
)

// checkHealth runs on the connection's health timer. A panic ends the
// connection, not the process.
func (cc *clientConn) checkHealth() {
	defer cc.recoverPanic()
	if cc.pingUnanswered() {
		cc.fail(errH2PingTimeout)
	}
}

// pingUnanswered reports whether the ping sent at the last check went
// unanswered: the node has sent nothing since. If nothing came since the
// last check and no ping is out, it sends one.
func (cc *clientConn) pingUnanswered() bool {
	read := cc.framesRead.Load()
	cc.mu.Lock()
	defer cc.mu.Unlock()
	switch {
	case cc.err != nil:
	case read != cc.lastSeen:
		// Frames came since the last check: alive.
		cc.lastSeen, cc.pinged = read, false
		cc.health.Reset(cc.pool.pingAfter)
	case !cc.pinged:
		cc.pinged = true
		cc.writePingLocked(false, [8]byte{'s', 'i', 'd', 'e', 'c', 'a', 'r'})
		cc.flushLocked()
		cc.health.Reset(cc.pool.pingTimeout)
	default:
		return true
	}
	return false
}

var errH2PingTimeout = errors.New("http2: node did not answer a ping")

func (p *Pool) remove(cc *clientConn) {
	p.mu.Lock()
	defer p.mu.Unlock()
	for i, x := range p.conns {
		if x == cc {
			p.conns = append(p.conns[:i], p.conns[i+1:]...)
			return
		}
	}
}

// Load counts the pool's connections and the streams open or reserved on
// them. It does not block on them.
func (p *Pool) Load() (conns, streams int) {
	p.mu.Lock()
	ccs := append([]*clientConn(nil), p.conns...)
	p.mu.Unlock()
	for _, cc := range ccs {
		cc.mu.Lock()
		streams += len(cc.streams) + cc.reserved
		cc.mu.Unlock()
	}
	return len(ccs), streams
}

// CloseIdle closes the connections with no stream open. It does not block.
func (p *Pool) CloseIdle() {
	p.mu.Lock()
	conns := append([]*clientConn(nil), p.conns...)
	p.mu.Unlock()
	for _, cc := range conns {
		cc.closeIfIdle()
	}
}

// Retire stops new streams on the pool's connections; each closes once its
// last stream ends. It does not block.
func (p *Pool) Retire() {
	p.mu.Lock()
	p.retired = true
	conns := append([]*clientConn(nil), p.conns...)
	p.mu.Unlock()
	for _, cc := range conns {
		cc.retire()
	}
}

// clientConn is one h2c connection to a node.
type clientConn struct {
	*conn
	pool *Pool

	// Under mu:
	streams  map[uint32]*clientStream
	nextID   uint32
	reserved int
	goAway   bool // the node sent GOAWAY, or the sidecar did: no new streams
	retired  bool // the pool retired it: no new reservations, reserved streams go on
	idle     idleTimer
	health   *time.Timer // pings a silent node
	lastSeen int64       // framesRead at the last health check
	pinged   bool        // a ping is out, unanswered

	framesRead atomic.Int64 // by the read loop
}

// reserve claims room for one stream, if the connection takes new ones.
func (cc *clientConn) reserve() bool {
	cc.mu.Lock()
	defer cc.mu.Unlock()
	if cc.err != nil || cc.goAway || cc.retired || cc.closing || cc.nextID >= 1<<31-1 ||
		uint32(len(cc.streams)+cc.reserved) >= cc.peerMaxStreams {
		return false
	}
	cc.reserved++
	return true
}

func (cc *clientConn) retire() {
	cc.mu.Lock()
	cc.retired = true
	idle := len(cc.streams) == 0 && cc.reserved == 0
	cc.mu.Unlock()
	if idle {
		cc.closeAfterFlush()
	}
}

// closeIfIdle closes the connection if no stream is open or reserved. It
// runs on the connection's idle timer, among others; a panic ends the
// connection, not the process.
func (cc *clientConn) closeIfIdle() {
	defer cc.recoverPanic()
	if cc.goAwayIfIdle() {
		cc.closeAfterFlush()
	}
}

// goAwayIfIdle sends GOAWAY and reports true if no stream is open or
// reserved.
func (cc *clientConn) goAwayIfIdle() bool {
	cc.mu.Lock()
	defer cc.mu.Unlock()
	if len(cc.streams) > 0 || cc.reserved > 0 {
		return false
	}
	cc.goAway = true
	cc.writeGoAwayLocked(0, http2.ErrCodeNo)
	return true
}

// clientStream is one request to a node and its response.
type clientStream struct {
	cc   *clientConn
	id   uint32
	req  *http.Request
	resp *http.Response
	body recvBuf

	headers chan struct{} // closed when the response header or an error came

	// Under cc.mu:
	err      error // why the stream failed, before or after the header
	gotResp  bool
	sendWin  outflow
	sendDone bool // END_STREAM or RST sent
	recvDone bool // END_STREAM received, or reset
	trailer  http.Header
}

// roundTrip opens a stream on the reserved room for req and waits for the
// response header.
func (cc *clientConn) roundTrip(req *http.Request) (*http.Response, error) {
	ctx := req.Context()
	hasBody := req.Body != nil && req.Body != http.NoBody && req.ContentLength != 0
	cs := &clientStream{cc: cc, req: req, headers: make(chan struct{})}

	cc.mu.Lock()
	cc.reserved--
	if cc.err != nil || cc.goAway || cc.closing {
		idle := len(cc.streams) == 0 && cc.reserved == 0 && (cc.goAway || cc.retired)
		cc.mu.Unlock()
		if idle {
			cc.closeAfterFlush()
		}
		return nil, errConnUnusable
	}
	if err := ctx.Err(); err != nil {
		// The app gave up before the stream opened, an app resetting its
		// stream at once say: the node never hears of it.
		idle, retired := len(cc.streams) == 0 && cc.reserved == 0, cc.retired
		if idle && !retired {
			cc.idle.reset()
		}
		cc.mu.Unlock()
		if idle && retired {
			cc.closeAfterFlush()
		}
		return nil, err
	}
	cs.id = cc.nextID
	cc.nextID += 2
	cs.sendWin = outflow(cc.peerInitWin)
	cs.body.init(cc.conn, cs.id)
	cc.streams[cs.id] = cs
	cc.idle.stop()
	if err := cc.encodeRequestLocked(req); err != nil {
		delete(cc.streams, cs.id)
		cc.mu.Unlock()
		return nil, err
	}
	cc.writeHeaderBlockLocked(cs.id, !hasBody)
	cs.sendDone = !hasBody
	cc.flushLocked()
	cc.mu.Unlock()

	if hasBody {
		cs.sendBody()
	}
	select {
	case <-cs.headers:
	case <-ctx.Done():
		cs.abort(ctx.Err())
		<-cs.headers
	}
	cc.mu.Lock()
	err := cs.err
	cc.mu.Unlock()
	if err != nil {
		return nil, err
	}
	return cs.resp, nil
}

// encodeRequestLocked encodes req's header block into cc.encBuf.
func (cc *clientConn) encodeRequestLocked(req *http.Request) error {
	host := req.Host
	if host == "" {
		host = req.URL.Host
	}
	path := req.URL.RequestURI()
	if !validH2Value(host) || !validH2Value(path) {
		return fmt.Errorf("http2: invalid request host or path %q %q", host, path)
	}
	scheme := req.URL.Scheme
	if scheme == "" {
		scheme = "http"
	}
	cc.encodeLocked(":method", req.Method)
	cc.encodeLocked(":scheme", scheme)
	cc.encodeLocked(":authority", host)
	cc.encodeLocked(":path", path)
	for k, vv := range req.Header {
		if !h2FieldAllowed(k) {
			if k == "Te" && len(vv) == 1 && vv[0] == "trailers" {
				cc.encodeLocked("te", "trailers")
			}
			continue
		}
		name := httpwire.LowerKey(k)
		if name == "user-agent" && len(vv) == 1 && vv[0] == "" {
			continue
		}
		for _, v := range vv {
			cc.encodeLocked(name, v)
		}
	}
	if len(req.Trailer) > 0 && len(req.Header["Trailer"]) == 0 {
		// Declared, or the node drops them (RFC 9110, 6.6.2).
		keys := make([]string, 0, len(req.Trailer))
		for k := range req.Trailer {
			if h2FieldAllowed(k) {
				keys = append(keys, httpwire.LowerKey(k))
			}
		}
		if len(keys) > 0 {
			cc.encodeLocked("trailer", strings.Join(keys, ","))
		}
	}
	if req.ContentLength > 0 && req.Header.Get("Content-Length") == "" {
		cc.encodeLocked("content-length", strconv.FormatInt(req.ContentLength, 10))
	}
	return nil
}

func validH2Value(s string) bool {
	for i := 0; i < len(s); i++ {
		if c := s[i]; c < ' ' || c == 0x7f {
			return false
		}
	}
	return true
}

// sendBody sends the request body: what is at hand at once (all of a small
// unary call, as a rule), the rest from a goroutine of its own, so the
// response can be read while the app still sends. The goroutine may outlive
// the stream, waiting for the app's next bytes after the node has answered
// or the stream failed: a retry's try then owns the body, and the bytes
// the goroutine's read brings go to that try (see body).
func (cs *clientStream) sendBody() {
	if br, ok := cs.req.Body.(*replay.Reader); ok && !cs.writeBody(br, true) {
		return
	}
	go cs.writeRest()
}

// writeRest is writeBody on a goroutine of its own. A panic, in the body's
// Read say, ends the stream as a failed read would.
func (cs *clientStream) writeRest() {
	defer func() {
		if v := recover(); v != nil {
			cs.cc.logPanic("http2 request body panicked", v)
			cs.abort(errH2Panicked)
		}
	}()
	cs.writeBody(cs.req.Body, false)
}

// writeBody sends the request body as DATA frames, ending the stream with
// the last, and with trailers when the request has some. With atHand, it
// sends only what body has without waiting, and only while the node's
// windows have room for it, and reports whether more is to come: the
// caller must not wait on a node that may wait for its answer to be read.
func (cs *clientStream) writeBody(body io.Reader, atHand bool) (more bool) {
	bp := h2BufPool.Get().(*[]byte)
	defer h2BufPool.Put(bp)
	buf := *bp
	cc := cs.cc
	ctx := cs.req.Context()
	for {
		var n int
		var rerr error
		if atHand {
			var ok bool
			if !cs.canSend(len(buf)) {
				return true
			}
			if n, rerr, ok = body.(*replay.Reader).TryRead(buf); !ok {
				return true
			}
		} else {
			n, rerr = body.Read(buf)
		}
		end := rerr == io.EOF && len(cs.req.Trailer) == 0
		if n > 0 || end {
			if err := cc.sendData(ctx, cs.id, &cs.sendWin, buf[:n], end, cs.sendAborted); err != nil {
				cs.abort(err)
				return false
			}
		}
		if rerr == io.EOF {
			cs.endBody()
			return false
		}
		if rerr == replay.ErrStaleTry {
			// A later try owns the body; this stream is over already.
			cs.abort(rerr)
			return false
		}
		if rerr != nil {
			cs.abort(fmt.Errorf("%w: %w", httpwire.ErrBadRequestBody, rerr))
			return false
		}
	}
}

// endBody ends the request's side of the stream once its body is sent:
// with its trailers, when it has some, which carry END_STREAM. The
// connection's lock is released even if encoding them panics, so that the
// panic's recovery (writeRest's) can reset the stream.
func (cs *clientStream) endBody() {
	cc := cs.cc
	cc.mu.Lock()
	defer cc.mu.Unlock()
	if len(cs.req.Trailer) > 0 && !cs.sendDone && cc.err == nil {
		for k, vv := range cs.req.Trailer {
			cc.encodeHeaderLocked(k, vv)
		}
		cc.writeHeaderBlockLocked(cs.id, true)
		cc.flushLocked()
	}
	cs.sendDone = true
	cs.closeIfDoneLocked()
}

// canSend reports whether n bytes can go out on the stream at once, within
// the node's windows and the writer's room.
func (cs *clientStream) canSend(n int) bool {
	cc := cs.cc
	cc.mu.Lock()
	defer cc.mu.Unlock()
	return int64(n) <= min(cc.sendWin.available(), cs.sendWin.available()) && len(cc.out) < h2MaxOutBuffer
}

var h2BufPool = sync.Pool{New: func() any { b := make([]byte, h2DefaultFrame); return &b }}

// sendAborted reports why the request body must stop. cc.mu is held.
func (cs *clientStream) sendAborted() error {
	if cs.sendDone {
		return errH2RespClosed
	}
	return cs.err
}

// abort resets the stream: the node is told to stop and the response, or
// its body, fails with err.
func (cs *clientStream) abort(err error) {
	cc := cs.cc
	cc.mu.Lock()
	defer cc.mu.Unlock()
	if cs.sendDone && cs.recvDone {
		return
	}
	if cc.err == nil {
		cc.writeRSTLocked(cs.id, http2.ErrCodeCancel)
		cc.flushLocked()
	}
	cs.failLocked(err)
}

// failLocked ends the stream with err on both sides. cc.mu is held.
func (cs *clientStream) failLocked(err error) {
	if cs.err == nil {
		cs.err = err
	}
	if !cs.gotResp {
		cs.gotResp = true
		close(cs.headers)
	}
	cs.body.closeLocked(err)
	cs.sendDone, cs.recvDone = true, true
	cs.cc.cond.Broadcast()
	cs.closeIfDoneLocked()
}

// closeIfDoneLocked forgets the stream once both sides are done.
func (cs *clientStream) closeIfDoneLocked() {
	cc := cs.cc
	if !cs.sendDone || !cs.recvDone || cc.streams[cs.id] != cs {
		return
	}
	delete(cc.streams, cs.id)
	cc.pool.roomFreed()
	if len(cc.streams) == 0 && cc.reserved == 0 && cc.err == nil {
		if cc.goAway || cc.retired {
			cc.closing = true
			cc.flushLocked()
		} else {
			cc.idle.reset()
		}
	}
}

// clientBody is a response body as the proxy reads it.
type clientBody struct{ cs *clientStream }

func (b clientBody) Read(p []byte) (int, error) {
	cs := b.cs
	ctx := cs.req.Context()
	n, err := cs.body.read(p, ctx.Done())
	switch err {
	case io.EOF:
		cs.cc.mu.Lock()
		trailer := cs.trailer
		cs.trailer = nil
		cs.cc.mu.Unlock()
		if cs.resp.Trailer == nil {
			cs.resp.Trailer = trailer
		} else {
			for k, vv := range trailer {
				cs.resp.Trailer[k] = vv
			}
		}
	case errWaitDone:
		err = ctx.Err()
		cs.abort(err)
	}
	return n, err
}

// Close resets the stream unless the response was read to its end.
func (b clientBody) Close() error {
	b.cs.abort(errH2RespClosed)
	return nil
}

func (cc *clientConn) readLoop() {
	err := cc.readFrames()
	cc.mu.Lock()
	if cc.err != nil && cc.err != errH2ConnClosed {
		// The first cause, such as an unanswered ping; but not the writer
		// closing after the GOAWAY of a connection error the read loop
		// found, which is the cause.
		err = cc.err
	}
	closing := cc.closing && cc.err == nil
	cc.mu.Unlock()
	if closing {
		cc.closed(time.Second) // let the GOAWAY out
	}
	cc.fail(err)
	cc.pool.remove(cc)
	cc.mu.Lock()
	cc.idle.stop()
	cc.health.Stop()
	for _, cs := range cc.streams {
		cs.failLocked(fmt.Errorf("http2: connection to node lost: %w", err))
	}
	cc.mu.Unlock()
}

// readFrames reads and handles frames until the connection ends. A panic
// ends the connection as a failed read would.
func (cc *clientConn) readFrames() (err error) {
	defer func() {
		if v := recover(); v != nil {
			cc.logPanic("http2 connection panicked", v)
			err = errH2Panicked
		}
	}()
	for {
		f, err := cc.readFrame()
		cc.framesRead.Add(1)
		if err != nil {
			var se http2.StreamError
			if errors.As(err, &se) {
				cc.mu.Lock()
				cs := cc.streams[se.StreamID]
				if cs != nil {
					cc.writeRSTLocked(se.StreamID, se.Code)
					cc.flushLocked()
					cs.failLocked(err)
				}
				idle := cs == nil && cc.idleLocked(se.StreamID)
				cc.mu.Unlock()
				if !idle {
					continue
				}
				// A malformed frame, such as a WINDOW_UPDATE of 0, on a
				// stream the sidecar never opened is still a frame on an
				// idle stream.
				err = http2.ConnectionError(http2.ErrCodeProtocol)
			}
			var ce http2.ConnectionError
			if errors.As(err, &ce) {
				cc.mu.Lock()
				cc.writeGoAwayLocked(0, http2.ErrCode(ce))
				cc.mu.Unlock()
				cc.closeAfterFlush()
			}
			return err
		}
		if err := cc.handle(f); err != nil {
			code, _ := connErrorCode(err) // PROTOCOL_ERROR if not one
			cc.mu.Lock()
			cc.writeGoAwayLocked(0, code)
			cc.mu.Unlock()
			cc.closeAfterFlush()
			return err
		}
	}
}

// handle applies one frame from the node, by its type, under cc.mu: one
// method per frame type, as x/net's transport reads them.
func (cc *clientConn) handle(f http2.Frame) error {
	cc.mu.Lock()
	defer cc.mu.Unlock()
	switch f := f.(type) {
	case *http2.MetaHeadersFrame:
		return cc.processHeaders(f)
	case *http2.DataFrame:
		return cc.processData(f)
	case *http2.RSTStreamFrame:
		return cc.processRSTStream(f)
	case *http2.WindowUpdateFrame:
		return cc.processWindowUpdate(f)
	case *http2.SettingsFrame:
		return cc.processSettings(f)
	case *http2.PingFrame:
		return cc.processPing(f)
	case *http2.GoAwayFrame:
		return cc.processGoAway(f)
	case *http2.PushPromiseFrame:
		return http2.ConnectionError(http2.ErrCodeProtocol)
	}
	return nil
}

// processHeaders handles the response head, or trailers, of a stream.
// cc.mu is held.
func (cc *clientConn) processHeaders(f *http2.MetaHeadersFrame) error {
	cs := cc.streams[f.StreamID]
	if cs == nil && cc.idleLocked(f.StreamID) {
		// The node opened a stream: push is off, so it may not.
		return http2.ConnectionError(http2.ErrCodeProtocol)
	}
	if cs == nil || cs.recvDone {
		return nil // reset by the sidecar; what follows is dropped
	}
	if !cs.gotResp {
		return cs.onResponseLocked(f)
	}
	if !f.StreamEnded() {
		cc.writeRSTLocked(cs.id, http2.ErrCodeProtocol)
		cc.flushLocked()
		cs.failLocked(errors.New("http2: trailers without END_STREAM"))
		return nil
	}
	if cs.trailer == nil {
		if fields := f.RegularFields(); len(fields) > 0 {
			cs.trailer = cc.header(fields, false)
		}
	} else {
		for _, hf := range f.RegularFields() {
			k := httpwire.CanonicalKey(hf.Name)
			cs.trailer[k] = append(cs.trailer[k], hf.Value)
		}
	}
	cs.endRecvLocked()
	return nil
}

// processData handles a piece of a response body. cc.mu is held.
func (cc *clientConn) processData(f *http2.DataFrame) error {
	data, err := cc.receivedLocked(f)
	if err != nil {
		return err
	}
	cs := cc.streams[f.StreamID]
	if cs == nil || cs.recvDone || !cs.gotResp {
		cc.consumedLocked(len(data))
		if cs == nil && cc.idleLocked(f.StreamID) {
			return http2.ConnectionError(http2.ErrCodeProtocol)
		}
		return nil
	}
	if !cs.body.putLocked(data) {
		cc.writeRSTLocked(cs.id, http2.ErrCodeFlowControl)
		cc.flushLocked()
		cs.failLocked(errors.New("http2: node overran the stream window"))
		return nil
	}
	if f.StreamEnded() {
		cs.endRecvLocked()
	}
	return nil
}

// processRSTStream handles the node resetting a stream. cc.mu is held.
func (cc *clientConn) processRSTStream(f *http2.RSTStreamFrame) error {
	cs := cc.streams[f.StreamID]
	if cs == nil {
		if cc.idleLocked(f.StreamID) {
			return http2.ConnectionError(http2.ErrCodeProtocol)
		}
		return nil
	}
	var err error = streamError{f.ErrCode}
	switch {
	case f.ErrCode == http2.ErrCodeRefusedStream:
		err = ErrRefusedStream
	case f.ErrCode == http2.ErrCodeNo && cs.recvDone:
		// The answer is complete: the node needs no more of the body.
		cs.sendDone = true
		cc.cond.Broadcast()
		cs.closeIfDoneLocked()
		return nil
	}
	cs.sendDone = true // no RST back
	cs.failLocked(err)
	return nil
}

// processWindowUpdate handles more send window, for the connection or a
// stream. cc.mu is held.
func (cc *clientConn) processWindowUpdate(f *http2.WindowUpdateFrame) error {
	if f.StreamID == 0 {
		if !cc.sendWin.add(int64(f.Increment)) {
			return http2.ConnectionError(http2.ErrCodeFlowControl)
		}
	} else if cs := cc.streams[f.StreamID]; cs != nil {
		if !cs.sendWin.add(int64(f.Increment)) {
			// A stream error, as the server treats an app's.
			cc.writeRSTLocked(cs.id, http2.ErrCodeFlowControl)
			cc.flushLocked()
			cs.failLocked(errors.New("http2: node overflowed the stream send window"))
		}
	} else if cc.idleLocked(f.StreamID) {
		return http2.ConnectionError(http2.ErrCodeProtocol)
	}
	cc.cond.Broadcast()
	return nil
}

// processSettings handles the node's settings. cc.mu is held.
func (cc *clientConn) processSettings(f *http2.SettingsFrame) error {
	if f.IsAck() {
		return nil
	}
	delta, err := cc.applySettingsLocked(f)
	if err != nil {
		return err
	}
	for _, cs := range cc.streams {
		// As the server does (RFC 9113, section 6.9.2).
		if !cs.sendWin.add(delta) {
			return http2.ConnectionError(http2.ErrCodeFlowControl)
		}
	}
	return nil
}

// processPing handles a ping, answered. cc.mu is held.
func (cc *clientConn) processPing(f *http2.PingFrame) error {
	if !f.IsAck() {
		cc.writePingLocked(true, f.Data)
		cc.flushLocked()
	}
	return nil
}

// processGoAway handles the node going away: streams past its last are
// refused, to be retried elsewhere. cc.mu is held.
func (cc *clientConn) processGoAway(f *http2.GoAwayFrame) error {
	cc.goAway = true
	for id, cs := range cc.streams {
		if id > f.LastStreamID {
			cs.sendDone = true
			cs.failLocked(ErrRefusedStream)
		}
	}
	if len(cc.streams) == 0 && cc.reserved == 0 {
		cc.closing = true
		cc.flushLocked()
	}
	return nil
}

// idleLocked reports whether stream id is idle (RFC 9113, 5.1): one the
// sidecar has not opened yet, or an even one, which only the node could open
// and, push being off, never does. Any frame but PRIORITY on an idle stream
// is a connection error, HEADERS too, since a node answers only on streams
// the sidecar opened; on a closed one, a frame still in flight when the
// stream ended is not. cc.mu is held.
func (cc *clientConn) idleLocked(id uint32) bool {
	return id%2 == 0 || id >= cc.nextID
}

// onResponseLocked turns a response HEADERS frame into cs.resp.
func (cs *clientStream) onResponseLocked(f *http2.MetaHeadersFrame) error {
	cc := cs.cc
	code, err := strconv.Atoi(f.PseudoValue("status"))
	if err != nil || code < 100 || code > 999 {
		cc.writeRSTLocked(cs.id, http2.ErrCodeProtocol)
		cc.flushLocked()
		cs.failLocked(errors.New("http2: malformed response status"))
		return nil
	}
	if code < 200 {
		if f.StreamEnded() || code == http.StatusSwitchingProtocols {
			cc.writeRSTLocked(cs.id, http2.ErrCodeProtocol)
			cc.flushLocked()
			cs.failLocked(errors.New("http2: malformed informational response"))
		}
		return nil // 100 Continue and the like: the final answer follows
	}
	header := cc.header(f.RegularFields(), false)
	resp := &http.Response{
		Status:        httpwire.StatusLine(code),
		StatusCode:    code,
		Proto:         "HTTP/2.0",
		ProtoMajor:    2,
		Header:        header,
		ContentLength: -1,
		Request:       cs.req,
	}
	if v := header.Get("Content-Length"); v != "" {
		if n, err := strconv.ParseInt(v, 10, 64); err == nil && n >= 0 {
			resp.ContentLength = n
		}
	}
	httpwire.DeclaredTrailers(header, func(k string) {
		if resp.Trailer == nil {
			resp.Trailer = make(http.Header)
		}
		resp.Trailer[k] = nil
	})
	resp.Body = clientBody{cs}
	if f.StreamEnded() {
		if resp.ContentLength < 0 {
			resp.ContentLength = 0
		}
		cs.endRecvLocked()
	}
	cs.resp = resp
	cs.gotResp = true
	close(cs.headers)
	return nil
}

// endRecvLocked marks the response complete.
func (cs *clientStream) endRecvLocked() {
	cs.recvDone = true
	cs.body.closeLocked(nil)
	cs.closeIfDoneLocked()
}

// poolWait is a request waiting, at max_connections, for room on one of a
// Pool's connections (a stream ending) or a connection slot, as a
// pending request bounded by the connect timeout. Its zero value has not
// waited.
type poolWait struct {
	started bool
	slot    bool // a slot taken, for the next dial
	timer   *time.Timer
}

// wait counts the request pending the first time, and returns at once so
// that the caller looks at its connections again, room signals reaching
// it from then on; later, it waits for a signal or a slot. It fails with
// ErrLocalLimit.
func (w *poolWait) wait(ctx context.Context, p *Pool) error {
	l := p.lim
	if !w.started {
		if err := l.StartPending(); err != nil {
			return err
		}
		w.started = true
		p.waiters.Add(1)
		l.Reclaim()
		w.timer = time.NewTimer(p.dialer.Timeout)
		return nil
	}
	slot, err := l.WaitSlot(ctx, p.room, w.timer.C)
	w.slot = slot
	return err
}

// end stops the wait, if any: a slot taken and not used is given back, and
// a room signal is passed on to the next waiter, since this one may have
// taken the last.
func (w *poolWait) end(p *Pool) {
	if !w.started {
		return
	}
	if w.slot {
		p.lim.EndConn()
	}
	w.timer.Stop()
	p.lim.EndPending()
	if p.waiters.Add(-1) > 0 {
		p.signalRoom()
	}
}

// roomFreed tells the requests waiting for a stream, if any, that one
// ended. It does not block.
func (p *Pool) roomFreed() {
	if p.waiters.Load() > 0 {
		p.signalRoom()
	}
}

func (p *Pool) signalRoom() {
	select {
	case p.room <- struct{}{}:
	default:
	}
}
