package h2

// The peers the engine's tests run against: Go's h2c server and client,
// raw framers as app or node (rawH2, rawH2Node), and the listener's server
// as the proxy builds it (listenerServer). proxy/h2_test.go keeps a copy of
// the raw framers for the tests on the proxy's path.

import (
	"bufio"
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/sidecarlb/sidecar/internal/h1"
	"github.com/sidecarlb/sidecar/internal/httpserver"
	"github.com/sidecarlb/sidecar/internal/wait"
	"go.uber.org/zap"
	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"
)

// h2Node is a Go HTTP server speaking HTTP/1.1 and h2c with prior knowledge
// on loopback. It counts the connections it accepts and those it closed.
type h2Node struct {
	addr    string
	accepts atomic.Int64
	closes  atomic.Int64
}

// startH2CNode serves h until the test ends, with conf as its HTTP/2
// settings when not nil.
func startH2CNode(t testing.TB, h http.Handler, conf *http.HTTP2Config) *h2Node {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	n := &h2Node{addr: ln.Addr().String()}
	protocols := new(http.Protocols)
	protocols.SetHTTP1(true)
	protocols.SetUnencryptedHTTP2(true)
	srv := &http.Server{Handler: h, Protocols: protocols, HTTP2: conf}
	done := make(chan struct{})
	go func() {
		defer close(done)
		_ = srv.Serve(&trackingListener{Listener: ln, n: n})
	}()
	t.Cleanup(func() {
		srv.Close()
		<-done
	})
	return n
}

type trackingListener struct {
	net.Listener
	n *h2Node
}

func (l *trackingListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err != nil {
		return nil, err
	}
	l.n.accepts.Add(1)
	return &trackedConn{Conn: c, n: l.n}, nil
}

type trackedConn struct {
	net.Conn
	n    *h2Node
	once sync.Once
}

func (c *trackedConn) Close() error {
	c.once.Do(func() { c.n.closes.Add(1) })
	return c.Conn.Close()
}

// h2cClient returns a client speaking h2c with prior knowledge, with conf
// as its HTTP/2 settings when not nil.
func h2cClient(t testing.TB, conf *http.HTTP2Config) *http.Client {
	protocols := new(http.Protocols)
	protocols.SetUnencryptedHTTP2(true)
	tr := &http.Transport{Protocols: protocols, HTTP2: conf, DisableCompression: true}
	t.Cleanup(tr.CloseIdleConnections)
	return &http.Client{Transport: tr, Timeout: time.Minute}
}

func randomBytes(n int) []byte {
	b := make([]byte, n)
	_, _ = rand.Read(b)
	return b
}

// echoNode streams the request body back as it reads it, and says which
// protocol reached it.
var echoNode = http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
	w.Header().Set("X-Node-Proto", r.Proto)
	w.Header().Set("Content-Type", "application/octet-stream")
	_, _ = io.Copy(w, r.Body)
})

// rawH2 is an app connection driven frame by frame.
type rawH2 struct {
	t    testing.TB
	nc   net.Conn
	fr   *http2.Framer
	wbuf bytes.Buffer // frames not yet written: flush sends them in one write
	enc  *hpack.Encoder
	hbuf bytes.Buffer

	streams    map[uint32]*rawResp
	settings   bool // the server's SETTINGS came
	connWindow bool // the server's connection WINDOW_UPDATE came
	maxStreams uint32
	goAway     *http2.GoAwayFrame
	err        error // the read side failed: io.EOF once the server closed
}

// rawResp is what came on one stream.
type rawResp struct {
	header, trailer []hpack.HeaderField
	body            []byte
	dataFrames      int
	rst             *http2.ErrCode
	done            bool // END_STREAM or RST_STREAM came
}

func (r *rawResp) field(fields []hpack.HeaderField, name string) string {
	for _, f := range fields {
		if f.Name == name {
			return f.Value
		}
	}
	return ""
}

func (r *rawResp) status() string { return r.field(r.header, ":status") }

func (r *rawResp) String() string {
	rst := "none"
	if r.rst != nil {
		rst = r.rst.String()
	}
	return fmt.Sprintf("status %q, %d body bytes in %d DATA frames, done %v, RST_STREAM %s",
		r.status(), len(r.body), r.dataFrames, r.done, rst)
}

