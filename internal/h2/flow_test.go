package h2

// Regression tests of the HTTP/2 engine's defences against peers that
// stall flow control, flood control frames, reset streams as fast as they
// open them, or never end a header block (issue 23). Each attack is bounded
// in frames and time, and measured by the engine's own counters.

import (
	"bytes"
	"context"
	"errors"
	"io"
	"net"
	"net/http"
	"os"
	"sync"
	"syscall"
	"testing"
	"time"

	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"

	"github.com/sidecarlb/sidecar/internal/h2/h2test"
	"github.com/sidecarlb/sidecar/internal/httpwire"
	"github.com/sidecarlb/sidecar/internal/leakcheck"
)

// pipeListener hands the server one end of a net.Pipe per dial: a peer
// that does not read blocks the server's writes at once, with no socket
// buffer to fill first.
type pipeListener struct {
	conns chan net.Conn
	done  chan struct{}
	once  sync.Once
}

func newPipeListener() *pipeListener {
	return &pipeListener{conns: make(chan net.Conn), done: make(chan struct{})}
}

func (l *pipeListener) Accept() (net.Conn, error) {
	select {
	case c := <-l.conns:
		return c, nil
	case <-l.done:
		return nil, net.ErrClosed
	}
}

func (l *pipeListener) Close() error {
	l.once.Do(func() { close(l.done) })
	return nil
}

func (l *pipeListener) Addr() net.Addr { return pipeAddr{} }

type pipeAddr struct{}

func (pipeAddr) Network() string { return "pipe" }

func (pipeAddr) String() string { return "pipe" }

// dial returns the client's end of a new connection to the server.
func (l *pipeListener) dial(t *testing.T) net.Conn {
	t.Helper()
	client, server := net.Pipe()
	t.Cleanup(func() { client.Close() })
	select {
	case l.conns <- server:
	case <-time.After(5 * time.Second):
		t.Fatal("server did not accept")
	}
	return client
}

// soleH2ServerConn waits for s to have one HTTP/2 connection and returns
// it.
func soleH2ServerConn(t *testing.T, s *listenerServer) *serverConn {
	t.Helper()
	var sc *serverConn
	resWait(t, 5*time.Second, "the HTTP/2 connection", func() bool {
		s.h2.conns.Range(func(c *serverConn) { sc = c })
		return sc != nil
	})
	return sc
}

func (c *conn) sendWaitCount() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.sendWaits
}

func (c *conn) outLen() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return len(c.out)
}

