package proxy

// Tests of the sidecar's own HTTP/2 engine (internal/h2) on the proxy's
// path, route to node: real Go h2c peers where the behaviour is end to
// end, and raw framers, as client or node, where a test needs frames the
// Go peers never send or must see exactly which frames the sidecar sends.

import (
	"bufio"
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"

	"github.com/sidecarlb/sidecar/discovery"
	"github.com/sidecarlb/sidecar/internal/leakcheck"
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

// h2Sidecar is an upstream listener of the sidecar served by its own Server.
type h2Sidecar struct {
	*testServer
	srv  *Server
	px   *Proxy
	reg  *prometheus.Registry
	addr string
}

func startH2Sidecar(t testing.TB, resolver Resolver, cfg RouteConfig, opts ServerOptions) *h2Sidecar {
	t.Helper()
	reg := prometheus.NewRegistry()
	px := New(resolver, NewMetrics(reg), testLogger(t))
	h, err := px.Upstream("upstream", cfg)
	if err != nil {
		t.Fatalf("Upstream(%+v) error = %v", cfg, err)
	}
	srv := NewServer(h, opts, testLogger(t))
	ts := startProxyServerWith(t, srv)
	return &h2Sidecar{testServer: ts, srv: srv, px: px, reg: reg, addr: ts.Listener.Addr().String()}
}

func (s *h2Sidecar) metric(t testing.TB, name string, labels map[string]string) float64 {
	t.Helper()
	return (&resSetup{reg: s.reg}).metric(t, name, labels)
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

// h2ServerLoad counts the app connections of s, their open streams and
// their handlers not yet returned (a stream is held until its handler
// returns).
func h2ServerLoad(s *Server) (conns, streams, running int) {
	conns, streams = s.h2.Load()
	return conns, streams, streams
}

// h2PoolLoad counts the sidecar's h2c connections to nodes over every
// route of p, and the streams open or reserved on them.
func h2PoolLoad(p *Proxy) (conns, streams int) {
	p.mu.Lock()
	routes := slices.Clone(p.routes)
	p.mu.Unlock()
	for _, rt := range routes {
		st := rt.state.Load()
		if st == nil {
			continue
		}
		for _, e := range st.endpoints {
			if pl := e.pools.Load().h2c; pl != nil {
				c, s := pl.Load()
				conns += c
				streams += s
			}
		}
	}
	return conns, streams
}

func randomBytes(n int) []byte {
	b := make([]byte, n)
	_, _ = rand.Read(b)
	return b
}

func sha256Hex(b []byte) string {
	s := sha256.Sum256(b)
	return hex.EncodeToString(s[:])
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

// data buffers p as DATA frames on stream id.
func (c *rawH2) data(id uint32, end bool, p []byte) {
	for first := true; first || len(p) > 0; first = false {
		n := min(len(p), 16<<10)
		_ = c.fr.WriteData(id, end && n == len(p), p[:n])
		p = p[n:]
	}
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

// TestH2LargeBodies: 8 MiB uploads echoed back over h2c on both sides
// cross the sidecar's 256 KiB stream and 4 MiB connection windows many
// times over, one at a time and several at once on one app connection,
// and arrive intact.
func TestH2LargeBodies(t *testing.T) {
	leakcheck.Check(t)
	node := startH2CNode(t, echoNode, nil)
	sc := startH2Sidecar(t, staticCache(t, map[string][]string{"echo": {node.addr}}),
		RouteConfig{Service: "echo", Protocol: "http2"}, ServerOptions{})
	client := h2cClient(t, nil)

	echo := func(body io.Reader, want []byte) error {
		req, err := http.NewRequest(http.MethodPost, sc.URL+"/echo", body)
		if err != nil {
			return err
		}
		resp, err := client.Do(req)
		if err != nil {
			return err
		}
		defer resp.Body.Close()
		got, err := io.ReadAll(resp.Body)
		if err != nil {
			return fmt.Errorf("read echoed body: %w after %d bytes", err, len(got))
		}
		if resp.StatusCode != http.StatusOK || resp.Proto != "HTTP/2.0" || resp.Header.Get("X-Node-Proto") != "HTTP/2.0" {
			return fmt.Errorf("status %d, app side %s, node side %q; want 200 over HTTP/2.0 on both",
				resp.StatusCode, resp.Proto, resp.Header.Get("X-Node-Proto"))
		}
		if len(got) != len(want) || sha256Hex(got) != sha256Hex(want) {
			return fmt.Errorf("echoed body: %d bytes, sha256 %s; want %d bytes, %s", len(got), sha256Hex(got), len(want), sha256Hex(want))
		}
		return nil
	}

	body := randomBytes(8 << 20)
	tests := []struct {
		name string
		body func() io.Reader
	}{
		{"content length", func() io.Reader { return bytes.NewReader(body) }},
		{"unknown length", func() io.Reader { return io.MultiReader(bytes.NewReader(body)) }},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			if err := echo(tc.body(), body); err != nil {
				t.Fatal(err)
			}
		})
	}
	t.Run("concurrent streams", func(t *testing.T) {
		const streams = 4
		errs := make(chan error, streams)
		for i := range streams {
			// A body of its own for each, so crossed streams show.
			b := append(slices.Clone(body[i*1000:]), body[:i*1000]...)
			go func() { errs <- echo(bytes.NewReader(b), b) }()
		}
		for range streams {
			if err := <-errs; err != nil {
				t.Error(err)
			}
		}
	})
	if got := sc.accepts.Load(); got != 1 {
		t.Errorf("app connections = %d, want 1: every stream on one connection", got)
	}
	if got := node.accepts.Load(); got != 1 {
		t.Errorf("node connections = %d, want 1: every stream on one connection", got)
	}
}

// TestH2NodeAnswersBeforeReadingBody: a node that streams its whole answer
// before it reads the request body, as a gRPC server may, gets the body and
// the app gets the answer. The sidecar must not sit waiting for the node's
// window to send the body while nobody reads the node's answer.
func TestH2NodeAnswersBeforeReadingBody(t *testing.T) {
	leakcheck.Check(t)
	const (
		answer = 1 << 20
		upload = 200 << 10 // within the sidecar's stream window: all at hand at once
	)
	node := startH2CNode(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Trailer", "X-Read")
		chunk := make([]byte, 32<<10)
		for written := 0; written < answer; written += len(chunk) {
			if _, err := w.Write(chunk); err != nil {
				return
			}
		}
		w.(http.Flusher).Flush()
		n, _ := io.Copy(io.Discard, r.Body)
		w.Header().Set("X-Read", strconv.FormatInt(n, 10))
	}), &http.HTTP2Config{MaxReceiveBufferPerStream: 64 << 10}) // as grpc-go's first window
	sc := startH2Sidecar(t, staticCache(t, map[string][]string{"echo": {node.addr}}),
		RouteConfig{Service: "echo", Protocol: "http2"}, ServerOptions{})

	c := dialRawH2(t, sc.addr, true)
	c.mustRead(5*time.Second, "the sidecar's SETTINGS and window", func() bool { return c.settings && c.connWindow })
	// The header and the first part of the body in one write: all of it is
	// at hand when the sidecar starts the node's stream.
	c.request(1, http.MethodPost, "/upload", false)
	c.data(1, false, make([]byte, upload))
	c.flush()
	s := c.stream(1)
	if err := c.read(10*time.Second, func() bool { return len(s.body) >= answer || s.done }); err != nil || len(s.body) != answer {
		t.Fatalf("answer while the upload is open: %v (%v), want all %d bytes", s, err, answer)
	}
	c.data(1, true, []byte("end"))
	c.flush()
	c.mustRead(10*time.Second, "the end of the answer", func() bool { return s.done })
	if got, want := s.field(s.trailer, "x-read"), strconv.Itoa(upload+3); s.status() != "200" || got != want {
		t.Errorf("answer: %v, trailer x-read %q; want 200 and %s bytes read by the node", s, got, want)
	}
}

