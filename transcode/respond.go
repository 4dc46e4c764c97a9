package transcode

import (
	"encoding/base64"
	"encoding/json"
	"errors"
	"io"
	"net/http"
	"strconv"
	"strings"

	"google.golang.org/grpc/codes"

	"github.com/sidecarlb/sidecar/internal/httpwire"
)

// Respond answers the client with the node's gRPC response, in the
// client's protocol: streaming protocols get each message as it comes,
// unary ones one message after the node's status. It returns an error when
// the node's response broke (the client then got an unavailable status, or
// a cut stream once messages were written) or the client went away.
func (c *Call) Respond(w http.ResponseWriter, resp *http.Response) error {
	if resp.StatusCode != http.StatusOK {
		_, _ = io.Copy(io.Discard, io.LimitReader(resp.Body, MaxMessage))
		c.WriteError(w, Errorf(httpToCode(resp.StatusCode), "node answered HTTP %d", resp.StatusCode))
		return nil
	}
	if st, ok := statusFrom(resp.Header); ok {
		// Trailers-only: a status and no message.
		c.finish(w, resp.Header, nil, st, false)
		return nil
	}
	stream := c.proto == connectStream || c.proto == grpcJSON || c.proto == grpcWeb
	var (
		hdr     [5]byte
		msgs    [][]byte
		started bool
		rc      = http.NewResponseController(w)
		nodeGz  = resp.Header.Get("Grpc-Encoding") == encGzip
	)
	for {
		flag, msg, err := readFrame(resp.Body, &hdr)
		if err == io.EOF {
			break
		}
		switch {
		case err != nil:
		case flag == flagCompressed && nodeGz:
			msg, err = gunzip(msg)
		case flag != 0:
			err = Errorf(codes.Internal, "node sent a message with flags %#x and grpc-encoding %q", flag, resp.Header.Get("Grpc-Encoding"))
		}
		if err == nil {
			msg, err = c.codec.fromProto(c.method.Output(), msg)
			if err != nil {
				err = Errorf(codes.Internal, "node sent a malformed %s: %v", c.method.Output().FullName(), err)
			}
		}
		if err != nil {
			e := asError(err, codes.Unavailable)
			if !started {
				c.WriteError(w, e)
				return err
			}
			c.finish(w, resp.Header, nil, e, true)
			return err
		}
		if !stream {
			if len(msgs) > 0 {
				e := Errorf(codes.Unimplemented, "node sent more than one message to a unary call")
				c.WriteError(w, e)
				return e
			}
			msgs = append(msgs, msg)
			continue
		}
		if !started {
			c.writeHeader(w, resp.Header)
			started = true
		}
		if err := c.writeFrame(w, 0, msg); err != nil {
			return err
		}
		if err := rc.Flush(); err != nil {
			return err
		}
	}
	st, ok := statusFrom(resp.Trailer)
	if !ok {
		st = Errorf(codes.Internal, "node sent no grpc-status")
	}
	if !stream && st == nil && len(msgs) == 0 {
		st = Errorf(codes.Unimplemented, "node sent no message to a unary call")
	}
	c.finish(w, resp.Header, resp.Trailer, st, started, msgs...)
	return nil
}

// asError returns err as an *Error, or as one with code.
func asError(err error, code codes.Code) *Error {
	var e *Error
	if errors.As(err, &e) {
		return e
	}
	return &Error{Code: code, Message: err.Error()}
}

// httpToCode maps a node's non-200 HTTP status as gRPC clients do.
func httpToCode(status int) codes.Code {
	switch status {
	case http.StatusBadRequest:
		return codes.Internal
	case http.StatusUnauthorized:
		return codes.Unauthenticated
	case http.StatusForbidden:
		return codes.PermissionDenied
	case http.StatusNotFound:
		return codes.Unimplemented
	case http.StatusTooManyRequests, http.StatusBadGateway, http.StatusServiceUnavailable, http.StatusGatewayTimeout:
		return codes.Unavailable
	}
	return codes.Unknown
}

