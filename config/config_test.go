package config

import (
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"
)

// fullExample is the contract's example file, every key set.
const fullExample = `
service:
  name: echo
  id: echo-1
  address: 127.0.0.1
  port: 9001
  tags: [v1]
  meta: {zone: a}
  weight: 1
  check:
    http: http://127.0.0.1:9001/health
    interval: 1s
    timeout: 1s
  ttl: 5s
  deregister_critical_after: 1m
  drain: 2s
consul:
  address: 127.0.0.1:8500
  token: ""
  datacenter: ""
admin:
  listen: 127.0.0.1:15100
  token: ""
log: {level: info, format: json}
discovery:
  backend: consul
  cache_size: 1024
  idle_timeout: 10m
  stale_for: 0s
  resolve_timeout: 2s
proxy:
  listen: 127.0.0.1:15001
  balancer: round_robin
  hash_key: ""
  preserve_host: false
  timeouts:
    connect: 1s
    request: 0s
    idle: 90s
    read_header: 10s
upstreams:
  - name: echo
    listen: 127.0.0.1:15002
    protocol: http
    balancer: hash
    hash_key: header:X-User
    tags: [v1]
    datacenter: ""
    preserve_host: false
    timeouts: {connect: 1s, request: 0s, idle: 90s}
`

// env returns a getenv over a fixed map, so tests can run in parallel.
func env(kv map[string]string) func(string) string {
	return func(k string) string { return kv[k] }
}

