package config

import (
	"reflect"
	"strings"
	"testing"
)

// reloadBase is the running file the reload cases change.
const reloadBase = `
service:
  name: web
  port: 9001
  tags: [v1]
  meta: {zone: a}
consul: {address: 127.0.0.1:8500, datacenter: dc1}
admin: {listen: 127.0.0.1:15100}
log: {level: info}
proxy:
  listen: 127.0.0.1:15001
  balancer: round_robin
upstreams:
  - {name: a, listen: 127.0.0.1:16001}
  - {name: b, listen: 127.0.0.1:16002, protocol: tcp}
`

func TestNewReload(t *testing.T) {
	tests := []struct {
		name          string
		edit          func(string) string
		live, restart []string
	}{
		{name: "same file", edit: func(s string) string { return s }},
		{
			name: "log level live, format not",
			edit: func(s string) string {
				return strings.Replace(s, "{level: info}", "{level: debug, format: console}", 1)
			},
			live:    []string{"log.level"},
			restart: []string{"log.format"},
		},
		{
			name: "service tags, meta, weight live; port and name not",
			edit: func(s string) string {
				s = strings.Replace(s, "tags: [v1]", "tags: [v2]\n  weight: 3\n  drain: 0s", 1)
				s = strings.Replace(s, "{zone: a}", "{zone: b}", 1)
				s = strings.Replace(s, "port: 9001", "port: 9002", 1)
				return strings.Replace(s, "name: web", "name: web2", 1)
			},
			live: []string{"service.tags", "service.meta", "service.weight", "service.drain"},
			// service.id follows from name and port.
			restart: []string{"service.name", "service.id", "service.port"},
		},
		{
			name:    "service removed",
			edit:    func(s string) string { return s[strings.Index(s, "consul:"):] },
			restart: []string{"service"},
		},
		{
			name: "discovery tuning live, backend not",
			edit: func(s string) string {
				return strings.Replace(s, "log: {level: info}", "log: {level: info}\ndiscovery: {cache_size: 9, stale_for: 1m, backend: static, static: {a: [\"127.0.0.1:1\"], b: [\"127.0.0.1:2\"]}}", 1)
			},
			live:    []string{"discovery.cache_size", "discovery.stale_for"},
			restart: []string{"discovery.backend", "discovery.static"},
		},
		{
			name: "consul and admin",
			edit: func(s string) string {
				return strings.Replace(strings.Replace(s, "8500", "8501", 1), "15100", "15101", 1)
			},
			restart: []string{"consul.address", "admin.listen"},
		},
		{
			name: "proxy defaults live, listen not",
			edit: func(s string) string {
				return strings.Replace(strings.Replace(s, "balancer: round_robin", "balancer: random\n  timeouts: {connect: 3s, read_header: 3s}", 1), "15001", "15009", 1)
			},
			// The upstreams inherit the new default balancer and connect timeout.
			live: []string{"proxy.balancer", "proxy.timeouts.connect", "upstreams[0].balancer", "upstreams[0].timeouts.connect",
				"upstreams[1].balancer", "upstreams[1].timeouts.connect"},
			restart: []string{"proxy.listen", "proxy.timeouts.read_header",
				"upstreams[0].timeouts.read_header", "upstreams[1].timeouts.read_header"},
		},
		{
			name: "upstream added, removed, changed",
			edit: func(s string) string {
				s = strings.Replace(s, "{name: a, listen: 127.0.0.1:16001}", "{name: c, listen: 127.0.0.1:16001, balancer: hash, tags: [x]}", 1)
				return strings.Replace(s, "{name: b, listen: 127.0.0.1:16002, protocol: tcp}", "{name: d, listen: 127.0.0.1:16003}", 1)
			},
			live: []string{"upstreams[0].name", "upstreams[0].balancer", "upstreams[0].tags", "upstreams[1]", "upstreams[1]"},
		},
		{
			name: "upstream added in a datacenter not followed, consul transport keys: restart",
			edit: func(s string) string {
				s = strings.Replace(s, "log: {level: info}", "log: {level: info}\ndiscovery: {max_connections: 5, consistency: consistent, max_stale: 1s}", 1)
				return s + "  - {name: e, listen: 127.0.0.1:16005, datacenter: dc9}\n  - {name: f, listen: 127.0.0.1:16006, datacenter: dc1}\n"
			},
			// f is added (named by its index in the effective config, where e is not).
			live:    []string{"upstreams[2]"},
			restart: []string{"discovery.max_connections", "discovery.consistency", "discovery.max_stale", "upstreams[2]"},
		},
		{
			name: "upstream from tcp to http: kept",
			edit: func(s string) string {
				return strings.Replace(s, "{name: b, listen: 127.0.0.1:16002, protocol: tcp}", "{name: b2, listen: 127.0.0.1:16002, protocol: http}", 1)
			},
			restart: []string{"upstreams[1].name", "upstreams[1].protocol"},
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			running := mustParse(t, reloadBase)
			next := mustParse(t, tc.edit(reloadBase))
			r := NewReload(running, next)
			if !equalKeys(r.Live, tc.live) {
				t.Errorf("Live = %q, want %q", r.Live, tc.live)
			}
			if !equalKeys(r.Restart, tc.restart) {
				t.Errorf("Restart = %q, want %q", r.Restart, tc.restart)
			}
			if r.Changed() != (len(tc.live)+len(tc.restart) > 0) {
				t.Errorf("Changed() = %v", r.Changed())
			}
			// Applying the same file again changes nothing more.
			again := NewReload(r.Effective, next)
			if len(again.Live) > 0 || !equalKeys(again.Restart, tc.restart) {
				t.Errorf("second reload: Live = %q, Restart = %q, want none and %q", again.Live, again.Restart, tc.restart)
			}
			// The running config is left alone.
			if !reflect.DeepEqual(running, mustParse(t, reloadBase)) {
				t.Error("NewReload modified the running config")
			}
		})
	}
}

