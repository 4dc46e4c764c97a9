package h2

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"sync/atomic"
	"time"

	"go.uber.org/zap"
	"golang.org/x/net/http/httpguts"
	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"

	"github.com/sidecarlb/sidecar/internal/httpserver"
	"github.com/sidecarlb/sidecar/internal/httpwire"
	"github.com/sidecarlb/sidecar/internal/rawio"
)

// Options tune a Server. The zero value is usable.
type Options struct {
	// ReadHeaderTimeout bounds a client's preface and SETTINGS, and the
	// rest of a header block once its HEADERS frame came; zero means no
	// limit.
	ReadHeaderTimeout time.Duration
	// IdleTimeout closes a connection after this long with no stream open;
	// zero means no limit.
	IdleTimeout time.Duration
	// MaxHeaderBytes bounds a request's decoded header list as RFC 9113
	// counts it (name, value and 32 bytes per field), advertised in
	// SETTINGS_MAX_HEADER_LIST_SIZE; past it the request is answered 431
	// and the connection kept, unless one field alone is over it or the
	// block runs on past twice what is left of it, which end the
	// connection. If zero, httpwire.DefaultMaxHeaderBytes is used.
	MaxHeaderBytes int
}

// Server is the HTTP/2 engine's server side: the connections it serves
// and the workers that run their handlers. It is an httpserver.ConnServer;
// its methods are safe for concurrent use.
type Server struct {
	handler http.Handler
	opts    Options
	log     *zap.Logger
	baseCtx context.Context

	conns httpserver.Tracker[*serverConn]
	work  chan *serverStream // idle handler workers take streams here
}

// NewServer returns a server running h for each stream. Requests' contexts
// derive from ctx, whose end cancels them all and stops the idle handler
// workers; the server's own errors are logged to log at debug, handler
// panics at error.
func NewServer(ctx context.Context, h http.Handler, opts Options, log *zap.Logger) *Server {
	if opts.MaxHeaderBytes <= 0 {
		opts.MaxHeaderBytes = httpwire.DefaultMaxHeaderBytes
	}
	return &Server{handler: h, opts: opts, log: log, baseCtx: ctx,
		work: make(chan *serverStream)}
}

// Load counts the server's connections and their streams whose handler
// has not returned. It does not block on them.
func (s *Server) Load() (conns, streams int) {
	var scs []*serverConn
	s.conns.Range(func(sc *serverConn) { scs = append(scs, sc) })
	for _, sc := range scs {
		sc.mu.Lock()
		streams += len(sc.streams)
		sc.mu.Unlock()
	}
	return len(scs), streams
}

// ServeConn serves nc until the client or the server ends it, and returns
// then; it closes nc. prefix is the client preface the listener read,
// which nc will not return again. After Shutdown or Close it closes nc at
// once.
func (s *Server) ServeConn(nc net.Conn, prefix []byte) { s.serveH2(nc) }

// track adds sc unless the server is closed.
func (s *Server) track(sc *serverConn) bool { return s.conns.Track(sc) }

// untrack removes sc, and tells a waiting Shutdown when the last connection
// is gone.
func (s *Server) untrack(sc *serverConn) { s.conns.Untrack(sc) }

// Shutdown refuses new connections, tells the clients to go away, and
// waits until their streams have ended or ctx ends.
func (s *Server) Shutdown(ctx context.Context) error {
	return s.conns.Shutdown(ctx, (*serverConn).shutdown)
}

// Close refuses new connections and fails every connection.
func (s *Server) Close() {
	s.conns.Close(func(sc *serverConn) { sc.fail(errH2ConnClosed) })
}

// h2MaxStreams is how many concurrent streams one app connection may open:
// one connection may carry many concurrent RPCs.
const h2MaxStreams = 1000

// MaxEarlyResets bounds how many more of a connection's streams may end
// early than were answered. A stream ends early when it is reset before its
// answer began, by the client or by the server for the client's fault (a
// window overflow, a body longer than its content-length: "made you
// reset"), or when it is refused for h2MaxStreams. Past the bound the
// client is taken for a rapid-reset attacker (CVE-2023-44487) and the
// connection ends with GOAWAY ENHANCE_YOUR_CALM, as x/net and Envoy end
// one, instead of refusing its streams forever; a client that also gets
// answers may reset as many streams as were answered, and this many more.
const MaxEarlyResets = 1000

// h2GoAwayLinger is how long a connection the client ended with GOAWAY,
// and that has no stream open, is still read before the sidecar closes it.
const h2GoAwayLinger = time.Second

var (
	errStreamReset  = errors.New("http2: stream reset by the client")
	errH2BodyClosed = errors.New("http2: request body closed")
	errRapidReset   = errors.New("http2: too many streams reset before their answer")
	// errH2HeaderListTooLarge: a request's header list is over
	// Options.MaxHeaderBytes; it is answered 431.
	errH2HeaderListTooLarge = errors.New("http2: header list larger than the limit")
)

