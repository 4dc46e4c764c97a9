package proxy

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strconv"
	"time"

	"github.com/sidecarlb/sidecar/balancer"
	"github.com/sidecarlb/sidecar/internal/httpwire"
	"github.com/sidecarlb/sidecar/internal/replay"
)

// roundTrip sends r to nodes picked by rt until one answers with a response
// to relay, trying again on another node as the route's retry policy
// allows (the tryLoop). It returns the response, the endpoint and pick it
// came from, or the last error. pk.Done is left to the caller on success.
func (p *Proxy) roundTrip(ctx context.Context, r *http.Request, rt *route, grpc bool, start time.Time, aw *accessWriter) (resp *http.Response, e *endpoint, pk balancer.Pick, err error) {
	res := &rt.cfg.Resilience
	key, hasKey := rt.key.sum(r)
	var l tryLoop
	l.init(p, ctx, rt, key, hasKey, start)
	l.kind = tryHTTP
	h := &l.http
	*h = httpTry{r: r, useH2: rt.h2 || grpc, replayable: httpwire.Idempotent(r.Method) || res.Retries.RetryNonIdempotent}
	defer func() {
		l.next.cancel(rt)
		if aw != nil {
			aw.attempts = l.sent
		}
		if h.held != nil && err != nil && r.Context().Err() == nil {
			// A node's own answer beats one the sidecar makes up.
			resp, e, pk, err = h.held, h.heldE, balancer.Pick{}, nil
			e.limits.retake() // for the caller to end, as it ends a try's
		}
	}()
	if r.ContentLength != 0 && r.Body != nil && r.Body != http.NoBody {
		var err error
		if h.b, err = replay.New(r, h.replayable && res.Retries.Attempts > 0); err != nil {
			return nil, nil, balancer.Pick{}, fmt.Errorf("read request body: %w", err)
		}
	}
	prepareOutbound(r, rt)
	if err := l.run(); err != nil {
		return nil, nil, balancer.Pick{}, err
	}
	return h.resp, h.e, h.pk, nil
}

// httpTry is a request's side of the tryLoop: its body, shared by the
// tries, and the answer that ends the loop.
type httpTry struct {
	r          *http.Request
	b          *replay.Body // nil without a body
	useH2      bool
	replayable bool // the method allows sending it twice
	tryBody    io.ReadCloser

	// The answer relayed: set by the try that ends the loop with one.
	resp *http.Response
	e    *endpoint
	pk   balancer.Pick
	// A gateway answer given up for a retry, kept in case the retry does
	// no better: the set may shrink (an ejection) between deciding to
	// retry and picking, or the next node may fail outright.
	held  *http.Response
	heldE *endpoint
}

// ready takes the body for the next try, reporting false when it cannot
// be sent again: that ends the tries before a node is picked or its
// breaker asked.
func (h *httpTry) ready() bool {
	if h.b == nil {
		return true
	}
	var ok bool
	h.tryBody, ok = h.b.Next()
	return ok
}

// admit takes a request slot on e (max_requests), then asks its breaker.
func (h *httpTry) admit(e *endpoint) (func(error), error) {
	if err := e.limits.startRequest(); err != nil {
		return nil, err
	}
	breakerDone, err := e.allow()
	if err != nil {
		e.limits.endRequest()
		return nil, err
	}
	return breakerDone, nil
}

// attempt sends one try of the request to e.
func (h *httpTry) attempt(l *tryLoop, e *endpoint, pk balancer.Pick, breakerDone func(error)) outcome {
	r := h.r
	tryCtx, cancel := l.tryContext()
	// Each try is a shallow copy of r with a context, body and trailers of
	// its own. A request with no body, on r's own context, needs none of
	// them, so r itself goes: one copy less per request.
	out := r
	if tryCtx != r.Context() || (r.Body != nil && r.Body != http.NoBody) {
		out = r.WithContext(tryCtx)
		out.Body = h.tryBody
		if br, _ := h.tryBody.(*replay.Reader); br != nil && br.Trailer() != nil {
			out.Trailer = br.Trailer() // the try's own (body.declared)
		}
	}
	out.URL.Host = e.Addr
	resp, err := e.roundTrip(h.useH2, out, h.b, l.start)
	if cancel != nil {
		if err != nil || resp == nil {
			cancel()
		} else {
			resp.Body = cancelOnClose{resp.Body, cancel}
		}
	}
	if err != nil {
		return h.failed(l, e, pk, breakerDone, err, cancel != nil && deadlinePassed(tryCtx))
	}
	return h.answered(l, e, pk, breakerDone, resp)
}

