package proxy

import (
	"context"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net/http"
	"sync/atomic"
	"time"

	"github.com/sony/gobreaker/v2"
	"go.uber.org/zap"

	"github.com/sidecarlb/sidecar/config"
)

// maxReplayBody is the largest request body kept in memory so it can be
// sent again on a retry. Larger or unsized bodies stream, and are retried
// only when no byte of them was read.
const maxReplayBody = 64 << 10

var (
	// errGateway marks a response that counts as a gateway failure (502,
	// 503, 504) for outlier ejection and latency-aware balancing.
	errGateway = errors.New("gateway failure")
	// errBreakerFailure is what a tripping outcome reports to a breaker.
	errBreakerFailure = errors.New("breaker failure")
	// ErrBreakerOpen: every node the request could go to has an open
	// circuit breaker.
	ErrBreakerOpen = errors.New("circuit breaker open")
)

// health is the resilience state of one endpoint within a route.
type health struct {
	breaker *gobreaker.TwoStepCircuitBreaker[struct{}] // nil when disabled

	consecutive  atomic.Int32 // gateway failures in a row
	ejections    atomic.Int32 // times ejected; multiplies the ejection time
	successes    atomic.Int32 // successes since the last ejection
	ejectedUntil atomic.Int64 // unix nanoseconds; 0 when not ejected
}

func (h *health) ejected(now time.Time) bool { return h.ejectedUntil.Load() > now.UnixNano() }

// newBreaker returns the endpoint's breaker, reporting its transitions.
func (rt *route) newBreaker(ep string) *gobreaker.TwoStepCircuitBreaker[struct{}] {
	b := rt.cfg.Resilience.Breaker
	if !b.Enabled {
		return nil
	}
	gauge := rt.metrics.breakerState.WithLabelValues(ep)
	gauge.Set(0)
	return gobreaker.NewTwoStepCircuitBreaker[struct{}](gobreaker.Settings{
		Name:        ep,
		MaxRequests: uint32(max(b.HalfOpenRequests, 1)),
		Timeout:     b.OpenFor,
		ReadyToTrip: func(c gobreaker.Counts) bool { return c.ConsecutiveFailures >= uint32(max(b.ConsecutiveFailures, 1)) },
		OnStateChange: func(_ string, from, to gobreaker.State) {
			gauge.Set(float64(to))
			rt.metrics.breakerTransitions.WithLabelValues(ep, to.String()).Inc()
			rt.log.Info("breaker state changed", zap.String("endpoint", ep),
				zap.String("from", from.String()), zap.String("to", to.String()))
		},
	})
}

// allow asks e's breaker for a try. The returned func reports its outcome.
func (e *endpoint) allow() (func(error), error) {
	if e.breaker == nil {
		return noopDone, nil
	}
	done, err := e.breaker.Allow()
	if err != nil {
		return nil, ErrBreakerOpen
	}
	return done, nil
}

func noopDone(error) {}

// observe records a try's outcome on e for outlier ejection.
func (rt *route) observe(e *endpoint, gatewayFailure bool) {
	o := rt.cfg.Resilience.Outlier
	if !gatewayFailure {
		if e.consecutive.Load() != 0 {
			e.consecutive.Store(0)
		}
		// A long healthy run forgives earlier ejections.
		if e.ejections.Load() > 0 && e.successes.Add(1) >= 100 {
			e.ejections.Store(0)
		}
		return
	}
	if !o.Enabled {
		return
	}
	if n := e.consecutive.Add(1); n >= int32(max(o.ConsecutiveFailures, 1)) {
		rt.eject(e)
	}
}

// eject takes e out of balancing for base × times ejected (capped), unless
// that would put more than max_ejection_percent of the nodes out.
func (rt *route) eject(e *endpoint) {
	o := rt.cfg.Resilience.Outlier
	rt.mu.Lock()
	defer rt.mu.Unlock()
	now := time.Now()
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
	times := e.ejections.Add(1)
	d := min(o.BaseEjection*time.Duration(times), max(o.MaxEjection, o.BaseEjection))
	e.ejectedUntil.Store(now.Add(d).UnixNano())
	e.consecutive.Store(0)
	e.successes.Store(0)
	rt.metrics.ejections.WithLabelValues(e.Addr).Inc()
	rt.log.Info("endpoint ejected", zap.String("endpoint", e.Addr), zap.Duration("for", d), zap.Int32("times", times))
	rt.rebuildLocked(st.snap)
	time.AfterFunc(d, func() {
		rt.mu.Lock()
		defer rt.mu.Unlock()
		if st := rt.state.Load(); st != nil {
			rt.log.Info("endpoint returned", zap.String("endpoint", e.Addr))
			rt.rebuildLocked(st.snap)
		}
	})
}

// retryBudget caps retries at a share of requests over a sliding window,
// with a floor of minPerSecond, counted in one-second buckets without
// locks. Counts at a bucket's turnover are approximate.
type retryBudget struct {
	percent, minPerSecond int64
	buckets               []budgetBucket
}

type budgetBucket struct {
	second            atomic.Int64
	requests, retries atomic.Int64
}

func newRetryBudget(b config.Budget) *retryBudget {
	n := max(int(b.Window/time.Second), 1)
	return &retryBudget{percent: int64(b.Percent), minPerSecond: int64(b.MinPerSecond), buckets: make([]budgetBucket, n)}
}

