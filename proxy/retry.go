package proxy

import (
	"bytes"
	"context"
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
	defer func() {
		if held != nil && err != nil && r.Context().Err() == nil {
			resp, e, pk, err = held, heldE, balancer.Pick{}, nil
		}
	}()
	res := &rt.cfg.Resilience
	rt.budget.request(start)
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
		breakerDone, err := e.allow()
		if err != nil {
			// Never reached the node: always worth another.
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
		out := r.WithContext(tryCtx)
		out.URL.Host = e.Addr
		out.Body = nil
		if b != nil {
			var ok bool
			if out.Body, ok = b.next(); !ok {
				if cancel != nil {
					cancel()
				}
				breakerDone(nil)
				release(pk)
				return nil, nil, balancer.Pick{}, lastErr
			}
		}
		resp, err := e.roundTrip(useH2, out, b, start)
		if cancel != nil {
			if err != nil || resp == nil {
				cancel()
			} else {
				resp.Body = cancelOnClose{resp.Body, cancel}
			}
		}

		if err != nil {
			if r.Context().Err() != nil {
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
			breakerDone(errBreakerFailure)
			rt.observe(e, true)
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
			if !p.retry(ctx, rt, reason, neverSent || (replayable && (b == nil || b.replayable())), &retries, neverSent) {
				return nil, nil, balancer.Pick{}, lastErr
			}
			tried = append(tried, e.ID)
			continue
		}

		gateway := isGatewayStatus(resp.StatusCode, res.Outlier.EjectOn5xx)
		if resp.StatusCode >= 500 && res.Breaker.TripOn5xx {
			breakerDone(errBreakerFailure)
		} else {
			breakerDone(nil)
		}
		rt.observe(e, gateway)
		if gateway && isGatewayStatus(resp.StatusCode, false) && replayable && (b == nil || b.replayable()) &&
			len(tried)+1 < rt.state.Load().eligible &&
			p.retry(ctx, rt, "status_"+strconv.Itoa(resp.StatusCode), true, &retries, false) {
			held, heldE = hold(resp), e
			done(pk, errGateway, start)
			lastErr = fmt.Errorf("%w: %s", errGateway, resp.Status)
			tried = append(tried, e.ID)
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

// retry decides whether to try again after a failed try, spending from the
// budget unless the try never reached a node, and waits the backoff.
func (p *Proxy) retry(ctx context.Context, rt *route, reason string, allowed bool, retries *int, neverSent bool) bool {
	res := &rt.cfg.Resilience.Retries
	if !allowed || *retries >= res.Attempts {
		return false
	}
	if !neverSent && !rt.budget.spend(time.Now()) {
		rt.metrics.retries.WithLabelValues(reason, "budget_exhausted").Inc()
		return false
	}
	*retries++
	rt.metrics.retries.WithLabelValues(reason, "retried").Inc()
	if neverSent && *retries == 1 {
		return ctx.Err() == nil // another node at once
	}
	return backoff(ctx, res.Backoff, *retries)
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
