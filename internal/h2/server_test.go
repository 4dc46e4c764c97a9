package h2

// Tests of the sidecar's own HTTP/2 engine (conn.go, server.go,
// client.go): real Go h2c peers where the behaviour is end to end, and raw
// framers, as client or node, where a test needs frames the Go peers never
// send or must see exactly which frames the sidecar sends.

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zaptest/observer"
	"golang.org/x/net/http2"

	"github.com/sidecarlb/sidecar/internal/h2/h2test"
	"github.com/sidecarlb/sidecar/internal/leakcheck"
)

// TestH2IdleStreamFrames: RST_STREAM or WINDOW_UPDATE on a stream the app
// never opened (an idle stream) is a connection error of type
// PROTOCOL_ERROR (RFC 9113, 5.1 and 6.4): the sidecar answers GOAWAY and
// closes. On a stream that was opened and has since closed, the same frames
// may still be in flight when it ends, and are ignored.
func TestH2IdleStreamFrames(t *testing.T) {
	leakcheck.Check(t)
	srv := newListenerServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		io.WriteString(w, "ok")
	}), Options{}, testLogger(t))
	px := startProxyServerWith(t, srv)
	tests := []struct {
		name string
		send func(c *h2test.RawConn) // after stream 1 was answered
		idle bool
	}{
		{"rst on the closed stream", func(c *h2test.RawConn) { _ = c.Fr.WriteRSTStream(1, http2.ErrCodeCancel) }, false},
		{"window update on the closed stream", func(c *h2test.RawConn) { _ = c.Fr.WriteWindowUpdate(1, 1024) }, false},
		{"rst on an idle stream", func(c *h2test.RawConn) { _ = c.Fr.WriteRSTStream(3, http2.ErrCodeCancel) }, true},
		{"rst far past the last stream", func(c *h2test.RawConn) { _ = c.Fr.WriteRSTStream(1001, http2.ErrCodeCancel) }, true},
		{"rst on an even stream", func(c *h2test.RawConn) { _ = c.Fr.WriteRSTStream(2, http2.ErrCodeCancel) }, true},
		{"window update on an idle stream", func(c *h2test.RawConn) { _ = c.Fr.WriteWindowUpdate(3, 1024) }, true},
		{"window update on an even stream", func(c *h2test.RawConn) { _ = c.Fr.WriteWindowUpdate(2, 1024) }, true},
		// An increment of 0 is a stream error (6.9), but on an idle stream
		// still a connection error.
		{"zero window update on the closed stream", func(c *h2test.RawConn) {
			c.Fr.AllowIllegalWrites = true
			_ = c.Fr.WriteWindowUpdate(1, 0)
		}, false},
		{"zero window update on an idle stream", func(c *h2test.RawConn) {
			c.Fr.AllowIllegalWrites = true
			_ = c.Fr.WriteWindowUpdate(3, 0)
		}, true},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			c := h2test.Dial(t, px.Listener.Addr().String(), true)
			c.Request(1, http.MethodGet, "/first", true)
			c.Flush()
			s := c.Stream(1)
			c.MustRead(5*time.Second, "the first answer", func() bool { return s.Done })
			if s.Status() != "200" {
				t.Fatalf("first request: %v, want 200", s)
			}
			tc.send(c)
			if !tc.idle {
				c.Request(3, http.MethodGet, "/next", true)
			}
			c.Flush()
			if !tc.idle {
				s := c.Stream(3)
				c.MustRead(5*time.Second, "the next answer", func() bool { return s.Done || c.GoAway != nil })
				if c.GoAway != nil || s.Status() != "200" || string(s.Body) != "ok" {
					t.Fatalf("next request: %v, GOAWAY %v; want 200 ok on the same connection", s, c.GoAway)
				}
				return
			}
			c.MustRead(5*time.Second, "GOAWAY", func() bool { return c.GoAway != nil })
			if c.GoAway.ErrCode != http2.ErrCodeProtocol || c.GoAway.LastStreamID != 1 {
				t.Errorf("GOAWAY %v, last stream %d; want PROTOCOL_ERROR, 1", c.GoAway.ErrCode, c.GoAway.LastStreamID)
			}
			if err := c.ReadUntil(5*time.Second, func() bool { return false }); errors.Is(err, os.ErrDeadlineExceeded) {
				t.Error("connection still open after GOAWAY")
			}
		})
	}
}

