package h2test

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"
)

// RawConn is an app connection driven frame by frame. Frames written with
// Fr, Headers, Request and Data are buffered until Flush; ReadUntil and
// MustRead handle the server's frames, answering its SETTINGS and PING,
// and record what came in the fields below.
type RawConn struct {
	t    testing.TB
	NC   net.Conn
	Fr   *http2.Framer
	wbuf bytes.Buffer // frames not yet written: Flush sends them in one write
	enc  *hpack.Encoder
	hbuf bytes.Buffer

	Streams    map[uint32]*RawResp
	Settings   bool // the server's SETTINGS came
	ConnWindow bool // the server's connection WINDOW_UPDATE came
	MaxStreams uint32
	GoAway     *http2.GoAwayFrame
	Err        error // the read side failed: io.EOF once the server closed
}

// RawResp is what came on one stream.
type RawResp struct {
	Header, Trailer []hpack.HeaderField
	Body            []byte
	DataFrames      int
	RST             *http2.ErrCode
	Done            bool // END_STREAM or RST_STREAM came
}

// Field is the value of name in fields, or "".
func (r *RawResp) Field(fields []hpack.HeaderField, name string) string {
	for _, f := range fields {
		if f.Name == name {
			return f.Value
		}
	}
	return ""
}

// Status is the :status of the answer, or "".
func (r *RawResp) Status() string { return r.Field(r.Header, ":status") }

func (r *RawResp) String() string {
	rst := "none"
	if r.RST != nil {
		rst = r.RST.String()
	}
	return fmt.Sprintf("status %q, %d body bytes in %d DATA frames, done %v, RST_STREAM %s",
		r.Status(), len(r.Body), r.DataFrames, r.Done, rst)
}

// Dial connects to addr and sends the client preface, and with settings a
// SETTINGS frame and windows wide enough that the test never needs to send
// WINDOW_UPDATE. The test's cleanup closes the connection.
func Dial(t testing.TB, addr string, settings bool) *RawConn {
	t.Helper()
	nc, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { nc.Close() })
	c := &RawConn{t: t, NC: nc, Streams: make(map[uint32]*RawResp)}
	c.Fr = http2.NewFramer(&c.wbuf, bufio.NewReader(nc))
	c.Fr.ReadMetaHeaders = hpack.NewDecoder(4096, nil)
	c.Fr.MaxHeaderListSize = 16 << 20
	c.enc = hpack.NewEncoder(&c.hbuf)
	c.wbuf.WriteString(http2.ClientPreface)
	if settings {
		_ = c.Fr.WriteSettings(http2.Setting{ID: http2.SettingInitialWindowSize, Val: 1 << 30})
		_ = c.Fr.WriteWindowUpdate(0, 1<<30)
	}
	c.Flush()
	return c
}

// Flush writes the frames buffered so far in one write. Errors are left to
// the read side to see.
func (c *RawConn) Flush() {
	_ = c.NC.SetWriteDeadline(time.Now().Add(10 * time.Second))
	_, _ = c.NC.Write(c.wbuf.Bytes())
	c.wbuf.Reset()
}

// Buffered is how many bytes of frames wait for Flush.
func (c *RawConn) Buffered() int { return c.wbuf.Len() }

// Headers buffers a header block of name, value pairs on stream id, in
// CONTINUATION frames past 16 KiB.
func (c *RawConn) Headers(id uint32, end bool, fields ...string) {
	block := c.HeaderBlock(fields...)
	for first := true; first || len(block) > 0; first = false {
		n := min(len(block), 16<<10)
		frag := block[:n]
		block = block[n:]
		if first {
			_ = c.Fr.WriteHeaders(http2.HeadersFrameParam{StreamID: id, BlockFragment: frag, EndStream: end, EndHeaders: len(block) == 0})
		} else {
			_ = c.Fr.WriteContinuation(id, len(block) == 0, frag)
		}
	}
}

// HeaderBlock encodes name, value pairs with the connection's HPACK
// encoder, for a test that writes its own HEADERS frame. The block is
// valid until the next call.
func (c *RawConn) HeaderBlock(fields ...string) []byte {
	c.hbuf.Reset()
	for i := 0; i+1 < len(fields); i += 2 {
		_ = c.enc.WriteField(hpack.HeaderField{Name: fields[i], Value: fields[i+1]})
	}
	return c.hbuf.Bytes()
}

// Request buffers a request header block for path on stream id, to
// authority "echo", with the extra name, value pairs after the pseudo
// headers.
func (c *RawConn) Request(id uint32, method, path string, end bool, extra ...string) {
	fields := append([]string{":method", method, ":scheme", "http", ":authority", "echo", ":path", path}, extra...)
	c.Headers(id, end, fields...)
}

