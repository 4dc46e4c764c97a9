// Package transcode lets clients that do not speak gRPC call gRPC services:
// Connect (unary JSON or protobuf, and streaming), gRPC with JSON
// messages, gRPC-Web and go-micro's JSON-RPC 1.0 are turned into
// application/grpc+proto calls to a node, and the node's answer back into
// the client's protocol.
//
// The schema comes at run time: Schemas fetches a service's descriptors
// from a node's gRPC server reflection service (grpc.reflection.v1,
// falling back to v1alpha, over net/http's HTTP/2 client with the
// messages encoded by hand, so grpc-go's client is not linked in; see
// Reflection) or from a FileDescriptorSet
// file (File), once per service, with concurrent first calls sharing the
// fetch. After that a call reads the cached schema through an atomic
// pointer: no lock and no fetch on the hot path. The schema is fetched
// again in the background once older than Refresh, and at once (at most
// once per Retry) when a call names a method, or a message holds a field,
// that it lacks: a node that gains a method or a field is followed
// without a restart.
//
// A call whose context carries a version (WithVersion: the proxy sets it
// when a service's nodes carry more than one) is resolved with the schema
// fetched from nodes of that version, kept apart from the others'.
//
// Compression and text framing (encoding.go): clients' gzip messages are
// inflated and their answers compressed as they sent; grpc-web-text is
// base64 both ways; the node always gets plain protobuf frames.
//
// Messages are converted by protojson over dynamicpb (codec.go), behind
// the small messageCodec interface; protobuf clients' messages pass
// through untouched. Framing, status and metadata are each protocol's
// (protocol.go reads requests, respond.go writes answers); gRPC statuses
// map to Connect codes and HTTP statuses in status.go.
//
// The package knows nothing of balancing: the proxy decodes a call, sends
// Call.Request through its own attempt path (balancing, retries,
// breakers, metrics) and hands the response to Call.Respond.
//
// Bounds: a request body and each message at most MaxMessage (4 MiB).
// Unary and server-streaming calls are read whole and checked before
// anything is sent; client and bidi streams are turned message by message
// as the client sends them.
package transcode
