package proxy

import (
	"bufio"
	"bytes"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"slices"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/sidecarlb/sidecar/internal/leakcheck"
)

func TestUpstreamRoundRobin(t *testing.T) {
	leakcheck.Check(t)
	nodes := startNodes(t, 3)
	px := startUpstream(t, staticCache(t, map[string][]string{"echo": addrs(nodes)}),
		RouteConfig{Service: "echo", Balancer: "round_robin"})
	client := newClient(t, nil)

	counts := map[string]int{}
	for i := range 300 {
		resp := doGet(t, client, px.URL+"/rr", nil)
		if resp.status != http.StatusOK {
			t.Fatalf("request %d: status = %d, want 200; body %q", i, resp.status, resp.body)
		}
		inst := resp.header.Get("X-Instance")
		if want := inst + " GET /rr"; resp.body != want {
			t.Fatalf("request %d: body = %q, want %q", i, resp.body, want)
		}
		counts[inst]++
	}
	for _, n := range nodes {
		if got := counts[n.name]; got != 100 {
			t.Errorf("requests to %s = %d, want 100 (all: %v)", n.name, got, counts)
		}
		// Keep-alive: one connection per node carried all its requests.
		if got := n.accepts.Load(); got != 1 {
			t.Errorf("connections accepted by %s = %d, want 1", n.name, got)
		}
	}
	if got := px.accepts.Load(); got != 1 {
		t.Errorf("connections accepted by the proxy = %d, want 1", got)
	}
}

func TestUpstreamHashByHeader(t *testing.T) {
	leakcheck.Check(t)
	nodes := startNodes(t, 3)
	px := startUpstream(t, staticCache(t, map[string][]string{"echo": addrs(nodes)}),
		RouteConfig{Service: "echo", Balancer: "hash", HashKey: "header:X-User"})
	client := newClient(t, nil)

	first := ""
	for i := range 50 {
		inst := doGet(t, client, px.URL+"/", http.Header{"X-User": {"alice"}}).header.Get("X-Instance")
		if i == 0 {
			first = inst
		} else if inst != first {
			t.Fatalf("request %d for alice went to %s, earlier ones to %s", i, inst, first)
		}
	}
	users := map[string]string{} // user → instance
	spread := map[string]int{}
	for round := range 2 {
		for u := range 30 {
			user := fmt.Sprintf("user-%d", u)
			inst := doGet(t, client, px.URL+"/", http.Header{"X-User": {user}}).header.Get("X-Instance")
			if round == 1 && users[user] != inst {
				t.Errorf("%s went to %s, then to %s", user, users[user], inst)
			}
			users[user] = inst
			spread[inst]++
		}
	}
	if len(spread) < 2 {
		t.Errorf("30 users all went to %v, want them spread over more than one node", spread)
	}
	// Without the key the hash balancer rotates.
	noKey := map[string]bool{}
	for range 3 {
		noKey[doGet(t, client, px.URL+"/", nil).header.Get("X-Instance")] = true
	}
	if len(noKey) != 3 {
		t.Errorf("3 requests without X-User went to %v, want 3 nodes", noKey)
	}
}

func TestUpstreamStreamsResponse(t *testing.T) {
	leakcheck.Check(t)
	// The node writes a chunk, then holds the next one until the client has
	// this one: a proxy that held the response back would never deliver it.
	gate := make(chan struct{})
	node := startServer(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		rc := http.NewResponseController(w)
		for i := range 3 {
			if i > 0 {
				select {
				case <-gate:
				case <-r.Context().Done():
					return
				}
			}
			fmt.Fprintf(w, "chunk-%d;", i)
			if err := rc.Flush(); err != nil {
				return
			}
		}
	}))
	px := startUpstream(t, staticCache(t, map[string][]string{"echo": {node.Listener.Addr().String()}}),
		RouteConfig{Service: "echo"})
	client := newClient(t, nil)
	resp, err := client.Get(px.URL + "/stream")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()

	br := bufio.NewReader(resp.Body)
	for i := range 3 {
		got := make(chan string, 1)
		go func() {
			s, _ := br.ReadString(';')
			got <- s
		}()
		select {
		case s := <-got:
			if want := fmt.Sprintf("chunk-%d;", i); s != want {
				t.Fatalf("chunk %d = %q, want %q", i, s, want)
			}
		case <-time.After(10 * time.Second):
			// Fail rather than hang; the body read ends with the test's
			// cleanups.
			t.Fatalf("chunk %d never reached the client while the node waited: the proxy held it back", i)
		}
		if i < 2 {
			gate <- struct{}{}
		}
	}
	if rest, err := io.ReadAll(br); err != nil || len(rest) != 0 {
		t.Errorf("after the last chunk: %q, %v; want EOF", rest, err)
	}
}