// serverConn is one app connection speaking HTTP/2 with prior knowledge.
// Its read loop runs on the goroutine that accepted it; each stream's
// handler runs on a goroutine of its own.
type serverConn struct {
	*conn
	s      *Server
	remote string

	// Under mu:
	// streams holds every stream whose handler has not returned, reset by
	// the client or not.
	streams   map[uint32]*serverStream
	maxSeen   uint32 // highest stream ID the client opened
	goingAway bool   // GOAWAY sent: no new streams
	idle      idleTimer
	// early and answered count the streams that ended early and those
	// answered (see MaxEarlyResets).
	early, answered int

	// calm is set once early passed the bound: the read loop ends the
	// connection.
	calm atomic.Bool

	// closedRing remembers how the last h2ClosedMemory streams closed, for
	// a HEADERS frame on a stream no longer open: ignored after the
	// sidecar's reset, a stream error after the client's, a connection
	// error after a normal close or on a stream never opened (RFC 9113,
	// 5.1 and 5.1.1). A stream older than the ring counts as never
	// opened, as x/net counts every closed stream.
	closedRing [h2ClosedMemory]closedStream
	closedNext int
}

// h2ClosedMemory is how many closed streams a connection remembers (see
// closedRing), at 8 bytes each.
const h2ClosedMemory = 32

// closedStream is how one stream closed.
type closedStream struct {
	id  uint32
	how closeKind
}

type closeKind uint8

const (
	closedNormally closeKind = iota + 1 // both sides ended it
	resetBySidecar                      // the sidecar sent RST_STREAM
	resetByClient                       // the client sent RST_STREAM
)

// closedLocked records how stream id closed. sc.mu is held.
func (sc *serverConn) closedLocked(id uint32, how closeKind) {
	sc.closedRing[sc.closedNext] = closedStream{id, how}
	sc.closedNext = (sc.closedNext + 1) % h2ClosedMemory
}

// howClosedLocked says how stream id closed, or 0 when the connection does
// not remember it. sc.mu is held.
func (sc *serverConn) howClosedLocked(id uint32) closeKind {
	for _, c := range sc.closedRing {
		if c.id == id {
			return c.how
		}
	}
	return 0
}

func (s *Server) serveH2(nc net.Conn) {
	sc := &serverConn{
		conn:    newConn(nc, s.log),
		s:       s,
		remote:  nc.RemoteAddr().String(),
		streams: make(map[uint32]*serverStream),
	}
	sc.setMaxHeaderList(uint32(min(s.opts.MaxHeaderBytes, h2MaxHeaderList)))
	sc.headerTimeout = s.opts.ReadHeaderTimeout
	if !s.track(sc) {
		nc.Close()
		return
	}
	defer s.untrack(sc)

	sc.mu.Lock()
	sc.writeSettingsLocked(
		http2.Setting{ID: http2.SettingMaxConcurrentStreams, Val: h2MaxStreams},
		http2.Setting{ID: http2.SettingInitialWindowSize, Val: h2StreamWindow},
		http2.Setting{ID: http2.SettingMaxHeaderListSize, Val: sc.maxHeaderList},
	)
	sc.writeWindowUpdateLocked(0, h2ConnWindow-h2InitialWindow)
	sc.flushLocked()
	sc.idle = newIdleTimer(s.opts.IdleTimeout, sc.closeIfIdle)
	sc.mu.Unlock()
	go sc.writeLoop()

	err := sc.readLoop()
	sc.mu.Lock()
	closing := sc.closing
	sc.mu.Unlock()
	if closing {
		sc.closed(time.Second) // let the GOAWAY out
	}
	sc.fail(err)
	sc.mu.Lock()
	sc.idle.stop()
	for _, st := range sc.streams {
		st.resetLocked(err)
	}
	sc.mu.Unlock()
}

