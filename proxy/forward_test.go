package proxy

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/netip"
	"net/url"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/sidecarlb/sidecar/internal/leakcheck"

	"github.com/sidecarlb/sidecar/discovery"
)

func TestServiceName(t *testing.T) {
	tests := []struct {
		host string
		want string // "" means refused with ErrBadServiceName
	}{
		{"echo", "echo"},
		{"echo:80", "echo"},
		{"echo:8080", "echo"},
		{"echo.", "echo"},
		{"echo.service.consul", "echo"},
		{"echo.service.consul.", "echo"},
		{"echo.service.consul:80", "echo"},
		{"echo.service.dc1.consul", "echo"},
		{"echo.service.dc1.consul:8080", "echo"},
		{"my-svc_2", "my-svc_2"},
		{"api.v2", "api.v2"},
		// The name as the client spelt it; the forwarder folds case.
		{"Echo", "Echo"},
		{"ECHO:80", "ECHO"},
		{"Echo.Service.Consul", "Echo"},
		{"ECHO.SERVICE.DC1.CONSUL:8080", "ECHO"},
		{"echo.service.example", "echo.service.example"}, // not Consul DNS: kept whole
		{"echo.SERVICE.example", "echo.SERVICE.example"},

		{"", ""},
		{":80", ""},
		{"127.0.0.1", ""},
		{"127.0.0.1:80", ""},
		{"10.1.2.3:8080", ""},
		{"127.0.0.1.service.consul", ""},
		{"::1", ""},
		{"[::1]", ""},
		{"[::1]:80", ""},
		{"[fe80::1%25eth0]:80", ""},
		{"fe80::1", ""},
		{"::ffff:127.0.0.1", ""},
		{"localhost", ""},
		{"localhost:80", ""},
		{"LocalHost", ""},
		{"localhost.", ""},
		{"localhost..", ""},
		{"foo.localhost", ""},
		{"foo.LOCALHOST:8080", ""},
		{"localhost.service.consul", ""},
		{"LOCALHOST.SERVICE.CONSUL", ""},
		{"127.0.0.1.Service.Consul", ""},
		{"localhost..service.consul", ""},
		{"127.0.0.1.", ""},
		{"127.0.0.1..", ""},
		{".service.consul", ""},
		{"a/b", ""},
		{"a b", ""},
		{"echo ", ""},
		{" echo", ""},
		{"echo\t", ""},
		{"echo\x00", ""},
		{"e%63ho", ""},
		{"user@echo", ""},
		{"echo?x", ""},
		{"ech\u00f6", ""},
		{".", ""},
		{strings.Repeat("a", 254), ""},
	}
	for _, tc := range tests {
		t.Run(fmt.Sprintf("%q", tc.host), func(t *testing.T) {
			got, _, _, err := serviceName(tc.host)
			if tc.want == "" {
				if !errors.Is(err, ErrBadServiceName) {
					t.Errorf("serviceName(%q) = %q, %v; want ErrBadServiceName", tc.host, got, err)
				}
				return
			}
			if err != nil || got != tc.want {
				t.Errorf("serviceName(%q) = %q, %v; want %q", tc.host, got, err, tc.want)
			}
		})
	}
}

