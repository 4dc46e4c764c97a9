// Package natsbroker is the NATS JetStream pub/sub broker (pubsub.broker:
// nats): the same contract as the http broker (pubsub.Broker), with
// JetStream holding custody of every message instead of the publishing
// sidecar's disk.
//
// Publish: each message is one JetStream publish to the subject
// "<subject_prefix>.<topic>" of one stream (created if missing with the
// subjects "<subject_prefix>.>", replicas, max_age and a 10-minute
// duplicate window), with the message id as Nats-Msg-Id, so a repeated
// Idempotency-Key within the window is stored once. Every message, alone
// or in a bulk, is an async publish (jetstream's PublishMsgAsync): all of
// a request's messages are sent before any ack is awaited, and concurrent
// requests share the one connection's pipeline, within one in-flight
// window (Options.PublishWindow, room for a whole bulk request; a publish
// past it waits for a slot within the publish timeout, which also expires
// an ack that never comes). Publish returns only once the server has
// acknowledged every message: a 2xx is never answered for a message only
// in flight. When that fails (NATS
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
// the sidecar drains: messages pulled and not received plus those received
// and not settled never exceed it. The pulls go over one inbox
// subscription kept for the life of the subscription (puller), each a
// request for the slots free at that moment, sent once a quarter of them
// are free or at once when no pull is outstanding; each settled delivery
// gives its slot back, and the server's 408 (a request expired) or 409
// says what a request had left; after a 503 or a deleted consumer (409)
// the consumer is made again before the next pull. jetstream's Fetch, used before, made a
// new inbox subscription, timers and a channel for each pull and waited
// for the whole batch before the next (BenchmarkPullCycle). Messages go to
// the app as they arrive. While a
// delivery runs, one goroutine per subscription sends in-progress acks for
// every running delivery each third of ack_wait, so a slow handler is not
// redelivered. A continuous pull (jetstream's Messages or Consume) was
// measured and not kept: it pulls its window ahead of the app, so up to
// max_in_flight more messages wait in its buffer with ack_wait running
// and no in-progress ack, and a handler slower than ack_wait gets them
// redelivered to another instance (TestSlowHandler, TestPullBound). On
// SIGTERM the inbox subscription is drained and what came for it and was
// not started is nak'd at once. The request to the app goes over
// internal/h1's client pool (pubsub.App).
//
// A delivery that succeeded is settled with a plain Ack (one message to
// the server, no reply awaited), not AckSync: at-least-once needs the ack
// only after the app's 2xx, and an ack that is lost makes the message come
// again, which at-least-once allows; AckSync would add a round trip per
// message to learn that. A dead letter's ack awaits its reply (AckSync), since the
// message was published elsewhere first.
//
// Retries have one owner, the subscriber's sidecar: the attempt number is
// JetStream's delivery count of the message less the deliveries this
// sidecar made that never reached the app (below); a retry is a nak with the
// subscription's jittered backoff (or the app's Retry-After) as its delay;
// after max_attempts, or on a rejection, the message is published to the
// dead-letter topic (with deadletterreason and deadletterattempts) and only
// then acknowledged. The consumers have no MaxDeliver, since JetStream
// would drop a message that reached it without a dead letter. A message
// that never reached the app (draining, app unhealthy or not listening) is
// nak'd, at once when the sidecar is draining so another instance takes it.
//
// A consumer deleted while the sidecar runs (by an operator, or a
// broadcast one the server removed while this instance was away) is made
// again with DeliverNew: the messages published while it was gone, and
// those the old consumer held unacknowledged, are not delivered to that
// group. Deleting a durable consumer loses its state; to move a group
// past messages, use the consumer's own tools, not a delete.
package natsbroker
