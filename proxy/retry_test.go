package proxy

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/sidecarlb/sidecar/internal/h2/h2test"
	"github.com/sidecarlb/sidecar/internal/wait"

	"golang.org/x/net/http2"

	"github.com/sidecarlb/sidecar/config"
	"github.com/sidecarlb/sidecar/internal/leakcheck"
)

func TestRetryDialRefused(t *testing.T) {
	defaults := resDefaults(t)
	off := defaults
	off.Breaker.Enabled = false
	off.Outlier.Enabled = false
	tests := []struct {
		name string
		res  config.Resilience
	}{
		{"defaults", defaults},
		{"retries only", off},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			nodes := resStartNodes(t, 2)
			dead := resDeadAddr(t)
			s := resProxy(t, append(resAddrs(nodes), dead), RouteConfig{Resilience: tc.res})
			for i := range 30 {
				if r := s.do(t, http.MethodGet, "/get", nil); r.status != http.StatusOK {
					t.Fatalf("GET #%d: status %d (%s), want 200", i, r.status, r.body)
				}
				body := []byte("post body " + strings.Repeat("x", i))
				r := s.do(t, http.MethodPost, "/post", body)
				if r.status != http.StatusOK {
					t.Fatalf("POST #%d: status %d (%s), want 200", i, r.status, r.body)
				}
				if !strings.HasSuffix(r.body, string(body)) {
					t.Fatalf("POST #%d: body %q, want it to end with %q", i, r.body, body)
				}
			}
		})
	}
}

func TestRetryOn503(t *testing.T) {
	res := resDefaults(t)
	res.Outlier.Enabled = false // keep the failing node in rotation
	res.Retries.Backoff = time.Millisecond
	replay := res
	replay.Retries.RetryNonIdempotent = true

	tests := []struct {
		name      string
		method    string
		res       config.Resilience
		want503   bool // some answers are the failing node's 503
		wantOther bool // the failing node's tries were sent on elsewhere
	}{
		{name: "GET retried", method: http.MethodGet, res: res, wantOther: true},
		{name: "POST not retried", method: http.MethodPost, res: res, want503: true},
		{name: "POST retried when allowed", method: http.MethodPost, res: replay, wantOther: true},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			nodes := resStartNodes(t, 3)
			bad := nodes[0]
			bad.status.Store(http.StatusServiceUnavailable)
			s := resProxy(t, resAddrs(nodes), RouteConfig{Resilience: tc.res})
			var got503 int
			var sent [][]byte
			for i := range 30 {
				var body []byte
				if tc.method == http.MethodPost {
					body = []byte("payload-" + strings.Repeat("ab", i))
					sent = append(sent, body)
				}
				r := s.do(t, tc.method, "/x", body)
				switch r.status {
				case http.StatusOK:
				case http.StatusServiceUnavailable:
					if r.header.Get("X-Sidecar-Error") != "" || r.body != bad.addr {
						t.Fatalf("#%d: a 503 that is not the node's: %v %q", i, r.header, r.body)
					}
					got503++
				default:
					t.Fatalf("#%d: status %d (%s)", i, r.status, r.body)
				}
			}
			badHits := bad.hits.Load()
			if badHits == 0 {
				t.Fatal("the failing node got no request")
			}
			if tc.want503 {
				if int64(got503) != badHits {
					t.Errorf("client got %d 503s, failing node got %d requests: want equal (no retry)", got503, badHits)
				}
			} else if got503 != 0 {
				t.Errorf("client got %d 503s, want 0", got503)
			}
			if total := resHits(nodes); tc.wantOther && total != 30+badHits {
				t.Errorf("nodes got %d requests, want 30 + %d retries", total, badHits)
			}
			if tc.method != http.MethodPost {
				return
			}
			// Every try, the failed ones too, carried the request's exact
			// bytes.
			all := map[string]int{}
			for _, n := range nodes {
				for _, b := range n.received() {
					all[string(b)]++
				}
			}
			for _, b := range sent {
				if all[string(b)] == 0 {
					t.Errorf("body %q reached no node", b)
				}
				delete(all, string(b))
			}
			if len(all) != 0 {
				t.Errorf("nodes read bodies that were never sent: %v", all)
			}
			if tc.wantOther {
				// The failing node's bodies were replayed elsewhere.
				for _, b := range bad.received() {
					replayed := false
					for _, n := range nodes[1:] {
						for _, x := range n.received() {
							replayed = replayed || bytes.Equal(x, b)
						}
					}
					if !replayed {
						t.Errorf("body %q sent to the failing node was not replayed", b)
					}
				}
			}
		})
	}
}

