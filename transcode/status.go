package transcode

import (
	"encoding/base64"
	"fmt"
	"net/http"
	"strconv"

	spb "google.golang.org/genproto/googleapis/rpc/status"
	"google.golang.org/grpc/codes"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/anypb"

	"github.com/sidecarlb/sidecar/internal/httpwire"
)

// Error is a gRPC status: the node's, or one the sidecar answers with
// itself. Each protocol writes it its own way (a Connect JSON body, a
// gRPC-Web trailer frame, a JSON-RPC error).
type Error struct {
	Code    codes.Code
	Message string
	// Details are google.rpc.Status details, from grpc-status-details-bin.
	Details []*anypb.Any
	// HTTPStatus, when not zero, overrides the Connect status of Code (415
	// when a service has no schema to transcode with).
	HTTPStatus int
}

func (e *Error) Error() string { return fmt.Sprintf("%s: %s", ConnectCode(e.Code), e.Message) }

// Errorf returns an Error with code and a formatted message.
func Errorf(code codes.Code, format string, args ...any) *Error {
	return &Error{Code: code, Message: fmt.Sprintf(format, args...)}
}

// connectCodes are the Connect protocol's names of the 17 gRPC codes.
var connectCodes = [...]string{
	codes.OK:                 "ok",
	codes.Canceled:           "canceled",
	codes.Unknown:            "unknown",
	codes.InvalidArgument:    "invalid_argument",
	codes.DeadlineExceeded:   "deadline_exceeded",
	codes.NotFound:           "not_found",
	codes.AlreadyExists:      "already_exists",
	codes.PermissionDenied:   "permission_denied",
	codes.ResourceExhausted:  "resource_exhausted",
	codes.FailedPrecondition: "failed_precondition",
	codes.Aborted:            "aborted",
	codes.OutOfRange:         "out_of_range",
	codes.Unimplemented:      "unimplemented",
	codes.Internal:           "internal",
	codes.Unavailable:        "unavailable",
	codes.DataLoss:           "data_loss",
	codes.Unauthenticated:    "unauthenticated",
}

// ConnectCode is the Connect name of c ("not_found"); "unknown" for a code
// out of range.
func ConnectCode(c codes.Code) string {
	if int(c) < len(connectCodes) {
		return connectCodes[c]
	}
	return "unknown"
}

// HTTPStatus is the HTTP status the Connect protocol answers a unary call
// failing with c (connect-go's table).
func HTTPStatus(c codes.Code) int {
	switch c {
	case codes.Canceled:
		return 499
	case codes.InvalidArgument, codes.FailedPrecondition, codes.OutOfRange:
		return http.StatusBadRequest
	case codes.DeadlineExceeded:
		return http.StatusGatewayTimeout
	case codes.NotFound:
		return http.StatusNotFound
	case codes.AlreadyExists, codes.Aborted:
		return http.StatusConflict
	case codes.PermissionDenied:
		return http.StatusForbidden
	case codes.ResourceExhausted:
		return http.StatusTooManyRequests
	case codes.Unimplemented:
		return http.StatusNotImplemented
	case codes.Unavailable:
		return http.StatusServiceUnavailable
	case codes.Unauthenticated:
		return http.StatusUnauthorized
	}
	return http.StatusInternalServerError // unknown, internal, data_loss
}

// statusFrom reads the gRPC status a node answered with from h (its
// trailers, or its headers for a trailers-only answer). ok is false when h
// carries none.
func statusFrom(h http.Header) (e *Error, ok bool) {
	v := h.Get("Grpc-Status")
	if v == "" {
		return nil, false
	}
	n, err := strconv.ParseUint(v, 10, 32)
	if err != nil {
		return Errorf(codes.Unknown, "node sent grpc-status %q", v), true
	}
	if n == 0 {
		return nil, true
	}
	e = &Error{Code: codes.Code(n), Message: httpwire.DecodeGRPCMessage(h.Get("Grpc-Message"))}
	if d := h.Get("Grpc-Status-Details-Bin"); d != "" {
		if b, err := decodeBinHeader(d); err == nil {
			var st spb.Status
			if proto.Unmarshal(b, &st) == nil {
				e.Details = st.Details
			}
		}
	}
	return e, true
}

// decodeBinHeader decodes a -bin metadata value: base64, padded or not.
func decodeBinHeader(v string) ([]byte, error) {
	if len(v)%4 == 0 {
		return base64.StdEncoding.DecodeString(v)
	}
	return base64.RawStdEncoding.DecodeString(v)
}

// statusDetailsBin encodes e's details as a grpc-status-details-bin value,
// or "" when it has none.
func (e *Error) statusDetailsBin() string {
	if len(e.Details) == 0 {
		return ""
	}
	b, err := proto.Marshal(&spb.Status{Code: int32(e.Code), Message: e.Message, Details: e.Details})
	if err != nil {
		return ""
	}
	return base64.RawStdEncoding.EncodeToString(b)
}
