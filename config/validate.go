package config

import (
	"errors"
	"fmt"
	"maps"
	"net"
	"net/netip"
	"net/url"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"time"

	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protodesc"
	"google.golang.org/protobuf/types/descriptorpb"

	"github.com/sidecarlb/sidecar/internal/httpwire"
)

var (
	balancers     = []string{BalancerRandom, BalancerRoundRobin, BalancerHash, BalancerLeastRequest}
	protocols     = []string{ProtocolHTTP, ProtocolHTTP2, ProtocolGRPC, ProtocolTCP}
	backends      = []string{BackendConsul, BackendStatic}
	consistencies = []string{ConsistencyDefault, ConsistencyStale, ConsistencyConsistent}
	levels        = []string{"debug", "info", "warn", "error"}
	formats       = []string{"json", "console"}
)

// validate records every semantic problem in c, which has been resolved.
func (p *parser) validate(c *Config) {
	if c.Service != nil {
		p.validateService(c.Service)
	}
	p.hostPort("admin.listen", c.Admin.Listen)
	p.validateAdmin(&c.Admin)
	p.oneOf("log.level", c.Log.Level, levels)
	p.oneOf("log.format", c.Log.Format, formats)
	p.validateAccessLog(&c.Log)
	p.validateDiscovery(&c.Discovery)
	p.validateProxy(&c.Proxy)
	for i := range c.Upstreams {
		p.validateUpstream(fmt.Sprintf("upstreams[%d]", i), &c.Upstreams[i], &c.Discovery)
	}
	p.validatePubSub(c)
	p.validateMesh(c)
	p.consulConnections(c)
	p.listenConflicts(c)
}

// validateAdmin refuses an admin listener reachable beyond this host
// without a token, unless admin.insecure says it is meant.
func (p *parser) validateAdmin(a *Admin) {
	if a.Token != "" || a.Insecure || checkHostPort(a.Listen) != nil {
		return
	}
	host, _, err := net.SplitHostPort(a.Listen)
	if err != nil || loopbackHost(host) {
		return
	}
	p.errorf("admin.listen", "%q is not a loopback address and admin.token is empty: set admin.token, listen on 127.0.0.1, or set admin.insecure: true if it is meant", a.Listen)
}

// loopbackHost reports whether host (from a listen address) binds loopback
// only: a loopback IP or "localhost". An empty host binds every interface.
func loopbackHost(host string) bool {
	if strings.EqualFold(host, "localhost") {
		return true
	}
	ip, err := netip.ParseAddr(host)
	return err == nil && ip.Unmap().IsLoopback()
}

func (p *parser) validateService(s *Service) {
	p.name("service.name", s.Name)
	if p.present("service.id") && s.ID != "" {
		p.name("service.id", s.ID)
	}
	switch _, _, err := net.SplitHostPort(s.Address); {
	case s.Address == "":
		// None registered: Consul gives peers the node's address.
	case err == nil:
		p.errorf("service.address", "%q has a port; put the port in service.port", s.Address)
	case strings.ContainsAny(s.Address, " \t\r\n/[]"):
		p.errorf("service.address", "%q is not a host name or IP address", s.Address)
	}
	switch {
	case !p.present("service.port") && s.Port == 0:
		p.errorf("service.port", "required (the app's port, 1-65535)")
	case s.Port < 1 || s.Port > 65535:
		p.errorf("service.port", "must be 1-65535, got %d", s.Port)
	}
	p.tags("service.tags", s.Tags)
	p.meta(s.Meta)
	if s.Weight < 1 {
		p.errorf("service.weight", "must be at least 1, got %d", s.Weight)
	}
	if s.Check.HTTP != "" {
		if u, err := url.Parse(s.Check.HTTP); err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
			p.errorf("service.check.http", "must be an http:// or https:// URL, got %q", s.Check.HTTP)
		}
	}
	p.positive("service.check.interval", s.Check.Interval)
	p.positive("service.check.timeout", s.Check.Timeout)
	if s.TTL < time.Second {
		p.errorf("service.ttl", "must be at least 1s (Consul's TTL granularity), got %s", s.TTL)
	}
	if s.DeregisterCriticalAfter < time.Minute {
		p.errorf("service.deregister_critical_after", "must be at least 1m (Consul's minimum), got %s", s.DeregisterCriticalAfter)
	}
	p.nonNegative("service.drain", s.Drain)
	if s.Run != nil {
		p.validateRun(s.Run)
	}
}

