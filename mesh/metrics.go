package mesh

import "github.com/prometheus/client_golang/prometheus"

// Metrics are the mesh's Prometheus series. A nil *Metrics counts nothing.
type Metrics struct {
	refusedPeers *prometheus.CounterVec // side, reason
	authz        *prometheus.CounterVec // caller, result
	inbound      *prometheus.CounterVec // kind: mtls, plaintext, refused_plaintext
}

// NewMetrics registers the mesh's series with reg.
func NewMetrics(reg prometheus.Registerer) *Metrics {
	m := &Metrics{
		refusedPeers: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "sidecar_mesh_peer_refused_total",
			Help: "TLS handshakes refused for the peer's certificate, by side (inbound, outbound) and reason (untrusted, not_service_id, wrong_service, not_ready).",
		}, []string{"side", "reason"}),
		authz: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "sidecar_mesh_authorize_total",
			Help: "Inbound connections authorized by intention, by caller service and result (allowed, denied).",
		}, []string{"caller", "result"}),
		inbound: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "sidecar_mesh_inbound_connections_total",
			Help: "Connections accepted on the inbound listener, by kind (mtls, plaintext, refused_plaintext, handshake_failed).",
		}, []string{"kind"}),
	}
	reg.MustRegister(m.refusedPeers, m.authz, m.inbound)
	return m
}

func (m *Metrics) refused(side, reason string) {
	if m != nil {
		m.refusedPeers.WithLabelValues(side, reason).Inc()
	}
}

func (m *Metrics) authorized(caller string, ok bool) {
	if m == nil {
		return
	}
	result := "allowed"
	if !ok {
		result = "denied"
	}
	m.authz.WithLabelValues(caller, result).Inc()
}

func (m *Metrics) accepted(kind string) {
	if m != nil {
		m.inbound.WithLabelValues(kind).Inc()
	}
}

// RefusedCounter is the counter of refused peers for side and reason.
func (m *Metrics) RefusedCounter(side, reason string) prometheus.Counter {
	return m.refusedPeers.WithLabelValues(side, reason)
}

// AuthorizeCounter is the counter of authorizations of caller with result
// (allowed or denied).
func (m *Metrics) AuthorizeCounter(caller, result string) prometheus.Counter {
	return m.authz.WithLabelValues(caller, result)
}

// InboundCounter is the counter of inbound connections of kind.
func (m *Metrics) InboundCounter(kind string) prometheus.Counter {
	return m.inbound.WithLabelValues(kind)
}
