package h1

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/textproto"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"go.uber.org/zap"
	"golang.org/x/net/http/httpguts"

	"github.com/sidecarlb/sidecar/internal/httpwire"
	"github.com/sidecarlb/sidecar/internal/rawio"
)

const (
	bufSize = 8 << 10
	// holdBody is how much of an answer of unknown length is held back so
	// that, if the handler ends within it, the answer gets a Content-Length
	// instead of chunks.
	holdBody = 2 << 10
	// discardLimit is how much of a request body the handler left unread
	// is skipped to keep the connection; past it the connection closes.
	discardLimit = 256 << 10
	watchAfter   = 10 * time.Millisecond
)

// Connection states, for Shutdown.
const (
	stateActive int32 = iota
	stateIdle
	stateClosed
)

var errHeaderTooLarge = errors.New("request header too large")

var (
	readerPool = sync.Pool{New: func() any { return bufio.NewReaderSize(nil, bufSize) }}
	writerPool = sync.Pool{New: func() any { return bufio.NewWriterSize(nil, bufSize) }}
)

// conn is one app connection speaking HTTP/1.x. One goroutine
// reads its requests and runs the handler for each in turn.
type conn struct {
	s      *Server
	nc     net.Conn
	remote string
	br     *bufio.Reader // reads from the conn itself (Read below)
	bw     *bufio.Writer
	ctx    context.Context // every request's context; canceled when the client is gone
	cancel context.CancelFunc
	state  atomic.Int32
	header http.Header // reused by each response
	hold   []byte      // reused by each response: body held before the head
	// idleSince is when the connection last went idle, from the server's
	// epoch: Server.sweepIdle closes it once that is the idle timeout ago.
	idleSince atomic.Int64

	prefix []byte      // bytes the sniffer read
	lr     limitReader // the socket, within the header limit while a head is read
	nread  int64       // bytes Read has returned, to measure a head read by net/http
	// lingering: a body read the handler left behind may still use br,
	// which is then not reused.
	lingering bool

	// The client watch: a read in the background while a handler runs.
	watch   *time.Timer
	mu      sync.Mutex
	cond    sync.Cond
	seq     uint64 // request number; the watch is for request armed
	armed   uint64
	reqDone bool // the handler of request seq returned
	inRead  bool
	aborted bool
	hasByte bool
	byteBuf [1]byte

	// tmpl is the request parseHead fills, which readRequest copies with
	// the connection's context.
	tmpl http.Request
}

// serveConn serves HTTP/1.x on nc for s (Server.ServeConn).
func serveConn(s *Server, nc net.Conn, prefix []byte) {
	c := &conn{s: s, nc: nc, remote: nc.RemoteAddr().String(), prefix: prefix,
		lr: limitReader{c: nc, n: noLimit, err: errHeaderTooLarge}}
	c.cond.L = &c.mu
	if !s.track(c) {
		nc.Close()
		return
	}
	c.ctx, c.cancel = context.WithCancel(s.baseCtx)
	endConn := func() {}
	if s.opts.ConnContext != nil {
		c.ctx, endConn = s.opts.ConnContext(c.ctx)
	}
	c.br = readerPool.Get().(*bufio.Reader)
	c.br.Reset(c)
	c.bw = writerPool.Get().(*bufio.Writer)
	c.bw.Reset(nc)
	c.header = make(http.Header, 8)
	c.watch = time.AfterFunc(time.Hour, c.startWatch)
	c.watch.Stop()
	hijacked := false
	defer func() {
		c.watch.Stop()
		endConn()
		c.cancel()
		if !hijacked {
			nc.Close()
			c.s.untrack(c)
			if !c.lingering {
				c.br.Reset(nil)
				readerPool.Put(c.br)
			}
		}
		c.bw.Reset(nil)
		writerPool.Put(c.bw)
	}()

	for n := 0; ; n++ {
		if n > 0 && !c.awaitRequest() {
			return
		}
		req, err := c.readRequest()
		if err != nil {
			c.refuse(err)
			return
		}
		w := c.newResponse(req)
		keep := c.serve(w, req)
		hijacked = w.hijacked
		if !keep {
			return
		}
	}
}

