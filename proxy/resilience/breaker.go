package resilience

import (
	"errors"

	"github.com/sony/gobreaker/v2"

	"github.com/sidecarlb/sidecar/config"
)

var (
	// ErrBreakerOpen: the node's circuit breaker is open, or half-open
	// with its probes taken.
	ErrBreakerOpen = errors.New("circuit breaker open")
	// ErrTripping is the outcome to report to a breaker for a failure
	// that counts toward tripping it.
	ErrTripping = errors.New("breaker failure")
	// ErrRefused is the outcome to report for a try that a local limit
	// refused before it reached the node: the breaker counts it neither
	// way.
	ErrRefused = errors.New("refused locally")
)

// Breaker is one node's circuit breaker: a gobreaker two-step breaker whose
// outcomes are ErrTripping, ErrRefused or nil. A nil *Breaker is a
// disabled one that allows every try.
type Breaker struct {
	cb *gobreaker.TwoStepCircuitBreaker[struct{}]
}

// NewBreaker returns the breaker of the node name as cfg describes it, or
// nil when cfg is not enabled. onChange, if not nil, is called on every
// state change, in the goroutine that caused it; it must not block.
func NewBreaker(name string, cfg config.Breaker, onChange func(from, to gobreaker.State)) *Breaker {
	if !cfg.Enabled {
		return nil
	}
	s := gobreaker.Settings{
		Name:        name,
		MaxRequests: uint32(max(cfg.HalfOpenRequests, 1)),
		Timeout:     cfg.OpenFor,
		ReadyToTrip: func(c gobreaker.Counts) bool {
			return c.ConsecutiveFailures >= uint32(max(cfg.ConsecutiveFailures, 1))
		},
		IsExcluded: func(err error) bool { return err == ErrRefused },
	}
	if onChange != nil {
		s.OnStateChange = func(_ string, from, to gobreaker.State) { onChange(from, to) }
	}
	return &Breaker{cb: gobreaker.NewTwoStepCircuitBreaker[struct{}](s)}
}

// Allow asks the breaker for a try: it returns the func that reports the
// try's outcome (ErrTripping, ErrRefused or nil), or ErrBreakerOpen. It
// does not block.
func (b *Breaker) Allow() (func(error), error) {
	if b == nil {
		return noopDone, nil
	}
	done, err := b.cb.Allow()
	if err != nil {
		return nil, ErrBreakerOpen
	}
	return done, nil
}

func noopDone(error) {}

// State is the breaker's state, "disabled" for a nil one.
func (b *Breaker) State() string {
	if b == nil {
		return "disabled"
	}
	return b.cb.State().String()
}
