package h1

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/textproto"
	"strconv"
	"strings"
	"time"

	"github.com/sidecarlb/sidecar/internal/httpwire"
	"github.com/sidecarlb/sidecar/internal/rawio"
)

// The HTTP/1.1 wire format of the client Pool: writing a request, reading and
// framing a response.

// checkRequestLine refuses a request whose method, query or host
// writeRequest would write as they are, when they could end or split the
// request line or the Host field: the engines that read requests refuse
// such requests already, and this is the second line.
func checkRequestLine(out *http.Request) error {
	if !httpwire.ValidToken(out.Method) {
		return fmt.Errorf("%w: invalid method %q", httpwire.ErrBadRequest, out.Method)
	}
	if !httpwire.Visible(out.URL.RawQuery) || !httpwire.Visible(out.Host) {
		return fmt.Errorf("%w: control byte or space in the query or host", httpwire.ErrBadRequest)
	}
	return nil
}

// writeRequest writes out's head and body and flushes.
func (pc *ClientConn) writeRequest(out *http.Request, body reqBody) error {
	w := pc.bw
	w.WriteString(out.Method)
	w.WriteByte(' ')
	if path := out.URL.EscapedPath(); path == "" {
		w.WriteByte('/')
	} else {
		w.WriteString(path)
	}
	if out.URL.ForceQuery || out.URL.RawQuery != "" {
		w.WriteByte('?')
		w.WriteString(out.URL.RawQuery)
	}
	w.WriteString(" HTTP/1.1\r\nHost: ")
	host := out.Host
	if host == "" {
		host = out.URL.Host
	}
	w.WriteString(host)
	w.WriteString("\r\n")
	for k, vv := range out.Header {
		switch k {
		case "Host", "Content-Length", "Transfer-Encoding", "Trailer":
			continue
		case "User-Agent":
			if len(vv) == 0 || vv[0] == "" {
				continue
			}
			vv = vv[:1]
		}
		for _, v := range vv {
			httpwire.WriteField(w, k, v)
		}
	}
	if body.n > 0 || out.Method == http.MethodPost || out.Method == http.MethodPut || out.Method == http.MethodPatch {
		w.WriteString("Content-Length: ")
		var nb [20]byte
		w.Write(strconv.AppendInt(nb[:0], body.n, 10))
		w.WriteString("\r\n")
	}
	if out.Close {
		w.WriteString("Connection: close\r\n")
	}
	w.WriteString("\r\n")
	if body.src == nil {
		w.Write(body.buf)
		if rc, ok := pc.c.(*rawio.Conn); ok {
			return rc.HoldWrite(w.Flush)
		}
		return w.Flush()
	}
	// Copy through the write buffer, sending as it fills.
	for left := body.n; left > 0; {
		if w.Available() == 0 {
			if err := w.Flush(); err != nil {
				return err
			}
		}
		buf := w.AvailableBuffer()[:min(int64(w.Available()), left)]
		n, err := body.src.Read(buf)
		w.Write(buf[:n])
		left -= int64(n)
		if err == io.EOF && left > 0 {
			return fmt.Errorf("%w: %w", httpwire.ErrBadRequestBody, io.ErrUnexpectedEOF)
		}
		if err != nil && err != io.EOF {
			return err
		}
	}
	return w.Flush()
}

// readResponse reads a response head, skipping 1xx informational ones, and
// works out the body's framing.
func (pc *ClientConn) readResponse(out *http.Request) (*http.Response, error) {
	for n := 0; ; n++ {
		head, err := pc.readHead()
		if err != nil {
			return nil, fmt.Errorf("read response from node: %w", err)
		}
		line, rest, _ := strings.Cut(head, "\n")
		line = strings.TrimSuffix(line, "\r")
		proto, status, ok := strings.Cut(line, " ")
		if !ok || len(status) < 3 {
			return nil, fmt.Errorf("malformed HTTP response %q", line)
		}
		major, minor, ok := http.ParseHTTPVersion(proto)
		if !ok || major != 1 {
			return nil, fmt.Errorf("malformed HTTP version %q", proto)
		}
		code, err := strconv.Atoi(status[:3])
		if err != nil || code < 100 || code > 999 || (len(status) > 3 && status[3] != ' ') {
			return nil, fmt.Errorf("malformed HTTP status code %q", status)
		}
		if code == http.StatusSwitchingProtocols && httpwire.UpgradeType(out.Header) != "" {
			hdr, err := parseHeader(rest)
			if err != nil {
				return nil, err
			}
			return &http.Response{Status: status, StatusCode: code, Proto: proto, ProtoMajor: major,
				ProtoMinor: minor, Header: hdr, Request: out}, nil
		}
		if code < 200 {
			if code == http.StatusSwitchingProtocols {
				return nil, errors.New("unexpected 101 Switching Protocols from node")
			}
			if n >= 5 {
				return nil, errors.New("too many 1xx informational responses from node")
			}
			continue
		}
		hdr, err := parseHeader(rest)
		if err != nil {
			return nil, err
		}
		if len(status) == 3 {
			status += " " + http.StatusText(code)
		}
		resp := &http.Response{
			Status:     status,
			StatusCode: code,
			Proto:      proto,
			ProtoMajor: major,
			ProtoMinor: minor,
			Header:     hdr,
			Request:    out,
		}
		err = frame(resp, out.Method)
		resp.Close = resp.Close || out.Close
		return resp, err
	}
}