func TestServiceFromRequest(t *testing.T) {
	tests := []struct {
		name   string
		target string // request target as on the request line
		host   string // Host header
		want   string // "" means refused
	}{
		{"host header", "/path", "echo", "echo"},
		{"host header with port", "/path", "echo:8080", "echo"},
		{"consul dns host", "/path", "echo.service.dc1.consul:8080", "echo"},
		{"absolute form", "http://echo/path?q=1", "echo", "echo"},
		{"absolute form wins over host", "http://echo:80/path", "other", "echo"},
		{"absolute form consul dns", "http://echo.service.consul/x", "echo.service.consul", "echo"},
		{"absolute form ip", "http://127.0.0.1:9000/", "echo", ""},
		{"absolute form ipv6", "http://[::1]:9000/", "echo", ""},
		{"absolute form localhost", "http://localhost/", "echo", ""},
		{"ip host", "/", "127.0.0.1:9000", ""},
		{"no host", "/", "", ""},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			raw := fmt.Sprintf("GET %s HTTP/1.1\r\nHost: %s\r\n\r\n", tc.target, tc.host)
			r, err := http.ReadRequest(bufio.NewReader(strings.NewReader(raw)))
			if err != nil {
				t.Fatalf("ReadRequest(%q): %v", raw, err)
			}
			got, _, _, err := serviceFromRequest(r)
			if tc.want == "" {
				if !errors.Is(err, ErrBadServiceName) {
					t.Errorf("serviceFromRequest(%s) = %q, %v; want ErrBadServiceName", tc.target, got, err)
				}
				return
			}
			if err != nil || got != tc.want {
				t.Errorf("serviceFromRequest(%s) = %q, %v; want %q", tc.target, got, err, tc.want)
			}
		})
	}
}

// isLocalName reports whether s names the local host or an IP address, with
// any trailing dots ignored: what the forward proxy must never accept.
func isLocalName(s string) bool {
	s = strings.TrimRight(s, ".")
	if _, err := netip.ParseAddr(s); err == nil {
		return true
	}
	if net.ParseIP(s) != nil {
		return true
	}
	l := strings.ToLower(s)
	return l == "localhost" || strings.HasSuffix(l, ".localhost")
}

func TestServiceNameTag(t *testing.T) {
	for _, tc := range []struct{ host, name, tag, dc string }{
		{"echo.service.consul", "echo", "", ""},
		{"v1.echo.service.consul", "echo", "v1", ""},
		{"V1.Echo.Service.Consul:80", "Echo", "V1", ""},
		{"echo.service.dc2.consul", "echo", "", "dc2"},
		{"Echo.Service.DC2.Consul.", "Echo", "", "dc2"},
		{"canary.eu.echo.service.dc2.consul", "echo", "canary.eu", "dc2"},
		{"v1.echo", "v1.echo", "", ""}, // not Consul DNS: a dotted name
	} {
		name, tag, dc, err := serviceName(tc.host)
		if err != nil || name != tc.name || tag != tc.tag || dc != tc.dc {
			t.Errorf("serviceName(%q) = %q, %q, %q, %v; want %q, %q, %q", tc.host, name, tag, dc, err, tc.name, tc.tag, tc.dc)
		}
	}
	for _, host := range []string{".echo.service.consul", "echo.service.a.b.consul", "echo.service.d/c.consul"} {
		if _, _, _, err := serviceName(host); !errors.Is(err, ErrBadServiceName) {
			t.Errorf("serviceName(%q) error = %v, want ErrBadServiceName", host, err)
		}
	}
}

func FuzzServiceName(f *testing.F) {
	for _, s := range []string{
		"echo", "echo:80", "echo.service.consul", "echo.service.dc1.consul:8080", "echo.",
		"127.0.0.1", "[::1]:80", "::1", "localhost", "foo.localhost", "localhost..", "a/b", "a b",
		"localhost..service.consul", "127.0.0.1..", "[fe80::1%25eth0]", ":", "[", "]:80", "",
	} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, host string) {
		name, _, _, err := serviceName(host)
		if err != nil {
			if !errors.Is(err, ErrBadServiceName) {
				t.Fatalf("serviceName(%q) error = %v, want ErrBadServiceName", host, err)
			}
			if name != "" {
				t.Fatalf("serviceName(%q) = %q with error %v, want empty name", host, name, err)
			}
			return
		}
		if !validServiceName(name) {
			t.Fatalf("serviceName(%q) = %q, not a valid service name", host, name)
		}
		if isLocalName(name) {
			t.Fatalf("serviceName(%q) = %q, an IP address or localhost", host, name)
		}
		if strings.HasSuffix(name, ".") {
			t.Fatalf("serviceName(%q) = %q, with a trailing dot", host, name)
		}
		// An accepted name is its own service name.
		if again, _, _, err := serviceName(name); err != nil || again != name {
			t.Fatalf("serviceName(%q) = %q, %v; want it unchanged (from host %q)", name, again, err, host)
		}
		// Case does not matter: in upper case, the host names the same
		// service.
		if upper := strings.ToUpper(host); len(upper) == len(host) {
			if got, _, _, err := serviceName(upper); err != nil || !strings.EqualFold(got, name) {
				t.Fatalf("serviceName(%q) = %q, %v; want %q in any case (from host %q)", upper, got, err, name, host)
			}
		}
	})
}

