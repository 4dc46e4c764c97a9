package proxy

// Tests of the sidecar's own HTTP/2 engine (h2conn.go, h2server.go,
// h2client.go): real Go h2c peers where the behaviour is end to end, and raw
// framers, as client or node, where a test needs frames the Go peers never
// send or must see exactly which frames the sidecar sends.

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
	"go.uber.org/zap"
	"go.uber.org/zap/zaptest/observer"
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
// their handlers not yet returned.
func h2ServerLoad(s *Server) (conns, streams, running int) {
	s.h2.mu.Lock()
	scs := make([]*h2ServerConn, 0, len(s.h2.conns))
	for sc := range s.h2.conns {
		scs = append(scs, sc)
	}
	s.h2.mu.Unlock()
	for _, sc := range scs {
		sc.mu.Lock()
		streams += len(sc.streams)
		running += len(sc.streams) // a stream is held until its handler returns
		sc.mu.Unlock()
	}
	return len(scs), streams, running
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
			pl := e.pools.Load().h2c
			if pl == nil {
				continue
			}
			pl.mu.Lock()
			ccs := slices.Clone(pl.conns)
			pl.mu.Unlock()
			for _, cc := range ccs {
				cc.mu.Lock()
				conns++
				streams += len(cc.streams) + cc.reserved
				cc.mu.Unlock()
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

// TestH2MalformedRequests: requests HTTP/2 calls malformed, and frames out
// of place, end in RST_STREAM or GOAWAY as RFC 9113 asks, and none reaches
// the node. After a stream error the connection still serves.
func TestH2MalformedRequests(t *testing.T) {
	leakcheck.Check(t)
	var bad atomic.Int64
	node := startH2CNode(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path != "/ok" {
			bad.Add(1)
		}
		io.WriteString(w, "ok")
	}), nil)
	sc := startH2Sidecar(t, staticCache(t, map[string][]string{"echo": {node.addr}}),
		RouteConfig{Service: "echo", Protocol: "http2"}, ServerOptions{})

	get := []string{":method", "GET", ":scheme", "http", ":authority", "echo", ":path", "/bad"}
	with := func(extra ...string) []string { return append(slices.Clone(get), extra...) }
	const (
		stream = iota // RST_STREAM on stream 1, and the connection serves on
		conn          // GOAWAY, and the connection closes
	)
	tests := []struct {
		name string
		send func(c *rawH2)
		end  int
		code http2.ErrCode
	}{
		{"missing path", func(c *rawH2) {
			c.headers(1, true, ":method", "GET", ":scheme", "http", ":authority", "echo")
		}, stream, http2.ErrCodeProtocol},
		{"missing method", func(c *rawH2) {
			c.headers(1, true, ":scheme", "http", ":authority", "echo", ":path", "/bad")
		}, stream, http2.ErrCodeProtocol},
		{"unknown pseudo-header", func(c *rawH2) { c.headers(1, true, with(":foo", "x")...) }, stream, http2.ErrCodeProtocol},
		{"pseudo-header after a field", func(c *rawH2) {
			c.headers(1, true, "x-a", "1", ":method", "GET", ":scheme", "http", ":authority", "echo", ":path", "/bad")
		}, stream, http2.ErrCodeProtocol},
		{"connection close", func(c *rawH2) { c.headers(1, true, with("connection", "close")...) }, stream, http2.ErrCodeProtocol},
		{"keep-alive", func(c *rawH2) { c.headers(1, true, with("keep-alive", "timeout=5")...) }, stream, http2.ErrCodeProtocol},
		{"transfer-encoding", func(c *rawH2) { c.headers(1, true, with("transfer-encoding", "chunked")...) }, stream, http2.ErrCodeProtocol},
		{"te gzip", func(c *rawH2) { c.headers(1, true, with("te", "gzip")...) }, stream, http2.ErrCodeProtocol},
		{"uppercase name", func(c *rawH2) { c.headers(1, true, with("X-Upper", "1")...) }, stream, http2.ErrCodeProtocol},
		{"duplicate pseudo-header", func(c *rawH2) { c.headers(1, true, append(slices.Clone(get[:6]), ":path", "/a", ":path", "/b")...) }, stream, http2.ErrCodeProtocol},
		{"response pseudo-header in a request", func(c *rawH2) { c.headers(1, true, append([]string{":status", "200"}, get...)...) }, stream, http2.ErrCodeProtocol},
		{"newline in a value", func(c *rawH2) { c.headers(1, true, with("x-a", "1\r\nx-b: 2")...) }, stream, http2.ErrCodeProtocol},
		{"bad content-length", func(c *rawH2) {
			c.headers(1, false, ":method", "POST", ":scheme", "http", ":authority", "echo", ":path", "/bad", "content-length", "1x")
		}, stream, http2.ErrCodeProtocol},
		// The malformed request opened stream 1: the body and reset the
		// client sent before it saw the sidecar's reset are on a closed
		// stream, not an idle one.
		{"uppercase name with its body and a reset in flight", func(c *rawH2) {
			c.headers(1, false, with("X-Upper", "1")...)
			c.data(1, true, []byte("body"))
			_ = c.fr.WriteRSTStream(1, http2.ErrCodeCancel)
		}, stream, http2.ErrCodeProtocol},
		{"data on a stream never opened", func(c *rawH2) { _ = c.fr.WriteData(7, false, []byte("x")) }, conn, http2.ErrCodeProtocol},
		{"even stream", func(c *rawH2) { c.headers(2, true, get...) }, conn, http2.ErrCodeProtocol},
		{"window overflow", func(c *rawH2) { _ = c.fr.WriteWindowUpdate(0, 1<<31-1) }, conn, http2.ErrCodeFlowControl},
		{"headers before settings", nil, conn, http2.ErrCodeProtocol},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			c := dialRawH2(t, sc.addr, tc.send != nil)
			if tc.send == nil {
				c.headers(1, true, get...)
			} else {
				tc.send(c)
			}
			c.flush()
			if tc.end == stream {
				s := c.stream(1)
				c.mustRead(5*time.Second, "RST_STREAM", func() bool { return s.done })
				if s.rst == nil || *s.rst != tc.code || s.header != nil {
					t.Fatalf("stream 1: %v, want RST_STREAM %v and no answer", s, tc.code)
				}
				c.request(3, http.MethodGet, "/ok", true)
				c.flush()
				s = c.stream(3)
				c.mustRead(5*time.Second, "the next request's answer", func() bool { return s.done })
				if s.status() != "200" || string(s.body) != "ok" {
					t.Errorf("next request on the connection: %v, want 200 ok", s)
				}
				return
			}
			c.mustRead(5*time.Second, "GOAWAY", func() bool { return c.goAway != nil })
			if c.goAway.ErrCode != tc.code {
				t.Errorf("GOAWAY %v, want %v", c.goAway.ErrCode, tc.code)
			}
			if err := c.read(5*time.Second, func() bool { return false }); errors.Is(err, os.ErrDeadlineExceeded) {
				t.Errorf("connection still open after GOAWAY %v", c.goAway.ErrCode)
			}
		})
	}
	if n := bad.Load(); n != 0 {
		t.Errorf("node served %d malformed requests, want 0", n)
	}
	// The listener still serves: a well-formed request on a new connection.
	if r := doGet(t, h2cClient(t, nil), sc.URL+"/ok", nil); r.status != http.StatusOK || r.body != "ok" {
		t.Errorf("after malformed requests: %d %q, want 200 ok", r.status, r.body)
	}
}

