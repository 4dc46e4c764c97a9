package proxy

import (
	"context"
	"crypto/tls"
	"fmt"
	"net"
	"time"
)

// MeshTLS hands out the TLS configs that dial the nodes of the service
// mesh with the sidecar's own leaf certificate, each checking that the
// peer is the service dialled. *mesh.Identity satisfies it. ClientTLS is
// called once per route and service; the configs it returns must follow
// rotations by themselves.
type MeshTLS interface {
	ClientTLS(service string, nextProtos ...string) *tls.Config
}

// Mesh is the outbound side of the service mesh (security.mtls): the nodes
// whose service meta says they serve mTLS on an inbound listener are
// dialled with TLS from Identity. The decision is made per node, from the
// discovery snapshot; everything above the dial (the pools, h2
// multiplexing) stays as for plaintext, so a handshake is paid once per
// connection.
type Mesh struct {
	Identity MeshTLS
	// Node reports whether a node with service meta meta serves mTLS
	// (mesh.NodeMTLS).
	Node func(meta map[string]string) bool
}

// SetMesh makes the routes built from now on dial mesh nodes with mTLS. It
// is called once, before the listeners are built.
func (p *Proxy) SetMesh(m Mesh) {
	if m.Identity == nil || m.Node == nil {
		return
	}
	p.mesh = m
}

// meshPool returns the pool config of rt's nodes that serve mTLS, or nil
// when the sidecar has no mesh identity. The TLS configs are built once
// per route: ALPN offers exactly one protocol, the one the engines above
// speak (h2 for http2 and grpc routes, http/1.1 for http, none for tcp),
// so the inbound listener answers with it.
func (p *Proxy) meshPool(rt *route) *poolConfig {
	if p.mesh.Identity == nil {
		return nil
	}
	c := &poolConfig{timeouts: rt.cfg.Timeouts, log: rt.log}
	svc := rt.cfg.Service
	switch {
	case rt.cfg.Protocol == "tcp":
		c.meshH1 = p.mesh.Identity.ClientTLS(svc)
	default:
		c.meshH1 = p.mesh.Identity.ClientTLS(svc, "http/1.1")
		c.meshH2 = p.mesh.Identity.ClientTLS(svc, "h2")
	}
	return c
}

// poolFor returns the pool config of a node: the route's mesh one when the
// node serves mTLS, the route's own otherwise.
func (rt *route) poolFor(meta map[string]string) *poolConfig {
	if rt.meshPool != nil && rt.meshNode(meta) {
		return rt.meshPool
	}
	return &rt.pool
}

// mesh reports whether c dials a mesh node. An endpoint whose node turns
// to mTLS, or from it, is built afresh.
func (c *poolConfig) mesh() bool { return c.meshH1 != nil }

// meshHandshake completes a TLS client handshake with conf over c, a new
// connection to addr, within connect. A failed handshake closes c and is
// returned as a dial error: no request byte has gone out, so the try loop
// moves on to another node (a node presenting another service's
// certificate among them, refused by conf's VerifyConnection).
func meshHandshake(ctx context.Context, c net.Conn, conf *tls.Config, addr string, connect time.Duration) (net.Conn, error) {
	if connect <= 0 {
		connect = time.Second
	}
	ctx, cancel := context.WithTimeout(ctx, connect)
	defer cancel()
	tc := tls.Client(c, conf)
	if err := tc.HandshakeContext(ctx); err != nil {
		c.Close()
		return nil, &net.OpError{Op: "dial", Net: "tcp", Addr: c.RemoteAddr(), Err: fmt.Errorf("mtls handshake with %s: %w", addr, err)}
	}
	return tc, nil
}

// handshaker returns the h1.Pool hook that puts a new connection under
// conf's TLS, bounded by connect.
func handshaker(conf *tls.Config, connect time.Duration) func(ctx context.Context, c net.Conn, addr string) (net.Conn, error) {
	return func(ctx context.Context, c net.Conn, addr string) (net.Conn, error) {
		return meshHandshake(ctx, c, conf, addr, connect)
	}
}
