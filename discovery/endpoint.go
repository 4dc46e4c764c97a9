// Package discovery resolves service names to the complete set of their
// healthy instances, as immutable snapshots that follow the registry.
//
// The Consul backend costs a fixed number of connections to the agent,
// whatever the number of watched services (as fabio follows a datacenter):
//
//   - one blocking query on /v1/health/state/any, digested per service
//     (each check's node, ID, service ID, status and the service's tags;
//     outputs and indexes left out) and per node (its own checks);
//   - one blocking query on /v1/catalog/services (names and tags), which also
//     answers Known;
//   - a pool of MaxConnections-2 workers (less two more per other
//     datacenter followed) fetching
//     /v1/health/service/NAME?passing for the watched services whose digest
//     changed, whose node's checks changed, that appeared, disappeared or
//     changed tags in the catalog, or, on any catalog change, that have an
//     instance without a check of its own (invisible to the health state).
//
// A watch fetches at most once at a time and once per change (a change seen
// while it fetches makes one more fetch). It is also fetched again once per
// wait time (5m), with jitter, which catches the rare change that neither
// index shows: an instance re-registered in place with a new address, or the
// first check-less instance of a service whose other instances have checks.
// While the health-state query fails, every watch serves its last set,
// stale, without a query of its own; when it answers again every watch
// fetches once. The cost of the design is that every check change in the
// datacenter wakes the state query, whose answer lists every check.
//
// Every watch is shared by every listener and balancer that needs it; the
// Static backend serves a fixed map for local development and tests.
package discovery

import (
	"net"
	"strconv"
	"time"
)

// Endpoint is one instance of a service. Endpoints handed out in a Snapshot
// are shared and must not be modified.
type Endpoint struct {
	// ID is unique within the service: the Consul service ID, or host:port
	// for static endpoints.
	ID      string
	Address string
	Port    int
	// Addr is Address and Port joined ("host:port"), computed once so that
	// the request path does not allocate it.
	Addr string
	Tags []string
	Meta map[string]string
	// Weight is the instance's relative weight; always at least 1.
	Weight int
}

// NewEndpoint returns an endpoint with Addr filled in and Weight at least 1.
func NewEndpoint(id, address string, port int, tags []string, meta map[string]string, weight int) Endpoint {
	if weight < 1 {
		weight = 1
	}
	return Endpoint{
		ID:      id,
		Address: address,
		Port:    port,
		Addr:    net.JoinHostPort(address, strconv.Itoa(port)),
		Tags:    tags,
		Meta:    meta,
		Weight:  weight,
	}
}

// HasTags reports whether e carries every tag in tags.
func (e *Endpoint) HasTags(tags []string) bool {
	for _, want := range tags {
		found := false
		for _, t := range e.Tags {
			if t == want {
				found = true
				break
			}
		}
		if !found {
			return false
		}
	}
	return true
}

// Snapshot is the complete healthy set of one service at one moment. It is
// immutable once published: a change produces a new Snapshot.
type Snapshot struct {
	Service string
	// Endpoints is sorted by ID.
	Endpoints []Endpoint
	// Updated is when the backend delivered this set. An answer that
	// confirms the set unchanged does not produce a new Snapshot (consumers
	// rebuild on a new pointer); Watch.Confirmed tells when the backend last
	// confirmed it.
	Updated time.Time
	// Stale is true while the backend fails, or while an empty answer after
	// an index reset or an outage is being ignored in favour of this last
	// good set.
	Stale bool
	// StaleSince is when the backend stopped confirming this set: the first
	// failed query, or the empty answer being ignored. Zero unless Stale.
	StaleSince time.Time
	// Err is the error that made the set stale, or nil. Watch.Err has the
	// latest one.
	Err error
	// Datacenter is the datacenter whose instances these are, for a watch
	// with failover (see FailoverKey); empty for other watches.
	Datacenter string
}
