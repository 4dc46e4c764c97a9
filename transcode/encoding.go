package transcode

import (
	"bytes"
	"compress/gzip"
	"encoding/base64"
	"io"
	"net/http"
	"strings"
	"sync"

	"google.golang.org/grpc/codes"
)

// Message compression and gRPC-Web's text framing.
//
// A client's compressed messages (the frame's compressed flag, with
// grpc-encoding or Connect-Content-Encoding naming gzip; Content-Encoding
// for a Connect unary body) are inflated before they are turned; the node
// always receives uncompressed messages. The node is told it may answer
// with gzip (grpc-accept-encoding), and its compressed messages are
// inflated too. A client that compressed its request gets its answer's
// messages compressed the same way, as grpc-go's server answers. Any
// encoding other than identity and gzip is refused with unimplemented,
// naming the ones accepted.

// encGzip is the one compression the sidecar speaks besides identity.
const encGzip = "gzip"

// acceptEncoding is what the sidecar advertises, to clients and nodes.
const acceptEncoding = "gzip"

// encodingHeaders names a protocol's header fields for the encoding of its
// messages and the encodings its peer accepts.
func encodingHeaders(p protocol) (content, accept string) {
	switch p {
	case connectUnary, jsonRPC:
		return "Content-Encoding", "Accept-Encoding"
	case connectStream:
		return "Connect-Content-Encoding", "Connect-Accept-Encoding"
	}
	return "Grpc-Encoding", "Grpc-Accept-Encoding"
}

// readEncoding reads the encoding the client's messages use and whether it
// accepts its answer in gzip; an encoding other than identity and gzip is
// an error.
func (c *Call) readEncoding(h http.Header) error {
	content, accept := encodingHeaders(c.proto)
	switch enc := h.Get(content); enc {
	case "", "identity":
	case encGzip:
		c.inGzip = true
		c.outGzip = acceptsGzip(h.Values(accept))
	default:
		return Errorf(codes.Unimplemented, "%s %q is not supported (identity, gzip)", strings.ToLower(content), enc)
	}
	return nil
}

// acceptsGzip reports whether an accept-encoding list names gzip.
func acceptsGzip(vv []string) bool {
	for _, v := range vv {
		for _, e := range strings.Split(v, ",") {
			if e, _, _ = strings.Cut(e, ";"); strings.EqualFold(strings.TrimSpace(e), encGzip) {
				return true
			}
		}
	}
	return false
}

// inflate returns a request frame's message uncompressed: the compressed
// flag needs the call's encoding to be gzip.
func (c *Call) inflate(flag byte, msg []byte) ([]byte, error) {
	if flag&flagCompressed == 0 {
		return msg, nil
	}
	if !c.inGzip {
		return nil, Errorf(codes.Internal, "a compressed message with no message encoding")
	}
	return gunzip(msg)
}

// gzipReaders keeps inflaters (about 40 KB of state each) for the next
// message of a compressed stream.
var gzipReaders sync.Pool

// gunzip inflates b, at most MaxMessage bytes of it.
func gunzip(b []byte) ([]byte, error) {
	var err error
	zr, _ := gzipReaders.Get().(*gzip.Reader)
	if zr == nil {
		zr, err = gzip.NewReader(bytes.NewReader(b))
	} else {
		err = zr.Reset(bytes.NewReader(b))
	}
	if err != nil {
		return nil, Errorf(codes.InvalidArgument, "bad gzip message: %v", err)
	}
	defer gzipReaders.Put(zr)
	out, err := io.ReadAll(io.LimitReader(zr, MaxMessage+1))
	if err != nil {
		return nil, Errorf(codes.InvalidArgument, "bad gzip message: %v", err)
	}
	if len(out) > MaxMessage {
		return nil, Errorf(codes.ResourceExhausted, "message over %d bytes once inflated", MaxMessage)
	}
	return out, nil
}

var gzipWriters = sync.Pool{New: func() any { return gzip.NewWriter(nil) }}

// gzipped returns b compressed with gzip.
func gzipped(b []byte) []byte {
	var buf bytes.Buffer
	buf.Grow(len(b)/2 + 32)
	zw := gzipWriters.Get().(*gzip.Writer)
	zw.Reset(&buf)
	_, _ = zw.Write(b)
	_ = zw.Close()
	gzipWriters.Put(zw)
	return buf.Bytes()
}

// writeFrame writes one frame of the answer: a message compressed when the
// client compressed its own, and in base64 for grpc-web-text.
func (c *Call) writeFrame(w io.Writer, flag byte, msg []byte) error {
	if c.outGzip && flag == 0 {
		msg, flag = gzipped(msg), flagCompressed
	}
	frame := appendFrame(nil, flag, msg)
	if c.text {
		// Each frame is its own padded base64: clients decode the body
		// four characters at a time, so the pieces concatenate.
		frame = base64.StdEncoding.AppendEncode(nil, frame)
	}
	_, err := w.Write(frame)
	return err
}

// base64Reader decodes grpc-web-text's request body: standard base64,
// possibly in several padded pieces, white space ignored.
type base64Reader struct {
	src io.Reader
	in  []byte // characters read, not yet decoded (fewer than 4 between reads)
	out []byte // decoded, not yet returned
	dec []byte // out's backing array, reused: out is drained before each decode
	buf []byte
	err error
}

func newBase64Reader(src io.Reader) *base64Reader {
	return &base64Reader{src: src, buf: make([]byte, 4096)}
}

func (b *base64Reader) Read(p []byte) (int, error) {
	for len(b.out) == 0 {
		if b.err != nil {
			if b.err == io.EOF && len(b.in) > 0 {
				b.err = Errorf(codes.InvalidArgument, "grpc-web-text body is not base64: %d characters left over", len(b.in))
			}
			return 0, b.err
		}
		n, err := b.src.Read(b.buf)
		for _, ch := range b.buf[:n] {
			if ch != ' ' && ch != '\t' && ch != '\r' && ch != '\n' {
				b.in = append(b.in, ch)
			}
		}
		b.err = err
		if err := b.decode(); err != nil {
			b.err, b.out = err, nil
		}
	}
	n := copy(p, b.out)
	b.out = b.out[n:]
	return n, nil
}

// decode decodes the whole quanta in b.in, a padded piece at a time.
func (b *base64Reader) decode() error {
	q := len(b.in) / 4 * 4
	out := b.dec[:0]
	for start := 0; start < q; {
		end := q
		if i := bytes.IndexByte(b.in[start:q], '='); i >= 0 {
			end = start + (i/4+1)*4 // the quantum holding the padding ends the piece
		}
		var err error
		if out, err = base64.StdEncoding.AppendDecode(out, b.in[start:end]); err != nil {
			return Errorf(codes.InvalidArgument, "grpc-web-text body is not base64: %v", err)
		}
		start = end
	}
	b.in = append(b.in[:0], b.in[q:]...)
	b.out, b.dec = out, out
	return nil
}