func TestRetryPerTryTimeout(t *testing.T) {
	res := resDefaults(t)
	res.Outlier.Enabled = false
	res.Breaker.Enabled = false
	res.Retries.PerTryTimeout = 100 * time.Millisecond
	res.Retries.Backoff = time.Millisecond
	nodes := resStartNodes(t, 3)
	nodes[1].stall.Store(true)
	s := resProxy(t, resAddrs(nodes), RouteConfig{Resilience: res})
	for i := range 9 {
		start := time.Now()
		r := s.do(t, http.MethodGet, "/slow", nil)
		if r.status != http.StatusOK {
			t.Fatalf("GET #%d: status %d (%s), want 200", i, r.status, r.body)
		}
		if d := time.Since(start); d > 3*time.Second {
			t.Errorf("GET #%d took %v: the stalled try was not cut at the per-try timeout", i, d)
		}
	}
	if nodes[1].hits.Load() == 0 {
		t.Error("the stalled node got no request")
	}
	if got := s.metric(t, "sidecar_retries_total", map[string]string{"reason": "per_try_timeout", "outcome": "retried"}); got == 0 {
		t.Error(`sidecar_retries_total{reason="per_try_timeout",outcome="retried"} = 0, want > 0`)
	}
}

func TestRetryAttemptsBound(t *testing.T) {
	base := resDefaults(t)
	base.Retries.Backoff = time.Millisecond
	base.Retries.Budget = config.Budget{Percent: 100, MinPerSecond: 100, Window: time.Second}
	base.Outlier.Enabled = false
	tests := []struct {
		name     string
		nodes    int
		attempts int
		outlier  bool
	}{
		{name: "3 nodes 2 retries", nodes: 3, attempts: 2},
		{name: "5 nodes 2 retries", nodes: 5, attempts: 2},
		{name: "3 nodes 1 retry", nodes: 3, attempts: 1},
		{name: "3 nodes no retry", nodes: 3, attempts: 0},
		// Ejection takes one node out after its first failures: the last
		// try's answer must still be relayed.
		{name: "3 nodes with ejection", nodes: 3, attempts: 2, outlier: true},
		{name: "5 nodes 4 retries with ejection", nodes: 5, attempts: 4, outlier: true},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			res := base
			res.Retries.Attempts = tc.attempts
			if tc.outlier {
				res.Outlier = resDefaults(t).Outlier
				res.Outlier.ConsecutiveFailures = 2
			}
			nodes := resStartNodes(t, tc.nodes)
			for _, n := range nodes {
				n.status.Store(http.StatusServiceUnavailable)
			}
			s := resProxy(t, resAddrs(nodes), RouteConfig{Resilience: res})
			for i := range 20 {
				before := resHits(nodes)
				r := s.do(t, http.MethodGet, "/", nil)
				if r.status != http.StatusServiceUnavailable || r.header.Get("X-Sidecar-Error") != "" {
					t.Fatalf("GET #%d: status %d, X-Sidecar-Error %q, body %q; want the node's own 503",
						i, r.status, r.header.Get("X-Sidecar-Error"), r.body)
				}
				if tries := resHits(nodes) - before; tries < 1 || tries > int64(tc.attempts+1) {
					t.Fatalf("GET #%d reached nodes %d times, want 1 to %d", i, tries, tc.attempts+1)
				}
			}
		})
	}
}

