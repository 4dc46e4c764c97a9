package main

import (
	"context"
	"encoding/json"
	"net/http"
	"sync"
	"time"

	"go.uber.org/zap"

	"github.com/sidecarlb/sidecar/config"
	"github.com/sidecarlb/sidecar/heartbeat"
)

// drainer takes the instance out of rotation, once: /ready answers 503
// "draining", the instance is deregistered, and service.drain passes so
// peers stop sending. The admin route /drain (a Kubernetes preStop hook)
// and shutdown share it, so a shutdown after /drain does none of it again,
// and one during /drain waits for it to finish.
type drainer struct {
	once      sync.Once
	ready     *readiness
	registrar *heartbeat.Registrar   // nil for a client-only sidecar
	pubsub    *pubsubRuntime         // nil without pub/sub
	service   func() *config.Service // the running config's; nil for a client-only sidecar
	log       *zap.Logger
	res       drainResult // set inside once
}

// drainResult is the JSON answer of /drain.
type drainResult struct {
	OK           bool    `json:"ok"`
	Deregistered string  `json:"deregistered,omitempty"` // the service id
	Seconds      float64 `json:"seconds"`
	Error        string  `json:"error,omitempty"`
}

// drain drains the first time it is called, sleeping service.drain only if
// sleep is true, and returns the result of that first drain. It blocks until
// the drain is done; it is safe for concurrent use.
func (d *drainer) drain(sleep bool) drainResult {
	d.once.Do(func() {
		start := time.Now()
		d.ready.draining.Store(true)
		d.res.OK = true
		svc := d.service()
		// Pub/sub stops taking deliveries and finishes those in flight
		// (bounded by service.drain) while the service leaves the catalog.
		pubsubDone := d.pubsub.beginDrain(svc)
		if d.registrar != nil {
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			if err := d.registrar.Deregister(ctx); err != nil {
				d.log.Warn("deregister failed", zap.Error(err))
				d.res.OK, d.res.Error = false, err.Error()
			} else {
				d.log.Info("deregistered", zap.String("id", d.registrar.ServiceID()))
				d.res.Deregistered = d.registrar.ServiceID()
			}
			cancel()
			if sleep && svc != nil && svc.Drain > 0 {
				d.log.Info("draining", zap.Duration("drain", svc.Drain))
				time.Sleep(svc.Drain)
			}
		}
		<-pubsubDone
		d.res.Seconds = time.Since(start).Seconds()
	})
	return d.res
}

// ServeHTTP is POST (or GET) /drain: drain, and answer once service.drain
// has passed; 500 if the deregistration failed (the drain still waited).
func (d *drainer) ServeHTTP(w http.ResponseWriter, _ *http.Request) {
	res := d.drain(true)
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Cache-Control", "no-store")
	if !res.OK {
		w.WriteHeader(http.StatusInternalServerError)
	}
	_ = json.NewEncoder(w).Encode(res)
}
