package h2

import (
	"bufio"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"go.uber.org/zap"
	"golang.org/x/net/http/httpguts"
	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"

	"github.com/sidecarlb/sidecar/internal/httpwire"
)

// The connection core client and server share (see doc.go): the output
// buffer and its writer, frame reading, header blocks, flow control.

const (
	// h2StreamWindow and h2ConnWindow are the receive windows the sidecar
	// advertises: how much a peer may send before the sidecar's consumer
	// reads. They bound the memory one stream and one connection buffer.
	h2StreamWindow = 256 << 10
	h2ConnWindow   = 4 << 20
	// h2MaxOutBuffer is how much output may wait for the writer before
	// producers of DATA block: a peer that stops reading its socket holds
	// no more than this of the sidecar's memory per connection.
	h2MaxOutBuffer = 1 << 20
	// h2MaxHeaderList bounds a decoded header block.
	h2MaxHeaderList = 1 << 20
	h2DefaultFrame  = 16 << 10
	h2InitialWindow = 65535
	// h2MaxContinuations bounds the CONTINUATION frames of one header
	// block: twice what a header list of h2MaxHeaderList takes in frames
	// of the default size. Frames that decode to no field (empty ones,
	// HPACK table-size updates) count as much as any: one more ends the
	// connection with ENHANCE_YOUR_CALM.
	h2MaxContinuations = 128
	// h2MaxQueuedControlFrames bounds the frames other than DATA and
	// header blocks (SETTINGS and PING acknowledgements, RST_STREAM,
	// WINDOW_UPDATE, GOAWAY) waiting for the writer, most of them answers
	// to the peer's frames. A peer that sends such frames and does not
	// read the answers gets its connection closed past it, as x/net's
	// maxQueuedControlFrames has it, instead of growing the queue.
	h2MaxQueuedControlFrames = 10000
)

// h2WriteStall bounds how long a write to the peer may move no byte: a
// peer that stops reading its socket, streams open or not, has its
// connection closed after between half of it and all of it. A var, for
// tests.
var h2WriteStall = 30 * time.Second

var (
	errH2ConnClosed = errors.New("http2: connection closed")
	// errH2Panicked ends a connection, or a stream, whose goroutine
	// panicked.
	errH2Panicked = errors.New("http2: connection goroutine panicked")
	// errH2ControlFlood ends a connection past h2MaxQueuedControlFrames.
	errH2ControlFlood = errors.New("http2: peer does not read the answers to its control frames")
)

// conn is one HTTP/2 connection's shared state: the frame reader, the
// batched writer, the header encoder and the connection's send window.
type conn struct {
	nc  net.Conn
	log *zap.Logger   // for panics of the connection's goroutines
	fr  *http2.Framer // read side: the read loop only
	// Header blocks, decoded by the read loop (readFrame) into meta, which
	// is reused from block to block.
	hdec *hpack.Decoder
	meta http2.MetaHeadersFrame
	hs   headerBlockState
	// maxHeaderList bounds a decoded header block (RFC 9113's header list
	// size); h2MaxHeaderList unless setMaxHeaderList lowers it.
	maxHeaderList uint32
	// valueChunk is what is left of the chunk header values are carved
	// from (values); the read loop's.
	valueChunk []string
	// lastType is the type of the frame readFrame read last, one it
	// failed to parse too: a StreamError alone does not say whether its
	// frame opened the stream.
	lastType http2.FrameType
	// headerTimeout bounds reading the rest of a header block once its
	// HEADERS frame came; zero for no bound. Set before the read loop
	// starts.
	headerTimeout time.Duration
	// writeStall is h2WriteStall when the connection was made; writeBy is
	// the write deadline the writer last set. The writer's.
	writeStall time.Duration
	writeBy    time.Time
	// ctrlQueued counts the control frames in out (see
	// h2MaxQueuedControlFrames): added to under mu, read by the read loop.
	ctrlQueued atomic.Int32

	mu   sync.Mutex
	cond sync.Cond // window updates, output drained, connection failed

	out      []byte // frames waiting for the writer; under mu
	spare    []byte
	flushReq chan struct{} // capacity 1: the writer has work
	done     chan struct{} // closed when the connection fails or closes
	err      error         // why; under mu
	closing  bool          // close once the buffered output is sent; under mu
	closeBy  time.Time     // the write deadline closeAfterFlush set; under mu
	// sendWaits counts the times sendData waited for a window or for
	// room, under mu: each wait must follow a change, never a pass of the
	// writer that wrote nothing.
	sendWaits int

	enc    *hpack.Encoder // under mu: header blocks go out in encoding order
	encBuf []byte

	sendWin      outflow // connection send window; under mu
	peerInitWin  int64   // the peer's SETTINGS_INITIAL_WINDOW_SIZE; under mu
	peerMaxFrame uint32  // under mu
	// peerMaxStreams is the peer's SETTINGS_MAX_CONCURRENT_STREAMS: 100
	// until its SETTINGS say otherwise. Under mu.
	peerMaxStreams uint32

	recvUnacked int64 // received connection-level bytes consumed, not yet acknowledged; under mu
	recvWin     int64 // what the peer may still send on the connection; under mu
}