func TestRetryBackoffRespectsCancel(t *testing.T) {
	t.Run("backoff", func(t *testing.T) {
		ctx, cancel := context.WithCancel(context.Background())
		cancel()
		start := time.Now()
		if waitBackoff(ctx, time.Hour, 3) {
			t.Error("backoff() on a cancelled context = true, want false")
		}
		if waitBackoff(ctx, 0, 1) {
			t.Error("backoff() with no delay on a cancelled context = true, want false")
		}
		if !waitBackoff(context.Background(), 0, 1) {
			t.Error("backoff() with no delay = false, want true")
		}
		if d := time.Since(start); d > time.Second {
			t.Errorf("backoff() on a cancelled context took %v", d)
		}
	})

	t.Run("client cancels during backoff", func(t *testing.T) {
		res := resDefaults(t)
		res.Outlier.Enabled = false
		res.Retries.Backoff = 10 * time.Second
		nodes := resStartNodes(t, 2)
		for _, n := range nodes {
			n.status.Store(http.StatusServiceUnavailable)
		}
		s := resProxy(t, resAddrs(nodes), RouteConfig{Resilience: res})
		ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
		defer cancel()
		req, _ := http.NewRequestWithContext(ctx, http.MethodGet, s.url+"/", nil)
		start := time.Now()
		resp, err := http.DefaultClient.Do(req)
		if err == nil {
			resp.Body.Close()
			t.Fatalf("GET: status %d, want the client's deadline", resp.StatusCode)
		}
		if !errors.Is(err, context.DeadlineExceeded) {
			t.Fatalf("GET: %v, want context deadline exceeded", err)
		}
		// The handler stops waiting when the client goes, not after the
		// backoff.
		wait.For(t, 2*time.Second, "the handler to return", func() bool {
			return s.metric(t, "sidecar_upstream_requests_in_flight", nil) == 0
		})
		if d := time.Since(start); d > 3*time.Second {
			t.Errorf("handler returned after %v, want soon after the client's 200ms deadline", d)
		}
		if got := resHits(nodes); got != 1 {
			t.Errorf("nodes got %d requests, want 1 (no retry after the client left)", got)
		}
		if got := s.metric(t, "sidecar_retries_total", map[string]string{"outcome": "retried"}); got != 0 {
			t.Errorf(`sidecar_retries_total{outcome="retried"} = %v, want 0: the retry was never sent`, got)
		}
	})
}

// A node's 503 given up for a retry is relayed when the retry fails
// outright: a real answer beats one the sidecar makes up.
func TestRetryRelaysHeldAnswerWhenRetryFails(t *testing.T) {
	res := resDefaults(t)
	res.Outlier.Enabled = false
	res.Breaker.Enabled = false
	res.Retries.Backoff = time.Millisecond
	nodes := resStartNodes(t, 1)
	bad := nodes[0]
	bad.status.Store(http.StatusServiceUnavailable)
	s := resProxy(t, []string{bad.addr, resDeadAddr(t)}, RouteConfig{Resilience: res})
	for i := range 20 {
		r := s.do(t, http.MethodGet, "/x", nil)
		if r.status != http.StatusServiceUnavailable || r.header.Get("X-Sidecar-Error") != "" || r.body != bad.addr {
			t.Fatalf("request %d = %d %q (X-Sidecar-Error %q), want the node's own 503",
				i, r.status, r.body, r.header.Get("X-Sidecar-Error"))
		}
	}
}

