package proxy

// Tests of the sidecar's own HTTP/2 engine (internal/h2) on the proxy's
// path, route to node: real Go h2c peers where the behaviour is end to
// end, and raw framers, as client or node, where a test needs frames the
// Go peers never send or must see exactly which frames the sidecar sends.

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"

	"github.com/sidecarlb/sidecar/discovery"
	"github.com/sidecarlb/sidecar/internal/h2/h2test"
	"github.com/sidecarlb/sidecar/internal/leakcheck"
)

// TestH2RefusedStreamRetried: a stream a node refuses, with REFUSED_STREAM
// or a GOAWAY that leaves it out, was never processed: the request goes to
// another node at once and succeeds there, counted as a connect retry.
func TestH2RefusedStreamRetried(t *testing.T) {
	leakcheck.Check(t)
	tests := []struct {
		name   string
		answer func(fr *http2.Framer, f *http2.MetaHeadersFrame)
	}{
		{"rst refused stream", func(fr *http2.Framer, f *http2.MetaHeadersFrame) {
			_ = fr.WriteRSTStream(f.StreamID, http2.ErrCodeRefusedStream)
		}},
		{"goaway last stream 0", func(fr *http2.Framer, f *http2.MetaHeadersFrame) {
			_ = fr.WriteGoAway(0, http2.ErrCodeNo, nil)
		}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			refusing := h2test.StartRawNode(t, tc.answer)
			var hits atomic.Int64
			healthy := h2test.StartH2C(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				hits.Add(1)
				body, _ := io.ReadAll(r.Body)
				fmt.Fprintf(w, "%s %s %s", r.Method, r.URL.Path, body)
			}), nil)
			res := resDefaults(t)
			res.Breaker.Enabled = false // keep the refusing node in rotation
			res.Outlier.Enabled = false
			res.Retries.Backoff = time.Millisecond
			sc := startH2Sidecar(t, staticCache(t, map[string][]string{"echo": {refusing.Addr, healthy.Addr}}),
				RouteConfig{Service: "echo", Protocol: "http2", Resilience: res}, ServerOptions{})
			client := h2test.NewClient(t, nil)
			const requests = 10
			for i := range requests {
				method, body := http.MethodGet, ""
				if i%2 == 1 {
					method, body = http.MethodPut, fmt.Sprintf("payload-%d", i)
				}
				req, _ := http.NewRequest(method, fmt.Sprintf("%s/r%d", sc.URL, i), strings.NewReader(body))
				if body == "" {
					req.Body = http.NoBody
				}
				r := do(t, client, req)
				if want := fmt.Sprintf("%s /r%d %s", method, i, body); r.status != http.StatusOK || r.body != want {
					t.Errorf("%s #%d = %d %q, want 200 %q", method, i, r.status, r.body, want)
				}
			}
			refused := refusing.Headers.Load()
			if refused == 0 {
				t.Fatal("no request went to the refusing node")
			}
			if got := hits.Load(); got != requests {
				t.Errorf("healthy node served %d requests, want %d: each once", got, requests)
			}
			retried := sc.metric(t, "sidecar_retries_total", map[string]string{"reason": "connect_failed", "outcome": "retried"})
			if retried != float64(refused) {
				t.Errorf(`sidecar_retries_total{reason="connect_failed",outcome="retried"} = %v, want %d: one per refused stream`, retried, refused)
			}
			if other := sc.metric(t, "sidecar_retries_total", map[string]string{"reason": "upstream_failed"}); other != 0 {
				t.Errorf(`sidecar_retries_total{reason="upstream_failed"} = %v, want 0`, other)
			}
		})
	}
}

// TestH2NodeConnectionReuse: requests one after another, and many at once,
// share one h2c connection to the node.
func TestH2NodeConnectionReuse(t *testing.T) {
	leakcheck.Check(t)
	node := h2test.StartH2C(t, nodeHandler("node-0"), nil)
	sc := startH2Sidecar(t, staticCache(t, map[string][]string{"echo": {node.Addr}}),
		RouteConfig{Service: "echo", Protocol: "http2"}, ServerOptions{})
	client := newClient(t, nil)
	for i := range 50 {
		if r := doGet(t, client, sc.URL+"/seq", nil); r.status != http.StatusOK || r.body != "node-0 GET /seq" {
			t.Fatalf("request %d = %d %q, want 200", i, r.status, r.body)
		}
	}
	var wg sync.WaitGroup
	for range 20 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for range 5 {
				req, _ := http.NewRequest(http.MethodGet, sc.URL+"/par", nil)
				resp, err := client.Do(req)
				if err != nil {
					t.Error(err)
					return
				}
				io.Copy(io.Discard, resp.Body)
				resp.Body.Close()
				if resp.StatusCode != http.StatusOK {
					t.Errorf("status = %d, want 200", resp.StatusCode)
				}
			}
		}()
	}
	wg.Wait()
	if got := node.Accepts.Load(); got != 1 {
		t.Errorf("node connections = %d, want 1", got)
	}
}