func newConn(nc net.Conn, log *zap.Logger) *conn {
	c := &conn{
		nc:             nc,
		log:            log,
		flushReq:       make(chan struct{}, 1),
		done:           make(chan struct{}),
		sendWin:        h2InitialWindow,
		peerInitWin:    h2InitialWindow,
		peerMaxFrame:   h2DefaultFrame,
		peerMaxStreams: 100,
		recvWin:        h2ConnWindow,
		maxHeaderList:  h2MaxHeaderList,
		writeStall:     h2WriteStall,
	}
	c.cond.L = &c.mu
	c.fr = http2.NewFramer(nil, bufio.NewReaderSize(nc, 16<<10))
	c.fr.SetReuseFrames()
	// The sidecar never raises SETTINGS_MAX_FRAME_SIZE, so a larger frame
	// is the peer's error, not a buffer of up to 16 MiB to grow.
	c.fr.SetMaxReadFrameSize(h2DefaultFrame)
	c.fr.MaxHeaderListSize = h2MaxHeaderList
	c.hdec = hpack.NewDecoder(4096, c.emitField)
	c.hdec.SetMaxStringLength(h2MaxHeaderList)
	c.enc = hpack.NewEncoder(headerSink{c})
	return c
}

// setMaxHeaderList sets the bound of a decoded header block, before the
// first is read: a block over it comes back Truncated, and a single field
// over it fails the connection, as x/net's Framer does.
func (c *conn) setMaxHeaderList(n uint32) {
	c.maxHeaderList = n
	c.fr.MaxHeaderListSize = n
	c.hdec.SetMaxStringLength(int(n))
}