// readLoop reads and handles frames until the connection ends. A panic
// ends the connection as a failed read would.
func (sc *serverConn) readLoop() (err error) {
	defer func() {
		if v := recover(); v != nil {
			sc.logPanic("http2 connection panicked", v)
			err = errH2Panicked
		}
	}()
	// The client's SETTINGS must come as promptly as an HTTP/1.1 header.
	_ = sc.nc.SetReadDeadline(deadline(sc.s.opts.ReadHeaderTimeout))
	first := true
	for {
		if sc.calm.Load() {
			return sc.goAway(http2.ErrCodeEnhanceYourCalm, errRapidReset)
		}
		f, err := sc.readFrame()
		if err != nil {
			var se http2.StreamError
			if errors.As(err, &se) {
				sc.mu.Lock()
				if st := sc.streams[se.StreamID]; st != nil {
					st.resetLocked(errStreamReset)
				} else if sc.lastType == http2.FrameHeaders && se.StreamID%2 == 1 && se.StreamID > sc.maxSeen {
					// A malformed request opened the stream, which the reset
					// closes: what the client sends on it before it sees the
					// reset is not on an idle stream.
					sc.maxSeen = se.StreamID
					sc.closedLocked(se.StreamID, resetBySidecar)
				} else if sc.idleLocked(se.StreamID) {
					sc.mu.Unlock()
					return sc.goAway(http2.ErrCodeProtocol, err)
				}
				sc.writeRSTLocked(se.StreamID, se.Code)
				sc.flushLocked()
				sc.mu.Unlock()
				continue
			}
			if code, ok := connErrorCode(err); ok {
				return sc.goAway(code, err)
			}
			return err
		}
		if first {
			if _, ok := f.(*http2.SettingsFrame); !ok {
				return sc.goAway(http2.ErrCodeProtocol, errors.New("http2: first frame is not SETTINGS"))
			}
			_ = sc.nc.SetReadDeadline(time.Time{})
			first = false
		}
		if err := sc.handle(f); err != nil {
			if code, ok := connErrorCode(err); ok {
				return sc.goAway(code, err)
			}
			return err
		}
	}
}

// idleLocked reports whether stream id is idle (RFC 9113, 5.1): one the
// client has not opened yet, or an even one, which only the server could
// open and never does. Any frame but HEADERS and PRIORITY on an idle stream
// is a connection error; on a closed one, a frame still in flight when the
// stream ended is not. sc.mu is held.
func (sc *serverConn) idleLocked(id uint32) bool {
	return id%2 == 0 || id > sc.maxSeen
}

// goAway tells the client the connection ends for code and closes it.
func (sc *serverConn) goAway(code http2.ErrCode, err error) error {
	sc.mu.Lock()
	sc.writeGoAwayLocked(sc.maxSeen, code)
	sc.mu.Unlock()
	sc.closeAfterFlush()
	sc.s.log.Debug("http2 connection closed", zap.String("remote", sc.remote), zap.Error(err))
	return err
}

// handle applies one frame from the client, by its type: one method per
// frame type, as x/net's read loop has.
func (sc *serverConn) handle(f http2.Frame) error {
	switch f := f.(type) {
	case *http2.MetaHeadersFrame:
		return sc.onHeaders(f)
	case *http2.DataFrame:
		return sc.onData(f)
	case *http2.WindowUpdateFrame:
		return sc.onWindowUpdate(f)
	case *http2.RSTStreamFrame:
		return sc.onRSTStream(f)
	case *http2.SettingsFrame:
		return sc.onSettings(f)
	case *http2.PingFrame:
		return sc.onPing(f)
	case *http2.GoAwayFrame:
		return sc.onGoAway(f)
	case *http2.PushPromiseFrame:
		return http2.ConnectionError(http2.ErrCodeProtocol)
	case *http2.PriorityFrame:
		return sc.onPriority(f)
	}
	// Unknown frames are ignored.
	return nil
}

// onWindowUpdate handles more send window, for the connection or a stream.
func (sc *serverConn) onWindowUpdate(f *http2.WindowUpdateFrame) error {
	sc.mu.Lock()
	defer sc.mu.Unlock()
	if f.StreamID == 0 {
		if !sc.sendWin.add(int64(f.Increment)) {
			return http2.ConnectionError(http2.ErrCodeFlowControl)
		}
	} else if st := sc.streams[f.StreamID]; st != nil {
		if !st.sendWin.add(int64(f.Increment)) {
			st.resetLocked(errStreamReset)
			sc.writeRSTLocked(f.StreamID, http2.ErrCodeFlowControl)
			sc.flushLocked()
		}
	} else if sc.idleLocked(f.StreamID) {
		return http2.ConnectionError(http2.ErrCodeProtocol)
	}
	sc.cond.Broadcast()
	return nil
}

// onRSTStream handles the client resetting a stream.
func (sc *serverConn) onRSTStream(f *http2.RSTStreamFrame) error {
	sc.mu.Lock()
	st := sc.streams[f.StreamID]
	if st != nil {
		st.peerReset = true
		st.resetLocked(errStreamReset)
	}
	idle := st == nil && sc.idleLocked(f.StreamID)
	sc.mu.Unlock()
	if idle {
		return http2.ConnectionError(http2.ErrCodeProtocol)
	}
	return nil
}

// onSettings handles the client's settings, or their acknowledgement.
func (sc *serverConn) onSettings(f *http2.SettingsFrame) error {
	if f.IsAck() {
		return nil
	}
	sc.mu.Lock()
	defer sc.mu.Unlock()
	delta, err := sc.applySettingsLocked(f)
	if err != nil {
		return err
	}
	for _, st := range sc.streams {
		// A new initial window that takes an open stream's window past
		// 2^31-1 is a connection error (RFC 9113, section 6.9.2).
		if !st.sendWin.add(delta) {
			return http2.ConnectionError(http2.ErrCodeFlowControl)
		}
	}
	return nil
}