// cpuTime is the process's user and system CPU time so far.
func cpuTime() time.Duration {
	var ru syscall.Rusage
	_ = syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// h2Stall is how long the flow-control tests leave a sender blocked.
const h2Stall = 300 * time.Millisecond

// TestH2FlowControlStallSleeps: a sender whose window is shut sleeps until
// the window opens, instead of waking with the writer over and over (a
// core's worth of CPU before): an app that sets SETTINGS_INITIAL_WINDOW_SIZE
// 0, an app that reads an answer without opening its window, and an upload
// to a node that does not open its window. Over the stall the sender waits
// once or not at all; once the window opens the transfer completes.
func TestH2FlowControlStallSleeps(t *testing.T) {
	leakcheck.Check(t)
	const answer = 1 << 20
	payload := h2test.RandomBytes(answer)
	for _, win := range []uint32{0, h2InitialWindow} {
		name := "server, app window 0"
		if win != 0 {
			name = "server, app never opens its window"
		}
		t.Run(name, func(t *testing.T) {
			srv := newListenerServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				_, _ = w.Write(payload)
			}), Options{}, testLogger(t))
			px := startProxyServerWith(t, srv)
			c := h2test.Dial(t, px.Listener.Addr().String(), false)
			_ = c.Fr.WriteSettings(http2.Setting{ID: http2.SettingInitialWindowSize, Val: win})
			_ = c.Fr.WriteWindowUpdate(0, 1<<30)
			c.Request(1, http.MethodGet, "/", true)
			c.Flush()
			s := c.Stream(1)
			c.MustRead(5*time.Second, "the window's worth of the answer", func() bool { return s.Status() != "" && len(s.Body) >= int(win) })
			sc := soleH2ServerConn(t, srv)
			resWait(t, 5*time.Second, "the handler to wait for the window", func() bool { return sc.sendWaitCount() > 0 })
			waits, cpu := sc.sendWaitCount(), cpuTime()
			time.Sleep(h2Stall)
			waits, cpu = sc.sendWaitCount()-waits, cpuTime()-cpu
			t.Logf("over a %v stall: %d waits, %v of CPU", h2Stall, waits, cpu)
			if waits > 1 {
				t.Errorf("handler's writes waited %d times over the stall, want at most once: nothing changed", waits)
			}
			_ = c.Fr.WriteWindowUpdate(1, answer)
			c.Flush()
			c.MustRead(5*time.Second, "the rest of the answer", func() bool { return s.Done })
			if !bytes.Equal(s.Body, payload) {
				t.Errorf("answer: %v, want the %d bytes written", s, answer)
			}
		})
	}
	t.Run("client, node never opens its window", func(t *testing.T) {
		node := h2test.StartRawNode(t, func(fr *http2.Framer, f *http2.MetaHeadersFrame) {
			_ = fr.WriteHeaders(http2.HeadersFrameParam{StreamID: f.StreamID, BlockFragment: []byte{0x88}, EndHeaders: true})
		})
		p := NewPool(time.Second, 0, nil, nil)
		t.Cleanup(p.Retire)
		ctx, cancel := context.WithCancel(context.Background())
		defer cancel()
		const upload = 4 << 20
		req, _ := http.NewRequestWithContext(ctx, http.MethodPost, "http://"+node.Addr+"/", bytes.NewReader(make([]byte, upload)))
		resp, err := p.RoundTrip(req)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		p.mu.Lock()
		cc := p.conns[0]
		p.mu.Unlock()
		resWait(t, 5*time.Second, "the upload to wait for the window", func() bool { return cc.sendWaitCount() > 0 })
		waits, cpu := cc.sendWaitCount(), cpuTime()
		time.Sleep(h2Stall)
		waits, cpu = cc.sendWaitCount()-waits, cpuTime()-cpu
		t.Logf("over a %v stall: %d waits, %v of CPU", h2Stall, waits, cpu)
		if waits > 1 {
			t.Errorf("upload waited %d times over the stall, want at most once: nothing changed", waits)
		}
		cancel()
		resWait(t, 5*time.Second, "the stream to end", func() bool {
			_, streams := cc.load()
			return streams == 0
		})
	})
}

// load counts cc's open and reserved streams.
func (cc *clientConn) load() (open, streams int) {
	cc.mu.Lock()
	defer cc.mu.Unlock()
	return len(cc.streams), len(cc.streams) + cc.reserved
}

// h2FloodFrames is how many frames a flood test sends at most: ten times
// the queue bound.
const h2FloodFrames = 10 * h2MaxQueuedControlFrames

// floodFrames writes preface (if any) and then frames made by frame, a
// batch at a time, to nc, until a write fails or h2FloodFrames went out.
// It returns how many went out and the error that stopped it.
func floodFrames(nc net.Conn, preface []byte, frame func(fr *http2.Framer, i int)) (sent int, err error) {
	var buf bytes.Buffer
	buf.Write(preface)
	fr := http2.NewFramer(&buf, nil)
	for sent < h2FloodFrames {
		for range 500 {
			frame(fr, sent)
			sent++
		}
		_ = nc.SetWriteDeadline(time.Now().Add(5 * time.Second))
		if _, err = nc.Write(buf.Bytes()); err != nil {
			return sent, err
		}
		buf.Reset()
	}
	return sent, nil
}