// readFrame reads the next frame. A header block (HEADERS and its
// CONTINUATION frames) comes back decoded as a *http2.MetaHeadersFrame, as
// x/net's Framer.ReadMetaHeaders does, with the same checks; but the frame
// and its field slice are the connection's own, reused for every block, so
// they are valid only until the next call. A field-level violation is a
// StreamError; a block over the limits or undecodable, a ConnectionError.
func (c *conn) readFrame() (http2.Frame, error) {
	if c.ctrlQueued.Load() > h2MaxQueuedControlFrames {
		return nil, errH2ControlFlood
	}
	fh, err := c.fr.ReadFrameHeader()
	if err != nil {
		return nil, frameSizeError(err)
	}
	c.lastType = fh.Type
	f, err := c.fr.ReadFrameForHeader(fh)
	if err != nil {
		return nil, frameSizeError(err)
	}
	hf, ok := f.(*http2.HeadersFrame)
	if !ok {
		return f, nil
	}
	mh := &c.meta
	mh.HeadersFrame = hf
	mh.Fields = mh.Fields[:0]
	mh.Truncated = false
	c.hs = headerBlockState{remain: c.maxHeaderList}
	c.hdec.SetEmitEnabled(true)
	var block interface {
		HeaderBlockFragment() []byte
		HeadersEnded() bool
	} = hf
	if !hf.HeadersEnded() && c.headerTimeout > 0 {
		// The rest of the block comes as promptly as an HTTP/1.1 head.
		_ = c.nc.SetReadDeadline(time.Now().Add(c.headerTimeout))
		defer c.nc.SetReadDeadline(time.Time{})
	}
	// The block's bytes on the wire and its CONTINUATION frames, which
	// fields that decode to nothing do not bound.
	wire, continuations := 0, 0
	for {
		frag := block.HeaderBlockFragment()
		wire += len(frag)
		// A sender far over the header list limit is not decoded at all,
		// nor is anything after an invalid field. A field's encoding, as
		// any encoder makes it, is no larger than the 32 bytes over its
		// name and value it counts for in the list, so a block of twice
		// the limit on the wire is far over it decoded, or padded out with
		// what decodes to no field (empty CONTINUATIONs, table-size
		// updates).
		if int64(len(frag)) > int64(2*c.hs.remain) || c.hs.invalid != nil || wire > 2*int(c.maxHeaderList) {
			return nil, http2.ConnectionError(http2.ErrCodeProtocol)
		}
		if _, err := c.hdec.Write(frag); err != nil {
			return nil, http2.ConnectionError(http2.ErrCodeCompression)
		}
		if block.HeadersEnded() {
			break
		}
		if continuations++; continuations > h2MaxContinuations {
			return nil, http2.ConnectionError(http2.ErrCodeEnhanceYourCalm)
		}
		f, err := c.fr.ReadFrame()
		if err != nil {
			return nil, frameSizeError(err)
		}
		block = f.(*http2.ContinuationFrame) // the Framer checks the order
	}
	if err := c.hdec.Close(); err != nil {
		return nil, http2.ConnectionError(http2.ErrCodeCompression)
	}
	if c.hs.invalid != nil {
		return nil, http2.StreamError{StreamID: hf.StreamID, Code: http2.ErrCodeProtocol, Cause: c.hs.invalid}
	}
	if err := checkPseudos(mh.PseudoFields()); err != nil {
		return nil, http2.StreamError{StreamID: hf.StreamID, Code: http2.ErrCodeProtocol, Cause: err}
	}
	return mh, nil
}

// frameSizeError turns the Framer's error for a frame over the maximum
// size into the connection error it is (RFC 9113, 4.2).
func frameSizeError(err error) error {
	if errors.Is(err, http2.ErrFrameTooLarge) {
		return http2.ConnectionError(http2.ErrCodeFrameSize)
	}
	return err
}

// connErrorCode returns the code of err when it is a connection error, for
// the GOAWAY that ends the connection (RFC 9113, 5.4.1); otherwise
// PROTOCOL_ERROR and false.
func connErrorCode(err error) (http2.ErrCode, bool) {
	var ce http2.ConnectionError
	if errors.As(err, &ce) {
		return http2.ErrCode(ce), true
	}
	return http2.ErrCodeProtocol, false
}

// headerBlockState is what decoding one header block keeps.
type headerBlockState struct {
	remain     uint32 // of the header list size
	sawRegular bool
	invalid    error
}

// emitField takes one decoded field of the block readFrame decodes.
func (c *conn) emitField(hf hpack.HeaderField) {
	hs := &c.hs
	switch {
	case !httpguts.ValidHeaderFieldValue(hf.Value):
		hs.invalid = fmt.Errorf("invalid header field value for %q", hf.Name)
	case strings.HasPrefix(hf.Name, ":"):
		if hs.sawRegular {
			hs.invalid = errors.New("pseudo header field after regular")
		}
	default:
		hs.sawRegular = true
		if !httpwire.ValidLowerToken(hf.Name) {
			hs.invalid = fmt.Errorf("invalid header field name %q", hf.Name)
		}
	}
	if hs.invalid != nil {
		c.hdec.SetEmitEnabled(false)
		return
	}
	size := hf.Size()
	if size > hs.remain {
		c.hdec.SetEmitEnabled(false)
		c.meta.Truncated = true
		hs.remain = 0
		return
	}
	hs.remain -= size
	c.meta.Fields = append(c.meta.Fields, hf)
}

// checkPseudos checks a block's pseudo-header fields: known, not repeated,
// and not mixing request and response fields.
func checkPseudos(pf []hpack.HeaderField) error {
	var isRequest, isResponse bool
	for i, hf := range pf {
		switch hf.Name {
		case ":method", ":path", ":scheme", ":authority", ":protocol":
			isRequest = true
		case ":status":
			isResponse = true
		default:
			return fmt.Errorf("invalid pseudo-header %q", hf.Name)
		}
		for _, hf2 := range pf[:i] {
			if hf.Name == hf2.Name {
				return fmt.Errorf("duplicate pseudo-header %q", hf.Name)
			}
		}
	}
	if isRequest && isResponse {
		return errors.New("mix of request and response pseudo headers")
	}
	return nil
}

