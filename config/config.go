// Package config loads the sidecar's YAML configuration file.
//
// The file's keys are a public contract: they are the snake_case names in the
// yaml tags below and nothing else; an unknown key is an error. Load decodes
// the file, fills in defaults, fills the consul keys the file leaves unset
// from the CONSUL_* variables (ConsulEnv), resolves what each upstream inherits from
// proxy, and validates the result, reporting every problem at once by file
// and full key path. After a successful Load the wiring code reads resolved
// values only: nothing in a *Config needs further defaulting.
//
// A key given with no value (`key:` or `key: ~`) counts as absent.
//
// Every scalar value may hold ${VAR} and ${VAR:-default}, expanded from the
// environment after the YAML is parsed and before the value is typed ($$ is
// a literal $); an unset variable without a default is a problem at the
// value's key path. See expandEnv and expandScalar.
package config

import (
	"fmt"
	"net"
	"os"
	"slices"
	"strconv"
	"strings"
	"time"
)

// Discovery backends.
const (
	BackendConsul = "consul"
	BackendStatic = "static"
)

// Discovery consistency modes, as Consul names them.
const (
	ConsistencyDefault    = "default"
	ConsistencyStale      = "stale"
	ConsistencyConsistent = "consistent"
)

// Upstream protocols.
const (
	ProtocolHTTP  = "http"
	ProtocolHTTP2 = "http2"
	ProtocolGRPC  = "grpc"
	ProtocolTCP   = "tcp"
)

// ProxyProtocolV2 is the one value of upstreams[].proxy_protocol that sends
// a header; empty means none.
const ProxyProtocolV2 = "v2"

// Balancer names accepted by proxy.balancer and upstreams[].balancer.
const (
	BalancerRandom       = "random"
	BalancerRoundRobin   = "round_robin"
	BalancerHash         = "hash"
	BalancerLeastRequest = "least_request"
)

const (
	defaultConsulAddress = "127.0.0.1:8500"
	defaultAdminListen   = "127.0.0.1:15100"
)

// Config is the whole configuration file.
type Config struct {
	// Service is the local app this sidecar registers in Consul; nil for a
	// client-only sidecar.
	Service   *Service   `yaml:"service"`
	Consul    Consul     `yaml:"consul"`
	Admin     Admin      `yaml:"admin"`
	Log       Log        `yaml:"log"`
	Metrics   Metrics    `yaml:"metrics"`
	Tracing   Tracing    `yaml:"tracing"`
	Discovery Discovery  `yaml:"discovery"`
	Proxy     Proxy      `yaml:"proxy"`
	Upstreams []Upstream `yaml:"upstreams"`
	// PubSub is the publish API and broker; off unless pubsub.listen is set.
	PubSub PubSub `yaml:"pubsub"`
	// Subscriptions are the topics the local app receives.
	Subscriptions []Subscription `yaml:"subscriptions"`
	// Security: mutual TLS with Consul's CA, and intentions.
	Security Security `yaml:"security"`
	// Limits bound the sidecar process itself (limits.go).
	Limits ProcessLimits `yaml:"limits"`
}

// Service describes the local app and how the sidecar keeps its Consul
// registration alive.
type Service struct {
	Name string `yaml:"name"` // required
	// ID is the unique instance id. If empty, "<name>-<address>-<port>" is
	// used (the host name in place of an empty address), with every
	// character outside [A-Za-z0-9_.-] replaced by '-'.
	ID string `yaml:"id"`
	// Address is the address peers dial. If empty, none is registered and
	// Consul gives peers the node's address; the app is probed on loopback.
	Address string            `yaml:"address"`
	Port    int               `yaml:"port"` // required, 1-65535
	Tags    []string          `yaml:"tags"`
	Meta    map[string]string `yaml:"meta"`
	Weight  int               `yaml:"weight"` // default 1
	Check   Check             `yaml:"check"`
	// TTL of the Consul check; the sidecar refreshes it every TTL/3.
	// Default 5s, at least 1s.
	TTL time.Duration `yaml:"ttl"`
	// DeregisterCriticalAfter is how long Consul keeps a critical instance
	// before removing it. Default 1m, at least 1m (Consul's minimum).
	DeregisterCriticalAfter time.Duration `yaml:"deregister_critical_after"`
	// Drain is how long the sidecar waits between marking the instance
	// unhealthy and stopping on shutdown. Default 2s; 0 means no wait.
	Drain time.Duration `yaml:"drain"`
	// Run, if set, is the app the sidecar starts and supervises; nil when
	// the app is started some other way.
	Run *Run `yaml:"run"`
	// Inbound, if set, is the listener peers dial in place of the app; nil
	// (the default) registers the app's own port.
	Inbound *Inbound `yaml:"inbound"`
}

