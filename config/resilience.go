package config

import (
	"reflect"
	"strings"
	"time"
)

// Resilience says how the proxy survives nodes that die, stall or fail
// fast. It sits under proxy.resilience, and upstreams[].resilience overrides
// it key by key: every key an upstream leaves out inherits proxy's value.
type Resilience struct {
	Breaker Breaker `yaml:"breaker"`
	Outlier Outlier `yaml:"outlier"`
	Retries Retries `yaml:"retries"`
	Limits  Limits  `yaml:"limits"`
	// SlowStart ramps a node that joins up to its full share of
	// least_request traffic over this long. Default 10s; 0 disables.
	SlowStart time.Duration `yaml:"slow_start"`
}

// Breaker is a per-endpoint circuit breaker: it opens after consecutive
// failures (connect errors, resets, timeouts; 5xx when TripOn5xx), lets
// HalfOpenRequests probes through after OpenFor, and closes on success.
type Breaker struct {
	Enabled             bool          `yaml:"enabled"`              // default true
	ConsecutiveFailures int           `yaml:"consecutive_failures"` // default 5
	OpenFor             time.Duration `yaml:"open_for"`             // default 5s
	HalfOpenRequests    int           `yaml:"half_open_requests"`   // default 1
	TripOn5xx           bool          `yaml:"trip_on_5xx"`          // default false
}

// Outlier ejects a node from balancing after ConsecutiveFailures gateway
// failures (connect errors, timeouts, 502/503/504; any 5xx when EjectOn5xx)
// for BaseEjection × times ejected, capped at MaxEjection. At most
// MaxEjectionPercent of a service's nodes are out at once, and when fewer
// than PanicThreshold percent are left, the balancer uses all of them.
type Outlier struct {
	Enabled             bool          `yaml:"enabled"`              // default true
	ConsecutiveFailures int           `yaml:"consecutive_failures"` // default 5
	BaseEjection        time.Duration `yaml:"base_ejection"`        // default 30s
	MaxEjection         time.Duration `yaml:"max_ejection"`         // default 5m
	MaxEjectionPercent  int           `yaml:"max_ejection_percent"` // default 50
	PanicThreshold      int           `yaml:"panic_threshold"`      // default 50 (percent)
	EjectOn5xx          bool          `yaml:"eject_on_5xx"`         // default false
}

// Retries: a request never written to a node (refused dial, open breaker)
// is always tried again on another node; after a 502/503/504 or a per-try
// timeout only idempotent methods are, unless RetryNonIdempotent. Retries
// beyond the budget are not made.
type Retries struct {
	// Attempts is how many retries a request may make after its first
	// try. Default 2; 0 disables retries.
	Attempts int `yaml:"attempts"`
	// PerTryTimeout bounds each try; default 0, only timeouts.request.
	PerTryTimeout time.Duration `yaml:"per_try_timeout"`
	// Backoff is the base of the jittered exponential delay before a
	// retry after a response or timeout; default 25ms.
	Backoff time.Duration `yaml:"backoff"`
	// RetryNonIdempotent retries POST and PATCH too, replaying bodies up
	// to 64 KiB. Default false.
	RetryNonIdempotent bool   `yaml:"retry_non_idempotent"`
	Budget             Budget `yaml:"budget"`
}

// Budget caps retries at Percent of requests over Window, plus
// MinPerSecond, so an outage is not amplified.
type Budget struct {
	Percent      int           `yaml:"percent"`        // default 20
	MinPerSecond int           `yaml:"min_per_second"` // default 3
	Window       time.Duration `yaml:"window"`         // default 10s
}

// Limits bound what the proxy asks of each node (endpoint) of a service at
// once, as Envoy's circuit-breaker thresholds do; Envoy's bound a whole
// cluster, these each node. A request that needs a connection while the
// node has MaxConnections waits, as one of at most MaxPendingRequests, for
// a connection to come free, up to the connect timeout; one past
// MaxPendingRequests, or still waiting then, and one that would be past
// MaxRequests, is refused with a 503 (X-Sidecar-Error: local_limit) and
// tried on another node. Reaching a limit is the sidecar's overload, not
// the node's failure: it never counts toward the breaker or ejection.
type Limits struct {
	// MaxConnections bounds the connections open to the node: HTTP/1.1
	// keep-alive, HTTP/2, TCP and upgraded. Default 1024.
	MaxConnections int `yaml:"max_connections"`
	// MaxPendingRequests bounds the requests waiting for a connection to
	// the node. Default 1024.
	MaxPendingRequests int `yaml:"max_pending_requests"`
	// MaxRequests bounds the requests in flight to the node, HTTP/2
	// streams included. Default 1024.
	MaxRequests int `yaml:"max_requests"`
}