// TestH2IdleStreamFrames: RST_STREAM or WINDOW_UPDATE on a stream the app
// never opened (an idle stream) is a connection error of type
// PROTOCOL_ERROR (RFC 9113, 5.1 and 6.4): the sidecar answers GOAWAY and
// closes. On a stream that was opened and has since closed, the same frames
// may still be in flight when it ends, and are ignored.
func TestH2IdleStreamFrames(t *testing.T) {
	leakcheck.Check(t)
	srv := NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		io.WriteString(w, "ok")
	}), ServerOptions{}, testLogger(t))
	px := startProxyServerWith(t, srv)
	tests := []struct {
		name string
		send func(c *rawH2) // after stream 1 was answered
		idle bool
	}{
		{"rst on the closed stream", func(c *rawH2) { _ = c.fr.WriteRSTStream(1, http2.ErrCodeCancel) }, false},
		{"window update on the closed stream", func(c *rawH2) { _ = c.fr.WriteWindowUpdate(1, 1024) }, false},
		{"rst on an idle stream", func(c *rawH2) { _ = c.fr.WriteRSTStream(3, http2.ErrCodeCancel) }, true},
		{"rst far past the last stream", func(c *rawH2) { _ = c.fr.WriteRSTStream(1001, http2.ErrCodeCancel) }, true},
		{"rst on an even stream", func(c *rawH2) { _ = c.fr.WriteRSTStream(2, http2.ErrCodeCancel) }, true},
		{"window update on an idle stream", func(c *rawH2) { _ = c.fr.WriteWindowUpdate(3, 1024) }, true},
		{"window update on an even stream", func(c *rawH2) { _ = c.fr.WriteWindowUpdate(2, 1024) }, true},
		// An increment of 0 is a stream error (6.9), but on an idle stream
		// still a connection error.
		{"zero window update on the closed stream", func(c *rawH2) {
			c.fr.AllowIllegalWrites = true
			_ = c.fr.WriteWindowUpdate(1, 0)
		}, false},
		{"zero window update on an idle stream", func(c *rawH2) {
			c.fr.AllowIllegalWrites = true
			_ = c.fr.WriteWindowUpdate(3, 0)
		}, true},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			c := dialRawH2(t, px.Listener.Addr().String(), true)
			c.request(1, http.MethodGet, "/first", true)
			c.flush()
			s := c.stream(1)
			c.mustRead(5*time.Second, "the first answer", func() bool { return s.done })
			if s.status() != "200" {
				t.Fatalf("first request: %v, want 200", s)
			}
			tc.send(c)
			if !tc.idle {
				c.request(3, http.MethodGet, "/next", true)
			}
			c.flush()
			if !tc.idle {
				s := c.stream(3)
				c.mustRead(5*time.Second, "the next answer", func() bool { return s.done || c.goAway != nil })
				if c.goAway != nil || s.status() != "200" || string(s.body) != "ok" {
					t.Fatalf("next request: %v, GOAWAY %v; want 200 ok on the same connection", s, c.goAway)
				}
				return
			}
			c.mustRead(5*time.Second, "GOAWAY", func() bool { return c.goAway != nil })
			if c.goAway.ErrCode != http2.ErrCodeProtocol || c.goAway.LastStreamID != 1 {
				t.Errorf("GOAWAY %v, last stream %d; want PROTOCOL_ERROR, 1", c.goAway.ErrCode, c.goAway.LastStreamID)
			}
			if err := c.read(5*time.Second, func() bool { return false }); errors.Is(err, os.ErrDeadlineExceeded) {
				t.Error("connection still open after GOAWAY")
			}
		})
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

