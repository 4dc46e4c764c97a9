package h2

import (
	"errors"
	"io"
	"net/http"
	"os"
	"testing"
	"time"

	"golang.org/x/net/http2"

	"github.com/sidecarlb/sidecar/internal/h2/h2test"
	"github.com/sidecarlb/sidecar/internal/leakcheck"
)

// TestH2StreamStates: frames on a stream that is half-closed or closed get
// what RFC 9113, 5.1 and 5.3.1 say (the cases h2spec 5.1/6, 5.1/8, 5.1/9,
// 5.1/12, 5.1.1/2 and 5.3.1 check): a stream error STREAM_CLOSED after the
// client's END_STREAM or RST_STREAM, a connection error after a normal
// close or on a stream never opened, a stream error PROTOCOL_ERROR for a
// stream depending on itself; and frames the client sent before it saw
// the sidecar's own reset are ignored.
func TestH2StreamStates(t *testing.T) {
	leakcheck.Check(t)
	srv := newListenerServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		switch r.URL.Path {
		case "/hold": // answers once the client is gone, or the body ends
			w.WriteHeader(http.StatusOK)
			w.(http.Flusher).Flush()
			_, _ = io.Copy(io.Discard, r.Body)
			<-r.Context().Done()
		case "/early": // answers without reading the body
		default:
			_, _ = io.Copy(io.Discard, r.Body)
			io.WriteString(w, "ok")
		}
	}), Options{}, testLogger(t))
	px := startProxyServerWith(t, srv)
	get := func(path string) []string {
		return []string{":method", "GET", ":scheme", "http", ":authority", "echo", ":path", path}
	}
	const (
		rst    = iota // RST_STREAM on stream 1, then stream 3 is served
		goAway        // GOAWAY, and the connection closes
		served        // no reset: stream 3 is served
	)
	tests := []struct {
		name string
		send func(c *h2test.RawConn)
		end  int
		code http2.ErrCode
	}{
		{"headers on a half-closed (remote) stream", func(c *h2test.RawConn) {
			c.Headers(1, true, get("/hold")...)
			c.Headers(1, true, "x-trailer", "1")
		}, rst, http2.ErrCodeStreamClosed},
		{"data after the client's reset", func(c *h2test.RawConn) {
			c.Headers(1, false, get("/hold")...)
			_ = c.Fr.WriteRSTStream(1, http2.ErrCodeCancel)
			_ = c.Fr.WriteData(1, true, []byte("test"))
		}, rst, http2.ErrCodeStreamClosed},
		{"headers after the client's reset", func(c *h2test.RawConn) {
			c.Headers(1, false, get("/hold")...)
			_ = c.Fr.WriteRSTStream(1, http2.ErrCodeCancel)
			c.Headers(1, true, "x-trailer", "1")
		}, rst, http2.ErrCodeStreamClosed},
		{"headers on a stream the client reset, once its handler returned", func(c *h2test.RawConn) {
			c.Headers(1, false, get("/hold")...)
			c.Flush()
			s := c.Stream(1)
			c.MustRead(5*time.Second, "the answer's header", func() bool { return s.Header != nil })
			_ = c.Fr.WriteRSTStream(1, http2.ErrCodeCancel)
			c.Flush()
			resWait(t, 5*time.Second, "the handler to return", func() bool {
				_, streams, _ := h2ServerLoad(srv)
				return streams == 0
			})
			c.Headers(1, true, "x-trailer", "1")
		}, rst, http2.ErrCodeStreamClosed},
		{"headers on a stream closed normally", func(c *h2test.RawConn) {
			c.Headers(1, true, get("/ok")...)
			c.Flush()
			s := c.Stream(1)
			c.MustRead(5*time.Second, "the answer", func() bool { return s.Done })
			c.Headers(1, true, get("/ok")...)
		}, goAway, http2.ErrCodeStreamClosed},
		{"headers on a lower stream never opened", func(c *h2test.RawConn) {
			c.Headers(5, true, get("/ok")...)
			c.Headers(3, true, get("/ok")...)
		}, goAway, http2.ErrCodeProtocol},
		{"trailers after the sidecar's reset", func(c *h2test.RawConn) {
			c.Headers(1, false, get("/early")...)
			c.Flush()
			s := c.Stream(1)
			c.MustRead(5*time.Second, "the early answer and its reset", func() bool { return s.RST != nil })
			c.Streams[1] = nil
			c.Headers(1, true, "x-trailer", "1")
		}, served, 0},
		{"headers depending on their own stream", func(c *h2test.RawConn) {
			_ = c.Fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 1, BlockFragment: c.HeaderBlock(get("/ok")...),
				EndStream: true, EndHeaders: true, Priority: http2.PriorityParam{StreamDep: 1, Weight: 15}})
		}, rst, http2.ErrCodeProtocol},
		{"priority depending on its own stream", func(c *h2test.RawConn) {
			_ = c.Fr.WritePriority(1, http2.PriorityParam{StreamDep: 1, Weight: 15})
		}, rst, http2.ErrCodeProtocol},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			c := h2test.Dial(t, px.Listener.Addr().String(), true)
			tc.send(c)
			c.Flush()
			switch tc.end {
			case goAway:
				c.MustRead(5*time.Second, "GOAWAY", func() bool { return c.GoAway != nil })
				if c.GoAway.ErrCode != tc.code {
					t.Errorf("GOAWAY %v, want %v", c.GoAway.ErrCode, tc.code)
				}
				if err := c.ReadUntil(5*time.Second, func() bool { return false }); errors.Is(err, os.ErrDeadlineExceeded) {
					t.Errorf("connection still open after GOAWAY %v", c.GoAway.ErrCode)
				}
				return
			case rst:
				s := c.Stream(1)
				c.MustRead(5*time.Second, "RST_STREAM", func() bool { return s.RST != nil || c.GoAway != nil })
				if c.GoAway != nil || *s.RST != tc.code {
					t.Fatalf("stream 1: %v, GOAWAY %v; want RST_STREAM %v", s, c.GoAway, tc.code)
				}
			}
			c.Headers(7, true, get("/ok")...)
			c.Flush()
			s := c.Stream(7)
			c.MustRead(5*time.Second, "the next answer", func() bool { return s.Done || c.GoAway != nil })
			if c.GoAway != nil || s.Status() != "200" || string(s.Body) != "ok" {
				t.Fatalf("next request: %v, GOAWAY %v; want 200 ok on the same connection", s, c.GoAway)
			}
			if s := c.Streams[1]; tc.end == served && s != nil {
				t.Errorf("stream 1 after the sidecar's reset: %v, want nothing", s)
			}
		})
	}
}