func TestUpstreamStreamsRequestBody(t *testing.T) {
	leakcheck.Check(t)
	gotFirst := make(chan struct{})
	node := startServer(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		first := make([]byte, 5)
		if _, err := io.ReadFull(r.Body, first); err != nil {
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		}
		close(gotFirst)
		rest, err := io.ReadAll(r.Body)
		if err != nil {
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		}
		fmt.Fprintf(w, "%s|%s", first, rest)
	}))
	px := startUpstream(t, staticCache(t, map[string][]string{"echo": {node.Listener.Addr().String()}}),
		RouteConfig{Service: "echo"})
	client := newClient(t, nil)

	pr, pw := io.Pipe()
	go func() {
		// The second part is written only once the node has the first: a
		// proxy that buffered the body would never deliver it.
		_, _ = io.WriteString(pw, "first")
		select {
		case <-gotFirst:
			_, _ = io.WriteString(pw, "second")
			_ = pw.Close()
		case <-time.After(10 * time.Second):
			pw.CloseWithError(errors.New("the node never got the first part of the body"))
		}
	}()
	req, _ := http.NewRequest(http.MethodPost, px.URL+"/upload", pr)
	resp := do(t, client, req)
	if resp.status != http.StatusOK || resp.body != "first|second" {
		t.Errorf("POST streamed body: status = %d, body %q; want 200 %q", resp.status, resp.body, "first|second")
	}
}

func TestUpstreamLargeBodies(t *testing.T) {
	leakcheck.Check(t)
	// A full-duplex echo: the node streams the body back as it reads it.
	node := startServer(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		_ = http.NewResponseController(w).EnableFullDuplex()
		w.Header().Set("Content-Type", "application/octet-stream")
		_, _ = io.Copy(w, r.Body)
	}))
	px := startUpstream(t, staticCache(t, map[string][]string{"echo": {node.Listener.Addr().String()}}),
		RouteConfig{Service: "echo"})
	client := newClient(t, nil)

	body := make([]byte, 8<<20)
	_, _ = rand.Read(body)
	want := sha256.Sum256(body)
	tests := []struct {
		name string
		body func() io.Reader
	}{
		{"content length", func() io.Reader { return bytes.NewReader(body) }},
		{"chunked", func() io.Reader { return io.MultiReader(bytes.NewReader(body)) }},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			for range 2 { // the second rides the kept-alive connection
				req, _ := http.NewRequest(http.MethodPost, px.URL+"/echo", tc.body())
				resp, err := client.Do(req)
				if err != nil {
					t.Fatal(err)
				}
				h := sha256.New()
				n, err := io.Copy(h, resp.Body)
				resp.Body.Close()
				if err != nil {
					t.Fatalf("read echoed body: %v after %d bytes", err, n)
				}
				if n != int64(len(body)) || !bytes.Equal(h.Sum(nil), want[:]) {
					t.Fatalf("echoed body: %d bytes, sha256 %s; want %d bytes, %s", n,
						hex.EncodeToString(h.Sum(nil)), len(body), hex.EncodeToString(want[:]))
				}
			}
		})
	}
}

func TestUpstreamTrailers(t *testing.T) {
	leakcheck.Check(t)
	node := startServer(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Trailer", "X-Checksum")
		fmt.Fprint(w, "payload")
		w.(http.Flusher).Flush()
		w.Header().Set("X-Checksum", "abc123")
		w.Header().Set(http.TrailerPrefix+"X-Late", "undeclared")
	}))
	px := startUpstream(t, staticCache(t, map[string][]string{"echo": {node.Listener.Addr().String()}}),
		RouteConfig{Service: "echo"})
	resp := doGet(t, newClient(t, nil), px.URL+"/", nil)
	if resp.status != http.StatusOK || resp.body != "payload" {
		t.Fatalf("status = %d, body %q; want 200 payload", resp.status, resp.body)
	}
	for k, want := range map[string]string{"X-Checksum": "abc123", "X-Late": "undeclared"} {
		if got := resp.trailer.Get(k); got != want {
			t.Errorf("trailer %s = %q, want %q (trailers: %v)", k, got, want, resp.trailer)
		}
	}
}

