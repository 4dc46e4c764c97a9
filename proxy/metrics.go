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

	retries            *prometheus.CounterVec
	breakerState       *prometheus.GaugeVec
	breakerTransitions *prometheus.CounterVec
	ejections          *prometheus.CounterVec
	ejectionsRefused   *prometheus.CounterVec
	overflows          *prometheus.CounterVec
	schemaFetches      *prometheus.CounterVec
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
	m.retries = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "sidecar_retries_total",
		Help: "Retries made, and retries the budget refused (outcome=budget_exhausted), by reason.",
	}, []string{"listener", "service", "reason", "outcome"})
	m.breakerState = prometheus.NewGaugeVec(prometheus.GaugeOpts{
		Name: "sidecar_breaker_state",
		Help: "Circuit breaker state per endpoint: 0 closed, 1 half-open, 2 open.",
	}, []string{"listener", "service", "endpoint"})
	m.breakerTransitions = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "sidecar_breaker_transitions_total",
		Help: "Circuit breaker state changes per endpoint, by the state entered.",
	}, []string{"listener", "service", "endpoint", "state"})
	m.ejections = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "sidecar_outlier_ejections_total",
		Help: "Endpoints ejected from balancing after consecutive gateway failures.",
	}, []string{"listener", "service", "endpoint"})
	m.ejectionsRefused = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "sidecar_outlier_ejections_refused_total",
		Help: "Ejections not made because max_ejection_percent of the nodes were already out.",
	}, []string{"listener", "service"})
	m.overflows = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "sidecar_upstream_overflows_total",
		Help: "Tries refused because their node was at one of the sidecar's limits for it, by limit (max_connections, max_pending_requests, max_requests).",
	}, []string{"listener", "service", "endpoint", "limit"})
	m.schemaFetches = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "sidecar_codec_schema_fetches_total",
		Help: "Schema fetches of transcoding upstreams (gRPC reflection calls, descriptor-set look-ups), by source and result (ok, no_schema, unknown_service, error).",
	}, []string{"listener", "service", "source", "result"})
	if reg != nil {
		reg.MustRegister(m.requests, m.refused, m.duration, m.inflight,
			m.retries, m.breakerState, m.breakerTransitions, m.ejections, m.ejectionsRefused, m.overflows, m.schemaFetches)
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

	retries            *prometheus.CounterVec // curried: reason, outcome
	breakerState       *prometheus.GaugeVec   // curried: endpoint
	breakerTransitions *prometheus.CounterVec // curried: endpoint, state
	ejections          *prometheus.CounterVec // curried: endpoint
	ejectionsRefused   prometheus.Counter
	overflows          *prometheus.CounterVec // curried: endpoint, limit
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

		retries:            m.retries.MustCurryWith(labels),
		breakerState:       m.breakerState.MustCurryWith(labels),
		breakerTransitions: m.breakerTransitions.MustCurryWith(labels),
		ejections:          m.ejections.MustCurryWith(labels),
		ejectionsRefused:   m.ejectionsRefused.With(labels),
		overflows:          m.overflows.MustCurryWith(labels),
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