// TestH2SlowReader: an app that reads a large answer slowly holds the node
// back through flow control. The sidecar buffers a bounded amount, however
// far the node could run ahead, and the answer arrives intact.
func TestH2SlowReader(t *testing.T) {
	leakcheck.Check(t)
	const total = 16 << 20
	payload := randomBytes(total)
	var written atomic.Int64
	node := startH2CNode(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Length", strconv.Itoa(total))
		for p := payload; len(p) > 0; {
			n, err := w.Write(p[:min(len(p), 32<<10)])
			written.Add(int64(n))
			if err != nil {
				return
			}
			p = p[n:]
		}
	}), nil)
	sc := startH2Sidecar(t, staticCache(t, map[string][]string{"echo": {node.addr}}),
		RouteConfig{Service: "echo", Protocol: "http2"}, ServerOptions{})
	// An app that takes 64 KiB at a time.
	client := h2cClient(t, &http.HTTP2Config{MaxReceiveBufferPerConnection: 64 << 10, MaxReceiveBufferPerStream: 64 << 10})

	resp, err := client.Get(sc.URL + "/big")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	// The app reads nothing yet: the node runs until the windows on the way
	// are full, then stops.
	var last int64 = -1
	stable := 0
	resWait(t, 10*time.Second, "the node to stop writing", func() bool {
		if n := written.Load(); n != last {
			last, stable = n, 0
			return false
		}
		stable++
		return stable >= 20 // 100ms without progress
	})
	// The app's 64 KiB, the sidecar's 256 KiB stream window to the node, its
	// copy buffer, and frames on their way.
	if n := written.Load(); n > 2<<20 {
		t.Errorf("node wrote %d bytes while the app read none, want at most 2 MiB buffered on the way", n)
	}
	h := sha256.New()
	buf := make([]byte, 64<<10)
	var got int64
	for {
		n, err := resp.Body.Read(buf)
		h.Write(buf[:n])
		got += int64(n)
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatalf("read after %d bytes: %v", got, err)
		}
		if got%(1<<20) < int64(n) {
			time.Sleep(time.Millisecond) // slowly
		}
	}
	if want := sha256Hex(payload); got != total || hex.EncodeToString(h.Sum(nil)) != want {
		t.Errorf("answer: %d bytes, sha256 %x; want %d bytes, %s", got, h.Sum(nil), total, want)
	}
}

