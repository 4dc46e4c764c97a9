package config

import (
	"errors"
	"maps"
	"slices"
	"strings"
	"testing"
	"time"
)

// TestMeshValidation: every mistake in security and service.inbound is
// named by its full key path.
func TestMeshValidation(t *testing.T) {
	tests := []struct {
		name string
		yaml string
		want []string
	}{
		{
			name: "unknown mode",
			yaml: "security: {mtls: on}\n",
			want: []string{`config.yaml: security.mtls: unknown "on" (want off, permissive or strict)`},
		},
		{
			name: "strict without a service",
			yaml: "security: {mtls: strict}\n",
			want: []string{`config.yaml: security.mtls: strict needs service: the mesh identity is the service's (set service.name, and service.inbound.listen to serve over mTLS)`},
		},
		{
			name: "meta key set by hand on a caller-only mesh sidecar",
			yaml: "service: {name: web, port: 9001, meta: {sidecar-mtls: strict}}\nsecurity: {mtls: strict}\n",
			want: []string{`config.yaml: service.meta.sidecar-mtls: "strict" is the sidecar's: it registers it only with service.inbound and security.mtls on`},
		},
		{
			name: "inbound without listen",
			yaml: "service: {name: web, port: 9001, inbound: {app: '127.0.0.1:9001'}}\n",
			want: []string{`config.yaml: service.inbound.listen: required (host:port)`},
		},
		{
			name: "inbound bad app and timeout",
			yaml: "service: {name: web, port: 9001, inbound: {listen: '0.0.0.0:21000', app: 'x', handshake_timeout: 0s, max_connections: 0}}\n",
			want: []string{
				`config.yaml: service.inbound.app: want host:port, got "x"`,
				`config.yaml: service.inbound.handshake_timeout: must be greater than 0, got 0s`,
				`config.yaml: service.inbound.max_connections: must be at least 1, got 0`,
			},
		},
		{
			name: "inbound on the app's port",
			yaml: "service: {name: web, port: 9001, inbound: {listen: '0.0.0.0:9001'}}\n",
			want: []string{`config.yaml: service.inbound.listen: 0.0.0.0:9001 is the app's own address (service.inbound.app 127.0.0.1:9001): the app listens on loopback, the inbound listener on another port`},
		},
		{
			name: "inbound conflicts with the admin listener",
			yaml: "service: {name: web, port: 9001, inbound: {listen: '0.0.0.0:15100'}}\n",
			want: []string{`config.yaml: service.inbound.listen: 0.0.0.0:15100 conflicts with admin.listen (127.0.0.1:15100)`},
		},
		{
			name: "meta key taken by the sidecar",
			yaml: "service: {name: web, port: 9001, meta: {sidecar-mtls: strict}, inbound: {listen: '0.0.0.0:21000'}}\nsecurity: {mtls: permissive}\n",
			want: []string{`config.yaml: service.meta.sidecar-mtls: "strict" is the sidecar's: it registers security.mtls (permissive) there`},
		},
		{
			name: "meta key set by hand with mtls off",
			yaml: "service: {name: web, port: 9001, meta: {sidecar-mtls: strict}}\n",
			want: []string{`config.yaml: service.meta.sidecar-mtls: "strict" is the sidecar's: it registers it only with service.inbound and security.mtls on`},
		},
		{
			name: "strict with static discovery",
			yaml: "service: {name: web, port: 9001, inbound: {listen: '0.0.0.0:21000'}}\nsecurity: {mtls: strict}\ndiscovery: {backend: static, static: {a: ['127.0.0.1:1']}}\n",
			want: []string{`config.yaml: security.mtls: strict needs consul (its CA and intentions); discovery.backend is static`},
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			c, err := ParseEnv([]byte(tc.yaml), "config.yaml", nil)
			var cerr *Error
			if !errors.As(err, &cerr) {
				t.Fatalf("ParseEnv() = %+v, %v; want an *Error", c, err)
			}
			if got, want := err.Error(), strings.Join(tc.want, "\n"); got != want {
				t.Errorf("ParseEnv() error:\n%s\nwant:\n%s", got, want)
			}
		})
	}
}

