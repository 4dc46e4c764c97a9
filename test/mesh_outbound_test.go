package test

// Integration test of the outbound side of the mesh: app → sidecar A
// (caller only: security.mtls strict, no inbound) → sidecar B's strict
// inbound listener → app B, both sidecars real processes, with a real
// Consul dev agent's CA.

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/coder/websocket"
	"github.com/hashicorp/consul/api"
	"google.golang.org/grpc"
	"google.golang.org/grpc/interop/grpc_testing"

	"github.com/sidecarlb/sidecar/mesh"
	"github.com/sidecarlb/sidecar/test/consulagent"
	"github.com/sidecarlb/sidecar/test/harness"
)

// meshMultiApp is an app on loopback that speaks HTTP/1.1 and h2c: gRPC
// TestService calls (ServerId name), WebSocket echo on /echo, and
// "hello from NAME over PROTO" for anything else.
func meshMultiApp(t *testing.T, name string) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	gs := grpc.NewServer()
	grpc_testing.RegisterTestServiceServer(gs, &protoGRPCNode{id: name})
	srv := &http.Server{ReadHeaderTimeout: 5 * time.Second, Protocols: new(http.Protocols)}
	srv.Protocols.SetHTTP1(true)
	srv.Protocols.SetUnencryptedHTTP2(true)
	srv.Handler = http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		switch {
		case r.ProtoMajor == 2 && strings.HasPrefix(r.Header.Get("Content-Type"), "application/grpc"):
			gs.ServeHTTP(w, r)
		case r.URL.Path == "/echo":
			c, err := websocket.Accept(w, r, nil)
			if err != nil {
				return
			}
			defer c.CloseNow()
			for {
				typ, data, err := c.Read(r.Context())
				if err != nil {
					return
				}
				if err := c.Write(r.Context(), typ, data); err != nil {
					return
				}
			}
		default:
			_, _ = io.Copy(io.Discard, r.Body)
			fmt.Fprintf(w, "hello from %s over %s", name, r.Proto)
		}
	})
	go func() { _ = srv.Serve(ln) }()
	t.Cleanup(func() { _ = srv.Close(); gs.Stop() })
	return ln.Addr().String()
}

// meshScrape returns the text of a sidecar's /metrics.
func meshScrape(t *testing.T, admin string) string {
	t.Helper()
	_, body, err := get(&http.Client{Timeout: 5 * time.Second}, "http://"+admin+"/metrics")
	if err != nil {
		t.Fatalf("GET /metrics: %v", err)
	}
	return body
}