// headerSink lets the hpack encoder append to the connection's scratch
// buffer.
type headerSink struct{ c *conn }

func (s headerSink) Write(p []byte) (int, error) {
	s.c.encBuf = append(s.c.encBuf, p...)
	return len(p), nil
}

// writeLoop sends what producers have buffered. It yields once before each
// write so that other goroutines made runnable by the same burst of input
// add their frames to the same write. A panic ends the connection as a
// failed write would.
func (c *conn) writeLoop() {
	defer c.recoverPanic()
	for {
		select {
		case <-c.flushReq:
		case <-c.done:
			return
		}
		runtime.Gosched()
		c.mu.Lock()
		buf, closing := c.out, c.closing
		c.out, c.spare = c.spare[:0], nil
		c.ctrlQueued.Store(0)
		c.mu.Unlock()
		if len(buf) > 0 {
			if err := c.write(buf); err != nil {
				c.fail(err)
				return
			}
		}
		c.mu.Lock()
		if cap(buf) <= 4*h2MaxOutBuffer {
			c.spare = buf[:0]
		}
		// Producers wait for room only while the output is at the cap, so
		// only a write of that much can have made room for them: a pass
		// that wrote less wakes nobody.
		if len(buf) >= h2MaxOutBuffer && len(c.out) < h2MaxOutBuffer {
			c.cond.Broadcast()
		}
		drained := closing && len(c.out) == 0
		c.mu.Unlock()
		if drained {
			c.fail(errH2ConnClosed)
			return
		}
	}
}

// write sends buf, failing when no byte of it moves for the write stall
// (armWriteDeadline). The writer's.
func (c *conn) write(buf []byte) error {
	for {
		c.armWriteDeadline()
		n, err := c.nc.Write(buf)
		if err == nil || n == 0 || !errors.Is(err, os.ErrDeadlineExceeded) {
			return err
		}
		buf = buf[n:] // the peer reads, slowly: a new deadline for the rest
	}
}

// armWriteDeadline moves the write deadline a write stall ahead once less
// than half of it is left, so that most writes set none; but a deadline
// closeAfterFlush set stays. The writer's; c.mu must not be held.
func (c *conn) armWriteDeadline() {
	if c.writeStall <= 0 {
		return
	}
	now := time.Now()
	if c.writeBy.Sub(now) >= c.writeStall/2 {
		return
	}
	c.writeBy = now.Add(c.writeStall)
	_ = c.nc.SetWriteDeadline(c.writeBy)
	c.mu.Lock()
	closeBy := c.closeBy
	c.mu.Unlock()
	if !closeBy.IsZero() {
		// closeAfterFlush set it while this was being set.
		c.writeBy = closeBy
		_ = c.nc.SetWriteDeadline(closeBy)
	}
}

// logPanic logs a panic recovered on one of the connection's goroutines,
// with its stack.
func (c *conn) logPanic(msg string, v any) {
	c.log.Error(msg, zap.Stringer("remote", c.nc.RemoteAddr()), zap.Any("panic", v), zap.Stack("stack"))
}

// recoverPanic, deferred by the writer and by the connection's timer
// callbacks, logs a panic of theirs and ends the connection, as a failed
// write would, instead of the process. c.mu must not be held when it runs.
func (c *conn) recoverPanic() {
	if v := recover(); v != nil {
		c.logPanic("http2 connection panicked", v)
		c.fail(errH2Panicked)
	}
}

// flushLocked asks the writer to send what is buffered. c.mu must be held.
func (c *conn) flushLocked() {
	select {
	case c.flushReq <- struct{}{}:
	default:
	}
}

// fail ends the connection: producers and waiters see err, the socket
// closes. It is safe to call more than once.
func (c *conn) fail(err error) {
	c.mu.Lock()
	if c.err != nil {
		c.mu.Unlock()
		return
	}
	c.err = err
	close(c.done)
	c.cond.Broadcast()
	c.mu.Unlock()
	c.nc.Close()
}