// responseContentType is the Content-Type of a successful answer.
func (c *Call) responseContentType() string {
	switch c.proto {
	case jsonRPC:
		return "application/json-rpc"
	case connectUnary:
		if _, ok := c.codec.(jsonCodec); ok {
			return "application/json"
		}
		return "application/proto"
	}
	return c.contentType
}

// writeHeader sends the answer's header: the node's metadata and the
// protocol's content type.
func (c *Call) writeHeader(w http.ResponseWriter, node http.Header) {
	h := w.Header()
	copyMetadata(h, node, "")
	h["Content-Type"] = []string{c.responseContentType()}
	content, accept := encodingHeaders(c.proto)
	h[accept] = []string{acceptEncoding}
	if c.outGzip {
		h[content] = []string{encGzip}
	}
	w.WriteHeader(http.StatusOK)
}

// copyMetadata copies the node's metadata in src to dst, each key
// prefixed, less the fields of the gRPC protocol.
func copyMetadata(dst, src http.Header, prefix string) {
	for k, vv := range src {
		switch k {
		case "Content-Type", "Content-Length", "Trailer", "Grpc-Status", "Grpc-Message", "Grpc-Status-Details-Bin",
			"Grpc-Encoding", "Grpc-Accept-Encoding", "Date", "Connection", "Transfer-Encoding", "Te":
			continue
		}
		dst[prefix+k] = vv
	}
}

// finish ends the answer with the call's status st (nil for OK): the unary
// message or error, or a stream's closing frame or trailers.
func (c *Call) finish(w http.ResponseWriter, header, trailer http.Header, st *Error, started bool, msgs ...[]byte) {
	switch c.proto {
	case connectUnary:
		if st != nil {
			copyMetadata(w.Header(), header, "")
			copyMetadata(w.Header(), trailer, "Trailer-")
			c.WriteError(w, st)
			return
		}
		h := w.Header()
		copyMetadata(h, header, "")
		copyMetadata(h, trailer, "Trailer-")
		h["Content-Type"] = []string{c.responseContentType()}
		body := msgs[0]
		if c.outGzip {
			body = gzipped(body)
			h["Content-Encoding"] = []string{encGzip}
		}
		h["Content-Length"] = []string{strconv.Itoa(len(body))}
		w.WriteHeader(http.StatusOK)
		_, _ = w.Write(body)
	case jsonRPC:
		if st != nil {
			c.WriteError(w, st)
			return
		}
		h := w.Header()
		copyMetadata(h, header, "")
		h["Content-Type"] = []string{"application/json-rpc"}
		w.WriteHeader(http.StatusOK)
		_ = json.NewEncoder(w).Encode(struct {
			ID     json.RawMessage `json:"id"`
			Result json.RawMessage `json:"result"`
			Error  *string         `json:"error"`
		}{rpcID(c.rpcID), msgs[0], nil})
	default:
		if !started {
			c.writeHeader(w, header)
		}
		c.endStream(w, trailer, st)
	}
}

func rpcID(id json.RawMessage) json.RawMessage {
	if len(id) == 0 {
		return json.RawMessage("null")
	}
	return id
}