// TestH2ConnectionErrorCodes: a client's connection error is answered with
// a GOAWAY carrying that error's code, not always PROTOCOL_ERROR, and the
// connection closes.
func TestH2ConnectionErrorCodes(t *testing.T) {
	leakcheck.Check(t)
	srv := newListenerServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		_, _ = io.Copy(io.Discard, r.Body)
	}), Options{}, testLogger(t))
	px := startProxyServerWith(t, srv)
	for _, tc := range h2test.ConnErrorCases {
		t.Run(tc.Name, func(t *testing.T) {
			c := h2test.Dial(t, px.Listener.Addr().String(), true)
			c.Request(1, http.MethodPost, "/upload", false)
			tc.Send(c.Fr, 1)
			c.Flush()
			c.MustRead(5*time.Second, "GOAWAY", func() bool { return c.GoAway != nil })
			if c.GoAway.ErrCode != tc.Code {
				t.Errorf("GOAWAY %v, want %v", c.GoAway.ErrCode, tc.Code)
			}
			if err := c.ReadUntil(5*time.Second, func() bool { return false }); errors.Is(err, os.ErrDeadlineExceeded) {
				t.Error("connection still open after GOAWAY")
			}
		})
	}
}

// TestH2ConnectionWindowOverrun: DATA past the connection's window, each
// frame within its stream's window and the maximum frame size, is answered
// with GOAWAY(FLOW_CONTROL_ERROR) (RFC 9113, 6.9.1). The handlers do not
// read, so the sidecar grants nothing past its first window.
func TestH2ConnectionWindowOverrun(t *testing.T) {
	leakcheck.Check(t)
	release := make(chan struct{})
	defer close(release)
	srv := newListenerServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		<-release
	}), Options{}, testLogger(t))
	px := startProxyServerWith(t, srv)
	c := h2test.Dial(t, px.Listener.Addr().String(), true)
	streams := h2ConnWindow/h2StreamWindow + 1
	for i := range streams {
		c.Request(uint32(2*i+1), http.MethodPost, "/upload", false)
	}
	chunk := make([]byte, h2DefaultFrame)
	for range h2StreamWindow / h2DefaultFrame {
		for i := range streams {
			_ = c.Fr.WriteData(uint32(2*i+1), false, chunk)
		}
	}
	c.Flush()
	c.MustRead(10*time.Second, "GOAWAY", func() bool { return c.GoAway != nil })
	if c.GoAway.ErrCode != http2.ErrCodeFlowControl {
		t.Errorf("GOAWAY %v, want %v", c.GoAway.ErrCode, http2.ErrCodeFlowControl)
	}
}

// shutdownHandler answers /slow with 1 MiB once release is closed,
// announcing on started that it began, and anything else at once.
func shutdownHandler(payload []byte, started chan<- struct{}, release <-chan struct{}) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path != "/slow" {
			io.WriteString(w, "fast")
			return
		}
		started <- struct{}{}
		select {
		case <-release:
		case <-r.Context().Done():
			return
		}
		w.Write(payload)
	})
}

