package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"sync/atomic"
	"time"

	"github.com/hashicorp/consul/api"
	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/zap"

	"github.com/sidecarlb/sidecar/config"
	"github.com/sidecarlb/sidecar/heartbeat"
	"github.com/sidecarlb/sidecar/mesh"
)

// meshRuntime is the inbound listener (service.inbound) and, with
// security.mtls on, the service's identity from Consul's CA and the
// authorizer of its callers.
type meshRuntime struct {
	mode   string
	listen string
	id     *mesh.Identity   // nil with mtls off
	authz  *mesh.Authorizer // nil with mtls off
	in     *mesh.Inbound
	server *server
	cancel context.CancelFunc
	done   chan struct{}
}

// newMesh binds service.inbound.listen and starts following the identity;
// nil when the config has no inbound listener. stop ends the identity's
// watches.
func newMesh(cfg *config.Config, consul *api.Client, reg prometheus.Registerer, gate *meshGate, log *zap.Logger) (*meshRuntime, error) {
	s := cfg.Service
	if s == nil || s.Inbound == nil {
		return nil, nil
	}
	log = log.Named("mesh").With(zap.String("service", s.Name))
	m := &meshRuntime{mode: cfg.Security.MTLS, listen: s.Inbound.Listen, done: make(chan struct{})}
	metrics := mesh.NewMetrics(reg)
	opts := mesh.InboundOptions{Mode: cfg.Security.MTLS, App: s.Inbound.App, HandshakeTimeout: s.Inbound.HandshakeTimeout, Metrics: metrics}
	if m.mode != config.MTLSOff {
		m.id = mesh.NewIdentity(consul.Agent(), s.Name, mesh.Options{Metrics: metrics}, log)
		m.authz = mesh.NewAuthorizer(consul.Agent(), s.Name, mesh.AuthorizerOptions{Metrics: metrics}, log)
		opts.Identity, opts.Authorizer = m.id, m.authz
		gate.id.Store(m.id)
	}
	in, err := mesh.NewInbound(opts, log)
	if err != nil {
		return nil, err
	}
	ln, err := net.Listen("tcp", s.Inbound.Listen)
	if err != nil {
		return nil, fmt.Errorf("service.inbound.listen: %w", err)
	}
	m.in = in
	m.server = &server{name: s.Inbound.Listen, ln: ln, serve: func() error { return in.Serve(ln) }, shutdown: in.Shutdown}
	ctx, cancel := context.WithCancel(context.Background())
	m.cancel = cancel
	go func() {
		defer close(m.done)
		if m.id != nil {
			m.id.Run(ctx)
		}
	}()
	return m, nil
}

// meshGate holds the TTL check critical, with security.mtls on, until the
// identity has its leaf certificate and the roots: peers are sent to the
// inbound listener only once it can complete a handshake.
type meshGate struct {
	on bool
	id atomic.Pointer[mesh.Identity] // set by newMesh
}

// errMeshNotReady is the check's output while the gate is shut.
var errMeshNotReady = errors.New("waiting for the mesh leaf certificate and ca roots from consul")

// wrap returns probe gated: with mtls off, probe itself.
func (g *meshGate) wrap(probe heartbeat.Prober) heartbeat.Prober {
	if !g.on {
		return probe
	}
	return heartbeat.ProberFunc(func(ctx context.Context) (string, error) {
		id := g.id.Load()
		if id == nil {
			return "", errMeshNotReady
		}
		select {
		case <-id.Ready():
		default:
			return "", errMeshNotReady
		}
		return probe.Probe(ctx)
	})
}

// stop ends the identity's watches; nil-safe.
func (m *meshRuntime) stop() {
	if m == nil {
		return
	}
	m.cancel()
	<-m.done
}

// meshStatus is the mesh section of /status.
type meshStatus struct {
	MTLS     string               `json:"mtls"`
	Inbound  string               `json:"inbound"`
	Open     int                  `json:"open_connections"`
	Identity *mesh.IdentityStatus `json:"identity,omitempty"`
	Denied   int64                `json:"denied"`
	Denials  []mesh.Denial        `json:"recent_denials,omitempty"`
}

func (m *meshRuntime) status() any {
	st := meshStatus{MTLS: m.mode, Inbound: m.listen, Open: m.in.Open()}
	if m.id != nil {
		is := m.id.Status()
		st.Identity = &is
		st.Denials, st.Denied = m.authz.Denials()
	}
	return st
}

// printMesh prints the mesh section of /status for `sidecar status`.
func printMesh(w io.Writer, raw json.RawMessage) {
	var st meshStatus
	if json.Unmarshal(raw, &st) != nil {
		return
	}
	fmt.Fprintf(w, "mesh       inbound %s, mtls %s, %d open\n", st.Inbound, st.MTLS, st.Open)
	if id := st.Identity; id != nil {
		if !id.Ready {
			fmt.Fprintf(w, "           identity of %s: waiting for the leaf certificate and ca roots\n", id.Service)
		} else {
			fmt.Fprintf(w, "           identity %s, expires %s (in %s), %d leaf rotations\n", id.URI, id.Expiry.Format(time.RFC3339), id.ExpiresIn, id.Rotations)
		}
		fmt.Fprintf(w, "           %d denied", st.Denied)
		for i, d := range st.Denials {
			if i == 5 {
				break
			}
			fmt.Fprintf(w, "\n             %s %s from %s: %s", d.Time.Format(time.TimeOnly), d.Caller, d.Remote, d.Reason)
		}
		fmt.Fprintln(w)
	}
}
