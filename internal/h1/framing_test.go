package h1

import (
	"io"
	"log"
	"net"
	"net/http"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/sidecarlb/sidecar/internal/leakcheck"
)

// These tests send raw bytes to the HTTP/1.1 server and check which of
// them become requests: the keep-alive decision and the body's framing
// decide what a proxy would otherwise run as a request nobody sent
// (request smuggling).

// rawSession writes raw to addr in one write, then reads answers until the
// server closes the connection, and returns their statuses. It fails the
// test if the connection is still open after h1tTimeout.
func rawSession(t *testing.T, addr, raw string) []int {
	t.Helper()
	c, br := h1tDial(t, addr)
	wrote := make(chan struct{})
	go func() {
		defer close(wrote)
		_, _ = io.WriteString(c, raw) // the server may close before reading it all
	}()
	defer func() {
		c.Close()
		<-wrote
	}()
	var codes []int
	for {
		if _, err := br.Peek(1); err != nil {
			if h1tIsTimeout(err) {
				t.Fatalf("connection still open after answers %v", codes)
			}
			return codes
		}
		resp, err := http.ReadResponse(br, nil)
		if err != nil {
			t.Fatalf("after answers %v: ReadResponse: %v", codes, err)
		}
		_, err = io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		if h1tIsTimeout(err) {
			t.Fatalf("connection still open in the body of answer %d after %v", resp.StatusCode, codes)
		}
		codes = append(codes, resp.StatusCode)
	}
}

// TestH1ServerFramingAtLeastAsStrictAsNetHTTP sends the same bytes to the
// sidecar's HTTP/1.1 server and to net/http's, and holds the sidecar to
// running no request net/http would not: the requests its handler sees
// (method, target, body) are the first of those net/http's handler sees,
// and the connection closes where net/http's does, if not sooner.
func TestH1ServerFramingAtLeastAsStrictAsNetHTTP(t *testing.T) {
	leakcheck.Check(t)
	heads := []string{
		"GET /a HTTP/1.1\r\nHost: h\r\n\r\n",
		"GET /a HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n",
		"GET /a HTTP/1.1\r\nHost: h\r\nConnection: keep-alive, close\r\n\r\n",
		"GET /a HTTP/1.0\r\n\r\n",
		"GET /a HTTP/1.0\r\nConnection: keep-alive\r\n\r\n",
		"GET /a HTTP/1.0\r\nConnection: Keep-Alive\r\nTransfer-Encoding: chunked\r\n\r\n",
		"POST /a HTTP/1.0\r\nConnection: keep-alive\r\nContent-Length: 3\r\n\r\n",
		"POST /a HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\n\r\n",
		"POST /a HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\n",
		"POST /a HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n",
		"POST /a HTTP/1.1\r\nHost: h\r\nContent-Length: +3\r\n\r\n",
		"POST /a HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n",
		"POST /a HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n",
		"POST /a HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: Chunked\r\n\r\n",
		"POST /a HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked, identity\r\n\r\n",
		"POST /a HTTP/1.1\r\nHost: h\r\nTransfer-Encoding : chunked\r\n\r\n",
		"POST /a HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: \x0bchunked\r\n\r\n",
		"POST /a HTTP/1.1\r\nHost: h\r\nX: y\r\n Transfer-Encoding: chunked\r\n\r\n",
		"POST /a HTTP/1.1\nHost: h\nTransfer-Encoding: chunked\n\n",
		"POST /a HTTP/1.1\r\nHost: h\rTransfer-Encoding: chunked\r\n\r\n",
		"GET /a HTTP/1.1\r\nHost: h\r\nX: a\r\n\tb\r\n\r\n",
	}
	bodies := []string{"", "abc", "3\r\nabc\r\n0\r\n\r\n", "0\r\n\r\n"}
	const next = "GET /next HTTP/1.1\r\nHost: h\r\n\r\n"

	record := func(mu *sync.Mutex, seen *[]string) http.Handler {
		return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			b, _ := io.ReadAll(r.Body)
			mu.Lock()
			*seen = append(*seen, r.Method+" "+r.RequestURI+" "+string(b))
			mu.Unlock()
			io.WriteString(w, "ok")
		})
	}
	var smu, nmu sync.Mutex
	var sSeen, nSeen []string
	sidecar := h1tStart(t, record(&smu, &sSeen), Options{})
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	std := &http.Server{Handler: record(&nmu, &nSeen), ErrorLog: log.New(io.Discard, "", 0)}
	served := make(chan struct{})
	go func() {
		defer close(served)
		_ = std.Serve(ln)
	}()
	t.Cleanup(func() {
		std.Close()
		<-served
	})

	// exchange sends raw and ends its side; the server answers what it
	// runs and closes. It returns the requests the handler saw.
	exchange := func(addr, raw string, mu *sync.Mutex, seen *[]string) []string {
		mu.Lock()
		*seen = nil
		mu.Unlock()
		c, err := net.DialTimeout("tcp", addr, h1tTimeout)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		_ = c.SetDeadline(time.Now().Add(h1tTimeout))
		_, _ = io.WriteString(c, raw)
		_ = c.(*net.TCPConn).CloseWrite()
		if _, err := io.Copy(io.Discard, c); h1tIsTimeout(err) {
			t.Fatalf("%s: %q: connection still open", addr, raw)
		}
		mu.Lock()
		defer mu.Unlock()
		return slices.Clone(*seen)
	}
	stricter := 0
	for _, h := range heads {
		for _, b := range bodies {
			// A request after the body shows where the server thinks the
			// body ends, and whether it kept the connection.
			raw := h + b + next
			got := exchange(sidecar.addr, raw, &smu, &sSeen)
			want := exchange(ln.Addr().String(), raw, &nmu, &nSeen)
			if len(got) > len(want) || !slices.Equal(got, want[:len(got)]) {
				t.Errorf("%q:\nsidecar ran %q\nnet/http ran %q", raw, got, want)
			}
			if len(got) < len(want) {
				stricter++
				t.Logf("%q: sidecar ran %q, net/http %q", raw, got, want)
			}
		}
	}
	t.Logf("stricter than net/http on %d of %d inputs", stricter, len(heads)*len(bodies))
}

