package transcode

import (
	"bytes"
	"compress/gzip"
	"context"
	"encoding/base64"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strconv"
	"strings"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/protobuf/reflect/protoreflect"
	"google.golang.org/protobuf/types/descriptorpb"

	"github.com/sidecarlb/sidecar/internal/httpwire"
)

// protocol is how a client frames its call.
type protocol uint8

const (
	connectUnary  protocol = iota + 1 // application/json, application/proto
	connectStream                     // application/connect+json, +proto
	grpcJSON                          // application/grpc+json
	grpcWeb                           // application/grpc-web, +proto, +json
	jsonRPC                           // application/json-rpc
)

// MaxMessage bounds one message, either way, and a request body.
const MaxMessage = 4 << 20

// kind returns the protocol and message codec of a Content-Type, or 0 for
// one that is not transcoded (application/grpc and +proto pass through).
func kind(contentType string) (protocol, messageCodec) {
	ct := contentType
	if i := strings.IndexByte(ct, ';'); i >= 0 {
		ct = ct[:i]
	}
	ct = strings.ToLower(strings.TrimSpace(ct))
	switch ct {
	case "application/json":
		return connectUnary, jsonCodec{}
	case "application/proto":
		return connectUnary, protoCodec{}
	case "application/connect+json":
		return connectStream, jsonCodec{}
	case "application/connect+proto":
		return connectStream, protoCodec{}
	case "application/grpc+json":
		return grpcJSON, jsonCodec{}
	case "application/grpc-web", "application/grpc-web+proto":
		return grpcWeb, protoCodec{}
	case "application/grpc-web+json":
		return grpcWeb, jsonCodec{}
	case "application/grpc-web-text", "application/grpc-web-text+proto":
		return grpcWeb, protoCodec{}
	case "application/grpc-web-text+json":
		return grpcWeb, jsonCodec{}
	case "application/json-rpc":
		return jsonRPC, jsonCodec{}
	}
	return 0, nil
}

// MatchGet reports whether r is a Connect unary GET
// (?encoding=…&message=…), for methods marked NO_SIDE_EFFECTS. It is
// cheap and does not allocate.
func MatchGet(r *http.Request) bool {
	return r.Method == http.MethodGet && strings.Contains(r.URL.RawQuery, "message=") &&
		strings.Contains(r.URL.RawQuery, "encoding=")
}

// Match reports whether a request of contentType is transcoded. It is
// cheap and does not allocate.
func Match(contentType string) bool {
	if !strings.HasPrefix(contentType, "application/") {
		return false
	}
	p, _ := kind(contentType)
	return p != 0
}

// Transcoder turns calls in the protocols Match accepts into gRPC calls
// with protobuf messages, and the nodes' answers back. It is safe for
// concurrent use.
type Transcoder struct {
	schemas *Schemas
}

// New returns a Transcoder resolving methods with schemas.
func New(schemas *Schemas) *Transcoder { return &Transcoder{schemas: schemas} }

// Schemas returns the schemas t resolves methods with.
func (t *Transcoder) Schemas() *Schemas { return t.schemas }

// Call is one client call, read and turned into a gRPC request.
type Call struct {
	proto       protocol
	codec       messageCodec
	contentType string // the client's, echoed on answers
	method      protoreflect.MethodDescriptor
	path        string // /pkg.Service/Method
	body        []byte // gRPC-framed protobuf messages
	timeout     time.Duration
	rpcID       json.RawMessage // JSON-RPC's id
	stream      io.Reader       // a client stream's body, turned as it is read; nil when body holds the call
	text        bool            // grpc-web-text: base64 both ways
	inGzip      bool            // the client's messages (or unary body) are gzip
	outGzip     bool            // answer with gzip messages (or body)
}

// Timeout is the deadline the client asked for, or 0.
func (c *Call) Timeout() time.Duration { return c.timeout }

