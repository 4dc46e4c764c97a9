package discovery

import "github.com/prometheus/client_golang/prometheus"

var (
	ageDesc = prometheus.NewDesc("sidecar_discovery_snapshot_age_seconds",
		"How long the service's endpoint set has gone unconfirmed by the registry.", []string{"service"}, nil)
	endpointsDesc = prometheus.NewDesc("sidecar_discovery_endpoints",
		"Healthy endpoints in the service's current set.", []string{"service"}, nil)
	staleDesc = prometheus.NewDesc("sidecar_discovery_stale",
		"1 while the service's set is served stale (registry failing or just reset).", []string{"service"}, nil)
	aclDesc = prometheus.NewDesc("sidecar_discovery_acl_blocked",
		"1 while the registry's ACLs filter the service's instances or deny its query.", []string{"service"}, nil)
	servingDesc = prometheus.NewDesc("sidecar_discovery_serving_datacenter",
		"1 for the datacenter whose instances a watch with failover serves.", []string{"service", "datacenter"}, nil)
	aclTotalDesc = prometheus.NewDesc("sidecar_discovery_acl_blocked_answers_total",
		"Answers of the registry that its ACLs filtered or denied.", nil, nil)
)

// Collector returns a Prometheus collector of the cache's watched services,
// read at scrape time.
func (c *Cache) Collector() prometheus.Collector { return cacheCollector{c} }

type cacheCollector struct{ c *Cache }

func (cc cacheCollector) Describe(ch chan<- *prometheus.Desc) {
	ch <- ageDesc
	ch <- endpointsDesc
	ch <- staleDesc
	ch <- aclDesc
	ch <- aclTotalDesc
	ch <- servingDesc
}

func (cc cacheCollector) Collect(ch chan<- prometheus.Metric) {
	for _, s := range cc.c.Snapshots() {
		ch <- prometheus.MustNewConstMetric(ageDesc, prometheus.GaugeValue, s.Age.Seconds(), s.Service)
		ch <- prometheus.MustNewConstMetric(endpointsDesc, prometheus.GaugeValue, float64(s.Endpoints), s.Service)
		stale := 0.0
		if s.Stale {
			stale = 1
		}
		ch <- prometheus.MustNewConstMetric(staleDesc, prometheus.GaugeValue, stale, s.Service)
		acl := 0.0
		if s.ACL != "" {
			acl = 1
		}
		ch <- prometheus.MustNewConstMetric(aclDesc, prometheus.GaugeValue, acl, s.Service)
		if s.Datacenter != "" {
			ch <- prometheus.MustNewConstMetric(servingDesc, prometheus.GaugeValue, 1, s.Service, s.Datacenter)
		}
	}
	ch <- prometheus.MustNewConstMetric(aclTotalDesc, prometheus.CounterValue, float64(cc.c.aclBlocked.Load()))
}
