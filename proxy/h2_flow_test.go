package proxy

// Regression tests of the HTTP/2 engine's defences against peers that
// stall flow control, flood control frames, reset streams as fast as they
// open them, or never end a header block (issue 23). Each attack is bounded
// in frames and time, and measured by the engine's own counters.

import (
	"errors"
	"net/http"
	"os"
	"testing"
	"time"

	"golang.org/x/net/http2"

	"github.com/sidecarlb/sidecar/internal/h2"
	"github.com/sidecarlb/sidecar/internal/h2/h2test"
	"github.com/sidecarlb/sidecar/internal/leakcheck"
)

// TestH2RapidResetNode: streams reset as soon as they open (rapid reset),
// by the app or by the server for the app's fault ("made you reset": a
// window overflow, a body longer than its content-length), end the app's
// connection with GOAWAY ENHANCE_YOUR_CALM and hardly reach the node: a
// stream reset before its handler started, or before its request went out,
// opens none there.
func TestH2RapidResetNode(t *testing.T) {
	leakcheck.Check(t)
	tests := []struct {
		name  string
		reset func(c *h2test.RawConn, id uint32)
	}{
		{"RST_STREAM", func(c *h2test.RawConn, id uint32) {
			c.Request(id, http.MethodGet, "/", true)
			_ = c.Fr.WriteRSTStream(id, http2.ErrCodeCancel)
		}},
		{"window overflow", func(c *h2test.RawConn, id uint32) {
			c.Request(id, http.MethodGet, "/", true)
			_ = c.Fr.WriteWindowUpdate(id, 1<<31-1)
		}},
		{"body past content-length", func(c *h2test.RawConn, id uint32) {
			c.Request(id, http.MethodPost, "/", false, "content-length", "1")
			c.Data(id, true, []byte("xx"))
		}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			node := h2test.StartRawNode(t, func(fr *http2.Framer, f *http2.MetaHeadersFrame) {
				_ = fr.WriteHeaders(http2.HeadersFrameParam{StreamID: f.StreamID, BlockFragment: []byte{0x88}, EndHeaders: true, EndStream: true})
			})
			sc := startH2Sidecar(t, staticCache(t, map[string][]string{"echo": {node.Addr}}),
				RouteConfig{Service: "echo", Protocol: "http2"}, ServerOptions{})
			c := h2test.Dial(t, sc.addr, true)
			const opened = 4 * h2.MaxEarlyResets
			for i := range opened {
				tc.reset(c, uint32(2*i+1))
				if i%100 == 99 {
					c.Flush()
				}
			}
			c.Flush()
			if err := c.ReadUntil(10*time.Second, func() bool { return false }); errors.Is(err, os.ErrDeadlineExceeded) {
				t.Fatal("connection still open after the rapid resets")
			}
			if c.GoAway == nil || c.GoAway.ErrCode != http2.ErrCodeEnhanceYourCalm {
				t.Fatalf("GOAWAY %+v, want ENHANCE_YOUR_CALM", c.GoAway)
			}
			// Some handler may start before the read loop reaches its
			// reset; a tenth is far beyond what the race gives.
			got := node.Headers.Load()
			t.Logf("node got %d of %d streams", got, (c.GoAway.LastStreamID+1)/2)
			if got > h2.MaxEarlyResets/10 {
				t.Errorf("node got %d streams, want at most %d: resets before the handler ran reach it", got, h2.MaxEarlyResets/10)
			}
		})
	}
}
