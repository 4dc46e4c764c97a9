package config

import (
	"reflect"
	"slices"
	"strconv"
	"strings"
)

// Reload is what a reload makes of a newly loaded file, against the
// configuration running.
type Reload struct {
	// Effective is the configuration to run: the new file's where a change
	// applies live, the running one's where it does not.
	Effective *Config
	// Live names every key, by full path, whose change applies live.
	Live []string
	// Restart names every key whose change needs a restart; Effective keeps
	// its running value.
	Restart []string
}

// Changed reports whether the reload changes anything, live or not.
func (r Reload) Changed() bool { return len(r.Live)+len(r.Restart) > 0 }

// NewReload compares next, a freshly loaded file, with running. These
// apply live:
//
//   - log.level;
//   - discovery.cache_size, idle_timeout, stale_for and resolve_timeout;
//   - service.tags, service.meta, service.weight (registered again) and
//     service.drain;
//   - proxy.balancer, hash_key, preserve_host, resilience and timeouts but
//     read_header (the forward proxy's routes);
//   - upstreams, matched by listen: added, removed, and changed in every
//     key but protocol between tcp and the HTTP family, datacenter and
//     timeouts.read_header; failover changes live when the running
//     discovery follows every datacenter it names (else it keeps its
//     running value until a restart);
//   - pubsub.max_message_bytes, for the publishes that start after it;
//   - subscriptions, matched by topic and group: added, removed and changed
//     in every key, when the subscriber side runs (pub/sub on with
//     pubsub.http.listen set in the running file and the next) and
//     service.name stays (the default group). Otherwise they need a restart.
//
// Every other key needs a restart: service (its presence, name, id,
// address, port, check, ttl, deregister_critical_after, run), consul.*,
// admin.*, log.format, discovery.backend, static, max_connections,
// consistency and max_stale, an upstream added in a datacenter (or with a
// failover datacenter) the running discovery does not follow, proxy.listen, proxy.max_header_bytes,
// every pubsub key but max_message_bytes,
// proxy.timeouts.read_header, and any section this list does not name. The
// listener-side settings (read_header, max_header_bytes) are read when a
// listener opens: a listener that stays keeps its own, a new one takes
// the running proxy.max_header_bytes and its file's read_header.
//
// Neither config is modified; Effective may share slices and maps with
// both, which nothing changes after Load.
func NewReload(running, next *Config) Reload {
	eff := *running // sections not named below keep their running value
	eff.Log.Level = next.Log.Level
	d := next.Discovery
	d.Backend, d.Static = running.Discovery.Backend, running.Discovery.Static
	// The Consul client's transport and query options are made at start.
	d.MaxConnections, d.Consistency, d.MaxStale = running.Discovery.MaxConnections, running.Discovery.Consistency, running.Discovery.MaxStale
	eff.Discovery = d

	if running.Service != nil && next.Service != nil {
		s := *running.Service
		s.Tags, s.Meta, s.Weight, s.Drain = next.Service.Tags, next.Service.Meta, next.Service.Weight, next.Service.Drain
		s.Meta = runningMTLSMeta(s.Meta, running.Service.Meta)
		eff.Service = &s
	}

	p := running.Proxy
	p.Balancer, p.HashKey, p.PreserveHost, p.Resilience = next.Proxy.Balancer, next.Proxy.HashKey, next.Proxy.PreserveHost, next.Proxy.Resilience
	p.Timeouts = liveTimeouts(running.Proxy.Timeouts, next.Proxy.Timeouts)
	p.Services = next.Proxy.Services
	eff.Proxy = p

	eff.Upstreams = make([]Upstream, 0, len(next.Upstreams))
	for _, n := range next.Upstreams {
		r, ok := upstreamAt(running.Upstreams, n.Listen)
		switch {
		case !ok && !(followed(running, n.Datacenter) && allFollowed(running, n.Failover)):
			// A datacenter whose watches did not start with the sidecar:
			// the upstream waits for the restart that starts them.
		case !ok:
			eff.Upstreams = append(eff.Upstreams, n) // a new listener takes the file's all
		case (r.Protocol == ProtocolTCP) != (n.Protocol == ProtocolTCP):
			eff.Upstreams = append(eff.Upstreams, r) // another kind of listener
		default:
			u := n
			u.Datacenter = r.Datacenter
			if !allFollowed(running, n.Failover) {
				u.Failover = r.Failover // a new datacenter waits for the restart
			}
			u.Timeouts = liveTimeouts(r.Timeouts, n.Timeouts)
			eff.Upstreams = append(eff.Upstreams, u)
		}
	}

	if running.PubSub.Enabled() {
		eff.PubSub.MaxMessageBytes, eff.PubSub.MaxMessageBytesN = next.PubSub.MaxMessageBytes, next.PubSub.MaxMessageBytesN
	}
	if subscriptionsLive(running, next) {
		eff.Subscriptions = next.Subscriptions
	}
	return Reload{
		Effective: &eff,
		Live:      diffConfig(running, &eff),
		Restart:   diffConfig(&eff, next),
	}
}

