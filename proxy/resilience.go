package proxy

import (
	"context"
	"errors"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/sony/gobreaker/v2"
	"go.uber.org/zap"

	"github.com/sidecarlb/sidecar/balancer"
	"github.com/sidecarlb/sidecar/internal/backoff"
	"github.com/sidecarlb/sidecar/proxy/resilience"
)

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
	var gauge prometheus.Gauge // none without endpoint labels: one per route would mean nothing
	if rt.metrics.endpointLabels {
		gauge = rt.metrics.breakerState.WithLabelValues(ep)
		gauge.Set(0)
	}
	return resilience.NewBreaker(ep, rt.cfg.Resilience.Breaker, func(from, to gobreaker.State) {
		if gauge != nil {
			gauge.Set(float64(to))
		}
		rt.metrics.breakerTransitions.WithLabelValues(rt.metrics.endpoint(ep), to.String()).Inc()
		rt.log.Info("breaker state changed", zap.String("endpoint", ep),
			zap.String("from", from.String()), zap.String("to", to.String()))
	})
}

// allow asks e's breaker for a try. The returned func reports its outcome.
func (e *endpoint) allow() (func(error), error) { return e.breaker.Allow() }

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
	e.stats.try(time.Now(), gatewayFailure)
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
		rt.metrics.ejectionsRefused.WithLabelValues().Inc()
		return
	}
	d, times := e.outlier.Eject(o, now)
	rt.metrics.ejections.WithLabelValues(rt.metrics.endpoint(e.Addr)).Inc()
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