// closeAfterFlush has the writer send what is buffered, then close the
// connection; a peer that does not read gets a second.
func (c *conn) closeAfterFlush() {
	c.mu.Lock()
	if c.err == nil && !c.closing {
		c.closing = true
		c.flushLocked()
	}
	c.closeBy = time.Now().Add(time.Second)
	closeBy := c.closeBy
	c.mu.Unlock()
	_ = c.nc.SetWriteDeadline(closeBy)
}

// closed waits until the connection has failed or closed, at most d.
func (c *conn) closed(d time.Duration) {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-c.done:
	case <-t.C:
	}
}

// waitLocked blocks on c.cond until woken, giving up when ctx ends. c.mu
// must be held; it is held again on return.
func (c *conn) waitLocked(ctx context.Context) error {
	if ctx == nil {
		c.cond.Wait()
		return c.err
	}
	if err := ctx.Err(); err != nil {
		return err
	}
	stop := context.AfterFunc(ctx, func() {
		c.mu.Lock()
		c.cond.Broadcast()
		c.mu.Unlock()
	})
	c.cond.Wait()
	stop()
	if c.err != nil {
		return c.err
	}
	return ctx.Err()
}

// Frame encoders: they append to c.out and must be called with c.mu held.

func (c *conn) frameHeaderLocked(length int, typ http2.FrameType, flags http2.Flags, stream uint32) {
	if typ != http2.FrameData && typ != http2.FrameHeaders && typ != http2.FrameContinuation {
		c.ctrlQueued.Add(1)
	}
	c.out = append(c.out, byte(length>>16), byte(length>>8), byte(length), byte(typ), byte(flags))
	c.out = binary.BigEndian.AppendUint32(c.out, stream&(1<<31-1))
}

func (c *conn) writeDataLocked(stream uint32, data []byte, end bool) {
	var flags http2.Flags
	if end {
		flags = http2.FlagDataEndStream
	}
	c.frameHeaderLocked(len(data), http2.FrameData, flags, stream)
	c.out = append(c.out, data...)
}

func (c *conn) writeWindowUpdateLocked(stream uint32, n uint32) {
	c.frameHeaderLocked(4, http2.FrameWindowUpdate, 0, stream)
	c.out = binary.BigEndian.AppendUint32(c.out, n)
}

func (c *conn) writeRSTLocked(stream uint32, code http2.ErrCode) {
	c.frameHeaderLocked(4, http2.FrameRSTStream, 0, stream)
	c.out = binary.BigEndian.AppendUint32(c.out, uint32(code))
}

func (c *conn) writeSettingsLocked(settings ...http2.Setting) {
	c.frameHeaderLocked(6*len(settings), http2.FrameSettings, 0, 0)
	for _, s := range settings {
		c.out = binary.BigEndian.AppendUint16(c.out, uint16(s.ID))
		c.out = binary.BigEndian.AppendUint32(c.out, s.Val)
	}
}

func (c *conn) writeSettingsAckLocked() {
	c.frameHeaderLocked(0, http2.FrameSettings, http2.FlagSettingsAck, 0)
}

func (c *conn) writePingLocked(ack bool, data [8]byte) {
	var flags http2.Flags
	if ack {
		flags = http2.FlagPingAck
	}
	c.frameHeaderLocked(8, http2.FramePing, flags, 0)
	c.out = append(c.out, data[:]...)
}

func (c *conn) writeGoAwayLocked(last uint32, code http2.ErrCode) {
	c.frameHeaderLocked(8, http2.FrameGoAway, 0, 0)
	c.out = binary.BigEndian.AppendUint32(c.out, last&(1<<31-1))
	c.out = binary.BigEndian.AppendUint32(c.out, uint32(code))
}

// writeHeaderBlockLocked sends c.encBuf as a HEADERS frame and as many
// CONTINUATION frames as the peer's frame size needs.
func (c *conn) writeHeaderBlockLocked(stream uint32, end bool) {
	block := c.encBuf
	max := int(c.peerMaxFrame)
	first := true
	for first || len(block) > 0 {
		n := min(len(block), max)
		frag := block[:n]
		block = block[n:]
		var flags http2.Flags
		if len(block) == 0 {
			flags |= http2.FlagHeadersEndHeaders
		}
		typ := http2.FrameContinuation
		if first {
			typ = http2.FrameHeaders
			if end {
				flags |= http2.FlagHeadersEndStream
			}
		}
		c.frameHeaderLocked(n, typ, flags, stream)
		c.out = append(c.out, frag...)
		first = false
	}
	c.encBuf = c.encBuf[:0]
}