// meta applies Consul's rules for service metadata.
func (p *parser) meta(m map[string]string) {
	if len(m) > 64 {
		p.errorf("service.meta", "at most 64 pairs, got %d", len(m))
	}
	for _, k := range slices.Sorted(maps.Keys(m)) {
		v := m[k]
		path := child("service.meta", k)
		switch {
		case k == "" || len(k) > 128 || strings.ContainsFunc(k, func(r rune) bool { return r == '.' || !isNameRune(r) }):
			p.errorf(path, "key must be 1-128 letters, digits, '-' or '_'")
		case strings.HasPrefix(k, "consul-"):
			p.errorf(path, `key prefix "consul-" is reserved`)
		case len(v) > 512:
			p.errorf(path, "value longer than 512 bytes")
		}
	}
}

func (p *parser) validateDiscovery(d *Discovery) {
	p.oneOf("discovery.backend", d.Backend, backends)
	switch {
	case d.Backend == BackendStatic && len(d.Static) == 0:
		p.errorf("discovery.static", "required when discovery.backend is static")
	case d.Backend != BackendStatic && len(d.Static) > 0:
		p.errorf("discovery.static", "set, but discovery.backend is %q; it is only used with backend static", d.Backend)
	}
	folded := make(map[string]string, len(d.Static)) // names by their lower case
	for _, name := range slices.Sorted(maps.Keys(d.Static)) {
		eps := d.Static[name]
		path := child("discovery.static", name)
		p.name(path, name)
		// The static backend, like Consul, folds the case of names.
		key := strings.ToLower(name)
		if prev, dup := folded[key]; dup {
			p.errorf(path, "%q and %q differ only in case; service names are case-insensitive", prev, name)
		} else {
			folded[key] = name
		}
		if len(eps) == 0 {
			p.errorf(path, "must list at least one host:port")
		}
		for i, ep := range eps {
			p.hostPort(fmt.Sprintf("%s[%d]", path, i), ep)
		}
	}
	if d.CacheSize < 1 {
		p.errorf("discovery.cache_size", "must be at least 1, got %d", d.CacheSize)
	}
	p.nonNegative("discovery.idle_timeout", d.IdleTimeout)
	p.nonNegative("discovery.stale_for", d.StaleFor)
	p.positive("discovery.resolve_timeout", d.ResolveTimeout)
	if d.MaxConnections < 3 {
		p.errorf("discovery.max_connections", "must be at least 3 (two blocking queries and one fetch), got %d", d.MaxConnections)
	}
	p.oneOf("discovery.consistency", d.Consistency, consistencies)
	p.nonNegative("discovery.max_stale", d.MaxStale)
}

// consulConnections checks that discovery.max_connections leaves one
// connection for registration, heartbeats and fetches beside the queries
// that block for minutes: two per datacenter followed, and pub/sub's watch
// of its subscription records. (Under 3 is validateDiscovery's error.)
func (p *parser) consulConnections(c *Config) {
	dcs := c.RemoteDatacenters()
	need, why := 3+2*len(dcs), []string{"two blocking queries and one fetch"}
	if len(dcs) > 0 {
		why = append(why, fmt.Sprintf("two blocking queries for each of %d other datacenters (%s)", len(dcs), strings.Join(dcs, ", ")))
	}
	if c.PubSub.Enabled() {
		need++
		why = append(why, "pub/sub's watch of its subscriptions")
	}
	if c.Discovery.MaxConnections >= 3 && c.Discovery.MaxConnections < need {
		p.errorf("discovery.max_connections", "must be at least %d (%s), got %d", need, strings.Join(why, ", "), c.Discovery.MaxConnections)
	}
}