// awaitRequest waits, for up to the idle timeout (Server.sweepIdle), for
// the first byte of the next request; false means the connection is done.
func (c *conn) awaitRequest() bool {
	if c.br.Buffered() > 0 || c.hasByte {
		return true
	}
	c.idleSince.Store(int64(time.Since(c.s.epoch)))
	c.state.Store(stateIdle)
	if c.s.isClosed() {
		return false // Shutdown began; it may have missed this connection
	}
	if _, err := c.br.Peek(1); err != nil {
		return false
	}
	return c.state.CompareAndSwap(stateIdle, stateActive)
}

// closeIfIdle closes the connection if it is waiting for a request, for
// Shutdown; a busy connection closes after its answer.
func (c *conn) closeIfIdle() {
	if c.state.CompareAndSwap(stateIdle, stateClosed) {
		c.nc.Close()
	}
}

// Read reads for the connection's bufio.Reader: first what the sniffer and
// the client watch read, then the socket, within the header limit.
func (c *conn) Read(p []byte) (int, error) {
	if len(c.prefix) > 0 {
		n := copy(p, c.prefix)
		c.prefix = c.prefix[n:]
		c.nread += int64(n)
		return n, nil
	}
	if c.hasByte {
		p[0] = c.byteBuf[0]
		c.hasByte = false
		c.nread++
		return 1, nil
	}
	n, err := c.lr.Read(p)
	c.nread += int64(n)
	return n, err
}

// readRequest reads and checks the next request head, as net/http's
// server does: by parseHead when the head is already buffered and plain,
// by http.ReadRequest otherwise.
func (c *conn) readRequest() (*http.Request, error) {
	limit := c.s.opts.MaxHeaderBytes
	if c.br.Buffered() > 0 && parseHead(c.br, &c.tmpl, limit) {
		return c.checkRequest(&c.tmpl, true)
	}
	_ = c.nc.SetReadDeadline(deadline(c.s.opts.ReadHeaderTimeout))
	c.lr.n = int64(limit) + bufSize // the reader's read-ahead past the head
	start := c.nread - int64(c.br.Buffered())
	framing := c.peekHead()
	req, err := http.ReadRequest(c.br)
	c.lr.n = noLimit
	if err != nil {
		return nil, err
	}
	if c.nread-int64(c.br.Buffered())-start > int64(limit) {
		return nil, errHeaderTooLarge
	}
	_ = c.nc.SetReadDeadline(time.Time{})
	// RFC 9112, 6.1 and 6.3: Transfer-Encoding in an HTTP/1.0 request, or
	// with a Content-Length, is framing the sidecar and whatever sits in
	// front of it may read differently: a body taken for the next request.
	// net/http reads the first by its Content-Length (zero) and the second
	// as chunked, and keeps the connection; the sidecar refuses both, as
	// nginx and Envoy do. A head too long to be scanned whole leaves it
	// unsure, and the connection closes after the request.
	switch {
	case framing.te && (req.ProtoMinor == 0 || framing.cl):
		return nil, statusError{http.StatusBadRequest, "ambiguous message framing"}
	case !framing.known && (req.ProtoMinor == 0 || req.TransferEncoding != nil):
		req.Close = true
	}
	return c.checkRequest(req, false)
}

// peekHead waits for the end of the request head in the connection's
// reader, as long as the head fits in its buffer, and scans the head's
// framing fields: http.ReadRequest hides some (headFraming). When the head
// does not fit, or the read fails (http.ReadRequest then meets the
// failure), the framing it returns is not known.
func (c *conn) peekHead() (f headFraming) {
	for {
		buf, _ := c.br.Peek(c.br.Buffered())
		if scanHead(buf, &f) {
			return f
		}
		if len(buf) >= c.br.Size() {
			return headFraming{}
		}
		if _, err := c.br.Peek(len(buf) + 1); err != nil {
			return headFraming{}
		}
	}
}