func TestUpstreamHeaders(t *testing.T) {
	leakcheck.Check(t)
	type seen struct {
		host   string
		header http.Header
	}
	got := make(chan seen, 1)
	node := startServer(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		got <- seen{r.Host, r.Header.Clone()}
		w.Header().Set("Connection", "X-Node-Hop")
		w.Header().Set("X-Node-Hop", "1")
		w.Header().Set("Keep-Alive", "timeout=5")
		w.Header().Set("X-Node", "kept")
	}))
	nodeAddr := node.Listener.Addr().String()
	cache := staticCache(t, map[string][]string{"echo": {nodeAddr}})

	tests := []struct {
		name         string
		preserveHost bool
		header       http.Header
		want         http.Header // values the node must see
		absent       []string    // headers the node must not see
		wantHost     string
	}{
		{
			name: "hop by hop removed",
			header: http.Header{
				"Connection":          {"X-Hop, x-other"},
				"X-Hop":               {"1"},
				"X-Other":             {"1"},
				"Keep-Alive":          {"timeout=5"},
				"Proxy-Authorization": {"Basic eDp5"},
				"Proxy-Connection":    {"keep-alive"},
				"X-End-To-End":        {"yes"},
				"User-Agent":          {"test-agent"},
			},
			want:     http.Header{"X-End-To-End": {"yes"}, "User-Agent": {"test-agent"}},
			absent:   []string{"Connection", "X-Hop", "X-Other", "Keep-Alive", "Proxy-Authorization", "Proxy-Connection"},
			wantHost: nodeAddr,
		},
		{
			name:     "te trailers kept",
			header:   http.Header{"Te": {"trailers"}},
			want:     http.Header{"Te": {"trailers"}},
			wantHost: nodeAddr,
		},
		{
			name:     "te trailers kept when listed in connection",
			header:   http.Header{"Connection": {"TE"}, "Te": {"trailers, deflate"}},
			want:     http.Header{"Te": {"trailers"}},
			wantHost: nodeAddr,
		},
		{
			name:     "te without trailers removed",
			header:   http.Header{"Te": {"gzip"}},
			absent:   []string{"Te"},
			wantHost: nodeAddr,
		},
		{
			name:     "forwarded for appended",
			header:   http.Header{"X-Forwarded-For": {"10.0.0.1, 10.0.0.2"}},
			want:     http.Header{"X-Forwarded-For": {"10.0.0.1, 10.0.0.2, 127.0.0.1"}, "X-Forwarded-Proto": {"http"}},
			wantHost: nodeAddr,
		},
		{
			name:     "forwarded set",
			want:     http.Header{"X-Forwarded-For": {"127.0.0.1"}, "X-Forwarded-Proto": {"http"}},
			absent:   []string{"User-Agent"}, // none sent, and not Go's default
			wantHost: nodeAddr,
		},
		{
			name:     "forwarded proto kept",
			header:   http.Header{"X-Forwarded-Proto": {"https"}},
			want:     http.Header{"X-Forwarded-Proto": {"https"}},
			wantHost: nodeAddr,
		},
		{
			name:         "host preserved",
			preserveHost: true,
			want:         http.Header{"X-Forwarded-Proto": {"http"}},
			wantHost:     "echo.example:8080",
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			px := startUpstream(t, cache, RouteConfig{Service: "echo", PreserveHost: tc.preserveHost})
			req, _ := http.NewRequest(http.MethodGet, px.URL+"/h", nil)
			req.Host = "echo.example:8080"
			req.Header["User-Agent"] = []string{""} // sends none
			for k, vv := range tc.header {
				req.Header[k] = vv
			}
			resp := do(t, newClient(t, nil), req)
			if resp.status != http.StatusOK {
				t.Fatalf("status = %d, want 200; body %q", resp.status, resp.body)
			}
			s := <-got
			if s.host != tc.wantHost {
				t.Errorf("node saw Host %q, want %q", s.host, tc.wantHost)
			}
			for k, want := range tc.want {
				if g := s.header[k]; !slices.Equal(g, want) {
					t.Errorf("node saw %s = %q, want %q", k, g, want)
				}
			}
			for _, k := range tc.absent {
				if g, ok := s.header[k]; ok {
					t.Errorf("node saw %s = %q, want it removed", k, g)
				}
			}
			// The node's hop-by-hop response headers stop at the proxy.
			for _, k := range []string{"X-Node-Hop", "Keep-Alive"} {
				if g, ok := resp.header[k]; ok {
					t.Errorf("client saw %s = %q, want it removed", k, g)
				}
			}
			if g := resp.header.Get("X-Node"); g != "kept" {
				t.Errorf("client saw X-Node = %q, want kept", g)
			}
		})
	}
}

// TestUpstreamPOSTAfterNodeClosedIdle: a node that closes keep-alive
// connections idle for a moment (net/http's IdleTimeout) does not make the
// next POST through the sidecar fail, as it does not with Go's Transport.
func TestUpstreamPOSTAfterNodeClosedIdle(t *testing.T) {
	var closed atomic.Int32
	h := nodeHandler("n")
	node := startServerWith(t, h, &http.Server{Handler: h, IdleTimeout: 20 * time.Millisecond,
		ConnState: func(_ net.Conn, s http.ConnState) {
			if s == http.StateClosed {
				closed.Add(1)
			}
		}})
	px := startUpstream(t, staticCache(t, map[string][]string{"svc": {node.Listener.Addr().String()}}),
		RouteConfig{Service: "svc"})
	client := newClient(t, nil)
	for i := range 3 {
		req, _ := http.NewRequest(http.MethodPost, px.URL+"/p", strings.NewReader("payload"))
		if resp := do(t, client, req); resp.status != http.StatusOK || resp.body != "n POST /p" {
			t.Fatalf("POST %d after the node closed the idle connection: %d %q, want 200", i, resp.status, resp.body)
		}
		deadline := time.Now().Add(5 * time.Second)
		for closed.Load() < int32(i+1) && time.Now().Before(deadline) {
			time.Sleep(time.Millisecond)
		}
	}
}