// TestH2ControlFrameFlood: a peer that sends frames each answered by a
// control frame (PING, SETTINGS, DATA on a closed stream) and never reads
// the answers has its connection closed once h2MaxQueuedControlFrames wait,
// on an app connection and on a node connection, with a stream open or
// not; what waits for the writer stays within the bound.
func TestH2ControlFrameFlood(t *testing.T) {
	leakcheck.Check(t)
	ping := func(fr *http2.Framer, i int) { _ = fr.WritePing(false, [8]byte{}) }
	settings := func(fr *http2.Framer, i int) { _ = fr.WriteSettings() }
	// Each answered by RST_STREAM: the stream's request ended.
	closedData := func(fr *http2.Framer, i int) { _ = fr.WriteData(1, false, nil) }
	tests := []struct {
		name  string
		open  bool // a stream stays open
		frame func(fr *http2.Framer, i int)
	}{
		{"PING", false, ping},
		{"PING, stream open", true, ping},
		{"SETTINGS", false, settings},
		{"DATA on a closed stream", false, closedData},
	}
	for _, tc := range tests {
		t.Run("server, "+tc.name, func(t *testing.T) {
			release := make(chan struct{})
			defer close(release)
			srv := newListenerServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				if r.URL.Path == "/open" {
					<-release
				}
			}), Options{}, testLogger(t))
			ln := newPipeListener()
			serveOn(t, srv, ln)
			nc := ln.dial(t)
			var pre bytes.Buffer
			pre.WriteString(http2.ClientPreface)
			fr := http2.NewFramer(&pre, nil)
			_ = fr.WriteSettings()
			path := "/"
			if tc.open {
				path = "/open"
			}
			_ = fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 1, BlockFragment: requestBlock(path), EndHeaders: true, EndStream: true})
			if _, err := nc.Write(pre.Bytes()); err != nil {
				t.Fatal(err)
			}
			sc := soleH2ServerConn(t, srv)
			sent, err := floodFrames(nc, nil, tc.frame)
			if err == nil {
				t.Fatalf("connection took %d frames and is still open, want it closed past %d unread answers", sent, h2MaxQueuedControlFrames)
			}
			resWait(t, 5*time.Second, "the connection to close", func() bool {
				conns, _, _ := h2ServerLoad(srv)
				return conns == 0
			})
			// The SETTINGS and answer the server sent first, and each frame
			// within the bound; the largest, RST_STREAM and PING acks, take
			// 13 and 17 bytes.
			if n := sc.outLen(); n > (h2MaxQueuedControlFrames+1)*17+1<<10 {
				t.Errorf("%d bytes waited for the writer, want at most %d frames' worth", n, h2MaxQueuedControlFrames)
			}
			t.Logf("closed after %d frames, %d bytes queued", sent, sc.outLen())
		})
	}
	t.Run("client, PING", func(t *testing.T) {
		p := NewPool(time.Second, 0, nil, nil)
		sidecar, node := net.Pipe()
		t.Cleanup(func() {
			node.Close()
			sidecar.Close()
		})
		cc := p.start(sidecar)
		var pre bytes.Buffer
		_ = http2.NewFramer(&pre, nil).WriteSettings()
		sent, err := floodFrames(node, pre.Bytes(), ping)
		if err == nil {
			t.Fatalf("connection took %d PINGs and is still open, want it closed past %d unread answers", sent, h2MaxQueuedControlFrames)
		}
		select {
		case <-cc.done:
		case <-time.After(5 * time.Second):
			t.Fatal("node connection still open")
		}
		if n := cc.outLen(); n > (h2MaxQueuedControlFrames+1)*17+1<<10 {
			t.Errorf("%d bytes waited for the writer, want at most %d frames' worth", n, h2MaxQueuedControlFrames)
		}
	})
}

