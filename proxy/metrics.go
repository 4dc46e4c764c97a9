package proxy

import (
	"net/http"
	"strconv"
	"strings"
	"sync/atomic"

	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/grpc/codes"
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

	tcpConnections *prometheus.CounterVec
	tcpDuration    *prometheus.HistogramVec

	// endpointLabels is false when metrics.endpoint_labels turns the
	// per-endpoint labels off: their series then carry endpoint="".
	endpointLabels bool
}

// MetricsOptions configure NewMetricsWith.
type MetricsOptions struct {
	// NoEndpointLabels leaves the endpoint label of every series empty,
	// for services of many nodes, and keeps no per-endpoint breaker state
	// series (metrics.endpoint_labels: false).
	NoEndpointLabels bool
}

// NewMetrics creates the proxy's metrics and registers them with reg, when
// reg is not nil.
func NewMetrics(reg prometheus.Registerer) *Metrics {
	return NewMetricsWith(reg, MetricsOptions{})
}

// NewMetricsWith is NewMetrics with options.
func NewMetricsWith(reg prometheus.Registerer, o MetricsOptions) *Metrics {
	m := &Metrics{
		endpointLabels: !o.NoEndpointLabels,
		requests: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "sidecar_upstream_requests_total",
			Help: "Requests answered by upstream nodes, by listener, service, endpoint, status class and, for gRPC calls, grpc_code (OK, NotFound, ...).",
		}, []string{"listener", "service", "endpoint", "code", "grpc_code"}),
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
	m.tcpConnections = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "sidecar_tcp_connections_total",
		Help: "TCP connections carried to a node, by listener, service and endpoint (tcp upstreams; those refused are in sidecar_proxy_errors_total).",
	}, []string{"listener", "service", "endpoint"})
	m.tcpDuration = prometheus.NewHistogramVec(prometheus.HistogramOpts{
		Name:    "sidecar_tcp_connection_duration_seconds",
		Help:    "Time from accepting a TCP connection to its end (tcp upstreams).",
		Buckets: []float64{.01, .1, 1, 10, 60, 300, 1800, 3600, 4 * 3600},
	}, []string{"listener", "service"})
	if reg != nil {
		reg.MustRegister(m.requests, m.refused, m.duration, m.inflight,
			m.retries, m.breakerState, m.breakerTransitions, m.ejections, m.ejectionsRefused, m.overflows, m.schemaFetches,
			m.tcpConnections, m.tcpDuration)
	}
	return m
}

// routeMetrics are one route's metrics, resolved once so the request path
// does no label lookups.
type routeMetrics struct {
	listener, service string
	endpointLabels    bool
	requests          *prometheus.CounterVec // curried: endpoint, code, grpc_code
	requestsAll       *prometheus.CounterVec // not curried, for retire
	refusedVec        *prometheus.CounterVec
	duration          prometheus.Observer
	inflight          prometheus.Gauge

	retries            *prometheus.CounterVec // curried: reason, outcome
	breakerState       *prometheus.GaugeVec   // curried: endpoint
	breakerTransitions *prometheus.CounterVec // curried: endpoint, state
	ejections          *prometheus.CounterVec // curried: endpoint
	ejectionsRefused   *prometheus.CounterVec // curried, no label left: made at the first refusal
	overflows          *prometheus.CounterVec // curried: endpoint, limit

	tcpConnections *prometheus.CounterVec // curried: endpoint
	tcpDuration    prometheus.ObserverVec // curried, no label left: made at the first TCP connection
}

func (m *Metrics) route(listener, service string) routeMetrics {
	labels := prometheus.Labels{"listener": listener, "service": service}
	return routeMetrics{
		listener:       listener,
		service:        service,
		endpointLabels: m.endpointLabels,
		requests:       m.requests.MustCurryWith(labels),
		requestsAll:    m.requests,
		refusedVec:     m.refused,
		duration:       m.duration.With(labels),
		inflight:       m.inflight.With(labels),

		retries:            m.retries.MustCurryWith(labels),
		breakerState:       m.breakerState.MustCurryWith(labels),
		breakerTransitions: m.breakerTransitions.MustCurryWith(labels),
		ejections:          m.ejections.MustCurryWith(labels),
		ejectionsRefused:   m.ejectionsRefused.MustCurryWith(labels),
		overflows:          m.overflows.MustCurryWith(labels),

		tcpConnections: m.tcpConnections.MustCurryWith(labels),
		tcpDuration:    m.tcpDuration.MustCurryWith(labels),
	}
}

// endpoint is the endpoint label of node addr: addr, or "" when
// metrics.endpoint_labels is off.
func (m *routeMetrics) endpoint(addr string) string {
	if !m.endpointLabels {
		return ""
	}
	return addr
}

// breakerStates are the states sidecar_breaker_transitions_total counts.
var breakerStates = [...]string{"closed", "half-open", "open"}