// forwardSetup starts three nodes of "echo", a decoy listener that no request
// should ever reach, and a forward proxy resolving from a static map.
type forwardSetup struct {
	nodes    []*testServer
	decoy    *testServer
	resolver *recordingResolver
	proxy    *testServer
	proxyURL *url.URL
}

func newForwardSetup(t *testing.T, defaults RouteConfig) *forwardSetup {
	t.Helper()
	s := &forwardSetup{nodes: startNodes(t, 3)}
	s.decoy = startServer(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		t.Errorf("decoy got %s %s (Host %q)", r.Method, r.URL, r.Host)
	}))
	s.resolver = &recordingResolver{Resolver: staticCache(t, map[string][]string{"echo": addrs(s.nodes)})}
	h, err := New(s.resolver, nil, testLogger(t)).Forward("forward", defaults)
	if err != nil {
		t.Fatalf("Forward() error = %v", err)
	}
	s.proxy = startProxyServer(t, h)
	s.proxyURL, _ = url.Parse(s.proxy.URL)
	return s
}

// nodeConns is how many connections the nodes and the decoy accepted.
func (s *forwardSetup) nodeConns() (nodes, decoy int64) {
	for _, n := range s.nodes {
		nodes += n.accepts.Load()
	}
	return nodes, s.decoy.accepts.Load()
}

func TestForwardHTTPProxyClient(t *testing.T) {
	leakcheck.Check(t)
	s := newForwardSetup(t, RouteConfig{})
	client := newClient(t, func(tr *http.Transport) { tr.Proxy = http.ProxyURL(s.proxyURL) })

	seen := map[string]int{}
	for _, target := range []string{"http://echo/path?x=1", "http://echo:8080/path", "http://echo.service.consul/path", "http://echo.service.dc1.consul/path",
		"http://Echo/path", "http://ECHO:80/path", "http://Echo.Service.Consul/path"} {
		for range 3 {
			resp := doGet(t, client, target, nil)
			if resp.status != http.StatusOK {
				t.Fatalf("GET %s via proxy: status = %d, want 200; body %q", target, resp.status, resp.body)
			}
			inst := resp.header.Get("X-Instance")
			seen[inst]++
			if want := inst + " GET /path"; resp.body != want {
				t.Errorf("GET %s via proxy: body = %q, want %q", target, resp.body, want)
			}
		}
	}
	if len(seen) != 3 {
		t.Errorf("instances reached = %v, want all 3", seen)
	}
	// echo.service.dc1.consul is echo in dc1 (the static map has one
	// datacenter).
	if got := s.resolver.watched(); !slices.Equal(got, []string{"echo", "echo@dc1"}) {
		t.Errorf("services looked up = %v, want [echo echo@dc1]", got)
	}
}

// TestForwardHostHeader: the Host header names the service, in any case,
// as DNS and Consul names go: every spelling reaches the one service and
// shares its route.
func TestForwardHostHeader(t *testing.T) {
	leakcheck.Check(t)
	s := newForwardSetup(t, RouteConfig{})
	client := newClient(t, nil)
	for _, host := range []string{"echo", "echo:80", "echo.service.consul", "Echo", "ECHO:80", "eCHo.SERVICE.Consul:8080"} {
		req, _ := http.NewRequest(http.MethodGet, s.proxy.URL+"/hello", nil)
		req.Host = host
		resp := do(t, client, req)
		if resp.status != http.StatusOK || !strings.HasSuffix(resp.body, " GET /hello") {
			t.Errorf("GET /hello with Host %q: status = %d, body %q; want 200 from a node", host, resp.status, resp.body)
		}
	}
	if got := s.resolver.watched(); len(got) != 1 || got[0] != "echo" {
		t.Errorf("services watched = %v, want [echo]", got)
	}
}