// requestBlock is the HPACK block of a GET of path.
func requestBlock(path string) []byte {
	var buf bytes.Buffer
	enc := hpack.NewEncoder(&buf)
	for _, f := range [][2]string{{":method", "GET"}, {":scheme", "http"}, {":authority", "x"}, {":path", path}} {
		_ = enc.WriteField(hpack.HeaderField{Name: f[0], Value: f[1]})
	}
	return buf.Bytes()
}

// TestH2WriteStall: a peer that stops reading while the sidecar writes to
// it has its connection closed once no byte moved for h2WriteStall, though
// a stream is open and the idle timeout never comes: an app that does not
// read its answer, and a node that does not read its request.
func TestH2WriteStall(t *testing.T) {
	leakcheck.Check(t)
	stall := h2WriteStall
	h2WriteStall = 100 * time.Millisecond
	t.Cleanup(func() { h2WriteStall = stall })
	payload := make([]byte, 4*h2MaxOutBuffer)

	t.Run("server", func(t *testing.T) {
		wrote := make(chan error, 1)
		srv := newListenerServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			_, err := w.Write(payload)
			wrote <- err
		}), Options{IdleTimeout: time.Hour}, testLogger(t))
		ln := newPipeListener()
		serveOn(t, srv, ln)
		nc := ln.dial(t)
		var buf bytes.Buffer
		buf.WriteString(http2.ClientPreface)
		fr := http2.NewFramer(&buf, nil)
		_ = fr.WriteSettings(http2.Setting{ID: http2.SettingInitialWindowSize, Val: 1 << 30})
		_ = fr.WriteWindowUpdate(0, 1<<30)
		_ = fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 1, BlockFragment: requestBlock("/"), EndHeaders: true, EndStream: true})
		if _, err := nc.Write(buf.Bytes()); err != nil {
			t.Fatal(err)
		}
		// And never reads.
		select {
		case err := <-wrote:
			if err == nil {
				t.Error("handler's write succeeded, want it to fail with the connection")
			}
		case <-time.After(10 * time.Second):
			t.Fatal("handler's write still blocked on a client that does not read")
		}
		resWait(t, 5*time.Second, "the connection to close", func() bool {
			conns, _, _ := h2ServerLoad(srv)
			return conns == 0
		})
	})
	t.Run("client", func(t *testing.T) {
		p := NewPool(time.Second, 0, nil, nil)
		sidecar, node := net.Pipe()
		t.Cleanup(func() {
			node.Close()
			sidecar.Close()
		})
		cc := p.start(sidecar) // the preface alone blocks: the node reads nothing
		select {
		case <-cc.done:
		case <-time.After(10 * time.Second):
			t.Fatal("node connection still open, its writer blocked")
		}
		if err := cc.err; !errors.Is(err, os.ErrDeadlineExceeded) {
			t.Errorf("connection failed with %v, want the write deadline", err)
		}
	})
}

// TestH2NodeStreamNotOpenedAfterCancel: a request whose context ended
// before its stream opened never reaches the node, and the connection
// serves the next request.
func TestH2NodeStreamNotOpenedAfterCancel(t *testing.T) {
	leakcheck.Check(t)
	node := h2test.StartRawNode(t, func(fr *http2.Framer, f *http2.MetaHeadersFrame) {
		_ = fr.WriteHeaders(http2.HeadersFrameParam{StreamID: f.StreamID, BlockFragment: []byte{0x88}, EndHeaders: true, EndStream: true})
	})
	p := NewPool(time.Second, 0, nil, nil)
	t.Cleanup(p.Retire)
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	req, _ := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+node.Addr+"/", nil)
	cc, err := p.conn(context.Background(), node.Addr)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := cc.roundTrip(req); !errors.Is(err, context.Canceled) {
		t.Errorf("roundTrip() error = %v, want context.Canceled", err)
	}
	req, _ = http.NewRequest(http.MethodGet, "http://"+node.Addr+"/", nil)
	resp, err := p.RoundTrip(req)
	if err != nil {
		t.Fatal(err)
	}
	_, _ = io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	if got := node.Headers.Load(); got != 1 {
		t.Errorf("node got %d requests, want 1: the cancelled one opened a stream", got)
	}
	if _, streams := cc.load(); streams != 0 {
		t.Errorf("%d streams open or reserved, want none", streams)
	}
}

