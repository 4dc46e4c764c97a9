package main

import (
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/hashicorp/consul/api"
)

// The mTLS comparison (issue 24), in one run against one Consul dev agent:
//
//   - sidecar-mtls: the sidecar as a caller-only mesh sidecar
//     (security.mtls strict, no inbound): the load generator speaks
//     plaintext to it, as an app to its sidecar, and it dials the backends
//     over mTLS with its leaf from Consul's CA.
//   - haproxy-tls: HAProxy doing TLS on both sides: the load generator
//     speaks TLS to it (loadgen -tls), and it dials the backends over TLS
//     with a client certificate (a Consul leaf of its own).
//
// Both reach the backends through the same mesh nodes: one sidecar per
// backend with service.inbound in strict mode (unpinned, not measured),
// registered as bench-mesh. Compare sidecar-mtls with sidecar-consul (the
// same sidecar, plaintext to the backends) and with haproxy-tls. Only the
// HTTP/1.1 and h2 listeners go over mTLS; gRPC stays plaintext.

const meshService = "bench-mesh"

// consulAgent starts the dev agent once and returns its address.
func (h *harness) consulAgent() (string, error) {
	if h.consulAddr != "" {
		return h.consulAddr, nil
	}
	addr, err := h.startConsul()
	if err != nil {
		return "", err
	}
	h.consulAddr = addr
	return addr, nil
}