func TestParseValid(t *testing.T) {
	t.Parallel()
	defaultTimeouts := Timeouts{Connect: time.Second, Idle: 90 * time.Second, ReadHeader: 10 * time.Second, MaxConnectionAge: 5 * time.Minute, Tunnel: time.Hour}
	tests := []struct {
		name  string
		yaml  string
		env   map[string]string
		check func(t *testing.T, c *Config)
	}{
		{
			name: "full example",
			yaml: fullExample,
			check: func(t *testing.T, c *Config) {
				want := &Service{
					Name: "echo", ID: "echo-1", Address: "127.0.0.1", Port: 9001,
					Tags: []string{"v1"}, Meta: map[string]string{"zone": "a"}, Weight: 1,
					Check: Check{HTTP: "http://127.0.0.1:9001/health", Interval: time.Second, Timeout: time.Second},
					TTL:   5 * time.Second, DeregisterCriticalAfter: time.Minute, Drain: 2 * time.Second,
				}
				if !reflect.DeepEqual(c.Service, want) {
					t.Errorf("Service = %+v, want %+v", c.Service, want)
				}
				wantUp := []Upstream{{
					Name: "echo", Listen: "127.0.0.1:15002", Protocol: "http", Balancer: "hash",
					HashKey: "header:X-User", Tags: []string{"v1"}, Timeouts: defaultTimeouts,
					Resilience: defaultResilience(),
				}}
				if !reflect.DeepEqual(c.Upstreams, wantUp) {
					t.Errorf("Upstreams = %+v, want %+v", c.Upstreams, wantUp)
				}
				if c.Proxy.Listen != "127.0.0.1:15001" {
					t.Errorf("Proxy.Listen = %q, want 127.0.0.1:15001", c.Proxy.Listen)
				}
			},
		},
		{
			name: "empty file is all defaults",
			yaml: "",
			check: func(t *testing.T, c *Config) {
				want := &Config{
					Consul:  Consul{Address: "127.0.0.1:8500"},
					Admin:   Admin{Listen: "127.0.0.1:15100"},
					Log:     Log{Level: "info", Format: "json", Access: "off", AccessSample: 1},
					Metrics: Metrics{EndpointLabels: true},
					Tracing: Tracing{Start: true},
					Discovery: Discovery{
						Backend: "consul", CacheSize: 1024,
						IdleTimeout: 10 * time.Minute, ResolveTimeout: 2 * time.Second,
						MaxConnections: 4, Consistency: "stale", MaxStale: 10 * time.Second,
					},
					Proxy:    Proxy{Balancer: "round_robin", Timeouts: defaultTimeouts, Resilience: defaultResilience(), MaxHeaderBytes: 61440},
					PubSub:   PubSub{Name: "pubsub", Broker: "http", MaxMessageBytes: "1MiB", MaxMessageBytesN: 1 << 20, NATS: defaultPubSubNATS()},
					Security: Security{MTLS: "off"},
				}
				if !reflect.DeepEqual(c, want) {
					t.Errorf("Parse(\"\") = %+v, want %+v", c, want)
				}
				if !reflect.DeepEqual(c, Default()) {
					t.Errorf("Parse(\"\") = %+v, want Default() %+v", c, Default())
				}
			},
		},
		{
			name: "comments only",
			yaml: "# nothing here\n\n# yet\n",
			check: func(t *testing.T, c *Config) {
				if !reflect.DeepEqual(c, Default()) {
					t.Errorf("Parse = %+v, want Default()", c)
				}
			},
		},
		{
			name: "service defaults",
			yaml: "service: {name: echo, port: 9001}",
			check: func(t *testing.T, c *Config) {
				host, err := os.Hostname()
				if err != nil {
					t.Fatal(err)
				}
				// No address: Consul gives peers the node's; the id names
				// this host instead.
				want := &Service{
					Name: "echo", ID: "echo-" + host + "-9001", Address: "", Port: 9001, Weight: 1,
					Check: Check{Interval: time.Second, Timeout: time.Second},
					TTL:   5 * time.Second, DeregisterCriticalAfter: time.Minute, Drain: 2 * time.Second,
				}
				if !reflect.DeepEqual(c.Service, want) {
					t.Errorf("Service = %+v, want %+v", c.Service, want)
				}
			},
		},
		{
			name: "set address is registered and probed",
			yaml: "service: {name: echo, address: 10.0.0.7, port: 9001}",
			check: func(t *testing.T, c *Config) {
				if c.Service.ID != "echo-10.0.0.7-9001" || c.Service.Address != "10.0.0.7" {
					t.Errorf("Service ID, Address = %q, %q, want echo-10.0.0.7-9001, 10.0.0.7", c.Service.ID, c.Service.Address)
				}
				if got := c.Service.ProbeAddr(); got != "10.0.0.7:9001" {
					t.Errorf("ProbeAddr() = %q, want 10.0.0.7:9001", got)
				}
			},
		},
		{
			name: "unset address is probed on loopback",
			yaml: "service: {name: echo, port: 9001}",
			check: func(t *testing.T, c *Config) {
				if got := c.Service.ProbeAddr(); got != "127.0.0.1:9001" {
					t.Errorf("ProbeAddr() = %q, want 127.0.0.1:9001", got)
				}
			},
		},
		{
			name: "derived id is sanitized",
			yaml: "service: {name: echo, address: '::1', port: 9001}",
			check: func(t *testing.T, c *Config) {
				if c.Service.ID != "echo---1-9001" {
					t.Errorf("Service.ID = %q, want echo---1-9001", c.Service.ID)
				}
			},
		},
		{
			name: "client only",
			yaml: "upstreams:\n  - {name: echo, listen: 127.0.0.1:15002}\n",
			check: func(t *testing.T, c *Config) {
				if c.Service != nil {
					t.Errorf("Service = %+v, want nil", c.Service)
				}
				if len(c.Upstreams) != 1 || c.Upstreams[0].Protocol != "http" || c.Upstreams[0].Balancer != "round_robin" {
					t.Errorf("Upstreams = %+v, want one http round_robin upstream", c.Upstreams)
				}
			},
		},
		{
			name: "null section is absent",
			yaml: "service:\nlog:\n  level:\n",
			check: func(t *testing.T, c *Config) {
				if c.Service != nil || c.Log.Level != "info" {
					t.Errorf("Service = %+v, Log.Level = %q; want nil and info", c.Service, c.Log.Level)
				}
			},
		},
		{
			name: "upstreams inherit from proxy and consul",
			yaml: `
consul: {datacenter: dc2}
discovery: {max_connections: 5}
proxy:
  balancer: hash
  hash_key: cookie:session
  preserve_host: true
  timeouts: {connect: 2s, request: 30s, idle: 1m, read_header: 5s, tunnel: 10m}
upstreams:
  - {name: a, listen: 127.0.0.1:15002}
  - name: b
    listen: 127.0.0.1:15003
    balancer: least_request
    hash_key: ""
    preserve_host: false
    datacenter: dc3
    timeouts: {connect: 3s, tunnel: 2m}
`,
			check: func(t *testing.T, c *Config) {
				pt := Timeouts{Connect: 2 * time.Second, Request: 30 * time.Second, Idle: time.Minute, ReadHeader: 5 * time.Second, MaxConnectionAge: 5 * time.Minute, Tunnel: 10 * time.Minute}
				want := []Upstream{
					{Name: "a", Listen: "127.0.0.1:15002", Protocol: "http", Balancer: "hash",
						HashKey: "cookie:session", Datacenter: "dc2", PreserveHost: true, Timeouts: pt,
						Resilience: defaultResilience()},
					{Name: "b", Listen: "127.0.0.1:15003", Protocol: "http", Balancer: "least_request",
						HashKey: "", Datacenter: "dc3", PreserveHost: false,
						Timeouts:   Timeouts{Connect: 3 * time.Second, Request: 30 * time.Second, Idle: time.Minute, ReadHeader: 5 * time.Second, MaxConnectionAge: 5 * time.Minute, Tunnel: 2 * time.Minute},
						Resilience: defaultResilience()},
				}
				if !reflect.DeepEqual(c.Upstreams, want) {
					t.Errorf("Upstreams = %+v\nwant %+v", c.Upstreams, want)
				}
			},
		},
		{
			// The one place timeouts get their defaults: 0s in the file
			// stays 0 (no limit) for the proxy, and upstreams inherit it.
			name: "zero idle and read_header mean no limit",
			yaml: `
proxy:
  timeouts: {idle: 0s, read_header: 0s}
upstreams: [{name: a, listen: 127.0.0.1:15002}]
`,
			check: func(t *testing.T, c *Config) {
				if pt := c.Proxy.Timeouts; pt.Idle != 0 || pt.ReadHeader != 0 {
					t.Errorf("proxy.timeouts idle = %v, read_header = %v; want 0 and 0", pt.Idle, pt.ReadHeader)
				}
				if ut := c.Upstreams[0].Timeouts; ut.Idle != 0 || ut.ReadHeader != 0 {
					t.Errorf("upstreams[0].timeouts idle = %v, read_header = %v; want 0 and 0 (inherited)", ut.Idle, ut.ReadHeader)
				}
			},
		},
		{
			name: "static backend",
			yaml: `
discovery:
  backend: static
  static: {echo: ["127.0.0.1:9001", "127.0.0.1:9002"], "a.b": ["[::1]:80"]}
upstreams: [{name: echo, listen: 127.0.0.1:15002}]
`,
			check: func(t *testing.T, c *Config) {
				want := map[string][]string{"echo": {"127.0.0.1:9001", "127.0.0.1:9002"}, "a.b": {"[::1]:80"}}
				if !reflect.DeepEqual(c.Discovery.Static, want) {
					t.Errorf("Discovery.Static = %v, want %v", c.Discovery.Static, want)
				}
			},
		},
		{
			name: "anchors and merge keys",
			yaml: `
upstreams:
  - &base {name: echo, listen: 127.0.0.1:15002, balancer: hash, protocol: grpc}
  - <<: *base
    listen: 127.0.0.1:15003
`,
			check: func(t *testing.T, c *Config) {
				u := c.Upstreams[1]
				if u.Name != "echo" || u.Listen != "127.0.0.1:15003" || u.Balancer != "hash" || u.Protocol != "grpc" {
					t.Errorf("Upstreams[1] = %+v, want echo on :15003 with hash and grpc", u)
				}
			},
		},
		{
			name: "env fills empty consul address and token",
			yaml: "consul: {address: ''}",
			env:  map[string]string{"CONSUL_HTTP_ADDR": "https://consul.example:8501", "CONSUL_HTTP_TOKEN": "secret"},
			check: func(t *testing.T, c *Config) {
				if c.Consul.Address != "https://consul.example:8501" || c.Consul.Token != "secret" {
					t.Errorf("Consul = %+v, want address and token from env", c.Consul)
				}
			},
		},
		{
			name: "explicit consul settings win over env",
			yaml: "consul: {address: 'http://10.0.0.1:8500', token: mine}",
			env:  map[string]string{"CONSUL_HTTP_ADDR": "10.9.9.9:8500", "CONSUL_HTTP_TOKEN": "env"},
			check: func(t *testing.T, c *Config) {
				if c.Consul.Address != "http://10.0.0.1:8500" || c.Consul.Token != "mine" {
					t.Errorf("Consul = %+v, want the file's address and token", c.Consul)
				}
			},
		},
		{
			name: "every protocol and hash key form",
			yaml: `
upstreams:
  - {name: a, listen: 127.0.0.1:1, protocol: http, hash_key: path}
  - {name: b, listen: 127.0.0.1:2, protocol: http2, hash_key: client_ip}
  - {name: c, listen: 127.0.0.1:3, protocol: grpc, hash_key: "query:user id"}
  - {name: d, listen: 127.0.0.1:4, protocol: tcp, hash_key: "cookie:sid"}
`,
		},
		{
			name: "proxy_protocol v2 on tcp, off by default",
			yaml: `
upstreams:
  - {name: a, listen: 127.0.0.1:1, protocol: tcp, proxy_protocol: v2}
  - {name: b, listen: 127.0.0.1:2, protocol: tcp}
  - {name: c, listen: 127.0.0.1:3, proxy_protocol: ""}
  - {name: d, listen: 127.0.0.1:4, protocol: http2, proxy_protocol: ~}
`,
			check: func(t *testing.T, c *Config) {
				for i, want := range []string{ProxyProtocolV2, "", "", ""} {
					if got := c.Upstreams[i].ProxyProtocol; got != want {
						t.Errorf("Upstreams[%d].ProxyProtocol = %q, want %q", i, got, want)
					}
				}
			},
		},
		{
			name: "listeners on different interfaces share a port",
			yaml: "proxy: {listen: '127.0.0.1:15002'}\nupstreams: [{name: a, listen: '127.0.0.2:15002'}]",
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			c, err := ParseEnv([]byte(tc.yaml), "config.yaml", env(tc.env))
			if err != nil {
				t.Fatalf("ParseEnv() error:\n%v", err)
			}
			if tc.check != nil {
				tc.check(t, c)
			}
		})
	}
}