// onPing handles a ping, answered.
func (sc *serverConn) onPing(f *http2.PingFrame) error {
	if f.IsAck() {
		return nil
	}
	sc.mu.Lock()
	sc.writePingLocked(true, f.Data)
	sc.flushLocked()
	sc.mu.Unlock()
	return nil
}

// onGoAway handles the client going away.
func (sc *serverConn) onGoAway(f *http2.GoAwayFrame) error {
	sc.mu.Lock()
	sc.goingAway = true
	idle := len(sc.streams) == 0
	sc.mu.Unlock()
	if idle {
		// The client is done, but what it sent after its GOAWAY (a
		// PING) is still read and answered until it closes, for at
		// most h2GoAwayLinger: closed with its input unread, the
		// connection would be reset, and the client could lose the
		// answers.
		_ = sc.nc.SetReadDeadline(time.Now().Add(h2GoAwayLinger))
	}
	return nil
}

// onPriority handles a PRIORITY frame: only a stream depending on itself
// matters.
func (sc *serverConn) onPriority(f *http2.PriorityFrame) error {
	if f.StreamDep == f.StreamID {
		// A stream cannot depend on itself (RFC 9113, 5.3.1).
		sc.mu.Lock()
		if st := sc.streams[f.StreamID]; st != nil {
			st.resetLocked(errStreamReset)
		}
		sc.writeRSTLocked(f.StreamID, http2.ErrCodeProtocol)
		sc.flushLocked()
		sc.mu.Unlock()
	}
	return nil
}

// onHeaders handles a HEADERS frame (with its CONTINUATIONs): a new
// request, trailers of an open one, or a frame on a stream already closed.
func (sc *serverConn) onHeaders(f *http2.MetaHeadersFrame) error {
	id := f.StreamID
	if id%2 == 0 {
		return http2.ConnectionError(http2.ErrCodeProtocol)
	}
	sc.mu.Lock()
	defer sc.mu.Unlock()
	if st := sc.streams[id]; st != nil {
		sc.onTrailersLocked(st, f)
		return nil
	}
	if id <= sc.maxSeen {
		return sc.onClosedHeadersLocked(id)
	}
	sc.maxSeen = id
	sc.openStreamLocked(f)
	return nil
}

// onTrailersLocked handles HEADERS on an open stream: its trailers, which
// must end it. sc.mu is held.
func (sc *serverConn) onTrailersLocked(st *serverStream, f *http2.MetaHeadersFrame) {
	id := st.id
	switch {
	case st.peerReset || st.body.eof:
		// After the client's RST_STREAM or END_STREAM (RFC 9113, 5.1).
		st.resetLocked(errStreamReset)
		sc.writeRSTLocked(id, http2.ErrCodeStreamClosed)
		sc.flushLocked()
		return
	case st.reset:
		// The sidecar reset the stream: what the client sent before it
		// saw the reset is ignored.
		return
	case !f.StreamEnded():
		// Trailers: they must end the stream.
		st.resetLocked(errStreamReset)
		sc.writeRSTLocked(id, http2.ErrCodeProtocol)
		sc.flushLocked()
		return
	}
	if t := st.req.Trailer; t != nil {
		for _, hf := range f.RegularFields() {
			k := httpwire.CanonicalKey(hf.Name)
			if _, declared := t[k]; declared {
				if st.trailer == nil {
					st.trailer = make(http.Header)
				}
				st.trailer[k] = append(st.trailer[k], hf.Value)
			}
		}
	}
	st.endBodyLocked()
}

// onClosedHeadersLocked handles HEADERS on a stream no longer open, by how
// it closed. sc.mu is held.
func (sc *serverConn) onClosedHeadersLocked(id uint32) error {
	switch sc.howClosedLocked(id) {
	case resetBySidecar:
		return nil
	case resetByClient:
		sc.writeRSTLocked(id, http2.ErrCodeStreamClosed)
		sc.flushLocked()
		return nil
	case closedNormally:
		return http2.ConnectionError(http2.ErrCodeStreamClosed)
	}
	// Never opened (a lower ID than one the client opened), or closed
	// longer ago than the connection remembers.
	return http2.ConnectionError(http2.ErrCodeProtocol)
}

