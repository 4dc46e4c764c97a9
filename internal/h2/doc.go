// Package h2 is the sidecar's HTTP/2 engine: a server for the h2c
// connections (prior knowledge) a listener has accepted and sniffed
// (internal/httpserver hands each to Server.ServeConn), and a client, a
// connection Pool per node, for the plaintext HTTP/2 the proxy sends to
// nodes (h2 over TLS still goes through net/http's Transport). Both sides
// sit on one connection core (conn.go). It imports nothing of the proxy:
// what a pool needs of the proxy's per-node limits comes in through the
// Limits interface, as h1.Limits does for the HTTP/1.1 pool, and a request
// body is whatever the request carries (the proxy's replay.Reader, read
// with TryRead when it has one).
//
// # The connection core and its hot path
//
// Go's HTTP/2 server and client write each frame with a system call of its
// own and hand every frame between goroutines; for a proxy relaying small
// gRPC messages that is most of the cost. Here any goroutine appends its
// frames to the connection's output buffer under the connection's lock
// (the write…Locked methods), and one writer goroutine per connection
// (writeLoop) sends what has gathered in a single write, after yielding
// once so that the other goroutines the same burst of input made runnable
// add theirs: a burst of calls on one connection costs one system call
// each way instead of one per frame. A writer with nothing to write sleeps
// until a producer flushes. Frames are read by one read loop per
// connection (readFrame: x/net's Framer, with HPACK decoding into a
// bounded header list).
//
// The hot path of a proxied request: the server's read loop → onHeaders →
// a handler on a pooled worker goroutine (startHandler: an idle worker
// takes the stream, or a new one starts; idle workers exit after 10 s) →
// the proxy → Pool.RoundTrip → clientConn.roundTrip writes HEADERS and
// what is at hand of the body → the client's read loop → processHeaders →
// the answer's body read by the handler and written back through
// serverStream.Write → one write per burst by each writer.
//
// # One method per frame type
//
// Both read loops dispatch each frame to a method of its own, as x/net's
// transport.go does: the server's onHeaders, onData, onWindowUpdate,
// onRSTStream, onSettings, onPing, onGoAway, onPriority (server.go); the
// client's processHeaders, processData, processRSTStream,
// processWindowUpdate, processSettings, processPing, processGoAway
// (client.go). A frame on a stream never opened is a connection error
// (RFC 9113, 5.1); one on a stream closed recently is told apart by how
// it closed (closedRing on the server).
//
// # Flow control
//
// A send window is an outflow, as in x/net's flow.go: add refuses a window
// past 2^31-1, and client and server check windows through it alike.
// sendData waits on the connection for window and for room in the output
// buffer, and is woken only when either grows. The receive side of a
// stream is a recvBuf: DATA waits there for its consumer, and a
// WINDOW_UPDATE goes out once the consumer has read enough of it. The
// sidecar advertises 256 KiB per stream and 4 MiB per connection.
//
// # What it bounds
//
//   - memory per stream and per connection: the receive windows above, and
//     1 MiB of output waiting for the writer (h2MaxOutBuffer), past which
//     producers of DATA block;
//   - control frames: past 10,000 queued answers (SETTINGS and PING
//     acknowledgements, RST_STREAM, WINDOW_UPDATE) the connection closes,
//     as x/net's maxQueuedControlFrames has it;
//   - a peer that stops reading: a write that moves no byte for 30 s
//     (h2WriteStall) closes the connection;
//   - header blocks: the decoded list to Options.MaxHeaderBytes (431 past
//     it, the connection kept), 128 CONTINUATION frames, the rest of a
//     block within Options.ReadHeaderTimeout;
//   - streams: 1,000 concurrent per app connection (REFUSED_STREAM past
//     it); rapid reset (CVE-2023-44487): past MaxEarlyResets more streams
//     ending early than answered, GOAWAY ENHANCE_YOUR_CALM;
//   - a node that goes silent: a connection with nothing read for 30 s is
//     pinged and closed when the ping goes unanswered for 10 s, failing its
//     streams instead of leaving them hanging.
//
// # The client pool
//
// A Pool holds the h2c connections to one node. A stream goes to the first
// connection with room under the node's SETTINGS_MAX_CONCURRENT_STREAMS; a
// new connection is dialled, one at a time, when none has room. At the
// node's max_connections (Limits) a request waits as a pending one for a
// stream to end or a slot to come free, up to the connect timeout. A
// node's REFUSED_STREAM, or a GOAWAY naming an earlier stream, fails the
// request with ErrRefusedStream, which the proxy's attempt loop sends to
// another node as it would a refused dial. Retire stops new streams, and
// each connection closes after its last one; CloseIdle closes connections
// with none.
//
// # Ownership
//
// ServeConn owns the connection it is given and closes it. Shutdown sends
// GOAWAY, lets open streams finish and waits for them, within its context;
// Close fails every connection at once. The context passed to NewServer is
// every request's parent, and its end stops the idle workers. Every
// goroutine the engine starts (readers, writers, workers, a stream's body
// sender) recovers a panic, logs it with its stack, and ends its
// connection or stream.
package h2
