package proxy

import (
	"context"
	"crypto/tls"
	"errors"
	"net"
	"net/http"
	"net/http/httptest"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/sidecarlb/sidecar/discovery"
)

// TestMeshHandshakeRefusedIsDialError: a peer that the mesh config refuses
// (another service's certificate) fails the dial, so the try loop sends
// the request to another node; a peer it accepts gives a TLS connection.
func TestMeshHandshakeRefusedIsDialError(t *testing.T) {
	srv := httptest.NewTLSServer(http.HandlerFunc(func(http.ResponseWriter, *http.Request) {}))
	defer srv.Close()
	addr := srv.Listener.Addr().String()
	errWrong := errors.New("peer is another service")
	tests := []struct {
		name    string
		verify  func(tls.ConnectionState) error
		wantErr error
	}{
		{name: "accepted", verify: func(tls.ConnectionState) error { return nil }},
		{name: "wrong service", verify: func(tls.ConnectionState) error { return errWrong }, wantErr: errWrong},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			conf := &tls.Config{InsecureSkipVerify: true, VerifyConnection: tc.verify} //nolint:gosec // verified by VerifyConnection
			raw, err := net.Dial("tcp", addr)
			if err != nil {
				t.Fatal(err)
			}
			c, err := meshHandshake(context.Background(), raw, conf, addr, time.Second)
			if tc.wantErr == nil {
				if err != nil {
					t.Fatalf("meshHandshake() error = %v", err)
				}
				if _, ok := c.(*tls.Conn); !ok {
					t.Errorf("meshHandshake() = %T, want a *tls.Conn", c)
				}
				c.Close()
				return
			}
			if !errors.Is(err, tc.wantErr) || !isDialError(err) {
				t.Errorf("meshHandshake() error = %v; want %v, as a dial error", err, tc.wantErr)
			}
			if _, werr := raw.Write([]byte("x")); werr == nil {
				t.Error("the connection of a refused handshake is still open")
			}
		})
	}
}

// fakeMeshTLS records what ClientTLS was asked for.
type fakeMeshTLS struct{ asked []string }

func (f *fakeMeshTLS) ClientTLS(service string, nextProtos ...string) *tls.Config {
	f.asked = append(f.asked, service+" "+strings.Join(nextProtos, ","))
	return &tls.Config{ServerName: service, NextProtos: nextProtos} //nolint:gosec // never dialled here
}

// TestMeshPerNode: with a mesh set, a node whose meta says mTLS gets the
// route's mesh pool config (ALPN one protocol per engine), the others
// plaintext; a node whose meta changes either way is a new endpoint, and
// one whose meta stays keeps its pools.
func TestMeshPerNode(t *testing.T) {
	f := &fakeMeshTLS{}
	px := New(staticCache(t, map[string][]string{}), nil, testLogger(t))
	px.SetMesh(Mesh{Identity: f, Node: func(meta map[string]string) bool { return meta["sidecar-mtls"] == "strict" }})
	rt, err := newRoute(px, "l", RouteConfig{Service: "billing", Protocol: "grpc"})
	if err != nil {
		t.Fatal(err)
	}
	if want := []string{"billing http/1.1", "billing h2"}; !slices.Equal(f.asked, want) {
		t.Errorf("ClientTLS asked for %q, want %q (once per route)", f.asked, want)
	}
	strict := map[string]string{"sidecar-mtls": "strict"}
	snap := func(aMeta map[string]string) *discovery.Snapshot {
		return &discovery.Snapshot{Service: "billing", Updated: time.Now(), Endpoints: []discovery.Endpoint{
			discovery.NewEndpoint("a", "127.0.0.1", 1, nil, aMeta, 1),
			discovery.NewEndpoint("b", "127.0.0.1", 2, nil, nil, 1),
		}}
	}
	rebuild := func(s *discovery.Snapshot) *routeState {
		rt.mu.Lock()
		defer rt.mu.Unlock()
		return rt.rebuildLocked(s)
	}
	st1 := rebuild(snap(strict))
	a1, b1 := st1.endpoints["a"], st1.endpoints["b"]
	if !a1.poolConfig.mesh() || b1.poolConfig.mesh() {
		t.Fatalf("mesh: a %t, b %t; want a (meta strict) only", a1.poolConfig.mesh(), b1.poolConfig.mesh())
	}
	if p := a1.pools.Load(); p.h2c != nil || p.h2 == nil || p.fast == nil || p.fast.Handshake == nil {
		t.Errorf("a's pools: h2c %v, h2 %v, fast handshake set %t; want h2 over the Transport and the h1 pool under mTLS",
			p.h2c != nil, p.h2 != nil, p.fast != nil && p.fast.Handshake != nil)
	}
	st2 := rebuild(snap(strict))
	if st2.endpoints["a"] != a1 || st2.endpoints["b"] != b1 {
		t.Error("an unchanged snapshot built new endpoints, want the pools kept")
	}
	st3 := rebuild(snap(nil))
	if a3 := st3.endpoints["a"]; a3 == a1 || a3.poolConfig.mesh() {
		t.Errorf("a after its meta dropped mTLS: same endpoint %t, mesh %t; want a new plaintext one", a3 == a1, a3.poolConfig.mesh())
	}
	if st3.endpoints["b"] != b1 {
		t.Error("b was rebuilt though its meta did not change")
	}
}
