package test

import (
	"context"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/sidecarlb/sidecar/pubsub/natsbroker"
	"github.com/sidecarlb/sidecar/test/consulagent"
	"github.com/sidecarlb/sidecar/test/natsserver"
)

// psEnv is what the sidecars of one pub/sub test share: a Consul agent and,
// for the nats broker, a nats-server with JetStream.
type psEnv struct {
	broker string // http or nats
	agent  *consulagent.Agent
	nats   *natsserver.Server // nil for http
}

// forBrokers runs test once per broker, as subtests named after them.
func forBrokers(t *testing.T, test func(t *testing.T, env *psEnv)) {
	if testing.Short() {
		t.Skip("integration test")
	}
	t.Parallel()
	for _, broker := range []string{"http", "nats"} {
		t.Run(broker, func(t *testing.T) {
			t.Parallel()
			env := &psEnv{broker: broker, agent: consulagent.Start(t, consulagent.Options{})}
			if broker == "nats" {
				env.nats = natsserver.Start(t)
			}
			test(t, env)
		})
	}
}

// node configures a sidecar on the env's broker.
func (e *psEnv) node(t *testing.T, name string, app *subApp, subs ...psSub) *psNode {
	url := ""
	if e.nats != nil {
		url = e.nats.URL()
	}
	return newPSNodeOn(t, e.agent.Addr(), url, name, app, subs...)
}

// waitGroup waits until instances sidecars consume topics for group: on
// http, their peer services pass and the records are in KV; on nats, the
// group's consumer of each topic has a pull request waiting from each
// instance (broadcast: each instance's own consumer has one).
func (e *psEnv) waitGroup(t *testing.T, group string, instances int, broadcast bool, topics ...string) {
	t.Helper()
	if e.nats == nil {
		waitPeers(t, e.agent, group, instances, topics...)
		return
	}
	nc, err := nats.Connect(e.nats.URL())
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()
	js, _ := jetstream.New(nc)
	for _, topic := range topics {
		consulagent.WaitFor(t, 20*time.Second, fmt.Sprintf("%d instances of %s pulling %s", instances, group, topic), func() bool {
			ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
			defer cancel()
			s, err := js.Stream(ctx, "SIDECAR")
			if err != nil {
				return false
			}
			consumers, waiting := 0, 0
			prefix := strings.ReplaceAll(group, ".", "_") + "__" + strings.ReplaceAll(topic, ".", "_") + "__"
			for info := range s.ListConsumers(ctx).Info() {
				if info.Config.FilterSubject == natsbroker.Subject("sidecar", topic) && strings.HasPrefix(info.Name, prefix) {
					consumers++
					if info.NumWaiting > 0 {
						waiting += min(info.NumWaiting, 1)
						if !broadcast {
							waiting = info.NumWaiting
						}
					}
				}
			}
			if broadcast {
				return consumers == instances && waiting == instances
			}
			return consumers == 1 && waiting >= instances
		})
	}
}

// waitSettled waits, on nats, until no consumer of the nodes has a message
// pending or out (in flight or waiting for its retry delay); on http the
// publisher's empty outbox says as much.
func (e *psEnv) waitSettled(t *testing.T, nodes ...*psNode) {
	t.Helper()
	if e.nats == nil {
		return
	}
	consulagent.WaitFor(t, 30*time.Second, "every consumer settled", func() bool {
		for _, n := range nodes {
			for _, g := range n.status().Groups {
				if g.Pending != 0 {
					return false
				}
			}
		}
		return true
	})
}