// checkRequest refuses what net/http's server would, of what
// http.ReadRequest accepts (parseHead refuses the rest itself), and gives
// req the connection's context.
func (c *conn) checkRequest(req *http.Request, fast bool) (*http.Request, error) {
	if req.ProtoMajor != 1 {
		return nil, statusError{http.StatusHTTPVersionNotSupported, "unsupported protocol version"}
	}
	// The parsers copied the Host header into req.Host (which an
	// absolute-form target overrides).
	switch {
	case req.ProtoAtLeast(1, 1) && req.Host == "" && req.Method != http.MethodConnect:
		return nil, statusError{http.StatusBadRequest, "missing required Host header"}
	case !httpguts.ValidHostHeader(req.Host):
		return nil, statusError{http.StatusBadRequest, "malformed Host header"}
	}
	if !fast {
		// textproto rejected bad values already; names it lets through.
		for k := range req.Header {
			if !httpwire.ValidToken(k) {
				return nil, statusError{http.StatusBadRequest, "invalid header name"}
			}
		}
	}
	req.RemoteAddr = c.remote
	return req.WithContext(c.ctx), nil
}

// statusError is a request refused before its handler: the status and
// why.
type statusError struct {
	code int
	text string
}

func (e statusError) Error() string { return strconv.Itoa(e.code) + " " + e.text }

// refuse answers a request that could not be read, when there is one to
// answer, and logs why at debug.
func (c *conn) refuse(err error) {
	var ne net.Error
	if err == io.EOF || errors.As(err, &ne) && ne.Timeout() || errors.Is(err, net.ErrClosed) {
		return // the client left or went quiet: nothing to answer
	}
	code, text := http.StatusBadRequest, ""
	var se statusError
	switch {
	case errors.As(err, &se):
		code, text = se.code, se.text
	case errors.Is(err, errHeaderTooLarge):
		code = http.StatusRequestHeaderFieldsTooLarge
	case strings.Contains(err.Error(), "unsupported transfer encoding"):
		code, text = http.StatusNotImplemented, "unsupported transfer encoding"
	}
	c.s.log.Debug("bad request", zap.String("remote", c.remote), zap.Error(err))
	msg := httpwire.StatusLine(code)
	if text != "" {
		msg += ": " + text
	}
	_ = c.nc.SetWriteDeadline(time.Now().Add(time.Second))
	c.bw.WriteString("HTTP/1.1 " + httpwire.StatusLine(code) + "\r\nContent-Type: text/plain; charset=utf-8\r\nConnection: close\r\n\r\n" + msg)
	c.bw.Flush()
}

// serve runs the handler for one request and finishes its answer; it
// reports whether the connection may carry another request.
func (c *conn) serve(w *response, req *http.Request) (keep bool) {
	rawio.StartRequest()
	defer rawio.EndRequest()
	c.mu.Lock()
	c.seq++
	c.reqDone = false
	w.seq = c.seq
	c.mu.Unlock()
	if req.Body == http.NoBody || req.Body == nil {
		c.armWatch(w.seq)
	}
	defer func() {
		if v := recover(); v != nil {
			if v != http.ErrAbortHandler {
				c.s.log.Error("handler panicked", zap.String("remote", c.remote),
					zap.Any("panic", v), zap.Stack("stack"))
			}
			// Send what was written, but not the end of a chunked body, so
			// the client sees a broken answer, not a short one.
			c.endWatch()
			if !w.hijacked {
				w.wmu.Lock() // a body reader may be sending a 100 Continue
				c.bw.Flush()
				w.wmu.Unlock()
				_, c.lingering = w.body.end(false)
			}
			keep = false
		}
	}()
	if w.expectContinue == "bad" {
		w.header.Set("Connection", "close")
		w.WriteHeader(http.StatusExpectationFailed)
		w.finish()
		return false
	}
	c.s.handler.ServeHTTP(w, req)
	c.endWatch()
	if w.hijacked {
		return false
	}
	w.finish()
	keep, c.lingering = w.body.end(!w.closeAfter && !c.s.isClosed())
	return keep
}

// armWatch starts the client watch after watchAfter, once the request
// body has been read whole (the watch's read must not take body bytes)
// and unless the client already sent more (pipelining).
func (c *conn) armWatch(seq uint64) {
	c.mu.Lock()
	// Only while request seq's handler runs; then nothing else reads br.
	if seq == c.seq && !c.reqDone && !c.hasByte && c.br.Buffered() == 0 {
		c.armed = c.seq
		c.watch.Reset(watchAfter)
	}
	c.mu.Unlock()
}