// TestRetryCountedWhenSent: a retry counts in sidecar_retries_total and
// against the budget only once its try is sent. A try that fails when the
// request body cannot be sent again, or when no node is left to try, is
// not retried, and so is neither counted nor charged.
func TestRetryCountedWhenSent(t *testing.T) {
	// refuseAfterBody is an h2c node that takes a request's first body
	// bytes, then refuses the stream: never processed, but the body is
	// spoken for.
	refuseAfterBody := func(t *testing.T) *h2test.RawNode {
		return h2test.StartRawNode(t, func(fr *http2.Framer, f *http2.MetaHeadersFrame) {
			id := f.StreamID
			for {
				g, err := fr.ReadFrame()
				if err != nil {
					return
				}
				if d, ok := g.(*http2.DataFrame); ok && d.StreamID == id {
					break
				}
			}
			_ = fr.WriteRSTStream(id, http2.ErrCodeRefusedStream)
		})
	}
	// dropMidBody is an HTTP/1.1 node that reads a request's first body
	// byte, then drops the connection.
	dropMidBody := func(t *testing.T, tries *atomic.Int64) string {
		return startServer(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			tries.Add(1)
			if r.Method == http.MethodPost {
				_, _ = io.ReadFull(r.Body, make([]byte, 1))
			}
			panic(http.ErrAbortHandler)
		})).Listener.Addr().String()
	}
	tests := []struct {
		name     string
		protocol string
		method   string
		nodes    func(t *testing.T) (addrs []string, tries func() int64)
	}{
		{"h2c nodes refuse a streamed POST after its first bytes", "http2", http.MethodPost, func(t *testing.T) ([]string, func() int64) {
			a, b := refuseAfterBody(t), refuseAfterBody(t)
			return []string{a.Addr, b.Addr}, func() int64 { return a.Headers.Load() + b.Headers.Load() }
		}},
		{"http/1.1 nodes drop a streamed POST mid-body", "http", http.MethodPost, func(t *testing.T) ([]string, func() int64) {
			var tries atomic.Int64
			return []string{dropMidBody(t, &tries), dropMidBody(t, &tries)}, tries.Load
		}},
		{"the only node drops a GET", "http", http.MethodGet, func(t *testing.T) ([]string, func() int64) {
			var tries atomic.Int64
			return []string{dropMidBody(t, &tries)}, tries.Load
		}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			leakcheck.Check(t)
			res := resDefaults(t)
			res.Breaker.Enabled = false
			res.Outlier.Enabled = false
			res.Retries.Backoff = time.Millisecond
			res.Retries.RetryNonIdempotent = true
			// One retry a second: a retry wrongly charged would leave none
			// for the next request.
			res.Retries.Budget = config.Budget{Percent: 0, MinPerSecond: 1, Window: time.Second}
			addrs, tries := tc.nodes(t)
			s := resProxy(t, addrs, RouteConfig{Protocol: tc.protocol, Resilience: res})
			const requests = 4
			for i := range requests {
				var body io.Reader
				if tc.method == http.MethodPost {
					body = io.MultiReader(strings.NewReader("streamed body")) // of unknown length: not held for replay
				}
				req, _ := http.NewRequest(tc.method, s.url+"/x", body)
				resp, err := http.DefaultClient.Do(req)
				if err != nil {
					t.Fatalf("request %d: %v", i, err)
				}
				resp.Body.Close()
				if resp.StatusCode != http.StatusBadGateway {
					t.Errorf("request %d: status %d, want 502", i, resp.StatusCode)
				}
			}
			if got := tries(); got != requests {
				t.Errorf("nodes got %d tries, want %d: one per request, none retried", got, requests)
			}
			for _, outcome := range []string{"retried", "budget_exhausted"} {
				if got := s.metric(t, "sidecar_retries_total", map[string]string{"outcome": outcome}); got != 0 {
					t.Errorf(`sidecar_retries_total{outcome=%q} = %v, want 0: no retry was sent`, outcome, got)
				}
			}
		})
	}
}