// TestScanHead checks the scan of a head's framing fields that
// http.ReadRequest hides, fed byte by byte as a slow client sends it.
func TestScanHead(t *testing.T) {
	cases := []struct {
		head   string
		te, cl bool
	}{
		{"GET / HTTP/1.0\r\n\r\n", false, false},
		{"GET / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n", true, false},
		{"GET / HTTP/1.0\r\ntransfer-ENCODING:chunked\r\n\r\n", true, false},
		{"GET / HTTP/1.1\nContent-Length: 1\nTransfer-Encoding: chunked\n\n", true, true},
		{"GET / HTTP/1.1\r\nX: a\r\n Transfer-Encoding: chunked\r\n\r\n", false, false},
		{"GET / HTTP/1.1\r\nX-Transfer-Encoding: chunked\r\nContent-Lengths: 1\r\n\r\n", false, false},
		{"GET / HTTP/1.1\r\nTransfer-Encoding : chunked\r\n\r\n", false, false},
		{"GET /Transfer-Encoding: HTTP/1.1\r\n\r\nTransfer-Encoding: chunked\r\n\r\n", false, false},
	}
	for _, tc := range cases {
		var f headFraming
		done := false
		for n := 0; n <= len(tc.head) && !done; n++ {
			done = scanHead([]byte(tc.head[:n]), &f)
		}
		if !done || !f.known || f.te != tc.te || f.cl != tc.cl {
			t.Errorf("scanHead(%q) = done %v, %+v; want te %v, cl %v", tc.head, done, f, tc.te, tc.cl)
		}
	}
}

