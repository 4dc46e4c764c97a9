package h1

import (
	"bufio"
	"bytes"
	"io"
	"net/http"
	"net/url"
	"strings"

	"golang.org/x/net/http/httpguts"

	"github.com/sidecarlb/sidecar/internal/httpwire"
)

// parseHead is the fast path of the HTTP/1.1 server's request parsing: a
// plain request whose whole head is already in br is parsed in place, with
// a third of the allocations of http.ReadRequest and none of its copying.
// Plain means HTTP/1.1, an origin-form target of bytes that need no
// unescaping, one-line header fields, one Host, and a body framed by at
// most one Content-Length; anything else (chunked bodies, obs-folds,
// HTTP/1.0, absolute targets, escapes, a head still arriving) makes ok
// false with nothing read, and http.ReadRequest takes the request. So the
// fast path only has to agree with net/http on what it accepts, which
// FuzzParseHead checks field by field. A head longer than limit bytes is
// left to the slow path too, which refuses it. tmpl is the request to fill
// (the caller copies it with its context).
func parseHead(br *bufio.Reader, tmpl *http.Request, limit int) (ok bool) {
	buf, _ := br.Peek(br.Buffered())
	end := bytes.Index(buf, crlfcrlf)
	if end < 0 || end+4 > limit {
		return false
	}
	// One string for the whole head: every field is a slice of it.
	head := string(buf[:end+2])
	line, rest, _ := strings.Cut(head, "\r\n")

	method, line, ok1 := strings.Cut(line, " ")
	target, proto, ok2 := strings.Cut(line, " ")
	if !ok1 || !ok2 || proto != "HTTP/1.1" || !httpwire.ValidToken(method) {
		return false
	}
	path, query, hasQuery := strings.Cut(target, "?")
	if len(path) == 0 || path[0] != '/' || !plainPath(path) || !plainQuery(query) {
		return false
	}

	fields := strings.Count(rest, "\r\n")
	h := make(http.Header, fields)
	vals := make([]string, fields)
	var host string
	hasHost := false
	cl := int64(0)
	for rest != "" {
		line, rest, _ = strings.Cut(rest, "\r\n")
		k, v, found := strings.Cut(line, ":")
		if !found || !httpwire.ValidToken(k) || !plainValue(v) {
			return false // also a leading space: an obs-fold
		}
		v = strings.Trim(v, " \t")
		key := httpwire.CanonicalKey(k)
		switch key {
		case "Host":
			if hasHost {
				return false // net/http refuses the request
			}
			host, hasHost = v, true
			continue // net/http takes it out of the header, into Host
		case "Content-Length":
			if h[key] != nil {
				return false
			}
			n, ok := parseDigits(v)
			if !ok {
				return false
			}
			cl = n
		case "Transfer-Encoding", "Trailer", "Pragma":
			// Chunked framing, trailers, and net/http's Pragma fix-up to
			// Cache-Control are left to net/http.
			return false
		}
		if vv := h[key]; vv != nil {
			h[key] = append(vv, v)
		} else {
			vv, vals = vals[:1:1], vals[1:]
			vv[0] = v
			h[key] = vv
		}
	}

	*tmpl = http.Request{
		Method:     method,
		URL:        &url.URL{Path: path, RawQuery: query, ForceQuery: hasQuery && query == ""},
		Proto:      proto,
		ProtoMajor: 1,
		ProtoMinor: 1,
		Header:     h,
		Host:       host,
		RequestURI: target,
		Body:       http.NoBody,
		Close:      httpguts.HeaderValuesContainsToken(h["Connection"], "close"),
	}
	if cl > 0 {
		tmpl.ContentLength = cl
		tmpl.Body = &clBody{r: br, n: cl}
	}
	_, _ = br.Discard(end + 4)
	return true
}

var crlfcrlf = []byte("\r\n\r\n")