// TestH2ServerShutdown: Shutdown sends GOAWAY, refuses new streams, lets
// the stream in flight finish with its whole body, and returns once it has.
func TestH2ServerShutdown(t *testing.T) {
	leakcheck.Check(t)
	payload := h2test.RandomBytes(1 << 20)
	started, release := make(chan struct{}, 1), make(chan struct{})
	srv := newListenerServer(shutdownHandler(payload, started, release), Options{}, testLogger(t))
	px := startProxyServerWith(t, srv)
	var once sync.Once
	t.Cleanup(func() { once.Do(func() { close(release) }) })

	c := h2test.Dial(t, px.Listener.Addr().String(), true)
	c.Request(1, http.MethodGet, "/slow", true)
	c.Flush()
	select {
	case <-started:
	case <-time.After(10 * time.Second):
		t.Fatal("the handler never started")
	}
	shut := make(chan error, 1)
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
		defer cancel()
		shut <- srv.Shutdown(ctx)
	}()
	c.MustRead(5*time.Second, "GOAWAY", func() bool { return c.GoAway != nil })
	if g := c.GoAway; g.LastStreamID != 1 || g.ErrCode != http2.ErrCodeNo {
		t.Errorf("GOAWAY last stream %d, %v; want 1, NO_ERROR", g.LastStreamID, g.ErrCode)
	}
	c.Request(3, http.MethodGet, "/fast", true)
	c.Flush()
	s3 := c.Stream(3)
	c.MustRead(5*time.Second, "the new stream's end", func() bool { return s3.Done })
	if s3.RST == nil || *s3.RST != http2.ErrCodeRefusedStream {
		t.Errorf("stream opened after GOAWAY: %v, want RST_STREAM REFUSED_STREAM", s3)
	}
	select {
	case err := <-shut:
		t.Fatalf("Shutdown() = %v with a stream in flight, want it to wait", err)
	default:
	}

	once.Do(func() { close(release) })
	s1 := c.Stream(1)
	c.MustRead(10*time.Second, "the stream in flight to finish", func() bool { return s1.Done })
	if s1.Status() != "200" || s1.RST != nil || !bytes.Equal(s1.Body, payload) {
		t.Errorf("stream in flight: %v, want 200 and all %d bytes", s1, len(payload))
	}
	select {
	case err := <-shut:
		if err != nil {
			t.Errorf("Shutdown() = %v, want nil", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("Shutdown() did not return once the last stream ended")
	}
	if err := c.ReadUntil(5*time.Second, func() bool { return false }); errors.Is(err, os.ErrDeadlineExceeded) {
		t.Error("connection still open after Shutdown")
	}
}

// TestH2ServerClose: Close ends the app connections at once, and the
// handlers' requests with them.
func TestH2ServerClose(t *testing.T) {
	leakcheck.Check(t)
	started, ended := make(chan struct{}, 1), make(chan struct{})
	srv := newListenerServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		started <- struct{}{}
		select {
		case <-r.Context().Done():
			close(ended)
		case <-time.After(20 * time.Second):
		}
	}), Options{}, testLogger(t))
	px := startProxyServerWith(t, srv)
	c := h2test.Dial(t, px.Listener.Addr().String(), true)
	c.Request(1, http.MethodGet, "/", true)
	c.Flush()
	select {
	case <-started:
	case <-time.After(10 * time.Second):
		t.Fatal("the handler never started")
	}
	if err := srv.Close(); err != nil {
		t.Errorf("Close() = %v", err)
	}
	if err := c.ReadUntil(5*time.Second, func() bool { return false }); errors.Is(err, os.ErrDeadlineExceeded) {
		t.Error("connection still open after Close")
	}
	select {
	case <-ended:
	case <-time.After(5 * time.Second):
		t.Error("handler's request context did not end after Close")
	}
}

// TestH2ServerIdleTimeout: a connection with no stream open for the idle
// timeout gets GOAWAY and is closed; one with a stream open longer than that
// is left alone.
func TestH2ServerIdleTimeout(t *testing.T) {
	leakcheck.Check(t)
	const idle = 100 * time.Millisecond
	started, release := make(chan struct{}, 1), make(chan struct{})
	srv := newListenerServer(shutdownHandler([]byte("slow"), started, release), Options{IdleTimeout: idle}, testLogger(t))
	px := startProxyServerWith(t, srv)
	var once sync.Once
	t.Cleanup(func() { once.Do(func() { close(release) }) })

	c := h2test.Dial(t, px.Listener.Addr().String(), true)
	c.Request(1, http.MethodGet, "/slow", true)
	c.Flush()
	<-started
	s1 := c.Stream(1)
	if err := c.ReadUntil(3*idle, func() bool { return c.GoAway != nil || s1.Done }); !errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("with a stream open past the idle timeout: %v, GOAWAY %v; want the connection left alone", err, c.GoAway)
	}
	once.Do(func() { close(release) })
	c.MustRead(5*time.Second, "the answer", func() bool { return s1.Done })
	if s1.Status() != "200" || string(s1.Body) != "slow" {
		t.Errorf("answer: %v, want 200 slow", s1)
	}
	c.MustRead(5*time.Second, "GOAWAY", func() bool { return c.GoAway != nil })
	if g := c.GoAway; g.ErrCode != http2.ErrCodeNo || g.LastStreamID != 1 {
		t.Errorf("GOAWAY last stream %d, %v; want 1, NO_ERROR", g.LastStreamID, g.ErrCode)
	}
	if err := c.ReadUntil(5*time.Second, func() bool { return false }); errors.Is(err, os.ErrDeadlineExceeded) {
		t.Error("idle connection still open after GOAWAY")
	}
}

