package proxy

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"sync"
	"sync/atomic"
	"time"

	"github.com/sony/gobreaker/v2"
	"go.uber.org/zap"

	"github.com/sidecarlb/sidecar/balancer"
	"github.com/sidecarlb/sidecar/internal/backoff"
	"github.com/sidecarlb/sidecar/proxy/resilience"
)

// maxReplayBody is the largest request body kept in memory so it can be
// sent again on a retry. Larger or unsized bodies stream, and are retried
// only when no byte of them was read.
const maxReplayBody = 64 << 10

var (
	// errGateway marks a response that counts as a gateway failure (502,
	// 503, 504) for outlier ejection and latency-aware balancing.
	errGateway = errors.New("gateway failure")
	// ErrBreakerOpen: every node the request could go to has an open
	// circuit breaker.
	ErrBreakerOpen = resilience.ErrBreakerOpen
)

// health is the resilience state of one endpoint within a route.
type health struct {
	breaker *resilience.Breaker // nil when disabled
	outlier resilience.Outlier
}

func (h *health) ejected(now time.Time) bool { return h.outlier.Ejected(now) }

// newBreaker returns the endpoint's breaker, reporting its transitions.
func (rt *route) newBreaker(ep string) *resilience.Breaker {
	if !rt.cfg.Resilience.Breaker.Enabled {
		return nil
	}
	gauge := rt.metrics.breakerState.WithLabelValues(ep)
	gauge.Set(0)
	return resilience.NewBreaker(ep, rt.cfg.Resilience.Breaker, func(from, to gobreaker.State) {
		gauge.Set(float64(to))
		rt.metrics.breakerTransitions.WithLabelValues(ep, to.String()).Inc()
		rt.log.Info("breaker state changed", zap.String("endpoint", ep),
			zap.String("from", from.String()), zap.String("to", to.String()))
	})
}

// allow asks e's breaker for a try. The returned func reports its outcome.
func (e *endpoint) allow() (func(error), error) { return e.breaker.Allow() }

func noopDone(error) {}

// refuseTry ends a try on e that a local limit refused before it reached
// the node: e's breaker counts it neither way (breakerDone, from e.allow),
// outlier detection does not see it, and its pick takes no sample.
func refuseTry(breakerDone func(error), pk balancer.Pick) {
	breakerDone(resilience.ErrRefused)
	release(pk)
}

// reportTry reports the outcome of a try on e, a request's or a
// connection's: to e's breaker (breakerDone, from e.allow), and to outlier
// detection. A success for both ends both runs of consecutive failures.
func (rt *route) reportTry(e *endpoint, breakerDone func(error), breakerFailure, gatewayFailure bool) {
	if breakerFailure {
		breakerDone(resilience.ErrTripping)
	} else {
		breakerDone(nil)
	}
	if e.outlier.Observe(&rt.cfg.Resilience.Outlier, gatewayFailure) {
		rt.eject(e)
	}
}

// eject takes e out of balancing for base × times ejected (capped), unless
// that would put more than max_ejection_percent of the nodes out. The
// node comes back when the route's clock says the time is up.
func (rt *route) eject(e *endpoint) {
	o := &rt.cfg.Resilience.Outlier
	rt.mu.Lock()
	defer rt.mu.Unlock()
	now := rt.clock.Now()
	st := rt.state.Load()
	if st == nil || e.ejected(now) || st.endpoints[e.ID] != e {
		return
	}
	out := 0
	for _, x := range st.endpoints {
		if x.ejected(now) {
			out++
		}
	}
	if (out+1)*100 > o.MaxEjectionPercent*len(st.endpoints) {
		rt.metrics.ejectionsRefused.Inc()
		return
	}
	d, times := e.outlier.Eject(o, now)
	rt.metrics.ejections.WithLabelValues(e.Addr).Inc()
	rt.log.Info("endpoint ejected", zap.String("endpoint", e.Addr), zap.Duration("for", d), zap.Int32("times", times))
	rt.rebuildLocked(st.snap)
	rt.clock.AfterFunc(d, func() {
		rt.mu.Lock()
		defer rt.mu.Unlock()
		if st := rt.state.Load(); st != nil {
			rt.log.Info("endpoint returned", zap.String("endpoint", e.Addr))
			rt.rebuildLocked(st.snap)
		}
	})
}

// idempotent reports whether a request may be sent twice.
func idempotent(method string) bool {
	switch method {
	case http.MethodGet, http.MethodHead, http.MethodOptions, http.MethodTrace, http.MethodPut, http.MethodDelete:
		return true
	}
	return false
}

