package proxy

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"slices"
	"strconv"
	"time"

	"github.com/sidecarlb/sidecar/balancer"
)

// roundTrip sends r to nodes picked by rt until one answers with a response
// to relay, trying again on another node as the route's retry policy
// allows. It returns the response, the endpoint and pick it came from, or
// the last error. pk.Done is left to the caller on success.
func (p *Proxy) roundTrip(ctx context.Context, r *http.Request, rt *route, grpc bool, start time.Time) (resp *http.Response, e *endpoint, pk balancer.Pick, err error) {
	// A gateway answer given up for a retry, kept in case the retry does no
	// better: the set may shrink (an ejection) between deciding to retry and
	// picking, or the next node may fail outright. A node's own answer beats
	// one the sidecar makes up.
	var held *http.Response
	var heldE *endpoint
	// A retry decided on but not sent: counted once its try goes out, its
	// budget given back if it never does.
	var next pendingRetry
	defer func() {
		next.cancel(rt)
		if held != nil && err != nil && r.Context().Err() == nil {
			resp, e, pk, err = held, heldE, balancer.Pick{}, nil
			e.limits.retake() // for the caller to end, as it ends a try's
		}
	}()
	res := &rt.cfg.Resilience
	rt.budget.Request(start)
	key, hasKey := rt.key.sum(r)
	method := r.Method
	replayable := idempotent(method) || res.Retries.RetryNonIdempotent
	var b *body
	if r.ContentLength != 0 && r.Body != nil && r.Body != http.NoBody {
		var err error
		if b, err = newBody(r, replayable && res.Retries.Attempts > 0); err != nil {
			return nil, nil, balancer.Pick{}, fmt.Errorf("read request body: %w", err)
		}
	}
	prepareOutbound(r, rt)
	useH2 := rt.h2 || grpc

	var (
		tried   []string // endpoint IDs, once a try fails; most requests never need it
		lastErr error
		retries int
	)
	for picks := 0; ; picks++ {
		// A body that cannot be sent again ends the tries before a node is
		// picked or its breaker asked.
		var tryBody io.ReadCloser
		if b != nil {
			var ok bool
			if tryBody, ok = b.next(); !ok {
				return nil, nil, balancer.Pick{}, lastErr
			}
		}
		e, pk, err := rt.pick(ctx, key, hasKey, tried)
		if err != nil {
			if lastErr != nil {
				return nil, nil, pk, lastErr
			}
			return nil, nil, pk, err
		}
		if len(tried) > 0 && slices.Contains(tried, e.ID) {
			// Every node left has been tried.
			release(pk)
			return nil, nil, balancer.Pick{}, lastErr
		}
		// A node at max_requests, or with an open breaker, is never
		// reached: always worth another.
		err = e.limits.startRequest()
		breakerDone := noopDone
		if err == nil {
			if breakerDone, err = e.allow(); err != nil {
				e.limits.endRequest()
			}
		}
		if err != nil {
			release(pk)
			lastErr = &proxyError{rt.cfg.Service, err}
			tried = append(tried, e.ID)
			if picks > 2*len(rt.state.Load().endpoints) {
				return nil, nil, balancer.Pick{}, lastErr
			}
			continue
		}

		tryCtx, cancel := ctx, context.CancelFunc(nil)
		if d := res.Retries.PerTryTimeout; d > 0 {
			tryCtx, cancel = context.WithTimeout(ctx, d)
		}
		// Each try is a shallow copy of r with a context, body and
		// trailers of its own. A request with no body, on r's own context,
		// needs none of them, so r itself goes: one copy less per request.
		out := r
		if tryCtx != r.Context() || (r.Body != nil && r.Body != http.NoBody) {
			out = r.WithContext(tryCtx)
			out.Body = tryBody
			if br, _ := tryBody.(*bodyReader); br != nil && br.trailer != nil {
				out.Trailer = br.trailer // the try's own (body.declared)
			}
		}
		out.URL.Host = e.Addr
		next.sent(rt)
		resp, err := e.roundTrip(useH2, out, b, start)
		if cancel != nil {
			if err != nil || resp == nil {
				cancel()
			} else {
				resp.Body = cancelOnClose{resp.Body, cancel}
			}
		}

		if err != nil {
			e.limits.endRequest()
			if r.Context().Err() != nil {
				breakerDone(nil)
				release(pk)
				return nil, nil, balancer.Pick{}, err
			}
			if errors.Is(err, ErrLocalLimit) {
				// No connection to the node came free: never sent, and
				// the sidecar's doing, not the node's.
				refuseTry(breakerDone, pk)
				lastErr = &proxyError{rt.cfg.Service, err}
				if ctx.Err() != nil {
					return nil, nil, balancer.Pick{}, lastErr
				}
				tried = append(tried, e.ID)
				continue
			}
			if errors.Is(err, ErrBadRequest) {
				// Refused before it was sent: the client's request, not the node.
				breakerDone(nil)
				release(pk)
				return nil, nil, balancer.Pick{}, err
			}
			if b != nil && b.failed() != nil {
				// The client's body broke, not the node.
				breakerDone(nil)
				release(pk)
				return nil, nil, balancer.Pick{}, b.failed()
			}
			rt.reportTry(e, breakerDone, true, true)
			done(pk, err, start)
			neverSent := isDialError(err)
			lastErr = err
			reason := "connect_failed"
			if !neverSent {
				reason = "upstream_failed"
				if cancel != nil && deadlinePassed(tryCtx) && !deadlinePassed(ctx) {
					// The try's own deadline, not the request's. Checked by
					// the clock: the pool's socket deadline may fire before
					// the context's timer does.
					reason = "per_try_timeout"
					lastErr = fmt.Errorf("%w: per-try timeout %v: %w", ErrUpstreamTimeout, res.Retries.PerTryTimeout, err)
				}
			}
			if b != nil {
				// What the client sends from now on, during the backoff
				// too, is for the retry, if there is one.
				b.giveUp()
			}
			if !p.decideRetry(rt, reason, neverSent || (replayable && (b == nil || b.replayable())), &retries, neverSent, &next) ||
				!retryWait(ctx, rt, retries, neverSent) {
				return nil, nil, balancer.Pick{}, lastErr
			}
			tried = append(tried, e.ID)
			continue
		}

		gateway := isGatewayStatus(resp.StatusCode, res.Outlier.EjectOn5xx)
		rt.reportTry(e, breakerDone, resp.StatusCode >= 500 && res.Breaker.TripOn5xx, gateway)
		if gateway && isGatewayStatus(resp.StatusCode, false) && replayable && (b == nil || b.replayable()) &&
			len(tried)+1 < rt.state.Load().eligible &&
			p.decideRetry(rt, "status_"+strconv.Itoa(resp.StatusCode), true, &retries, false, &next) {
			// Held before the body is given up: a stream whose body is
			// taken from it may be reset, and its answer with it.
			held, heldE = hold(resp), e
			e.limits.endRequest()
			done(pk, errGateway, start)
			lastErr = fmt.Errorf("%w: %s", errGateway, resp.Status)
			tried = append(tried, e.ID)
			if b != nil {
				b.giveUp() // as after a failed try
			}
			if !retryWait(ctx, rt, retries, false) {
				return nil, nil, balancer.Pick{}, lastErr
			}
			continue
		}
		return resp, e, pk, nil
	}
}

// deadlinePassed reports whether ctx has a deadline and it has passed.
func deadlinePassed(ctx context.Context) bool {
	dl, ok := ctx.Deadline()
	return ok && !time.Now().Before(dl)
}

// decideRetry decides whether to try again after a failed try, spending
// from the budget unless the try never reached a node. The retry decided
// on is left in next: the caller waits for it (retryWait), counts it when
// its try is sent, and gives its budget back when it never is (the body
// cannot be sent again, no node is left, the client went away). It does
// not block.
func (p *Proxy) decideRetry(rt *route, reason string, allowed bool, retries *int, neverSent bool, next *pendingRetry) bool {
	res := &rt.cfg.Resilience.Retries
	if !allowed || *retries >= res.Attempts {
		return false
	}
	var spent time.Time
	if !neverSent {
		spent = time.Now()
		if !rt.budget.Spend(spent) {
			rt.metrics.retries.WithLabelValues(reason, "budget_exhausted").Inc()
			return false
		}
	}
	*retries++
	*next = pendingRetry{reason: reason, spent: spent}
	return true
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