func (p *parser) validateProxy(x *Proxy) {
	if x.Listen != "" {
		p.hostPort("proxy.listen", x.Listen)
	}
	p.oneOf("proxy.balancer", x.Balancer, balancers)
	p.hashKey("proxy.hash_key", x.HashKey)
	p.positive("proxy.timeouts.connect", x.Timeouts.Connect)
	p.nonNegative("proxy.timeouts.request", x.Timeouts.Request)
	p.nonNegative("proxy.timeouts.idle", x.Timeouts.Idle)
	p.nonNegative("proxy.timeouts.read_header", x.Timeouts.ReadHeader)
	p.nonNegative("proxy.timeouts.max_connection_age", x.Timeouts.MaxConnectionAge)
	p.nonNegative("proxy.timeouts.tunnel", x.Timeouts.Tunnel)
	p.validateResilience("proxy.resilience", &x.Resilience)
	p.validateForwardServices(x.Services)
	if x.MaxHeaderBytes < 1 || x.MaxHeaderBytes > MaxHeaderBytesLimit {
		p.errorf("proxy.max_header_bytes", "must be between 1 and %d, got %d", MaxHeaderBytesLimit, x.MaxHeaderBytes)
	}
}

// validateUpstream checks u after inheritance; values it inherited from
// proxy are reported there, not once per upstream.
func (p *parser) validateUpstream(path string, u *Upstream, d *Discovery) {
	p.name(path+".name", u.Name)
	if d.Backend == BackendStatic && u.Name != "" && len(d.Static) > 0 && !staticHas(d.Static, u.Name) {
		p.errorf(path+".name", "%q has no endpoints in discovery.static", u.Name)
	}
	p.hostPort(path+".listen", u.Listen)
	p.oneOf(path+".protocol", u.Protocol, protocols)
	if p.present(path + ".balancer") {
		p.oneOf(path+".balancer", u.Balancer, balancers)
	}
	if p.present(path + ".hash_key") {
		p.hashKey(path+".hash_key", u.HashKey)
	}
	p.tags(path+".tags", u.Tags)
	p.failover(path, u)
	// Zero inherits proxy's value, which proxy's own checks cover.
	for _, t := range []struct {
		key string
		d   time.Duration
	}{
		{"connect", u.Timeouts.Connect}, {"request", u.Timeouts.Request},
		{"idle", u.Timeouts.Idle}, {"read_header", u.Timeouts.ReadHeader},
		{"max_connection_age", u.Timeouts.MaxConnectionAge}, {"tunnel", u.Timeouts.Tunnel},
	} {
		if tp := path + ".timeouts." + t.key; p.present(tp) {
			p.nonNegative(tp, t.d)
		}
	}
	if p.present(path + ".resilience") {
		p.validateResilience(path+".resilience", &u.Resilience)
	}
	if u.TLS != nil && u.Protocol == ProtocolTCP {
		p.errorf(path+".tls", "not supported with protocol tcp")
	}
	p.validateTLS(path+".tls", u.TLS)
	switch pp := path + ".proxy_protocol"; {
	case u.ProxyProtocol == "":
	case u.ProxyProtocol != ProxyProtocolV2:
		p.errorf(pp, `unknown %q (want %s, or "" for none)`, u.ProxyProtocol, ProxyProtocolV2)
	case u.Protocol != ProtocolTCP && slices.Contains(protocols, u.Protocol):
		// An unknown protocol is reported on its own key.
		p.errorf(pp, "not supported with protocol %s (only with tcp)", u.Protocol)
	}
	p.validateCodec(path+".codec", u)
}