// startWatch runs on the watch timer: it reads one byte in the background
// so that a client hanging up cancels its request's context. It reads at
// most one byte ahead: once it holds the next request's first byte, the
// client is known to be there and another read would overwrite that byte
// with the second (a 405 for "ET /get" or "OST /echo" at the node). A
// second run for one request is a timer callback that fired for an earlier
// arming (Stop and Reset do not recall one already started, late under CPU
// starvation) and passes the checks of the arming after it.
func (c *conn) startWatch() {
	c.mu.Lock()
	if c.reqDone || c.armed != c.seq || c.inRead || c.hasByte {
		c.mu.Unlock()
		return
	}
	c.inRead = true
	c.mu.Unlock()
	n, err := c.nc.Read(c.byteBuf[:])
	c.mu.Lock()
	if n == 1 {
		c.hasByte = true // the next request's first byte
	}
	var ne net.Error
	if err != nil && !(c.aborted && errors.As(err, &ne) && ne.Timeout()) {
		c.cancel() // the client hung up
	}
	c.inRead = false
	c.cond.Broadcast()
	c.mu.Unlock()
}

// endWatch marks the request's handler done and stops the client watch,
// interrupting its read if it is running.
func (c *conn) endWatch() {
	c.mu.Lock()
	c.reqDone = true
	c.watch.Stop()
	if c.inRead {
		c.aborted = true
		_ = c.nc.SetReadDeadline(aLongTimeAgo)
		for c.inRead {
			c.cond.Wait()
		}
		c.aborted = false
		_ = c.nc.SetReadDeadline(time.Time{})
	}
	c.mu.Unlock()
}

// response is the http.ResponseWriter of one HTTP/1.x request. The head
// is written when the first body bytes past holdBody come, on Flush, or
// when the handler returns; which framing the body gets is decided then.
type response struct {
	c      *conn
	req    *http.Request
	header http.Header
	body   requestBody

	status        int
	wroteHeader   bool  // the status is set
	committed     bool  // the head is written
	contentLength int64 // -1: unknown
	written       int64
	chunked       bool
	closeAfter    bool // the connection ends after this answer: the client asked, or the answer needs it
	hijacked      bool
	handlerDone   bool
	writeDeadline bool     // the handler set one: cleared when the answer ends
	seq           uint64   // the connection's request number
	trailers      []string // declared in the Trailer header

	// expectContinue is "100-continue" when the client waits for a 100
	// before sending the body, "bad" for an expectation not met, or "".
	expectContinue string
	wmu            sync.Mutex // orders a 100 Continue from a body reader with the head
	sentContinue   bool
}

func (c *conn) newResponse(req *http.Request) *response {
	clear(c.header)
	// Whether the client asked to close is read now: the handler may
	// change req (prepareOutbound clears Close for the node's request).
	w := &response{c: c, req: req, header: c.header, contentLength: -1, closeAfter: req.Close}
	if exp, ok := req.Header["Expect"]; ok {
		if len(exp) == 1 && strings.EqualFold(exp[0], "100-continue") && req.ProtoAtLeast(1, 1) {
			if req.ContentLength != 0 {
				w.expectContinue = "100-continue"
			}
			delete(req.Header, "Expect")
		} else {
			w.expectContinue = "bad"
		}
	}
	if req.Body != http.NoBody && req.Body != nil {
		w.body = requestBody{w: w, rc: req.Body}
		req.Body = &w.body
	}
	return w
}

func (w *response) Header() http.Header { return w.header }

// AdoptHeader makes h the answer's header in place of the connection's
// own, sparing a proxied answer the copy of every field (headerAdopter).
func (w *response) AdoptHeader(h http.Header) bool {
	if w.wroteHeader || len(w.header) > 0 || h == nil {
		return false
	}
	w.header = h
	return true
}

func (w *response) WriteHeader(code int) {
	if w.hijacked || w.wroteHeader {
		return
	}
	if code < 100 || code > 999 {
		panic(fmt.Sprintf("invalid WriteHeader code %v", code))
	}
	if code < 200 && code != http.StatusSwitchingProtocols {
		// Informational: sent at once, header and all.
		w.wmu.Lock()
		w.c.bw.WriteString("HTTP/1.1 " + httpwire.StatusLine(code) + "\r\n")
		writeHeaderLines(w.c.bw, w.header, nil)
		w.c.bw.WriteString("\r\n")
		w.c.bw.Flush()
		w.wmu.Unlock()
		return
	}
	w.wroteHeader = true
	w.status = code
	if cl, ok := w.header["Content-Length"]; ok {
		if n, err := strconv.ParseInt(textproto.TrimString(firstValue(cl)), 10, 64); err == nil && n >= 0 {
			w.contentLength = n
		} else {
			w.c.s.log.Debug("invalid Content-Length in answer", zap.Strings("value", cl))
			delete(w.header, "Content-Length")
		}
	}
}

