// Package h1 is the sidecar's HTTP/1.1 engine: the server, its own
// connection loop in place of net/http's, for the connections a listener
// has accepted and sniffed (internal/httpserver hands each to
// Server.ServeConn); and the client, a keep-alive connection Pool per node
// in place of net/http's Transport for the requests that qualify. It
// imports nothing of the proxy: what a pool needs of the proxy's per-node
// limits and replay body comes in through two small interfaces, Limits
// and Body.
//
// # What a connection does
//
// One goroutine per connection reads its requests and runs the handler
// for each in turn. A plain request whose whole head is already in the
// read buffer is parsed in place by parseHead (parse.go), with a third of
// the allocations of http.ReadRequest and none of its copying; plain means
// HTTP/1.1, an origin-form target of bytes that need no unescaping,
// one-line fields, one Host and at most one Content-Length. Every other
// shape goes to http.ReadRequest, so the fast path only has to agree with
// net/http on what it accepts, which FuzzParseHead checks field by field
// and TestH1ServerFramingAtLeastAsStrictAsNetHTTP checks connection by
// connection. Framing net/http reads leniently (Transfer-Encoding on
// HTTP/1.0, or with a Content-Length) is refused, as nginx and Envoy
// refuse it: a body taken for the next request is request smuggling.
//
// Answers go through an http.ResponseWriter of its own (response), so the
// handlers are the ones the HTTP/2 engine runs. It keeps net/http's server
// rules (keep-alive, pipelining, 100-continue, chunked answers and
// trailers, 400/431/501/505 for malformed requests, Hijack for upgrades),
// and adds AdoptHeader, which lets a proxy make the node's header map the
// answer's own rather than copy it.
//
// # Where the time goes, and what it saves
//
// The hot path is conn.readRequest → parseHead → the handler →
// response.Write → one bufio flush. What it saves over net/http is
// per-request work: no context and no goroutine per request, no copy of the
// answer's header, no read deadline set and cleared per request (one sweep
// timer per Server closes idle connections: Server.sweepIdle), and an
// answer of up to 2 KiB (holdBody) held back so that, if the handler ends
// within it, it leaves with a Content-Length in one write with its head.
// An answer of known length is flushed as its last byte is written, before
// the handler's bookkeeping.
//
// net/http reads from every client in the background while its handler
// runs, to notice a client that hangs up; here that watch (startWatch)
// starts only for a request still running after 10 ms (watchAfter), which
// fast requests never are. A client that hangs up then cancels its
// request's context.
//
// # What it bounds
//
// A request head is bounded by Options.MaxHeaderBytes (431 past it, the
// connection closed) and read within Options.ReadHeaderTimeout; a
// connection waits Options.IdleTimeout for its next request. A request
// body the handler left unread is skipped up to 256 KiB (discardLimit) to
// keep the connection; past that the connection closes.
//
// # Ownership
//
// ServeConn owns the connection it is given and closes it, unless a
// handler hijacks it. Shutdown closes idle connections, lets busy ones
// finish their answer (with Connection: close) and waits for them; Close
// closes them all at once. The context passed to NewServer is every
// request's parent: canceling it cancels them all.
//
// # The client pool
//
// A Pool (pool.go) writes a request and reads its answer on the caller's
// goroutine, with 8 KiB buffers reused per connection, so a 4 KiB body
// leaves with its head in one system call; wire.go holds the format:
// writeRequest, readResponse (1xx skipped, framing worked out as
// http.Transport does, trailers) and the framed response body, which
// puts the connection back in the pool at its end. Qualifies says which
// requests may take it: no Expect, no request trailers, no CONNECT, and a
// body absent, held in memory or of a known length of at most
// MaxStreamedBody (the body is written in full before the answer is read);
// the proxy sends the others, and TLS, over net/http's Transport.
// Plaintext upgrades go through the pool too: a 101 answer's body is the
// connection itself, which never returns to the pool.
//
// A connection that has been idle for 10 ms (poolCheckIdleAfter) is
// checked before reuse for the node having closed it; one reused that
// fails before any of the answer arrives is replaced once by a new one
// when the request never fully left or may be sent twice (idempotent
// method, Idempotency-Key), as net/http does. Connections idle past the
// idle timeout close, from one sweep timer per pool.
//
// The request's last write is made inside the read that waits for the
// answer (rawio.Conn.HoldWrite), which spares the empty read Go would make
// right after writing it. The end of a request's context interrupts the
// connection's I/O: the app connection's context carries an interrupter
// (WithInterrupter, the server's Options.ConnContext) registered once
// with context.AfterFunc, which each exchange borrows in turn rather than
// paying three allocations to register one of its own.
//
// A pool's connections count against the node's Limits: a dial takes a
// slot, Close gives it back, and at max_connections a request waits as a
// pending one for a slot or for a connection put back, which put hands
// over to it directly. The proxy's nodeLimits implements Limits.
package h1