// validateCodec checks an upstream's codec: transcoding on grpc only, a
// known descriptor source, a descriptor set that reads.
func (p *parser) validateCodec(path string, u *Upstream) {
	c := &u.Codec
	if c.Transcode && u.Protocol != ProtocolGRPC && slices.Contains(protocols, u.Protocol) {
		p.errorf(path+".transcode", "not supported with protocol %s (only with grpc)", u.Protocol)
	}
	if c.Descriptors != "" {
		p.oneOf(path+".descriptors", c.Descriptors, []string{DescriptorsReflection, DescriptorsFile})
	}
	if c.Descriptors == DescriptorsFile && c.DescriptorSet == "" {
		p.errorf(path+".descriptor_set", "required with descriptors: file")
	}
	if c.DescriptorSet != "" {
		if err := checkDescriptorSet(c.DescriptorSet); err != nil {
			p.errorf(path+".descriptor_set", "%v", err)
		}
	}
	if p.present(path + ".refresh") {
		p.positive(path+".refresh", c.Refresh)
	}
}

// checkDescriptorSet reads a FileDescriptorSet file and checks that its
// files link (every import included).
func checkDescriptorSet(path string) error {
	b, err := os.ReadFile(path)
	if err != nil {
		return err
	}
	var set descriptorpb.FileDescriptorSet
	if err := proto.Unmarshal(b, &set); err != nil {
		return fmt.Errorf("%s is not a FileDescriptorSet: %w", path, err)
	}
	if _, err := protodesc.NewFiles(&set); err != nil {
		return fmt.Errorf("%s: %w (made without --include_imports?)", path, err)
	}
	return nil
}

// staticHas reports whether static lists service name. Case does not
// matter, as in the proxy and the static backend, which fold it the way
// validateDiscovery does.
func staticHas(static map[string][]string, name string) bool {
	if _, ok := static[name]; ok {
		return true
	}
	key := strings.ToLower(name)
	for n := range static {
		if strings.ToLower(n) == key {
			return true
		}
	}
	return false
}

// listenConflicts reports two listeners on the same address, or on the same
// port where one of them listens on all interfaces.
func (p *parser) listenConflicts(c *Config) {
	type listener struct{ path, host, port string }
	var seen []listener
	add := func(path, addr string) {
		if addr == "" || checkHostPort(addr) != nil {
			return // reported elsewhere
		}
		host, port, _ := net.SplitHostPort(addr)
		for _, l := range seen {
			if l.port == port && (strings.EqualFold(l.host, host) || unspecified(l.host) || unspecified(host)) {
				p.errorf(path, "%s conflicts with %s (%s)", addr, l.path, net.JoinHostPort(l.host, l.port))
				return
			}
		}
		seen = append(seen, listener{path, host, port})
	}
	add("admin.listen", c.Admin.Listen)
	add("proxy.listen", c.Proxy.Listen)
	add("pubsub.listen", c.PubSub.Listen)
	add("pubsub.http.listen", c.PubSub.HTTP.Listen)
	if c.Service != nil && c.Service.Inbound != nil {
		add("service.inbound.listen", c.Service.Inbound.Listen)
	}
	for i, u := range c.Upstreams {
		add(fmt.Sprintf("upstreams[%d].listen", i), u.Listen)
	}
}

func unspecified(host string) bool {
	a, err := netip.ParseAddr(host)
	return err == nil && a.IsUnspecified()
}

func (p *parser) name(path, s string) {
	switch {
	case s == "":
		p.errorf(path, "required")
	case !validName(s):
		p.errorf(path, "invalid name %q: use letters, digits, '-', '_' and '.'", s)
	}
}

