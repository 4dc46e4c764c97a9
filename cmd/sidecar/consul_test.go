package main

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/sidecarlb/sidecar/config"
)

// consulRequest is what a fake agent saw of one request.
type consulRequest struct {
	method, path, ns, partition, token string
}

// fakeConsul records every request and answers the few the sidecar makes:
// registration, TTL updates and deregistration with 200, a health query
// with an empty list (index 5), and the next blocking query by waiting.
type fakeConsul struct {
	mu   sync.Mutex
	seen []consulRequest
}

func (f *fakeConsul) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	q := r.URL.Query()
	f.mu.Lock()
	f.seen = append(f.seen, consulRequest{r.Method, r.URL.Path, q.Get("ns"), q.Get("partition"), r.Header.Get("X-Consul-Token")})
	f.mu.Unlock()
	if r.Method == http.MethodGet {
		if idx := q.Get("index"); idx != "" && idx != "0" {
			<-r.Context().Done()
			return
		}
		w.Header().Set("X-Consul-Index", "5")
		w.Header().Set("Content-Type", "application/json")
		_, _ = io.WriteString(w, "[]")
	}
}

func (f *fakeConsul) requests() []consulRequest {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]consulRequest(nil), f.seen...)
}

// saw reports whether a request's path starts with each prefix.
func (f *fakeConsul) saw(prefixes ...string) bool {
	reqs := f.requests()
next:
	for _, p := range prefixes {
		for _, r := range reqs {
			if strings.HasPrefix(r.path, p) {
				continue next
			}
		}
		return false
	}
	return true
}

func freeAddr(t *testing.T) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().String()
}

// TestConsulNamespacePartitionToken: consul.namespace and consul.partition
// (Consul Enterprise) reach every request the running sidecar makes, as
// consul/api's ns and partition query parameters, and so does the token
// read from consul.token_file, over registration, TTL updates, discovery and
// deregistration.
func TestConsulNamespacePartitionToken(t *testing.T) {
	fake := &fakeConsul{}
	srv := httptest.NewServer(fake)
	defer srv.Close()
	app, err := net.Listen("tcp", "127.0.0.1:0") // the app the TCP probe finds
	if err != nil {
		t.Fatal(err)
	}
	defer app.Close()
	tokenFile := filepath.Join(t.TempDir(), "token")
	if err := os.WriteFile(tokenFile, []byte("s3cret-token\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	yaml := fmt.Sprintf(`service:
  name: web
  port: %d
  check: {interval: 100ms}
  ttl: 1s
  drain: 0s
consul:
  address: %s
  token_file: %s
  namespace: team-a
  partition: part-1
admin:
  listen: %s
upstreams:
  - name: peer
    listen: %s
`, app.Addr().(*net.TCPAddr).Port, srv.URL, tokenFile, freeAddr(t), freeAddr(t))
	cfg, err := config.ParseEnv([]byte(yaml), "config.yaml", nil)
	if err != nil {
		t.Fatal(err)
	}

	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- serve(ctx, cfg, func() (*config.Config, error) { return cfg, nil }, io.Discard) }()
	deadline := time.Now().Add(10 * time.Second)
	for !fake.saw("/v1/agent/service/register", "/v1/agent/check/update/", "/v1/health/service/peer") {
		if time.Now().After(deadline) {
			cancel()
			t.Fatalf("within 10s the sidecar did not register, update its check and query peer; saw %+v", fake.requests())
		}
		time.Sleep(10 * time.Millisecond)
	}
	cancel()
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("serve() = %v", err)
		}
	case <-time.After(20 * time.Second):
		t.Fatal("serve() did not return 20s after its context ended")
	}
	if !fake.saw("/v1/agent/service/deregister/") {
		t.Errorf("no deregistration on shutdown; saw %+v", fake.requests())
	}
	for _, r := range fake.requests() {
		if r.ns != "team-a" || r.partition != "part-1" || r.token != "s3cret-token" {
			t.Errorf("%s %s: ns=%q partition=%q token=%q, want team-a, part-1, s3cret-token", r.method, r.path, r.ns, r.partition, r.token)
		}
	}
}