// resetNode answers /ok at once. Any other request is announced on got once
// its first body bytes arrived; its answer's header is sent first when
// answerFirst; then it waits for its request context to end, announced on
// ended.
type resetNode struct {
	answerFirst bool
	got, ended  chan struct{}
}

func (n *resetNode) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if r.URL.Path == "/ok" {
		io.WriteString(w, "ok")
		return
	}
	if n.answerFirst {
		w.WriteHeader(http.StatusOK)
		w.(http.Flusher).Flush()
	}
	buf := make([]byte, 5)
	if _, err := io.ReadFull(r.Body, buf); err != nil {
		return
	}
	n.got <- struct{}{}
	select {
	case <-r.Context().Done():
		n.ended <- struct{}{}
	case <-time.After(20 * time.Second):
	}
}

// TestH2ClientReset: an app that gives up on a streaming request, by
// cancelling it in Go's client or with a bare RST_STREAM, ends the node's
// request too, and the sidecar forgets the stream on both sides while the
// app's connection goes on serving.
func TestH2ClientReset(t *testing.T) {
	leakcheck.Check(t)
	for _, answerFirst := range []bool{false, true} {
		for _, raw := range []bool{false, true} {
			name := fmt.Sprintf("answered %v/raw %v", answerFirst, raw)
			t.Run(name, func(t *testing.T) {
				n := &resetNode{answerFirst: answerFirst, got: make(chan struct{}, 1), ended: make(chan struct{}, 1)}
				node := startH2CNode(t, n, nil)
				sc := startH2Sidecar(t, staticCache(t, map[string][]string{"echo": {node.addr}}),
					RouteConfig{Service: "echo", Protocol: "http2"}, ServerOptions{})
				wait := func(ch chan struct{}, what string) {
					t.Helper()
					select {
					case <-ch:
					case <-time.After(10 * time.Second):
						t.Fatalf("timed out waiting for %s", what)
					}
				}

				var again func() string
				if raw {
					c := dialRawH2(t, sc.addr, true)
					c.request(1, http.MethodPost, "/stream", false)
					c.data(1, false, []byte("hello"))
					c.flush()
					wait(n.got, "the node to get the first bytes")
					_ = c.fr.WriteRSTStream(1, http2.ErrCodeCancel)
					c.flush()
					again = func() string {
						c.request(3, http.MethodGet, "/ok", true)
						c.flush()
						s := c.stream(3)
						c.mustRead(10*time.Second, "the next request's answer", func() bool { return s.done })
						return s.status() + " " + string(s.body)
					}
				} else {
					client := h2cClient(t, nil)
					pr, pw := io.Pipe()
					defer pw.Close()
					ctx, cancel := context.WithCancel(context.Background())
					defer cancel()
					req, _ := http.NewRequestWithContext(ctx, http.MethodPost, sc.URL+"/stream", pr)
					go func() {
						if resp, err := client.Do(req); err == nil {
							_, _ = io.Copy(io.Discard, resp.Body)
							resp.Body.Close()
						}
					}()
					_, _ = pw.Write([]byte("hello"))
					wait(n.got, "the node to get the first bytes")
					// Go's client notices the cancel while it waits for the
					// answer, or once the body's Read returns.
					cancel()
					pw.CloseWithError(context.Canceled)
					again = func() string {
						r := doGet(t, client, sc.URL+"/ok", nil)
						return strconv.Itoa(r.status) + " " + r.body
					}
				}
				wait(n.ended, "the node's request context to end")
				resWait(t, 5*time.Second, "the sidecar to forget the stream", func() bool {
					_, streams, running := h2ServerLoad(sc.srv)
					_, pooled := h2PoolLoad(sc.px)
					return streams == 0 && running == 0 && pooled == 0
				})
				if got := again(); got != "200 ok" {
					t.Errorf("next request on the connection: %q, want 200 ok", got)
				}
				// The raw client asks again on the same connection, which
				// the sidecar must not have ended. Go's client, on a
				// loaded machine, sometimes closes the connection of a
				// canceled request itself and dials another (it reads EOF
				// from no GOAWAY or error of the sidecar's), so only its
				// answer counts.
				if got := sc.accepts.Load(); raw && got != 1 {
					t.Errorf("app connections = %d, want 1", got)
				}
			})
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
		_ = fr.WriteData(stream, false, make([]byte, 16<<10+1))
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

// trailerNode answers 201 with a header, the request body after
// "payload:", and trailers: one declared in Trailer, one set with
// http.TrailerPrefix, and the request's X-Req-Sum trailer sent back.
var trailerNode = http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
	body, _ := io.ReadAll(r.Body)
	w.Header().Set("Trailer", "X-Checksum")
	w.Header().Set("X-Node", "kept")
	w.Header().Set("X-Node-Proto", r.Proto)
	w.WriteHeader(http.StatusCreated)
	io.WriteString(w, "payload:")
	w.Write(body)
	w.(http.Flusher).Flush()
	w.Header().Set("X-Checksum", "abc123")
	w.Header().Set(http.TrailerPrefix+"X-Late", "undeclared")
	w.Header().Set(http.TrailerPrefix+"X-Req-Sum", r.Trailer.Get("X-Req-Sum"))
})

// TestH2Trailers: status, headers, body and trailers both ways make it
// from an h2 node to an h2c app, and across the translations between
// HTTP/1.1 and HTTP/2 on either side of the sidecar.
func TestH2Trailers(t *testing.T) {
	leakcheck.Check(t)
	h2 := startH2CNode(t, trailerNode, nil)
	h1 := startServer(t, trailerNode)
	cache := staticCache(t, map[string][]string{"h2": {h2.addr}, "h1": {h1.Listener.Addr().String()}})
	tests := []struct {
		name      string
		service   string
		protocol  string
		h2cApp    bool
		nodeProto string
	}{
		{"h2c app to h2 node", "h2", "http2", true, "HTTP/2.0"},
		{"http/1.1 app to h2 node", "h2", "http2", false, "HTTP/2.0"},
		{"h2c app to http/1.1 node", "h1", "http", true, "HTTP/1.1"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			sc := startH2Sidecar(t, cache, RouteConfig{Service: tc.service, Protocol: tc.protocol}, ServerOptions{})
			client, appProto := newClient(t, nil), "HTTP/1.1"
			if tc.h2cApp {
				client, appProto = h2cClient(t, nil), "HTTP/2.0"
			}
			// Of unknown length, so HTTP/1.1 can carry the trailer.
			req, _ := http.NewRequest(http.MethodPost, sc.URL+"/t", io.MultiReader(strings.NewReader("abc")))
			req.Trailer = http.Header{"X-Req-Sum": {"sum1"}}
			resp, err := client.Do(req)
			if err != nil {
				t.Fatal(err)
			}
			body, err := io.ReadAll(resp.Body)
			resp.Body.Close()
			if err != nil {
				t.Fatalf("read body: %v", err)
			}
			if resp.StatusCode != http.StatusCreated || resp.Proto != appProto || string(body) != "payload:abc" {
				t.Errorf("answer = %d %s %q, want 201 %s %q", resp.StatusCode, resp.Proto, body, appProto, "payload:abc")
			}
			for k, want := range map[string]string{"X-Node": "kept", "X-Node-Proto": tc.nodeProto} {
				if got := resp.Header.Get(k); got != want {
					t.Errorf("header %s = %q, want %q", k, got, want)
				}
			}
			for k, want := range map[string]string{"X-Checksum": "abc123", "X-Late": "undeclared", "X-Req-Sum": "sum1"} {
				if got := resp.Trailer.Get(k); got != want {
					t.Errorf("trailer %s = %q, want %q (trailers: %v)", k, got, want, resp.Trailer)
				}
			}
		})
	}
}

