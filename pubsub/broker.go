package pubsub

import "context"

// Broker carries published messages from this sidecar to every group
// subscribed to their topic. pubsub.broker names one: "http"
// (pubsub/httpbroker: the outbox here keeps custody and delivers peer to
// peer over Consul); a NATS JetStream broker is to come with the same
// contract:
//
//   - Publish (the API's Sink) returns nil only once every message is
//     durable, here or in the broker; an error means none is;
//   - each group gets each message at least once, or the message ends in
//     the subscription's dead-letter topic with deadletterreason and
//     deadletterattempts;
//   - one owner of retries, counting only deliveries that reached an app,
//     with the subscription's Policy and the app's answer as Classify reads
//     it; the subscriber's sidecar delivers through App.
type Broker interface {
	Sink
	// Run delivers until ctx ends, then returns once what is out has come
	// back or been given up (to be sent again by the next run). It blocks.
	Run(ctx context.Context)
}
