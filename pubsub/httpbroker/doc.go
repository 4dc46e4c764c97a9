// Package httpbroker is the http pub/sub broker: sidecars deliver to each
// other directly, with Consul as the only shared state.
//
// Custody: the publishing sidecar keeps every message in its outbox (the
// store) until each group subscribed to the topic has a final outcome
// (success, drop, dead-lettered). It owns the retries: it counts attempts
// that reached an app, waits a jittered doubling backoff (or the app's
// Retry-After) between them, and dead-letters a message by storing it under
// the dead-letter topic in the same commit that finishes the original.
//
// Membership: a subscribing sidecar writes one record per subscription to
// Consul KV (Registry), under sidecar/pubsub/subscriptions/<topic>/<group>,
// so a group, once subscribed, is durable: messages wait in the publishers'
// outboxes while all its instances are down. It also registers the service
// "pubsub-<group>" for its peer listener, with a TTL check that follows the
// app's own probe, so a group's live instances are its healthy endpoints.
// Publishers watch the KV prefix with a blocking query and pick one healthy
// instance per batch through the discovery cache and a round-robin
// balancer.
//
// Delivery: the Dispatcher keeps one lane per topic and group; a lane sends
// batches of up to the subscription's max_in_flight messages, at most
// lanesInFlight at once, as one POST /v1/pubsub/deliver to the picked peer
// (Server). The peer delivers each message to its app (pubsub.App) and
// answers one outcome per message. A batch gives its lane slot back as soon
// as the peer has answered, and its outcomes are committed meanwhile (at
// most lanesInFlight batches waiting for that commit, which the store's
// group commit shares with every other writer), so the next batch does not
// wait out an fsync. The peer reads a batch written by encode, whose
// messages are as pubsub.Message.Marshal writes them, in one pass
// (decodeBatch); any other shape goes to encoding/json. A message that never reached the app
// (the peer is draining, the app is unhealthy, the peer went away) is not an
// attempt; it is sent again, usually to another instance.
//
// Ordering per_key: a lane sends the messages of one ordering key one at a
// time, earliest first; a message holds its key from its first send until
// its final outcome (lane.takeOrdered). Broadcast groups: see broadcast.go.
//
// Nothing here holds a message only in memory: the in-memory lanes are an
// index over the store, rebuilt by Load after a restart.
package httpbroker