// TestMeshDefaults: mtls is off by default; an inbound listener relays to
// the app on loopback at service.port, probes it there, and with mTLS on
// registers the mode in the service meta.
func TestMeshDefaults(t *testing.T) {
	c, err := ParseEnv([]byte("service: {name: web, port: 9001}\n"), "config.yaml", nil)
	if err != nil {
		t.Fatal(err)
	}
	if c.Security.MTLS != MTLSOff || c.Service.Inbound != nil {
		t.Errorf("security.mtls = %q, inbound = %+v; want off, nil", c.Security.MTLS, c.Service.Inbound)
	}
	c, err = ParseEnv([]byte("service: {name: web, address: 10.0.0.5, port: 9001, meta: {a: b}, inbound: {listen: '0.0.0.0:21000'}}\nsecurity: {mtls: strict}\n"), "config.yaml", nil)
	if err != nil {
		t.Fatal(err)
	}
	in := c.Service.Inbound
	if in.App != "127.0.0.1:9001" || in.HandshakeTimeout != 10*time.Second || in.MaxConnections != 4096 || in.Port() != 21000 {
		t.Errorf("inbound = %+v, port %d; want app 127.0.0.1:9001, handshake_timeout 10s, max_connections 4096, port 21000", in, in.Port())
	}
	if got := c.Service.ProbeAddr(); got != "127.0.0.1:9001" {
		t.Errorf("ProbeAddr() = %q, want the app's loopback address", got)
	}
	if c.Service.Meta[MTLSMetaKey] != "strict" || c.Service.Meta["a"] != "b" {
		t.Errorf("meta = %v, want sidecar-mtls strict beside a: b", c.Service.Meta)
	}
	// A caller-only mesh sidecar: its identity dials mesh nodes; with no
	// inbound it serves nothing over mTLS, so it registers no mode.
	c, err = ParseEnv([]byte("service: {name: web, port: 9001}\nsecurity: {mtls: strict}\n"), "config.yaml", nil)
	if err != nil {
		t.Fatalf("caller-only: %v", err)
	}
	if _, ok := c.Service.Meta[MTLSMetaKey]; ok || c.Service.Inbound != nil {
		t.Errorf("caller-only meta = %v, inbound = %+v; want no sidecar-mtls, no inbound", c.Service.Meta, c.Service.Inbound)
	}
}

// TestMeshReload: security.mtls needs a restart, so a reload that changes
// it keeps registering the running mode, while other meta applies live.
func TestMeshReload(t *testing.T) {
	load := func(mode, zone string) *Config {
		t.Helper()
		c, err := ParseEnv([]byte("service: {name: web, port: 9001, meta: {zone: "+zone+"}, inbound: {listen: '0.0.0.0:21000'}}\nsecurity: {mtls: "+mode+"}\n"), "config.yaml", nil)
		if err != nil {
			t.Fatal(err)
		}
		return c
	}
	tests := []struct {
		name, from, to string
		want           map[string]string
	}{
		{"strict to permissive", "strict", "permissive", map[string]string{"zone": "b", MTLSMetaKey: "strict"}},
		{"strict to off", "strict", "off", map[string]string{"zone": "b", MTLSMetaKey: "strict"}},
		{"off to strict", "off", "strict", map[string]string{"zone": "b"}},
		{"unchanged", "permissive", "permissive", map[string]string{"zone": "b", MTLSMetaKey: "permissive"}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			r := NewReload(load(tc.from, "a"), load(tc.to, "b"))
			if got := r.Effective.Service.Meta; !maps.Equal(got, tc.want) {
				t.Errorf("Effective meta = %v, want %v", got, tc.want)
			}
			if tc.from != tc.to && !slices.Contains(r.Restart, "security.mtls") {
				t.Errorf("Restart = %v, want security.mtls", r.Restart)
			}
		})
	}
}
