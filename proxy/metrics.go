package proxy

import (
	"github.com/prometheus/client_golang/prometheus"
)

// Metrics are the proxy's Prometheus metrics.
type Metrics struct {
	requests *prometheus.CounterVec
	refused  *prometheus.CounterVec
	duration *prometheus.HistogramVec
	inflight *prometheus.GaugeVec
}

// NewMetrics creates the proxy's metrics and registers them with reg, when
// reg is not nil.
func NewMetrics(reg prometheus.Registerer) *Metrics {
	m := &Metrics{
		requests: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "sidecar_upstream_requests_total",
			Help: "Requests answered by upstream nodes, by listener, service, endpoint and status class.",
		}, []string{"listener", "service", "endpoint", "code"}),
		refused: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "sidecar_proxy_errors_total",
			Help: "Requests the sidecar answered itself, by listener and reason (no_healthy_endpoints, connect_failed, upstream_timeout, unknown_service, ...).",
		}, []string{"listener", "service", "reason"}),
		duration: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name:    "sidecar_upstream_request_duration_seconds",
			Help:    "Time from receiving a request to the end of its response body.",
			Buckets: []float64{.0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10},
		}, []string{"listener", "service"}),
		inflight: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "sidecar_upstream_requests_in_flight",
			Help: "Requests being proxied now.",
		}, []string{"listener", "service"}),
	}
	if reg != nil {
		reg.MustRegister(m.requests, m.refused, m.duration, m.inflight)
	}
	return m
}

// routeMetrics are one route's metrics, resolved once so the request path
// does no label lookups.
type routeMetrics struct {
	listener, service string
	requests          *prometheus.CounterVec // curried: endpoint, code
	refusedVec        *prometheus.CounterVec
	duration          prometheus.Observer
	inflight          prometheus.Gauge
}

func (m *Metrics) route(listener, service string) routeMetrics {
	labels := prometheus.Labels{"listener": listener, "service": service}
	return routeMetrics{
		listener:   listener,
		service:    service,
		requests:   m.requests.MustCurryWith(labels),
		refusedVec: m.refused,
		duration:   m.duration.With(labels),
		inflight:   m.inflight.With(labels),
	}
}

func (m *routeMetrics) refused(reason string) {
	m.refusedVec.WithLabelValues(m.listener, m.service, reason).Inc()
}

var codeClasses = [...]string{"1xx", "2xx", "3xx", "4xx", "5xx"}

func codeClass(status int) int {
	c := status/100 - 1
	if c < 0 || c >= len(codeClasses) {
		return len(codeClasses) - 1
	}
	return c
}