func TestParseEnvNil(t *testing.T) {
	t.Parallel()
	c, err := ParseEnv(nil, "", nil)
	if err != nil {
		t.Fatalf("ParseEnv(nil, \"\", nil) error: %v", err)
	}
	if c.Consul.Address != "127.0.0.1:8500" || c.Consul.Token != "" {
		t.Errorf("Consul = %+v, want 127.0.0.1:8500 and no token", c.Consul)
	}
}

func TestLoadExample(t *testing.T) {
	t.Parallel()
	c, err := Load("../config.yaml")
	if err != nil {
		t.Fatalf("Load(../config.yaml) error:\n%v", err)
	}
	if c.Service == nil || c.Service.Name != "echo" || c.Service.Port != 9001 || c.Service.Check.HTTP == "" {
		t.Errorf("Service = %+v, want echo on 9001 with an http check", c.Service)
	}
	if c.Admin.Listen != "127.0.0.1:15100" || c.Proxy.Listen != "127.0.0.1:15001" {
		t.Errorf("Admin.Listen, Proxy.Listen = %q, %q; want 127.0.0.1:15100, 127.0.0.1:15001", c.Admin.Listen, c.Proxy.Listen)
	}
	if len(c.Upstreams) != 1 || c.Upstreams[0].Listen != "127.0.0.1:15002" || c.Upstreams[0].Balancer != "round_robin" {
		t.Errorf("Upstreams = %+v, want echo on 127.0.0.1:15002 with round_robin", c.Upstreams)
	}
	if got := c.Proxy.Timeouts.Tunnel; got != time.Hour {
		t.Errorf("Proxy.Timeouts.Tunnel = %v, want 1h", got)
	}
}