// Data buffers p as DATA frames of 16 KiB at most on stream id.
func (c *RawConn) Data(id uint32, end bool, p []byte) {
	for first := true; first || len(p) > 0; first = false {
		n := min(len(p), 16<<10)
		_ = c.Fr.WriteData(id, end && n == len(p), p[:n])
		p = p[n:]
	}
}

// Stream is what came on stream id so far.
func (c *RawConn) Stream(id uint32) *RawResp {
	s := c.Streams[id]
	if s == nil {
		s = &RawResp{}
		c.Streams[id] = s
	}
	return s
}

// ReadUntil handles the server's frames until done reports true, the
// connection fails, or within passes.
func (c *RawConn) ReadUntil(within time.Duration, done func() bool) error {
	deadline := time.Now().Add(within)
	for !done() {
		if c.Err != nil {
			return c.Err
		}
		_ = c.NC.SetReadDeadline(deadline)
		f, err := c.Fr.ReadFrame()
		if err != nil {
			if !errors.Is(err, os.ErrDeadlineExceeded) {
				c.Err = err
			}
			return err
		}
		c.Handle(f)
	}
	return nil
}

// MustRead is ReadUntil that fails the test when done does not come true.
func (c *RawConn) MustRead(within time.Duration, what string, done func() bool) {
	c.t.Helper()
	if err := c.ReadUntil(within, done); err != nil {
		c.t.Fatalf("waiting for %s: %v", what, err)
	}
}

// Handle records f, and answers it when it is a SETTINGS or a PING.
func (c *RawConn) Handle(f http2.Frame) {
	switch f := f.(type) {
	case *http2.SettingsFrame:
		if !f.IsAck() {
			c.Settings = true
			if v, ok := f.Value(http2.SettingMaxConcurrentStreams); ok {
				c.MaxStreams = v
			}
			_ = c.Fr.WriteSettingsAck()
			c.Flush()
		}
	case *http2.WindowUpdateFrame:
		if f.StreamID == 0 {
			c.ConnWindow = true
		}
	case *http2.PingFrame:
		if !f.IsAck() {
			_ = c.Fr.WritePing(true, f.Data)
			c.Flush()
		}
	case *http2.GoAwayFrame:
		g := *f
		c.GoAway = &g
	case *http2.MetaHeadersFrame:
		s := c.Stream(f.StreamID)
		if s.Header == nil {
			s.Header = f.Fields
		} else {
			s.Trailer = f.Fields
		}
		s.Done = s.Done || f.StreamEnded()
	case *http2.DataFrame:
		s := c.Stream(f.StreamID)
		s.Body = append(s.Body, f.Data()...)
		s.DataFrames++
		s.Done = s.Done || f.StreamEnded()
	case *http2.RSTStreamFrame:
		s := c.Stream(f.StreamID)
		code := f.ErrCode
		s.RST = &code
		s.Done = true
	}
}

// RawNode is a node driven frame by frame: answer decides what each
// request's HEADERS get. It counts the request HEADERS it received, and
// passes on the codes of the GOAWAY frames it received, as many as GoAway
// holds.
type RawNode struct {
	Addr    string
	Headers atomic.Int64
	GoAway  chan http2.ErrCode
}

// StartRawNode serves raw HTTP/2 on loopback until the test ends, calling
// answer for each request's HEADERS on the connection's read loop.
func StartRawNode(t testing.TB, answer func(fr *http2.Framer, f *http2.MetaHeadersFrame)) *RawNode {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	n := &RawNode{Addr: ln.Addr().String(), GoAway: make(chan http2.ErrCode, 16)}
	AcceptEach(t, ln, func(nc net.Conn) { n.serve(nc, answer) })
	return n
}

func (n *RawNode) serve(nc net.Conn, answer func(*http2.Framer, *http2.MetaHeadersFrame)) {
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
			n.Headers.Add(1)
			answer(fr, f)
		case *http2.GoAwayFrame:
			select {
			case n.GoAway <- f.ErrCode:
			default:
			}
		}
	}
}

// ConnErrorCases are frames that commit a connection error other than
// PROTOCOL_ERROR, sent by a client to the sidecar or by a node to it, and
// the code the sidecar's GOAWAY must carry (RFC 9113, 5.4.1). stream is the
// stream of a request whose body is still open.
var ConnErrorCases = []struct {
	Name string
	Send func(fr *http2.Framer, stream uint32)
	Code http2.ErrCode
}{
	{"frame over the maximum frame size", func(fr *http2.Framer, stream uint32) {
		// The sidecar never raises SETTINGS_MAX_FRAME_SIZE from its
		// default of 16 KiB.
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