// openStreamLocked opens the stream a request's HEADERS start and starts
// its handler, or refuses it. sc.mu is held.
func (sc *serverConn) openStreamLocked(f *http2.MetaHeadersFrame) {
	id := f.StreamID
	if sc.goingAway || len(sc.streams) >= h2MaxStreams {
		// A reset stream's handler counts until it returns, so a client
		// resetting streams at once cannot run unbounded handlers.
		sc.refuseStreamLocked(id, http2.ErrCodeRefusedStream)
		return
	}
	if f.HasPriority() && f.Priority.StreamDep == id {
		// A stream cannot depend on itself (RFC 9113, 5.3.1).
		sc.refuseStreamLocked(id, http2.ErrCodeProtocol)
		return
	}
	st := &serverStream{sc: sc, id: id, sendWin: outflow(sc.peerInitWin)}
	st.body.init(sc.conn, id)
	req, err := sc.newRequest(st, f)
	if err == errH2HeaderListTooLarge {
		sc.answer431Locked(id, f.StreamEnded())
		return
	}
	if err != nil {
		sc.refuseStreamLocked(id, http2.ErrCodeProtocol)
		sc.s.log.Debug("malformed http2 request", zap.String("remote", sc.remote), zap.Error(err))
		return
	}
	st.req = req
	if f.StreamEnded() {
		st.body.eof = true
	}
	sc.streams[id] = st
	sc.idle.stop()
	sc.s.startHandler(st)
}

// answer431Locked answers a well-formed request whose header list is only
// too large: the client is told so, as x/net's server and the HTTP/1.1
// side tell it, and the stream ends (RFC 9113, 8.1: an answer before the
// whole request, then NO_ERROR). sc.mu is held.
func (sc *serverConn) answer431Locked(id uint32, ended bool) {
	sc.encodeLocked(":status", "431")
	sc.writeHeaderBlockLocked(id, true)
	how := closedNormally
	if !ended {
		sc.writeRSTLocked(id, http2.ErrCodeNo)
		how = resetBySidecar
	}
	sc.closedLocked(id, how)
	sc.flushLocked()
	sc.endedEarlyLocked()
}

// refuseStreamLocked resets stream id, opened but given no handler, with
// code: it is remembered as reset by the sidecar and, unless the connection
// is going away, counted as ended early. sc.mu is held.
func (sc *serverConn) refuseStreamLocked(id uint32, code http2.ErrCode) {
	sc.writeRSTLocked(id, code)
	sc.closedLocked(id, resetBySidecar)
	sc.flushLocked()
	if !sc.goingAway {
		sc.endedEarlyLocked()
	}
}

// endedEarlyLocked counts a stream that ended early; past
// MaxEarlyResets the read loop ends the connection. sc.mu is held.
func (sc *serverConn) endedEarlyLocked() {
	sc.early++
	if sc.early > MaxEarlyResets+sc.answered {
		sc.calm.Store(true)
	}
}

func (sc *serverConn) onData(f *http2.DataFrame) error {
	id := f.StreamID
	sc.mu.Lock()
	defer sc.mu.Unlock()
	data, err := sc.receivedLocked(f)
	if err != nil {
		return err
	}
	st := sc.streams[id]
	if st == nil || st.body.eof || st.peerReset {
		sc.consumedLocked(len(data))
		if sc.idleLocked(id) {
			return http2.ConnectionError(http2.ErrCodeProtocol)
		}
		if st != nil {
			st.resetLocked(errStreamReset)
		}
		sc.writeRSTLocked(id, http2.ErrCodeStreamClosed)
		sc.flushLocked()
		return nil
	}
	if !st.body.putLocked(data) {
		st.resetLocked(errStreamReset)
		sc.writeRSTLocked(id, http2.ErrCodeFlowControl)
		sc.flushLocked()
		return nil
	}
	if n := st.req.ContentLength; n >= 0 && st.body.recvd > n {
		st.malformedLocked()
		return nil
	}
	if f.StreamEnded() {
		st.endBodyLocked()
	}
	return nil
}

// endBodyLocked ends the request body at the client's END_STREAM. A body
// that is not the length its content-length says makes the request
// malformed (RFC 9113, 8.1.1): relayed to an HTTP/1.1 node, the difference
// could desynchronise the node's connection.
func (st *serverStream) endBodyLocked() {
	if n := st.req.ContentLength; n >= 0 && st.body.recvd != n {
		st.malformedLocked()
		return
	}
	st.body.closeLocked(nil)
}

// malformedLocked resets a stream whose request broke the protocol.
func (st *serverStream) malformedLocked() {
	st.resetLocked(errMalformedBody)
	st.sc.writeRSTLocked(st.id, http2.ErrCodeProtocol)
	st.sc.flushLocked()
}

var errMalformedBody = errors.New("http2: request body does not match its content-length")