// encodeLocked adds one header field to c.encBuf.
func (c *conn) encodeLocked(name, value string) {
	_ = c.enc.WriteField(hpack.HeaderField{Name: name, Value: value})
}

// h2FieldAllowed reports whether a header field may be sent over HTTP/2:
// connection-specific fields may not (RFC 9113, 8.2.2).
func h2FieldAllowed(k string) bool {
	for _, f := range h2ConnectionFields {
		if len(k) == len(f) && strings.EqualFold(k, f) {
			return false
		}
	}
	return true
}

var h2ConnectionFields = [...]string{"connection", "keep-alive", "proxy-connection", "transfer-encoding", "upgrade", "host", "te"}

// encodeHeaderLocked adds header k's values to c.encBuf, unless HTTP/2
// forbids the field. c.mu must be held.
func (c *conn) encodeHeaderLocked(k string, vv []string) {
	if !h2FieldAllowed(k) {
		return
	}
	name := httpwire.LowerKey(k)
	for _, v := range vv {
		c.encodeLocked(name, v)
	}
}

// receivedLocked accounts a DATA frame against the connection's receive
// window, frees its padding at once, and returns its payload. c.mu must be
// held.
func (c *conn) receivedLocked(f *http2.DataFrame) ([]byte, error) {
	length := int(f.Length)
	c.recvWin -= int64(length)
	if c.recvWin < 0 {
		return nil, http2.ConnectionError(http2.ErrCodeFlowControl)
	}
	data := f.Data()
	if pad := length - len(data); pad > 0 {
		c.consumedLocked(pad)
	}
	return data, nil
}

// header builds an http.Header from decoded fields, the values carved
// from the connection's chunk (see values). With joinCookies, cookie
// fields, which HTTP/2 may split (RFC 9113, 8.2.3), are joined back into
// one. Only the read loop may call it.
func (c *conn) header(fields []hpack.HeaderField, joinCookies bool) http.Header {
	header := make(http.Header, len(fields))
	values := c.values(len(fields))
	var cookies []string
	for i, hf := range fields {
		if joinCookies && hf.Name == "cookie" {
			cookies = append(cookies, hf.Value)
			continue
		}
		k := httpwire.CanonicalKey(hf.Name)
		if vv, ok := header[k]; ok {
			header[k] = append(vv, hf.Value)
			continue
		}
		values[i] = hf.Value
		header[k] = values[i : i+1 : i+1]
	}
	if len(cookies) > 0 {
		header["Cookie"] = []string{strings.Join(cookies, "; ")}
	}
	return header
}

// h2ValueChunk is how many header values a connection carves from one
// allocation.
const h2ValueChunk = 128

// values returns room for n header values. As net/textproto does for one
// header block, it gives each block's values one backing array, but carves
// the arrays of many blocks from one chunk, so that most blocks cost no
// allocation for them. A chunk lives while any header carved from it does.
// Only the read loop may call it.
func (c *conn) values(n int) []string {
	if n > len(c.valueChunk) {
		if n > h2ValueChunk/4 {
			return make([]string, n)
		}
		c.valueChunk = make([]string, h2ValueChunk)
	}
	v := c.valueChunk[:n:n]
	c.valueChunk = c.valueChunk[n:]
	return v
}