// TestH1ServerUnscannableHeadCloses: a head too long to be scanned whole
// leaves its framing unsure, so an HTTP/1.0 keep-alive request with one is
// answered and its connection closed.
func TestH1ServerUnscannableHeadCloses(t *testing.T) {
	leakcheck.Check(t)
	st := h1tStart(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		io.WriteString(w, "ok")
	}), Options{})
	big := "X-Big: " + strings.Repeat("a", 2*bufSize) + "\r\n"
	codes := rawSession(t, st.addr, "GET /a HTTP/1.0\r\nConnection: keep-alive\r\n"+big+"\r\nGET /b HTTP/1.0\r\n\r\n")
	if !slices.Equal(codes, []int{200}) {
		t.Fatalf("answers %v, want [200] and the connection closed", codes)
	}
}

// TestH1ServerMaxHeaderBytes: a request head longer than MaxHeaderBytes,
// counted from the request line to the blank line, is answered 431 on the
// fast path and on net/http's alike; one of exactly the limit is served.
func TestH1ServerMaxHeaderBytes(t *testing.T) {
	leakcheck.Check(t)
	var calls atomic.Int64
	h := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		calls.Add(1)
		_, _ = io.Copy(io.Discard, r.Body)
		io.WriteString(w, "ok")
	})
	small := h1tStart(t, h, Options{MaxHeaderBytes: 4096})
	dflt := h1tStart(t, h, Options{})
	// head returns a head of exactly n bytes: start, a padding field, the
	// blank line.
	head := func(start string, n int) string {
		pad := n - len(start) - len("X-Pad: \r\n\r\n")
		return start + "X-Pad: " + strings.Repeat("p", pad) + "\r\n\r\n"
	}
	const fast = "GET / HTTP/1.1\r\nHost: svc\r\nConnection: close\r\n"
	const slow = "POST / HTTP/1.1\r\nHost: svc\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n"
	const http10 = "GET / HTTP/1.0\r\n"
	cases := []struct {
		name string
		addr string
		raw  string
		code int
	}{
		{"fast path at the limit", small.addr, head(fast, 4096), 200},
		{"fast path over the limit", small.addr, head(fast, 4097), 431},
		{"chunked at the limit", small.addr, head(slow, 4096) + "0\r\n\r\n", 200},
		{"chunked over the limit", small.addr, head(slow, 4097) + "0\r\n\r\n", 431},
		{"HTTP/1.0 at the limit", small.addr, head(http10, 4096), 200},
		{"HTTP/1.0 over the limit", small.addr, head(http10, 4097), 431},
		{"default: 60 KiB", dflt.addr, head(fast, 60<<10), 200},
		{"default: over 60 KiB", dflt.addr, head(fast, 60<<10+1), 431},
		{"default: 200 KiB in many fields", dflt.addr, fast + strings.Repeat("X-Many: "+strings.Repeat("m", 100)+"\r\n", 2000) + "\r\n", 431},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			before := calls.Load()
			codes := rawSession(t, tc.addr, tc.raw)
			if !slices.Equal(codes, []int{tc.code}) {
				t.Fatalf("answers %v, want [%d]", codes, tc.code)
			}
			if ran := calls.Load() - before; (ran == 1) != (tc.code == 200) {
				t.Fatalf("handler ran %d times for a %d", ran, tc.code)
			}
		})
	}
}

// TestH1ServerCloseDecidedOnRead: the server keeps or closes a connection
// by what the client sent, whatever the handler does to the request (the
// proxy clears Close on it for the node's request).
func TestH1ServerCloseDecidedOnRead(t *testing.T) {
	leakcheck.Check(t)
	var ran atomic.Int64
	st := h1tStart(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		ran.Add(1)
		r.Close = false
		io.WriteString(w, "ok")
	}), Options{})
	for _, raw := range []string{
		"GET /a HTTP/1.1\r\nHost: svc\r\nConnection: close\r\n\r\nGET /b HTTP/1.1\r\nHost: svc\r\n\r\n",
		"GET /a HTTP/1.0\r\n\r\nGET /b HTTP/1.0\r\n\r\n",
	} {
		before := ran.Load()
		if codes := rawSession(t, st.addr, raw); !slices.Equal(codes, []int{200}) || ran.Load()-before != 1 {
			t.Errorf("%q: answers %v, handler ran %d times; want one answer, then the connection closed", raw, codes, ran.Load()-before)
		}
	}
}