// body is a request body as the tries of one request share it. Each try
// reads it through a bodyReader of its own, bound to the try's number; the
// body's owner is the latest try, and only the owner's reader takes bytes
// from src. A try given up on may still have a read of src under way (an
// HTTP/2 stream's body goroutine, a Transport's write loop, waiting for the
// app's next bytes): what that read brings is kept for the owner, so no
// byte of a streamed body is lost between tries.
type body struct {
	src io.ReadCloser
	buf []byte // the whole body, when small enough to replay
	// state is the owner's try number times 2, plus 1 once bytes of src
	// were handed to a try (handed): from then on a streamed body cannot
	// be sent again. One word, so that handing bytes to a try and moving
	// on to the next try cannot cross.
	state  atomic.Uint64
	srcErr atomic.Pointer[error] // a failed read of src, other than EOF

	mu sync.Mutex // held around reads of src
	// stale is what reads of src brought after their try was given up,
	// kept for the owner; nil when none did. Under mu.
	stale *staleRead

	first bodyReader // the first try's reader, spared an allocation

	// trailer is the request's Trailer map, which src fills in, under mu,
	// when it reaches the end of the body; declared is a copy taken before
	// any read. Each try sends a copy of declared of its own, brought up to
	// date when its reader reaches the end: a stale try's read may be
	// filling trailer in while the next try's request is encoded.
	trailer, declared http.Header
}

// staleRead is what reads of src by tries given up brought.
type staleRead struct {
	p []byte
	// err came with p: io.EOF, or src's error. It stays once p is handed
	// out, src not being read after it.
	err error
}

// errStaleTry is what a bodyReader returns once a later try owns the body.
var errStaleTry = errors.New("request body taken over by a later try")

// bodyReader is what one try sends. Close does nothing: the transport
// closes bodies on errors, and a retry may still need the body.
type bodyReader struct {
	b       *body
	try     uint64
	off     int         // in b.buf, when the body is held in memory
	trailer http.Header // the try's copy of the request's trailers, or nil
}