// startSignallingEcho starts an h2c node that echoes a request's body and
// signals on started when a request reaches it, before it reads the body.
func startSignallingEcho(t testing.TB) (*h2test.Node, <-chan struct{}) {
	started := make(chan struct{}, 1)
	echo := h2test.StartH2C(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		started <- struct{}{}
		b, err := io.ReadAll(r.Body)
		if err != nil {
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		}
		if v := r.Trailer.Get("X-Sum"); v != "" {
			w.Header().Set("X-Echo-Sum", v) // the request's trailer, seen
		}
		w.Write(b)
	}), nil)
	return echo, started
}

// TestRetryStreamedBodyWhole: a node that answers 503 at once, before it
// reads any of a streamed request body (of unknown length, so not held for
// replay), has the request retried on another node, which gets the whole
// body, byte for byte. The client's first bytes come only once the retry
// is under way, while the first try's body sender still waits for them:
// they must go to the retry, not to the stream that was answered. The
// body's trailer reaches the node too, in the retry's copy of the
// request's trailers, which a stale try's read of the body's end must not
// write while the retry's request is encoded.
func TestRetryStreamedBodyWhole(t *testing.T) {
	tests := []struct {
		name     string
		protocol string // the route's, to the nodes
		app      func(t *testing.T) *http.Client
	}{
		{"h2c app, http2 route", "http2", func(t *testing.T) *http.Client { return h2test.NewClient(t, nil) }},
		{"http/1.1 app, http2 route", "http2", func(t *testing.T) *http.Client { return newClient(t, nil) }},
		{"http/1.1 app, http route", "http", func(t *testing.T) *http.Client { return newClient(t, nil) }},
		{"h2c app, http route", "http", func(t *testing.T) *http.Client { return h2test.NewClient(t, nil) }},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			leakcheck.Check(t)
			var refused atomic.Int64
			unavailable := h2test.StartH2C(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				// Over HTTP/1.1, answer without first reading the body, as
				// an h2 node does anyway.
				_ = http.NewResponseController(w).EnableFullDuplex()
				refused.Add(1)
				w.WriteHeader(http.StatusServiceUnavailable)
			}), nil)
			echo, started := startSignallingEcho(t)
			res := resDefaults(t)
			res.Breaker.Enabled = false
			res.Outlier.Enabled = false
			res.Retries.Backoff = time.Millisecond
			res.Retries.Budget = config.Budget{Percent: 100, MinPerSecond: 100, Window: time.Second}
			sc := startH2Sidecar(t, staticCache(t, map[string][]string{"echo": {unavailable.Addr, echo.Addr}}),
				RouteConfig{Service: "echo", Protocol: tc.protocol, Resilience: res}, ServerOptions{})
			client := tc.app(t)

			const rounds = 20
			for i := range rounds {
				before := refused.Load()
				parts := [][]byte{h2test.RandomBytes(5), h2test.RandomBytes(20 << 10), h2test.RandomBytes(1), h2test.RandomBytes(40 << 10)}
				want := bytes.Join(parts, nil)
				pr, pw := io.Pipe()
				ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
				req, _ := http.NewRequestWithContext(ctx, http.MethodPut, sc.URL+"/upload", pr)
				req.Trailer = http.Header{"X-Sum": nil}
				sum := fmt.Sprint(len(want))
				answer := goDo(client, req)
				// The body starts once a node that reads it has the request:
				// after the 503, when the unavailable node was tried first.
				select {
				case <-started:
				case r := <-answer:
					cancel()
					t.Fatalf("round %d: answered %d %q before the echoing node had the request", i, r.status, r.body)
				case <-ctx.Done():
					t.Fatalf("round %d: the request never reached the echoing node", i)
				}
				go func() {
					for _, p := range parts {
						if _, err := pw.Write(p); err != nil {
							return
						}
					}
					req.Trailer.Set("X-Sum", sum) // sent when the body ends
					pw.Close()
				}()
				var r response
				select {
				case r = <-answer:
				case <-ctx.Done():
					pw.CloseWithError(errors.New("test gave up"))
					r = <-answer
				}
				cancel()
				retried := refused.Load() > before
				if r.status != http.StatusOK || r.body != string(want) {
					t.Fatalf("round %d (retried after a 503: %v): %d with %d bytes (equal: %v), want 200 and the %d bytes sent; %.80q",
						i, retried, r.status, len(r.body), r.body == string(want), len(want), r.body)
				}
				if got := r.header.Get("X-Echo-Sum"); got != sum {
					t.Fatalf("round %d (retried after a 503: %v): the node saw trailer X-Sum %q, want %q", i, retried, got, sum)
				}
			}
			if got := refused.Load(); got < rounds/4 {
				t.Fatalf("the unavailable node was tried first in %d of %d rounds, want at least %d", got, rounds, rounds/4)
			}
			if got, want := sc.metric(t, "sidecar_retries_total", map[string]string{"reason": "status_503", "outcome": "retried"}), float64(refused.Load()); got != want {
				t.Errorf(`sidecar_retries_total{status_503, retried} = %v, want %v: one per 503`, got, want)
			}
		})
	}
}

