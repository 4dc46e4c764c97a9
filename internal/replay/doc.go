// Package replay holds a request body as the tries of one request share
// it, so that the proxy's attempt loop may send a request to another node
// after a first one failed.
//
// A body small enough and of a known length (at most MaxBody) is read
// into memory by New and sent again whole by each try. A larger or unsized
// body streams from the client: each try reads it through a Reader of its
// own (Body.Next), bound to the try's number, and only the latest try, the
// body's owner, takes bytes from the client. A try given up on may still
// have a read under way (an HTTP/2 stream's body goroutine, a Transport's
// write loop waiting for the client's next bytes); what that read brings
// is kept for the owner, so no byte is lost between tries, and a stale
// try's reader then fails with ErrStaleTry. Once bytes of a streamed body
// reached a try, the body is no longer Replayable, and the loop does not
// send the request again.
//
// Reader.TryRead reads what is at hand without waiting, for an engine
// that must not wait on a client while the node may wait on it (the
// HTTP/2 client sends what is at hand before it reads the answer); the
// source can tell when it has a TryRead method of its own.
//
// The engines take a Body through interfaces of their own (h1.Body) or
// its Reader as a request's body; replay imports nothing of the proxy.
package replay