// Check is the local health probe whose result feeds the TTL check.
type Check struct {
	// HTTP is an http:// or https:// URL; a 2xx answer means healthy.
	// If empty, a TCP connect to Service.Address:Service.Port is used.
	HTTP     string        `yaml:"http"`
	Interval time.Duration `yaml:"interval"` // default 1s
	Timeout  time.Duration `yaml:"timeout"`  // default 1s
}

// Consul says how to reach the Consul agent.
type Consul struct {
	// Address is "host:port", "http://host:port", "https://host:port" or
	// "unix:///path/to/consul.sock". If the file leaves it empty,
	// CONSUL_HTTP_ADDR is used, else 127.0.0.1:8500; a bare host:port is
	// https when CONSUL_HTTP_SSL is true.
	Address string `yaml:"address"`
	// Token is the ACL token. If the file leaves it and TokenFile empty,
	// CONSUL_HTTP_TOKEN_FILE fills TokenFile, else CONSUL_HTTP_TOKEN fills
	// Token (possibly empty).
	Token      string `yaml:"token"`
	Datacenter string `yaml:"datacenter"` // empty means the agent's own
	// TokenFile is a file holding the ACL token, read when the client is
	// made; not together with Token. See Token for the environment.
	TokenFile string `yaml:"token_file"`
	// Namespace and Partition (Consul Enterprise) scope every request;
	// empty means CONSUL_NAMESPACE and CONSUL_PARTITION, else the token's
	// or agent's default.
	Namespace string `yaml:"namespace"`
	Partition string `yaml:"partition"`
	// TLS is how the sidecar checks the agent's certificate and which
	// client certificate it shows, for an https:// address. Each field
	// the file leaves unset takes its CONSUL_* variable.
	TLS ConsulTLS `yaml:"tls"`
}

// Admin is the admin HTTP listener.
type Admin struct {
	Listen string `yaml:"listen"` // host:port, default 127.0.0.1:15100
	// Token, if set, is the bearer token required by mutating endpoints.
	Token string `yaml:"token"`
	// Pprof serves Go's runtime profiles under /debug/pprof/. Default false.
	Pprof bool `yaml:"pprof"`
	// Insecure allows a non-loopback Listen without Token. Default false:
	// such a listener is refused, since it exposes /status and the app
	// control routes.
	Insecure bool `yaml:"insecure"`
}

// Log configures the logger.
type Log struct {
	Level  string `yaml:"level"`  // debug, info, warn or error; default info
	Format string `yaml:"format"` // json or console; default json
	// Access is where the access log goes: off (the default), stdout, or
	// a file, appended to. One JSON line per request, upgrade or TCP
	// connection.
	Access string `yaml:"access"`
	// AccessSample is the share of access lines written, in (0, 1];
	// default 1. The sidecar's own error answers and 5xx are always written.
	AccessSample float64 `yaml:"access_sample"`
}

// AccessOff is the value of log.access that writes no access log.
const AccessOff = "off"

// Metrics configures the Prometheus metrics.
type Metrics struct {
	// EndpointLabels keeps a series per node (the endpoint label); false
	// drops the label's values, for services of many nodes. Default true.
	EndpointLabels bool `yaml:"endpoint_labels"`
}

// Tracing configures W3C trace context (traceparent, tracestate), which
// the proxy always passes on unchanged.
type Tracing struct {
	// Start gives a request that arrives without a valid traceparent a new
	// trace id, sent to the node and written in the access log. Default true.
	Start bool `yaml:"start"`
}

