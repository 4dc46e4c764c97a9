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
)

// newNATSPubSub wires pub/sub on NATS JetStream (pubsub.broker: nats): the
// publish API over the broker and, for a subscriber, the delivery to the
// app. No store and no peer listener: JetStream keeps custody.
func newNATSPubSub(cfg *config.Config, reg prometheus.Registerer, appRegistrar *heartbeat.Registrar, log *zap.Logger) (*pubsubRuntime, error) {
	ps := &cfg.PubSub
	n := &ps.NATS
	metrics := pubsub.NewMetrics(reg)
	rt := &pubsubRuntime{cfg: cfg, log: log}
	source, instance := pubsub.DefaultSource, ""
	if cfg.Service != nil {
		source, instance = cfg.Service.Name, cfg.Service.ID
	}
	if n.OnUnavailable == config.UnavailableSpool {
		log.Warn("pubsub.nats.on_unavailable spool is not built yet: publishing answers 503 with Retry-After while NATS is down")
	}
	var subs []natsbroker.Subscription
	if len(cfg.Subscriptions) > 0 {
		svc := cfg.Service
		healthy := func() bool { return appRegistrar.Status().CheckStatus == api.HealthPassing }
		var appSubs []pubsub.Subscription
		for _, sub := range cfg.Subscriptions {
			appSubs = append(appSubs, pubsub.Subscription{Topic: sub.Topic, Group: sub.Group, Route: sub.Route, ContentMode: sub.ContentMode, MaxInFlight: sub.MaxInFlight, Timeout: sub.Timeout})
			subs = append(subs, natsbroker.Subscription{
				Topic: sub.Topic, Group: sub.Group, Broadcast: sub.Delivery == config.DeliveryBroadcast, MaxInFlight: sub.MaxInFlight,
				Policy:     pubsub.Policy{MaxAttempts: sub.Retry.MaxAttempts, Backoff: sub.Retry.Backoff, MaxBackoff: sub.Retry.MaxBackoff},
				DeadLetter: sub.DeadLetterTopic,
			})
		}
		rt.app = pubsub.NewApp(svc.ProbeAddr(), appSubs, healthy, metrics, log.Named("pubsub"))
	}
	b, err := natsbroker.New(natsbroker.Options{
		URLs: n.URLs, CredentialsFile: n.CredentialsFile, Stream: n.Stream, SubjectPrefix: n.SubjectPrefix,
		Replicas: n.Replicas, MaxAge: n.MaxAge, AckWait: n.AckWait,
		Name: "sidecar " + source + " " + instance, Instance: instance, Metrics: metrics,
	}, rt.app, subs, log.Named("broker"))
	if err != nil {
		return nil, fmt.Errorf("pubsub.nats: %w", err)
	}
	rt.broker, rt.nats = b, b
	apiHandler := pubsub.NewAPI(b, pubsub.APIOptions{Name: ps.Name, Source: source, MaxBytes: ps.MaxMessageBytesN, Metrics: metrics}, log.Named("pubsub"))
	s, err := bind(ps.Listen, apiHandler, cfg.Proxy.Timeouts, cfg.Proxy.MaxHeaderBytes, log)
	if err != nil {
		b.Close()
		return nil, fmt.Errorf("pubsub.listen: %w", err)
	}
	rt.servers = append(rt.servers, s)
	return rt, nil
}
