package config

import (
	"errors"
	"fmt"
	"strings"
	"testing"
)

// errorTests are files with mistakes and the exact problem lines they give,
// in order. Each mistake must give one line, not one per consequence.
var errorTests = []struct {
	name string
	yaml string
	env  map[string]string
	want []string
}{
	{
		name: "unknown key with suggestion",
		yaml: "service:\n  name: echo\n  port: 9001\n  chek: {http: ''}\n",
		want: []string{`config.yaml: service.chek: unknown key (did you mean "check"?)`},
	},
	{
		name: "unknown top-level key",
		yaml: "upstream: []\n",
		want: []string{`config.yaml: upstream: unknown key (did you mean "upstreams"?)`},
	},
	{
		name: "camelCase key suggests snake_case",
		yaml: "service: {name: echo, port: 1, deregisterCriticalAfter: 1m}",
		want: []string{`config.yaml: service.deregisterCriticalAfter: unknown key (did you mean "deregister_critical_after"?)`},
	},
	{
		name: "unknown key without a near match lists the keys",
		yaml: "log: {colour: true}",
		want: []string{`config.yaml: log.colour: unknown key (want one of level, format, access, access_sample)`},
	},
	{
		name: "misspelt required key is reported once",
		yaml: "service: {Name: echo, port: 9001}\nupstreams: [{name: a, lisen: '127.0.0.1:1'}]",
		want: []string{
			`config.yaml: service.Name: unknown key (did you mean "name"?)`,
			`config.yaml: upstreams[0].lisen: unknown key (did you mean "listen"?)`,
		},
	},
	{
		name: "misspelt key next to the real one",
		yaml: "service: {name: 'a b', nme: x, port: 9001}",
		want: []string{
			`config.yaml: service.nme: unknown key (did you mean "name"?)`,
			`config.yaml: service.name: invalid name "a b": use letters, digits, '-', '_' and '.'`,
		},
	},
	{
		name: "type error",
		yaml: "service: {name: echo, port: abc}",
		want: []string{`config.yaml: service.port: want an integer, got "abc"`},
	},
	{
		name: "quoted number is not an integer",
		yaml: "discovery: {cache_size: '10'}",
		want: []string{`config.yaml: discovery.cache_size: want an integer, got "10"`},
	},
	{
		name: "bool error",
		yaml: "proxy: {preserve_host: yes}",
		want: []string{`config.yaml: proxy.preserve_host: want true or false, got "yes"`},
	},
	{
		name: "list where a mapping belongs",
		yaml: "service: [echo]",
		want: []string{`config.yaml: service: want a mapping, got a list`},
	},
	{
		name: "mapping where a list belongs",
		yaml: "upstreams: {name: echo}",
		want: []string{`config.yaml: upstreams: want a list, got a mapping`},
	},
	{
		name: "scalar where a list element mapping belongs",
		yaml: "upstreams: [echo]",
		want: []string{`config.yaml: upstreams[0]: want a mapping, got "echo"`},
	},
	{
		name: "bare integer duration",
		yaml: "service: {name: echo, port: 9001, ttl: 5}",
		want: []string{`config.yaml: service.ttl: duration 5 has no unit (write e.g. "5s")`},
	},
	{
		name: "unparsable duration",
		yaml: "proxy: {timeouts: {idle: 5 minutes}}",
		want: []string{`config.yaml: proxy.timeouts.idle: invalid duration "5 minutes" (write e.g. "500ms", "5s" or "1m30s")`},
	},
	{
		name: "service port out of range",
		yaml: "service: {name: echo, port: 70000}",
		want: []string{`config.yaml: service.port: must be 1-65535, got 70000`},
	},
	{
		name: "service port missing",
		yaml: "service: {name: echo}",
		want: []string{`config.yaml: service.port: required (the app's port, 1-65535)`},
	},
	{
		name: "missing service name",
		yaml: "service: {port: 9001}",
		want: []string{`config.yaml: service.name: required`},
	},
	{
		name: "bad service name and id",
		yaml: "service: {name: 'echo svc', id: 'a/b', port: 9001}",
		want: []string{
			`config.yaml: service.name: invalid name "echo svc": use letters, digits, '-', '_' and '.'`,
			`config.yaml: service.id: invalid name "a/b": use letters, digits, '-', '_' and '.'`,
		},
	},
	{
		name: "service address with port",
		yaml: "service: {name: echo, address: '127.0.0.1:9001', port: 9001}",
		want: []string{`config.yaml: service.address: "127.0.0.1:9001" has a port; put the port in service.port`},
	},
	{
		name: "check must be an http url",
		yaml: "service: {name: echo, port: 9001, check: {http: '127.0.0.1:9001/health'}}",
		want: []string{`config.yaml: service.check.http: must be an http:// or https:// URL, got "127.0.0.1:9001/health"`},
	},
	{
		name: "service timing limits",
		yaml: `
service:
  name: echo
  port: 9001
  weight: 0
  check: {interval: 0s, timeout: -1s}
  ttl: 500ms
  deregister_critical_after: 30s
  drain: -1s
`,
		want: []string{
			`config.yaml: service.weight: must be at least 1, got 0`,
			`config.yaml: service.check.interval: must be greater than 0, got 0s`,
			`config.yaml: service.check.timeout: must be greater than 0, got -1s`,
			`config.yaml: service.ttl: must be at least 1s (Consul's TTL granularity), got 500ms`,
			`config.yaml: service.deregister_critical_after: must be at least 1m (Consul's minimum), got 30s`,
			`config.yaml: service.drain: must not be negative, got -1s`,
		},
	},
	{
		name: "meta key path",
		yaml: "service: {name: echo, port: 9001, meta: {zone: a, 'bad key': b, consul-x: c}}",
		want: []string{
			`config.yaml: service.meta["bad key"]: key must be 1-128 letters, digits, '-' or '_'`,
			`config.yaml: service.meta.consul-x: key prefix "consul-" is reserved`,
		},
	},
	{
		name: "empty tag",
		yaml: "service: {name: echo, port: 9001, tags: [v1, '']}",
		want: []string{`config.yaml: service.tags[1]: must not be empty`},
	},
	{
		name: "bad consul address",
		yaml: "consul: {address: 'ftp://consul:8500'}",
		want: []string{`config.yaml: consul.address: unsupported scheme "ftp" in "ftp://consul:8500" (want http, https or unix)`},
	},
	{
		name: "bad consul address from env",
		env:  map[string]string{"CONSUL_HTTP_ADDR": "consul"},
		want: []string{`config.yaml: consul.address: want host:port, http://host:port or https://host:port, got "consul" (from CONSUL_HTTP_ADDR)`},
	},
	{
		name: "admin listen required",
		yaml: "admin: {listen: ''}",
		want: []string{`config.yaml: admin.listen: required (host:port)`},
	},
	{
		name: "log enums",
		yaml: "log: {level: loud, format: xml}",
		want: []string{
			`config.yaml: log.level: unknown "loud" (want debug, info, warn or error)`,
			`config.yaml: log.format: unknown "xml" (want json or console)`,
		},
	},
	{
		name: "access log",
		yaml: "log: {access: /nonexistent-dir/access.log, access_sample: 1.5}",
		want: []string{
			`config.yaml: log.access: the directory of "/nonexistent-dir/access.log": stat /nonexistent-dir: no such file or directory`,
			`config.yaml: log.access_sample: 1.5: want a share in (0, 1]`,
		},
	},
	{
		name: "access log a directory, sample zero",
		yaml: "log: {access: /tmp, access_sample: 0}",
		want: []string{
			`config.yaml: log.access: "/tmp" is a directory: want off, stdout or a file`,
			`config.yaml: log.access_sample: 0: want a share in (0, 1]`,
		},
	},
	{
		name: "static backend without static map",
		yaml: "discovery: {backend: static}",
		want: []string{`config.yaml: discovery.static: required when discovery.backend is static`},
	},
	{
		name: "static map with consul backend",
		yaml: "discovery: {static: {echo: ['127.0.0.1:1']}}",
		want: []string{`config.yaml: discovery.static: set, but discovery.backend is "consul"; it is only used with backend static`},
	},
	{
		name: "bad static entries",
		yaml: `
discovery:
  backend: static
  static:
    echo: ["127.0.0.1:9001", "127.0.0.1:99999", "nohost"]
    empty: []
upstreams: [{name: other, listen: 127.0.0.1:15002}]
`,
		want: []string{
			`config.yaml: discovery.static.echo[1]: port must be 1-65535 in "127.0.0.1:99999"`,
			`config.yaml: discovery.static.echo[2]: want host:port, got "nohost"`,
			`config.yaml: discovery.static.empty: must list at least one host:port`,
			`config.yaml: upstreams[0].name: "other" has no endpoints in discovery.static`,
		},
	},
	{
		name: "static names differing only in case",
		yaml: `
discovery:
  backend: static
  static:
    echo: ["127.0.0.1:9001"]
    Echo: ["127.0.0.1:9002"]
    ECHO: ["127.0.0.1:9003"]
    other: ["127.0.0.1:9004"]
`,
		want: []string{
			`config.yaml: discovery.static.echo: "ECHO" and "echo" differ only in case; service names are case-insensitive`,
			`config.yaml: discovery.static.Echo: "ECHO" and "Echo" differ only in case; service names are case-insensitive`,
		},
	},
	{
		name: "max_header_bytes out of range",
		yaml: "proxy: {max_header_bytes: 0}",
		want: []string{`config.yaml: proxy.max_header_bytes: must be between 1 and 1048576, got 0`},
	},
	{
		name: "max_header_bytes over 1 MiB",
		yaml: "proxy: {max_header_bytes: 1048577}",
		want: []string{`config.yaml: proxy.max_header_bytes: must be between 1 and 1048576, got 1048577`},
	},
	{
		name: "unknown backend",
		yaml: "discovery: {backend: dns, cache_size: 0, resolve_timeout: 0s}",
		want: []string{
			`config.yaml: discovery.backend: unknown "dns" (want consul or static)`,
			`config.yaml: discovery.cache_size: must be at least 1, got 0`,
			`config.yaml: discovery.resolve_timeout: must be greater than 0, got 0s`,
		},
	},
	{
		name: "bad discovery connections and consistency",
		yaml: "discovery: {max_connections: 2, consistency: eventual, max_stale: -1s}",
		want: []string{
			`config.yaml: discovery.max_connections: must be at least 3 (two blocking queries and one fetch), got 2`,
			`config.yaml: discovery.consistency: unknown "eventual" (want default, stale or consistent)`,
			`config.yaml: discovery.max_stale: must not be negative, got -1s`,
		},
	},
	{
		name: "connections for other datacenters",
		yaml: `
upstreams:
  - {name: a, listen: "127.0.0.1:7001", datacenter: dc2}
  - {name: b, listen: "127.0.0.1:7002", datacenter: dc3}
  - {name: c, listen: "127.0.0.1:7003", datacenter: dc2}
`,
		want: []string{
			`config.yaml: discovery.max_connections: must be at least 7 (two blocking queries and one fetch, two blocking queries for each of 2 other datacenters (dc2, dc3)), got 4`,
		},
	},
	{
		name: "failover datacenters",
		yaml: `
consul: {datacenter: dc1}
discovery: {max_connections: 11}
upstreams:
  - {name: a, listen: "127.0.0.1:7001", failover: [dc2, DC1, "dc 3", Dc2, dc3]}
  - {name: b, listen: "127.0.0.1:7002", datacenter: "dc.4"}
`,
		want: []string{
			`config.yaml: upstreams[0].failover[1]: "DC1" is the upstream's own datacenter`,
			`config.yaml: upstreams[0].failover[2]: invalid datacenter "dc 3": use letters, digits, '-' and '_'`,
			`config.yaml: upstreams[0].failover[3]: "Dc2" is listed twice`,
			`config.yaml: upstreams[1].datacenter: invalid datacenter "dc.4": use letters, digits, '-' and '_'`,
		},
	},
	{
		name: "connections for failover datacenters",
		yaml: `
upstreams:
  - {name: a, listen: "127.0.0.1:7001", failover: [dc2, dc3]}
  - {name: b, listen: "127.0.0.1:7002", datacenter: DC2}
`,
		want: []string{
			`config.yaml: discovery.max_connections: must be at least 7 (two blocking queries and one fetch, two blocking queries for each of 2 other datacenters (dc2, dc3)), got 4`,
		},
	},
	{
		name: "connections for pub/sub",
		yaml: `
discovery: {max_connections: 3}
pubsub: {listen: "127.0.0.1:15200", data_dir: /tmp/ps}
`,
		want: []string{
			`config.yaml: discovery.max_connections: must be at least 4 (two blocking queries and one fetch, pub/sub's watch of its subscriptions), got 3`,
		},
	},
	{
		name: "bad protocol with index path",
		yaml: `
upstreams:
  - {name: a, listen: 127.0.0.1:15002}
  - {name: b, listen: 127.0.0.1:15003, protocol: htp}
`,
		want: []string{`config.yaml: upstreams[1].protocol: unknown "htp" (want http, http2, grpc or tcp)`},
	},
	{
		name: "bad upstream listen and name",
		yaml: "upstreams: [{listen: '127.0.0.1:0'}, {name: b, listen: ':15003'}]",
		want: []string{
			`config.yaml: upstreams[0].name: required`,
			`config.yaml: upstreams[0].listen: port must be 1-65535 in "127.0.0.1:0"`,
			`config.yaml: upstreams[1].listen: missing host in ":15003" (use e.g. 127.0.0.1:15003, or 0.0.0.0:15003 for all interfaces)`,
		},
	},
	{
		name: "duplicate listen",
		yaml: `
admin: {listen: 127.0.0.1:15001}
proxy: {listen: 127.0.0.1:15001}
upstreams:
  - {name: a, listen: 127.0.0.1:15002}
  - {name: b, listen: 127.0.0.1:15002}
  - {name: c, listen: 0.0.0.0:15001}
`,
		want: []string{
			`config.yaml: proxy.listen: 127.0.0.1:15001 conflicts with admin.listen (127.0.0.1:15001)`,
			`config.yaml: upstreams[1].listen: 127.0.0.1:15002 conflicts with upstreams[0].listen (127.0.0.1:15002)`,
			`config.yaml: upstreams[2].listen: 0.0.0.0:15001 conflicts with admin.listen (127.0.0.1:15001)`,
		},
	},
	{
		name: "bad hash keys",
		yaml: `
proxy: {hash_key: "header:"}
upstreams:
  - {name: a, listen: 127.0.0.1:15002, hash_key: "header:X User"}
  - {name: b, listen: 127.0.0.1:15003, hash_key: ip}
  - {name: c, listen: 127.0.0.1:15004, hash_key: "path:x"}
`,
		want: []string{
			`config.yaml: proxy.hash_key: header:NAME needs a name, got "header:"`,
			`config.yaml: upstreams[0].hash_key: invalid header name "X User" in "header:X User"`,
			`config.yaml: upstreams[1].hash_key: unknown hash key "ip" (want header:NAME, cookie:NAME, query:NAME, path or client_ip)`,
			`config.yaml: upstreams[2].hash_key: path takes no name, got "path:x"`,
		},
	},
	{
		name: "bad balancer reported where it is written",
		yaml: "proxy: {balancer: fastest}\nupstreams: [{name: a, listen: 127.0.0.1:15002}, {name: b, listen: 127.0.0.1:15003, balancer: rr}]",
		want: []string{
			`config.yaml: proxy.balancer: unknown "fastest" (want random, round_robin, hash or least_request)`,
			`config.yaml: upstreams[1].balancer: unknown "rr" (want random, round_robin, hash or least_request)`,
		},
	},
	{
		name: "negative timeouts",
		yaml: "proxy: {timeouts: {connect: 0s, request: -1s}}\nupstreams: [{name: a, listen: 127.0.0.1:15002, timeouts: {idle: -2s}}]",
		want: []string{
			`config.yaml: proxy.timeouts.connect: must be greater than 0, got 0s`,
			`config.yaml: proxy.timeouts.request: must not be negative, got -1s`,
			`config.yaml: upstreams[0].timeouts.idle: must not be negative, got -2s`,
		},
	},
	{
		name: "negative tunnel timeout",
		yaml: "proxy: {timeouts: {tunnel: -1h}}\nupstreams: [{name: a, listen: 127.0.0.1:15002, timeouts: {tunnel: -30s}}]",
		want: []string{
			`config.yaml: proxy.timeouts.tunnel: must not be negative, got -1h0m0s`,
			`config.yaml: upstreams[0].timeouts.tunnel: must not be negative, got -30s`,
		},
	},
	{
		name: "tunnel timeout not a duration",
		yaml: "proxy: {timeouts: {tunnel: forever}}",
		want: []string{`config.yaml: proxy.timeouts.tunnel: invalid duration "forever" (write e.g. "500ms", "5s" or "1m30s")`},
	},
	{
		name: "bad proxy_protocol",
		yaml: `
upstreams:
  - {name: a, listen: 127.0.0.1:15002, protocol: tcp, proxy_protocol: v1}
  - {name: b, listen: 127.0.0.1:15003, proxy_protocol: v2}
  - {name: c, listen: 127.0.0.1:15004, protocol: grpc, proxy_protocol: v2}
  - {name: d, listen: 127.0.0.1:15005, protocol: htp, proxy_protocol: v2}
  - {name: e, listen: 127.0.0.1:15006, protocol: tcp, proxy_protocol: 2}
`,
		want: []string{
			`config.yaml: upstreams[0].proxy_protocol: unknown "v1" (want v2, or "" for none)`,
			`config.yaml: upstreams[1].proxy_protocol: not supported with protocol http (only with tcp)`,
			`config.yaml: upstreams[2].proxy_protocol: not supported with protocol grpc (only with tcp)`,
			`config.yaml: upstreams[3].protocol: unknown "htp" (want http, http2, grpc or tcp)`,
			`config.yaml: upstreams[4].proxy_protocol: unknown "2" (want v2, or "" for none)`,
		},
	},
	{
		name: "duplicate key",
		yaml: "log:\n  level: info\n  level: debug\n",
		want: []string{`config.yaml: log.level: duplicate key (first on line 2)`},
	},
	{
		name: "not a mapping",
		yaml: "- echo\n- web\n",
		want: []string{`config.yaml: the file must be a YAML mapping of sections (service, consul, admin, log, discovery, proxy, upstreams), got a list`},
	},
	{
		name: "plain text",
		yaml: "hello",
		want: []string{`config.yaml: the file must be a YAML mapping of sections (service, consul, admin, log, discovery, proxy, upstreams), got "hello"`},
	},
	{
		name: "yaml syntax error",
		yaml: "log: [info\n",
		want: []string{`config.yaml: line 1: did not find expected ',' or ']'`},
	},
	{
		name: "two documents",
		yaml: "log: {level: info}\n---\nlog: {level: debug}\n",
		want: []string{`config.yaml: line 2: a second YAML document; the file must hold one`},
	},
	{
		name: "alias that contains itself",
		yaml: "discovery: {backend: static, static: &x {echo: *x}}",
		want: []string{`config.yaml: discovery.static.echo: want a list, got a mapping`},
	},
	{
		name: "bad merge value",
		yaml: "log: {<<: info}",
		want: []string{`config.yaml: log["<<"]: merge value must be a mapping or a list of mappings, got "info"`},
	},
	{
		name: "exponential merge expansion is bounded",
		yaml: mergeBomb(40),
		want: []string{`config.yaml: upstreams[13]: document too large or too many alias expansions`},
	},
	{
		name: "several errors together in file order",
		yaml: `
upstreams:
  - {name: echo, listen: 127.0.0.1:15002, protocol: htp}
service:
  name: echo
  port: abc
  chek: {}
  ttl: 5
log: {level: loud}
`,
		want: []string{
			`config.yaml: upstreams[0].protocol: unknown "htp" (want http, http2, grpc or tcp)`,
			`config.yaml: service.port: want an integer, got "abc"`,
			`config.yaml: service.chek: unknown key (did you mean "check"?)`,
			`config.yaml: service.ttl: duration 5 has no unit (write e.g. "5s")`,
			`config.yaml: log.level: unknown "loud" (want debug, info, warn or error)`,
		},
	},
}