// startMeshNodes starts the mesh nodes once: a sidecar with a strict
// inbound listener in front of each backend's HTTP port. It returns their
// inbound addresses once all are passing in Consul.
func (h *harness) startMeshNodes() ([]string, error) {
	if h.meshNodes != nil {
		return h.meshNodes, nil
	}
	consulAddr, err := h.consulAgent()
	if err != nil {
		return nil, err
	}
	var pp ports
	a := pp.must(2 * len(h.backends))
	pp.release()
	var inbounds []string
	for i, b := range h.backends {
		_, port, _ := net.SplitHostPort(b.http)
		name := fmt.Sprintf("mesh-node-%d", i)
		cfg := fmt.Sprintf(`service:
  name: %s
  id: %s-%d
  address: 127.0.0.1
  port: %s
  ttl: 5s
  inbound:
    listen: %s
security:
  mtls: strict
consul:
  address: %s
admin:
  listen: %s
log:
  level: warn
`, meshService, meshService, i, port, a[2*i], consulAddr, a[2*i+1])
		path := filepath.Join(h.tmp, name+".yaml")
		if err := os.WriteFile(path, []byte(cfg), 0o644); err != nil {
			return nil, err
		}
		if _, err := h.procs.start(h.tmp, name, startOpts{cpu: -1}, h.bin("sidecar"), "-config", path); err != nil {
			return nil, err
		}
		inbounds = append(inbounds, a[2*i])
	}
	client, err := consulClient(consulAddr)
	if err != nil {
		return nil, err
	}
	err = waitFor(60*time.Second, func() error {
		es, _, err := client.Health().Service(meshService, "", true, nil)
		if err != nil {
			return err
		}
		if len(es) != len(h.backends) {
			return fmt.Errorf("%s: %d of %d mesh nodes passing", meshService, len(es), len(h.backends))
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	h.meshNodes = inbounds
	return inbounds, nil
}

func consulClient(addr string) (*api.Client, error) {
	cc := api.DefaultConfig()
	cc.Address = addr
	return api.NewClient(cc)
}

// startSidecarMTLS starts the caller-only mesh sidecar.
func (h *harness) startSidecarMTLS() (*peer, error) {
	if _, err := h.startMeshNodes(); err != nil {
		return nil, err
	}
	t, extra := proxyPorts()
	var pp ports
	svcPort := pp.must(1)[0]
	pp.release()
	_, sp, _ := net.SplitHostPort(svcPort)
	cfg := fmt.Sprintf(`admin:
  listen: %s
log:
  level: warn
consul:
  address: %s
discovery:
  backend: consul
service:
  name: bench-client
  address: 127.0.0.1
  port: %s
  ttl: 5s
security:
  mtls: strict
proxy:
  balancer: round_robin
upstreams:
  - name: %s
    listen: %s
    protocol: http
  - name: %s
    listen: %s
    protocol: http2
  - name: bench-grpc
    listen: %s
    protocol: grpc
`, extra[0], h.consulAddr, sp, meshService, t[lnH1][0], meshService, t[lnH2][0], t[lnGRPC][0])
	path := filepath.Join(h.tmp, "sidecar-mtls.yaml")
	if err := os.WriteFile(path, []byte(cfg), 0o644); err != nil {
		return nil, err
	}
	if out, err := runCmd(h.ctx, h.bin("sidecar"), "validate", "-config", path); err != nil {
		return nil, fmt.Errorf("sidecar config: %v\n%s", err, out)
	}
	p, err := h.procs.start(h.tmp, "sidecar-mtls", startOpts{cpu: h.proxyCPU}, h.bin("sidecar"), "-config", path)
	if err != nil {
		return nil, err
	}
	return h.readyPeer(&peer{name: "sidecar-mtls", proc: p, targets: t, notes: []string{
		"caller-only mesh sidecar (security.mtls strict, no inbound); plaintext from the load generator, mTLS (ECDSA P-256 leaf from Consul's CA) " +
			"to one strict inbound sidecar per backend (bench-mesh, unpinned, not measured); gRPC plaintext",
	}})
}

// startHAProxyTLS starts HAProxy terminating TLS from the load generator
// and dialling the same mesh nodes with TLS and a Consul leaf of its own.
func (h *harness) startHAProxyTLS() (*peer, error) {
	nodes, err := h.startMeshNodes()
	if err != nil {
		return nil, err
	}
	client, err := consulClient(h.consulAddr)
	if err != nil {
		return nil, err
	}
	// A leaf for a service named bench-haproxy: its client certificate to
	// the mesh nodes, and its server certificate to the load generator.
	leaf, _, err := client.Agent().ConnectCALeaf("bench-haproxy", nil)
	if err != nil {
		return nil, fmt.Errorf("leaf for haproxy: %w", err)
	}
	pem := filepath.Join(h.tmp, "haproxy-leaf.pem")
	if err := os.WriteFile(pem, []byte(leaf.CertPEM+"\n"+leaf.PrivateKeyPEM), 0o600); err != nil {
		return nil, err
	}
	t, _ := proxyPorts()
	var b strings.Builder
	fmt.Fprintf(&b, `global
  nbthread 1
  maxconn 4096
  ssl-server-verify none

defaults
  mode http
  balance roundrobin
  option http-keep-alive
  http-reuse always
  timeout connect 1s
  timeout client 60s
  timeout server 60s
  timeout http-keep-alive 60s

frontend fe_h1
  bind %s ssl crt %s alpn http/1.1
  default_backend be_h1

frontend fe_h2
  bind %s proto h2
  default_backend be_h2

frontend fe_grpc
  bind %s proto h2
  default_backend be_grpc
`, t[lnH1][0], pem, t[lnH2][0], t[lnGRPC][0])
	b.WriteString("\nbackend be_h1\n")
	for i, a := range nodes {
		fmt.Fprintf(&b, "  server m%d %s ssl crt %s alpn http/1.1\n", i, a, pem)
	}
	b.WriteString("\nbackend be_h2\n")
	for i, a := range nodes {
		fmt.Fprintf(&b, "  server m%d %s ssl crt %s alpn h2\n", i, a, pem)
	}
	b.WriteString("\nbackend be_grpc\n")
	for i, a := range h.backendAddrs(lnGRPC) {
		fmt.Fprintf(&b, "  server b%d %s proto h2\n", i, a)
	}
	cfgPath := filepath.Join(h.tmp, "haproxy-tls.cfg")
	if err := os.WriteFile(cfgPath, []byte(b.String()), 0o644); err != nil {
		return nil, err
	}
	if out, err := runCmd(h.ctx, "haproxy", "-c", "-f", cfgPath); err != nil {
		return nil, fmt.Errorf("haproxy config: %v\n%s", err, out)
	}
	p, err := h.procs.start(h.tmp, "haproxy-tls", startOpts{cpu: h.proxyCPU}, "haproxy", "-f", cfgPath, "-db")
	if err != nil {
		return nil, err
	}
	return h.readyPeer(&peer{name: "haproxy-tls", proc: p, targets: t, tls: true, loadArgs: []string{"-tls"}, notes: []string{
		"nbthread 1; TLS from the load generator (bind … ssl, ECDSA P-256 Consul leaf), TLS with a client certificate to the same " +
			"strict mesh nodes (server … ssl crt, verify none); h2 and gRPC frontends plaintext; only h1 listener scenarios compare",
	}})
}