// TestH2EndpointLeaves: when a node leaves the set, the sidecar's h2c
// connection to it is closed once its streams have ended; a stream in
// flight finishes first.
func TestH2EndpointLeaves(t *testing.T) {
	leakcheck.Check(t)
	payload := h2test.RandomBytes(256 << 10)
	started, release := make(chan struct{}, 1), make(chan struct{})
	var once sync.Once
	leaving := h2test.StartH2C(t, shutdownHandler(payload, started, release), nil)
	staying := h2test.StartH2C(t, nodeHandler("staying"), nil)
	t.Cleanup(func() { once.Do(func() { close(release) }) })

	b := newSetBackend(t, leaving.Addr)
	cache := discovery.NewCache(b, discovery.CacheOptions{}, testLogger(t))
	t.Cleanup(cache.Close)
	sc := startH2Sidecar(t, cache, RouteConfig{Service: "echo", Protocol: "http2"}, ServerOptions{})
	client := h2test.NewClient(t, nil)

	if r := doGet(t, client, sc.URL+"/fast", nil); r.status != http.StatusOK || r.body != "fast" {
		t.Fatalf("GET /fast = %d %q, want 200 fast", r.status, r.body)
	}
	slow := make(chan response, 1)
	go func() {
		resp, err := client.Get(sc.URL + "/slow")
		if err != nil {
			slow <- response{body: err.Error()}
			return
		}
		body, err := io.ReadAll(resp.Body)
		resp.Body.Close()
		if err != nil {
			body = []byte(err.Error())
		}
		slow <- response{status: resp.StatusCode, body: string(body)}
	}()
	select {
	case <-started:
	case <-time.After(10 * time.Second):
		t.Fatal("the slow request never reached the node")
	}

	b.set(t, staying.Addr)
	resWait(t, 5*time.Second, "discovery to publish the new set", func() bool {
		w, err := cache.Watch(context.Background(), "echo")
		return err == nil && len(w.Snapshot().Endpoints) == 1 && w.Snapshot().Endpoints[0].Addr == staying.Addr
	})
	// The first request after the change rebuilds the route.
	if r := doGet(t, client, sc.URL+"/next", nil); r.status != http.StatusOK || r.body != "staying GET /next" {
		t.Fatalf("GET after the change = %d %q, want it served by the node that stayed", r.status, r.body)
	}
	if got := leaving.Closes.Load(); got != 0 {
		t.Fatalf("leaving node's connection closed with a stream in flight (%d closes)", got)
	}
	once.Do(func() { close(release) })
	select {
	case r := <-slow:
		if r.status != http.StatusOK || r.body != string(payload) {
			t.Errorf("stream in flight = %d, %d bytes; want 200 and all %d bytes", r.status, len(r.body), len(payload))
		}
	case <-time.After(10 * time.Second):
		t.Fatal("stream in flight never finished")
	}
	resWait(t, 5*time.Second, "the leaving node's connection to close", func() bool {
		return leaving.Closes.Load() == leaving.Accepts.Load()
	})
	if got := leaving.Accepts.Load(); got != 1 {
		t.Errorf("leaving node connections = %d, want 1", got)
	}
}

// TestH2RefusedStreamBodyInFlight: when a node refuses a stream whose
// request body the app is still to send, the sidecar is already waiting to
// read that body for the refused stream. The request goes on to another
// node, and what that waiting read takes of the app's next bytes goes to
// the new stream, not the refused one: the node gets the whole body, never
// a short one, and the request does not hang.
func TestH2RefusedStreamBodyInFlight(t *testing.T) {
	leakcheck.Check(t)
	refusing := h2test.StartRawNode(t, func(fr *http2.Framer, f *http2.MetaHeadersFrame) {
		_ = fr.WriteRSTStream(f.StreamID, http2.ErrCodeRefusedStream)
	})
	started := make(chan struct{}, 1)
	var mu sync.Mutex
	var bodies []string
	healthy := h2test.StartH2C(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		started <- struct{}{}
		body, err := io.ReadAll(r.Body)
		if err != nil {
			return
		}
		mu.Lock()
		bodies = append(bodies, string(body))
		mu.Unlock()
		w.Write(body)
	}), nil)
	res := resDefaults(t)
	res.Breaker.Enabled = false
	res.Outlier.Enabled = false
	sc := startH2Sidecar(t, staticCache(t, map[string][]string{"echo": {refusing.Addr, healthy.Addr}}),
		RouteConfig{Service: "echo", Protocol: "http2", Resilience: res}, ServerOptions{})
	client := h2test.NewClient(t, nil)

	refusedFirst := false
	for i := 0; i < 4 && !refusedFirst; i++ {
		before := refusing.Headers.Load()
		pr, pw := io.Pipe()
		req, _ := http.NewRequest(http.MethodPut, sc.URL+"/stream", pr) // of unknown length: not held for replay
		answer := goDo(client, req)
		// Wait for the request to reach the healthy node, or an answer.
		var r response
		answered := false
		select {
		case <-started:
		case r = <-answer:
			answered = true
		case <-time.After(10 * time.Second):
			t.Fatal("the request reached no node")
		}
		refusedFirst = refusing.Headers.Load() > before
		go func() {
			_, _ = pw.Write([]byte("part1"))
			_, _ = pw.Write([]byte("part2"))
			pw.Close()
		}()
		if !answered {
			select {
			case r = <-answer:
			case <-time.After(10 * time.Second):
				pw.CloseWithError(errors.New("test gave up"))
				t.Fatalf("request %d (refused first: %v) never answered", i, refusedFirst)
			}
		}
		if r.status != http.StatusOK || r.body != "part1part2" {
			t.Errorf("request %d (refused first: %v) = %d %q, want 200 part1part2", i, refusedFirst, r.status, r.body)
		}
	}
	if !refusedFirst {
		t.Fatal("no request went to the refusing node first")
	}
	mu.Lock()
	defer mu.Unlock()
	for _, b := range bodies {
		if b != "part1part2" {
			t.Errorf("node got body %q, want part1part2: never part of it", b)
		}
	}
}