// TestRetryStreamedBodyDuringBackoff: a node fails a request (it resets
// it) before reading any of its streamed body; the client's first bytes
// come once the retry is decided on, while it waits out its backoff. The
// failed try's body sender may still be waiting for them: they must go to
// the retry, not to the failed try, which would leave the body unable to
// be sent again and the client with an error.
func TestRetryStreamedBodyDuringBackoff(t *testing.T) {
	tests := []struct {
		name     string
		protocol string // the route's, to the nodes
		app      func(t *testing.T) *http.Client
	}{
		// Not over an http route: net/http's Transport returns a failed
		// try's error only once its write loop's read of the body returns.
		{"h2c app, http2 route", "http2", func(t *testing.T) *http.Client { return h2test.NewClient(t, nil) }},
		{"http/1.1 app, http2 route", "http2", func(t *testing.T) *http.Client { return newClient(t, nil) }},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			leakcheck.Check(t)
			broken := h2test.StartH2C(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				panic(http.ErrAbortHandler) // a reset stream
			}), nil)
			echo, started := startSignallingEcho(t)
			res := resDefaults(t)
			res.Breaker.Enabled = false
			res.Outlier.Enabled = false
			// Long enough that the first bytes, sent once the retry is
			// decided on, surely come during the backoff; what is asserted
			// does not depend on it.
			res.Retries.Backoff = 400 * time.Millisecond
			res.Retries.Budget = config.Budget{Percent: 100, MinPerSecond: 100, Window: time.Minute}
			sc := startH2Sidecar(t, staticCache(t, map[string][]string{"echo": {broken.Addr, echo.Addr}}),
				RouteConfig{Service: "echo", Protocol: tc.protocol, Resilience: res}, ServerOptions{})
			client := tc.app(t)

			const wantRetried = 2 // rounds where the broken node goes first
			retried := 0
			for i := 0; retried < wantRetried; i++ {
				if i == 4*wantRetried {
					t.Fatalf("the broken node went first in %d of %d rounds, want %d", retried, i, wantRetried)
				}
				first, rest := h2test.RandomBytes(100), h2test.RandomBytes(30<<10)
				want := string(first) + string(rest)
				pr, pw := io.Pipe()
				ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
				req, _ := http.NewRequestWithContext(ctx, http.MethodPut, sc.URL+"/upload", pr)
				answer := goDo(client, req)
				// The failed try gives the body up before the retry takes
				// from the budget: once the budget shows it, what is sent
				// is the retry's.
				spent := retriesSpent(sc.px)
				echoFirst := false
				for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(time.Millisecond) {
					select {
					case <-started:
						echoFirst = true
					default:
					}
					if echoFirst || retriesSpent(sc.px) > spent {
						break
					}
					if time.Now().After(deadline) {
						t.Fatalf("round %d: the request reached no node", i)
					}
				}
				if !echoFirst {
					retried++
				}
				go func() {
					_, _ = pw.Write(first) // a broken round shows in the answer
					if !echoFirst {
						select {
						case <-started:
						case <-ctx.Done():
						}
					}
					_, _ = pw.Write(rest)
					pw.Close()
				}()
				var r response
				select {
				case r = <-answer:
				case <-ctx.Done():
					pw.CloseWithError(errors.New("test gave up"))
					r = <-answer
				}
				cancel()
				pw.CloseWithError(errors.New("round over"))
				if r.status != http.StatusOK || r.body != want {
					t.Fatalf("round %d (retried: %v): %d with %d bytes (equal: %v), want 200 and the %d bytes sent; %.80q",
						i, !echoFirst, r.status, len(r.body), r.body == want, len(want), r.body)
				}
			}
		})
	}
}

