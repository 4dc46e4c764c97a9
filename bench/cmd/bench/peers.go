package main

import (
	"bytes"
	"context"
	"crypto/tls"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"
)

// Listener kinds every peer offers.
const (
	lnH1   = "h1"   // HTTP/1.1 (and WebSocket) to the backends' HTTP port
	lnH2   = "h2"   // h2c from the client, to the backends' HTTP port
	lnGRPC = "grpc" // h2c gRPC to the backends' gRPC port
)

// backend is one started bench/backend process.
type backend struct {
	proc     *proc
	http     string
	grpc     string
	countURL string
}

// peer is one way of reaching the backends: directly, or through a proxy.
type peer struct {
	name string
	// proc is the proxy process; nil for direct.
	proc *proc
	// targets by listener kind: the backends themselves for direct, else
	// one proxy listener.
	targets map[string][]string
	// idleRSSKB is the proxy's resident set once ready, before any load.
	idleRSSKB int64
	// notes say how the peer is set up, for the report.
	notes []string
	// tls: its HTTP/1.1 listener speaks TLS; loadArgs go to every
	// loadgen run against it (-tls).
	tls      bool
	loadArgs []string
}

// ports hands out loopback ports that were free when asked for.
type ports struct{ held []net.Listener }

func (p *ports) next() (string, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return "", err
	}
	p.held = append(p.held, ln)
	return ln.Addr().String(), nil
}

// release closes the listeners that reserved the ports, just before the
// processes bind them.
func (p *ports) release() {
	for _, ln := range p.held {
		ln.Close()
	}
	p.held = nil
}

func (p *ports) must(n int) []string {
	out := make([]string, n)
	for i := range out {
		a, err := p.next()
		if err != nil {
			panic(err)
		}
		out[i] = a
	}
	return out
}

func (h *harness) startBackends(n int) error {
	var pp ports
	addrs := pp.must(2 * n)
	pp.release()
	for i := 0; i < n; i++ {
		name := "backend-" + strconv.Itoa(i)
		p, err := h.procs.start(h.tmp, name, startOpts{cpu: -1}, h.bin("backend"),
			"-http", addrs[2*i], "-grpc", addrs[2*i+1], "-name", name)
		if err != nil {
			return err
		}
		h.backends = append(h.backends, &backend{proc: p, http: addrs[2*i], grpc: addrs[2*i+1],
			countURL: "http://" + addrs[2*i] + "/count"})
	}
	for _, b := range h.backends {
		if err := waitFor(10*time.Second, func() error { _, err := h.counts(b); return err }); err != nil {
			return fmt.Errorf("%s not ready: %w\n%s", b.proc.name, err, b.proc.logTail())
		}
	}
	return nil
}

func (h *harness) backendAddrs(kind string) []string {
	out := make([]string, len(h.backends))
	for i, b := range h.backends {
		if kind == lnGRPC {
			out[i] = b.grpc
		} else {
			out[i] = b.http
		}
	}
	return out
}

func (h *harness) directPeer() *peer {
	return &peer{name: "direct", targets: map[string][]string{
		lnH1: h.backendAddrs(lnH1), lnH2: h.backendAddrs(lnH2), lnGRPC: h.backendAddrs(lnGRPC),
	}, notes: []string{"the load generator spreads its connections (h2c, gRPC: one connection per backend) over the 3 backends"}}
}

// directOnePeer reaches the first backend only: for h2c and gRPC, the same
// single connection a proxied run opens, with no proxy behind it.
func (h *harness) directOnePeer() *peer {
	first := func(kind string) []string { return h.backendAddrs(kind)[:1] }
	return &peer{name: "direct-1", targets: map[string][]string{
		lnH1: first(lnH1), lnH2: first(lnH2), lnGRPC: first(lnGRPC),
	}, notes: []string{"the load generator talks to the first backend alone (h2c, gRPC: over one connection, as through a proxy)"}}
}

