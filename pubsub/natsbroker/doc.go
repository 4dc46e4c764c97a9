// Package natsbroker is the NATS JetStream pub/sub broker (pubsub.broker:
// nats): the same contract as the http broker (pubsub.Broker), with
// JetStream holding custody of every message instead of the publishing
// sidecar's disk.
//
// Publish: each message is one JetStream publish to the subject
// "<subject_prefix>.<topic>" of one stream (created if missing with the
// subjects "<subject_prefix>.>", replicas, max_age and a 10-minute
// duplicate window), with the message id as Nats-Msg-Id, so a repeated
// Idempotency-Key within the window is stored once. Publish returns only
// once the server has acknowledged every message. When that fails (NATS
// unreachable, no ack in time), with a Spool (pubsub.nats.on_unavailable:
// spool) the messages are appended to the fsynced store in data_dir
// instead, and Run's forwarder sends them, oldest first, once NATS is back,
// deleting each after its ack; without one (reject) Publish fails at once,
// answered 503 with Retry-After by the API.
//
// Delivery: a subscription's group is one durable pull consumer filtered
// on the topic's subject and shared by every instance of the group
// (competing consumers); a broadcast subscription gives each instance its
// own durable consumer, named after the instance and removed by the server
// after an hour without it. A subscriber pulls no more than the
// subscription's max_in_flight, and nothing while the app's check fails or
// the sidecar drains. While a delivery runs it sends in-progress acks every
// third of ack_wait, so a slow handler is not redelivered.
//
// Retries have one owner, the subscriber's sidecar: the attempt number is
// JetStream's delivery count of the message; a retry is a nak with the
// subscription's jittered backoff (or the app's Retry-After) as its delay;
// after max_attempts, or on a rejection, the message is published to the
// dead-letter topic (with deadletterreason and deadletterattempts) and only
// then acknowledged. The consumers have no MaxDeliver, since JetStream
// would drop a message that reached it without a dead letter. A message
// that never reached the app (draining, app unhealthy or not listening) is
// nak'd, at once when the sidecar is draining so another instance takes it.
package natsbroker