// Decode reads r's call: its method resolved by the schema (fetched if
// need be), its body read and turned into gRPC-framed protobuf. It returns
// a Call even with an error, for WriteError to answer in the client's
// protocol; the error is an *Error. Nothing has been sent to a node.
func (t *Transcoder) Decode(ctx context.Context, r *http.Request) (*Call, error) {
	if r.Method == http.MethodGet {
		return t.decodeGet(ctx, r)
	}
	p, codec := kind(r.Header.Get("Content-Type"))
	c := &Call{proto: p, codec: codec, contentType: r.Header.Get("Content-Type")}
	if p == 0 {
		return c, Errorf(codes.Internal, "content type %q is not transcoded", c.contentType)
	}
	c.text = p == grpcWeb && strings.Contains(strings.ToLower(c.contentType), "grpc-web-text")
	if r.Method != http.MethodPost {
		return c, &Error{Code: codes.Unimplemented, HTTPStatus: http.StatusMethodNotAllowed, Message: "method " + r.Method + " not allowed: use POST"}
	}
	if err := c.readEncoding(r.Header); err != nil {
		return c, err
	}
	var src io.Reader = r.Body
	if r.Body == nil {
		src = http.NoBody
	}
	if c.text {
		src = newBase64Reader(src)
	}
	c.timeout = timeoutOf(p, r.Header)
	service, method := "", ""
	if p != jsonRPC {
		var ok bool
		if service, method, ok = splitPath(r.URL.Path); !ok {
			return c, Errorf(codes.Unimplemented, "path %q is not /pkg.Service/Method", r.URL.Path)
		}
		if err := c.resolve(ctx, t.schemas, service, method); err != nil {
			return c, err
		}
		if c.method.IsStreamingClient() && p != connectUnary {
			// Messages are turned as they come, for client and bidi streams.
			c.stream = src
			return c, nil
		}
	}
	body, err := c.readBody(r, src)
	if err != nil {
		return c, err
	}
	var msgs [][]byte
	switch p {
	case jsonRPC:
		if service, method, msgs, err = t.decodeJSONRPC(ctx, c, body); err != nil {
			return c, err
		}
	case connectUnary:
		msgs = [][]byte{body}
	default:
		if msgs, err = c.unframe(body); err != nil {
			return c, err
		}
	}
	if len(msgs) != 1 {
		return c, Errorf(codes.InvalidArgument, "%s takes one request message, not %d", c.method.FullName(), len(msgs))
	}
	c.body, err = c.encode(msgs)
	if err != nil && t.schemas.Stale(ctx, service) {
		// A field the node added since the schema was fetched: read again.
		if err2 := c.resolve(ctx, t.schemas, service, method); err2 == nil {
			c.body, err = c.encode(msgs)
		}
	}
	return c, err
}

// decodeJSONRPC reads a JSON-RPC 1.0 request body, go-micro's shape
// ({"method":"Service.Method","params":[{…}],"id":N}), into c: its id and
// method, and the one message of its params.
func (t *Transcoder) decodeJSONRPC(ctx context.Context, c *Call, body []byte) (service, method string, msgs [][]byte, err error) {
	var req struct {
		Method string            `json:"method"`
		Params []json.RawMessage `json:"params"`
		ID     json.RawMessage   `json:"id"`
	}
	if err := json.Unmarshal(body, &req); err != nil {
		return "", "", nil, Errorf(codes.InvalidArgument, "malformed JSON-RPC request: %v", err)
	}
	c.rpcID = req.ID
	i := strings.LastIndexByte(req.Method, '.')
	if i <= 0 || i == len(req.Method)-1 {
		return "", "", nil, Errorf(codes.InvalidArgument, `JSON-RPC method %q is not "Service.Method"`, req.Method)
	}
	if len(req.Params) != 1 {
		return "", "", nil, Errorf(codes.InvalidArgument, "JSON-RPC params must hold one message, not %d", len(req.Params))
	}
	service, method = req.Method[:i], req.Method[i+1:]
	if !strings.Contains(service, ".") {
		// go-micro's shape: the service without its package.
		if service, err = t.schemas.FullName(ctx, service); err != nil {
			return "", "", nil, err
		}
	}
	if err := c.resolve(ctx, t.schemas, service, method); err != nil {
		return "", "", nil, err
	}
	return service, method, [][]byte{req.Params[0]}, nil
}