func TestNewReloadEffective(t *testing.T) {
	running := mustParse(t, reloadBase)
	next := mustParse(t, strings.Replace(strings.Replace(strings.Replace(reloadBase, "tags: [v1]", "tags: [v2]", 1), "port: 9001", "port: 1", 1),
		"protocol: tcp}", "protocol: http}", 1))
	eff := NewReload(running, next).Effective
	if got := eff.Service.Tags; !reflect.DeepEqual(got, []string{"v2"}) {
		t.Errorf("Effective.Service.Tags = %q, want [v2]", got)
	}
	if eff.Service.Port != 9001 {
		t.Errorf("Effective.Service.Port = %d, want the running 9001", eff.Service.Port)
	}
	if got := eff.Upstreams[1].Protocol; got != ProtocolTCP {
		t.Errorf("Effective.Upstreams[1].Protocol = %q, want the running tcp", got)
	}
}

func mustParse(t *testing.T, s string) *Config {
	t.Helper()
	c, err := ParseEnv([]byte(s), "test.yaml", nil)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

func equalKeys(a, b []string) bool {
	if len(a) == 0 && len(b) == 0 {
		return true
	}
	return reflect.DeepEqual(a, b)
}

func TestNewReloadFailover(t *testing.T) {
	base := strings.Replace(reloadBase, "log: {level: info}", "log: {level: info}\ndiscovery: {max_connections: 9}", 1) +
		"  - {name: c, listen: 127.0.0.1:16003, datacenter: dc2}\n"
	next := strings.Replace(base, "{name: a, listen: 127.0.0.1:16001}", "{name: a, listen: 127.0.0.1:16001, failover: [DC2]}", 1)
	next = strings.Replace(next, "{name: b, listen: 127.0.0.1:16002, protocol: tcp}", "{name: b, listen: 127.0.0.1:16002, protocol: tcp, failover: [dc9]}", 1)
	next += "  - {name: e, listen: 127.0.0.1:16005, failover: [dc8]}\n"
	r := NewReload(mustParse(t, base), mustParse(t, next))
	if want := []string{"upstreams[0].failover"}; !equalKeys(r.Live, want) {
		t.Errorf("Live = %q, want %q", r.Live, want)
	}
	if want := []string{"upstreams[1].failover", "upstreams[3]"}; !equalKeys(r.Restart, want) {
		t.Errorf("Restart = %q, want %q", r.Restart, want)
	}
	if got := r.Effective.Upstreams[0].Failover; len(got) != 1 || got[0] != "DC2" {
		t.Errorf("effective upstreams[0].failover = %v, want [DC2]", got)
	}
}
