package discovery

import (
	"github.com/hashicorp/consul/api"
)

// stateCheck is one check of the datacenter's health state, in the fields
// the state watch reads.
type stateCheck struct {
	Node        string
	CheckID     string
	Status      string
	ServiceID   string
	ServiceName string
	ServiceTags []string
}

// stateLister is a HealthClient that also lists the health state straight
// into stateChecks. Every change of any check re-sends the whole state
// (about 2 MB of JSON at 5,000 checks), and decoding it into
// api.HealthChecks, definitions and all, took 4 times the CPU and twice the
// garbage, on the path of every change to the balancers.
type stateLister interface {
	stateChecks(q *api.QueryOptions) ([]stateCheck, *api.QueryMeta, error)
}

// NewHealthClient returns the HealthClient of c: its *api.Health, and a
// cheaper read of the health state (/v1/health/state/any) for the state
// watch.
func NewHealthClient(c *api.Client) HealthClient {
	return slimHealth{Health: c.Health(), raw: c.Raw()}
}

type slimHealth struct {
	*api.Health
	raw *api.Raw
}

func (h slimHealth) stateChecks(q *api.QueryOptions) ([]stateCheck, *api.QueryMeta, error) {
	var out []stateCheck
	meta, err := h.raw.Query("/v1/health/state/"+api.HealthAny, &out, q)
	if err != nil {
		return nil, nil, err
	}
	return out, meta, nil
}

// healthState lists the health state of every check, through the
// stateLister when health is one.
func healthState(health HealthClient, q *api.QueryOptions) ([]stateCheck, *api.QueryMeta, error) {
	if sl, ok := health.(stateLister); ok {
		return sl.stateChecks(q)
	}
	checks, meta, err := health.State(api.HealthAny, q)
	if err != nil {
		return nil, meta, err
	}
	out := make([]stateCheck, 0, len(checks))
	for _, ch := range checks {
		if ch != nil {
			out = append(out, stateCheck{Node: ch.Node, CheckID: ch.CheckID, Status: ch.Status,
				ServiceID: ch.ServiceID, ServiceName: ch.ServiceName, ServiceTags: ch.ServiceTags})
		}
	}
	return out, meta, nil
}