func TestParseErrors(t *testing.T) {
	t.Parallel()
	for _, tc := range errorTests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			c, err := ParseEnv([]byte(tc.yaml), "config.yaml", env(tc.env))
			if err == nil {
				t.Fatalf("ParseEnv() = %+v, want an error", c)
			}
			if c != nil {
				t.Errorf("ParseEnv() config = %+v, want nil with an error", c)
			}
			var cerr *Error
			if !errors.As(err, &cerr) {
				t.Fatalf("ParseEnv() error type %T, want *Error", err)
			}
			if got, want := err.Error(), strings.Join(tc.want, "\n"); got != want {
				t.Errorf("ParseEnv() error:\n%s\nwant:\n%s", got, want)
			}
		})
	}
}

// TestUpstreamNameCase: an upstream's name finds its discovery.static entry
// whatever the case of either, as the proxy and the static backend fold the
// case of service names; a name no entry has in any case is still an error.
func TestUpstreamNameCase(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name, upstream, static string
		want                   string // the error, "" for none
	}{
		{"same case", "echo", "echo", ""},
		{"upstream in upper case", "ECHO", "echo", ""},
		{"static in mixed case", "echo", "Echo", ""},
		{"both in mixed case", "eCHO", "EcHo", ""},
		{"other name", "echo2", "Echo", `config.yaml: upstreams[0].name: "echo2" has no endpoints in discovery.static`},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			yaml := fmt.Sprintf(`
discovery:
  backend: static
  static:
    %s: ["127.0.0.1:9001"]
upstreams: [{name: %s, listen: 127.0.0.1:15002}]
`, tc.static, tc.upstream)
			_, err := ParseEnv([]byte(yaml), "config.yaml", env(nil))
			got := ""
			if err != nil {
				got = err.Error()
			}
			if got != tc.want {
				t.Errorf("ParseEnv() error = %q, want %q", got, tc.want)
			}
		})
	}
}