func firstValue(vv []string) string {
	if len(vv) == 0 {
		return ""
	}
	return vv[0]
}

func (w *response) bodyAllowed() bool {
	return w.req.Method != http.MethodHead && httpwire.BodyAllowed(w.status)
}

func (w *response) Write(p []byte) (int, error) {
	if w.hijacked {
		return 0, http.ErrHijacked
	}
	if !w.wroteHeader {
		w.WriteHeader(http.StatusOK)
	}
	if !httpwire.BodyAllowed(w.status) {
		return 0, http.ErrBodyNotAllowed
	}
	if w.contentLength >= 0 && w.written+int64(len(p)) > w.contentLength {
		return 0, http.ErrContentLength
	}
	w.written += int64(len(p))
	if w.req.Method == http.MethodHead {
		return len(p), nil
	}
	if !w.committed {
		if w.contentLength < 0 && len(w.c.hold)+len(p) <= holdBody {
			w.c.hold = append(w.c.hold, p...)
			return len(p), nil
		}
		w.commit(false)
	}
	w.writeBody(p)
	if w.written == w.contentLength { // never chunked: the length is known
		// The answer is whole: send it now, not after the handler's
		// bookkeeping (a proxied answer's metrics, breaker and balancer
		// feedback, the node connection's return to its pool). Nothing
		// more can be written to it, and a failure shows in finish too.
		if err := w.c.bw.Flush(); err != nil {
			return len(p), err
		}
	}
	return len(p), nil
}

func (w *response) writeBody(p []byte) {
	if len(p) == 0 {
		return
	}
	bw := w.c.bw
	if w.chunked {
		var nb [16]byte
		bw.Write(strconv.AppendInt(nb[:0], int64(len(p)), 16))
		bw.WriteString("\r\n")
		bw.Write(p)
		bw.WriteString("\r\n")
		return
	}
	bw.Write(p)
}

// commit writes the head, and the body held so far. final says the handler
// has returned, so a held body is all there is and can take a
// Content-Length.
func (w *response) commit(final bool) {
	w.wmu.Lock()
	defer w.wmu.Unlock()
	w.committed = true
	setLength := w.frame(final)
	w.writeHead(setLength)
	if held := w.c.hold; len(held) > 0 {
		w.c.hold = held[:0]
		w.writeBody(held)
	}
}

// frame decides the answer's framing as its head is written: the declared
// trailers, a Content-Length the server sets (reported by setLength),
// chunks, and whether the connection closes after it.
func (w *response) frame(final bool) (setLength bool) {
	h, req := w.header, w.req
	delete(h, "Transfer-Encoding")
	httpwire.DeclaredTrailers(h, func(k string) { w.trailers = append(w.trailers, k) })
	bodyOK := httpwire.BodyAllowed(w.status)
	if !bodyOK && w.status != http.StatusNotModified {
		delete(h, "Content-Length")
		w.contentLength = -1
	}
	if bodyOK && w.contentLength < 0 && final && len(w.trailers) == 0 &&
		(req.Method != http.MethodHead || w.written > 0) {
		w.contentLength = w.written
		setLength = true
	}
	if httpwire.HasToken(h["Connection"], "close") || w.c.s.isClosed() {
		w.closeAfter = true
	}
	if w.bodyAllowed() && w.contentLength < 0 {
		if req.ProtoAtLeast(1, 1) {
			w.chunked = true
		} else {
			w.closeAfter = true // the end of the body is the end of the connection
		}
	}
	if !w.body.doneOrSmall() {
		w.closeAfter = true
	}
	if w.expectContinue == "100-continue" && !w.sentContinue {
		// The client may or may not send the body it held back.
		w.closeAfter = true
	}
	return setLength
}