// Discovery configures where endpoint sets come from.
type Discovery struct {
	Backend string `yaml:"backend"` // consul or static; default consul
	// Static maps a service name to its "host:port" endpoints. Required,
	// and only allowed, when Backend is static.
	Static map[string][]string `yaml:"static"`
	// CacheSize bounds the number of services watched at once. Default 1024.
	CacheSize int `yaml:"cache_size"`
	// IdleTimeout stops watching a service nobody asked for this long.
	// Default 10m; 0 means never.
	IdleTimeout time.Duration `yaml:"idle_timeout"`
	// StaleFor is how long the last good endpoint set is served while
	// Consul is unreachable. Default 0, meaning forever.
	StaleFor time.Duration `yaml:"stale_for"`
	// ResolveTimeout bounds the wait for a service's first endpoint set.
	// Default 2s.
	ResolveTimeout time.Duration `yaml:"resolve_timeout"`
	// MaxConnections bounds the sidecar's concurrent connections to the
	// Consul agent, blocking queries and heartbeats included, whatever the
	// number of watched services. Default 4; at least 3 (two blocking
	// queries and one fetch).
	MaxConnections int `yaml:"max_connections"`
	// Consistency of discovery's reads: default, stale or consistent.
	// Default stale.
	Consistency string `yaml:"consistency"`
	// MaxStale bounds how far behind the leader a server answering a stale
	// read may be; past it the read goes to the leader. Default 10s; 0
	// means no bound. Only used with consistency stale.
	MaxStale time.Duration `yaml:"max_stale"`
}

// Proxy configures the forward proxy and the defaults upstreams inherit.
type Proxy struct {
	// Listen is the forward-proxy listener, where the Host header names the
	// service. Empty (the default) disables it.
	Listen string `yaml:"listen"`
	// Balancer is the default balancer; default round_robin.
	Balancer string `yaml:"balancer"`
	// HashKey is what the hash balancer hashes: header:NAME, cookie:NAME,
	// query:NAME, path or client_ip. Empty (the default) makes hash fall
	// back to round robin. See SplitHashKey.
	HashKey string `yaml:"hash_key"`
	// PreserveHost forwards the client's Host header instead of the
	// endpoint's host:port. Default false.
	PreserveHost bool     `yaml:"preserve_host"`
	Timeouts     Timeouts `yaml:"timeouts"`
	// Resilience: breakers, outlier ejection, retries and slow start.
	Resilience Resilience `yaml:"resilience"`
	// MaxHeaderBytes bounds a request's header on every listener: on
	// HTTP/1.1 the head as sent, on HTTP/2 the decoded header list (name,
	// value and 32 bytes per field, as RFC 9113 counts it), so that HPACK
	// cannot make a few bytes a large header at a node. A request over it
	// is answered 431 (on HTTP/1.1, the connection then closes). Default
	// 61440 (60 KiB, as Envoy); at most 1 MiB.
	// Proxy-wide only: a listener reads the header before it knows where
	// the request goes.
	MaxHeaderBytes int `yaml:"max_header_bytes"`
	// Services sets, per service reached through the forward proxy, what
	// the Host header cannot say: its protocol and codec (a gRPC service
	// whose Connect, gRPC-Web and JSON calls are transcoded). Empty (the
	// default): every service is carried as http.
	Services []ForwardService `yaml:"services"`
}

// ForwardService is how the forward proxy carries one service.
type ForwardService struct {
	Name string `yaml:"name"` // service name, required; unique ignoring case
	// Protocol is http (the default), http2 or grpc.
	Protocol string `yaml:"protocol"`
	// Codec, with protocol grpc, transcodes as upstreams[].codec does.
	Codec Codec `yaml:"codec"`
}

// setDefaults is called by the decoder on a freshly allocated
// ForwardService.
func (f *ForwardService) setDefaults() {
	f.Protocol = ProtocolHTTP
}

// MaxHeaderBytesLimit is the largest proxy.max_header_bytes accepted.
const MaxHeaderBytesLimit = 1 << 20