// isDirect reports whether a peer is the load generator talking to the
// backends itself, with no proxy to measure.
func isDirect(name string) bool { return name == "direct" || name == "direct-1" }

// proxyPorts reserves the three listeners of a proxy.
func proxyPorts() (map[string][]string, []string) {
	var pp ports
	a := pp.must(4)
	pp.release()
	return map[string][]string{lnH1: {a[0]}, lnH2: {a[1]}, lnGRPC: {a[2]}}, a[3:]
}

// sidecarConfig is the sidecar's YAML: static discovery (or Consul), one
// upstream listener per kind.
func (h *harness) sidecarConfig(t map[string][]string, admin, consulAddr string) string {
	var b strings.Builder
	fmt.Fprintf(&b, "admin:\n  listen: %s\nlog:\n  level: warn\n", admin)
	if consulAddr == "" {
		b.WriteString("discovery:\n  backend: static\n  static:\n")
		fmt.Fprintf(&b, "    bench-http: [%s]\n", quoteList(h.backendAddrs(lnH1)))
		fmt.Fprintf(&b, "    bench-grpc: [%s]\n", quoteList(h.backendAddrs(lnGRPC)))
	} else {
		fmt.Fprintf(&b, "consul:\n  address: %s\ndiscovery:\n  backend: consul\n", consulAddr)
	}
	fmt.Fprintf(&b, `proxy:
  balancer: round_robin
upstreams:
  - name: bench-http
    listen: %s
    protocol: http
  - name: bench-http
    listen: %s
    protocol: http2
  - name: bench-grpc
    listen: %s
    protocol: grpc
    codec: {transcode: true}  # for the codec scenarios (codec.go); native calls pay one Content-Type match
`, t[lnH1][0], t[lnH2][0], t[lnGRPC][0])
	return b.String()
}

func quoteList(s []string) string {
	q := make([]string, len(s))
	for i, v := range s {
		q[i] = strconv.Quote(v)
	}
	return strings.Join(q, ", ")
}

// startSidecar starts the sidecar binary bin of the temp dir as peer name.
func (h *harness) startSidecar(name, bin, consulAddr string) (*peer, error) {
	t, extra := proxyPorts()
	cfgPath := filepath.Join(h.tmp, name+".yaml")
	if err := os.WriteFile(cfgPath, []byte(h.sidecarConfig(t, extra[0], consulAddr)), 0o644); err != nil {
		return nil, err
	}
	if out, err := runCmd(h.ctx, h.bin(bin), "validate", "-config", cfgPath); err != nil {
		return nil, fmt.Errorf("sidecar config: %v\n%s", err, out)
	}
	o := startOpts{cpu: h.proxyCPU}
	notes := []string{"round_robin; default resilience (breakers, outlier ejection, retry budget); log level warn"}
	if h.profileAddr != "" && name == "sidecar" {
		o.env = append(o.env, "SIDECAR_BENCH_PPROF="+h.profileAddr)
	}
	if consulAddr == "" {
		notes = append(notes, "discovery.backend: static")
	} else {
		notes = append(notes, "discovery.backend: consul (a dev agent on loopback, the backends registered without checks)")
	}
	if name == "sidecar-base" {
		notes = append([]string{"the sidecar built at " + h.baseSource + " (-base), set up as sidecar"}, notes...)
	}
	p, err := h.procs.start(h.tmp, name, o, h.bin(bin), "-config", cfgPath)
	if err != nil {
		return nil, err
	}
	return h.readyPeer(&peer{name: name, proc: p, targets: t, notes: notes})
}

