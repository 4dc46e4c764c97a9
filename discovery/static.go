package discovery

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"net"
	"slices"
	"strconv"
	"strings"
	"time"
)

// Static is a Backend serving a fixed map of services, for local development
// and tests. Its sets never change and are never stale. Service names are
// case-insensitive, as in Consul. Safe for concurrent use.
type Static struct {
	snaps map[string]*Snapshot // by lower-case name
}

// NewStatic returns a backend serving services, a map from service name to
// "host:port" entries. An endpoint's ID is its host:port. Every malformed
// name or entry is reported, and names that differ only in case.
func NewStatic(services map[string][]string) (*Static, error) {
	now := time.Now()
	s := &Static{snaps: make(map[string]*Snapshot, len(services))}
	var errs []error
	for _, name := range slices.Sorted(maps.Keys(services)) {
		if strings.TrimSpace(name) == "" {
			errs = append(errs, errors.New("static service with an empty name"))
			continue
		}
		key := strings.ToLower(name)
		if prev, dup := s.snaps[key]; dup {
			errs = append(errs, fmt.Errorf("static services %q and %q: names differ only in case", prev.Service, name))
			continue
		}
		eps := make([]Endpoint, 0, len(services[name]))
		for _, entry := range services[name] {
			ep, err := staticEndpoint(entry)
			if err != nil {
				errs = append(errs, fmt.Errorf("static service %q: %w", name, err))
				continue
			}
			if slices.ContainsFunc(eps, func(e Endpoint) bool { return e.ID == ep.ID }) {
				errs = append(errs, fmt.Errorf("static service %q: duplicate endpoint %q", name, entry))
				continue
			}
			eps = append(eps, ep)
		}
		slices.SortFunc(eps, func(a, b Endpoint) int { return strings.Compare(a.ID, b.ID) })
		s.snaps[key] = &Snapshot{Service: name, Endpoints: eps, Updated: now}
	}
	if len(errs) > 0 {
		return nil, errors.Join(errs...)
	}
	return s, nil
}

func staticEndpoint(entry string) (Endpoint, error) {
	host, port, err := net.SplitHostPort(entry)
	if err != nil {
		return Endpoint{}, fmt.Errorf("endpoint %q: want host:port: %w", entry, err)
	}
	if host == "" {
		return Endpoint{}, fmt.Errorf("endpoint %q: empty host", entry)
	}
	p, err := strconv.Atoi(port)
	if err != nil || p < 1 || p > 65535 {
		return Endpoint{}, fmt.Errorf("endpoint %q: port %q is not in 1-65535", entry, port)
	}
	id := net.JoinHostPort(host, strconv.Itoa(p))
	return NewEndpoint(id, host, p, nil, nil, 1), nil
}

// Watch publishes the fixed set of service (empty if it is not in the map)
// and blocks until ctx is done. A datacenter in the key (see Key) is
// ignored: the map has one.
func (s *Static) Watch(ctx context.Context, service string, sink Sink) {
	name, _ := SplitKey(service)
	snap := s.snaps[strings.ToLower(name)]
	if snap == nil {
		snap = &Snapshot{Service: service, Updated: time.Now()}
	}
	sink.Publish(snap)
	sink.Confirm(snap.Updated)
	<-ctx.Done()
}

// Known reports whether service is in the map. It never blocks.
func (s *Static) Known(_ context.Context, service string) (bool, error) {
	name, _ := SplitKey(service)
	_, ok := s.snaps[strings.ToLower(name)]
	return ok, nil
}

// Close does nothing; Static has no goroutines.
func (s *Static) Close() {}