// decodeGet reads a Connect unary GET: the message in the query, for a
// method marked NO_SIDE_EFFECTS.
func (t *Transcoder) decodeGet(ctx context.Context, r *http.Request) (*Call, error) {
	q := r.URL.Query()
	c := &Call{proto: connectUnary, codec: jsonCodec{}}
	switch enc := q.Get("encoding"); enc {
	case "json":
	case "proto":
		c.codec = protoCodec{}
	default:
		return c, Errorf(codes.Unimplemented, "encoding %q is not supported (json, proto)", enc)
	}
	c.timeout = timeoutOf(connectUnary, r.Header)
	service, method, ok := splitPath(r.URL.Path)
	if !ok {
		return c, Errorf(codes.Unimplemented, "path %q is not /pkg.Service/Method", r.URL.Path)
	}
	if err := c.resolve(ctx, t.schemas, service, method); err != nil {
		return c, err
	}
	if opts, _ := c.method.Options().(*descriptorpb.MethodOptions); opts.GetIdempotencyLevel() != descriptorpb.MethodOptions_NO_SIDE_EFFECTS {
		return c, &Error{Code: codes.Unimplemented, HTTPStatus: http.StatusMethodNotAllowed,
			Message: fmt.Sprintf("%s is not marked NO_SIDE_EFFECTS: use POST", c.method.FullName())}
	}
	msg := []byte(q.Get("message"))
	if q.Get("base64") == "1" {
		s := strings.TrimRight(string(msg), "=")
		b, err := base64.RawURLEncoding.DecodeString(s)
		if err != nil {
			return c, Errorf(codes.InvalidArgument, "message is not base64url: %v", err)
		}
		msg = b
	}
	switch comp := q.Get("compression"); comp {
	case "", "identity":
	case "gzip":
		zr, err := gzip.NewReader(bytes.NewReader(msg))
		if err != nil {
			return c, Errorf(codes.InvalidArgument, "bad gzip message: %v", err)
		}
		if msg, err = io.ReadAll(io.LimitReader(zr, MaxMessage+1)); err != nil {
			return c, Errorf(codes.InvalidArgument, "bad gzip message: %v", err)
		}
	default:
		return c, Errorf(codes.Unimplemented, "compression %q is not supported (identity, gzip)", comp)
	}
	if len(msg) > MaxMessage {
		return c, Errorf(codes.ResourceExhausted, "message over %d bytes", MaxMessage)
	}
	body, err := c.encode([][]byte{msg})
	if err != nil && t.schemas.Stale(ctx, service) {
		if err2 := c.resolve(ctx, t.schemas, service, method); err2 == nil {
			body, err = c.encode([][]byte{msg})
		}
	}
	c.body = body
	return c, err
}

// resolve finds the call's method in the schema.
func (c *Call) resolve(ctx context.Context, schemas *Schemas, service, method string) error {
	c.path = "/" + service + "/" + method
	md, err := schemas.Method(ctx, service, method)
	if err != nil {
		return err
	}
	c.method = md
	if (c.proto == connectUnary || c.proto == jsonRPC) && (md.IsStreamingClient() || md.IsStreamingServer()) {
		return Errorf(codes.Unimplemented, "%s is a streaming method: call it with application/connect+json", md.FullName())
	}
	return nil
}

// encode turns the client's messages into gRPC frames of protobuf.
func (c *Call) encode(msgs [][]byte) ([]byte, error) {
	var out []byte
	for _, m := range msgs {
		var err error
		if out, err = c.appendFrame(out, m); err != nil {
			return nil, err
		}
	}
	return out, nil
}

// appendFrame appends the client's message m to dst as a gRPC frame of
// protobuf, encoded in place after the frame's header.
func (c *Call) appendFrame(dst, m []byte) ([]byte, error) {
	at := len(dst)
	if dst == nil {
		dst = make([]byte, 0, 5+len(m)+len(m)/8) // protobuf is seldom bigger than its JSON
	}
	dst = append(dst, 0, 0, 0, 0, 0)
	dst, err := c.codec.toProto(dst, c.method.Input(), m)
	if err != nil {
		return nil, Errorf(codes.InvalidArgument, "malformed %s: %v", c.method.Input().FullName(), err)
	}
	binary.BigEndian.PutUint32(dst[at+1:at+5], uint32(len(dst)-at-5))
	return dst, nil
}

