package mesh

import (
	"context"
	"fmt"
	"strings"
	"sync"
	"time"

	"github.com/hashicorp/consul/api"
	"go.uber.org/zap"
)

// AuthorizeAgent is the part of *api.Agent an Authorizer uses; *api.Agent
// satisfies it. The call takes no context and consul/api's client has no
// timeout of its own, so an Authorizer bounds the wait for it (Decide's
// ctx), not the call; the agent answers from its cache.
type AuthorizeAgent interface {
	ConnectAuthorize(auth *api.AgentAuthorizeParams) (*api.AgentAuthorize, error)
}

// Decision is the answer for one caller.
type Decision struct {
	Allowed bool
	Reason  string
	// Unanswered: no answer came before the caller's context ended, so
	// the caller is refused (fail closed) but Consul denied nothing.
	Unanswered bool
}

type cached struct {
	Decision
	at   time.Time
	done chan struct{} // closed once Decision is set; nil when not in flight
}

// Denial is one refused caller, for /status.
type Denial struct {
	Time   time.Time `json:"time"`
	Caller string    `json:"caller"` // SPIFFE URI
	Remote string    `json:"remote"`
	Reason string    `json:"reason"`
}

// denialRing is the number of recent denials kept.
const denialRing = 32

// Authorizer decides by Consul intentions whether a caller may reach the
// local service. Answers are cached for TTL; one call per caller is in
// flight at a time. Its methods are safe for concurrent use.
type Authorizer struct {
	agent   AuthorizeAgent
	target  string
	ttl     time.Duration
	now     func() time.Time
	log     *zap.Logger
	metrics *Metrics

	mu      sync.Mutex
	cache   map[string]*cached // by caller URI
	denials [denialRing]Denial
	nDenied int64 // total denials; the ring holds the last min(n, denialRing)
}

// AuthorizerOptions tune an Authorizer. The zero value is fine.
type AuthorizerOptions struct {
	// TTL is how long an answer is reused; if zero, 1s is used. A deny
	// written in Consul applies to new connections within TTL plus the
	// agent's own propagation.
	TTL time.Duration
	// Now is the clock; if nil, time.Now.
	Now     func() time.Time
	Metrics *Metrics
}

// maxCached bounds the cache; past it, expired answers are dropped.
const maxCached = 4096

// NewAuthorizer returns an Authorizer for connections to target, a service
// name.
func NewAuthorizer(agent AuthorizeAgent, target string, opts AuthorizerOptions, log *zap.Logger) *Authorizer {
	if opts.TTL <= 0 {
		opts.TTL = time.Second
	}
	if opts.Now == nil {
		opts.Now = time.Now
	}
	return &Authorizer{agent: agent, target: target, ttl: opts.TTL, now: opts.Now, log: log, metrics: opts.Metrics, cache: map[string]*cached{}}
}

// TTL is how long an answer is reused.
func (a *Authorizer) TTL() time.Duration { return a.ttl }

// Decide returns whether callerURI may reach the target, from the cache
// when the answer is fresh. It may block on the agent. When the agent
// cannot answer, the last answer is kept if there is one, else the caller
// is denied (fail closed). It neither counts nor records the decision: see
// Authorize.
func (a *Authorizer) Decide(ctx context.Context, callerURI string) Decision {
	a.mu.Lock()
	c := a.cache[callerURI]
	if c != nil && c.done == nil && a.now().Sub(c.at) < a.ttl {
		d := c.Decision
		a.mu.Unlock()
		return d
	}
	if c != nil && c.done != nil { // in flight: wait for it
		done := c.done
		a.mu.Unlock()
		return a.wait(ctx, c, done)
	}
	prev := c
	c = &cached{done: make(chan struct{})}
	if len(a.cache) >= maxCached {
		a.evictLocked()
	}
	a.cache[callerURI] = c
	done := c.done
	a.mu.Unlock()
	go a.fill(callerURI, prev, c)
	return a.wait(ctx, c, done)
}

// wait returns c's decision once done is closed, or an unanswered refusal
// when ctx ends first.
func (a *Authorizer) wait(ctx context.Context, c *cached, done <-chan struct{}) Decision {
	select {
	case <-done:
		a.mu.Lock()
		defer a.mu.Unlock()
		return c.Decision
	case <-ctx.Done():
		return Decision{Reason: "authorization unanswered: " + ctx.Err().Error(), Unanswered: true}
	}
}

// fill asks the agent for c's decision and publishes it. It runs to its
// end even when every caller waiting for it gave up (consul/api's
// authorize call takes no context), so the answer still fills the cache;
// a panic in the call becomes a denial rather than a caller stuck in
// flight.
func (a *Authorizer) fill(callerURI string, prev, c *cached) {
	d := Decision{Reason: "authorization failed"}
	defer func() {
		if r := recover(); r != nil {
			a.log.Error("authorize panicked, denying", zap.String("caller", callerURI), zap.Any("panic", r))
		}
		a.mu.Lock()
		c.Decision, c.at = d, a.now()
		close(c.done)
		c.done = nil
		a.mu.Unlock()
	}()
	d = a.ask(callerURI, prev)
}

func (a *Authorizer) ask(callerURI string, prev *cached) Decision {
	res, err := a.agent.ConnectAuthorize(&api.AgentAuthorizeParams{Target: a.target, ClientCertURI: callerURI})
	if err != nil {
		if prev != nil {
			a.log.Warn("authorize failed, keeping last answer", zap.String("caller", callerURI), zap.Bool("allowed", prev.Allowed), zap.Error(err))
			return prev.Decision
		}
		a.log.Warn("authorize failed, denying", zap.String("caller", callerURI), zap.Error(err))
		return Decision{Reason: fmt.Sprintf("authorize with consul: %v", err)}
	}
	return Decision{Allowed: res.Authorized, Reason: res.Reason}
}

func (a *Authorizer) evictLocked() {
	now := a.now()
	for k, c := range a.cache {
		if c.done == nil && now.Sub(c.at) >= a.ttl {
			delete(a.cache, k)
		}
	}
}

// Authorize is Decide, counted by caller service, with a denial logged and
// kept in the ring of recent denials.
func (a *Authorizer) Authorize(ctx context.Context, callerURI, remote string) Decision {
	d := a.Decide(ctx, callerURI)
	a.Record(callerURI, remote, d)
	return d
}

// Record counts d for callerURI and keeps it when it is a denial.
func (a *Authorizer) Record(callerURI, remote string, d Decision) {
	caller := callerURI
	if id, err := ParseServiceID(callerURI); err == nil {
		caller = id.Service
	}
	a.metrics.authorized(strings.ToLower(caller), d.Allowed)
	if d.Allowed {
		return
	}
	a.log.Info("caller denied", zap.String("caller", callerURI), zap.String("remote", remote), zap.String("reason", d.Reason))
	a.mu.Lock()
	a.denials[a.nDenied%denialRing] = Denial{Time: a.now(), Caller: callerURI, Remote: remote, Reason: d.Reason}
	a.nDenied++
	a.mu.Unlock()
}

// Denials returns the recent denials, newest first, and the total count.
func (a *Authorizer) Denials() ([]Denial, int64) {
	a.mu.Lock()
	defer a.mu.Unlock()
	n := min(a.nDenied, denialRing)
	out := make([]Denial, 0, n)
	for k := int64(1); k <= n; k++ {
		out = append(out, a.denials[(a.nDenied-k)%denialRing])
	}
	return out, a.nDenied
}
