package h2

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zaptest/observer"
	"golang.org/x/net/http/httpguts"
	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"

	"github.com/sidecarlb/sidecar/internal/httpwire"
)

// h2FuzzSeeds are frame sequences a client sends after its preface, made by
// x/net's Framer: requests with and without bodies, padding, priority,
// CONTINUATION, trailers, and every control frame.
func h2FuzzSeeds() [][]byte {
	var seeds [][]byte
	add := func(build func(fr *http2.Framer, block func(fields ...string) []byte)) {
		var buf bytes.Buffer
		fr := http2.NewFramer(&buf, nil)
		var hbuf bytes.Buffer
		enc := hpack.NewEncoder(&hbuf)
		block := func(fields ...string) []byte {
			hbuf.Reset()
			for i := 0; i+1 < len(fields); i += 2 {
				_ = enc.WriteField(hpack.HeaderField{Name: fields[i], Value: fields[i+1]})
			}
			return bytes.Clone(hbuf.Bytes())
		}
		_ = fr.WriteSettings(http2.Setting{ID: http2.SettingInitialWindowSize, Val: 1 << 20})
		build(fr, block)
		seeds = append(seeds, buf.Bytes())
	}
	get := []string{":method", "GET", ":scheme", "http", ":authority", "echo", ":path", "/a?b=c"}
	add(func(fr *http2.Framer, block func(...string) []byte) {
		_ = fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 1, BlockFragment: block(get...), EndStream: true, EndHeaders: true})
	})
	add(func(fr *http2.Framer, block func(...string) []byte) {
		b := block(append(get, "content-length", "5", "trailer", "x-t", "cookie", "a=1", "cookie", "b=2")...)
		_ = fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 1, BlockFragment: b[:3], PadLength: 4,
			Priority: http2.PriorityParam{StreamDep: 0, Weight: 200}})
		_ = fr.WriteContinuation(1, true, b[3:])
		_ = fr.WriteDataPadded(1, false, []byte("hel"), []byte{0, 0})
		_ = fr.WriteData(1, false, []byte("lo"))
		_ = fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 1, BlockFragment: block("x-t", "v"), EndStream: true, EndHeaders: true})
	})
	add(func(fr *http2.Framer, block func(...string) []byte) {
		_ = fr.WritePriority(3, http2.PriorityParam{StreamDep: 1, Weight: 7, Exclusive: true})
		_ = fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 3, BlockFragment: block(get...), EndHeaders: true})
		_ = fr.WriteWindowUpdate(3, 100)
		_ = fr.WriteWindowUpdate(0, 100)
		_ = fr.WriteRSTStream(3, http2.ErrCodeCancel)
		_ = fr.WritePing(false, [8]byte{1, 2, 3})
		_ = fr.WriteSettingsAck()
		_ = fr.WriteGoAway(3, http2.ErrCodeNo, []byte("bye"))
	})
	add(func(fr *http2.Framer, block func(...string) []byte) {
		_ = fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 1, BlockFragment: block(":method", "GET /internal?x=", ":scheme", "http", ":path", "/p q", "X-Up", "\x00"), EndStream: true, EndHeaders: true})
		_ = fr.WriteRawFrame(0xfa, 0, 1, []byte("unknown"))
		_ = fr.WriteContinuation(5, true, nil)
	})
	add(func(fr *http2.Framer, block func(...string) []byte) {
		// Each a stream error of its own: an upper-case name, a pseudo
		// field after a regular one, a repeated pseudo field.
		_ = fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 1, BlockFragment: block(append(get, "X-Up", "1")...), EndStream: true, EndHeaders: true})
		_ = fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 3, BlockFragment: block("x-a", "1", ":method", "GET"), EndStream: true, EndHeaders: true})
		_ = fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 5, BlockFragment: block(append(get, ":path", "/b")...), EndStream: true, EndHeaders: true})
	})
	return seeds
}

// fakeConn is a net.Conn that reads r and discards what is written.
type fakeConn struct {
	r io.Reader
	net.Conn
}

func (c fakeConn) Read(p []byte) (int, error) { return c.r.Read(p) }

func (c fakeConn) Write(p []byte) (int, error) { return len(p), nil }

func (c fakeConn) Close() error { return nil }

func (c fakeConn) RemoteAddr() net.Addr { return &net.TCPAddr{} }

func (c fakeConn) SetReadDeadline(time.Time) error { return nil }

