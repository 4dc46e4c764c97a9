// Package httpserver is the listener side of the sidecar's proxy
// listeners: it accepts connections, tells HTTP/2 with prior knowledge
// from HTTP/1.x by the first bytes, and hands each connection to the
// engine for its protocol, as x/net/http2's Server.ServeConn takes an
// already-sniffed connection. It never reaches into an engine: it knows
// them through ConnServer, and keeps track only of the listeners and of
// the connections it is still sniffing. The engines keep theirs in a
// Tracker, the one connection set both use: it refuses connections after
// Shutdown or Close and tells Shutdown when the last one has gone, while
// what idle means and how a connection ends stay the engine's.
//
// # The sniff
//
// A connection is read, within Options.ReadHeaderTimeout, for as many of
// the 24 bytes of the HTTP/2 client preface as it takes to tell it from
// an HTTP/1.x request: the first byte that differs sends it, with what was
// read, to the HTTP/1 engine; the whole preface sends it to the HTTP/2
// engine. A client that goes quiet or leaves during the sniff is closed.
// Accepted connections are wrapped with rawio.Wrap, so that the engines
// can use raw system calls on them.
//
// # Shutdown
//
// Shutdown stops accepting, closes the connections being sniffed, then
// shuts both engines down: each refuses connections handed to it from then
// on, closes its idle ones and waits for the rest, within the context;
// past it, Shutdown closes what is left. Close closes everything at once.
// A failing Accept (out of file descriptors) backs off from 5 ms to 1 s,
// as net/http does.
package httpserver
