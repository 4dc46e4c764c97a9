package balancer

import (
	"fmt"
	"maps"
	"slices"
	"strings"
	"time"
)

// Options configures the balancers that New builds. The zero value is ready
// to use; each field documents its default.
type Options struct {
	// Now is the clock used by balancers that measure time (latency-aware
	// least_request). If nil, time.Now is used.
	Now func() time.Time
	// SlowStart ramps an endpoint that joins a running set up to its full
	// share of least_request traffic over this long. Zero disables it.
	SlowStart time.Duration
	// DecayTime is the time constant of least_request's latency average;
	// if zero, 10s is used.
	DecayTime time.Duration
}

func (o Options) now() func() time.Time {
	if o.Now == nil {
		return time.Now
	}
	return o.Now
}

// registry maps each config name to its balancer's constructor.
var registry = map[string]func(Options) Balancer{
	"random":        func(Options) Balancer { return NewRandom() },
	"round_robin":   func(Options) Balancer { return NewRoundRobin() },
	"hash":          func(Options) Balancer { return NewHash() },
	"least_request": func(o Options) Balancer { return NewLeastRequest(o) },
}

// New returns a new balancer with no endpoints for the config name, or an
// error naming it if there is no such balancer.
func New(name string, opts Options) (Balancer, error) {
	newBalancer, ok := registry[name]
	if !ok {
		return nil, fmt.Errorf("unknown balancer %q (want one of %s)", name, strings.Join(Names(), ", "))
	}
	return newBalancer(opts), nil
}

// Names returns the config names of all balancers, sorted.
func Names() []string {
	return slices.Sorted(maps.Keys(registry))
}