// failover checks upstream u's datacenter and failover list: datacenter
// names, none twice, none the upstream's own datacenter (case-insensitive,
// as Consul compares them).
func (p *parser) failover(path string, u *Upstream) {
	if u.Datacenter != "" && !validDatacenter(u.Datacenter) {
		p.errorf(path+".datacenter", "invalid datacenter %q: use letters, digits, '-' and '_'", u.Datacenter)
	}
	for i, dc := range u.Failover {
		fp := fmt.Sprintf("%s.failover[%d]", path, i)
		switch {
		case !validDatacenter(dc):
			p.errorf(fp, "invalid datacenter %q: use letters, digits, '-' and '_'", dc)
		case strings.EqualFold(dc, u.Datacenter):
			p.errorf(fp, "%q is the upstream's own datacenter", dc)
		case slices.ContainsFunc(u.Failover[:i], func(o string) bool { return strings.EqualFold(o, dc) }):
			p.errorf(fp, "%q is listed twice", dc)
		}
	}
}

// validDatacenter reports whether s is a Consul datacenter name: one DNS
// label of letters, digits, '-' and '_'.
func validDatacenter(s string) bool {
	return s != "" && len(s) <= 63 && !strings.ContainsFunc(s, func(r rune) bool {
		return !(r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || r == '-' || r == '_')
	})
}

func (p *parser) tags(path string, tags []string) {
	for i, t := range tags {
		if strings.TrimSpace(t) == "" {
			p.errorf(fmt.Sprintf("%s[%d]", path, i), "must not be empty")
		}
	}
}

func (p *parser) hostPort(path, s string) {
	if err := checkHostPort(s); err != nil {
		p.errorf(path, "%v", err)
	}
}

func (p *parser) hashKey(path, s string) {
	if s == "" {
		return
	}
	if _, _, err := SplitHashKey(s); err != nil {
		p.errorf(path, "%v", err)
	}
}

func (p *parser) oneOf(path, s string, allowed []string) {
	for _, a := range allowed {
		if s == a {
			return
		}
	}
	p.errorf(path, "unknown %q (want %s)", s, orList(allowed))
}

func (p *parser) positive(path string, d time.Duration) {
	if d <= 0 {
		p.errorf(path, "must be greater than 0, got %s", d)
	}
}

func (p *parser) nonNegative(path string, d time.Duration) {
	if d < 0 {
		p.errorf(path, "must not be negative, got %s", d)
	}
}

// orList formats ["a", "b", "c"] as "a, b or c".
func orList(s []string) string {
	if len(s) < 2 {
		return strings.Join(s, "")
	}
	return strings.Join(s[:len(s)-1], ", ") + " or " + s[len(s)-1]
}

func isNameRune(r rune) bool {
	return r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || r == '-' || r == '_' || r == '.'
}

// validName reports whether s is a usable service name or id:
// letters, digits, '-', '_' and '.'.
func validName(s string) bool {
	return s != "" && !strings.ContainsFunc(s, func(r rune) bool { return !isNameRune(r) })
}

// checkHostPort accepts "host:port" with a non-empty host and a numeric
// port 1-65535.
func checkHostPort(s string) error {
	if s == "" {
		return errors.New("required (host:port)")
	}
	host, port, err := net.SplitHostPort(s)
	if err != nil {
		return fmt.Errorf("want host:port, got %q", s)
	}
	if host == "" {
		return fmt.Errorf("missing host in %q (use e.g. 127.0.0.1%s, or 0.0.0.0%s for all interfaces)", s, s, s)
	}
	if strings.ContainsAny(host, " \t\r\n/") {
		return fmt.Errorf("invalid host in %q", s)
	}
	if n, err := strconv.Atoi(port); err != nil || n < 1 || n > 65535 {
		return fmt.Errorf("port must be 1-65535 in %q", s)
	}
	return nil
}

