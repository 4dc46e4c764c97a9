package main

import (
	"fmt"
	"sync/atomic"

	"github.com/hashicorp/consul/api"

	"github.com/sidecarlb/sidecar/discovery"
	"github.com/sidecarlb/sidecar/heartbeat"
)

// readiness is the state behind the admin listener's /ready: not ready
// until started, registered and passing (with a service section), and the
// first discovery answer for every upstream arrived; not ready again from
// the moment shutdown begins.
type readiness struct {
	started   atomic.Bool
	draining  atomic.Bool
	registrar *heartbeat.Registrar // nil for a client-only sidecar
	cache     *discovery.Cache
	upstreams []string
	// current, if set, lists the upstreams' keys in the config in effect
	// (a reload may change them), in place of upstreams.
	current func() []string
}

// check reports whether the sidecar is ready, and if not, why. It does not
// block and is safe for concurrent use.
func (r *readiness) check() (bool, string) {
	if r.draining.Load() {
		return false, "draining"
	}
	if !r.started.Load() {
		return false, "starting"
	}
	if r.registrar != nil {
		st := r.registrar.Status()
		if !st.Registered {
			return false, "not registered in consul"
		}
		if st.CheckStatus != api.HealthPassing {
			return false, fmt.Sprintf("check %s", st.CheckStatus)
		}
	}
	upstreams := r.upstreams
	if r.current != nil {
		if cur := r.current(); cur != nil {
			upstreams = cur
		}
	}
	if len(upstreams) == 0 {
		return true, ""
	}
	answered := make(map[string]bool, len(upstreams))
	for _, s := range r.cache.Snapshots() {
		if !s.Pending {
			answered[s.Service] = true
		}
	}
	for _, name := range upstreams {
		if !answered[name] {
			return false, fmt.Sprintf("waiting for discovery of %q", name)
		}
	}
	return true, ""
}