// TestMeshOutbound: a caller-only sidecar (web) reaches billing's strict
// inbound listener over mTLS for HTTP/1.1, gRPC (h2), WebSocket and TCP; a
// plaintext client to the inbound listener is refused; a billing node that
// presents another service's certificate is refused, counted, and the
// request goes to the real node.
func TestMeshOutbound(t *testing.T) {
	t.Parallel()
	agent := consulagent.Start(t, consulagent.Options{})
	client := agent.Client()
	port := func() string { return "127.0.0.1:" + strconv.Itoa(consulagent.FreePort(t)) }

	appB := meshMultiApp(t, "billing")
	_, appPort := protoSplit(t, appB)
	inbound, adminB := port(), port()
	harness.StartSidecar(t, adminB, fmt.Sprintf(`service:
  name: billing
  id: billing-1
  address: 127.0.0.1
  port: %d
  ttl: 2s
  inbound:
    listen: %s
security:
  mtls: strict
consul:
  address: %s
admin:
  listen: %s
`, appPort, inbound, agent.Addr(), adminB))

	consulagent.WaitFor(t, 30*time.Second, "billing passing", func() bool {
		entries, _, err := client.Health().Service("billing", "", true, nil)
		return err == nil && len(entries) == 1
	})

	adminA, httpUp, grpcUp, tcpUp := port(), port(), port(), port()
	harness.StartSidecar(t, adminA, fmt.Sprintf(`service:
  name: web
  id: web-1
  address: 127.0.0.1
  port: %d
  ttl: 2s
security:
  mtls: strict
consul:
  address: %s
admin:
  listen: %s
upstreams:
  - {name: billing, listen: "%s", protocol: http}
  - {name: billing, listen: "%s", protocol: grpc}
  - {name: billing, listen: "%s", protocol: tcp}
`, consulagent.FreePort(t), agent.Addr(), adminA, httpUp, grpcUp, tcpUp))

	// HTTP/1.1, once billing is registered and web's identity is ready.
	httpc := &http.Client{Timeout: 5 * time.Second}
	want := "hello from billing over HTTP/1.1"
	consulagent.WaitFor(t, 30*time.Second, "web reaches billing over mTLS", func() bool {
		code, body, err := get(httpc, "http://"+httpUp+"/")
		return err == nil && code == http.StatusOK && body == want
	})

	// /status says which nodes are dialled over mTLS.
	if routes := strings.Join(strings.Fields(string(hbStatus(t, adminA)["upstreams"])), ""); !strings.Contains(routes, `"mtls":true`) {
		t.Errorf("A's /status upstreams = %s, want billing's node marked mtls", routes)
	}

	// gRPC: h2 by ALPN, multiplexed on the mTLS connection.
	gc := protoDialGRPC(t, grpcUp)
	for i := range 5 {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		id, err := protoUnary(ctx, gc)
		cancel()
		if err != nil || id != "billing" {
			t.Fatalf("gRPC call %d = %q, %v; want billing", i, id, err)
		}
	}

	// WebSocket: the upgrade goes over an mTLS connection, then the bytes.
	ctx := protoCtx(t, 10*time.Second)
	ws, _ := protoDialWS(t, ctx, httpUp, nil)
	for i := range 3 {
		protoWSEcho(t, ctx, ws, websocket.MessageText, []byte("ping "+strconv.Itoa(i)))
	}
	ws.Close(websocket.StatusNormalClosure, "")

	// TCP: a raw HTTP/1.1 exchange through a tcp upstream.
	conn, err := net.DialTimeout("tcp", tcpUp, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	_ = conn.SetDeadline(time.Now().Add(5 * time.Second))
	fmt.Fprint(conn, "GET /tcp HTTP/1.1\r\nHost: billing\r\nConnection: close\r\n\r\n")
	raw, err := io.ReadAll(conn)
	conn.Close()
	if err != nil || !strings.HasPrefix(string(raw), "HTTP/1.1 200") || !strings.HasSuffix(string(raw), want) {
		t.Fatalf("TCP exchange = %q, %v; want a 200 from billing", raw, err)
	}

	// Every connection B took was mTLS, and a plaintext caller is refused.
	if code, _, err := get(httpc, "http://"+inbound+"/"); err == nil {
		t.Fatalf("plaintext GET to the inbound listener = %d, want refused", code)
	}
	text := meshScrape(t, adminB)
	if n := metricValue(t, text, "sidecar_mesh_inbound_connections_total", `kind="mtls"`); n < 3 {
		t.Errorf("B's mtls connections = %v, want at least 3 (http and then websocket on one, grpc, tcp)", n)
	}
	if n := metricValue(t, text, "sidecar_mesh_inbound_connections_total", `kind="refused_plaintext"`); n < 1 {
		t.Errorf("B's refused plaintext = %v, want at least 1", n)
	}

	// A billing node presenting payments' certificate: refused, counted,
	// and every request still answered by the real billing.
	impostor := startMeshNode(t, client, "payments", mesh.ModeStrict)
	host, ip := protoSplit(t, impostor.addr)
	if err := client.Agent().ServiceRegister(&api.AgentServiceRegistration{ID: "billing-impostor", Name: "billing",
		Address: host, Port: ip, Meta: map[string]string{mesh.MetaKey: mesh.ModeStrict},
		Check: &api.AgentServiceCheck{TTL: "10m", Status: api.HealthPassing}}); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(10 * time.Second)
	for time.Now().Before(deadline) {
		for range 4 {
			// A fresh connection each time, so each request dials.
			c := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{DisableKeepAlives: true}}
			code, body, err := get(c, "http://"+httpUp+"/")
			if err != nil || code != http.StatusOK || body != want {
				t.Fatalf("GET with an impostor registered = %d %q, %v; want 200 from billing", code, body, err)
			}
		}
		if metricValue(t, meshScrape(t, adminA), "sidecar_mesh_peer_refused_total", `reason="wrong_service"`, `side="outbound"`) >= 1 {
			break
		}
	}
	if n := metricValue(t, meshScrape(t, adminA), "sidecar_mesh_peer_refused_total", `reason="wrong_service"`, `side="outbound"`); n < 1 {
		t.Errorf("A's refused wrong_service = %v, want at least 1; /status %s", n, hbStatus(t, adminA)["upstreams"])
	}
}
