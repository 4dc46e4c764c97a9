package test

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"io"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/sidecarlb/sidecar/internal/leakcheck"

	"github.com/sidecarlb/sidecar/proxy"
)

// protoHTTP starts an HTTP node on loopback that echoes a request body and
// reports the protocol it was reached with (X-Backend-Proto) and the body's
// SHA-256 as the X-Checksum trailer. With h2c it also speaks h2c with prior
// knowledge; without, HTTP/1.1 only.
func protoHTTP(tb testing.TB, h2c bool) string {
	tb.Helper()
	protocols := new(http.Protocols)
	protocols.SetHTTP1(true)
	protocols.SetUnencryptedHTTP2(h2c)
	srv := &http.Server{Protocols: protocols, Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		body, err := io.ReadAll(r.Body)
		if err != nil {
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		}
		sum := sha256.Sum256(body)
		w.Header().Set("Trailer", "X-Checksum")
		w.Header().Set("X-Backend-Proto", r.Proto)
		w.Header().Set("Content-Type", "application/octet-stream")
		w.Write(body)
		w.Header().Set("X-Checksum", hex.EncodeToString(sum[:]))
	})}
	ln := protoListen(tb)
	protoServeOn(tb, func() error { return srv.Serve(ln) }, func() { srv.Close() })
	return ln.Addr().String()
}

// protoHTTPClient returns a client speaking h2c with prior knowledge, or
// HTTP/1.1 only.
func protoHTTPClient(tb testing.TB, h2c bool) *http.Client {
	protocols := new(http.Protocols)
	if h2c {
		protocols.SetUnencryptedHTTP2(true)
	} else {
		protocols.SetHTTP1(true)
	}
	tr := &http.Transport{Protocols: protocols}
	tb.Cleanup(tr.CloseIdleConnections)
	return &http.Client{Transport: tr}
}

// TestProtocolHTTP2: a client speaking h2c with prior knowledge to the
// listener gets HTTP/2 answers, whether the route reaches nodes over h2c
// (protocol http2) or HTTP/1.1 (protocol http); bodies and trailers make it
// through.
func TestProtocolHTTP2(t *testing.T) {
	leakcheck.Check(t)
	h2Node, h1Node := protoHTTP(t, true), protoHTTP(t, false)
	res := protoStatic(t, map[string][]string{"h2-echo": {h2Node}, "h1-echo": {h1Node}})
	h2Addr := protoUpstream(t, res, proxy.RouteConfig{Service: "h2-echo", Protocol: "http2"})
	h1Addr := protoUpstream(t, res, proxy.RouteConfig{Service: "h1-echo", Protocol: "http"})

	tests := []struct {
		name      string
		addr      string
		clientH2C bool
		wantProto int    // the client's answer
		wantNode  string // the protocol the node saw
	}{
		{"h2c client to h2c node", h2Addr, true, 2, "HTTP/2.0"},
		{"h2c client to HTTP/1.1 node", h1Addr, true, 2, "HTTP/1.1"},
		{"HTTP/1.1 client to h2c node", h2Addr, false, 1, "HTTP/2.0"},
		{"HTTP/1.1 client to HTTP/1.1 node", h1Addr, false, 1, "HTTP/1.1"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			client := protoHTTPClient(t, tc.clientH2C)
			for _, body := range []string{"", "hello", strings.Repeat("0123456789abcdef", 64<<10)} {
				req, err := http.NewRequestWithContext(protoCtx(t, 10*time.Second), http.MethodPost, "http://"+tc.addr+"/echo", strings.NewReader(body))
				if err != nil {
					t.Fatal(err)
				}
				resp, err := client.Do(req)
				if err != nil {
					t.Fatalf("POST %d bytes error = %v", len(body), err)
				}
				got, err := io.ReadAll(resp.Body)
				resp.Body.Close()
				if err != nil {
					t.Fatalf("read body: %v", err)
				}
				if resp.StatusCode != http.StatusOK || resp.ProtoMajor != tc.wantProto {
					t.Fatalf("POST = %d over HTTP/%d, want 200 over HTTP/%d", resp.StatusCode, resp.ProtoMajor, tc.wantProto)
				}
				if p := resp.Header.Get("X-Backend-Proto"); p != tc.wantNode {
					t.Errorf("node saw %s, want %s", p, tc.wantNode)
				}
				if !bytes.Equal(got, []byte(body)) {
					t.Errorf("body = %d bytes, want the %d bytes sent", len(got), len(body))
				}
				sum := sha256.Sum256([]byte(body))
				if tr := resp.Trailer.Get("X-Checksum"); tr != hex.EncodeToString(sum[:]) {
					t.Errorf("trailer X-Checksum = %q, want %x", tr, sum)
				}
			}
		})
	}
}
