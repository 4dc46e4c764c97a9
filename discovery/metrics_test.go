package discovery

import (
	"context"
	"fmt"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/zap/zaptest"
)

// TestCollector: the sidecar_discovery_* gauges follow each watched
// service: its endpoint count, whether it is served stale, and for how
// long, whether ACLs hide it, read at scrape time; the one counter
// (_total) counts the answers ACLs filtered.
func TestCollector(t *testing.T) {
	clock := newFakeClock()
	f := newFakeConsul()
	b := NewConsul(f, f, ConsulOptions{BackoffMin: 5 * time.Millisecond, BackoffMax: 20 * time.Millisecond, Now: clock.Now},
		zaptest.NewLogger(t))
	c := newTestCache(t, b, CacheOptions{Now: clock.Now})
	reg := prometheus.NewPedanticRegistry()
	reg.MustRegister(c.Collector())
	// check compares every series gathered, one "name{service="s"} value"
	// a line, sorted, with want.
	check := func(t *testing.T, want string) {
		t.Helper()
		mfs, err := reg.Gather()
		if err != nil {
			t.Fatal(err)
		}
		var lines []string
		for _, mf := range mfs {
			counter := strings.HasSuffix(mf.GetName(), "_total")
			switch typ := mf.GetType().String(); {
			case counter && typ != "COUNTER":
				t.Errorf("%s is a %v, want a counter", mf.GetName(), typ)
			case !counter && typ != "GAUGE":
				t.Errorf("%s is a %v, want a gauge", mf.GetName(), typ)
			}
			for _, m := range mf.GetMetric() {
				var labels []string
				for _, lp := range m.GetLabel() {
					labels = append(labels, fmt.Sprintf("%s=%q", lp.GetName(), lp.GetValue()))
				}
				v := m.GetGauge().GetValue()
				if counter {
					v = m.GetCounter().GetValue()
				}
				lines = append(lines, fmt.Sprintf("%s{%s} %v", mf.GetName(), strings.Join(labels, ","), v))
			}
		}
		slices.Sort(lines)
		if got, want := strings.Join(lines, "\n"), strings.TrimSpace(want); got != want {
			t.Errorf("gathered:\n%s\nwant:\n%s", got, want)
		}
	}
	check(t, "sidecar_discovery_acl_blocked_answers_total{} 0") // no service watched: no series of one

	f.set(10, "web", node("a", 1), node("b", 2))
	f.set(11, "api", node("c", 3))
	for _, s := range []string{"web", "api"} {
		if _, err := c.Watch(context.Background(), s); err != nil {
			t.Fatal(err)
		}
	}
	check(t, `
sidecar_discovery_acl_blocked_answers_total{} 0
sidecar_discovery_acl_blocked{service="api"} 0
sidecar_discovery_acl_blocked{service="web"} 0
sidecar_discovery_endpoints{service="api"} 1
sidecar_discovery_endpoints{service="web"} 2
sidecar_discovery_snapshot_age_seconds{service="api"} 0
sidecar_discovery_snapshot_age_seconds{service="web"} 0
sidecar_discovery_stale{service="api"} 0
sidecar_discovery_stale{service="web"} 0
`)

	w, _ := c.Watch(context.Background(), "web")
	a, _ := c.Watch(context.Background(), "api")
	f.set(12, "web", node("a", 1))
	waitUntil(t, "web down to one endpoint", func() bool { return len(w.Snapshot().Endpoints) == 1 })
	f.setErr(errDown)
	waitUntil(t, "stale", func() bool { return w.Snapshot().Stale && a.Snapshot().Stale })
	clock.Add(90 * time.Second)
	check(t, `
sidecar_discovery_acl_blocked_answers_total{} 0
sidecar_discovery_acl_blocked{service="api"} 0
sidecar_discovery_acl_blocked{service="web"} 0
sidecar_discovery_endpoints{service="api"} 1
sidecar_discovery_endpoints{service="web"} 1
sidecar_discovery_snapshot_age_seconds{service="api"} 90
sidecar_discovery_snapshot_age_seconds{service="web"} 90
sidecar_discovery_stale{service="api"} 1
sidecar_discovery_stale{service="web"} 1
`)

	f.setErr(nil)
	waitUntil(t, "fresh", func() bool { return !w.Snapshot().Stale })
	waitUntil(t, "api fresh", func() bool { return !a.Snapshot().Stale })
	check(t, `
sidecar_discovery_acl_blocked_answers_total{} 0
sidecar_discovery_acl_blocked{service="api"} 0
sidecar_discovery_acl_blocked{service="web"} 0
sidecar_discovery_endpoints{service="api"} 1
sidecar_discovery_endpoints{service="web"} 1
sidecar_discovery_snapshot_age_seconds{service="api"} 0
sidecar_discovery_snapshot_age_seconds{service="web"} 0
sidecar_discovery_stale{service="api"} 0
sidecar_discovery_stale{service="web"} 0
`)
}

// dcBackend publishes one endpoint of each service, served by dc2.
type dcBackend struct{}

func (dcBackend) Watch(ctx context.Context, service string, sink Sink) {
	s := snap(nil, "a")
	s.Service, s.Datacenter = service, "dc2"
	sink.Publish(s)
	<-ctx.Done()
}
func (dcBackend) Known(context.Context, string) (bool, error) { return true, nil }
func (dcBackend) Close()                                      {}

// TestCollectorServingDatacenter: a watch with failover says which
// datacenter serves it, in the metrics and in Snapshots.
func TestCollectorServingDatacenter(t *testing.T) {
	c := newTestCache(t, dcBackend{}, CacheOptions{})
	if _, err := c.Watch(context.Background(), "web|dc2"); err != nil {
		t.Fatal(err)
	}
	if st := c.Snapshots(); len(st) != 1 || st[0].Datacenter != "dc2" {
		t.Errorf("Snapshots() = %+v, want web|dc2 served by dc2", st)
	}
	reg := prometheus.NewPedanticRegistry()
	reg.MustRegister(c.Collector())
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	found := false
	for _, mf := range mfs {
		if mf.GetName() != "sidecar_discovery_serving_datacenter" {
			continue
		}
		for _, m := range mf.GetMetric() {
			var labels []string
			for _, lp := range m.GetLabel() {
				labels = append(labels, lp.GetName()+"="+lp.GetValue())
			}
			if got := strings.Join(labels, ","); got == "datacenter=dc2,service=web|dc2" && m.GetGauge().GetValue() == 1 {
				found = true
			} else {
				t.Errorf("serving_datacenter{%s} = %v", got, m.GetGauge().GetValue())
			}
		}
	}
	if !found {
		t.Errorf("no sidecar_discovery_serving_datacenter{service=\"web|dc2\",datacenter=\"dc2\"} 1")
	}
}