func defaultResilience() Resilience {
	return Resilience{
		Breaker: Breaker{Enabled: true, ConsecutiveFailures: 5, OpenFor: 5 * time.Second, HalfOpenRequests: 1},
		Outlier: Outlier{Enabled: true, ConsecutiveFailures: 5, BaseEjection: 30 * time.Second,
			MaxEjection: 5 * time.Minute, MaxEjectionPercent: 50, PanicThreshold: 50},
		Retries: Retries{Attempts: 2, Backoff: 25 * time.Millisecond,
			Budget: Budget{Percent: 20, MinPerSecond: 3, Window: 10 * time.Second}},
		Limits:    Limits{MaxConnections: 1024, MaxPendingRequests: 1024, MaxRequests: 1024},
		SlowStart: 10 * time.Second,
	}
}

// inheritResilience copies into dst every leaf of from whose key the file
// did not set under path.
func (p *parser) inheritResilience(path string, dst *Resilience, from Resilience) {
	p.inheritFields(path, reflect.ValueOf(dst).Elem(), reflect.ValueOf(from))
}

func (p *parser) inheritFields(path string, dst, from reflect.Value) {
	t := dst.Type()
	for i := 0; i < t.NumField(); i++ {
		key, _, _ := strings.Cut(t.Field(i).Tag.Get("yaml"), ",")
		fp := path + "." + key
		if dst.Field(i).Kind() == reflect.Struct && t.Field(i).Type != reflect.TypeOf(time.Duration(0)) {
			p.inheritFields(fp, dst.Field(i), from.Field(i))
			continue
		}
		if !p.present(fp) {
			dst.Field(i).Set(from.Field(i))
		}
	}
}

// validateResilience checks r, read from path.
func (p *parser) validateResilience(path string, r *Resilience) {
	atLeast := func(key string, v, lo int) {
		if v < lo {
			p.errorf(path+"."+key, "must be at least %d, got %d", lo, v)
		}
	}
	percent := func(key string, v int) {
		if v < 0 || v > 100 {
			p.errorf(path+"."+key, "must be a percentage 0-100, got %d", v)
		}
	}
	if r.Breaker.Enabled {
		atLeast("breaker.consecutive_failures", r.Breaker.ConsecutiveFailures, 1)
		atLeast("breaker.half_open_requests", r.Breaker.HalfOpenRequests, 1)
		p.positive(path+".breaker.open_for", r.Breaker.OpenFor)
	}
	if r.Outlier.Enabled {
		atLeast("outlier.consecutive_failures", r.Outlier.ConsecutiveFailures, 1)
		p.positive(path+".outlier.base_ejection", r.Outlier.BaseEjection)
		if r.Outlier.MaxEjection < r.Outlier.BaseEjection {
			p.errorf(path+".outlier.max_ejection", "must be at least base_ejection (%v), got %v", r.Outlier.BaseEjection, r.Outlier.MaxEjection)
		}
		percent("outlier.max_ejection_percent", r.Outlier.MaxEjectionPercent)
		percent("outlier.panic_threshold", r.Outlier.PanicThreshold)
	}
	atLeast("retries.attempts", r.Retries.Attempts, 0)
	if r.Retries.Attempts > 10 {
		p.errorf(path+".retries.attempts", "must be at most 10, got %d", r.Retries.Attempts)
	}
	p.nonNegative(path+".retries.per_try_timeout", r.Retries.PerTryTimeout)
	p.nonNegative(path+".retries.backoff", r.Retries.Backoff)
	percent("retries.budget.percent", r.Retries.Budget.Percent)
	atLeast("retries.budget.min_per_second", r.Retries.Budget.MinPerSecond, 0)
	p.positive(path+".retries.budget.window", r.Retries.Budget.Window)
	p.nonNegative(path+".slow_start", r.SlowStart)
	atLeast("limits.max_connections", r.Limits.MaxConnections, 1)
	atLeast("limits.max_pending_requests", r.Limits.MaxPendingRequests, 1)
	atLeast("limits.max_requests", r.Limits.MaxRequests, 1)
}