// applySettingsLocked applies a SETTINGS frame from the peer and
// acknowledges it. It returns the change of the initial stream window, for
// the caller to apply to every open stream. c.mu must be held.
func (c *conn) applySettingsLocked(f *http2.SettingsFrame) (winDelta int64, err error) {
	if err := f.ForeachSetting(func(s http2.Setting) error { return s.Valid() }); err != nil {
		return 0, err
	}
	_ = f.ForeachSetting(func(s http2.Setting) error {
		switch s.ID {
		case http2.SettingInitialWindowSize:
			winDelta += int64(s.Val) - c.peerInitWin
			c.peerInitWin = int64(s.Val)
		case http2.SettingMaxFrameSize:
			c.peerMaxFrame = s.Val
		case http2.SettingHeaderTableSize:
			c.enc.SetMaxDynamicTableSizeLimit(s.Val)
		case http2.SettingMaxConcurrentStreams:
			c.peerMaxStreams = s.Val
		}
		return nil
	})
	if winDelta != 0 {
		c.cond.Broadcast()
	}
	c.writeSettingsAckLocked()
	c.flushLocked()
	return winDelta, nil
}

// maxWindow is the largest a flow-control window may grow (RFC 9113,
// section 6.9.1).
const maxWindow = 1<<31 - 1

// outflow is a send window, as x/net's flow.go has it: how much the peer
// lets the sidecar send on the connection or on one stream. Client and
// server keep theirs in it, so both check a window the same way. Its
// methods are not safe for concurrent use: the connection's mu guards it.
type outflow int64

// add changes the window by n: a WINDOW_UPDATE's increment, or the change
// of a new SETTINGS_INITIAL_WINDOW_SIZE (negative when it shrinks). It
// returns false if the sum would exceed 2^31-1 (RFC 9113, 6.9.1): the peer
// broke flow control, a connection error on stream 0, a stream error
// (RST_STREAM FLOW_CONTROL_ERROR) on another.
func (w *outflow) add(n int64) bool {
	*w += outflow(n)
	return *w <= maxWindow
}

// available is how much may be sent now; it may be negative after a
// shrinking SETTINGS.
func (w outflow) available() int64 { return int64(w) }

// take spends n bytes sent.
func (w *outflow) take(n int64) { *w -= outflow(n) }

// consumedLocked acknowledges n bytes the consumer read (or the sidecar
// discarded) at the connection level, sending a WINDOW_UPDATE once half the
// window has been used.
func (c *conn) consumedLocked(n int) {
	c.recvUnacked += int64(n)
	if c.recvUnacked >= h2ConnWindow/2 {
		c.writeWindowUpdateLocked(0, uint32(c.recvUnacked))
		c.recvWin += c.recvUnacked
		c.recvUnacked = 0
		c.flushLocked()
	}
}

// sendData sends p as DATA frames on stream, within the peer's connection
// and stream windows (*win, under c.mu) and the output cap, ending the
// stream after the last byte when end. It blocks while the windows are
// shut, until ctx ends or abort returns an error.
func (c *conn) sendData(ctx context.Context, stream uint32, win *outflow, p []byte, end bool, abort func() error) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	for {
		if c.err != nil {
			return c.err
		}
		if err := abort(); err != nil {
			return err
		}
		if len(p) == 0 && end {
			c.writeDataLocked(stream, nil, true)
			c.flushLocked()
			return nil
		}
		if len(p) == 0 {
			c.flushLocked()
			return nil
		}
		n := int64(len(p))
		n = min(n, c.sendWin.available(), win.available(), int64(c.peerMaxFrame))
		if n <= 0 || len(c.out) >= h2MaxOutBuffer {
			// Only output waiting is the writer's business: asked to send
			// nothing, it would wake this wait for nothing, forever.
			if len(c.out) > 0 {
				c.flushLocked()
			}
			c.sendWaits++
			if err := c.waitLocked(ctx); err != nil {
				return err
			}
			continue
		}
		c.sendWin.take(n)
		win.take(n)
		last := end && int(n) == len(p)
		c.writeDataLocked(stream, p[:n], last)
		p = p[n:]
		if last {
			c.flushLocked()
			return nil
		}
	}
}

// recvBuf is the receive side of one stream: DATA the read loop received,
// waiting for the consumer, and the stream's receive-window bookkeeping.
type recvBuf struct {
	c      *conn
	stream uint32
	ready  chan struct{} // capacity 1: data, EOF or an error came; made on the first wait

	// Under c.mu:
	buf     []byte
	off     int
	eof     bool
	err     error // set when the stream broke; returned after buffered data
	unacked int   // consumed bytes not yet acknowledged to the peer
	recvd   int64 // bytes received over the stream's life, for the window check
	granted int64 // window granted to the peer over the stream's life
	waiting bool  // a reader waits on ready
}