// TestH2MaxConcurrentStreams: the server announces 1000 concurrent
// streams; past that, streams are refused at once with REFUSED_STREAM while
// the first 1000 run.
func TestH2MaxConcurrentStreams(t *testing.T) {
	leakcheck.Check(t)
	release := make(chan struct{})
	var running, peak atomic.Int64
	srv := newListenerServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		n := running.Add(1)
		for p := peak.Load(); n > p && !peak.CompareAndSwap(p, n); p = peak.Load() {
		}
		<-release
		running.Add(-1)
		io.WriteString(w, "ok")
	}), Options{}, testLogger(t))
	px := startProxyServerWith(t, srv)
	var once sync.Once
	t.Cleanup(func() { once.Do(func() { close(release) }) })

	c := h2test.Dial(t, px.Listener.Addr().String(), true)
	const extra = 100
	for i := range h2MaxStreams + extra {
		c.Request(uint32(2*i+1), http.MethodGet, "/", true)
	}
	c.Flush()
	refused := func() (ids []uint32) {
		for id, s := range c.Streams {
			if s.RST != nil && *s.RST == http2.ErrCodeRefusedStream {
				ids = append(ids, id)
			}
		}
		slices.Sort(ids)
		return ids
	}
	c.MustRead(10*time.Second, "the excess streams refused", func() bool { return len(refused()) >= extra })
	resWait(t, 10*time.Second, "1000 handlers running", func() bool { return running.Load() == h2MaxStreams })
	if c.MaxStreams != h2MaxStreams {
		t.Errorf("SETTINGS_MAX_CONCURRENT_STREAMS = %d, want %d", c.MaxStreams, h2MaxStreams)
	}
	if ids := refused(); len(ids) != extra || ids[0] != 2*h2MaxStreams+1 {
		t.Errorf("refused %d streams from %v, want the last %d, from %d", len(ids), ids[:min(len(ids), 1)], extra, 2*h2MaxStreams+1)
	}
	once.Do(func() { close(release) })
	c.MustRead(20*time.Second, "every stream to end", func() bool {
		for i := range h2MaxStreams {
			if !c.Stream(uint32(2*i + 1)).Done {
				return false
			}
		}
		return true
	})
	for i := range h2MaxStreams {
		if s := c.Stream(uint32(2*i + 1)); s.Status() != "200" || string(s.Body) != "ok" {
			t.Fatalf("stream %d: %v, want 200 ok", 2*i+1, s)
		}
	}
	if p := peak.Load(); p != h2MaxStreams {
		t.Errorf("at most %d handlers ran at once, want %d", p, h2MaxStreams)
	}
}

// TestH2ResetFlood: a client that opens streams and resets them at once
// (rapid reset, CVE-2023-44487) cannot make the server run more than 1000
// handlers, even handlers that ignore the reset, and gets GOAWAY
// ENHANCE_YOUR_CALM once MaxEarlyResets more streams ended early than
// were answered, instead of REFUSED_STREAM for as long as it goes on. The
// server serves the next connection.
func TestH2ResetFlood(t *testing.T) {
	leakcheck.Check(t)
	release := make(chan struct{})
	var running, peak, calls atomic.Int64
	srv := newListenerServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/ok" {
			io.WriteString(w, "ok")
			return
		}
		calls.Add(1)
		n := running.Add(1)
		for p := peak.Load(); n > p && !peak.CompareAndSwap(p, n); p = peak.Load() {
		}
		<-release // deaf to the reset
		running.Add(-1)
	}), Options{}, testLogger(t))
	px := startProxyServerWith(t, srv)
	var once sync.Once
	t.Cleanup(func() { once.Do(func() { close(release) }) })

	c := h2test.Dial(t, px.Listener.Addr().String(), true)
	// Answered streams earn as many early ends.
	const answered = 10
	for i := range answered {
		c.Request(uint32(2*i+1), http.MethodGet, "/ok", true)
	}
	c.Flush()
	c.MustRead(5*time.Second, "the first answers", func() bool {
		for i := range answered {
			if !c.Stream(uint32(2*i + 1)).Done {
				return false
			}
		}
		return true
	})
	const opened = 3 * h2MaxStreams
	for i := range opened {
		id := uint32(2*(answered+i) + 1)
		c.Request(id, http.MethodGet, "/", true)
		_ = c.Fr.WriteRSTStream(id, http2.ErrCodeCancel)
		if i%100 == 99 {
			c.Flush()
		}
	}
	c.Flush()
	if err := c.ReadUntil(10*time.Second, func() bool { return false }); errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatal("connection still open after the flood")
	}
	if c.GoAway == nil || c.GoAway.ErrCode != http2.ErrCodeEnhanceYourCalm {
		t.Fatalf("GOAWAY %v, want ENHANCE_YOUR_CALM", c.GoAway)
	}
	// Refused streams and resets before the answer count alike; the
	// GOAWAY comes at the first past the bound.
	if last, want := c.GoAway.LastStreamID, uint32(2*(answered+MaxEarlyResets+answered)+1); last != want {
		t.Errorf("GOAWAY last stream %d, want %d: %d early ends allowed after %d answers", last, want, MaxEarlyResets+answered, answered)
	}
	if got := calls.Load(); got > h2MaxStreams {
		t.Errorf("handlers started = %d, want at most %d", got, h2MaxStreams)
	}
	if p := peak.Load(); p > h2MaxStreams {
		t.Errorf("%d handlers ran at once, want at most %d", p, h2MaxStreams)
	}
	once.Do(func() { close(release) })
	resWait(t, 10*time.Second, "the handlers to return", func() bool {
		_, _, r := h2ServerLoad(srv)
		return r == 0
	})
	c2 := h2test.Dial(t, px.Listener.Addr().String(), true)
	c2.Request(1, http.MethodGet, "/ok", true)
	c2.Flush()
	s := c2.Stream(1)
	c2.MustRead(5*time.Second, "the next connection's answer", func() bool { return s.Done })
	if s.Status() != "200" || string(s.Body) != "ok" {
		t.Errorf("next connection: %v, want 200 ok", s)
	}
}

