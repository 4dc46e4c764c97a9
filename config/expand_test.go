package config

import (
	"reflect"
	"strings"
	"testing"
	"time"
)

func TestExpandEnv(t *testing.T) {
	t.Setenv("POD_IP", "10.1.2.3")
	t.Setenv("PORT", "9100")
	t.Setenv("TTL", "7s")
	t.Setenv("EMPTY", "")
	t.Setenv("ZONE", "a: {b: c} # not a comment")
	t.Setenv("PRICE", "$5")
	tests := []struct {
		name string
		yaml string
		get  func(*Config) any
		want any
	}{
		{"address from env", "service:\n  name: web\n  port: 1\n  address: ${POD_IP}\n",
			func(c *Config) any { return c.Service.Address }, "10.1.2.3"},
		{"int from env", "service:\n  name: web\n  port: ${PORT}\n",
			func(c *Config) any { return c.Service.Port }, 9100},
		{"quoted int from env", "service: {name: web, port: \"${PORT}\"}",
			func(c *Config) any { return c.Service.Port }, 9100},
		{"int default", "service:\n  name: web\n  port: ${NO_PORT:-9001}\n",
			func(c *Config) any { return c.Service.Port }, 9001},
		{"duration from env", "service:\n  name: web\n  port: 1\n  ttl: ${TTL}\n",
			func(c *Config) any { return c.Service.TTL }, 7 * time.Second},
		{"duration default", "service:\n  name: web\n  port: 1\n  ttl: ${NO_TTL:-3s}\n",
			func(c *Config) any { return c.Service.TTL }, 3 * time.Second},
		{"default used when empty", "service: {name: web, port: 1, address: '${EMPTY:-10.0.0.1}'}",
			func(c *Config) any { return c.Service.Address }, "10.0.0.1"},
		{"set but empty without default is empty: the key's default applies", "admin:\n  listen: ${EMPTY}\n",
			func(c *Config) any { return c.Admin.Listen }, "127.0.0.1:15100"},
		{"embedded in text", "consul: {address: 'http://${POD_IP}:8500'}",
			func(c *Config) any { return c.Consul.Address }, "http://10.1.2.3:8500"},
		{"yaml-special characters stay one value", "service: {name: web, port: 1, meta: {zone: '${ZONE}'}}",
			func(c *Config) any { return c.Service.Meta }, map[string]string{"zone": "a: {b: c} # not a comment"}},
		{"value from env is not expanded again", "service: {name: web, port: 1, meta: {price: '${PRICE}'}}",
			func(c *Config) any { return c.Service.Meta["price"] }, "$5"},
		{"$$ is a literal $", "service: {name: web, port: 1, meta: {a: 'x$${POD_IP}$$y'}}",
			func(c *Config) any { return c.Service.Meta["a"] }, "x${POD_IP}$y"},
		{"a lone $ stays", "service: {name: web, port: 1, meta: {a: 'pa$word $'}}",
			func(c *Config) any { return c.Service.Meta["a"] }, "pa$word $"},
		{"list element", "service: {name: web, port: 1, tags: [v1, '${ZONE_TAG:-zone-a}']}",
			func(c *Config) any { return c.Service.Tags }, []string{"v1", "zone-a"}},
		{"null from env is text", "service: {name: web, port: 1, meta: {a: '${NULLISH:-null}'}}",
			func(c *Config) any { return c.Service.Meta["a"] }, "null"},
		{"run.env keeps its own expansion: unset is empty, $NAME expands", "service: {name: web, port: 1, run: {command: a, env: {A: '${NOPE}', B: '$POD_IP', C: '$$${POD_IP}'}}}",
			func(c *Config) any { return c.Service.Run.Env }, map[string]string{"A": "", "B": "10.1.2.3", "C": "$10.1.2.3"}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			c, err := Parse([]byte(tc.yaml), "test.yaml")
			if err != nil {
				t.Fatalf("Parse() error: %v", err)
			}
			if got := tc.get(c); !reflect.DeepEqual(got, tc.want) {
				t.Errorf("got %#v, want %#v", got, tc.want)
			}
		})
	}
}

func TestExpandEnvErrors(t *testing.T) {
	t.Setenv("PORT", "http")
	tests := []struct {
		name string
		yaml string
		want []string
	}{
		{"unset names the key path", "service:\n  name: web\n  port: 1\n  address: ${POD_IP_UNSET}\n",
			[]string{"test.yaml: service.address: ${POD_IP_UNSET} is not set"}},
		{"every unset variable is reported with the other errors", "service: {name: web, port: 0, meta: {a: '${U1}-${U2}'}}\nupstreams: [{name: b, listen: '${U3}'}]",
			[]string{"service.port: must be 1-65535", "service.meta.a: ${U1} is not set", "service.meta.a: ${U2} is not set", "upstreams[0].listen: ${U3} is not set"}},
		{"unterminated", "service: {name: web, port: 1, address: '${POD_IP'}",
			[]string{`service.address: "${POD_IP" has no closing }`}},
		{"bad name", "service: {name: web, port: 1, address: '${POD-IP}'}",
			[]string{`service.address: invalid variable "${POD-IP}"`}},
		{"value from env is typed", "service: {name: web, port: '${PORT}'}",
			[]string{`service.port: want an integer, got "http"`}},
		{"duration without unit", "service:\n  name: web\n  port: 1\n  ttl: ${NO_TTL:-5}\n",
			[]string{"service.ttl: duration 5 has no unit"}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			_, err := Parse([]byte(tc.yaml), "test.yaml")
			if err == nil {
				t.Fatalf("Parse() = nil error, want %q", tc.want)
			}
			for _, w := range tc.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("Parse() error:\n%v\nwant it to contain %q", err, w)
				}
			}
		})
	}
}
