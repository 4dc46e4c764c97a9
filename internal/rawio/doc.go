// Package rawio is the sidecar's socket I/O beneath the HTTP engines and
// the relays: a TCP connection read and written with raw system calls
// while the process is nearly idle (Conn), and the relay loops that copy
// relayed connections (upgrades, TCP routes) off an epoll set of their own
// on Linux (Pair).
//
// Why raw: the runtime brackets every syscall.Read and Write with
// entersyscall and exitsyscall, which wake the sysmon thread after the
// process was idle and then cost several thread switches per request. A Go
// socket is non-blocking, so a read or write issued through its
// syscall.RawConn never blocks and needs none of that; it still parks in
// the netpoller on EAGAIN and keeps deadlines. Under load the trade turns,
// so the raw path is taken only while at most a few requests are in
// flight: the HTTP servers count them with StartRequest and EndRequest.
// BENCHMARKS.md has the measurements.
//
// Why a relay loop: a goroutine per direction costs a netpoller wake-up, a
// park and the system-call bookkeeping per message, and cannot tell that a
// FIN came with the last data. One loop goroutine per processor waits in
// epoll (itself parked in the netpoller), sees EPOLLRDHUP, and copies with
// raw calls; an idle relayed connection costs its two descriptors and no
// goroutine or buffer. NewPair hands two Conns to a loop; where there is
// none (other systems), Conn.RelayTo copies raw from a goroutine.
//
// A Conn is safe for concurrent use as a net.Conn is. Its hot paths are
// Read and Write; IdleBroken is one non-blocking peek, for a pool to check
// a connection before reuse. Beneath finds the Conn under a Layered
// connection (a sniffer's prefix, an HTTP/1.1 reader) so a relay sends what
// the layer already read first. CloseWrite half-closes whatever can be.
//
// AppendProxyV2 writes the PROXY protocol v2 header (proxyproto.go) that a
// TCP route sends first on each connection to a node, so the node learns
// the client's address. rawio imports nothing of the sidecar's.
package rawio