// TestH2ConnPanics: a panic in an app connection's read loop or write
// loop is logged with its stack and closes that connection, as an I/O
// error would; the sidecar lives on and serves the next connection.
func TestH2ConnPanics(t *testing.T) {
	leakcheck.Check(t)
	core, logs := observer.New(zap.ErrorLevel)
	srv := newListenerServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		io.WriteString(w, "ok")
	}), Options{}, zap.New(core))
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	pl := &panicListener{Listener: ln}
	pl.mode.Store("")
	serveOn(t, srv, pl)
	for _, tc := range []struct{ mode, loop string }{{"read", "readLoop"}, {"write", "writeLoop"}} {
		mode := tc.mode
		t.Run(mode, func(t *testing.T) {
			pl.mode.Store(mode)
			c := h2test.Dial(t, ln.Addr().String(), true)
			c.Request(1, http.MethodGet, "/x", true)
			c.Flush()
			if err := c.ReadUntil(5*time.Second, func() bool { return false }); errors.Is(err, os.ErrDeadlineExceeded) {
				t.Error("connection still open after the panic")
			}
			resWait(t, 5*time.Second, "the panic logged", func() bool {
				return logs.FilterMessage("http2 connection panicked").Len() > 0
			})
			entry := logs.TakeAll()[0]
			if fields := entry.ContextMap(); fields["panic"] != mode+" boom" || !strings.Contains(fmt.Sprint(fields["stack"]), tc.loop) {
				t.Errorf("logged %q %v, want the panic and the stack of %s", entry.Message, fields, tc.loop)
			}
			pl.mode.Store("")
			if r := doGet(t, h2test.NewClient(t, nil), "http://"+ln.Addr().String()+"/x", nil); r.status != http.StatusOK || r.body != "ok" {
				t.Errorf("next connection: %d %q, want 200 ok", r.status, r.body)
			}
		})
	}
}

// TestH2RequestBodyPanics: a panic in the goroutine that sends a request
// body to a node, here in the body's Read, is logged with its stack and
// ends that stream only: the request fails, and the connection serves the
// next one.
func TestH2RequestBodyPanics(t *testing.T) {
	leakcheck.Check(t)
	node := h2test.StartH2C(t, h2test.EchoNode, nil)
	core, logs := observer.New(zap.ErrorLevel)
	p := NewPool(time.Second, 0, nil, zap.New(core))
	t.Cleanup(p.Retire)
	send := func(body io.Reader) (string, error) {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		req, _ := http.NewRequestWithContext(ctx, http.MethodPost, "http://"+node.Addr+"/r", body)
		req.ContentLength = -1
		resp, err := p.RoundTrip(req)
		if err != nil {
			return "", err
		}
		defer resp.Body.Close()
		b, err := io.ReadAll(resp.Body)
		return string(b), err
	}
	if _, err := send(panicReader{}); !errors.Is(err, errH2Panicked) {
		t.Errorf("request with a panicking body: error %v, want %v", err, errH2Panicked)
	}
	entries := logs.FilterMessage("http2 request body panicked").All()
	if len(entries) != 1 || entries[0].ContextMap()["panic"] != "body boom" ||
		!strings.Contains(fmt.Sprint(entries[0].ContextMap()["stack"]), "writeRest") {
		t.Errorf("logged %v, want one entry with the panic and its stack", logs.All())
	}
	if got, err := send(strings.NewReader("after")); err != nil || got != "after" {
		t.Errorf("next request = %q, %v; want the body echoed", got, err)
	}
	if got := node.Accepts.Load(); got != 1 {
		t.Errorf("node connections = %d, want 1: the panic ended only its stream", got)
	}
}
