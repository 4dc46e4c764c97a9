package httpwire

import (
	"bufio"
	"net/http"
	"net/textproto"
	"strings"
)

// DefaultMaxHeaderBytes is the default bound on a request's header, 60 KiB,
// as Envoy's max_request_headers_kb: the HTTP/1.1 server counts the head as
// it comes, the HTTP/2 server the decoded header list.
const DefaultMaxHeaderBytes = 60 << 10

var headerNewlineToSpace = strings.NewReplacer("\n", " ", "\r", " ")

// WriteField writes one HTTP/1.x header (or trailer) line, its value
// trimmed and any line break in it made a space, so that no value can end
// the head.
func WriteField(w *bufio.Writer, k, v string) {
	for i := 0; i < len(v); i++ {
		if c := v[i]; c == '\r' || c == '\n' {
			v = headerNewlineToSpace.Replace(v)
			break
		}
	}
	v = textproto.TrimString(v)
	if len(k)+len(v)+4 > w.Available() {
		w.WriteString(k)
		w.WriteString(": ")
		w.WriteString(v)
		w.WriteString("\r\n")
		return
	}
	// One copy into the buffer's free space, not four calls.
	b := w.AvailableBuffer()
	b = append(b, k...)
	b = append(b, ": "...)
	b = append(b, v...)
	b = append(b, "\r\n"...)
	w.Write(b)
}

// BodyAllowed reports whether an answer with status code may have a body
// (RFC 9110, 6.4.1).
func BodyAllowed(code int) bool {
	return code >= 200 && code != http.StatusNoContent && code != http.StatusNotModified
}

// DeclaredTrailers calls fn with the canonical name of each field the
// Trailer header of h declares.
func DeclaredTrailers(h http.Header, fn func(k string)) {
	for _, v := range h["Trailer"] {
		for _, k := range strings.Split(v, ",") {
			if k = CanonicalKey(textproto.TrimString(k)); k != "" {
				fn(k)
			}
		}
	}
}