func (c fakeConn) SetWriteDeadline(time.Time) error { return nil }

func (c fakeConn) SetDeadline(time.Time) error { return nil }

func (c fakeConn) LocalAddr() net.Addr { return &net.TCPAddr{} }

func (c fakeConn) String() string { return "fake" }

func (c fakeConn) ReadFrom(r io.Reader) (int64, error) { return io.Copy(io.Discard, r) }

// frameSummary is what both readers must agree on for one frame.
func frameSummary(f http2.Frame) string {
	fh := f.Header()
	s := fmt.Sprintf("%v stream %d flags %#x", fh.Type, fh.StreamID, fh.Flags)
	if mh, ok := f.(*http2.MetaHeadersFrame); ok {
		s += fmt.Sprintf(" truncated %v fields %q", mh.Truncated, mh.Fields)
	}
	return s
}

// errorSummary classes a read error: a stream error with its stream and
// code, a connection error with its code, or any other error (the input
// ended, or was cut inside a frame).
func errorSummary(err error) string {
	var se http2.StreamError
	var ce http2.ConnectionError
	switch {
	case errors.As(err, &se):
		return fmt.Sprintf("stream error %d %v", se.StreamID, se.Code)
	case errors.As(err, &ce):
		return fmt.Sprintf("connection error %v", http2.ErrCode(ce))
	case errors.Is(err, http2.ErrFrameTooLarge):
		return "connection error FRAME_SIZE_ERROR"
	}
	return "end"
}

// FuzzH2ReadFrame feeds frame bytes to the connection core's readFrame and
// to x/net's Framer with ReadMetaHeaders, set up alike (16 KiB frames, the
// same header list limit), and checks they read the same frames, decode
// the same header fields, and fail alike: a stream error on the same
// stream with the same code, or a connection error with the same code.
func FuzzH2ReadFrame(f *testing.F) {
	for _, s := range h2FuzzSeeds() {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, in []byte) {
		c := newConn(fakeConn{r: bytes.NewReader(in)}, zap.NewNop())
		x := http2.NewFramer(io.Discard, bytes.NewReader(in))
		x.SetMaxReadFrameSize(h2DefaultFrame)
		x.MaxHeaderListSize = h2MaxHeaderList
		x.ReadMetaHeaders = hpack.NewDecoder(4096, nil)
		for i := 0; ; i++ {
			got, gerr := c.readFrame()
			want, werr := x.ReadFrame()
			if (gerr == nil) != (werr == nil) {
				t.Fatalf("frame %d: readFrame() = %v, %v; x/net = %v, %v", i, got, gerr, want, werr)
			}
			if gerr != nil {
				if g, w := errorSummary(gerr), errorSummary(werr); g != w {
					t.Fatalf("frame %d: readFrame() error %v (%s), x/net %v (%s)", i, gerr, g, werr, w)
				}
				var se http2.StreamError
				if !errors.As(gerr, &se) {
					return // the connection ends
				}
				continue
			}
			if g, w := frameSummary(got), frameSummary(want); g != w {
				t.Fatalf("frame %d: readFrame() = %s, x/net %s", i, g, w)
			}
		}
	})
}

// FuzzH2ServerConn runs the server's whole read loop over frame bytes a
// client sends after its preface, with a handler that reads the body and
// answers: the connection must end without a panic (which the read loop
// would recover and log) once the input does.
func FuzzH2ServerConn(f *testing.F) {
	for _, s := range h2FuzzSeeds() {
		f.Add(s)
	}
	core, logs := observer.New(zap.ErrorLevel)
	srv := newListenerServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		_, _ = io.Copy(io.Discard, r.Body)
		w.Header().Set("X-Method", r.Method)
		_, _ = io.WriteString(w, r.URL.RequestURI())
	}), Options{ReadHeaderTimeout: time.Second, IdleTimeout: time.Second}, zap.New(core))
	f.Cleanup(func() { srv.Close() })
	f.Fuzz(func(t *testing.T, in []byte) {
		client, server := net.Pipe()
		done := make(chan struct{})
		go func() {
			defer close(done)
			srv.h2.serveH2(server)
		}()
		go func() { _, _ = io.Copy(io.Discard, client) }()
		_ = client.SetWriteDeadline(time.Now().Add(2 * time.Second))
		_, _ = client.Write(in)
		client.Close()
		select {
		case <-done:
		case <-time.After(5 * time.Second):
			t.Fatal("connection still served 5s after its input ended")
		}
		if n := logs.FilterMessage("http2 connection panicked").Len(); n > 0 {
			t.Fatalf("read loop panicked: %v", logs.All())
		}
	})
}

