package config

import (
	"fmt"
	"os"
	"strconv"
	"strings"
)

// resolve fills in what defaults alone cannot: the Consul environment
// fallbacks, the derived service id, and what each upstream inherits from
// proxy and consul. A nil getenv means an empty environment.
func (p *parser) resolve(c *Config, getenv func(string) string) {
	if getenv == nil {
		getenv = func(string) string { return "" }
	}

	from := ""
	if c.Consul.Address == "" {
		if a := getenv("CONSUL_HTTP_ADDR"); a != "" {
			c.Consul.Address, from = a, " (from CONSUL_HTTP_ADDR)"
		} else {
			c.Consul.Address = defaultConsulAddress
		}
	}
	if err := checkConsulAddress(c.Consul.Address); err != nil {
		p.errorf("consul.address", "%v%s", err, from)
	}
	p.resolveConsul(&c.Consul, getenv, from)

	if s := c.Service; s != nil && s.ID == "" {
		host := s.Address
		if host == "" {
			host, _ = hostname()
		}
		s.ID = serviceID(s.Name, host, s.Port)
	}
	if s := c.Service; s != nil && s.Run != nil {
		p.resolveRun(s.Run, getenv)
	}

	p.resolvePubSub(c)
	p.resolveMesh(c)
	p.resolveLimits(&c.Limits)

	for i := range c.Upstreams {
		u := &c.Upstreams[i]
		path := fmt.Sprintf("upstreams[%d]", i)
		if u.Balancer == "" {
			u.Balancer = c.Proxy.Balancer
		}
		if !p.present(path + ".hash_key") {
			u.HashKey = c.Proxy.HashKey
		}
		if !p.present(path + ".preserve_host") {
			u.PreserveHost = c.Proxy.PreserveHost
		}
		if u.Datacenter == "" {
			u.Datacenter = c.Consul.Datacenter
		}
		p.inheritResilience(path+".resilience", &u.Resilience, c.Proxy.Resilience)
		t, pt := &u.Timeouts, c.Proxy.Timeouts
		if t.Connect == 0 {
			t.Connect = pt.Connect
		}
		if t.Request == 0 {
			t.Request = pt.Request
		}
		if t.Idle == 0 {
			t.Idle = pt.Idle
		}
		if t.ReadHeader == 0 {
			t.ReadHeader = pt.ReadHeader
		}
		if t.MaxConnectionAge == 0 {
			t.MaxConnectionAge = pt.MaxConnectionAge
		}
		if t.Tunnel == 0 {
			t.Tunnel = pt.Tunnel
		}
	}
}

// hostname names this host in a derived service id; a variable for tests.
var hostname = os.Hostname

// serviceID derives an instance id "<name>-<host>-<port>", or
// "<name>-<port>" without a host, with every character outside
// [A-Za-z0-9_.-] replaced by '-'.
func serviceID(name, host string, port int) string {
	id := name + "-" + strconv.Itoa(port)
	if host != "" {
		id = name + "-" + host + "-" + strconv.Itoa(port)
	}
	return strings.Map(func(r rune) rune {
		if isNameRune(r) {
			return r
		}
		return '-'
	}, id)
}