// TestH2ConnectionErrorCodes: a client's connection error is answered with
// a GOAWAY carrying that error's code, not always PROTOCOL_ERROR, and the
// connection closes.
func TestH2ConnectionErrorCodes(t *testing.T) {
	leakcheck.Check(t)
	srv := NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		_, _ = io.Copy(io.Discard, r.Body)
	}), ServerOptions{}, testLogger(t))
	px := startProxyServerWith(t, srv)
	for _, tc := range h2ConnErrorCases {
		t.Run(tc.name, func(t *testing.T) {
			c := dialRawH2(t, px.Listener.Addr().String(), true)
			c.request(1, http.MethodPost, "/upload", false)
			tc.send(c.fr, 1)
			c.flush()
			c.mustRead(5*time.Second, "GOAWAY", func() bool { return c.goAway != nil })
			if c.goAway.ErrCode != tc.code {
				t.Errorf("GOAWAY %v, want %v", c.goAway.ErrCode, tc.code)
			}
			if err := c.read(5*time.Second, func() bool { return false }); errors.Is(err, os.ErrDeadlineExceeded) {
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
	srv := NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		<-release
	}), ServerOptions{}, testLogger(t))
	px := startProxyServerWith(t, srv)
	c := dialRawH2(t, px.Listener.Addr().String(), true)
	streams := h2ConnWindow/h2StreamWindow + 1
	for i := range streams {
		c.request(uint32(2*i+1), http.MethodPost, "/upload", false)
	}
	chunk := make([]byte, h2DefaultFrame)
	for range h2StreamWindow / h2DefaultFrame {
		for i := range streams {
			_ = c.fr.WriteData(uint32(2*i+1), false, chunk)
		}
	}
	c.flush()
	c.mustRead(10*time.Second, "GOAWAY", func() bool { return c.goAway != nil })
	if c.goAway.ErrCode != http2.ErrCodeFlowControl {
		t.Errorf("GOAWAY %v, want %v", c.goAway.ErrCode, http2.ErrCodeFlowControl)
	}
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
			refusing := startRawH2Node(t, tc.answer)
			var hits atomic.Int64
			healthy := startH2CNode(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				hits.Add(1)
				body, _ := io.ReadAll(r.Body)
				fmt.Fprintf(w, "%s %s %s", r.Method, r.URL.Path, body)
			}), nil)
			res := resDefaults(t)
			res.Breaker.Enabled = false // keep the refusing node in rotation
			res.Outlier.Enabled = false
			res.Retries.Backoff = time.Millisecond
			sc := startH2Sidecar(t, staticCache(t, map[string][]string{"echo": {refusing.addr, healthy.addr}}),
				RouteConfig{Service: "echo", Protocol: "http2", Resilience: res}, ServerOptions{})
			client := h2cClient(t, nil)
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
			refused := refusing.headers.Load()
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
	payload := randomBytes(1 << 20)
	started, release := make(chan struct{}, 1), make(chan struct{})
	srv := NewServer(shutdownHandler(payload, started, release), ServerOptions{}, testLogger(t))
	px := startProxyServerWith(t, srv)
	var once sync.Once
	t.Cleanup(func() { once.Do(func() { close(release) }) })

	c := dialRawH2(t, px.Listener.Addr().String(), true)
	c.request(1, http.MethodGet, "/slow", true)
	c.flush()
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
	c.mustRead(5*time.Second, "GOAWAY", func() bool { return c.goAway != nil })
	if g := c.goAway; g.LastStreamID != 1 || g.ErrCode != http2.ErrCodeNo {
		t.Errorf("GOAWAY last stream %d, %v; want 1, NO_ERROR", g.LastStreamID, g.ErrCode)
	}
	c.request(3, http.MethodGet, "/fast", true)
	c.flush()
	s3 := c.stream(3)
	c.mustRead(5*time.Second, "the new stream's end", func() bool { return s3.done })
	if s3.rst == nil || *s3.rst != http2.ErrCodeRefusedStream {
		t.Errorf("stream opened after GOAWAY: %v, want RST_STREAM REFUSED_STREAM", s3)
	}
	select {
	case err := <-shut:
		t.Fatalf("Shutdown() = %v with a stream in flight, want it to wait", err)
	default:
	}

	once.Do(func() { close(release) })
	s1 := c.stream(1)
	c.mustRead(10*time.Second, "the stream in flight to finish", func() bool { return s1.done })
	if s1.status() != "200" || s1.rst != nil || !bytes.Equal(s1.body, payload) {
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
	if err := c.read(5*time.Second, func() bool { return false }); errors.Is(err, os.ErrDeadlineExceeded) {
		t.Error("connection still open after Shutdown")
	}
}

