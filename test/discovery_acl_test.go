package test

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"
	"go.uber.org/zap/zaptest"

	"github.com/sidecarlb/sidecar/discovery"
	"github.com/sidecarlb/sidecar/test/consulagent"
)

// TestDiscoveryConsulACLVisible runs discovery with a token that may read
// the service but not its node, against an agent with ACLs on (default
// deny): the empty set is marked as hidden by ACLs, with the fix, rather
// than passing for an empty service, and the mark goes once the token may
// read the node.
func TestDiscoveryConsulACLVisible(t *testing.T) {
	a := consulagent.Start(t, consulagent.Options{ExtraHCL: `
acl {
  enabled = true
  default_policy = "deny"
  tokens {
    initial_management = "root"
    agent = "root"
  }
}
`})
	cfg := api.DefaultConfig()
	cfg.Address, cfg.Token = a.Addr(), "root"
	root, err := api.NewClient(cfg)
	if err != nil {
		t.Fatal(err)
	}
	discRegister(t, root, "web-1", 9001, true)
	policy, _, err := root.ACL().PolicyCreate(&api.ACLPolicy{Name: "web-read", Rules: `service "web" { policy = "read" }`}, nil)
	if err != nil {
		t.Fatal(err)
	}
	token, _, err := root.ACL().TokenCreate(&api.ACLToken{Policies: []*api.ACLTokenPolicyLink{{ID: policy.ID}}}, nil)
	if err != nil {
		t.Fatal(err)
	}

	cfg = api.DefaultConfig()
	cfg.Address, cfg.Token = a.Addr(), token.SecretID
	client, err := api.NewClient(cfg)
	if err != nil {
		t.Fatal(err)
	}
	log := zaptest.NewLogger(t)
	c := discovery.NewCache(discovery.NewConsul(discovery.NewHealthClient(client), client.Catalog(), discovery.ConsulOptions{}, log),
		discovery.CacheOptions{}, log)
	t.Cleanup(c.Close)
	w, err := c.Watch(context.Background(), "web")
	if err != nil {
		t.Fatal(err)
	}
	if n := len(w.Snapshot().Endpoints); n != 0 {
		t.Fatalf("a token without node:read sees %d instances, want 0 (the agent filters them)", n)
	}
	st := c.Snapshots()
	if len(st) != 1 || !strings.Contains(st[0].ACL, "filtered by Consul ACLs") || !strings.Contains(st[0].ACL, `node_prefix "" { policy = "read" }`) {
		t.Fatalf("Snapshots() = %+v, want web marked as filtered by ACLs, with the fix", st)
	}

	// With node:read too, the next change brings the instances, whole.
	policy.Rules += "\n" + `node_prefix "" { policy = "read" }`
	if _, _, err := root.ACL().PolicyUpdate(policy, nil); err != nil {
		t.Fatal(err)
	}
	discRegister(t, root, "web-2", 9002, true)
	consulagent.WaitFor(t, 10*time.Second, "web whole", func() bool {
		st := c.Snapshots()
		return len(w.Snapshot().Endpoints) == 2 && st[0].ACL == ""
	})
}