// dialRawH2 connects to addr and sends the client preface, and with
// settings a SETTINGS frame and windows wide enough that the test never
// needs to send WINDOW_UPDATE.
func dialRawH2(t testing.TB, addr string, settings bool) *rawH2 {
	t.Helper()
	nc, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { nc.Close() })
	c := &rawH2{t: t, nc: nc, streams: make(map[uint32]*rawResp)}
	c.fr = http2.NewFramer(&c.wbuf, bufio.NewReader(nc))
	c.fr.ReadMetaHeaders = hpack.NewDecoder(4096, nil)
	c.fr.MaxHeaderListSize = 16 << 20
	c.enc = hpack.NewEncoder(&c.hbuf)
	c.wbuf.WriteString(http2.ClientPreface)
	if settings {
		_ = c.fr.WriteSettings(http2.Setting{ID: http2.SettingInitialWindowSize, Val: 1 << 30})
		_ = c.fr.WriteWindowUpdate(0, 1<<30)
	}
	c.flush()
	return c
}

// flush writes the frames buffered so far in one write. Errors are left to
// the read side to see.
func (c *rawH2) flush() {
	_ = c.nc.SetWriteDeadline(time.Now().Add(10 * time.Second))
	_, _ = c.nc.Write(c.wbuf.Bytes())
	c.wbuf.Reset()
}

// headers buffers a header block of name, value pairs on stream id.
func (c *rawH2) headers(id uint32, end bool, fields ...string) {
	c.hbuf.Reset()
	for i := 0; i+1 < len(fields); i += 2 {
		_ = c.enc.WriteField(hpack.HeaderField{Name: fields[i], Value: fields[i+1]})
	}
	block := c.hbuf.Bytes()
	for first := true; first || len(block) > 0; first = false {
		n := min(len(block), 16<<10)
		frag := block[:n]
		block = block[n:]
		if first {
			_ = c.fr.WriteHeaders(http2.HeadersFrameParam{StreamID: id, BlockFragment: frag, EndStream: end, EndHeaders: len(block) == 0})
		} else {
			_ = c.fr.WriteContinuation(id, len(block) == 0, frag)
		}
	}
}

// request buffers a request header block for path on stream id.
func (c *rawH2) request(id uint32, method, path string, end bool, extra ...string) {
	fields := append([]string{":method", method, ":scheme", "http", ":authority", "echo", ":path", path}, extra...)
	c.headers(id, end, fields...)
}

func (c *rawH2) stream(id uint32) *rawResp {
	s := c.streams[id]
	if s == nil {
		s = &rawResp{}
		c.streams[id] = s
	}
	return s
}

// read handles the server's frames until done reports true, the
// connection fails, or within passes.
func (c *rawH2) read(within time.Duration, done func() bool) error {
	deadline := time.Now().Add(within)
	for !done() {
		if c.err != nil {
			return c.err
		}
		_ = c.nc.SetReadDeadline(deadline)
		f, err := c.fr.ReadFrame()
		if err != nil {
			if !errors.Is(err, os.ErrDeadlineExceeded) {
				c.err = err
			}
			return err
		}
		c.handle(f)
	}
	return nil
}

// mustRead is read that fails the test when done does not come true.
func (c *rawH2) mustRead(within time.Duration, what string, done func() bool) {
	c.t.Helper()
	if err := c.read(within, done); err != nil {
		c.t.Fatalf("waiting for %s: %v", what, err)
	}
}

func (c *rawH2) handle(f http2.Frame) {
	switch f := f.(type) {
	case *http2.SettingsFrame:
		if !f.IsAck() {
			c.settings = true
			if v, ok := f.Value(http2.SettingMaxConcurrentStreams); ok {
				c.maxStreams = v
			}
			_ = c.fr.WriteSettingsAck()
			c.flush()
		}
	case *http2.WindowUpdateFrame:
		if f.StreamID == 0 {
			c.connWindow = true
		}
	case *http2.PingFrame:
		if !f.IsAck() {
			_ = c.fr.WritePing(true, f.Data)
			c.flush()
		}
	case *http2.GoAwayFrame:
		g := *f
		c.goAway = &g
	case *http2.MetaHeadersFrame:
		s := c.stream(f.StreamID)
		if s.header == nil {
			s.header = f.Fields
		} else {
			s.trailer = f.Fields
		}
		s.done = s.done || f.StreamEnded()
	case *http2.DataFrame:
		s := c.stream(f.StreamID)
		s.body = append(s.body, f.Data()...)
		s.dataFrames++
		s.done = s.done || f.StreamEnded()
	case *http2.RSTStreamFrame:
		s := c.stream(f.StreamID)
		code := f.ErrCode
		s.rst = &code
		s.done = true
	}
}

// rawH2Node is a node driven frame by frame: answer decides what each
// request's HEADERS get. It counts the request HEADERS it received, and
// passes on the codes of the GOAWAY frames it received, as many as goAway
// holds.
type rawH2Node struct {
	addr    string
	headers atomic.Int64
	goAway  chan http2.ErrCode
}