// newRequest builds the request a HEADERS frame opens. sc.mu is held.
func (sc *serverConn) newRequest(st *serverStream, f *http2.MetaHeadersFrame) (*http.Request, error) {
	if f.Truncated {
		// The framer dropped the fields past the limit.
		return nil, errH2HeaderListTooLarge
	}
	p, err := requestPseudo(f)
	if err != nil {
		return nil, err
	}
	fields := f.RegularFields()
	if err := checkRequestFields(fields); err != nil {
		return nil, err
	}
	header := sc.header(fields, true)
	authority := p.authority
	if authority == "" {
		authority = header.Get("Host")
	}
	delete(header, "Host")
	if !httpguts.ValidHostHeader(authority) {
		return nil, errors.New("invalid :authority")
	}
	u, err := p.url(authority)
	if err != nil {
		return nil, err
	}
	// Not derived from the server's context: registering with a parent
	// costs every call, and shutdown reaches each stream itself.
	ctx, cancel := context.WithCancel(context.Background())
	st.cancel = cancel
	req := new(http.Request).WithContext(ctx) // one allocation, not two
	req.Method = p.method
	req.URL = u
	req.Proto, req.ProtoMajor = "HTTP/2.0", 2
	req.Header = header
	req.Host = authority
	req.RemoteAddr = sc.remote
	req.RequestURI = p.path
	if len(header["Trailer"]) > 0 {
		req.Trailer = make(http.Header)
		httpwire.DeclaredTrailers(header, func(k string) {
			if httpguts.ValidTrailerHeader(k) {
				req.Trailer[k] = nil
			}
		})
	}
	if err := setRequestBody(req, st, f.StreamEnded()); err != nil {
		return nil, err
	}
	return req, nil
}

// pseudo holds a request's pseudo-header fields.
type pseudo struct {
	method, scheme, authority, path string
}

// requestPseudo reads and checks a request's pseudo-header fields (RFC
// 9113, 8.3.1).
func requestPseudo(f *http2.MetaHeadersFrame) (p pseudo, err error) {
	for _, hf := range f.PseudoFields() {
		switch hf.Name {
		case ":method":
			p.method = hf.Value
		case ":scheme":
			p.scheme = hf.Value
		case ":authority":
			p.authority = hf.Value
		case ":path":
			p.path = hf.Value
		default:
			return p, fmt.Errorf("pseudo-header %s not supported", hf.Name)
		}
	}
	connect := p.method == http.MethodConnect
	switch {
	case p.method == "":
		return p, errors.New("missing :method")
	case !httpwire.ValidToken(p.method):
		// Relayed to an HTTP/1.1 node, a method such as "GET /x?" would
		// be a request line of the client's making.
		return p, errors.New("invalid :method")
	case connect && (p.scheme != "" || p.path != "" || p.authority == ""):
		return p, errors.New("malformed CONNECT")
	case !connect && (p.scheme != "http" && p.scheme != "https" || !validPseudoPath(p.path, p.method)):
		return p, errors.New("missing or invalid :scheme or :path")
	}
	return p, nil
}

// url is the request's URL, for authority.
func (p pseudo) url(authority string) (*url.URL, error) {
	switch {
	case p.method == http.MethodConnect:
		return &url.URL{Host: authority}, nil
	case p.path == "*" && p.method == http.MethodOptions:
		return &url.URL{Path: "*"}, nil
	}
	return url.ParseRequestURI(p.path)
}

// checkRequestFields refuses the fields HTTP/2 forbids in a request:
// connection-specific ones, and te other than "trailers" (RFC 9113, 8.2.2).
func checkRequestFields(fields []hpack.HeaderField) error {
	for _, hf := range fields {
		switch hf.Name {
		case "connection", "keep-alive", "proxy-connection", "transfer-encoding", "upgrade":
			return fmt.Errorf("connection-specific header %s", hf.Name)
		case "te":
			if hf.Value != "trailers" {
				return errors.New("te other than trailers")
			}
		}
	}
	return nil
}

// setRequestBody gives req its body and length: none when the HEADERS
// frame ended the stream, which a content-length must then agree with,
// else st's, of the declared content-length or unknown.
func setRequestBody(req *http.Request, st *serverStream, ended bool) error {
	v := req.Header.Get("Content-Length")
	if ended {
		if v != "" && v != "0" {
			return errors.New("content-length without a body")
		}
		req.Body = http.NoBody
		return nil
	}
	req.ContentLength = -1
	if v != "" {
		n, err := strconv.ParseInt(v, 10, 64)
		if err != nil || n < 0 {
			return errors.New("malformed content-length")
		}
		req.ContentLength = n
	}
	req.Body = serverBody{st}
	return nil
}

// validPseudoPath reports whether path is a valid :path for method (RFC
// 9113, 8.3.1): "*" for OPTIONS, or an absolute path with its query, of
// visible ASCII and other non-control bytes. A space or a control byte
// would end or split an HTTP/1.1 request line.
func validPseudoPath(path, method string) bool {
	if path == "*" {
		return method == http.MethodOptions
	}
	return path != "" && path[0] == '/' && httpwire.Visible(path)
}

// closeIfIdle closes the connection once no stream has been open for the
// idle timeout. It runs on the idle timer; a panic ends the connection, not
// the process.
func (sc *serverConn) closeIfIdle() {
	defer sc.recoverPanic()
	if sc.goAwayIfIdle() {
		sc.closeAfterFlush()
	}
}