// FuzzH2RequestPseudoHeaders holds the server's acceptance of a request's
// pseudo-header fields to Go's server (x/net's, bundled in net/http): what
// Go refuses, the sidecar refuses too; what Go accepts and the sidecar
// refuses is explained by one of its stricter rules (RFC 9113, 8.3.1); and
// every request the sidecar accepts makes an HTTP/1.1 request line that
// reads back as the same method and target.
func FuzzH2RequestPseudoHeaders(f *testing.F) {
	for _, s := range [][4]string{
		{"GET", "http", "echo", "/a?b=c"},
		{"GET /internal?x=", "http", "echo", "/public"},
		{"GET", "http", "echo", "/p q"},
		{"GET", "https", "echo:80", "/p\tq"},
		{"OPTIONS", "http", "echo", "*"},
		{"CONNECT", "", "echo:443", ""},
		{"GET", "ftp", "echo", "http://echo/"},
		{"M-SEARCH", "http", "[::1]:80", "//x"},
		{"GET", "http", "a b", "/"},
		{"", "http", "echo", "/"},
		{"get", "HTTP", "", "/%zz"},
	} {
		f.Add(s[0], s[1], s[2], s[3], uint8(0xf))
	}
	x := newXnetAcceptance(f)
	f.Fuzz(func(t *testing.T, method, scheme, authority, path string, present uint8) {
		var fields []hpack.HeaderField
		for i, hf := range []hpack.HeaderField{
			{Name: ":method", Value: method}, {Name: ":scheme", Value: scheme},
			{Name: ":authority", Value: authority}, {Name: ":path", Value: path},
		} {
			if present&(1<<i) != 0 {
				fields = append(fields, hf)
			}
		}
		var hbuf bytes.Buffer
		enc := hpack.NewEncoder(&hbuf)
		for _, hf := range fields {
			_ = enc.WriteField(hf)
		}
		var frames bytes.Buffer
		fr := http2.NewFramer(&frames, nil)
		// One frame: fuzzed values may make a block over 16 KiB.
		if hbuf.Len() > h2DefaultFrame {
			return
		}
		_ = fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 1, BlockFragment: hbuf.Bytes(), EndStream: true, EndHeaders: true})

		req, sidecarErr := sidecarRequest(frames.Bytes())
		xnetOK := x.accepts(t, frames.Bytes())
		sidecarOK := sidecarErr == nil
		// net/http answers OPTIONS * itself, without the handler.
		if sidecarOK && !xnetOK && !(method == http.MethodOptions && path == "*") {
			t.Fatalf("%q %q %q %q (present %#x): the sidecar accepts, Go refuses", method, scheme, authority, path, present)
		}
		if !sidecarOK && xnetOK && !stricterRule(method, scheme, authority, path) {
			t.Fatalf("%q %q %q %q (present %#x): Go accepts, the sidecar refuses: %v", method, scheme, authority, path, present, sidecarErr)
		}
		if !sidecarOK || method == http.MethodConnect {
			return
		}
		line := req.Method + " " + req.URL.RequestURI() + " HTTP/1.1\r\nHost: x\r\n\r\n"
		back, err := http.ReadRequest(bufio.NewReader(strings.NewReader(line)))
		if err != nil || back.Method != req.Method || back.RequestURI != req.URL.RequestURI() {
			t.Fatalf("accepted %q %q: request line %q reads back as %v, %v", method, path, line, back, err)
		}
	})
}

// stricterRule reports whether a request breaks a rule the sidecar holds
// and Go's server does not: a method that is not a token, a :path that
// is not an absolute path of visible bytes, an :authority that is not a
// valid host.
func stricterRule(method, scheme, authority, path string) bool {
	if method == http.MethodConnect {
		return !httpguts.ValidHostHeader(authority)
	}
	return !httpwire.ValidToken(method) || !validPseudoPath(path, method) || !httpguts.ValidHostHeader(authority)
}