// retriesSpent counts the retries p's routes took from their budgets and
// did not give back.
func retriesSpent(p *Proxy) int64 {
	p.mu.Lock()
	defer p.mu.Unlock()
	var n int64
	for _, rt := range p.routes {
		n += rt.budget.Spent()
	}
	return n
}

// TestRetryBudgetPercentWins: through the proxy, the retry budget allows
// percent of the requests in its window as retries when that share is above
// the per-second floor. Every other proxy-level test sets a budget whose
// floor wins, so this one alone holds the percent rule end to end.
func TestRetryBudgetPercentWins(t *testing.T) {
	res := resDefaults(t)
	res.Breaker.Enabled = false
	res.Outlier.Enabled = false
	res.Retries.Attempts = 1
	res.Retries.Backoff = time.Millisecond
	// Floor: 1/s over 10s = 10 retries. Percent: 20% of the requests.
	res.Retries.Budget = config.Budget{Percent: 20, MinPerSecond: 1, Window: 10 * time.Second}
	nodes := resStartNodes(t, 2)
	s := resProxy(t, resAddrs(nodes), RouteConfig{Resilience: res})

	const good, bad = 100, 40
	for i := range good {
		if r := s.do(t, http.MethodGet, "/", nil); r.status != http.StatusOK {
			t.Fatalf("GET #%d: status %d, want 200", i, r.status)
		}
	}
	for _, n := range nodes {
		n.status.Store(http.StatusServiceUnavailable)
	}
	for range bad {
		s.do(t, http.MethodGet, "/", nil)
	}
	// The k-th failing request is retried when the retries so far are
	// under (100+k)*20/100: the first 25 are, then one in five as the
	// requests grow the budget, 28 of the 40 in all (20% of 140). With the
	// floor alone only 10 would be.
	retried := s.metric(t, "sidecar_retries_total", map[string]string{"reason": "status_503", "outcome": "retried"})
	refused := s.metric(t, "sidecar_retries_total", map[string]string{"reason": "status_503", "outcome": "budget_exhausted"})
	if retried != 28 || refused != 12 {
		t.Errorf("sidecar_retries_total{status_503} retried = %v, budget_exhausted = %v; want 28 and 12 (20%% of 140 requests, above the floor of 10)",
			retried, refused)
	}
}

// TestRetryBackoff: the delay before retry n is between half and all of
// base × 2^(n−1), doubling at most 6 times; no base, no delay.
func TestRetryBackoff(t *testing.T) {
	const base = 40 * time.Millisecond
	for n := 1; n <= 10; n++ {
		d := base << min(n-1, 6)
		for range 50 {
			if got := retryBackoff(base, n); got < d/2 || got > d {
				t.Fatalf("retryBackoff(%v, %d) = %v, want within [%v, %v]", base, n, got, d/2, d)
			}
		}
	}
	if got := retryBackoff(0, 3); got != 0 {
		t.Errorf("retryBackoff(0, 3) = %v, want 0", got)
	}
}