func (b *retryBudget) bucket(sec int64) *budgetBucket {
	bk := &b.buckets[sec%int64(len(b.buckets))]
	if old := bk.second.Load(); old != sec && bk.second.CompareAndSwap(old, sec) {
		bk.requests.Store(0)
		bk.retries.Store(0)
	}
	return bk
}

// request counts a request offered.
func (b *retryBudget) request(now time.Time) { b.bucket(now.Unix()).requests.Add(1) }

// spend takes one retry from the budget, reporting false when none is left.
func (b *retryBudget) spend(now time.Time) bool {
	sec := now.Unix()
	var requests, retries int64
	for i := range b.buckets {
		bk := &b.buckets[i]
		if s := bk.second.Load(); s > sec-int64(len(b.buckets)) && s <= sec {
			requests += bk.requests.Load()
			retries += bk.retries.Load()
		}
	}
	allowed := max(requests*b.percent/100, b.minPerSecond*int64(len(b.buckets)))
	if retries >= allowed {
		return false
	}
	b.bucket(sec).retries.Add(1)
	return true
}

// refund gives back a retry spent at then that was not made after all, if
// its second is still in the window.
func (b *retryBudget) refund(then time.Time) {
	sec := then.Unix()
	bk := &b.buckets[sec%int64(len(b.buckets))]
	if bk.second.Load() != sec {
		return
	}
	for {
		n := bk.retries.Load()
		if n <= 0 || bk.retries.CompareAndSwap(n, n-1) {
			return
		}
	}
}

// idempotent reports whether a request may be sent twice.
func idempotent(method string) bool {
	switch method {
	case http.MethodGet, http.MethodHead, http.MethodOptions, http.MethodTrace, http.MethodPut, http.MethodDelete:
		return true
	}
	return false
}

// body is a request body as the tries of one request share it.
type body struct {
	src    io.ReadCloser
	buf    []byte // the whole body, when small enough to replay
	read   atomic.Bool
	srcErr atomic.Pointer[error] // a failed read of src, other than EOF
	reader bodyReader
}

// bodyReader is what one try sends. Close does nothing: the transport
// closes bodies on errors, and a retry may still need this one.
type bodyReader struct {
	b   *body
	buf []byte
	off int
}

func (r *bodyReader) Read(p []byte) (int, error) {
	if r.buf != nil {
		if r.off >= len(r.buf) {
			return 0, io.EOF
		}
		n := copy(p, r.buf[r.off:])
		r.off += n
		return n, nil
	}
	n, err := r.b.src.Read(p)
	if n > 0 {
		r.b.read.Store(true)
	}
	if err != nil && err != io.EOF {
		e := err // a copy, so that err itself stays off the heap
		r.b.srcErr.Store(&e)
	}
	return n, err
}

// failed returns the error that broke reading the client's body, or nil.
func (b *body) failed() error {
	if p := b.srcErr.Load(); p != nil {
		return fmt.Errorf("%w: %w", ErrBadRequestBody, *p)
	}
	return nil
}

func (r *bodyReader) Close() error { return nil }

// tryRead reads what is at hand without waiting for the client: ok is
// false when a read would wait, or the source cannot tell.
func (r *bodyReader) tryRead(p []byte) (n int, err error, ok bool) {
	if r.buf != nil {
		n, err = r.Read(p)
		return n, err, true
	}
	src, can := r.b.src.(interface {
		tryRead([]byte) (int, error, bool)
	})
	if !can {
		return 0, nil, false
	}
	if n, err, ok = src.tryRead(p); !ok {
		return 0, nil, false
	}
	if n > 0 {
		r.b.read.Store(true)
	}
	if err != nil && err != io.EOF {
		e := err // a copy, so that err itself stays off the heap
		r.b.srcErr.Store(&e)
	}
	return n, err, true
}

// newBody prepares r's body for tries: read into memory when it is small,
// known in size, and the request may be replayed after reaching a node.
func newBody(r *http.Request, replayable bool) (*body, error) {
	b := &body{src: r.Body}
	if replayable && r.ContentLength > 0 && r.ContentLength <= maxReplayBody {
		b.buf = make([]byte, r.ContentLength)
		if _, err := io.ReadFull(r.Body, b.buf); err != nil {
			return nil, fmt.Errorf("%w: %w", ErrBadRequestBody, err)
		}
	}
	return b, nil
}

// next returns the body for the next try, or false when the body cannot be
// sent again.
func (b *body) next() (io.ReadCloser, bool) {
	if b.buf != nil {
		b.reader = bodyReader{b: b, buf: b.buf}
		return &b.reader, true
	}
	if b.read.Load() {
		return nil, false
	}
	b.reader = bodyReader{b: b}
	return &b.reader, true
}

// replayable reports whether a try that reached a node may be repeated.
func (b *body) replayable() bool { return b.buf != nil || !b.read.Load() }

// backoff waits the jittered delay before retry n (1-based), or until ctx
// is done.
func backoff(ctx context.Context, base time.Duration, n int) bool {
	if base <= 0 {
		return ctx.Err() == nil
	}
	d := base << min(n-1, 6)
	d = d/2 + rand.N(d/2+1)
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return true
	case <-ctx.Done():
		return false
	}
}
