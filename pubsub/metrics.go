package pubsub

import (
	"github.com/prometheus/client_golang/prometheus"
)

// Metrics are the pub/sub counters shared by the API, the delivery to the
// app and the broker. A nil *Metrics counts nothing.
type Metrics struct {
	Published   *prometheus.CounterVec // topic, result
	Delivered   *prometheus.CounterVec // topic, group, outcome (subscriber side: what the app answered)
	Outcomes    *prometheus.CounterVec // topic, group, outcome (publisher side: final outcomes)
	Attempts    *prometheus.CounterVec // topic, group
	DeadLetters *prometheus.CounterVec // topic, group, reason
	InFlight    *prometheus.GaugeVec   // topic, group
}

// NewMetrics registers the pub/sub metrics with reg.
func NewMetrics(reg prometheus.Registerer) *Metrics {
	m := &Metrics{
		Published: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "sidecar_pubsub_published_total", Help: "Publish requests by topic and result (ok, invalid, too_large, unavailable).",
		}, []string{"topic", "result"}),
		Delivered: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "sidecar_pubsub_delivered_total", Help: "Deliveries to the local app by topic, group and outcome.",
		}, []string{"topic", "group", "outcome"}),
		Outcomes: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "sidecar_pubsub_outcomes_total", Help: "Final outcomes of published messages by topic, group and outcome (success, drop, deadletter, no_subscribers).",
		}, []string{"topic", "group", "outcome"}),
		Attempts: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "sidecar_pubsub_attempts_total", Help: "Delivery attempts that reached a subscriber's app, by topic and group.",
		}, []string{"topic", "group"}),
		DeadLetters: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "sidecar_pubsub_dead_letters_total", Help: "Messages dead-lettered, by topic, group and reason.",
		}, []string{"topic", "group", "reason"}),
		InFlight: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "sidecar_pubsub_in_flight", Help: "Deliveries to the local app in flight, by topic and group.",
		}, []string{"topic", "group"}),
	}
	if reg != nil {
		reg.MustRegister(m.Published, m.Delivered, m.Outcomes, m.Attempts, m.DeadLetters, m.InFlight)
	}
	return m
}

func (m *Metrics) published(topic, result string) {
	if m != nil {
		m.Published.WithLabelValues(topic, result).Inc()
	}
}