// TestH2HeaderBlockBounds: a header block is bounded in CONTINUATION frames
// and in bytes on the wire whatever it decodes to, and in time by the
// read-header timeout: CONTINUATION frames that are empty, or hold nothing
// but HPACK table-size updates, end the connection once past the bound, as
// does a block left unfinished. A long block in many frames within the
// bounds is served.
func TestH2HeaderBlockBounds(t *testing.T) {
	leakcheck.Check(t)
	updates := bytes.Repeat([]byte{0x20}, h2DefaultFrame) // table size 0, each
	tests := []struct {
		name string
		// CONTINUATION frames sent, without END_HEADERS: exactly as many
		// as the server reads before it ends the connection, so that none
		// is left unread for a TCP reset to overtake its GOAWAY.
		frames int
		frag   []byte // of each
		code   http2.ErrCode
	}{
		{"empty CONTINUATION frames", h2MaxContinuations, nil, http2.ErrCodeEnhanceYourCalm},
		{"table-size updates", 2*httpwire.DefaultMaxHeaderBytes/h2DefaultFrame + 1, updates, http2.ErrCodeProtocol}, // twice the header list bound on the wire
		{"one-byte table-size updates", h2MaxContinuations, []byte{0x20}, http2.ErrCodeEnhanceYourCalm},
	}
	srv := newListenerServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		io.WriteString(w, r.Header.Get("X-Long"))
	}), Options{ReadHeaderTimeout: 2 * time.Second, IdleTimeout: time.Hour}, testLogger(t))
	px := startProxyServerWith(t, srv)
	addr := px.Listener.Addr().String()
	ready := func(t *testing.T) *h2test.RawConn {
		c := h2test.Dial(t, addr, true)
		// Nothing the client answers may come between the block's frames.
		c.MustRead(5*time.Second, "the server's SETTINGS", func() bool { return c.Settings && c.ConnWindow })
		return c
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			c := ready(t)
			// Table-size updates are valid only before the block's first
			// field.
			_ = c.Fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 1})
			for range tc.frames {
				_ = c.Fr.WriteContinuation(1, false, tc.frag)
			}
			c.Flush()
			if err := c.ReadUntil(5*time.Second, func() bool { return false }); errors.Is(err, os.ErrDeadlineExceeded) {
				t.Fatalf("connection still open after %d CONTINUATION frames", tc.frames)
			}
			if c.GoAway == nil || c.GoAway.ErrCode != tc.code {
				t.Errorf("GOAWAY %+v (read: %v), want %v", c.GoAway, c.Err, tc.code)
			}
		})
	}
	t.Run("unfinished block", func(t *testing.T) {
		c := ready(t)
		_ = c.Fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 1, BlockFragment: requestBlock("/")})
		c.Flush()
		if err := c.ReadUntil(10*time.Second, func() bool { return false }); errors.Is(err, os.ErrDeadlineExceeded) {
			t.Fatal("connection still open with a header block unfinished past the read-header timeout")
		}
	})
	t.Run("long block within the bounds", func(t *testing.T) {
		c := ready(t)
		long := string(bytes.Repeat([]byte("a"), httpwire.DefaultMaxHeaderBytes/2))
		c.Request(1, http.MethodGet, "/", true, "x-long", long) // 16 KiB frames
		c.Flush()
		s := c.Stream(1)
		c.MustRead(5*time.Second, "the answer", func() bool { return s.Done })
		if s.Status() != "200" || string(s.Body) != long {
			t.Errorf("answer: %v, want 200 and the header's %d bytes", s, len(long))
		}
	})
}