// headFraming is what a request head says of its body's framing that
// http.ReadRequest does not tell: it drops the Transfer-Encoding of an
// HTTP/1.0 request, and the Content-Length of a chunked one.
type headFraming struct {
	known bool // the head's end was seen: te and cl are exact
	te    bool // a Transfer-Encoding field
	cl    bool // a Content-Length field
	next  int  // where scanHead resumes: the start of the first line not yet seen
}

// scanHead reads the field names of the request head at the start of buf,
// from f.next on, splitting lines as net/textproto does (at LF, with a CR
// before it dropped; a line that starts with a space or tab is no field of
// its own). It reports whether the head's end is in buf; if not, it can be
// called again on buf grown.
func scanHead(buf []byte, f *headFraming) (done bool) {
	for {
		i := bytes.IndexByte(buf[f.next:], '\n')
		if i < 0 {
			return false
		}
		start := f.next
		line := buf[start : start+i]
		f.next += i + 1
		if n := len(line); n > 0 && line[n-1] == '\r' {
			line = line[:n-1]
		}
		switch {
		case start == 0: // the request line
		case len(line) == 0:
			f.known = true
			return true
		case fieldNamed(line, "transfer-encoding"):
			f.te = true
		case fieldNamed(line, "content-length"):
			f.cl = true
		}
	}
}

// fieldNamed reports whether line is a field named name, in lower case,
// in any case.
func fieldNamed(line []byte, name string) bool {
	if len(line) <= len(name) || line[len(name)] != ':' {
		return false
	}
	for i := 0; i < len(name); i++ {
		c, want := line[i], name[i]
		if 'a' <= want && want <= 'z' {
			c |= 0x20
		}
		if c != want {
			return false
		}
	}
	return true
}

// clBody is a request body framed by its Content-Length, as net/http's:
// io.EOF with its last bytes, io.ErrUnexpectedEOF if the client stops
// short.
type clBody struct {
	r *bufio.Reader
	n int64
}

func (b *clBody) Read(p []byte) (int, error) {
	if b.n <= 0 {
		return 0, io.EOF
	}
	if int64(len(p)) > b.n {
		p = p[:b.n]
	}
	n, err := b.r.Read(p)
	b.n -= int64(n)
	switch {
	case err == io.EOF:
		return n, io.ErrUnexpectedEOF
	case err == nil && b.n == 0:
		return n, io.EOF
	}
	return n, err
}

func (b *clBody) Close() error { return nil }

// parseDigits parses a Content-Length of one to 18 digits.
func parseDigits(s string) (int64, bool) {
	if s == "" || len(s) > 18 {
		return 0, false
	}
	var n int64
	for i := 0; i < len(s); i++ {
		c := s[i]
		if c < '0' || c > '9' {
			return 0, false
		}
		n = n*10 + int64(c-'0')
	}
	return n, true
}

// plainPath reports whether p is a path net/url takes as it is: letters,
// digits, and the punctuation it neither unescapes nor escapes.
func plainPath(p string) bool {
	for i := 0; i < len(p); i++ {
		if !pathByte[p[i]] {
			return false
		}
	}
	return true
}

// plainQuery reports whether q is visible ASCII with no fragment mark.
func plainQuery(q string) bool {
	for i := 0; i < len(q); i++ {
		if c := q[i]; c <= ' ' || c >= 0x7f || c == '#' {
			return false
		}
	}
	return true
}

// plainValue reports whether v is a field value net/textproto accepts:
// visible ASCII, spaces and tabs (no obs-text, which the fast path leaves
// to net/http).
func plainValue(v string) bool {
	for i := 0; i < len(v); i++ {
		if c := v[i]; (c < ' ' && c != '\t') || c >= 0x7f {
			return false
		}
	}
	return true
}

var pathByte = func() (t [256]bool) {
	for c := '0'; c <= '9'; c++ {
		t[c] = true
	}
	for c := 'a'; c <= 'z'; c++ {
		t[c] = true
		t[c-'a'+'A'] = true
	}
	for _, c := range "-._~$&+,/:;=@" {
		t[c] = true
	}
	return t
}()
