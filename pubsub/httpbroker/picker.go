package httpbroker

import (
	"context"
	"sync"

	"github.com/sidecarlb/sidecar/balancer"
	"github.com/sidecarlb/sidecar/discovery"
)

// Watcher is the part of *discovery.Cache the picker uses.
type Watcher interface {
	Watch(ctx context.Context, service string) (*discovery.Watch, error)
}

// picker picks one healthy instance of a group's peer service, round
// robin over the discovery cache's current snapshot.
type picker struct {
	cache Watcher
	mu    sync.Mutex
	bals  map[string]*pickState
}

type pickState struct {
	snap *discovery.Snapshot
	bal  balancer.Balancer
}

func newPicker(cache Watcher) *picker {
	return &picker{cache: cache, bals: map[string]*pickState{}}
}

// pick returns the address of one instance of service. It may block for the
// service's first snapshot (discovery.resolve_timeout).
func (p *picker) pick(ctx context.Context, service string) (string, error) {
	w, err := p.cache.Watch(ctx, service)
	if err != nil {
		return "", err
	}
	snap := w.Snapshot()
	p.mu.Lock()
	st := p.bals[service]
	if st == nil {
		st = &pickState{bal: balancer.NewRoundRobin()}
		p.bals[service] = st
	}
	if st.snap != snap {
		st.snap = snap
		st.bal.Update(snap.Endpoints)
	}
	p.mu.Unlock()
	pk, err := st.bal.Pick(balancer.Request{})
	if err != nil {
		return "", err
	}
	if pk.Done != nil {
		pk.Done(balancer.Result{})
	}
	return pk.Endpoint.Addr, nil
}

// instances returns the IDs of service's live instances.
func (p *picker) instances(ctx context.Context, service string) ([]string, error) {
	w, err := p.cache.Watch(ctx, service)
	if err != nil {
		return nil, err
	}
	eps := w.Snapshot().Endpoints
	ids := make([]string, len(eps))
	for i := range eps {
		ids[i] = eps[i].ID
	}
	return ids, nil
}

// instance returns the address of service's live instance id; ok is false
// when it is not live.
func (p *picker) instance(ctx context.Context, service, id string) (addr string, ok bool, err error) {
	w, err := p.cache.Watch(ctx, service)
	if err != nil {
		return "", false, err
	}
	for _, e := range w.Snapshot().Endpoints {
		if e.ID == id {
			return e.Addr, true, nil
		}
	}
	return "", false, nil
}