// sidecarRequest reads one request's frames as the server does (readFrame,
// then newRequest) and returns the request, or why it is malformed.
func sidecarRequest(frames []byte) (*http.Request, error) {
	sc := &serverConn{conn: newConn(fakeConn{r: bytes.NewReader(frames)}, zap.NewNop()), remote: "fuzz"}
	f, err := sc.readFrame()
	if err != nil {
		return nil, err
	}
	mh, ok := f.(*http2.MetaHeadersFrame)
	if !ok {
		return nil, fmt.Errorf("read %v, not HEADERS", f.Header().Type)
	}
	st := &serverStream{sc: sc, id: mh.StreamID}
	req, err := sc.newRequest(st, mh)
	if st.cancel != nil {
		st.cancel()
	}
	return req, err
}

// xnetAcceptance serves HTTP/2 connections with Go's server (net/http's
// h2c, the x/net server bundled), to ask it whether it takes a request.
type xnetAcceptance struct {
	conns chan net.Conn
}

func newXnetAcceptance(tb testing.TB) *xnetAcceptance {
	x := &xnetAcceptance{conns: make(chan net.Conn)}
	protocols := new(http.Protocols)
	protocols.SetUnencryptedHTTP2(true)
	srv := &http.Server{Protocols: protocols, Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("X-Handled", "1")
	})}
	ln := &chanListener{conns: x.conns, closed: make(chan struct{})}
	done := make(chan struct{})
	go func() {
		defer close(done)
		_ = srv.Serve(ln)
	}()
	tb.Cleanup(func() {
		srv.Close()
		<-done
	})
	return x
}

// chanListener accepts the connections sent on conns.
type chanListener struct {
	conns     chan net.Conn
	closed    chan struct{}
	closeOnce sync.Once
}

func (l *chanListener) Accept() (net.Conn, error) {
	select {
	case c := <-l.conns:
		return c, nil
	case <-l.closed:
		return nil, net.ErrClosed
	}
}

func (l *chanListener) Close() error {
	l.closeOnce.Do(func() { close(l.closed) })
	return nil
}

func (l *chanListener) Addr() net.Addr { return &net.TCPAddr{} }

// accepts reports whether Go's server passes the request in frames
// (HEADERS on stream 1) to its handler.
func (x *xnetAcceptance) accepts(t *testing.T, frames []byte) bool {
	client, server := net.Pipe()
	defer client.Close()
	x.conns <- server
	fr := http2.NewFramer(io.Discard, client)
	fr.ReadMetaHeaders = hpack.NewDecoder(4096, nil)
	go func() {
		_, _ = client.Write([]byte(http2.ClientPreface))
		var settings bytes.Buffer
		_ = http2.NewFramer(&settings, nil).WriteSettings()
		_, _ = client.Write(settings.Bytes())
		_, _ = client.Write(frames)
	}()
	_ = client.SetReadDeadline(time.Now().Add(5 * time.Second))
	for {
		f, err := fr.ReadFrame()
		if err != nil {
			t.Fatalf("Go's server: %v", err)
		}
		switch f := f.(type) {
		case *http2.MetaHeadersFrame:
			if f.StreamID == 1 {
				for _, hf := range f.Fields {
					if hf.Name == "x-handled" {
						return true
					}
				}
				return false
			}
		case *http2.RSTStreamFrame:
			if f.StreamID == 1 {
				return false
			}
		case *http2.GoAwayFrame:
			return false
		}
	}
}

