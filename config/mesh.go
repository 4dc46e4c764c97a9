package config

import (
	"net"
	"strconv"
	"time"
)

// Values of security.mtls.
const (
	MTLSOff        = "off"
	MTLSPermissive = "permissive"
	MTLSStrict     = "strict"
)

// MTLSMetaKey is the service meta key the sidecar registers, valued with
// security.mtls, when it serves service.inbound with mTLS: outbound
// sidecars read it to dial the instance with mTLS.
const MTLSMetaKey = "sidecar-mtls"

var mtlsModes = []string{MTLSOff, MTLSPermissive, MTLSStrict}

// Inbound is the listener peers dial in place of the app
// (service.inbound): the instance is registered at its port, and what it
// accepts is relayed to the app, which then listens on loopback only.
type Inbound struct {
	// Listen is host:port; required. Its port is the one registered.
	Listen string `yaml:"listen"`
	// App is the app's host:port the accepted connections are relayed to;
	// if empty, 127.0.0.1:<service.port>. The TCP probe checks it too.
	App string `yaml:"app"`
	// HandshakeTimeout bounds a connection's first byte and TLS handshake.
	// Default 10s.
	HandshakeTimeout time.Duration `yaml:"handshake_timeout"`
	// MaxConnections caps the inbound connections open at once; past it,
	// new callers wait in the kernel's backlog until one closes. Default
	// 4096.
	MaxConnections int `yaml:"max_connections"`
}

// setDefaults is called by the decoder on a freshly allocated Inbound.
func (i *Inbound) setDefaults() {
	i.HandshakeTimeout = 10 * time.Second
	i.MaxConnections = 4096
}

// Security is the zero-trust side: mutual TLS with Consul's CA and
// intentions.
type Security struct {
	// MTLS is off (the default), permissive (service.inbound takes mTLS
	// and plaintext) or strict (mTLS only). With permissive or strict, the
	// service's leaf certificate comes from Consul's CA, callers are
	// authorized by Consul intentions, and the instance is registered with
	// the service meta sidecar-mtls set to the mode.
	MTLS string `yaml:"mtls"`
}

// Port is the port of Listen, or 0 when Listen is not host:port.
func (i *Inbound) Port() int {
	_, port, err := net.SplitHostPort(i.Listen)
	if err != nil {
		return 0
	}
	n, _ := strconv.Atoi(port)
	return n
}

// resolveMesh fills service.inbound.app and the mtls service meta.
func (p *parser) resolveMesh(c *Config) {
	s := c.Service
	if s == nil {
		return
	}
	if v, ok := s.Meta[MTLSMetaKey]; ok && (s.Inbound == nil || c.Security.MTLS == MTLSOff) {
		// Other sidecars read it to dial this instance with mTLS: set by
		// hand without a mesh inbound, they would dial TLS to plaintext.
		p.errorf(child("service.meta", MTLSMetaKey), "%q is the sidecar's: it registers it only with service.inbound and security.mtls on", v)
		return
	}
	if s.Inbound == nil {
		return
	}
	if s.Inbound.App == "" && s.Port > 0 {
		s.Inbound.App = net.JoinHostPort("127.0.0.1", strconv.Itoa(s.Port))
	}
	if c.Security.MTLS == MTLSOff {
		return
	}
	if v, ok := s.Meta[MTLSMetaKey]; ok && v != c.Security.MTLS {
		p.errorf(child("service.meta", MTLSMetaKey), "%q is the sidecar's: it registers security.mtls (%s) there", v, c.Security.MTLS)
		return
	}
	meta := make(map[string]string, len(s.Meta)+1)
	for k, v := range s.Meta {
		meta[k] = v
	}
	meta[MTLSMetaKey] = c.Security.MTLS
	s.Meta = meta
}

// validateMesh checks security and service.inbound.
func (p *parser) validateMesh(c *Config) {
	p.oneOf("security.mtls", c.Security.MTLS, mtlsModes)
	on := c.Security.MTLS == MTLSPermissive || c.Security.MTLS == MTLSStrict
	switch {
	case on && c.Service == nil:
		p.errorf("security.mtls", "%s needs service: the mesh identity is the service's (set service.name, and service.inbound.listen to serve over mTLS)", c.Security.MTLS)
	case on && c.Discovery.Backend == BackendStatic:
		p.errorf("security.mtls", "%s needs consul (its CA and intentions); discovery.backend is static", c.Security.MTLS)
	}
	if c.Service == nil || c.Service.Inbound == nil {
		return
	}
	in := c.Service.Inbound
	p.hostPort("service.inbound.listen", in.Listen)
	p.hostPort("service.inbound.app", in.App)
	p.positive("service.inbound.handshake_timeout", in.HandshakeTimeout)
	if in.MaxConnections < 1 {
		p.errorf("service.inbound.max_connections", "must be at least 1, got %d", in.MaxConnections)
	}
	if checkHostPort(in.Listen) == nil && checkHostPort(in.App) == nil {
		lh, lp, _ := net.SplitHostPort(in.Listen)
		ah, ap, _ := net.SplitHostPort(in.App)
		if lp == ap && (lh == ah || unspecified(lh) || unspecified(ah)) {
			p.errorf("service.inbound.listen", "%s is the app's own address (service.inbound.app %s): the app listens on loopback, the inbound listener on another port", in.Listen, in.App)
		}
	}
}

// runningMTLSMeta returns next with the sidecar-mtls meta of running: a
// reload applies service.meta live, but security.mtls needs a restart, so
// the registration must keep advertising the mode that runs.
func runningMTLSMeta(next, running map[string]string) map[string]string {
	rv, rok := running[MTLSMetaKey]
	nv, nok := next[MTLSMetaKey]
	if rok == nok && rv == nv {
		return next
	}
	out := make(map[string]string, len(next)+1)
	for k, v := range next {
		out[k] = v
	}
	delete(out, MTLSMetaKey)
	if rok {
		out[MTLSMetaKey] = rv
	}
	return out
}