func (h *harness) haproxyConfig(t map[string][]string) string {
	var b strings.Builder
	fmt.Fprintf(&b, `global
  nbthread 1
  maxconn 4096

defaults
  mode http
  balance roundrobin
  option http-keep-alive
  http-reuse always
  timeout connect 1s
  timeout client 60s
  timeout server 60s
  timeout tunnel 1h
  timeout http-keep-alive 60s

frontend fe_h1
  bind %s
  default_backend be_h1

frontend fe_h2
  bind %s proto h2
  default_backend be_h2

frontend fe_grpc
  bind %s proto h2
  default_backend be_grpc
`, t[lnH1][0], t[lnH2][0], t[lnGRPC][0])
	for _, be := range []struct{ name, kind, proto string }{
		{"be_h1", lnH1, ""}, {"be_h2", lnH2, " proto h2"}, {"be_grpc", lnGRPC, " proto h2"},
	} {
		fmt.Fprintf(&b, "\nbackend %s\n", be.name)
		for i, a := range h.backendAddrs(be.kind) {
			fmt.Fprintf(&b, "  server b%d %s%s\n", i, a, be.proto)
		}
	}
	return b.String()
}

func (h *harness) startHAProxy() (*peer, error) {
	t, _ := proxyPorts()
	cfgPath := filepath.Join(h.tmp, "haproxy.cfg")
	if err := os.WriteFile(cfgPath, []byte(h.haproxyConfig(t)), 0o644); err != nil {
		return nil, err
	}
	if out, err := runCmd(h.ctx, "haproxy", "-c", "-f", cfgPath); err != nil {
		return nil, fmt.Errorf("haproxy config: %v\n%s", err, out)
	}
	p, err := h.procs.start(h.tmp, "haproxy", startOpts{cpu: h.proxyCPU}, "haproxy", "-f", cfgPath, "-db")
	if err != nil {
		return nil, err
	}
	return h.readyPeer(&peer{name: "haproxy", proc: p, targets: t, notes: []string{
		"nbthread 1; balance roundrobin; option http-keep-alive; http-reuse always; h2c: bind … proto h2 and server … proto h2",
	}})
}

func (h *harness) nginxConfig(t map[string][]string) string {
	var b strings.Builder
	user := ""
	if os.Geteuid() == 0 {
		user = "user root;\n" // the temp dir is root's
	}
	fmt.Fprintf(&b, `%sworker_processes 1;
pid %[2]s/nginx.pid;
error_log %[2]s/nginx-error.log warn;
events { worker_connections 20000; }
http {
  access_log off;
  keepalive_timeout 300s;
  keepalive_requests 10000000;
  http2_max_concurrent_streams 1000;
  client_max_body_size 0; # gRPC streams are one long body
  client_body_temp_path %[2]s/client_body;
  proxy_temp_path %[2]s/proxy;
  fastcgi_temp_path %[2]s/fastcgi;
  uwsgi_temp_path %[2]s/uwsgi;
  scgi_temp_path %[2]s/scgi;
`, user, h.tmp)
	for _, up := range []struct{ name, kind string }{{"be_http", lnH1}, {"be_grpc", lnGRPC}} {
		fmt.Fprintf(&b, "  upstream %s {\n", up.name)
		for _, a := range h.backendAddrs(up.kind) {
			fmt.Fprintf(&b, "    server %s;\n", a)
		}
		b.WriteString("    keepalive 64;\n    keepalive_requests 10000000;\n  }\n")
	}
	proxyPass := `proxy_pass http://be_http; proxy_http_version 1.1; proxy_set_header Connection "";`
	fmt.Fprintf(&b, `  server {
    listen %s;
    location / { %s }
    location /ws {
      proxy_pass http://be_http; proxy_http_version 1.1;
      proxy_set_header Upgrade $http_upgrade; proxy_set_header Connection "upgrade";
      proxy_read_timeout 1h;
    }
  }
  server {
    listen %s http2;
    location / { %s }
  }
  server {
    listen %s http2;
    location / { grpc_pass grpc://be_grpc; }
  }
}
`, t[lnH1][0], proxyPass, t[lnH2][0], proxyPass, t[lnGRPC][0])
	return b.String()
}