func TestForwardRefused(t *testing.T) {
	leakcheck.Check(t)
	s := newForwardSetup(t, RouteConfig{})
	decoyPort := s.decoy.Listener.Addr().(*net.TCPAddr).Port
	client := newClient(t, func(tr *http.Transport) { tr.Proxy = http.ProxyURL(s.proxyURL) })

	tests := []struct {
		name   string
		target string // absolute URL, sent through the proxy
		host   string // if set, sent to the proxy directly with this Host
		status int
		code   string
		body   string // the body must contain it
	}{
		{name: "unknown service", target: fmt.Sprintf("http://nosuch:%d/x", decoyPort),
			status: http.StatusNotFound, code: "unknown_service", body: `"nosuch"`},
		{name: "unknown service consul dns", target: "http://nosuch.service.consul/x",
			status: http.StatusNotFound, code: "unknown_service", body: `"nosuch"`},
		{name: "unknown service host header", host: "nosuch",
			status: http.StatusNotFound, code: "unknown_service", body: `"nosuch"`},
		// In any case, and named as the client spelt it.
		{name: "unknown service upper case", target: fmt.Sprintf("http://NoSuch:%d/x", decoyPort),
			status: http.StatusNotFound, code: "unknown_service", body: `"NoSuch"`},
		{name: "unknown service upper case host header", host: "NOSUCH.SERVICE.CONSUL:80",
			status: http.StatusNotFound, code: "unknown_service", body: `"NOSUCH"`},
		{name: "localhost upper case", target: fmt.Sprintf("http://LOCALHOST:%d/x", decoyPort),
			status: http.StatusBadRequest, code: "bad_service_name", body: "localhost"},
		{name: "ip literal", target: fmt.Sprintf("http://127.0.0.1:%d/x", decoyPort),
			status: http.StatusBadRequest, code: "bad_service_name", body: "127.0.0.1"},
		{name: "ip literal host header", host: fmt.Sprintf("127.0.0.1:%d", decoyPort),
			status: http.StatusBadRequest, code: "bad_service_name", body: "IP address"},
		{name: "ipv6 literal", target: fmt.Sprintf("http://[::1]:%d/x", decoyPort),
			status: http.StatusBadRequest, code: "bad_service_name", body: "IP address"},
		{name: "localhost", target: fmt.Sprintf("http://localhost:%d/x", decoyPort),
			status: http.StatusBadRequest, code: "bad_service_name", body: "localhost"},
		{name: "sub localhost", target: fmt.Sprintf("http://echo.localhost:%d/x", decoyPort),
			status: http.StatusBadRequest, code: "bad_service_name", body: "localhost"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			var resp response
			if tc.host != "" {
				req, _ := http.NewRequest(http.MethodGet, s.proxy.URL+"/x", nil)
				req.Host = tc.host
				resp = do(t, newClient(t, nil), req)
			} else {
				resp = doGet(t, client, tc.target, nil)
			}
			if resp.status != tc.status {
				t.Errorf("status = %d, want %d; body %q", resp.status, tc.status, resp.body)
			}
			if got := resp.header.Get("X-Sidecar-Error"); got != tc.code {
				t.Errorf("X-Sidecar-Error = %q, want %q", got, tc.code)
			}
			if !strings.Contains(resp.body, tc.body) {
				t.Errorf("body = %q, want it to contain %q", resp.body, tc.body)
			}
		})
	}
	if nodes, decoy := s.nodeConns(); nodes != 0 || decoy != 0 {
		t.Errorf("connections accepted: nodes %d, decoy %d; want none", nodes, decoy)
	}
	if got := s.resolver.watched(); len(got) != 0 {
		t.Errorf("services watched = %v, want none", got)
	}
}