// TestH2ServerClose: Close ends the app connections at once, and the
// handlers' requests with them.
func TestH2ServerClose(t *testing.T) {
	leakcheck.Check(t)
	started, ended := make(chan struct{}, 1), make(chan struct{})
	srv := NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		started <- struct{}{}
		select {
		case <-r.Context().Done():
			close(ended)
		case <-time.After(20 * time.Second):
		}
	}), ServerOptions{}, testLogger(t))
	px := startProxyServerWith(t, srv)
	c := dialRawH2(t, px.Listener.Addr().String(), true)
	c.request(1, http.MethodGet, "/", true)
	c.flush()
	select {
	case <-started:
	case <-time.After(10 * time.Second):
		t.Fatal("the handler never started")
	}
	if err := srv.Close(); err != nil {
		t.Errorf("Close() = %v", err)
	}
	if err := c.read(5*time.Second, func() bool { return false }); errors.Is(err, os.ErrDeadlineExceeded) {
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
	srv := NewServer(shutdownHandler([]byte("slow"), started, release), ServerOptions{IdleTimeout: idle}, testLogger(t))
	px := startProxyServerWith(t, srv)
	var once sync.Once
	t.Cleanup(func() { once.Do(func() { close(release) }) })

	c := dialRawH2(t, px.Listener.Addr().String(), true)
	c.request(1, http.MethodGet, "/slow", true)
	c.flush()
	<-started
	s1 := c.stream(1)
	if err := c.read(3*idle, func() bool { return c.goAway != nil || s1.done }); !errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("with a stream open past the idle timeout: %v, GOAWAY %v; want the connection left alone", err, c.goAway)
	}
	once.Do(func() { close(release) })
	c.mustRead(5*time.Second, "the answer", func() bool { return s1.done })
	if s1.status() != "200" || string(s1.body) != "slow" {
		t.Errorf("answer: %v, want 200 slow", s1)
	}
	c.mustRead(5*time.Second, "GOAWAY", func() bool { return c.goAway != nil })
	if g := c.goAway; g.ErrCode != http2.ErrCodeNo || g.LastStreamID != 1 {
		t.Errorf("GOAWAY last stream %d, %v; want 1, NO_ERROR", g.LastStreamID, g.ErrCode)
	}
	if err := c.read(5*time.Second, func() bool { return false }); errors.Is(err, os.ErrDeadlineExceeded) {
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
	srv := NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		n := running.Add(1)
		for p := peak.Load(); n > p && !peak.CompareAndSwap(p, n); p = peak.Load() {
		}
		<-release
		running.Add(-1)
		io.WriteString(w, "ok")
	}), ServerOptions{}, testLogger(t))
	px := startProxyServerWith(t, srv)
	var once sync.Once
	t.Cleanup(func() { once.Do(func() { close(release) }) })

	c := dialRawH2(t, px.Listener.Addr().String(), true)
	const extra = 100
	for i := range h2MaxStreams + extra {
		c.request(uint32(2*i+1), http.MethodGet, "/", true)
	}
	c.flush()
	refused := func() (ids []uint32) {
		for id, s := range c.streams {
			if s.rst != nil && *s.rst == http2.ErrCodeRefusedStream {
				ids = append(ids, id)
			}
		}
		slices.Sort(ids)
		return ids
	}
	c.mustRead(10*time.Second, "the excess streams refused", func() bool { return len(refused()) >= extra })
	resWait(t, 10*time.Second, "1000 handlers running", func() bool { return running.Load() == h2MaxStreams })
	if c.maxStreams != h2MaxStreams {
		t.Errorf("SETTINGS_MAX_CONCURRENT_STREAMS = %d, want %d", c.maxStreams, h2MaxStreams)
	}
	if ids := refused(); len(ids) != extra || ids[0] != 2*h2MaxStreams+1 {
		t.Errorf("refused %d streams from %v, want the last %d, from %d", len(ids), ids[:min(len(ids), 1)], extra, 2*h2MaxStreams+1)
	}
	once.Do(func() { close(release) })
	c.mustRead(20*time.Second, "every stream to end", func() bool {
		for i := range h2MaxStreams {
			if !c.stream(uint32(2*i + 1)).done {
				return false
			}
		}
		return true
	})
	for i := range h2MaxStreams {
		if s := c.stream(uint32(2*i + 1)); s.status() != "200" || string(s.body) != "ok" {
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
// ENHANCE_YOUR_CALM once h2MaxEarlyResets more streams ended early than
// were answered, instead of REFUSED_STREAM for as long as it goes on. The
// server serves the next connection.
func TestH2ResetFlood(t *testing.T) {
	leakcheck.Check(t)
	release := make(chan struct{})
	var running, peak, calls atomic.Int64
	srv := NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
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
	}), ServerOptions{}, testLogger(t))
	px := startProxyServerWith(t, srv)
	var once sync.Once
	t.Cleanup(func() { once.Do(func() { close(release) }) })

	c := dialRawH2(t, px.Listener.Addr().String(), true)
	// Answered streams earn as many early ends.
	const answered = 10
	for i := range answered {
		c.request(uint32(2*i+1), http.MethodGet, "/ok", true)
	}
	c.flush()
	c.mustRead(5*time.Second, "the first answers", func() bool {
		for i := range answered {
			if !c.stream(uint32(2*i + 1)).done {
				return false
			}
		}
		return true
	})
	const opened = 3 * h2MaxStreams
	for i := range opened {
		id := uint32(2*(answered+i) + 1)
		c.request(id, http.MethodGet, "/", true)
		_ = c.fr.WriteRSTStream(id, http2.ErrCodeCancel)
		if i%100 == 99 {
			c.flush()
		}
	}
	c.flush()
	if err := c.read(10*time.Second, func() bool { return false }); errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatal("connection still open after the flood")
	}
	if c.goAway == nil || c.goAway.ErrCode != http2.ErrCodeEnhanceYourCalm {
		t.Fatalf("GOAWAY %v, want ENHANCE_YOUR_CALM", c.goAway)
	}
	// Refused streams and resets before the answer count alike; the
	// GOAWAY comes at the first past the bound.
	if last, want := c.goAway.LastStreamID, uint32(2*(answered+h2MaxEarlyResets+answered)+1); last != want {
		t.Errorf("GOAWAY last stream %d, want %d: %d early ends allowed after %d answers", last, want, h2MaxEarlyResets+answered, answered)
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
	c2 := dialRawH2(t, px.Listener.Addr().String(), true)
	c2.request(1, http.MethodGet, "/ok", true)
	c2.flush()
	s := c2.stream(1)
	c2.mustRead(5*time.Second, "the next connection's answer", func() bool { return s.done })
	if s.status() != "200" || string(s.body) != "ok" {
		t.Errorf("next connection: %v, want 200 ok", s)
	}
}

