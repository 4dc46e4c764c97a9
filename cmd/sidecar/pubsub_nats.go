package main

import (
	"fmt"

	"github.com/hashicorp/consul/api"
	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/zap"

	"github.com/sidecarlb/sidecar/config"
	"github.com/sidecarlb/sidecar/heartbeat"
	"github.com/sidecarlb/sidecar/pubsub"
	"github.com/sidecarlb/sidecar/pubsub/natsbroker"
	"github.com/sidecarlb/sidecar/pubsub/store"
)

// newNATSPubSub wires pub/sub on NATS JetStream (pubsub.broker: nats): the
// publish API over the broker and, for a subscriber, the delivery to the
// app. No peer listener: JetStream keeps custody; the store in data_dir is
// only the spool of on_unavailable: spool.
func newNATSPubSub(cfg *config.Config, reg prometheus.Registerer, appRegistrar *heartbeat.Registrar, log *zap.Logger) (*pubsubRuntime, error) {
	ps := &cfg.PubSub
	n := &ps.NATS
	metrics := pubsub.NewMetrics(reg)
	rt := &pubsubRuntime{cfg: cfg, log: log}
	source, instance := pubsub.DefaultSource, ""
	if cfg.Service != nil {
		source, instance = cfg.Service.Name, cfg.Service.ID
	}
	var spool *store.Store
	if n.OnUnavailable == config.UnavailableSpool {
		st, err := store.Open(ps.DataDir, store.Options{})
		if err != nil {
			return nil, fmt.Errorf("pubsub.data_dir: %w", err)
		}
		spool, rt.store = st, st
		reg.MustRegister(prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "sidecar_pubsub_outbox_messages", Help: "Messages in the spool, waiting for NATS."},
			func() float64 { return float64(st.Pending()) }))
	}
	closeSpool := func() {
		if spool != nil {
			_ = spool.Close()
		}
	}
	var subs []natsbroker.Subscription
	if len(cfg.Subscriptions) > 0 {
		svc := cfg.Service
		healthy := func() bool { return appRegistrar.Status().CheckStatus == api.HealthPassing }
		var appSubs []pubsub.Subscription
		for _, sub := range cfg.Subscriptions {
			appSubs = append(appSubs, appSubscription(sub, log))
			subs = append(subs, natsbroker.Subscription{
				Topic: sub.Topic, Group: sub.Group, Broadcast: sub.Delivery == config.DeliveryBroadcast, MaxInFlight: sub.MaxInFlight,
				Policy:     pubsub.Policy{MaxAttempts: sub.Retry.MaxAttempts, Backoff: sub.Retry.Backoff, MaxBackoff: sub.Retry.MaxBackoff},
				DeadLetter: sub.DeadLetterTopic, PerKey: sub.Ordering == config.OrderingPerKey,
			})
		}
		rt.app = pubsub.NewApp(svc.ProbeAddr(), appSubs, healthy, metrics, log.Named("pubsub"))
	}
	b, err := natsbroker.New(natsbroker.Options{
		URLs: n.URLs, CredentialsFile: n.CredentialsFile, Stream: n.Stream, SubjectPrefix: n.SubjectPrefix,
		Replicas: n.Replicas, MaxAge: n.MaxAge, AckWait: n.AckWait,
		Name: "sidecar " + source + " " + instance, Instance: instance, Metrics: metrics, Spool: spool,
	}, rt.app, subs, log.Named("broker"))
	if err != nil {
		closeSpool()
		return nil, fmt.Errorf("pubsub.nats: %w", err)
	}
	rt.broker, rt.nats = b, b
	reg.MustRegister(prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "sidecar_pubsub_nats_connected", Help: "1 while the sidecar is connected to NATS, else 0."},
		func() float64 {
			if b.Connected() {
				return 1
			}
			return 0
		}))
	apiHandler := pubsub.NewAPI(b, pubsub.APIOptions{Name: ps.Name, Source: source, MaxBytes: ps.MaxMessageBytesN, Metrics: metrics}, log.Named("pubsub"))
	s, err := bind(ps.Listen, apiHandler, cfg.Proxy.Timeouts, cfg.Proxy.MaxHeaderBytes, log)
	if err != nil {
		b.Close()
		closeSpool()
		return nil, fmt.Errorf("pubsub.listen: %w", err)
	}
	rt.servers = append(rt.servers, s)
	return rt, nil
}