func startRawH2Node(t testing.TB, answer func(fr *http2.Framer, f *http2.MetaHeadersFrame)) *rawH2Node {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	n := &rawH2Node{addr: ln.Addr().String(), goAway: make(chan http2.ErrCode, 16)}
	acceptEach(t, ln, func(nc net.Conn) { n.serve(nc, answer) })
	return n
}

// acceptEach serves each connection ln accepts with serve, on a goroutine
// of its own, and closes the connection when serve returns. The test's
// cleanup closes ln and every connection still open, and waits for the
// goroutines.
func acceptEach(t testing.TB, ln net.Listener, serve func(net.Conn)) {
	var (
		wg     sync.WaitGroup
		mu     sync.Mutex
		conns  = make(map[net.Conn]struct{})
		closed bool
	)
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			nc, err := ln.Accept()
			if err != nil {
				return
			}
			mu.Lock()
			if closed {
				mu.Unlock()
				nc.Close()
				return
			}
			conns[nc] = struct{}{}
			wg.Add(1)
			mu.Unlock()
			go func() {
				defer wg.Done()
				defer nc.Close()
				serve(nc)
			}()
		}
	}()
	t.Cleanup(func() {
		ln.Close()
		mu.Lock()
		closed = true
		for nc := range conns {
			nc.Close()
		}
		mu.Unlock()
		wg.Wait()
	})
}

func (n *rawH2Node) serve(nc net.Conn, answer func(*http2.Framer, *http2.MetaHeadersFrame)) {
	preface := make([]byte, len(http2.ClientPreface))
	if _, err := io.ReadFull(nc, preface); err != nil || string(preface) != http2.ClientPreface {
		return
	}
	fr := http2.NewFramer(nc, nc)
	fr.ReadMetaHeaders = hpack.NewDecoder(4096, nil)
	if err := fr.WriteSettings(); err != nil {
		return
	}
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
		case *http2.PingFrame:
			if !f.IsAck() {
				_ = fr.WritePing(true, f.Data)
			}
		case *http2.MetaHeadersFrame:
			n.headers.Add(1)
			answer(fr, f)
		case *http2.GoAwayFrame:
			select {
			case n.goAway <- f.ErrCode:
			default:
			}
		}
	}
}

// h2ConnErrorCases are frames that commit a connection error other than
// PROTOCOL_ERROR, sent by a client to the sidecar or by a node to it, and
// the code the sidecar's GOAWAY must carry (RFC 9113, 5.4.1). stream is the
// stream of a request whose body is still open.
var h2ConnErrorCases = []struct {
	name string
	send func(fr *http2.Framer, stream uint32)
	code http2.ErrCode
}{
	{"frame over the maximum frame size", func(fr *http2.Framer, stream uint32) {
		// The sidecar never raises SETTINGS_MAX_FRAME_SIZE from 16 KiB.
		_ = fr.WriteData(stream, false, make([]byte, h2DefaultFrame+1))
	}, http2.ErrCodeFrameSize},
	{"connection window update past 2^31-1", func(fr *http2.Framer, _ uint32) {
		_ = fr.WriteWindowUpdate(0, 1<<31-1)
	}, http2.ErrCodeFlowControl},
	{"initial window size past 2^31-1", func(fr *http2.Framer, _ uint32) {
		_ = fr.WriteSettings(http2.Setting{ID: http2.SettingInitialWindowSize, Val: 1 << 31})
	}, http2.ErrCodeFlowControl},
	{"initial window change taking a stream's window past 2^31-1", func(fr *http2.Framer, stream uint32) {
		// Whatever the window was, one more byte on the stream and then
		// the largest initial window put it one past the maximum (RFC
		// 9113, 6.9.2). Nothing was sent on the stream yet.
		_ = fr.WriteWindowUpdate(stream, 1)
		_ = fr.WriteSettings(http2.Setting{ID: http2.SettingInitialWindowSize, Val: 1<<31 - 1})
	}, http2.ErrCodeFlowControl},
	{"undecodable header block", func(fr *http2.Framer, stream uint32) {
		// An indexed field of index 0, which no table holds.
		_ = fr.WriteHeaders(http2.HeadersFrameParam{StreamID: stream, BlockFragment: []byte{0x80}, EndHeaders: true})
	}, http2.ErrCodeCompression},
	{"ping of 7 bytes", func(fr *http2.Framer, _ uint32) {
		_ = fr.WriteRawFrame(http2.FramePing, 0, 0, make([]byte, 7))
	}, http2.ErrCodeFrameSize},
}

// panicConn is a connection that panics on its first write (onWrite) or on
// its first read after the HTTP/2 preface, as a faulty wrapper of the
// socket might.
type panicConn struct {
	net.Conn
	onWrite bool
	read    int
}

