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
	"github.com/sidecarlb/sidecar/proxy"
)

// meshRuntime is the service's mesh identity from Consul's CA, with
// security.mtls on, which the proxy dials mesh nodes with, and the inbound
// listener (service.inbound), which serves with it and authorizes callers.
// A caller-only sidecar (mtls on, no inbound) has the identity alone.
type meshRuntime struct {
	mode    string
	listen  string
	id      *mesh.Identity   // nil with mtls off
	authz   *mesh.Authorizer // nil with mtls off
	in      *mesh.Inbound    // nil without service.inbound
	metrics *mesh.Metrics
	server  *server // nil without service.inbound
	cancel  context.CancelFunc
	done    chan struct{}
}

// newMeshIdentity starts following the service's identity when
// security.mtls is on and gives it to px for its outbound dials; nil
// otherwise. It must come before the proxy's routes are built. stop ends
// the identity's watches.
//
// The identity's two blocking queries (leaf, roots) and the authorize
// calls go over a Consul client of their own, with meshConsulConnections
// connections apart from discovery.max_connections: on the shared client
// they would hold two of its default four for minutes, and discovery's
// fetches would starve.
func newMeshIdentity(cfg *config.Config, reg prometheus.Registerer, px *proxy.Proxy, log *zap.Logger) (*meshRuntime, error) {
	s := cfg.Service
	if s == nil || (s.Inbound == nil && cfg.Security.MTLS == config.MTLSOff) {
		return nil, nil
	}
	var consul *api.Client
	if cfg.Security.MTLS != config.MTLSOff {
		var err error
		if consul, err = newConsulClient(cfg.Consul, config.Discovery{MaxConnections: meshConsulConnections}); err != nil {
			return nil, err
		}
	}
	log = log.Named("mesh").With(zap.String("service", s.Name))
	m := &meshRuntime{mode: cfg.Security.MTLS, done: make(chan struct{})}
	metrics := mesh.NewMetrics(reg)
	m.metrics = metrics
	if m.mode != config.MTLSOff {
		m.id = mesh.NewIdentity(consul.Agent(), s.Name, mesh.Options{Metrics: metrics}, log)
		m.authz = mesh.NewAuthorizer(consul.Agent(), s.Name, mesh.AuthorizerOptions{Metrics: metrics}, log)
		px.SetMesh(proxy.Mesh{Identity: m.id, Node: mesh.NodeMTLS})
	}
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

// meshConsulConnections bounds the mesh's own connections to the agent:
// the leaf and roots blocking queries, and two for authorize calls.
const meshConsulConnections = 4

// bindInbound binds service.inbound.listen, if set; gate is told of the
// identity, which holds the TTL check until it is ready. m may be nil.
func (m *meshRuntime) bindInbound(cfg *config.Config, gate *meshGate, log *zap.Logger) error {
	if m == nil || cfg.Service.Inbound == nil {
		return nil
	}
	s := cfg.Service
	log = log.Named("mesh").With(zap.String("service", s.Name))
	opts := mesh.InboundOptions{Mode: cfg.Security.MTLS, App: s.Inbound.App, HandshakeTimeout: s.Inbound.HandshakeTimeout,
		MaxConnections: s.Inbound.MaxConnections, Metrics: m.metrics, Identity: m.id, Authorizer: m.authz}
	if m.id != nil {
		gate.id.Store(m.id)
	}
	in, err := mesh.NewInbound(opts, log)
	if err != nil {
		return err
	}
	ln, err := net.Listen("tcp", s.Inbound.Listen)
	if err != nil {
		return fmt.Errorf("service.inbound.listen: %w", err)
	}
	m.in, m.listen = in, s.Inbound.Listen
	m.server = &server{name: s.Inbound.Listen, ln: ln, serve: func() error { return in.Serve(ln) }, shutdown: in.Shutdown}
	return nil
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
	st := meshStatus{MTLS: m.mode, Inbound: m.listen}
	if m.in != nil {
		st.Open = m.in.Open()
	}
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