// TestH2NodeConnectionReuse: requests one after another, and many at once,
// share one h2c connection to the node.
func TestH2NodeConnectionReuse(t *testing.T) {
	leakcheck.Check(t)
	node := startH2CNode(t, nodeHandler("node-0"), nil)
	sc := startH2Sidecar(t, staticCache(t, map[string][]string{"echo": {node.addr}}),
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
	if got := node.accepts.Load(); got != 1 {
		t.Errorf("node connections = %d, want 1", got)
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

// TestH2EndpointLeaves: when a node leaves the set, the sidecar's h2c
// connection to it is closed once its streams have ended; a stream in
// flight finishes first.
func TestH2EndpointLeaves(t *testing.T) {
	leakcheck.Check(t)
	payload := randomBytes(256 << 10)
	started, release := make(chan struct{}, 1), make(chan struct{})
	var once sync.Once
	leaving := startH2CNode(t, shutdownHandler(payload, started, release), nil)
	staying := startH2CNode(t, nodeHandler("staying"), nil)
	t.Cleanup(func() { once.Do(func() { close(release) }) })

	b := newSetBackend(t, leaving.addr)
	cache := discovery.NewCache(b, discovery.CacheOptions{}, testLogger(t))
	t.Cleanup(cache.Close)
	sc := startH2Sidecar(t, cache, RouteConfig{Service: "echo", Protocol: "http2"}, ServerOptions{})
	client := h2cClient(t, nil)

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

	b.set(t, staying.addr)
	resWait(t, 5*time.Second, "discovery to publish the new set", func() bool {
		w, err := cache.Watch(context.Background(), "echo")
		return err == nil && len(w.Snapshot().Endpoints) == 1 && w.Snapshot().Endpoints[0].Addr == staying.addr
	})
	// The first request after the change rebuilds the route.
	if r := doGet(t, client, sc.URL+"/next", nil); r.status != http.StatusOK || r.body != "staying GET /next" {
		t.Fatalf("GET after the change = %d %q, want it served by the node that stayed", r.status, r.body)
	}
	if got := leaving.closes.Load(); got != 0 {
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
		return leaving.closes.Load() == leaving.accepts.Load()
	})
	if got := leaving.accepts.Load(); got != 1 {
		t.Errorf("leaving node connections = %d, want 1", got)
	}
}

// TestH2PoolRetired: a request that reaches a pool just retired (it picked
// the node before the node left) is still served, on a connection of its
// own that closes once it is done, as on the HTTP/1.1 pool.
func TestH2PoolRetired(t *testing.T) {
	leakcheck.Check(t)
	node := startH2CNode(t, nodeHandler("node-0"), nil)
	p := newH2Pool(Timeouts{}.withDefaults(), testLogger(t))
	get := func() error {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		req, _ := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+node.addr+"/r", nil)
		errc := make(chan error, 1)
		go func() {
			resp, err := p.roundTrip(req)
			if err != nil {
				errc <- err
				return
			}
			body, err := io.ReadAll(resp.Body)
			resp.Body.Close()
			if err == nil && (resp.StatusCode != http.StatusOK || string(body) != "node-0 GET /r") {
				err = fmt.Errorf("answer %d %q, want 200", resp.StatusCode, body)
			}
			errc <- err
		}()
		select {
		case err := <-errc:
			return err
		case <-time.After(10 * time.Second):
			return errors.New("roundTrip did not return")
		}
	}
	if err := get(); err != nil {
		t.Fatal(err)
	}
	p.retire()
	resWait(t, 5*time.Second, "the idle connection to close", func() bool { return node.closes.Load() == 1 })
	if err := get(); err != nil {
		t.Fatalf("request on the retired pool: %v", err)
	}
	if got := node.accepts.Load(); got != 2 {
		t.Errorf("node connections = %d, want 2: one for the request on the retired pool", got)
	}
	resWait(t, 5*time.Second, "its connection to close", func() bool { return node.closes.Load() == 2 })
}

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

// TestH2RefusedStreamBodyInFlight: when a node refuses a stream whose
// request body the app is still to send, the sidecar is already waiting to
// read that body for the refused stream. The request goes on to another
// node, and what that waiting read takes of the app's next bytes goes to
// the new stream, not the refused one: the node gets the whole body, never
// a short one, and the request does not hang.
func TestH2RefusedStreamBodyInFlight(t *testing.T) {
	leakcheck.Check(t)
	refusing := startRawH2Node(t, func(fr *http2.Framer, f *http2.MetaHeadersFrame) {
		_ = fr.WriteRSTStream(f.StreamID, http2.ErrCodeRefusedStream)
	})
	started := make(chan struct{}, 1)
	var mu sync.Mutex
	var bodies []string
	healthy := startH2CNode(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
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
	sc := startH2Sidecar(t, staticCache(t, map[string][]string{"echo": {refusing.addr, healthy.addr}}),
		RouteConfig{Service: "echo", Protocol: "http2", Resilience: res}, ServerOptions{})
	client := h2cClient(t, nil)

	refusedFirst := false
	for i := 0; i < 4 && !refusedFirst; i++ {
		before := refusing.headers.Load()
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
		refusedFirst = refusing.headers.Load() > before
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

// TestH2SilentNodePinged: a node that stops answering altogether, neither
// its stream nor pings, as a vanished host does, has its connection closed
// once a ping goes unanswered. The request in flight fails with a 502
// naming the ping instead of hanging (the route has no request timeout),
// and the next request dials the node afresh.
func TestH2SilentNodePinged(t *testing.T) {
	leakcheck.Check(t)
	after, timeout := h2PingAfter, h2PingTimeout
	h2PingAfter, h2PingTimeout = 100*time.Millisecond, 100*time.Millisecond
	t.Cleanup(func() { h2PingAfter, h2PingTimeout = after, timeout })

	stop := make(chan struct{})
	var streams atomic.Int64
	silent := startRawH2Node(t, func(fr *http2.Framer, f *http2.MetaHeadersFrame) {
		streams.Add(1)
		<-stop // reads nothing more: no answer, no ping ack
	})
	t.Cleanup(func() { close(stop) }) // runs before the node's cleanup
	res := resDefaults(t)
	res.Breaker.Enabled = false
	res.Outlier.Enabled = false
	sc := startH2Sidecar(t, staticCache(t, map[string][]string{"echo": {silent.addr}}),
		RouteConfig{Service: "echo", Protocol: "http2", Resilience: res}, ServerOptions{})
	client := h2cClient(t, nil)
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
			node := startRawH2Node(t, func(fr *http2.Framer, f *http2.MetaHeadersFrame) {
				tc.send(fr, f.StreamID)
				if tc.idle {
					answer(fr, f.StreamID) // too late: the sidecar has hung up
				}
			})
			res := resDefaults(t)
			res.Breaker.Enabled = false
			res.Outlier.Enabled = false
			sc := startH2Sidecar(t, staticCache(t, map[string][]string{"echo": {node.addr}}),
				RouteConfig{Service: "echo", Protocol: "http2", Resilience: res}, ServerOptions{})
			client := h2cClient(t, nil)
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
				case code := <-node.goAway:
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
				case code := <-node.goAway:
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
	for _, tc := range h2ConnErrorCases {
		t.Run(tc.name, func(t *testing.T) {
			node := startRawH2Node(t, func(fr *http2.Framer, f *http2.MetaHeadersFrame) {
				tc.send(fr, f.StreamID)
			})
			res := resDefaults(t)
			res.Breaker.Enabled = false
			res.Outlier.Enabled = false
			res.Retries.Attempts = 0
			sc := startH2Sidecar(t, staticCache(t, map[string][]string{"echo": {node.addr}}),
				RouteConfig{Service: "echo", Protocol: "http2", Resilience: res}, ServerOptions{})
			r := doGet(t, h2cClient(t, nil), sc.URL+"/x", nil)
			if r.status != http.StatusBadGateway || !strings.Contains(r.body, tc.code.String()) {
				t.Errorf("request = %d %q, want 502 naming %v", r.status, r.body, tc.code)
			}
			select {
			case code := <-node.goAway:
				if code != tc.code {
					t.Errorf("GOAWAY %v, want %v", code, tc.code)
				}
			case <-time.After(5 * time.Second):
				t.Fatal("no GOAWAY from the sidecar")
			}
		})
	}
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

// TestH2ConnPanics: a panic in an app connection's read loop or write
// loop is logged with its stack and closes that connection, as an I/O
// error would; the sidecar lives on and serves the next connection.
func TestH2ConnPanics(t *testing.T) {
	leakcheck.Check(t)
	core, logs := observer.New(zap.ErrorLevel)
	srv := NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		io.WriteString(w, "ok")
	}), ServerOptions{}, zap.New(core))
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
			c := dialRawH2(t, ln.Addr().String(), true)
			c.request(1, http.MethodGet, "/x", true)
			c.flush()
			if err := c.read(5*time.Second, func() bool { return false }); errors.Is(err, os.ErrDeadlineExceeded) {
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
			if r := doGet(t, h2cClient(t, nil), "http://"+ln.Addr().String()+"/x", nil); r.status != http.StatusOK || r.body != "ok" {
				t.Errorf("next connection: %d %q, want 200 ok", r.status, r.body)
			}
		})
	}
}