// setBackend is a discovery backend whose service "echo" the test moves
// between sets of addresses.
type setBackend struct {
	mu      sync.Mutex
	snap    *discovery.Snapshot
	changed chan struct{}
}

func newSetBackend(t testing.TB, addrs ...string) *setBackend {
	b := &setBackend{changed: make(chan struct{})}
	b.set(t, addrs...)
	return b
}

func (b *setBackend) set(t testing.TB, addrs ...string) {
	t.Helper()
	eps := make([]discovery.Endpoint, 0, len(addrs))
	for _, a := range addrs {
		host, port, err := net.SplitHostPort(a)
		if err != nil {
			t.Fatal(err)
		}
		p, _ := strconv.Atoi(port)
		eps = append(eps, discovery.NewEndpoint(a, host, p, nil, nil, 1))
	}
	slices.SortFunc(eps, func(x, y discovery.Endpoint) int { return strings.Compare(x.ID, y.ID) })
	b.mu.Lock()
	defer b.mu.Unlock()
	b.snap = &discovery.Snapshot{Service: "echo", Endpoints: eps, Updated: time.Now()}
	close(b.changed)
	b.changed = make(chan struct{})
}

func (b *setBackend) Watch(ctx context.Context, service string, sink discovery.Sink) {
	for {
		b.mu.Lock()
		snap, changed := b.snap, b.changed
		b.mu.Unlock()
		sink.Publish(snap)
		sink.Confirm(time.Now())
		select {
		case <-changed:
		case <-ctx.Done():
			return
		}
	}
}