// failed settles a try that got no answer from e; tryTimedOut says the
// try's own deadline has passed.
func (h *httpTry) failed(l *tryLoop, e *endpoint, pk balancer.Pick, breakerDone func(error), err error, tryTimedOut bool) outcome {
	rt, b := l.rt, h.b
	e.limits.endRequest()
	switch {
	case h.r.Context().Err() != nil:
		// The client went away; not the node's doing.
		breakerDone(nil)
		release(pk)
		return outcome{verdict: tryDone, err: err}
	case errors.Is(err, ErrLocalLimit):
		// No connection to the node came free: never sent, and the
		// sidecar's doing, not the node's.
		refuseTry(breakerDone, pk)
		return outcome{verdict: tryRefused, err: &proxyError{rt.cfg.Service, err}}
	case errors.Is(err, ErrBadRequest):
		// Refused before it was sent: the client's request, not the node.
		breakerDone(nil)
		release(pk)
		return outcome{verdict: tryDone, err: err}
	case b != nil && b.Failed() != nil:
		// The client's body broke, not the node.
		breakerDone(nil)
		release(pk)
		return outcome{verdict: tryDone, err: b.Failed()}
	}
	rt.reportTry(e, breakerDone, true, true)
	done(pk, err, l.start)
	o := outcome{verdict: tryFailed, err: err, reason: "connect_failed", neverSent: isDialError(err)}
	if !o.neverSent {
		o.reason = "upstream_failed"
		if tryTimedOut && !deadlinePassed(l.ctx) {
			// The try's own deadline, not the request's. Checked by the
			// clock: the pool's socket deadline may fire before the
			// context's timer does.
			o.reason = "per_try_timeout"
			o.err = fmt.Errorf("%w: per-try timeout %v: %w", ErrUpstreamTimeout, rt.cfg.Resilience.Retries.PerTryTimeout, err)
		}
	}
	o.allowed = o.neverSent || (h.replayable && (b == nil || b.Replayable()))
	if b != nil {
		// What the client sends from now on, during the backoff too, is
		// for the retry, if there is one.
		b.GiveUp()
	}
	return o
}

// answered settles a try that e answered: the answer ends the loop, unless
// it is a gateway failure worth a retry on another node, when it is held
// in case the retry does no better.
func (h *httpTry) answered(l *tryLoop, e *endpoint, pk balancer.Pick, breakerDone func(error), resp *http.Response) outcome {
	rt, b := l.rt, h.b
	res := &rt.cfg.Resilience
	gateway := isGatewayStatus(resp.StatusCode, res.Outlier.EjectOn5xx)
	rt.reportTry(e, breakerDone, resp.StatusCode >= 500 && res.Breaker.TripOn5xx, gateway)
	if gateway && isGatewayStatus(resp.StatusCode, false) && h.replayable && (b == nil || b.Replayable()) &&
		len(l.tried)+1 < rt.state.Load().eligible &&
		l.decide("status_"+strconv.Itoa(resp.StatusCode), true, false) {
		// Held before the body is given up: a stream whose body is taken
		// from it may be reset, and its answer with it.
		h.held, h.heldE = hold(resp), e
		e.limits.endRequest()
		done(pk, errGateway, l.start)
		if b != nil {
			b.GiveUp() // as after a failed try
		}
		return outcome{verdict: tryFailed, err: fmt.Errorf("%w: %s", errGateway, resp.Status), decided: true}
	}
	h.resp, h.e, h.pk = resp, e, pk
	return outcome{verdict: tryDone}
}

// deadlinePassed reports whether ctx has a deadline and it has passed.
func deadlinePassed(ctx context.Context) bool {
	dl, ok := ctx.Deadline()
	return ok && !time.Now().Before(dl)
}

// retryWait waits before retry n (1-based) of rt: not at all before the
// first retry of a try never sent, else the jittered backoff. It reports
// false when ctx ended first.
func retryWait(ctx context.Context, rt *route, n int, neverSent bool) bool {
	if neverSent && n == 1 {
		return ctx.Err() == nil // another node at once
	}
	return waitBackoff(ctx, rt.cfg.Resilience.Retries.Backoff, n)
}

// pendingRetry is a retry decided on whose try has not been sent yet; its
// zero value is none.
type pendingRetry struct {
	reason string
	spent  time.Time // when it took from the budget; zero if it did not
}

// sent counts the retry, if any, its try going out.
func (n *pendingRetry) sent(rt *route) {
	if n.reason == "" {
		return
	}
	rt.metrics.retries.WithLabelValues(n.reason, "retried").Inc()
	*n = pendingRetry{}
}

// cancel gives back what the retry, if any, took from the budget: its try
// was never sent.
func (n *pendingRetry) cancel(rt *route) {
	if !n.spent.IsZero() {
		rt.budget.Refund(n.spent)
	}
	*n = pendingRetry{}
}

// isGatewayStatus reports whether a status is a gateway failure: 502, 503
// or 504, or any 5xx when all5xx.
func isGatewayStatus(code int, all5xx bool) bool {
	if all5xx {
		return code >= 500 && code <= 599
	}
	return code == http.StatusBadGateway || code == http.StatusServiceUnavailable || code == http.StatusGatewayTimeout
}

// hold reads a short response into memory so it can still be relayed
// later, or discards it and returns nil when it is long or broken.
func hold(resp *http.Response) *http.Response {
	const limit = 4 << 10
	b, err := io.ReadAll(io.LimitReader(resp.Body, limit+1))
	resp.Body.Close()
	if err != nil || len(b) > limit {
		return nil
	}
	resp.Body = io.NopCloser(bytes.NewReader(b))
	return resp
}

type cancelOnClose struct {
	io.ReadCloser
	cancel context.CancelFunc
}

func (c cancelOnClose) Close() error {
	err := c.ReadCloser.Close()
	c.cancel()
	return err
}