// panicReader panics on its first read.
type panicReader struct{}

func (panicReader) Read([]byte) (int, error) { panic("body boom") }

// TestH2RequestBodyPanics: a panic in the goroutine that sends a request
// body to a node, here in the body's Read, is logged with its stack and
// ends that stream only: the request fails, and the connection serves the
// next one.
func TestH2RequestBodyPanics(t *testing.T) {
	leakcheck.Check(t)
	node := startH2CNode(t, echoNode, nil)
	core, logs := observer.New(zap.ErrorLevel)
	p := newH2Pool(Timeouts{}.withDefaults(), zap.New(core))
	t.Cleanup(p.retire)
	send := func(body io.Reader) (string, error) {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		req, _ := http.NewRequestWithContext(ctx, http.MethodPost, "http://"+node.addr+"/r", body)
		req.ContentLength = -1
		resp, err := p.roundTrip(req)
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
	if got := node.accepts.Load(); got != 1 {
		t.Errorf("node connections = %d, want 1: the panic ended only its stream", got)
	}
}

// TestH2ContentLengthMismatch: a request whose DATA is not the length its
// content-length says is malformed (RFC 9113, 8.1.1) and gets
// RST_STREAM(PROTOCOL_ERROR). Relayed to an HTTP/1.1 node, the excess could
// otherwise become a second, smuggled request on the node's connection. A
// body of the declared length passes.
func TestH2ContentLengthMismatch(t *testing.T) {
	leakcheck.Check(t)
	var bodies sync.Map // path → body the node read
	node := startServer(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		b, _ := io.ReadAll(r.Body)
		bodies.Store(r.URL.Path, string(b))
		io.WriteString(w, "ok")
	}))
	sc := startH2Sidecar(t, staticCache(t, map[string][]string{"echo": {node.Listener.Addr().String()}}),
		RouteConfig{Service: "echo"}, ServerOptions{})
	tests := []struct {
		name     string
		length   string
		data     []string // DATA frames; the last ends the stream
		wantRST  bool
		wantBody string
	}{
		{"exact", "5", []string{"hello"}, false, "hello"},
		{"exact in two frames", "10", []string{"hello", "world"}, false, "helloworld"},
		{"longer than declared", "5", []string{"hello", "GET /smuggled HTTP/1.1\r\nHost: echo\r\n\r\n"}, true, ""},
		{"shorter than declared", "10", []string{"hello"}, true, ""},
		{"declared with no body", "5", nil, true, ""},
	}
	for i, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			c := dialRawH2(t, sc.addr, true)
			path := fmt.Sprintf("/cl%d", i)
			c.request(1, http.MethodPost, path, len(tc.data) == 0, "content-length", tc.length)
			for j, d := range tc.data {
				c.data(1, j == len(tc.data)-1, []byte(d))
			}
			c.flush()
			c.mustRead(5*time.Second, "the answer", func() bool { return c.stream(1).done })
			r := c.stream(1)
			if tc.wantRST {
				if r.rst == nil || *r.rst != http2.ErrCodeProtocol {
					t.Errorf("stream = %v, want RST_STREAM(PROTOCOL_ERROR)", r)
				}
				if b, ok := bodies.Load(path); ok && b != "" && b != "hello" {
					t.Errorf("node read body %q, want at most the declared bytes", b)
				}
				return
			}
			if r.status() != "200" || r.rst != nil {
				t.Errorf("stream = %v, want 200", r)
			}
			if b, _ := bodies.Load(path); b != tc.wantBody {
				t.Errorf("node read body %q, want %q", b, tc.wantBody)
			}
		})
	}
	if _, ok := bodies.Load("/smuggled"); ok {
		t.Error("the excess bytes reached the node as a request of their own")
	}
}

// TestH2PoolIdleClose: a pooled HTTP/2 connection with no stream open for
// the idle timeout is closed, timed from the end of its last stream (one
// stream outlasts the timeout here), with no request coming to find it.
func TestH2PoolIdleClose(t *testing.T) {
	leakcheck.Check(t)
	const idle = 200 * time.Millisecond
	node := startH2CNode(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		time.Sleep(2 * idle)
		io.WriteString(w, "slow")
	}), nil)
	p := newH2Pool(Timeouts{Connect: time.Second, Idle: idle}, testLogger(t))
	t.Cleanup(p.retire)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	req, _ := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+node.addr+"/slow", nil)
	resp, err := p.roundTrip(req)
	if err != nil {
		t.Fatal(err)
	}
	body, err := io.ReadAll(resp.Body)
	resp.Body.Close()
	if err != nil || string(body) != "slow" {
		t.Fatalf("body = %q, %v; want \"slow\"", body, err)
	}
	if got := node.closes.Load(); got != 0 {
		t.Fatalf("node connections closed as the stream ended = %d, want 0 (idle for less than %v)", got, idle)
	}
	resWait(t, 5*time.Second, "the idle connection to close", func() bool { return node.closes.Load() == 1 })
}