// readHead reads a response head up to and including its empty line, as
// one string.
func (pc *ClientConn) readHead() (string, error) {
	buf := pc.head[:0]
	lineStart := 0
	for {
		chunk, err := pc.br.ReadSlice('\n')
		buf = append(buf, chunk...)
		if err == bufio.ErrBufferFull {
			continue
		}
		if err != nil {
			if err == io.EOF && len(buf) > 0 {
				err = io.ErrUnexpectedEOF
			}
			pc.head = buf[:0]
			return "", err
		}
		if line := buf[lineStart:]; len(line) == 1 || (len(line) == 2 && line[0] == '\r') {
			if lineStart == 0 {
				buf = buf[:0] // tolerate empty lines before the status line
				continue
			}
			break
		}
		lineStart = len(buf)
	}
	if cap(buf) <= 16<<10 {
		pc.head = buf[:0]
	} else {
		pc.head = nil
	}
	return string(buf), nil
}

// parseHeader parses header lines, each ending in LF or CRLF, up to the
// empty line. Keys and values are substrings of head: no copies.
func parseHeader(head string) (http.Header, error) {
	n := strings.Count(head, "\n") - 1
	if n <= 0 {
		return http.Header{}, nil
	}
	h := make(http.Header, n)
	strs := make([]string, n)
	var lastKey string
	for len(head) > 0 {
		var line string
		line, head, _ = strings.Cut(head, "\n")
		line = strings.TrimSuffix(line, "\r")
		if line == "" {
			break
		}
		if line[0] == ' ' || line[0] == '\t' { // obsolete line folding
			vv := h[lastKey]
			if len(vv) == 0 {
				return nil, fmt.Errorf("malformed response header line %q", line)
			}
			vv[len(vv)-1] += " " + textproto.TrimString(line)
			continue
		}
		k, v, ok := strings.Cut(line, ":")
		if !ok || !httpwire.ValidToken(k) {
			return nil, fmt.Errorf("malformed response header line %q", line)
		}
		v = textproto.TrimString(v)
		for i := 0; i < len(v); i++ {
			if c := v[i]; (c < ' ' && c != '\t') || c == 0x7f {
				return nil, fmt.Errorf("invalid value of response header %q", k)
			}
		}
		k = httpwire.CanonicalKey(k)
		lastKey = k
		if vv := h[k]; vv == nil && len(strs) > 0 {
			vv, strs = strs[:1:1], strs[1:]
			vv[0] = v
			h[k] = vv
		} else {
			h[k] = append(vv, v)
		}
	}
	return h, nil
}