func (c *panicConn) Read(p []byte) (int, error) {
	if !c.onWrite && c.read >= len(http2.ClientPreface) {
		panic("read boom")
	}
	n, err := c.Conn.Read(p[:min(len(p), len(http2.ClientPreface)-c.read)])
	c.read += n
	return n, err
}

func (c *panicConn) Write(p []byte) (int, error) {
	if c.onWrite {
		panic("write boom")
	}
	return c.Conn.Write(p)
}

// panicListener wraps the connections it accepts in a panicConn while
// mode is "read" or "write".
type panicListener struct {
	net.Listener
	mode atomic.Value // string
}

func (l *panicListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err != nil {
		return nil, err
	}
	switch l.mode.Load() {
	case "read":
		return &panicConn{Conn: c}, nil
	case "write":
		return &panicConn{Conn: c, onWrite: true}, nil
	}
	return c, nil
}

// panicReader panics on its first read.
type panicReader struct{}

func (panicReader) Read([]byte) (int, error) { panic("body boom") }

// testServer is a listener's server under test, which counts the
// connections it accepts.
type testServer struct {
	URL      string
	Listener net.Listener
	accepts  atomic.Int64
}

type countingListener struct {
	net.Listener
	n *atomic.Int64
}

func (l *countingListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err == nil {
		l.n.Add(1)
	}
	return c, err
}

// startProxyServerWith serves srv on a loopback listener until the test
// ends.
func startProxyServerWith(t testing.TB, srv *listenerServer) *testServer {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	s := &testServer{}
	s.Listener = &countingListener{Listener: ln, n: &s.accepts}
	s.URL = "http://" + ln.Addr().String()
	done := make(chan struct{})
	go func() {
		defer close(done)
		_ = srv.Serve(s.Listener)
	}()
	t.Cleanup(func() {
		srv.Close()
		<-done
	})
	return s
}

func testLogger(testing.TB) *zap.Logger { return zap.NewNop() }

type response struct {
	status  int
	header  http.Header
	trailer http.Header
	body    string
}

func do(t testing.TB, c *http.Client, req *http.Request) response {
	t.Helper()
	resp, err := c.Do(req)
	if err != nil {
		t.Fatalf("%s %s: %v", req.Method, req.URL, err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatalf("%s %s: read body: %v", req.Method, req.URL, err)
	}
	return response{status: resp.StatusCode, header: resp.Header, trailer: resp.Trailer, body: string(body)}
}

func doGet(t testing.TB, c *http.Client, url string, header http.Header) response {
	t.Helper()
	req, err := http.NewRequest(http.MethodGet, url, nil)
	if err != nil {
		t.Fatal(err)
	}
	for k, vv := range header {
		req.Header[k] = vv
	}
	return do(t, c, req)
}

// listenerServer is a listener's server as the proxy builds one: the
// httpserver sniff in front of an h1.Server and the HTTP/2 Server under
// test, whose requests' context ends with Shutdown or Close.
type listenerServer struct {
	*httpserver.Server
	h2   *Server
	stop context.CancelFunc
}

func newListenerServer(h http.Handler, opts Options, log *zap.Logger) *listenerServer {
	ctx, stop := context.WithCancel(context.Background())
	h2s := NewServer(ctx, h, opts, log)
	h1s := h1.NewServer(ctx, h, h1.Options{ReadHeaderTimeout: opts.ReadHeaderTimeout,
		IdleTimeout: opts.IdleTimeout, MaxHeaderBytes: opts.MaxHeaderBytes}, log)
	hs := httpserver.New(httpserver.Options{ReadHeaderTimeout: opts.ReadHeaderTimeout, H1: h1s, H2: h2s}, log)
	return &listenerServer{Server: hs, h2: h2s, stop: stop}
}

func (s *listenerServer) Shutdown(ctx context.Context) error {
	err := s.Server.Shutdown(ctx)
	s.stop()
	return err
}

func (s *listenerServer) Close() error {
	err := s.Server.Close()
	s.stop()
	return err
}

// h2ServerLoad counts the app connections of s, their open streams and
// their handlers not yet returned (a stream is held until its handler
// returns).
func h2ServerLoad(s *listenerServer) (conns, streams, running int) {
	conns, streams = s.h2.Load()
	return conns, streams, streams
}

// resWait is wait.For, under the name these tests were written with.
func resWait(t testing.TB, within time.Duration, what string, cond func() bool) {
	t.Helper()
	wait.For(t, within, what, cond)
}

// nodeHandler answers as examples/echo does: "NAME METHOD PATH" and an
// X-Instance header.
func nodeHandler(name string) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("X-Instance", name)
		_, _ = io.Copy(io.Discard, r.Body)
		fmt.Fprintf(w, "%s %s %s", name, r.Method, r.URL.Path)
	})
}