// retire deletes the series of node addr, which has left the route.
func (m *routeMetrics) retire(addr string) {
	if !m.endpointLabels {
		return // the series are the route's, shared by every node
	}
	// Every code and grpc_code; on the whole vector, since a curried
	// one's partial match ignores the listener and service.
	m.requestsAll.DeletePartialMatch(prometheus.Labels{"listener": m.listener, "service": m.service, "endpoint": addr})
	m.breakerState.DeleteLabelValues(addr)
	for _, state := range breakerStates {
		m.breakerTransitions.DeleteLabelValues(addr, state)
	}
	m.ejections.DeleteLabelValues(addr)
	for _, name := range limitNames {
		m.overflows.DeleteLabelValues(addr, name)
	}
	m.tcpConnections.DeleteLabelValues(addr)
}

func (m *routeMetrics) refused(reason string) {
	m.refusedVec.WithLabelValues(m.listener, m.service, reason).Inc()
}

var codeClasses = [...]string{"1xx", "2xx", "3xx", "4xx", "5xx"}

// lazyCounter is a counter series made at its first increment, or up
// front. A route of the forward proxy is made for whatever service a
// client names, often for a request or two, and each series costs about
// 700 bytes: made up front, the per-node series of answers never seen
// (1xx, 3xx, 4xx, 5xx) and of overflows never had took 20 MB at 5,000
// services. Configured upstreams still make theirs up front (newEndpoint).
// Once made, the series is read with one atomic load. Safe for concurrent
// use.
type lazyCounter struct{ p atomic.Pointer[counterBox] }

type counterBox struct{ prometheus.Counter }

// get returns the series, nil until set.
func (l *lazyCounter) get() prometheus.Counter {
	if b := l.p.Load(); b != nil {
		return b.Counter
	}
	return nil
}

// set stores c unless a series is there already, and returns the one
// stored.
func (l *lazyCounter) set(c prometheus.Counter) prometheus.Counter {
	if l.p.CompareAndSwap(nil, &counterBox{c}) {
		return c
	}
	return l.p.Load().Counter
}

// make returns the series, making it in vec (with label values lvs) at
// its first use. A node that retired (retired, when its series are its
// own) gets a counter no scrape sees, since its series are gone; one made
// as it retires is deleted again, as retire deleted those made before. A
// series made for a newer endpoint at the same address is not touched.
func (l *lazyCounter) make(vec *prometheus.CounterVec, retired *atomic.Bool, lvs ...string) prometheus.Counter {
	if c := l.get(); c != nil {
		return c
	}
	if retired != nil && retired.Load() {
		return l.set(prometheus.NewCounter(prometheus.CounterOpts{Name: "sidecar_retired_series"}))
	}
	c := l.set(vec.WithLabelValues(lvs...))
	if retired != nil && retired.Load() {
		vec.DeleteLabelValues(lvs...)
	}
	return c
}

// countAnswer counts an answer of the given status from e in its
// sidecar_upstream_requests_total series, made at the first answer of its
// class. It does not allocate once the series exists.
func (m *routeMetrics) countAnswer(e *endpoint, status int) {
	class := codeClass(status)
	if b := e.requests[class].p.Load(); b != nil {
		b.Inc()
		return
	}
	m.newAnswerSeries(e, class).Inc()
}

// newAnswerSeries makes e's series of answers of class. A series made
// after e retired (a request in flight when its node left) is deleted
// again, as retire deleted those made before.
func (m *routeMetrics) newAnswerSeries(e *endpoint, class int) prometheus.Counter {
	var retired *atomic.Bool
	if m.endpointLabels {
		retired = &e.retired
	}
	return e.requests[class].make(m.requests, retired, m.endpoint(e.Addr), codeClasses[class], "")
}

func codeClass(status int) int {
	c := status/100 - 1
	if c < 0 || c >= len(codeClasses) {
		return len(codeClasses) - 1
	}
	return c
}

// isGRPCResponse reports whether resp is a gRPC call's answer.
func isGRPCResponse(resp *http.Response) bool {
	ct := resp.Header["Content-Type"]
	return len(ct) > 0 && strings.HasPrefix(ct[0], "application/grpc")
}

// grpcCall counts a gRPC call node e answered with resp, whose body has
// been read: by its status class and its grpc-status (from the trailers,
// or the header of a trailers-only answer), by name. An answer that ends
// without a status counts as Unknown, as a gRPC client sees it.
func (m *routeMetrics) grpcCall(e *endpoint, resp *http.Response) {
	code := codes.Unknown.String()
	v, ok := resp.Trailer["Grpc-Status"]
	if !ok {
		v, ok = resp.Header["Grpc-Status"]
	}
	if ok && len(v) > 0 {
		if n, err := strconv.ParseUint(v[0], 10, 32); err == nil && n <= uint64(codes.Unauthenticated) { // no label per stray number
			code = codes.Code(n).String()
		}
	}
	m.requests.WithLabelValues(m.endpoint(e.Addr), codeClasses[codeClass(resp.StatusCode)], code).Inc()
}