// frame sets the response's ContentLength, TransferEncoding, Close and
// announced Trailer the way http.Transport does.
func frame(resp *http.Response, method string) error {
	h := resp.Header
	resp.Close = shouldClose(resp.ProtoMinor, h["Connection"])
	chunked := false
	if te, ok := h["Transfer-Encoding"]; ok {
		if len(te) != 1 || !strings.EqualFold(textproto.TrimString(te[0]), "chunked") {
			return fmt.Errorf("unsupported transfer encoding %q", te)
		}
		delete(h, "Transfer-Encoding")
		chunked = true
	}
	noBody := method == http.MethodHead || !httpwire.BodyAllowed(resp.StatusCode)
	resp.ContentLength = -1
	if cl, ok := h["Content-Length"]; ok && !chunked {
		for _, v := range cl[1:] {
			if textproto.TrimString(v) != textproto.TrimString(cl[0]) {
				return fmt.Errorf("conflicting Content-Length headers %q", cl)
			}
		}
		n, err := strconv.ParseUint(textproto.TrimString(cl[0]), 10, 63)
		if err != nil {
			return fmt.Errorf("bad Content-Length %q", cl[0])
		}
		resp.ContentLength = int64(n)
	} else if chunked {
		// RFC 9112, 6.1 and 6.3: chunked with a Content-Length, or in
		// HTTP/1.0, is framing another reader may take differently; the
		// answer is read as chunked and the connection not used again.
		resp.Close = resp.Close || ok || resp.ProtoMinor == 0
		delete(h, "Content-Length")
	}
	switch {
	case noBody:
		if method != http.MethodHead {
			resp.ContentLength = 0
		}
		return nil
	case chunked:
		resp.TransferEncoding = chunkedEncoding
		if tr, ok := h["Trailer"]; ok {
			resp.Trailer = make(http.Header)
			for _, v := range tr {
				for _, k := range strings.Split(v, ",") {
					k = httpwire.CanonicalKey(textproto.TrimString(k))
					switch k {
					case "", "Transfer-Encoding", "Trailer", "Content-Length":
						continue
					}
					resp.Trailer[k] = nil
				}
			}
			delete(h, "Trailer")
		}
	case resp.ContentLength < 0:
		resp.Close = true
	}
	return nil
}

var chunkedEncoding = []string{"chunked"}

// shouldClose reports whether an HTTP/1.minor response ends its connection.
func shouldClose(minor int, conn []string) bool {
	if minor == 0 {
		return !httpwire.HasToken(conn, "keep-alive")
	}
	return httpwire.HasToken(conn, "close")
}

// respBody reads one response's framed body from its connection, giving the
// connection back to the pool at the end of a body read in full.
type respBody struct {
	pc     *ClientConn // nil once finished
	resp   *http.Response
	cr     io.Reader // chunked
	remain int64     // length-delimited: bytes left
	x      exchange
	err    error // sticky
}

func (b *respBody) Read(p []byte) (int, error) {
	if b.err != nil {
		return 0, b.err
	}
	if b.pc == nil {
		return 0, io.EOF
	}
	var n int
	var err error
	switch {
	case b.cr != nil:
		n, err = b.cr.Read(p)
		if err == io.EOF {
			if terr := b.readTrailer(); terr != nil {
				err = terr
			}
		}
	case b.remain > 0:
		if int64(len(p)) > b.remain {
			p = p[:b.remain]
		}
		n, err = b.pc.br.Read(p)
		b.remain -= int64(n)
		if b.remain == 0 {
			err = io.EOF
		} else if err == io.EOF {
			err = io.ErrUnexpectedEOF
		}
	default: // close-delimited
		n, err = b.pc.br.Read(p)
	}
	if err == io.EOF {
		b.finish(nil)
		return n, io.EOF
	}
	if err != nil {
		b.err = b.x.wrap(err)
		b.finish(b.err)
		return n, b.err
	}
	return n, nil
}

// readTrailer reads the trailer section after a chunked body's last chunk.
func (b *respBody) readTrailer() error {
	br := b.pc.br
	if p, err := br.Peek(2); err == nil && p[0] == '\r' && p[1] == '\n' {
		_, _ = br.Discard(2)
		return nil
	}
	b.pc.lr.n = poolMaxHeaderBytes
	tr, err := b.pc.tp.ReadMIMEHeader()
	b.pc.lr.n = noLimit
	if err != nil {
		if err == io.EOF {
			err = io.ErrUnexpectedEOF
		}
		return fmt.Errorf("read trailer from node: %w", err)
	}
	if b.resp.Trailer == nil {
		b.resp.Trailer = make(http.Header, len(tr))
	}
	for k, vv := range tr {
		b.resp.Trailer[k] = vv
	}
	return nil
}

// finish ends the exchange: the connection goes back to the pool when err
// is nil and the response allows it, else it closes.
func (b *respBody) finish(err error) {
	pc := b.pc
	if pc == nil {
		return
	}
	b.pc = nil
	reuse := err == nil && !b.resp.Close
	if !b.x.stop() {
		reuse = false // ctx ended: its deadline is set on pc
	}
	b.x.ctx = nil
	if reuse && b.x.hasDeadline {
		if pc.c.SetDeadline(time.Time{}) != nil {
			reuse = false
		}
	}
	if reuse {
		pc.pool.put(pc)
		return
	}
	pc.c.Close()
}

// Close ends the body; before its end it closes the connection.
func (b *respBody) Close() error {
	if b.pc != nil {
		if b.err == nil {
			b.err = errBodyClosed
		}
		b.finish(b.err)
	}
	return nil
}

var errBodyClosed = errors.New("read on closed response body")
