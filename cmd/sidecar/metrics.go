package main

import (
	"runtime"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/sidecarlb/sidecar/heartbeat"
	"github.com/sidecarlb/sidecar/supervisor"
)

// registerBuildInfo exports sidecar_build_info, 1 with the version and the
// Go release as labels.
func registerBuildInfo(reg prometheus.Registerer) {
	g := prometheus.NewGauge(prometheus.GaugeOpts{
		Name:        "sidecar_build_info",
		Help:        "The sidecar's version and Go release; always 1.",
		ConstLabels: prometheus.Labels{"version": version, "goversion": runtime.Version()},
	})
	g.Set(1)
	reg.MustRegister(g)
}

// registerHeartbeatMetrics exports the registrar's probe state, read at
// each scrape.
func registerHeartbeatMetrics(reg prometheus.Registerer, r *heartbeat.Registrar) {
	reg.MustRegister(
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name: "sidecar_heartbeat_last_pass_timestamp_seconds",
			Help: "When the app's health probe last passed, in Unix seconds; 0 before it first passes.",
		}, func() float64 {
			if t := r.Status().LastPass; !t.IsZero() {
				return float64(t.UnixNano()) / 1e9
			}
			return 0
		}),
		prometheus.NewCounterFunc(prometheus.CounterOpts{
			Name: "sidecar_heartbeat_probe_failures_total",
			Help: "Health probes of the app that failed.",
		}, func() float64 { return float64(r.Status().ProbeFailures) }),
	)
}

// registerAppMetrics exports the supervised app's restarts and memory,
// read at each scrape.
func registerAppMetrics(reg prometheus.Registerer, app *supervisor.App) {
	reg.MustRegister(
		prometheus.NewCounterFunc(prometheus.CounterOpts{
			Name: "sidecar_app_restarts_total",
			Help: "Starts of the supervised app after its first (service.run), automatic or asked for.",
		}, func() float64 { return float64(app.Status().Restarts) }),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name: "sidecar_app_resident_memory_bytes",
			Help: "Resident memory of the supervised app's process group; 0 while it does not run.",
		}, func() float64 { return float64(app.Status().RSSBytes) }),
	)
}