func (b *setBackend) Known(_ context.Context, service string) (bool, error) {
	return service == "echo", nil
}

func (b *setBackend) Close() {}

// TestH2NoBody: the answers to HEAD and a 204 go to an h2c app as a
// HEADERS frame that ends the stream, with no DATA.
func TestH2NoBody(t *testing.T) {
	leakcheck.Check(t)
	node := startH2CNode(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		switch r.URL.Path {
		case "/nocontent":
			w.Header().Set("X-Node", "kept")
			w.WriteHeader(http.StatusNoContent)
		default:
			w.Header().Set("Content-Length", "11")
			io.WriteString(w, "hello world")
		}
	}), nil)
	sc := startH2Sidecar(t, staticCache(t, map[string][]string{"echo": {node.addr}}),
		RouteConfig{Service: "echo", Protocol: "http2"}, ServerOptions{})

	c := dialRawH2(t, sc.addr, true)
	c.request(1, http.MethodHead, "/head", true)
	c.request(3, http.MethodGet, "/nocontent", true)
	c.request(5, http.MethodGet, "/get", true)
	c.flush()
	c.mustRead(10*time.Second, "the answers", func() bool {
		return c.stream(1).done && c.stream(3).done && c.stream(5).done
	})
	head, noContent, get := c.stream(1), c.stream(3), c.stream(5)
	if head.status() != "200" || head.dataFrames != 0 || head.rst != nil || head.field(head.header, "content-length") != "11" {
		t.Errorf("HEAD: %v, content-length %q; want 200, content-length 11, no DATA", head, head.field(head.header, "content-length"))
	}
	if noContent.status() != "204" || noContent.dataFrames != 0 || noContent.rst != nil || noContent.field(noContent.header, "x-node") != "kept" {
		t.Errorf("204: %v, x-node %q; want 204, x-node kept, no DATA", noContent, noContent.field(noContent.header, "x-node"))
	}
	if get.status() != "200" || string(get.body) != "hello world" {
		t.Errorf("GET: %v, want 200 hello world", get)
	}

	// And through Go's clients, both ways round.
	for _, client := range []*http.Client{h2cClient(t, nil), newClient(t, nil)} {
		req, _ := http.NewRequest(http.MethodHead, sc.URL+"/head", nil)
		if r := do(t, client, req); r.status != http.StatusOK || r.body != "" {
			t.Errorf("HEAD = %d %q, want 200 and no body", r.status, r.body)
		}
		if r := doGet(t, client, sc.URL+"/nocontent", nil); r.status != http.StatusNoContent || r.body != "" {
			t.Errorf("GET /nocontent = %d %q, want 204 and no body", r.status, r.body)
		}
	}
}
