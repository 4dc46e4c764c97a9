package config

import (
	"errors"
	"os"
	"slices"
	"strings"
	"testing"
)

// FuzzParse checks that Parse never panics, that every problem it reports
// has a message, and that whatever it accepts is fully resolved.
func FuzzParse(f *testing.F) {
	f.Add([]byte(fullExample))
	if data, err := os.ReadFile("../config.yaml"); err == nil {
		f.Add(data)
	}
	for _, tc := range errorTests {
		f.Add([]byte(tc.yaml))
	}
	f.Add([]byte("a: &a [x, x]\nb: &b [*a, *a]\nc: &c [*b, *b]\n"))
	f.Add([]byte("service: &s {name: x, port: 1, <<: *s}"))
	f.Add([]byte("service:\n  name: ${NAME:-web}\n  port: ${PORT}\n  address: ${UNSET}\n  ttl: ${TTL:-5s}\n  meta: {a: '$${X}$', b: '${B'}\n"))
	env := map[string]string{"NAME": "web", "PORT": "9001", "TTL": "1m", "B": "a: [b, {c: #"}
	f.Fuzz(func(t *testing.T, data []byte) {
		c, err := ParseEnv(data, "fuzz.yaml", func(k string) string { return env[k] })
		if err != nil {
			if c != nil {
				t.Errorf("ParseEnv() = %+v and error %v; want nil config with an error", c, err)
			}
			var cerr *Error
			if errors.As(err, &cerr) && len(cerr.Problems) == 0 {
				t.Errorf("ParseEnv() returned an *Error with no problems")
			}
			for line := range strings.SplitSeq(err.Error(), "\n") {
				if strings.TrimSpace(strings.TrimPrefix(line, "fuzz.yaml:")) == "" {
					t.Errorf("ParseEnv() error has an empty line: %q", err.Error())
				}
			}
			return
		}
		if c.Consul.Address == "" || c.Admin.Listen == "" || c.Proxy.Timeouts.Connect <= 0 {
			t.Errorf("ParseEnv() accepted unresolved config %+v", c)
		}
		if s := c.Service; s != nil && (s.ID == "" || s.Port < 1 || s.Port > 65535) {
			t.Errorf("ParseEnv() accepted service %+v", s)
		}
		for i, u := range c.Upstreams {
			if !slices.Contains(balancers, u.Balancer) || !slices.Contains(protocols, u.Protocol) || u.Timeouts.Connect <= 0 {
				t.Errorf("ParseEnv() accepted unresolved upstreams[%d] %+v", i, u)
			}
		}
	})
}