// Timeouts bound the phases of a proxied request.
type Timeouts struct {
	Connect time.Duration `yaml:"connect"` // dial timeout; default 1s, > 0
	Request time.Duration `yaml:"request"` // whole request; default 0, none
	// Idle is the keep-alive idle timeout for upstream pools and client
	// connections. Default 90s; 0 means no limit.
	Idle time.Duration `yaml:"idle"`
	// ReadHeader bounds reading a request's headers on the listeners.
	// Default 10s; 0 means no limit.
	ReadHeader time.Duration `yaml:"read_header"`
	// MaxConnectionAge renews connections to a node this often (±10%),
	// draining the old ones. Default 5m; 0 means no limit.
	MaxConnectionAge time.Duration `yaml:"max_connection_age"`
	// Tunnel closes an upgraded connection (WebSocket) when no byte has
	// moved either way for this long: HAProxy's "timeout tunnel". Default
	// 1h, longer than the keep-alive idle since WebSocket apps may ping
	// only every minute or so; 0 means no limit.
	Tunnel time.Duration `yaml:"tunnel"`
}

// Upstream is a local listener that forwards to one service. After Load,
// Balancer, HashKey, PreserveHost, Timeouts and Datacenter hold resolved
// values, inherited from Proxy and Consul where the file left them out.
type Upstream struct {
	Name     string `yaml:"name"`     // service name, required
	Listen   string `yaml:"listen"`   // host:port, required and unique
	Protocol string `yaml:"protocol"` // http (default), http2, grpc or tcp
	// Balancer inherits Proxy.Balancer when empty.
	Balancer string `yaml:"balancer"`
	// HashKey inherits Proxy.HashKey when the key is absent; an explicit ""
	// turns hashing off for this upstream.
	HashKey string `yaml:"hash_key"`
	// Tags keeps only endpoints that carry all of them.
	Tags []string `yaml:"tags"`
	// Datacenter inherits Consul.Datacenter when empty.
	Datacenter string `yaml:"datacenter"`
	// Failover lists other datacenters, in order: while Datacenter has no
	// healthy instance (carrying Tags), the first of them that has one
	// serves, until Datacenter has one again. Empty (the default): none.
	Failover []string `yaml:"failover"`
	// PreserveHost inherits Proxy.PreserveHost when the key is absent.
	PreserveHost bool `yaml:"preserve_host"`
	// Timeouts: each zero field inherits the same field of Proxy.Timeouts.
	Timeouts Timeouts `yaml:"timeouts"`
	// Resilience: each key left out inherits Proxy.Resilience's.
	Resilience Resilience `yaml:"resilience"`
	// TLS, when set, reaches the nodes over TLS (h2 by ALPN for http2
	// and grpc) instead of plaintext.
	TLS *TLS `yaml:"tls"`
	// ProxyProtocol "v2" starts every connection to a node with a PROXY
	// protocol v2 header carrying the app's address and the listener
	// address it connected to. Protocol tcp only; empty (the default)
	// sends none.
	ProxyProtocol string `yaml:"proxy_protocol"`
	// Codec transcodes JSON, Connect, gRPC-Web and JSON-RPC calls into
	// gRPC for the nodes. Protocol grpc only.
	Codec Codec `yaml:"codec"`
}

// Codec says whether and how a grpc upstream transcodes the calls of
// clients that do not speak gRPC with protobuf (see package transcode).
type Codec struct {
	// Transcode turns transcoding on; false (the default) passes every
	// request through untouched.
	Transcode bool `yaml:"transcode"`
	// Descriptors is where schemas come from: reflection (also when empty),
	// the nodes' gRPC server reflection, with DescriptorSet as a fallback
	// when set; or file, DescriptorSet alone.
	Descriptors string `yaml:"descriptors"`
	// DescriptorSet is a FileDescriptorSet file (protoc --include_imports
	// --descriptor_set_out); required with descriptors: file.
	DescriptorSet string `yaml:"descriptor_set"`
	// Refresh is how often a service's schema is fetched again; if zero,
	// 5m is used. It is also fetched again when a call names a method or a
	// field it lacks.
	Refresh time.Duration `yaml:"refresh"`
}

// Codec descriptor sources.
const (
	DescriptorsReflection = "reflection"
	DescriptorsFile       = "file"
)

// ProbeAddr is the host:port the sidecar probes the app on: Address, or
// loopback if Address is empty; Inbound.App with an inbound listener.
func (s *Service) ProbeAddr() string {
	if s.Inbound != nil && s.Inbound.App != "" {
		return s.Inbound.App
	}
	host := s.Address
	if host == "" {
		host = "127.0.0.1"
	}
	return net.JoinHostPort(host, strconv.Itoa(s.Port))
}

