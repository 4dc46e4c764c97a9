package main

import (
	"context"
	"errors"
	"testing"

	"go.uber.org/zap"

	"github.com/sidecarlb/sidecar/config"
	"github.com/sidecarlb/sidecar/heartbeat"
	"github.com/sidecarlb/sidecar/mesh"
)

// TestMeshNamesAgree: config and mesh spell the meta key and the modes
// once each; they must agree.
func TestMeshNamesAgree(t *testing.T) {
	pairs := [][2]string{
		{config.MTLSMetaKey, mesh.MetaKey},
		{config.MTLSStrict, mesh.ModeStrict},
		{config.MTLSPermissive, mesh.ModePermissive},
		{config.MTLSOff, mesh.ModeOff},
	}
	for _, p := range pairs {
		if p[0] != p[1] {
			t.Errorf("config says %q, mesh %q", p[0], p[1])
		}
	}
}

// TestMeshGate: with mtls on, the probe fails until the identity is ready
// (here never: no identity, or one whose agent fails); with mtls off it is
// the probe itself.
func TestMeshGate(t *testing.T) {
	probe := heartbeat.ProberFunc(func(context.Context) (string, error) { return "app ok", nil })
	ctx := context.Background()
	if out, err := (&meshGate{}).wrap(probe).Probe(ctx); err != nil || out != "app ok" {
		t.Errorf("mtls off: Probe() = %q, %v; want the app's", out, err)
	}
	g := &meshGate{on: true}
	p := g.wrap(probe)
	if _, err := p.Probe(ctx); !errors.Is(err, errMeshNotReady) {
		t.Errorf("no identity: Probe() error = %v, want errMeshNotReady", err)
	}
	g.id.Store(mesh.NewIdentity(nil, "web", mesh.Options{}, zap.NewNop()))
	if _, err := p.Probe(ctx); !errors.Is(err, errMeshNotReady) {
		t.Errorf("identity not ready: Probe() error = %v, want errMeshNotReady", err)
	}
}
