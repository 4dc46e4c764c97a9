package proxy

import (
	"io"
	"net"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/net/http2"

	"github.com/sidecarlb/sidecar/internal/h2/h2test"
	"github.com/sidecarlb/sidecar/internal/leakcheck"
)

// TestH2HPACKAmplificationBounded: a header field sent once into the HPACK
// dynamic table and then named by a one-byte index again and again decodes
// to far more than it costs on the wire. The HTTP/2 server bounds the
// decoded list by MaxHeaderBytes: such a request is answered 431 and never
// reaches the HTTP/1.1 node, and the connection serves the next request.
func TestH2HPACKAmplificationBounded(t *testing.T) {
	leakcheck.Check(t)
	var mu sync.Mutex
	var biggest, requests int
	// The node would take a header of up to 16 MiB: only the sidecar
	// stands between it and the amplified one.
	record := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		size := 0
		for k, vv := range r.Header {
			for _, v := range vv {
				size += len(k) + len(v) + 32
			}
		}
		mu.Lock()
		requests++
		biggest = max(biggest, size)
		mu.Unlock()
		io.WriteString(w, "ran")
	})
	node := startServerWith(t, record, &http.Server{Handler: record, MaxHeaderBytes: 16 << 20})
	sc := startH2Sidecar(t, staticCache(t, map[string][]string{"echo": {node.Listener.Addr().String()}}),
		RouteConfig{Service: "echo"}, ServerOptions{})

	c := h2test.Dial(t, sc.addr, true)
	value := strings.Repeat("a", 4000) // fits the 4096-byte dynamic table once
	var extra []string
	for range 200 {
		extra = append(extra, "x-amp", value)
	}
	c.Request(1, "GET", "/amp", true, extra...)
	wire := c.Buffered()
	c.Flush()
	c.MustRead(5*time.Second, "the answer to the amplified request", func() bool { return c.Stream(1).Done })
	decoded := 200 * (len("x-amp") + len(value) + 32)
	t.Logf("%d wire bytes (with the preface and SETTINGS) decode to a %d-byte header list", wire, decoded)
	if s := c.Stream(1); s.Status() != "431" || s.RST != nil {
		t.Errorf("amplified request: %v, want 431 and the stream ended", s)
	}
	c.Request(3, "GET", "/after", true)
	c.Flush()
	c.MustRead(5*time.Second, "the answer to the next request", func() bool { return c.Stream(3).Done })
	if s := c.Stream(3); s.Status() != "200" || string(s.Body) != "ran" {
		t.Errorf("next request on the connection: %v, body %q; want 200 \"ran\"", s, s.Body)
	}
	mu.Lock()
	defer mu.Unlock()
	if requests != 1 || biggest > DefaultMaxHeaderBytes {
		t.Errorf("node ran %d requests, the largest header %d bytes; want 1 of at most %d", requests, biggest, DefaultMaxHeaderBytes)
	}
}

// TestH2MaxHeaderBytesAdvertised: the HTTP/2 server tells the client its
// header list limit in SETTINGS_MAX_HEADER_LIST_SIZE, serves a request
// under it and answers one over it 431.
func TestH2MaxHeaderBytesAdvertised(t *testing.T) {
	leakcheck.Check(t)
	node := startServer(t, nodeHandler("n"))
	sc := startH2Sidecar(t, staticCache(t, map[string][]string{"echo": {node.Listener.Addr().String()}}),
		RouteConfig{Service: "echo"}, ServerOptions{MaxHeaderBytes: 8 << 10})

	nc, err := net.Dial("tcp", sc.addr)
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()
	_ = nc.SetDeadline(time.Now().Add(5 * time.Second))
	fr := http2.NewFramer(nc, nc)
	if _, err := io.WriteString(nc, http2.ClientPreface); err != nil {
		t.Fatal(err)
	}
	_ = fr.WriteSettings()
	f, err := fr.ReadFrame()
	if err != nil {
		t.Fatal(err)
	}
	sf, ok := f.(*http2.SettingsFrame)
	if !ok {
		t.Fatalf("first frame %v, want SETTINGS", f)
	}
	if v, ok := sf.Value(http2.SettingMaxHeaderListSize); !ok || v != 8<<10 {
		t.Errorf("SETTINGS_MAX_HEADER_LIST_SIZE = %d (sent %v), want %d", v, ok, 8<<10)
	}

	c := h2test.Dial(t, sc.addr, true)
	c.Request(1, "GET", "/ok", true, "x-small", strings.Repeat("s", 7<<10))
	c.Request(3, "GET", "/big", true, "x-big", strings.Repeat("b", 8<<10))
	c.Flush()
	c.MustRead(5*time.Second, "both answers", func() bool { return c.Stream(1).Done && c.Stream(3).Done })
	if s := c.Stream(1); s.Status() != "200" {
		t.Errorf("request under the limit: %v, want 200", s)
	}
	if s := c.Stream(3); s.Status() != "431" || s.RST != nil {
		t.Errorf("request over the limit: %v, want 431 and the stream ended", s)
	}
	// One not yet ended gets its answer, then RST_STREAM NO_ERROR: the
	// rest of its request is not wanted.
	c.Request(5, "POST", "/big", false, "x-big", strings.Repeat("b", 8<<10))
	c.Flush()
	c.MustRead(5*time.Second, "the answer and RST_STREAM", func() bool { return c.Stream(5).Done && c.Stream(5).RST != nil })
	if s := c.Stream(5); s.Status() != "431" || s.RST == nil || *s.RST != http2.ErrCodeNo {
		t.Errorf("request over the limit, its body to come: %v, want 431 and RST_STREAM NO_ERROR", s)
	}
	c.Request(7, "GET", "/ok", true)
	c.Flush()
	c.MustRead(5*time.Second, "the next answer", func() bool { return c.Stream(7).Done })
	if s := c.Stream(7); s.Status() != "200" {
		t.Errorf("next request on the connection: %v, want 200", s)
	}
}