func (h *harness) startNginx() (*peer, error) {
	t, _ := proxyPorts()
	cfgPath := filepath.Join(h.tmp, "nginx.conf")
	if err := os.WriteFile(cfgPath, []byte(h.nginxConfig(t)), 0o644); err != nil {
		return nil, err
	}
	errLog := filepath.Join(h.tmp, "nginx-error.log")
	args := []string{"nginx", "-p", h.tmp, "-e", errLog, "-c", cfgPath}
	if out, err := runCmd(h.ctx, append(args, "-t")...); err != nil {
		return nil, fmt.Errorf("nginx config: %v\n%s", err, out)
	}
	p, err := h.procs.start(h.tmp, "nginx", startOpts{cpu: h.proxyCPU}, append(args, "-g", "daemon off;")...)
	if err != nil {
		return nil, err
	}
	p.children = childrenOf
	return h.readyPeer(&peer{name: "nginx", proc: p, targets: t, notes: []string{
		"worker_processes 1 (CPU and RSS are master + worker); upstream keepalive 64, proxy_http_version 1.1, " +
			`proxy_set_header Connection ""; h2c: listen … http2, to the backends over HTTP/1.1 (proxy_pass has no h2); gRPC: grpc_pass`,
	}})
}

// readyPeer waits until the peer answers a GET on its HTTP/1.1 listener and
// accepts connections on the others, then records its idle RSS.
func (h *harness) readyPeer(p *peer) (*peer, error) {
	client := &http.Client{Timeout: time.Second}
	scheme := "http://"
	if p.tls {
		scheme = "https://"
		client.Transport = &http.Transport{TLSClientConfig: &tls.Config{InsecureSkipVerify: true}} //nolint:gosec // loopback peer
	}
	err := waitFor(15*time.Second, func() error {
		if !p.proc.alive() {
			return fmt.Errorf("%s exited", p.name)
		}
		for _, kind := range []string{lnH2, lnGRPC, lnH1} {
			c, err := net.DialTimeout("tcp", p.targets[kind][0], time.Second)
			if err != nil {
				return err
			}
			c.Close()
		}
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("%s not ready: %w\n%s", p.name, err, p.proc.logTail())
	}
	// Idle: listening, nothing proxied yet.
	time.Sleep(300 * time.Millisecond)
	p.idleRSSKB = statusKB(p.proc.pids(), "VmRSS")
	err = waitFor(15*time.Second, func() error {
		resp, err := client.Get(scheme + p.targets[lnH1][0] + "/get")
		if err != nil {
			return err
		}
		_, _ = io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		if resp.StatusCode != http.StatusOK {
			return fmt.Errorf("GET /get: %s", resp.Status)
		}
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("%s does not proxy: %w\n%s", p.name, err, p.proc.logTail())
	}
	client.CloseIdleConnections()
	return p, nil
}

// counts reads a backend's counters.
func (h *harness) counts(b *backend) (map[string]int64, error) {
	resp, err := h.http.Get(b.countURL)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	var c map[string]int64
	if err := json.NewDecoder(resp.Body).Decode(&c); err != nil {
		return nil, err
	}
	return c, nil
}

// allCounts reads the counter named key of every backend; a backend that
// does not answer counts -1.
func (h *harness) allCounts(key string) []int64 {
	out := make([]int64, len(h.backends))
	for i, b := range h.backends {
		c, err := h.counts(b)
		if err != nil {
			out[i] = -1
			continue
		}
		out[i] = c[key]
	}
	return out
}

func waitFor(within time.Duration, f func() error) error {
	deadline := time.Now().Add(within)
	for {
		err := f()
		if err == nil {
			return nil
		}
		if time.Now().After(deadline) {
			return err
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// runCmd runs a short command and returns its combined output.
func runCmd(ctx context.Context, argv ...string) (string, error) {
	ctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
	defer cancel()
	var out bytes.Buffer
	cmd := execCommand(ctx, argv...)
	cmd.Stdout, cmd.Stderr = &out, &out
	err := cmd.Run()
	return out.String(), err
}