// TestH2NodeStreamWindowOverflow: a node whose WINDOW_UPDATE takes a
// stream's send window past 2^31-1 breaks flow control (RFC 9113, 6.9.1):
// the pool resets that stream with FLOW_CONTROL_ERROR and fails its
// request, as the server does an app's stream.
func TestH2NodeStreamWindowOverflow(t *testing.T) {
	leakcheck.Check(t)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	rst := make(chan http2.ErrCode, 1)
	h2test.AcceptEach(t, ln, func(nc net.Conn) {
		preface := make([]byte, len(http2.ClientPreface))
		if _, err := io.ReadFull(nc, preface); err != nil {
			return
		}
		fr := http2.NewFramer(nc, nc)
		fr.ReadMetaHeaders = hpack.NewDecoder(4096, nil)
		_ = fr.WriteSettings()
		for {
			f, err := fr.ReadFrame()
			if err != nil {
				return
			}
			switch f := f.(type) {
			case *http2.SettingsFrame:
				if !f.IsAck() {
					_ = fr.WriteSettingsAck()
				}
			case *http2.MetaHeadersFrame:
				// 65,535 + 2^31-1: past the largest window.
				_ = fr.WriteWindowUpdate(f.StreamID, 1<<31-1)
			case *http2.RSTStreamFrame:
				select {
				case rst <- f.ErrCode:
				default:
				}
			}
		}
	})
	p := NewPool(time.Second, 0, nil, nil)
	t.Cleanup(p.Retire)
	pr, pw := io.Pipe() // a body still being sent: the stream stays open
	t.Cleanup(func() { pw.Close() })
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	req, _ := http.NewRequestWithContext(ctx, http.MethodPost, "http://"+ln.Addr().String()+"/", pr)
	req.ContentLength = -1
	resp, err := p.RoundTrip(req)
	if err == nil {
		resp.Body.Close()
		t.Fatalf("roundTrip() = %d, nil; want an error", resp.StatusCode)
	}
	if ctx.Err() != nil {
		t.Fatalf("roundTrip() error = %v only when the request timed out, want the stream failed at once", err)
	}
	select {
	case code := <-rst:
		if code != http2.ErrCodeFlowControl {
			t.Errorf("node got RST_STREAM %v, want FLOW_CONTROL_ERROR", code)
		}
	case <-time.After(5 * time.Second):
		t.Error("node got no RST_STREAM")
	}
}

// TestOutflow: a send window grows by WINDOW_UPDATE increments and SETTINGS
// changes up to 2^31-1 and no further, shrinks below zero on a smaller
// SETTINGS_INITIAL_WINDOW_SIZE, and is spent by what is sent.
func TestOutflow(t *testing.T) {
	tests := []struct {
		name    string
		start   outflow
		add     int64
		wantOK  bool
		wantNow int64
	}{
		{"an increment", 65535, 1000, true, 66535},
		{"up to the maximum", 65535, maxWindow - 65535, true, maxWindow},
		{"one past the maximum", 65535, maxWindow - 65535 + 1, false, maxWindow + 1},
		{"an increment of 2^31-1 on an open window", 1, maxWindow, false, maxWindow + 1},
		{"a shrinking SETTINGS below zero", 100, -65535, true, 100 - 65535},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			w := tc.start
			if ok := w.add(tc.add); ok != tc.wantOK || w.available() != tc.wantNow {
				t.Errorf("outflow(%d).add(%d) = %v, available %d; want %v, %d", tc.start, tc.add, ok, w.available(), tc.wantOK, tc.wantNow)
			}
		})
	}
	w := outflow(100)
	w.take(60)
	if got := w.available(); got != 40 {
		t.Errorf("outflow(100) after take(60): available() = %d, want 40", got)
	}
}