// writeHead writes the status line and the header, with the framing fields
// frame decided.
func (w *response) writeHead(setLength bool) {
	h, req := w.header, w.req
	bw := w.c.bw
	bw.WriteString("HTTP/1.1 ")
	bw.WriteString(httpwire.StatusLine(w.status))
	bw.WriteString("\r\n")
	writeHeaderLines(bw, h, w.trailers)
	if _, ok := h["Date"]; !ok {
		bw.WriteString("Date: ")
		bw.WriteString(httpDate(time.Now()))
		bw.WriteString("\r\n")
	}
	if setLength {
		var nb [20]byte
		bw.WriteString("Content-Length: ")
		bw.Write(strconv.AppendInt(nb[:0], w.contentLength, 10))
		bw.WriteString("\r\n")
	}
	if w.chunked {
		bw.WriteString("Transfer-Encoding: chunked\r\n")
	}
	switch {
	case w.closeAfter && !httpwire.HasToken(h["Connection"], "close") && req.ProtoAtLeast(1, 1):
		bw.WriteString("Connection: close\r\n")
	case !w.closeAfter && !req.ProtoAtLeast(1, 1):
		bw.WriteString("Connection: keep-alive\r\n") // an HTTP/1.0 client that asked for it
	}
	bw.WriteString("\r\n")
}

// writeHeaderLines writes h as header lines, less the fields the server
// frames itself and any a client could not parse.
// Fields declared as trailers (skip) wait for the end of the body.
func writeHeaderLines(bw *bufio.Writer, h http.Header, skip []string) {
	for k, vv := range h {
		if strings.HasPrefix(k, http.TrailerPrefix) || !httpwire.ValidToken(k) || slices.Contains(skip, k) {
			continue
		}
		for _, v := range vv {
			httpwire.WriteField(bw, k, v)
		}
	}
}

// finish ends the answer when the handler returns: the head if not yet
// written, the last chunk and trailers, and one flush.
func (w *response) finish() {
	w.handlerDone = true
	if !w.wroteHeader {
		w.WriteHeader(http.StatusOK)
	}
	if !w.committed {
		w.commit(true)
	}
	bw := w.c.bw
	if w.chunked {
		bw.WriteString("0\r\n")
		h := w.header
		for _, k := range w.trailers {
			for _, v := range h[k] {
				httpwire.WriteField(bw, k, v)
			}
		}
		for k, vv := range h {
			name, ok := strings.CutPrefix(k, http.TrailerPrefix)
			if !ok || !httpwire.ValidToken(name) {
				continue
			}
			for _, v := range vv {
				httpwire.WriteField(bw, name, v)
			}
		}
		bw.WriteString("\r\n")
	}
	if w.bodyAllowed() && w.contentLength >= 0 && w.written != w.contentLength {
		w.closeAfter = true // short: the client must not wait for the rest
	}
	if err := bw.Flush(); err != nil {
		w.closeAfter = true
	}
	if w.writeDeadline {
		_ = w.c.nc.SetWriteDeadline(time.Time{})
	}
}

// Flush sends the head, and what body is written, now.
func (w *response) Flush() { _ = w.FlushError() }

func (w *response) FlushError() error {
	if w.hijacked {
		return http.ErrHijacked
	}
	if !w.wroteHeader {
		w.WriteHeader(http.StatusOK)
	}
	if !w.committed {
		w.commit(false)
	}
	return w.c.bw.Flush()
}

// SetWriteDeadline is there for http.ResponseController: a handler that
// streams (server-sent events) bounds each write, so a client that stops
// reading cannot hold it. The deadline ends with the answer.
func (w *response) SetWriteDeadline(t time.Time) error {
	if w.hijacked {
		return http.ErrHijacked
	}
	w.writeDeadline = true
	return w.c.nc.SetWriteDeadline(t)
}

// EnableFullDuplex is there for http.ResponseController: the server reads
// a request body and writes its answer independently already.
func (w *response) EnableFullDuplex() error { return nil }

