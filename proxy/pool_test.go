package proxy

import (
	"encoding/pem"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/sidecarlb/sidecar/config"
	"github.com/sidecarlb/sidecar/discovery"
)

// tlsNode starts a TLS node answering with the protocol it was reached by,
// and writes its certificate to a PEM file to trust it by.
func tlsNode(t *testing.T, h2 bool) (*httptest.Server, string) {
	t.Helper()
	node := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Write([]byte(r.Proto))
	}))
	node.EnableHTTP2 = h2
	return startTLSNode(t, node)
}

// tlsNodeWith starts a TLS node (h2 by ALPN) serving h, and writes its
// certificate to a PEM file to trust it by.
func tlsNodeWith(t *testing.T, h http.Handler) (*httptest.Server, string) {
	t.Helper()
	node := httptest.NewUnstartedServer(h)
	node.EnableHTTP2 = true
	return startTLSNode(t, node)
}

func startTLSNode(t *testing.T, node *httptest.Server) (*httptest.Server, string) {
	t.Helper()
	node.StartTLS()
	t.Cleanup(node.Close)
	ca := filepath.Join(t.TempDir(), "ca.pem")
	block := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: node.Certificate().Raw})
	if err := os.WriteFile(ca, block, 0o600); err != nil {
		t.Fatal(err)
	}
	return node, ca
}

func TestUpstreamTLS(t *testing.T) {
	tests := []struct {
		name       string
		h2         bool
		protocol   string
		tls        func(ca string) *config.TLS
		wantStatus int
		wantProto  string
	}{
		{"http over TLS", false, "http", func(ca string) *config.TLS { return &config.TLS{CAFile: ca, ServerName: "example.com"} }, 200, "HTTP/1.1"},
		{"http2 by ALPN", true, "http2", func(ca string) *config.TLS { return &config.TLS{CAFile: ca, ServerName: "example.com"} }, 200, "HTTP/2.0"},
		{"unknown CA refused", false, "http", func(string) *config.TLS { return &config.TLS{ServerName: "example.com"} }, 502, ""},
		{"wrong server name refused", false, "http", func(ca string) *config.TLS { return &config.TLS{CAFile: ca, ServerName: "other.test"} }, 502, ""},
		{"insecure skip verify", false, "http", func(string) *config.TLS { return &config.TLS{InsecureSkipVerify: true} }, 200, "HTTP/1.1"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			node, ca := tlsNode(t, tc.h2)
			addr := strings.TrimPrefix(node.URL, "https://")
			px := startUpstream(t, staticCache(t, map[string][]string{"echo": {addr}}),
				RouteConfig{Service: "echo", Protocol: tc.protocol, TLS: tc.tls(ca)})
			got := doGet(t, newClient(t, nil), px.URL+"/", nil)
			if got.status != tc.wantStatus {
				t.Fatalf("GET status = %d (%q), want %d", got.status, got.body, tc.wantStatus)
			}
			if tc.wantProto != "" && got.body != tc.wantProto {
				t.Errorf("node reached by %q, want %q", got.body, tc.wantProto)
			}
		})
	}
}

func TestUpstreamTLSBadCAFile(t *testing.T) {
	bad := filepath.Join(t.TempDir(), "bad.pem")
	if err := os.WriteFile(bad, []byte("not a certificate"), 0o600); err != nil {
		t.Fatal(err)
	}
	_, err := New(staticCache(t, map[string][]string{"echo": {"127.0.0.1:1"}}), nil, testLogger(t)).
		Upstream("u", RouteConfig{Service: "echo", TLS: &config.TLS{CAFile: bad}})
	if err == nil || !strings.Contains(err.Error(), "no PEM certificates") {
		t.Fatalf("Upstream() error = %v, want it to say the CA file holds no certificates", err)
	}
}

func TestPoolsRenewAtMaxAge(t *testing.T) {
	const age = time.Minute
	pc := &poolConfig{timeouts: Timeouts{MaxConnectionAge: age}.withDefaults()}
	start := time.Unix(1000, 0)
	e := &endpoint{Endpoint: discovery.NewEndpoint("a", "127.0.0.1", 1, nil, nil, 1), poolConfig: pc}
	e.pools.Store(newPools(pc, nil, start))

	first := e.currentPools(start)
	if got := e.currentPools(start.Add(age * 8 / 10)); got != first {
		t.Errorf("pools at 80%% of max age renewed, want the same pools")
	}
	renewed := e.currentPools(start.Add(age * 12 / 10))
	if renewed == first || renewed.h2c == first.h2c || renewed.h1 == first.h1 || renewed.fast == first.fast {
		t.Fatalf("pools past max age + jitter = %p, want new pools of every kind", renewed)
	}
	if got := e.currentPools(start.Add(age * 12 / 10)); got != renewed {
		t.Errorf("pools renewed twice at the same time, want one renewal")
	}

	never := &poolConfig{timeouts: Timeouts{}.withDefaults()}
	e2 := &endpoint{poolConfig: never}
	e2.pools.Store(newPools(never, nil, start))
	if e2.currentPools(start).h1 != e2.currentPools(start.Add(1000*time.Hour)).h1 {
		t.Errorf("pools with no max age renewed, want them kept")
	}
}

func TestPoolsJitter(t *testing.T) {
	const age = 10 * time.Minute
	pc := &poolConfig{timeouts: Timeouts{MaxConnectionAge: age}.withDefaults()}
	start := time.Unix(1000, 0)
	seen := map[int64]bool{}
	for i := 0; i < 50; i++ {
		p := newPools(pc, nil, start)
		d := time.Duration(p.expires - start.UnixNano())
		if d < age*9/10 || d > age*11/10 {
			t.Fatalf("pool expires after %v, want within ±10%% of %v", d, age)
		}
		seen[p.expires] = true
	}
	if len(seen) < 10 {
		t.Errorf("50 pools got %d distinct expiries, want jitter to spread them", len(seen))
	}
}