// goAwayIfIdle sends GOAWAY and reports true if no stream is open.
func (sc *serverConn) goAwayIfIdle() bool {
	sc.mu.Lock()
	defer sc.mu.Unlock()
	if len(sc.streams) > 0 {
		return false
	}
	sc.goingAway = true
	sc.writeGoAwayLocked(sc.maxSeen, http2.ErrCodeNo)
	return true
}

// shutdown sends GOAWAY: streams open finish, new ones are refused, and the
// connection closes once the last ends.
func (sc *serverConn) shutdown() {
	sc.mu.Lock()
	if !sc.goingAway {
		sc.goingAway = true
		sc.writeGoAwayLocked(sc.maxSeen, http2.ErrCodeNo)
		sc.flushLocked()
	}
	idle := len(sc.streams) == 0
	sc.mu.Unlock()
	if idle {
		sc.closeAfterFlush()
	}
}

// serverStream is one request on an app connection and the
// http.ResponseWriter its handler answers through.
type serverStream struct {
	sc     *serverConn
	id     uint32
	req    *http.Request
	cancel context.CancelFunc
	body   recvBuf

	// Under sc.mu:
	sendWin    outflow
	reset      bool // the client or the sidecar reset the stream, or the connection ended
	peerReset  bool // the client reset the stream
	sentHeader bool
	trailer    http.Header // trailers received, for req.Trailer at the body's end

	// The handler's goroutine only:
	header http.Header
	status int // 0 until WriteHeader
}

// resetLocked ends the stream from the client's side or the connection's:
// the handler's context is cancelled, its body read and writes fail. A
// reset for the client's doing before the answer began counts against
// MaxEarlyResets.
func (st *serverStream) resetLocked(err error) {
	if st.reset {
		return
	}
	if !st.sentHeader && (err == errStreamReset || err == errMalformedBody) {
		st.sc.endedEarlyLocked()
	}
	st.reset = true
	st.body.closeLocked(err)
	st.cancel()
	st.sc.cond.Broadcast()
}

func (st *serverStream) run() {
	defer st.finish()
	if st.req.Context().Err() != nil {
		// Reset before its handler started: no node hears of it.
		return
	}
	st.sc.s.handler.ServeHTTP(st, st.req)
}

// Handlers run on pooled goroutines: a new goroutine per stream costs its
// creation and, on the proxy's deep call path, the growth of its stack,
// both paid again for every call. An idle worker waits this long for the
// next stream before it exits; all exit when the server closes.
const h2WorkerIdle = 10 * time.Second

// startHandler runs st's handler on an idle worker of the server, or on a
// new one when all are busy.
func (s *Server) startHandler(st *serverStream) {
	select {
	case s.work <- st:
	default:
		go s.worker(st)
	}
}

func (s *Server) worker(st *serverStream) {
	idle := time.NewTimer(h2WorkerIdle)
	defer idle.Stop()
	for {
		rawio.StartRequest()
		st.run()
		rawio.EndRequest()
		idle.Reset(h2WorkerIdle)
		select {
		case st = <-s.work:
		case <-idle.C:
			return
		case <-s.baseCtx.Done():
			return
		}
	}
}

// finish ends the stream after its handler returned or panicked.
func (st *serverStream) finish() {
	sc := st.sc
	p := recover()
	if p != nil && p != http.ErrAbortHandler {
		sc.s.log.Error("handler panicked", zap.Any("panic", p), zap.String("remote", sc.remote))
	}
	var trailers bool
	if p == nil {
		if st.status == 0 {
			st.WriteHeader(http.StatusOK)
		}
		trailers = st.hasTrailers()
	}
	sc.mu.Lock()
	if !st.reset && sc.err == nil {
		switch {
		case p != nil:
			sc.writeRSTLocked(st.id, http2.ErrCodeInternal)
		case !st.sentHeader:
			st.writeHeaderLocked(!trailers)
			if trailers {
				st.writeTrailersLocked()
			}
		case trailers:
			st.writeTrailersLocked()
		default:
			sc.writeDataLocked(st.id, nil, true)
		}
		if p == nil && !st.body.eof {
			// The answer is complete; the client need not send the rest.
			sc.writeRSTLocked(st.id, http2.ErrCodeNo)
		}
		if p == nil {
			sc.answered++
		}
		sc.flushLocked()
	}
	switch {
	case st.peerReset:
		sc.closedLocked(st.id, resetByClient)
	case st.reset || p != nil || !st.body.eof:
		sc.closedLocked(st.id, resetBySidecar)
	default:
		sc.closedLocked(st.id, closedNormally)
	}
	st.reset = true
	st.body.closeLocked(errH2BodyClosed)
	delete(sc.streams, st.id)
	idle := len(sc.streams) == 0
	if idle && sc.err == nil {
		if sc.goingAway {
			sc.mu.Unlock()
			st.cancel()
			sc.closeAfterFlush()
			return
		}
		sc.idle.reset()
	}
	sc.mu.Unlock()
	st.cancel()
}