// TestH2NodeIdleStreamFrames: a node that sends RST_STREAM, WINDOW_UPDATE
// (of 0 too), DATA or HEADERS on a stream the sidecar never opened commits
// a connection error (RFC 9113, 5.1 and 6.4): the sidecar sends
// GOAWAY(PROTOCOL_ERROR) and drops the connection, failing the request on
// it. The same frames on a stream that has closed are ignored, and the
// connection serves on.
func TestH2NodeIdleStreamFrames(t *testing.T) {
	leakcheck.Check(t)
	answer := func(fr *http2.Framer, id uint32) {
		var hb bytes.Buffer
		_ = hpack.NewEncoder(&hb).WriteField(hpack.HeaderField{Name: ":status", Value: "200"})
		_ = fr.WriteHeaders(http2.HeadersFrameParam{StreamID: id, BlockFragment: hb.Bytes(), EndHeaders: true, EndStream: true})
	}
	tests := []struct {
		name string
		send func(fr *http2.Framer, id uint32) // id: the request's stream, not answered yet
		idle bool
	}{
		{"rst on an idle stream", func(fr *http2.Framer, id uint32) { _ = fr.WriteRSTStream(id+2, http2.ErrCodeCancel) }, true},
		{"rst on an even stream", func(fr *http2.Framer, id uint32) { _ = fr.WriteRSTStream(2, http2.ErrCodeCancel) }, true},
		{"window update on an idle stream", func(fr *http2.Framer, id uint32) { _ = fr.WriteWindowUpdate(id+2, 1024) }, true},
		{"data on an idle stream", func(fr *http2.Framer, id uint32) { _ = fr.WriteData(id+2, true, []byte("x")) }, true},
		{"window update of 0 on an idle stream", func(fr *http2.Framer, id uint32) {
			fr.AllowIllegalWrites = true
			_ = fr.WriteWindowUpdate(id+2, 0)
		}, true},
		{"headers on an idle stream", func(fr *http2.Framer, id uint32) { answer(fr, id+2) }, true},
		{"headers on an even stream", func(fr *http2.Framer, id uint32) { answer(fr, 2) }, true},
		{"rst and window update on the closed stream", func(fr *http2.Framer, id uint32) {
			answer(fr, id)
			_ = fr.WriteRSTStream(id, http2.ErrCodeCancel)
			_ = fr.WriteWindowUpdate(id, 1024)
		}, false},
		{"window update of 0 and headers on the closed stream", func(fr *http2.Framer, id uint32) {
			answer(fr, id)
			fr.AllowIllegalWrites = true
			_ = fr.WriteWindowUpdate(id, 0)
			answer(fr, id)
		}, false},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			node := h2test.StartRawNode(t, func(fr *http2.Framer, f *http2.MetaHeadersFrame) {
				tc.send(fr, f.StreamID)
				if tc.idle {
					answer(fr, f.StreamID) // too late: the sidecar has hung up
				}
			})
			res := resDefaults(t)
			res.Breaker.Enabled = false
			res.Outlier.Enabled = false
			sc := startH2Sidecar(t, staticCache(t, map[string][]string{"echo": {node.Addr}}),
				RouteConfig{Service: "echo", Protocol: "http2", Resilience: res}, ServerOptions{})
			client := h2test.NewClient(t, nil)
			for i := range 2 {
				r := doGet(t, client, sc.URL+"/x", nil)
				if !tc.idle {
					if r.status != http.StatusOK {
						t.Errorf("request %d = %d %q, want 200", i, r.status, r.body)
					}
					continue
				}
				if r.status != http.StatusBadGateway || !strings.Contains(r.body, "PROTOCOL_ERROR") {
					t.Errorf("request %d = %d %q, want 502 naming the PROTOCOL_ERROR", i, r.status, r.body)
				}
				select {
				case code := <-node.GoAway:
					if code != http2.ErrCodeProtocol {
						t.Errorf("request %d: GOAWAY %v, want PROTOCOL_ERROR", i, code)
					}
				case <-time.After(5 * time.Second):
					t.Fatalf("request %d: no GOAWAY from the sidecar", i)
				}
			}
			if !tc.idle {
				if conns, _ := h2PoolLoad(sc.px); conns != 1 {
					t.Errorf("connections to the node = %d, want 1: the first serves on", conns)
				}
				select {
				case code := <-node.GoAway:
					t.Errorf("GOAWAY %v from the sidecar, want none", code)
				default:
				}
			}
		})
	}
}