// checkConsulAddress accepts "host:port", "http://host:port",
// "https://host:port" and "unix:///path/to/consul.sock".
func checkConsulAddress(s string) error {
	hostPort := s
	if scheme, rest, ok := strings.Cut(s, "://"); ok {
		if scheme == "unix" {
			if rest == "" || strings.ContainsAny(rest, "\x00\r\n") {
				return fmt.Errorf("want unix:///path/to/consul.sock, got %q", s)
			}
			return nil
		}
		if scheme != "http" && scheme != "https" {
			return fmt.Errorf("unsupported scheme %q in %q (want http, https or unix)", scheme, s)
		}
		u, err := url.Parse(s)
		if err != nil || (u.Path != "" && u.Path != "/") || u.RawQuery != "" || u.User != nil {
			return fmt.Errorf("want host:port or %s://host:port, got %q", scheme, s)
		}
		hostPort = u.Host
	}
	if err := checkHostPort(hostPort); err != nil {
		return fmt.Errorf("want host:port, http://host:port or https://host:port, got %q", s)
	}
	return nil
}

// Hash key sources, as written in hash_key.
const (
	HashHeader   = "header"
	HashCookie   = "cookie"
	HashQuery    = "query"
	HashPath     = "path"
	HashClientIP = "client_ip"
)

// SplitHashKey parses a hash_key value into its source (HashHeader,
// HashCookie, HashQuery, HashPath or HashClientIP) and, for the first three,
// the header, cookie or (decoded) query parameter name. Header and cookie
// names must be HTTP tokens; a query name may be any non-empty string.
func SplitHashKey(s string) (source, name string, err error) {
	source, name, hasName := strings.Cut(s, ":")
	switch source {
	case HashPath, HashClientIP:
		if hasName {
			return "", "", fmt.Errorf("%s takes no name, got %q", source, s)
		}
		return source, "", nil
	case HashHeader, HashCookie, HashQuery:
		switch {
		case name == "":
			return "", "", fmt.Errorf("%s:NAME needs a name, got %q", source, s)
		case source != HashQuery && !httpwire.ValidToken(name):
			return "", "", fmt.Errorf("invalid %s name %q in %q", source, name, s)
		}
		return source, name, nil
	}
	return "", "", fmt.Errorf("unknown hash key %q (want header:NAME, cookie:NAME, query:NAME, path or client_ip)", s)
}

// validateForwardServices checks proxy.services: a name each, once, and a
// protocol and codec the forward proxy can carry.
func (p *parser) validateForwardServices(list []ForwardService) {
	seen := map[string]bool{}
	for i := range list {
		f := &list[i]
		path := fmt.Sprintf("proxy.services[%d]", i)
		p.name(path+".name", f.Name)
		if key := strings.ToLower(f.Name); f.Name != "" && seen[key] {
			p.errorf(path+".name", "%q is listed twice (names ignore case)", f.Name)
		} else {
			seen[key] = true
		}
		p.oneOf(path+".protocol", f.Protocol, []string{ProtocolHTTP, ProtocolHTTP2, ProtocolGRPC})
		p.validateCodec(path+".codec", &Upstream{Protocol: f.Protocol, Codec: f.Codec})
	}
}

// validateAccessLog checks log.access (off, stdout or a file in a
// directory that exists) and log.access_sample.
func (p *parser) validateAccessLog(l *Log) {
	switch l.Access {
	case AccessOff, "stdout":
	case "":
		p.errorf("log.access", "empty: want off, stdout or a file")
	default:
		if fi, err := os.Stat(l.Access); err == nil && fi.IsDir() {
			p.errorf("log.access", "%q is a directory: want off, stdout or a file", l.Access)
		} else if _, err := os.Stat(filepath.Dir(l.Access)); err != nil {
			p.errorf("log.access", "the directory of %q: %v", l.Access, err)
		}
	}
	if !(l.AccessSample > 0 && l.AccessSample <= 1) {
		p.errorf("log.access_sample", "%v: want a share in (0, 1]", l.AccessSample)
	}
}
