package proxy

import (
	"io"
	"net/http"
	"testing"

	"github.com/sidecarlb/sidecar/internal/h2/h2test"
)

// benchGet runs parallel keep-alive GETs of url and checks each answers 200.
func benchGet(b *testing.B, url string) {
	benchGetWith(b, newClient(b, func(tr *http.Transport) { tr.MaxIdleConnsPerHost = 1024 }), url)
}

// benchGetWith runs parallel GETs of url with client and checks each
// answers 200.
func benchGetWith(b *testing.B, client *http.Client, url string) {
	b.ReportAllocs()
	b.ResetTimer()
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			resp, err := client.Get(url)
			if err != nil {
				b.Error(err)
				return
			}
			_, _ = io.Copy(io.Discard, resp.Body)
			resp.Body.Close()
			if resp.StatusCode != http.StatusOK {
				b.Errorf("status = %d, want 200", resp.StatusCode)
				return
			}
		}
	})
}

// benchNode answers every request with a short fixed body.
func benchNode(b *testing.B) *testServer {
	body := []byte("hello from the node\n")
	return startServer(b, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header()["Content-Type"] = []string{"text/plain"}
		_, _ = w.Write(body)
	}))
}

// BenchmarkProxyHTTP measures a request through an upstream listener to one
// node, every hop on loopback with keep-alive: client, proxy and node all run
// in this process, so allocs/op counts all three.
func BenchmarkProxyHTTP(b *testing.B) {
	node := benchNode(b)
	px := startUpstream(b, staticCache(b, map[string][]string{"echo": {node.Listener.Addr().String()}}),
		RouteConfig{Service: "echo"})
	benchGet(b, px.URL+"/bench")
}

// BenchmarkDirect is BenchmarkProxyHTTP without the proxy, for comparison.
func BenchmarkDirect(b *testing.B) {
	node := benchNode(b)
	benchGet(b, node.URL+"/bench")
}

// BenchmarkProxyH2 is BenchmarkProxyHTTP over h2c with prior knowledge at
// both hops: the client's streams share one connection to the sidecar's
// HTTP/2 server, and the sidecar's HTTP/2 client pool carries them to an
// h2c node (net/http's server).
func BenchmarkProxyH2(b *testing.B) {
	body := []byte("hello from the node\n")
	node := h2test.StartH2C(b, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header()["Content-Type"] = []string{"text/plain"}
		_, _ = w.Write(body)
	}), nil)
	sc := startH2Sidecar(b, staticCache(b, map[string][]string{"echo": {node.Addr}}),
		RouteConfig{Service: "echo", Protocol: "http2"}, ServerOptions{})
	benchGetWith(b, h2test.NewClient(b, nil), sc.URL+"/bench")
}