// Request returns the gRPC request for the node, made on r (a shallow
// copy: r's header is not changed): path, protobuf body, metadata and
// deadline.
func (c *Call) Request(r *http.Request) *http.Request {
	out := r.WithContext(r.Context())
	out.Method = http.MethodPost
	u := *r.URL
	u.Path, u.RawPath, u.RawQuery = c.path, "", ""
	out.URL = &u
	h := make(http.Header, len(r.Header)+2)
	for k, vv := range r.Header {
		if !dropRequestHeader(k) {
			h[k] = vv
		}
	}
	h["Content-Type"] = []string{"application/grpc"}
	h["Te"] = []string{"trailers"}
	h["Grpc-Accept-Encoding"] = []string{acceptEncoding}
	if c.timeout > 0 {
		h["Grpc-Timeout"] = []string{encodeTimeout(c.timeout)}
	}
	out.Header = h
	out.Trailer = nil
	if c.stream != nil {
		out.Body = &streamBody{c: c, src: c.stream}
		out.GetBody = nil
		out.ContentLength = -1
		return out
	}
	out.Body = io.NopCloser(bytes.NewReader(c.body))
	out.GetBody = func() (io.ReadCloser, error) { return io.NopCloser(bytes.NewReader(c.body)), nil }
	out.ContentLength = int64(len(c.body))
	return out
}

// streamBody is a client stream turned into gRPC frames of protobuf
// message by message, as the client sends them.
type streamBody struct {
	c       *Call
	src     io.Reader
	hdr     [5]byte
	pending []byte
	err     error
}

func (b *streamBody) Read(p []byte) (int, error) {
	for len(b.pending) == 0 {
		if b.err != nil {
			return 0, b.err
		}
		b.pending, b.err = b.next()
	}
	n := copy(p, b.pending)
	b.pending = b.pending[n:]
	return n, nil
}

// next reads and turns the client's next message.
func (b *streamBody) next() ([]byte, error) {
	flag, msg, err := readFrame(b.src, &b.hdr)
	if err != nil {
		return nil, err
	}
	switch {
	case b.c.proto == connectStream && flag&flagEndStream != 0:
		return nil, io.EOF
	case flag&^flagCompressed != 0:
		return nil, Errorf(codes.InvalidArgument, "unexpected frame flags %#x in the request", flag)
	}
	if msg, err = b.c.inflate(flag, msg); err != nil {
		return nil, err
	}
	return b.c.appendFrame(nil, msg)
}

func (b *streamBody) Close() error { return nil }

// dropRequestHeader reports the client header fields that belong to its
// protocol, not to the call's metadata.
func dropRequestHeader(k string) bool {
	switch k {
	case "Content-Type", "Content-Length", "Content-Encoding", "Accept-Encoding", "Accept", "Te",
		"Grpc-Timeout", "Grpc-Encoding", "Grpc-Accept-Encoding", "X-Grpc-Web", "X-User-Agent":
		return true
	}
	return strings.HasPrefix(k, "Connect-")
}

func splitPath(p string) (service, method string, ok bool) {
	if len(p) < 4 || p[0] != '/' {
		return "", "", false
	}
	i := strings.LastIndexByte(p, '/')
	if i <= 1 || i == len(p)-1 {
		return "", "", false
	}
	return p[1:i], p[i+1:], true
}

// readBody reads a request body of at most MaxMessage bytes from rd (r's
// body, or its base64 decoder), gunzipped when its Content-Encoding
// (Connect unary, JSON-RPC) says gzip.
func (c *Call) readBody(r *http.Request, rd io.Reader) ([]byte, error) {
	if c.inGzip && (c.proto == connectUnary || c.proto == jsonRPC) {
		zr, err := gzip.NewReader(rd)
		if err != nil {
			return nil, Errorf(codes.InvalidArgument, "bad gzip body: %v", err)
		}
		rd = zr
	}
	var b []byte
	var err error
	if n := r.ContentLength; n > 0 && n <= MaxMessage && rd == r.Body {
		b = make([]byte, n)
		if _, err = io.ReadFull(rd, b); err == nil {
			// The length was the client's word: anything past it is an error.
			var one [1]byte
			if k, _ := rd.Read(one[:]); k > 0 {
				err = errors.New("body longer than its Content-Length")
			}
		}
	} else {
		b, err = io.ReadAll(io.LimitReader(rd, MaxMessage+1))
	}
	if err != nil {
		return nil, Errorf(codes.InvalidArgument, "read the request body: %v", err)
	}
	if len(b) > MaxMessage {
		return nil, Errorf(codes.ResourceExhausted, "request body over %d bytes", MaxMessage)
	}
	return b, nil
}