// endStream writes a stream's status: Connect's end-of-stream frame,
// gRPC-Web's trailer frame, or gRPC's trailers.
func (c *Call) endStream(w http.ResponseWriter, trailer http.Header, st *Error) {
	switch c.proto {
	case connectStream:
		end := struct {
			Error    *connectError       `json:"error,omitempty"`
			Metadata map[string][]string `json:"metadata,omitempty"`
		}{}
		if st != nil {
			end.Error = st.connect()
		}
		if len(trailer) > 0 {
			md := http.Header{}
			copyMetadata(md, trailer, "")
			if len(md) > 0 {
				end.Metadata = md
			}
		}
		b, _ := json.Marshal(end)
		_ = c.writeFrame(w, flagEndStream, b)
	case grpcWeb:
		var b strings.Builder
		md := http.Header{}
		copyMetadata(md, trailer, "")
		for k, vv := range md {
			for _, v := range vv {
				b.WriteString(strings.ToLower(k) + ": " + v + "\r\n")
			}
		}
		code, msg, details := statusFields(st)
		b.WriteString("grpc-status: " + code + "\r\n")
		if msg != "" {
			b.WriteString("grpc-message: " + msg + "\r\n")
		}
		if details != "" {
			b.WriteString("grpc-status-details-bin: " + details + "\r\n")
		}
		_ = c.writeFrame(w, flagTrailer, []byte(b.String()))
	case grpcJSON:
		h := w.Header()
		copyMetadata(h, trailer, http.TrailerPrefix)
		code, msg, details := statusFields(st)
		h[http.TrailerPrefix+"Grpc-Status"] = []string{code}
		if msg != "" {
			h[http.TrailerPrefix+"Grpc-Message"] = []string{msg}
		}
		if details != "" {
			h[http.TrailerPrefix+"Grpc-Status-Details-Bin"] = []string{details}
		}
	}
}

// statusFields are st's grpc-status, grpc-message and
// grpc-status-details-bin values.
func statusFields(st *Error) (code, msg, details string) {
	if st == nil {
		return "0", "", ""
	}
	return strconv.Itoa(int(st.Code)), httpwire.EncodeGRPCMessage(st.Message), st.statusDetailsBin()
}

type connectError struct {
	Code    string          `json:"code"`
	Message string          `json:"message,omitempty"`
	Details []connectDetail `json:"details,omitempty"`
}

type connectDetail struct {
	Type  string `json:"type"`
	Value string `json:"value"`
}

func (e *Error) connect() *connectError {
	ce := &connectError{Code: ConnectCode(e.Code), Message: e.Message}
	for _, d := range e.Details {
		t := d.GetTypeUrl()
		if i := strings.LastIndexByte(t, '/'); i >= 0 {
			t = t[i+1:]
		}
		ce.Details = append(ce.Details, connectDetail{Type: t, Value: base64.RawStdEncoding.EncodeToString(d.GetValue())})
	}
	return ce
}

// WriteError answers the call with err, which the sidecar or the node
// raised before any message was written, in the client's protocol.
func (c *Call) WriteError(w http.ResponseWriter, err error) {
	st := asError(err, codes.Unknown)
	h := w.Header()
	switch c.proto {
	case connectUnary, 0:
		b, _ := json.Marshal(st.connect())
		h["Content-Type"] = []string{"application/json"}
		h["Content-Length"] = []string{strconv.Itoa(len(b))}
		status := st.HTTPStatus
		if status == 0 {
			status = HTTPStatus(st.Code)
		}
		w.WriteHeader(status)
		_, _ = w.Write(b)
	case jsonRPC:
		msg := st.Message
		status := http.StatusOK
		if st.HTTPStatus != 0 {
			status = st.HTTPStatus
		} else if st.Code == codes.InvalidArgument && c.method == nil {
			status = http.StatusBadRequest // the request itself was malformed
		}
		h["Content-Type"] = []string{"application/json-rpc"}
		w.WriteHeader(status)
		_ = json.NewEncoder(w).Encode(struct {
			ID     json.RawMessage `json:"id"`
			Result json.RawMessage `json:"result"`
			Error  *string         `json:"error"`
		}{rpcID(c.rpcID), json.RawMessage("null"), &msg})
	default:
		if st.HTTPStatus == http.StatusUnsupportedMediaType || st.HTTPStatus == http.StatusMethodNotAllowed {
			h["Content-Type"] = []string{"text/plain; charset=utf-8"}
			w.WriteHeader(st.HTTPStatus)
			_, _ = io.WriteString(w, "sidecar: "+st.Message+"\n")
			return
		}
		c.writeHeader(w, nil)
		c.endStream(w, nil, st)
	}
}
