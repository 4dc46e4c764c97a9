package proxy

import (
	"context"
	"slices"
	"time"

	"github.com/sidecarlb/sidecar/balancer"
)

// tryLoop is the one loop that takes a request, an upgrade's handshake or
// a TCP connection to a node, trying another node as the route's retry
// policy allows. It owns what every protocol shares: picking with the
// nodes tried so far excluded, each node's admission (its breaker, and for
// requests max_requests), the retry budget and the retry counters, the
// backoff between tries, the per-try timeout and the overall deadline (its
// ctx). Each try is one call to the protocol's attempt (httpTry, upgradeTry
// or tcpTry), which reaches the node and says what came of it.
//
// The attempt is chosen by kind, and the protocol's state is held in the
// loop by value, rather than behind an interface or a pointer, so that it
// stays on the caller's stack: the loop adds no allocation to a request.
type tryLoop struct {
	p      *Proxy
	rt     *route
	ctx    context.Context // the overall deadline; the client's going away
	key    uint64
	hasKey bool
	start  time.Time

	tried   []string // endpoint IDs, once a try fails; most requests never need it
	lastErr error
	retries int
	sent    int // tries that reached for a node, for the access log
	// A retry decided on but not sent: counted once its try goes out, its
	// budget given back if it never does (cancel, deferred by the caller).
	next pendingRetry

	kind    tryKind
	http    httpTry    // kind tryHTTP
	upgrade upgradeTry // kind tryUpgrade
	tcp     tcpTry     // kind tryTCP
}

// tryKind is the protocol a tryLoop carries.
type tryKind uint8

const (
	tryHTTP tryKind = iota
	tryUpgrade
	tryTCP
)

// init readies l for one request or connection on rt that started at
// start, counting it in rt's retry budget; l.kind and its protocol's state
// are the caller's to set.
func (l *tryLoop) init(p *Proxy, ctx context.Context, rt *route, key uint64, hasKey bool, start time.Time) {
	rt.budget.Request(start)
	l.p, l.ctx, l.rt, l.key, l.hasKey, l.start = p, ctx, rt, key, hasKey, start
}

// verdict is what a try's attempt says should happen next.
type verdict uint8

const (
	// tryDone: the loop ends with the outcome's err, nil for a node's
	// answer or connection that the attempt keeps.
	tryDone verdict = iota
	// tryRefused: the try never reached the node (a local limit); another
	// node at once, with no retry counted.
	tryRefused
	// tryFailed: the try failed on the node; another if the retry policy
	// and budget allow.
	tryFailed
)

// outcome is what came of one try.
type outcome struct {
	verdict verdict
	err     error
	// For tryFailed: the retry's reason (a label of
	// sidecar_retries_total), whether the request may be sent again,
	// and whether the try never reached the node (it then takes nothing
	// from the budget, and its first retry does not wait).
	reason    string
	allowed   bool
	neverSent bool
	// decided: the attempt has decided on the retry itself (l.decide), as
	// for a gateway answer it would otherwise relay.
	decided bool
}

// run makes tries until one ends the loop, and returns its error, or the
// last try's when no node is left to try or no retry is allowed. It blocks
// for the tries and the backoffs between them, and ends early with ctx.
func (l *tryLoop) run() error {
	rt := l.rt
	for picks := 0; ; picks++ {
		if !l.ready() {
			return l.lastErr
		}
		e, pk, err := rt.pick(l.ctx, l.key, l.hasKey, l.tried)
		if err != nil {
			if l.lastErr != nil {
				return l.lastErr
			}
			return err
		}
		if len(l.tried) > 0 && slices.Contains(l.tried, e.ID) {
			// Every node left has been tried or refused the try.
			release(pk)
			if l.lastErr == nil {
				return &proxyError{rt.cfg.Service, errTriedAll}
			}
			return l.lastErr
		}
		breakerDone, err := l.admit(e)
		if err != nil {
			// At max_requests, or an open breaker: never reached, always
			// worth another.
			release(pk)
			l.lastErr = &proxyError{rt.cfg.Service, err}
			l.tried = append(l.tried, e.ID)
			if picks > 2*len(rt.state.Load().endpoints) {
				return l.lastErr
			}
			continue
		}
		l.next.sent(rt)
		l.sent++
		o := l.attempt(e, pk, breakerDone)
		switch o.verdict {
		case tryDone:
			return o.err
		case tryRefused:
			l.lastErr = o.err
			if l.ctx.Err() != nil {
				return l.lastErr
			}
		case tryFailed:
			l.lastErr = o.err
			if !o.decided && !l.decide(o.reason, o.allowed, o.neverSent) {
				return l.lastErr
			}
			if !retryWait(l.ctx, rt, l.retries, o.neverSent) {
				return l.lastErr
			}
		}
		l.tried = append(l.tried, e.ID)
	}
}

// ready readies the next try before a node is picked: a request body that
// cannot be sent again ends the tries.
func (l *tryLoop) ready() bool {
	if l.kind == tryHTTP {
		return l.http.ready()
	}
	return true
}

// admit asks node e to take the try: its breaker, and for a request its
// max_requests. It returns the func that reports the outcome to the
// breaker.
func (l *tryLoop) admit(e *endpoint) (func(error), error) {
	if l.kind == tryHTTP {
		return l.http.admit(e)
	}
	return e.allow()
}

// attempt makes one try on e with the protocol's attempt.
func (l *tryLoop) attempt(e *endpoint, pk balancer.Pick, breakerDone func(error)) outcome {
	switch l.kind {
	case tryHTTP:
		return l.http.attempt(l, e, pk, breakerDone)
	case tryUpgrade:
		return l.upgrade.attempt(l, e, pk, breakerDone)
	default:
		return l.tcp.attempt(l, e, pk, breakerDone)
	}
}

// tcpMinRetries is the fewest retries of a TCP connection's failed dials,
// whatever retries.attempts says: a dial never sends a client byte, and TCP
// routes made three dials before they shared this loop.
const tcpMinRetries = 2

// decide decides whether to try again after a failed try, spending from
// the budget unless the try never reached a node. The retry decided on is
// left in l.next: run waits for it (retryWait), counts it when its try is
// sent, and gives its budget back when it never is (the body cannot be
// sent again, no node is left, the client went away). It does not block.
func (l *tryLoop) decide(reason string, allowed, neverSent bool) bool {
	rt := l.rt
	attempts := rt.cfg.Resilience.Retries.Attempts
	if l.kind == tryTCP {
		attempts = max(attempts, tcpMinRetries)
	}
	if !allowed || l.retries >= attempts {
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
	l.retries++
	l.next = pendingRetry{reason: reason, spent: spent}
	return true
}

// tryContext is the context of one try: ctx bounded by the per-try
// timeout, if the route has one, with the func that ends it (nil if
// none).
func (l *tryLoop) tryContext() (context.Context, context.CancelFunc) {
	if d := l.rt.cfg.Resilience.Retries.PerTryTimeout; d > 0 {
		return context.WithTimeout(l.ctx, d)
	}
	return l.ctx, nil
}
