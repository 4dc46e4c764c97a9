//go:build tools

// Package nats pins the version of nats-server that `make nats` builds into
// bin/nats-server for the pub/sub NATS JetStream broker's integration tests.
package nats

import _ "github.com/nats-io/nats-server/v2"