// FuzzH2RequestHeaders runs the server's request-header path (HPACK-decoded
// header list to request: readFrame, then newRequest) over header lists
// given as "name: value" lines, and holds every request it accepts to RFC
// 9113: no connection-specific field (8.2.2), te only as "trailers", a
// content-length that is a non-negative integer and, on a stream the
// HEADERS frame ends, zero (8.1.1), a valid method and host, and no Host
// or pseudo-header left in the header. Whatever it refuses, it refuses
// without a panic.
func FuzzH2RequestHeaders(f *testing.F) {
	for _, s := range []struct {
		list      string
		endStream bool
	}{
		{":method: GET\n:scheme: http\n:authority: echo\n:path: /a\n", true},
		{":method: POST\n:scheme: http\n:authority: echo\n:path: /p\ncontent-length: 5\n", false},
		{":method: POST\n:scheme: http\n:authority: echo\n:path: /p\ncontent-length: 5\n", true},
		{":method: POST\n:scheme: http\n:authority: echo\n:path: /p\ncontent-length: -1\n", false},
		{":method: POST\n:scheme: http\n:authority: echo\n:path: /p\ncontent-length: 1, 2\n", false},
		{":method: GET\n:scheme: http\n:authority: echo\n:path: /\nte: trailers\n", true},
		{":method: GET\n:scheme: http\n:authority: echo\n:path: /\nte: gzip\n", true},
		{":method: GET\n:scheme: http\n:authority: echo\n:path: /\nconnection: close\n", true},
		{":method: GET\n:scheme: http\n:authority: echo\n:path: /\ntransfer-encoding: chunked\n", false},
		{":method: GET\n:scheme: http\n:authority: echo\n:path: /\nkeep-alive: 5\nupgrade: h2c\n", true},
		{":method: GET\n:scheme: http\n:path: /\nhost: echo\n", true},
		{":method: GET\n:scheme: http\n:path: /\nhost: a b\n", true},
		{":method: GET\n:scheme: http\n:authority: echo\n:path: /\nx-a: 1\n:status: 200\n", true},
		{":method: GET\n:scheme: http\n:authority: echo\n:path: /\nX-Upper: 1\n", true},
		{":method: POST\n:scheme: https\n:authority: echo\n:path: /p\ntrailer: grpc-status, x-t\ncontent-length: 0\n", false},
		{":method: CONNECT\n:authority: echo:443\n", false},
	} {
		f.Add(s.list, s.endStream)
	}
	f.Fuzz(func(t *testing.T, list string, endStream bool) {
		var fields []hpack.HeaderField
		for line := range strings.SplitSeq(list, "\n") {
			if line == "" {
				continue
			}
			// A pseudo-header's name starts with its colon: split after it.
			name, value, ok := strings.Cut(line[min(1, len(line)):], ": ")
			if !ok {
				return
			}
			fields = append(fields, hpack.HeaderField{Name: line[:min(1, len(line))] + name, Value: value})
		}
		var hbuf bytes.Buffer
		enc := hpack.NewEncoder(&hbuf)
		for _, hf := range fields {
			_ = enc.WriteField(hf)
		}
		if hbuf.Len() > h2DefaultFrame {
			return
		}
		var frames bytes.Buffer
		_ = http2.NewFramer(&frames, nil).WriteHeaders(http2.HeadersFrameParam{
			StreamID: 1, BlockFragment: hbuf.Bytes(), EndStream: endStream, EndHeaders: true})
		req, err := sidecarRequest(frames.Bytes())
		if err != nil {
			return
		}
		var contentLength []string
		for _, hf := range fields {
			switch hf.Name {
			case "connection", "keep-alive", "proxy-connection", "transfer-encoding", "upgrade":
				t.Fatalf("%q: accepted with connection-specific field %s", list, hf.Name)
			case "te":
				if hf.Value != "trailers" {
					t.Fatalf("%q: accepted with te: %q", list, hf.Value)
				}
			case "content-length":
				contentLength = append(contentLength, hf.Value)
			}
			if hf.Name != strings.ToLower(hf.Name) {
				t.Fatalf("%q: accepted with upper-case field name %q", list, hf.Name)
			}
		}
		switch {
		case endStream && len(contentLength) > 0 && contentLength[0] != "" && contentLength[0] != "0":
			t.Fatalf("%q: accepted content-length %q on a stream with no body", list, contentLength[0])
		case endStream && req.Body != http.NoBody:
			t.Fatalf("%q: a stream with no body has a request body", list)
		case !endStream && len(contentLength) > 0 && contentLength[0] != "":
			n, err := strconv.ParseInt(contentLength[0], 10, 64)
			if err != nil || n < 0 || req.ContentLength != n {
				t.Fatalf("%q: content-length %q became ContentLength %d", list, contentLength[0], req.ContentLength)
			}
		case !endStream && len(contentLength) == 0 && req.ContentLength != -1:
			t.Fatalf("%q: no content-length became ContentLength %d, want -1", list, req.ContentLength)
		}
		if !httpwire.ValidToken(req.Method) {
			t.Fatalf("%q: accepted method %q", list, req.Method)
		}
		if !httpguts.ValidHostHeader(req.Host) {
			t.Fatalf("%q: accepted host %q", list, req.Host)
		}
		for k := range req.Header {
			if k == "Host" || strings.HasPrefix(k, ":") || !httpwire.ValidToken(k) {
				t.Fatalf("%q: request header keeps field %q", list, k)
			}
		}
	})
}