func TestSplitHashKey(t *testing.T) {
	t.Parallel()
	tests := []struct {
		in, source, name string
		ok               bool
	}{
		{"header:X-User", HashHeader, "X-User", true},
		{"cookie:session", HashCookie, "session", true},
		{"query:user", HashQuery, "user", true},
		{"path", HashPath, "", true},
		{"client_ip", HashClientIP, "", true},
		{"header:", "", "", false},
		{"header:a:b", "", "", false},
		{"cookie:a;b", "", "", false},
		{"query:user id", HashQuery, "user id", true},
		{"client_ip:x", "", "", false},
		{"Header:X", "", "", false},
		{"", "", "", false},
	}
	for _, tc := range tests {
		source, name, err := SplitHashKey(tc.in)
		if source != tc.source || name != tc.name || (err == nil) != tc.ok {
			t.Errorf("SplitHashKey(%q) = %q, %q, %v; want %q, %q, ok=%v", tc.in, source, name, err, tc.source, tc.name, tc.ok)
		}
	}
}

// mergeBomb returns a file whose upstreams each merge the previous one
// twice, so expanding them naively takes 2^n steps.
func mergeBomb(n int) string {
	var b strings.Builder
	b.WriteString("upstreams:\n  - &u0 {name: a, listen: '127.0.0.1:1'}\n")
	for i := 1; i < n; i++ {
		fmt.Fprintf(&b, "  - &u%d {<<: [*u%d, *u%d]}\n", i, i-1, i-1)
	}
	return b.String()
}