// init readies b for a new stream of c.
func (b *recvBuf) init(c *conn, stream uint32) {
	b.c, b.stream, b.granted = c, stream, h2StreamWindow
}

func (b *recvBuf) wakeLocked() {
	if b.waiting {
		select {
		case b.ready <- struct{}{}:
		default:
		}
	}
}

// put adds a DATA payload. It reports false when the peer overran the
// stream's window. c.mu must be held.
func (b *recvBuf) putLocked(p []byte) bool {
	b.recvd += int64(len(p))
	if b.recvd > b.granted {
		return false
	}
	if b.err != nil {
		// Nobody will read it: the connection window is freed at once.
		b.c.consumedLocked(len(p))
		return true
	}
	if b.off == len(b.buf) {
		b.buf, b.off = b.buf[:0], 0
	}
	b.buf = append(b.buf, p...)
	b.wakeLocked()
	return true
}

// closeLocked ends the stream's data: at EOF when err is nil.
func (b *recvBuf) closeLocked(err error) {
	if err == nil {
		b.eof = true
	} else if b.err == nil {
		b.err = err
		// What is buffered will not be read.
		if n := len(b.buf) - b.off; n > 0 {
			b.c.consumedLocked(n)
			b.buf, b.off = b.buf[:0], 0
		}
	}
	b.wakeLocked()
}

// read copies buffered data into p, waiting for some when none is
// buffered, and acknowledges what it took. It gives up waiting when done is
// closed (a nil done never is), returning errWaitDone.
func (b *recvBuf) read(p []byte, done <-chan struct{}) (int, error) {
	c := b.c
	c.mu.Lock()
	defer c.mu.Unlock()
	for b.off == len(b.buf) {
		if b.err != nil {
			return 0, b.err
		}
		if b.eof {
			return 0, io.EOF
		}
		if b.ready == nil {
			b.ready = make(chan struct{}, 1)
		}
		b.waiting = true
		c.mu.Unlock()
		select {
		case <-b.ready:
		case <-done:
		}
		c.mu.Lock()
		b.waiting = false
		if b.off == len(b.buf) && b.err == nil && !b.eof && isClosed(done) {
			return 0, errWaitDone
		}
	}
	n := copy(p, b.buf[b.off:])
	b.off += n
	if b.off == len(b.buf) {
		b.buf, b.off = b.buf[:0], 0
	}
	c.consumedLocked(n)
	if !b.eof && b.err == nil {
		b.unacked += n
		if b.unacked >= h2StreamWindow/4 {
			c.writeWindowUpdateLocked(b.stream, uint32(b.unacked))
			b.granted += int64(b.unacked)
			b.unacked = 0
			c.flushLocked()
		}
	}
	if n > 0 && b.off == len(b.buf) && b.eof {
		return n, io.EOF
	}
	return n, nil
}

var errWaitDone = errors.New("http2: wait ended")

func isClosed(ch <-chan struct{}) bool {
	if ch == nil {
		return false
	}
	select {
	case <-ch:
		return true
	default:
		return false
	}
}

// readyLocked reports whether a read would return without waiting.
func (b *recvBuf) readyLocked() bool {
	return b.off < len(b.buf) || b.eof || b.err != nil
}

// deadline returns the deadline d from now, or none when d is zero (no
// limit).
func deadline(d time.Duration) time.Time {
	if d <= 0 {
		return time.Time{}
	}
	return time.Now().Add(d)
}

// idleTimer runs its func once a connection has been idle for d; with d
// zero (no limit) it never does. Its methods are the time.Timer's it
// holds, and safe for concurrent use as those are.
type idleTimer struct {
	t *time.Timer
	d time.Duration
}

// newIdleTimer starts an idleTimer that runs f after d.
func newIdleTimer(d time.Duration, f func()) idleTimer {
	if d <= 0 {
		return idleTimer{}
	}
	return idleTimer{t: time.AfterFunc(d, f), d: d}
}

// reset starts the wait of d again.
func (i idleTimer) reset() {
	if i.t != nil {
		i.t.Reset(i.d)
	}
}

// stop keeps the func from running until the next reset.
func (i idleTimer) stop() {
	if i.t != nil {
		i.t.Stop()
	}
}