func TestLoadMissingFile(t *testing.T) {
	t.Parallel()
	path := filepath.Join(t.TempDir(), "nope.yaml")
	_, err := Load(path)
	if !errors.Is(err, fs.ErrNotExist) || !strings.Contains(err.Error(), path) {
		t.Errorf("Load(%q) error = %v, want not-exist naming the path", path, err)
	}
}

func TestLoadNamesFile(t *testing.T) {
	t.Parallel()
	path := filepath.Join(t.TempDir(), "bad.yaml")
	if err := os.WriteFile(path, []byte("service: {name: echo, port: 0}\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	_, err := Load(path)
	want := path + ": service.port: must be 1-65535, got 0"
	if err == nil || err.Error() != want {
		t.Errorf("Load() error = %v, want %q", err, want)
	}
}

func TestErrorTypes(t *testing.T) {
	t.Parallel()
	_, err := ParseEnv([]byte("log: {level: loud, format: xml}"), "c.yaml", nil)
	var cerr *Error
	if !errors.As(err, &cerr) || len(cerr.Problems) != 2 {
		t.Fatalf("ParseEnv() error = %v, want *Error with 2 problems", err)
	}
	var p *Problem
	if !errors.As(err, &p) || p.Path != "log.level" || p.Line != 1 || p.Source != "c.yaml" {
		t.Errorf("errors.As(*Problem) = %+v, want log.level on line 1 of c.yaml", p)
	}
	if got := strings.Count(err.Error(), "\n"); got != 1 {
		t.Errorf("Error() has %d newlines, want 1 (one problem per line):\n%v", got, err)
	}
}