// subscriptionsLive reports whether next's subscriptions can replace the
// running ones: the http broker runs and stays, the peer listener they are
// delivered through runs and stays, and the group a subscription defaults
// to (service.name) is the same. With the nats broker they need a restart.
func subscriptionsLive(running, next *Config) bool {
	r, n := &running.PubSub, &next.PubSub
	return r.Enabled() && n.Enabled() && r.Broker == BrokerHTTP && n.Broker == BrokerHTTP &&
		r.HTTP.Listen != "" && n.HTTP.Listen == r.HTTP.Listen &&
		running.Service != nil && next.Service != nil && running.Service.Name == next.Service.Name
}

// followed reports whether running's discovery follows datacenter dc: the
// local one, or another that one of its upstreams named at start.
func followed(running *Config, dc string) bool {
	return dc == "" || strings.EqualFold(dc, running.Consul.Datacenter) || running.Discovery.Backend == BackendStatic ||
		slices.ContainsFunc(running.RemoteDatacenters(), func(r string) bool { return strings.EqualFold(r, dc) })
}

// allFollowed reports whether running's discovery follows every datacenter
// in dcs.
func allFollowed(running *Config, dcs []string) bool {
	for _, dc := range dcs {
		if !followed(running, dc) {
			return false
		}
	}
	return true
}

// liveTimeouts is next with the running read_header, which only a new
// listener reads.
func liveTimeouts(running, next Timeouts) Timeouts {
	next.ReadHeader = running.ReadHeader
	return next
}

func upstreamAt(us []Upstream, listen string) (Upstream, bool) {
	for _, u := range us {
		if u.Listen == listen {
			return u, true
		}
	}
	return Upstream{}, false
}

// diffConfig names the keys whose values differ between a and b, by full
// path: the deepest key of each struct that differs, and whole lists and
// maps. Upstreams are matched by listen, subscriptions by topic and group,
// and named by their index in b (in a when removed).
func diffConfig(a, b *Config) []string {
	var keys []string
	av, bv := reflect.ValueOf(a).Elem(), reflect.ValueOf(b).Elem()
	t := av.Type()
	for i := range t.NumField() {
		name := yamlName(t.Field(i))
		if name == "" {
			continue
		}
		switch name {
		case "upstreams":
			keys = append(keys, diffUpstreams(a.Upstreams, b.Upstreams)...)
			continue
		case "subscriptions":
			keys = append(keys, diffSubscriptions(a.Subscriptions, b.Subscriptions)...)
			continue
		}
		keys = diffValue(keys, name, av.Field(i), bv.Field(i))
	}
	return keys
}

func diffUpstreams(a, b []Upstream) []string {
	var keys []string
	for i, u := range b {
		prefix := "upstreams[" + strconv.Itoa(i) + "]"
		old, ok := upstreamAt(a, u.Listen)
		if !ok {
			keys = append(keys, prefix)
			continue
		}
		keys = diffValue(keys, prefix, reflect.ValueOf(old), reflect.ValueOf(u))
	}
	for i, u := range a {
		if _, ok := upstreamAt(b, u.Listen); !ok {
			keys = append(keys, "upstreams["+strconv.Itoa(i)+"]")
		}
	}
	return keys
}

// diffSubscriptions is diffUpstreams for subscriptions, matched by topic
// and group.
func diffSubscriptions(a, b []Subscription) []string {
	var keys []string
	at := func(ss []Subscription, s Subscription) (Subscription, bool) {
		for _, o := range ss {
			if o.Topic == s.Topic && o.Group == s.Group {
				return o, true
			}
		}
		return Subscription{}, false
	}
	for i, s := range b {
		prefix := "subscriptions[" + strconv.Itoa(i) + "]"
		if old, ok := at(a, s); ok {
			keys = diffValue(keys, prefix, reflect.ValueOf(old), reflect.ValueOf(s))
		} else {
			keys = append(keys, prefix)
		}
	}
	for i, s := range a {
		if _, ok := at(b, s); !ok {
			keys = append(keys, "subscriptions["+strconv.Itoa(i)+"]")
		}
	}
	return keys
}

// diffValue appends to keys the paths under prefix where a and b differ.
func diffValue(keys []string, prefix string, a, b reflect.Value) []string {
	if reflect.DeepEqual(a.Interface(), b.Interface()) {
		return keys
	}
	switch a.Kind() {
	case reflect.Pointer:
		if a.IsNil() || b.IsNil() {
			return append(keys, prefix)
		}
		return diffValue(keys, prefix, a.Elem(), b.Elem())
	case reflect.Struct:
		t := a.Type()
		for i := range t.NumField() {
			if name := yamlName(t.Field(i)); name != "" {
				keys = diffValue(keys, prefix+"."+name, a.Field(i), b.Field(i))
			}
		}
		return keys
	}
	return append(keys, prefix)
}

// yamlName is a field's key in the file, or "" for a field not in it.
func yamlName(f reflect.StructField) string {
	if !f.IsExported() {
		return ""
	}
	name, _, _ := strings.Cut(f.Tag.Get("yaml"), ",")
	if name == "-" {
		return ""
	}
	return name
}