func (st *serverStream) AdoptHeader(h http.Header) bool {
	if st.header != nil || h == nil {
		return false
	}
	st.header = h
	return true
}

func (st *serverStream) Header() http.Header {
	if st.header == nil {
		st.header = make(http.Header)
	}
	return st.header
}

func (st *serverStream) WriteHeader(code int) {
	if st.status != 0 || code < 200 {
		// 1xx answers are the node's business with the sidecar.
		return
	}
	st.status = code
	if st.header == nil {
		st.header = make(http.Header)
	}
}

func (st *serverStream) Write(p []byte) (int, error) {
	if st.status == 0 {
		st.WriteHeader(http.StatusOK)
	}
	if !httpwire.BodyAllowed(st.status) || st.req.Method == http.MethodHead {
		return 0, http.ErrBodyNotAllowed
	}
	sc := st.sc
	sc.mu.Lock()
	if !st.sentHeader && !st.reset {
		st.writeHeaderLocked(false)
	}
	sc.mu.Unlock()
	err := sc.sendData(st.req.Context(), st.id, &st.sendWin, p, false, st.abort)
	if err != nil {
		return 0, err
	}
	return len(p), nil
}

// abort reports why writes to the stream must stop. sc.mu is held.
func (st *serverStream) abort() error {
	if st.reset {
		return errStreamReset
	}
	return nil
}

// Flush sends the header, if not yet sent, and what was written.
func (st *serverStream) Flush() { _ = st.FlushError() }

func (st *serverStream) FlushError() error {
	if st.status == 0 {
		st.WriteHeader(http.StatusOK)
	}
	sc := st.sc
	sc.mu.Lock()
	defer sc.mu.Unlock()
	if st.reset {
		return errStreamReset
	}
	if sc.err != nil {
		return sc.err
	}
	if !st.sentHeader {
		st.writeHeaderLocked(false)
	}
	sc.flushLocked()
	return nil
}

// writeHeaderLocked sends the response header. sc.mu is held.
func (st *serverStream) writeHeaderLocked(end bool) {
	sc := st.sc
	st.sentHeader = true
	sc.encodeLocked(":status", httpwire.StatusCode(st.status))
	for k, vv := range st.header {
		if !strings.HasPrefix(k, http.TrailerPrefix) {
			sc.encodeHeaderLocked(k, vv)
		}
	}
	sc.writeHeaderBlockLocked(st.id, end)
	sc.flushLocked()
}

// hasTrailers reports whether the handler set trailers: keys with
// http.TrailerPrefix, or keys declared in a Trailer header.
func (st *serverStream) hasTrailers() bool {
	if _, ok := st.header["Trailer"]; ok {
		return true
	}
	for k := range st.header {
		if strings.HasPrefix(k, http.TrailerPrefix) {
			return true
		}
	}
	return false
}

// writeTrailersLocked sends the trailers, ending the stream. sc.mu is held.
func (st *serverStream) writeTrailersLocked() {
	sc := st.sc
	for k, vv := range st.header {
		if name, ok := strings.CutPrefix(k, http.TrailerPrefix); ok && name != "" {
			sc.encodeHeaderLocked(httpwire.CanonicalKey(name), vv)
		}
	}
	httpwire.DeclaredTrailers(st.header, func(k string) { sc.encodeHeaderLocked(k, st.header[k]) })
	sc.writeHeaderBlockLocked(st.id, true)
}

// serverBody is a request body as its handler reads it.
type serverBody struct{ st *serverStream }

func (b serverBody) Read(p []byte) (int, error) {
	n, err := b.st.body.read(p, nil)
	if err == io.EOF {
		b.st.takeTrailers()
	}
	return n, err
}

// takeTrailers fills in the request's trailers once its body has been read
// to the end, on the reader's goroutine, as net/http does: the read loop
// must not write to req.Trailer while the handler may read it.
func (st *serverStream) takeTrailers() {
	sc := st.sc
	sc.mu.Lock()
	t := st.trailer
	st.trailer = nil
	sc.mu.Unlock()
	for k, vv := range t {
		st.req.Trailer[k] = vv
	}
}

// Close discards the rest of the body: what arrives later only frees the
// connection window.
func (b serverBody) Close() error {
	c := b.st.sc
	c.mu.Lock()
	if !b.st.body.eof {
		b.st.body.closeLocked(errH2BodyClosed)
	}
	c.mu.Unlock()
	return nil
}

// TryRead reads what the body has buffered without waiting. ok is false
// when a read would wait.
func (b serverBody) TryRead(p []byte) (n int, err error, ok bool) {
	c := b.st.sc
	c.mu.Lock()
	ready := b.st.body.readyLocked()
	c.mu.Unlock()
	if !ready {
		return 0, nil, false
	}
	n, err = b.Read(p)
	return n, err, true
}
