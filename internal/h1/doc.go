// Package h1 is the sidecar's HTTP/1.1 server: its own connection loop in
// place of net/http's, for the connections a listener has accepted and
// sniffed (internal/httpserver hands each to Server.ServeConn).
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
package h1