// Hijack hands the connection to the handler, with the bytes the server
// read past the request in the returned reader.
func (w *response) Hijack() (net.Conn, *bufio.ReadWriter, error) {
	if w.hijacked {
		return nil, nil, http.ErrHijacked
	}
	if w.handlerDone {
		return nil, nil, errors.New("http: Hijack after the handler returned")
	}
	c := w.c
	c.endWatch()
	if w.committed {
		if err := c.bw.Flush(); err != nil {
			return nil, nil, err
		}
	}
	w.hijacked = true
	c.state.Store(stateClosed)
	c.s.untrack(c)
	_ = c.nc.SetDeadline(time.Time{})
	var pending []byte
	if c.hasByte {
		pending = []byte{c.byteBuf[0]}
		c.hasByte = false
	}
	pending = append(pending, c.prefix...)
	c.prefix = nil
	// The bytes the client watch or the sniffer read come before the
	// socket's; c.br holds any the request's reads took past its end.
	nc := &prefixConn{Conn: c.nc, prefix: pending}
	return nc, bufio.NewReadWriter(c.br, bufio.NewWriter(nc)), nil
}

// requestBody is a request body as the handler sees it: it sends the 100
// Continue a waiting client needs on the first read, and starts the client
// watch at its end.
type requestBody struct {
	w  *response
	rc io.ReadCloser

	mu      sync.Mutex
	read    int64
	eof     bool
	closed  bool // by the handler, or because it returned
	readers int  // reads under way
}

func (b *requestBody) Read(p []byte) (int, error) {
	w := b.w
	b.mu.Lock()
	if b.closed {
		b.mu.Unlock()
		return 0, http.ErrBodyReadAfterClose
	}
	if b.eof {
		b.mu.Unlock()
		return 0, io.EOF
	}
	b.readers++
	b.mu.Unlock()
	if w.expectContinue == "100-continue" {
		w.wmu.Lock()
		if !w.sentContinue && !w.committed {
			w.sentContinue = true
			w.c.bw.WriteString("HTTP/1.1 100 Continue\r\n\r\n")
			w.c.bw.Flush()
		}
		w.wmu.Unlock()
	}
	n, err := b.rc.Read(p)
	b.mu.Lock()
	b.readers--
	b.read += int64(n)
	if err == io.EOF {
		b.eof = true
	}
	b.mu.Unlock()
	if err == io.EOF {
		w.c.armWatch(w.seq)
	}
	return n, err
}

// Close makes later reads fail; what is left of the body is skipped when
// the handler returns (drain).
func (b *requestBody) Close() error {
	b.mu.Lock()
	b.closed = true
	b.mu.Unlock()
	return nil
}

// doneOrSmall reports whether the body was read whole, or what is left is
// small enough to skip for the connection's sake.
func (b *requestBody) doneOrSmall() bool {
	if b.w == nil {
		return true // no body
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.eof {
		return true
	}
	cl := b.w.req.ContentLength
	return cl >= 0 && cl-b.read <= discardLimit && b.w.expectContinue != "100-continue"
}

// end detaches the body from its request once the handler has returned:
// later reads fail, as net/http's do. With skip, what the handler left of
// the body is skipped, up to discardLimit, to keep the connection. keep
// reports whether the connection can carry another request; lingering, a
// read the handler left behind still under way, which may yet use the
// connection's reader.
func (b *requestBody) end(skip bool) (keep, lingering bool) {
	if b.w == nil {
		return skip, false // no body
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	b.closed = true
	switch {
	case b.readers > 0:
		return false, true
	case !skip:
		return false, false
	case b.eof:
		return true, false
	case b.w.expectContinue == "100-continue" && !b.w.sentContinue:
		return false, false
	}
	nc := b.w.c.nc
	_ = nc.SetReadDeadline(deadline(b.w.c.s.opts.ReadHeaderTimeout))
	n, err := io.CopyN(io.Discard, b.rc, discardLimit+1)
	_ = nc.SetReadDeadline(time.Time{}) // between requests there is none
	return err == io.EOF && n <= discardLimit, false
}

// httpDate is the Date header's value for now, made once a second.
func httpDate(now time.Time) string {
	sec := now.Unix()
	if d := dateNow.Load(); d != nil && d.sec == sec {
		return d.s
	}
	d := &dateValue{sec: sec, s: now.UTC().Format(http.TimeFormat)}
	dateNow.Store(d)
	return d.s
}

type dateValue struct {
	sec int64
	s   string
}

var dateNow atomic.Pointer[dateValue]