// Read reads the try's body: from memory, or, while the try owns the body,
// what a stale try left, then from src. It may block for the client's
// next bytes; it is not for concurrent use, though readers of different
// tries may read at once.
func (r *bodyReader) Read(p []byte) (int, error) {
	b := r.b
	if b.buf != nil {
		if r.off >= len(b.buf) {
			return 0, io.EOF
		}
		n := copy(p, b.buf[r.off:])
		r.off += n
		return n, nil
	}
	if !b.owns(r.try) {
		return 0, errStaleTry
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	if !b.owns(r.try) {
		return 0, errStaleTry // moved on while this read waited for b.mu
	}
	n, err, ok := b.pendingLocked(r.try, p)
	if !ok {
		n, err = b.src.Read(p)
		n, err = b.gotLocked(r.try, p[:n], err)
	}
	if err == io.EOF {
		r.takeTrailerLocked()
	}
	return n, err
}

// takeTrailerLocked brings the try's trailers up to date at the end of the
// body, from what src read. b.mu is held.
func (r *bodyReader) takeTrailerLocked() {
	for k, vv := range r.b.trailer {
		r.trailer[k] = vv
	}
}

// tryRead reads what is at hand without waiting for the client: ok is
// false when a read would wait, or the source cannot tell. It does not
// wait for a stale try's read of src either.
func (r *bodyReader) tryRead(p []byte) (n int, err error, ok bool) {
	b := r.b
	if b.buf != nil {
		n, err = r.Read(p)
		return n, err, true
	}
	src, can := b.src.(interface {
		tryRead([]byte) (int, error, bool)
	})
	if !can {
		return 0, nil, false
	}
	if !b.owns(r.try) {
		return 0, errStaleTry, true
	}
	if !b.mu.TryLock() {
		return 0, nil, false // a stale try's read is under way
	}
	defer b.mu.Unlock()
	if n, err, ok = b.pendingLocked(r.try, p); !ok {
		if n, err, ok = src.tryRead(p); !ok {
			return 0, nil, false
		}
		n, err = b.gotLocked(r.try, p[:n], err)
	}
	if err == io.EOF {
		r.takeTrailerLocked()
	}
	return n, err, true
}

func (r *bodyReader) Close() error { return nil }

// failed returns the error that broke reading the client's body, or nil.
func (b *body) failed() error {
	if p := b.srcErr.Load(); p != nil {
		return fmt.Errorf("%w: %w", ErrBadRequestBody, *p)
	}
	return nil
}

// owns reports whether try owns the body.
func (b *body) owns(try uint64) bool { return b.state.Load()>>1 == try }

// handed reports whether bytes of src were handed to a try.
func (b *body) handed() bool { return b.state.Load()&1 != 0 }

// hand marks bytes of src handed to try, reporting false, marking nothing,
// when try no longer owns the body.
func (b *body) hand(try uint64) bool {
	for {
		s := b.state.Load()
		if s>>1 != try {
			return false
		}
		if s&1 != 0 || b.state.CompareAndSwap(s, s|1) {
			return true
		}
	}
}

// pendingLocked hands try what stale tries' reads left, if anything: ok is
// false when there is nothing, and src is to be read. b.mu is held.
func (b *body) pendingLocked(try uint64, p []byte) (n int, err error, ok bool) {
	st := b.stale
	switch {
	case st == nil:
		return 0, nil, false
	case len(st.p) == 0:
		return 0, st.err, true
	case !b.hand(try):
		return 0, errStaleTry, true
	}
	n = copy(p, st.p)
	st.p = st.p[n:]
	if len(st.p) == 0 && st.err == nil {
		b.stale = nil
	}
	return n, nil, true
}

// gotLocked takes the outcome of try's read of src, p and err: passed on
// while try owns the body, kept for the owner when try lost it while the
// read waited. b.mu is held.
func (b *body) gotLocked(try uint64, p []byte, err error) (int, error) {
	if err != nil && err != io.EOF {
		e := err // a copy, so that err itself stays off the heap
		b.srcErr.Store(&e)
	}
	switch {
	case len(p) == 0 && (err == nil || b.owns(try)):
		return 0, err
	case len(p) > 0 && b.hand(try):
		return len(p), err
	}
	if b.stale == nil {
		b.stale = new(staleRead)
	}
	b.stale.p = append(b.stale.p, p...)
	if err != nil {
		b.stale.err = err
	}
	return 0, errStaleTry
}

// newBody prepares r's body for tries: read into memory when it is small,
// known in size, and the request may be replayed after reaching a node.
func newBody(r *http.Request, replayable bool) (*body, error) {
	b := &body{src: r.Body}
	if r.Trailer != nil {
		b.trailer, b.declared = r.Trailer, r.Trailer.Clone()
	}
	if replayable && r.ContentLength > 0 && r.ContentLength <= maxReplayBody {
		b.buf = make([]byte, r.ContentLength)
		if _, err := io.ReadFull(r.Body, b.buf); err != nil {
			return nil, fmt.Errorf("%w: %w", ErrBadRequestBody, err)
		}
	}
	return b, nil
}

// next returns the body for the next try, which owns it from then on, or
// false when the body cannot be sent again: bytes of a streamed body were
// handed to a try. It is for the retry loop alone, between tries.
func (b *body) next() (io.ReadCloser, bool) {
	var try uint64
	for {
		s := b.state.Load()
		if b.buf == nil && s&1 != 0 {
			return nil, false
		}
		if b.state.CompareAndSwap(s, s+2) {
			try = s>>1 + 1
			break
		}
	}
	r := &b.first
	if try > 1 {
		r = new(bodyReader) // an earlier try may still be reading its own
	}
	*r = bodyReader{b: b, try: try}
	if b.declared != nil {
		r.trailer = b.declared.Clone()
	}
	return r, true
}

// giveUp takes the body from the latest try, a retry of it being decided
// on: what a read of that try still brings is kept for the next try, even
// while the retry waits out its backoff. Like next, it is for the retry
// loop alone.
func (b *body) giveUp() { b.state.Add(2) }

// replayable reports whether a try that reached a node may be repeated.
func (b *body) replayable() bool { return b.buf != nil || !b.handed() }

// waitBackoff waits the jittered delay before retry n (1-based) of a
// route whose retries.backoff is base, or until ctx is done, and reports
// whether ctx is still live.
func waitBackoff(ctx context.Context, base time.Duration, n int) bool {
	return backoff.Wait(ctx, retryBackoff(base, n))
}

// retryBackoff is the delay before retry n: drawn between half and all of
// base × 2^(n−1), doubling at most 6 times. In the one backoff's terms,
// three quarters of that ±1/3.
func retryBackoff(base time.Duration, n int) time.Duration {
	if base <= 0 {
		return 0
	}
	c := base * 3 / 4
	return backoff.Exponential{Base: c, Max: c << 6, Jitter: 1.0 / 3}.Backoff(n)
}