// TestH2ClientGoAwayThenPing: frames a client sends after its GOAWAY, on a
// connection with no stream open, are still handled (h2spec 7/1 sends a
// PING after a GOAWAY and wants its ACK, or a clean close): the PING is
// answered, and the connection closes once the client stops sending. The
// sidecar used to close at the GOAWAY, with the PING unread; when the PING
// reached its socket first, the close was a reset the client saw as an
// error.
func TestH2ClientGoAwayThenPing(t *testing.T) {
	leakcheck.Check(t)
	srv := newListenerServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {}), Options{}, testLogger(t))
	px := startProxyServerWith(t, srv)
	c := h2test.Dial(t, px.Listener.Addr().String(), true)
	_ = c.Fr.WriteGoAway(0, 0xff, nil)
	data := [8]byte{'h', '2', 's', 'p', 'e', 'c'}
	_ = c.Fr.WritePing(false, data)
	c.Flush()
	var ack bool
	for c.Err == nil && !ack {
		_ = c.NC.SetReadDeadline(time.Now().Add(5 * time.Second))
		f, err := c.Fr.ReadFrame()
		if err != nil {
			t.Fatalf("waiting for the PING's ACK: %v", err)
		}
		if p, ok := f.(*http2.PingFrame); ok && p.IsAck() && p.Data == data {
			ack = true
		}
	}
	if err := c.ReadUntil(5*time.Second, func() bool { return false }); !errors.Is(err, io.EOF) {
		t.Errorf("after the PING's ACK: %v, want the connection closed", err)
	}
}
