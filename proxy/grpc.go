package proxy

import (
	"net/http"
	"strconv"
	"strings"

	"github.com/sidecarlb/sidecar/internal/httpwire"
)

// isGRPC reports whether r is a gRPC call: HTTP/2 with a gRPC content type.
func isGRPC(r *http.Request) bool {
	if r.ProtoMajor != 2 {
		return false
	}
	ct := r.Header["Content-Type"] // canonical already: no Get's canonicalising
	return len(ct) > 0 && strings.HasPrefix(ct[0], "application/grpc")
}

// gRPC status codes the sidecar answers with.
const (
	grpcInvalidArgument  = 3
	grpcDeadlineExceeded = 4
	grpcUnimplemented    = 12
	grpcUnavailable      = 14
)

// grpcCode maps the HTTP status classify chose to the gRPC status a client
// should see, as Envoy and grpc-go's own HTTP mapping do.
func grpcCode(status int) int {
	switch status {
	case http.StatusBadRequest:
		return grpcInvalidArgument
	case http.StatusNotFound:
		return grpcUnimplemented
	case http.StatusGatewayTimeout:
		return grpcDeadlineExceeded
	}
	return grpcUnavailable
}

// writeGRPCError answers a gRPC call the proxy could not forward with a
// trailers-only response, so the client gets a status, not a bare HTTP code.
func writeGRPCError(w http.ResponseWriter, err error) {
	status, code := classify(err)
	h := w.Header()
	h.Set("Content-Type", "application/grpc")
	h.Set("Grpc-Status", strconv.Itoa(grpcCode(status)))
	h.Set("Grpc-Message", httpwire.EncodeGRPCMessage("sidecar: "+err.Error()))
	h.Set("X-Sidecar-Error", code)
	w.WriteHeader(http.StatusOK)
}