// timeoutOf reads the client's deadline: Connect-Timeout-Ms, or
// grpc-timeout for gRPC and gRPC-Web.
func timeoutOf(p protocol, h http.Header) time.Duration {
	if p == connectUnary || p == connectStream {
		if v := h.Get("Connect-Timeout-Ms"); v != "" && len(v) <= 10 {
			if n, err := strconv.ParseInt(v, 10, 64); err == nil && n > 0 {
				return time.Duration(n) * time.Millisecond
			}
		}
		return 0
	}
	if d, ok := httpwire.GRPCTimeout(h.Get("Grpc-Timeout")); ok {
		return d
	}
	return 0
}

// encodeTimeout writes d as a grpc-timeout value: at most eight digits,
// in the finest unit that fits, rounded up.
func encodeTimeout(d time.Duration) string {
	const maxValue = 99_999_999
	for _, u := range []struct {
		d    time.Duration
		unit string
	}{{time.Nanosecond, "n"}, {time.Microsecond, "u"}, {time.Millisecond, "m"}, {time.Second, "S"}, {time.Minute, "M"}} {
		if v := ceilDiv(d, u.d); v <= maxValue {
			return strconv.FormatInt(int64(v), 10) + u.unit
		}
	}
	return strconv.FormatInt(int64(min(ceilDiv(d, time.Hour), maxValue)), 10) + "H"
}

func ceilDiv(d, unit time.Duration) time.Duration {
	v := d / unit
	if d%unit != 0 {
		v++
	}
	return v
}

// Frame flags: gRPC's compressed bit, Connect's end of stream, gRPC-Web's
// trailers.
const (
	flagCompressed = 0x01
	flagEndStream  = 0x02
	flagTrailer    = 0x80
)

func appendFrame(dst []byte, flag byte, msg []byte) []byte {
	dst = append(dst, flag, 0, 0, 0, 0)
	binary.BigEndian.PutUint32(dst[len(dst)-4:], uint32(len(msg)))
	return append(dst, msg...)
}

// unframe splits a request body of length-prefixed messages. Only the
// first is inflated: a unary call takes one, and the caller refuses any
// other count, so a body of many small gzip bombs costs one MaxMessage at
// most, not one per frame.
func (c *Call) unframe(b []byte) ([][]byte, error) {
	var msgs [][]byte
	for len(b) > 0 {
		if len(b) < 5 {
			return nil, Errorf(codes.InvalidArgument, "truncated message frame")
		}
		flag, n := b[0], binary.BigEndian.Uint32(b[1:5])
		if uint64(n) > uint64(len(b)-5) {
			return nil, Errorf(codes.InvalidArgument, "truncated message frame")
		}
		msg := b[5 : 5+n]
		b = b[5+n:]
		switch {
		case c.proto == connectStream && flag&flagEndStream != 0:
			continue
		case flag&^flagCompressed != 0:
			return nil, Errorf(codes.InvalidArgument, "unexpected frame flags %#x", flag)
		}
		if len(msgs) == 0 {
			var err error
			if msg, err = c.inflate(flag, msg); err != nil {
				return nil, err
			}
		}
		msgs = append(msgs, msg)
	}
	return msgs, nil
}

// readFrame reads one length-prefixed message from r; io.EOF at a clean
// end.
func readFrame(r io.Reader, hdr *[5]byte) (flag byte, msg []byte, err error) {
	if _, err := io.ReadFull(r, hdr[:]); err != nil {
		if err == io.ErrUnexpectedEOF {
			return 0, nil, errors.New("truncated message frame")
		}
		return 0, nil, err
	}
	n := binary.BigEndian.Uint32(hdr[1:])
	if n > MaxMessage {
		return 0, nil, Errorf(codes.ResourceExhausted, "message over %d bytes", MaxMessage)
	}
	msg = make([]byte, n)
	if _, err := io.ReadFull(r, msg); err != nil {
		return 0, nil, fmt.Errorf("truncated message: %w", err)
	}
	return hdr[0], msg, nil
}