// setDefaults is called by the decoder on a freshly allocated Service.
func (s *Service) setDefaults() {
	s.Weight = 1
	s.Check = Check{Interval: time.Second, Timeout: time.Second}
	s.TTL = 5 * time.Second
	s.DeregisterCriticalAfter = time.Minute
	s.Drain = 2 * time.Second
}

// RemoteDatacenters lists, once each in order, the datacenters upstreams
// name other than consul.datacenter, in datacenter or failover (Consul's
// names are case-insensitive): discovery follows each with two more
// blocking queries. None with the static backend.
func (c *Config) RemoteDatacenters() []string {
	if c.Discovery.Backend == BackendStatic {
		return nil
	}
	var out []string
	for _, u := range c.Upstreams {
		for _, dc := range append([]string{u.Datacenter}, u.Failover...) {
			if dc != "" && !strings.EqualFold(dc, c.Consul.Datacenter) && !slices.ContainsFunc(out, func(o string) bool { return strings.EqualFold(o, dc) }) {
				out = append(out, dc)
			}
		}
	}
	return out
}

// setDefaults is called by the decoder on each new upstreams element.
func (u *Upstream) setDefaults() {
	u.Protocol = ProtocolHTTP
}

// defaults returns the values of every key an empty file leaves out, before
// the environment and inheritance are applied.
func defaults() *Config {
	return &Config{
		Admin:   Admin{Listen: defaultAdminListen},
		Log:     Log{Level: "info", Format: "json", Access: AccessOff, AccessSample: 1},
		Metrics: Metrics{EndpointLabels: true},
		Tracing: Tracing{Start: true},
		Discovery: Discovery{
			Backend:        BackendConsul,
			CacheSize:      1024,
			IdleTimeout:    10 * time.Minute,
			ResolveTimeout: 2 * time.Second,
			MaxConnections: 4,
			Consistency:    ConsistencyStale,
			MaxStale:       10 * time.Second,
		},
		Proxy: Proxy{
			Balancer: BalancerRoundRobin,
			Timeouts: Timeouts{
				Connect:          time.Second,
				Idle:             90 * time.Second,
				ReadHeader:       10 * time.Second,
				MaxConnectionAge: 5 * time.Minute,
				Tunnel:           time.Hour,
			},
			Resilience:     defaultResilience(),
			MaxHeaderBytes: 60 << 10,
		},
		PubSub:   defaultPubSub(),
		Security: Security{MTLS: MTLSOff},
	}
}

// Default returns the configuration an empty file yields when no CONSUL_*
// variable is set: a client-only sidecar.
func Default() *Config {
	c := defaults()
	p := newParser("")
	p.resolve(c, nil)
	return c
}

// Load reads the file at path and returns its resolved, validated
// configuration. Problems in the file come back as an *Error listing every
// one of them, each line shaped "FILE: KEY.PATH: message".
func Load(path string) (*Config, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("read config: %w", err)
	}
	return parse(data, path, os.LookupEnv)
}

// Parse is Load for bytes already in memory; source names them in errors.
// It reads the process environment for ${VAR} and the Consul fallbacks.
func Parse(data []byte, source string) (*Config, error) {
	return parse(data, source, os.LookupEnv)
}

// ParseEnv is Parse with the environment lookup injected; a nil getenv
// means an empty environment, and a variable getenv returns "" for counts
// as unset. It is safe for concurrent use.
func ParseEnv(data []byte, source string, getenv func(string) string) (*Config, error) {
	return parse(data, source, func(k string) (string, bool) {
		if getenv == nil {
			return "", false
		}
		v := getenv(k)
		return v, v != ""
	})
}

func parse(data []byte, source string, lookup func(string) (string, bool)) (*Config, error) {
	p := newParser(source)
	p.lookup = lookup
	getenv := func(k string) string { v, _ := lookup(k); return v }
	root, err := parseYAML(data)
	if err != nil {
		p.add(&Problem{Source: source, Message: err.Error()})
		return nil, p.err()
	}
	c := defaults()
	p.decodeRoot(root, c)
	p.resolve(c, getenv)
	p.validate(c)
	if err := p.err(); err != nil {
		return nil, err
	}
	return c, nil
}