// TestH2NodeConnectionErrorCodes: a node's connection error is answered
// with a GOAWAY carrying that error's code, not always PROTOCOL_ERROR; the
// request on the connection fails with a 502 naming the code.
func TestH2NodeConnectionErrorCodes(t *testing.T) {
	leakcheck.Check(t)
	for _, tc := range h2test.ConnErrorCases {
		t.Run(tc.Name, func(t *testing.T) {
			node := h2test.StartRawNode(t, func(fr *http2.Framer, f *http2.MetaHeadersFrame) {
				tc.Send(fr, f.StreamID)
			})
			res := resDefaults(t)
			res.Breaker.Enabled = false
			res.Outlier.Enabled = false
			res.Retries.Attempts = 0
			sc := startH2Sidecar(t, staticCache(t, map[string][]string{"echo": {node.Addr}}),
				RouteConfig{Service: "echo", Protocol: "http2", Resilience: res}, ServerOptions{})
			r := doGet(t, h2test.NewClient(t, nil), sc.URL+"/x", nil)
			if r.status != http.StatusBadGateway || !strings.Contains(r.body, tc.Code.String()) {
				t.Errorf("request = %d %q, want 502 naming %v", r.status, r.body, tc.Code)
			}
			select {
			case code := <-node.GoAway:
				if code != tc.Code {
					t.Errorf("GOAWAY %v, want %v", code, tc.Code)
				}
			case <-time.After(5 * time.Second):
				t.Fatal("no GOAWAY from the sidecar")
			}
		})
	}
}

// TestH2SilentNodePinged: a node that stops answering altogether, neither
// its stream nor pings, as a vanished host does, has its connection closed
// once a ping goes unanswered. The request in flight fails with a 502
// naming the ping instead of hanging (the route has no request timeout),
// and the next request dials the node afresh. internal/h2's test of the
// same name holds the pool's part; this one the proxy's, end to end.
func TestH2SilentNodePinged(t *testing.T) {
	leakcheck.Check(t)
	stop := make(chan struct{})
	var streams atomic.Int64
	silent := h2test.StartRawNode(t, func(fr *http2.Framer, f *http2.MetaHeadersFrame) {
		streams.Add(1)
		<-stop // reads nothing more: no answer, no ping ack
	})
	t.Cleanup(func() { close(stop) }) // runs before the node's cleanup
	res := resDefaults(t)
	res.Breaker.Enabled = false
	res.Outlier.Enabled = false
	px := New(staticCache(t, map[string][]string{"echo": {silent.Addr}}), NewMetrics(nil), testLogger(t))
	px.h2PingAfter, px.h2PingTimeout = 100*time.Millisecond, 100*time.Millisecond
	h, err := px.Upstream("upstream", RouteConfig{Service: "echo", Protocol: "http2", Resilience: res})
	if err != nil {
		t.Fatal(err)
	}
	sc := startProxyServerWith(t, NewServer(h, ServerOptions{}, testLogger(t)))
	client := h2test.NewClient(t, nil)
	for i := range 2 {
		start := time.Now()
		req, _ := http.NewRequest(http.MethodGet, sc.URL+"/hang", nil)
		r := do(t, client, req)
		took := time.Since(start)
		if r.status != http.StatusBadGateway || !strings.Contains(r.body, "did not answer a ping") {
			t.Errorf("request %d to a silent node = %d %q, want 502 saying the ping went unanswered", i, r.status, r.body)
		}
		if took > 5*time.Second {
			t.Errorf("request %d took %v, want it ended by the ping timeout (≈ 0.3 s)", i, took)
		}
	}
	if got := streams.Load(); got != 2 {
		t.Errorf("silent node got %d streams, want 2: one per request, none retried", got)
	}
}