func TestForwardConnect(t *testing.T) {
	leakcheck.Check(t)
	s := newForwardSetup(t, RouteConfig{})
	decoy := s.decoy.Listener.Addr().String()
	for _, target := range []string{"echo:80", decoy} {
		t.Run(target, func(t *testing.T) {
			raw := fmt.Sprintf("CONNECT %s HTTP/1.1\r\nHost: %s\r\n\r\n", target, target)
			status, _ := rawExchange(t, s.proxy.Listener.Addr().String(), raw)
			if status != http.StatusMethodNotAllowed {
				t.Errorf("CONNECT %s: status = %d, want 405", target, status)
			}
		})
	}
	if nodes, decoy := s.nodeConns(); nodes != 0 || decoy != 0 {
		t.Errorf("connections accepted: nodes %d, decoy %d; want none", nodes, decoy)
	}
}

// failingBackend is a discovery backend that never answers a watch and
// fails every Known.
type failingBackend struct{}

func (failingBackend) Watch(ctx context.Context, _ string, _ discovery.Sink) { <-ctx.Done() }
func (failingBackend) Known(context.Context, string) (bool, error) {
	return false, errors.New("consul unreachable")
}
func (failingBackend) Close() {}

func TestForwardDiscoveryDown(t *testing.T) {
	leakcheck.Check(t)
	cache := discovery.NewCache(failingBackend{}, discovery.CacheOptions{ResolveTimeout: 50 * time.Millisecond}, testLogger(t))
	t.Cleanup(cache.Close)
	h, err := New(cache, nil, testLogger(t)).Forward("forward", RouteConfig{})
	if err != nil {
		t.Fatalf("Forward() error = %v", err)
	}
	px := startProxyServer(t, h)
	req, _ := http.NewRequest(http.MethodGet, px.URL+"/", nil)
	req.Host = "echo"
	resp := do(t, newClient(t, nil), req)
	if resp.status != http.StatusServiceUnavailable || resp.header.Get("X-Sidecar-Error") != "discovery_unavailable" {
		t.Errorf("status = %d, X-Sidecar-Error %q; want 503 discovery_unavailable", resp.status, resp.header.Get("X-Sidecar-Error"))
	}
	if !strings.Contains(resp.body, `"echo"`) {
		t.Errorf("body = %q, want it to name the service", resp.body)
	}
}

func TestForwardBadDefaults(t *testing.T) {
	p := New(staticCache(t, nil), nil, testLogger(t))
	for _, cfg := range []RouteConfig{{HashKey: "nope"}, {Balancer: "nope"}} {
		if _, err := p.Forward("forward", cfg); err == nil {
			t.Errorf("Forward(%+v) error = nil, want one", cfg)
		}
		if _, err := p.Upstream("up", RouteConfig{Service: "echo", HashKey: cfg.HashKey, Balancer: cfg.Balancer}); err == nil {
			t.Errorf("Upstream(%+v) error = nil, want one", cfg)
		}
	}
}

// TestForwardTag: TAG.NAME.service.consul keeps the instances carrying TAG,
// on a route of its own; the static nodes carry none, so none is left.
func TestForwardTag(t *testing.T) {
	leakcheck.Check(t)
	s := newForwardSetup(t, RouteConfig{})
	client := newClient(t, func(tr *http.Transport) { tr.Proxy = http.ProxyURL(s.proxyURL) })
	if resp := doGet(t, client, "http://echo.service.consul/x", nil); resp.status != http.StatusOK {
		t.Fatalf("GET echo.service.consul: status = %d, want 200; body %q", resp.status, resp.body)
	}
	if resp := doGet(t, client, "http://v1.echo.service.consul/x", nil); resp.status != http.StatusServiceUnavailable {
		t.Errorf("GET v1.echo.service.consul: status = %d, want 503 (no instance tagged v1); body %q", resp.status, resp.body)
	}
	if resp := doGet(t, client, "http://echo.service.consul/x", nil); resp.status != http.StatusOK {
		t.Errorf("GET echo.service.consul after the tagged route: status = %d, want 200", resp.status)
	}
}
