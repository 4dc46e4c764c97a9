package rawio

import (
	"io"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
	"unsafe"
)

// Conn is a TCP connection whose reads and writes, while the sidecar is
// nearly idle, skip the Go scheduler's system-call bookkeeping.
//
// The runtime brackets every syscall.Read and Write with entersyscall and
// exitsyscall, because such a call might block. When the process has been
// idle, the sysmon thread sleeps deeply and entersyscall wakes it; awake,
// it ticks every 20 µs for a while, and takes the processor from any call
// that lasts a tick (a loopback write does the receiver's work, so it often
// does), waking yet another thread to run it. At a modest request rate
// that is several thread switches per request, costing more CPU and latency
// than the request itself. A socket in Go is non-blocking, so a read or
// write on it never blocks: issued raw through the connection's
// syscall.RawConn, which still parks the goroutine in the netpoller on
// EAGAIN and keeps deadlines, it needs none of that.
//
// Under load the trade turns: sysmon is awake anyway, and a processor held
// through a long write is one the other requests wait for. So the raw path
// is taken only while at most rawMaxInFlight requests are in flight
// (inFlight). Measured on the bench's 2-core VM (5 alternating rounds
// each): at 1,000 req/s, sidecar CPU per request fell by a third and p50 by
// 70 µs; under 64-connection load, throughput was unchanged, where raw
// reads and writes at all times lost 10-25 %. The limit was first one
// request; but at 1,000 req/s one request in eight overlaps another, and
// each such overlap woke sysmon again (0.46 of its thread switches per
// request, 7 µs of CPU). At four, that fell to 0.10 switches and 1.7 µs.
//
// Relayed connections are another matter: a relay loop takes their
// sockets out of the netpoller altogether (relayloop_linux.go), or, where
// none can, RelayTo copies raw at any load.
type Conn struct {
	net.Conn
	tcp *net.TCPConn
	rc  syscall.RawConn

	// The raw paths' state, under rmu and wmu: a net.Conn may be read,
	// and written, by several goroutines at once.
	rmu     sync.Mutex
	rbuf    []byte
	rn      int
	rerr    syscall.Errno
	readFn  func(uintptr) bool
	wmu     sync.Mutex
	wbuf    []byte
	wn      int
	werr    syscall.Errno
	writeFn func(uintptr) bool

	// relay is the relay loop's pair that owns the socket now, if any.
	relay atomic.Pointer[Pair]

	// hold makes the next Write a held one (held), made by the Read that
	// follows it; see HoldWrite. Both are the HTTP/1.1 pool's, which uses
	// a connection from one goroutine at a time.
	hold bool
	held []byte
	// heldFn is writeThenRead's callback. Its state is the raw paths'
	// (under rmu and wmu), and waited: the held write is made.
	heldFn func(uintptr) bool
	waited bool

	// IdleBroken's, under rmu.
	peekFn     func(uintptr) bool
	peekBuf    [1]byte
	peekBroken bool

	// onClose, when not nil, runs at the first Close (a node's connection
	// slot given back, say).
	onClose   func()
	closeDone atomic.Bool
}

// sysFn is syscall.RawSyscall or syscall.Syscall.
type sysFn func(trap, a1, a2, a3 uintptr) (r1, r2 uintptr, err syscall.Errno)

// Wrap wraps c when it is a TCP connection, and returns it as it is
// otherwise.
func Wrap(c net.Conn) net.Conn {
	tcp, ok := c.(*net.TCPConn)
	if !ok {
		return c
	}
	rc, err := tcp.SyscallConn()
	if err != nil {
		return c
	}
	r := &Conn{Conn: tcp, tcp: tcp, rc: rc}
	r.readFn = r.read
	r.writeFn = r.write
	r.heldFn = r.writeThenReadFn
	r.peekFn = r.peek
	return r
}

// IdleBroken reports whether the connection, idle in a pool, can no longer
// carry a request: the peer closed or reset it, or sent bytes nobody asked
// for (a 408 before it closed, say). It peeks at the socket without
// blocking, in one system call, and takes nothing from it; net/http's
// Transport learns the same from the read it keeps under way on every idle
// connection. It must not be called while the connection is read.
func (c *Conn) IdleBroken() bool {
	c.rmu.Lock()
	defer c.rmu.Unlock()
	c.peekBroken = true
	if err := c.rc.Read(c.peekFn); err != nil {
		return true
	}
	return c.peekBroken
}

func (c *Conn) peek(fd uintptr) bool {
	for {
		_, _, e := syscall.RawSyscall6(syscall.SYS_RECVFROM, fd, uintptr(unsafe.Pointer(&c.peekBuf[0])), 1,
			syscall.MSG_PEEK|syscall.MSG_DONTWAIT, 0, 0)
		if e == syscall.EINTR {
			continue
		}
		// EAGAIN: nothing to read, the connection open. A byte, the end
		// of the stream (0) or an error: done for.
		c.peekBroken = e != syscall.EAGAIN
		return true
	}
}

// inFlight counts the requests (HTTP/1.1) and streams (HTTP/2) whose
// handlers are running: StartRequest and EndRequest.
var inFlight atomic.Int64

// StartRequest counts a request (or HTTP/2 stream) whose handler runs from
// now, until its EndRequest: past rawMaxInFlight of them, reads and writes
// take the runtime's own path.
func StartRequest() { inFlight.Add(1) }

// EndRequest counts a request's handler done.
func EndRequest() { inFlight.Add(-1) }

// rawMaxInFlight is the most requests in flight at which reads and writes
// take the raw path.
const rawMaxInFlight = 4

// maxRW caps one read or write, as internal/poll does.
const maxRW = 1 << 30

func (c *Conn) Read(p []byte) (int, error) {
	if c.held != nil {
		return c.writeThenRead(p)
	}
	if inFlight.Load() > rawMaxInFlight {
		return c.Conn.Read(p)
	}
	if len(p) == 0 {
		return 0, nil
	}
	if len(p) > maxRW {
		p = p[:maxRW]
	}
	c.rmu.Lock()
	c.rbuf, c.rn, c.rerr = p, 0, 0
	err := c.rc.Read(c.readFn)
	n, errno := c.rn, c.rerr
	c.rbuf = nil
	c.rmu.Unlock()
	switch {
	case err != nil:
		return 0, c.opError("read", err)
	case errno != 0:
		return 0, c.opError("read", os.NewSyscallError("read", errno))
	case n == 0:
		return 0, io.EOF
	}
	return n, nil
}

func (c *Conn) read(fd uintptr) bool { return c.readWith(syscall.RawSyscall, fd) }

// readWith reads into rbuf through sys, and reports false when it must
// wait for the socket to be readable.
func (c *Conn) readWith(sys sysFn, fd uintptr) bool {
	for {
		n, _, e := sys(syscall.SYS_READ, fd, uintptr(unsafe.Pointer(&c.rbuf[0])), uintptr(len(c.rbuf)))
		switch e {
		case 0:
			c.rn = int(n)
			return true
		case syscall.EINTR:
			continue
		case syscall.EAGAIN:
			return false // wait in the netpoller
		}
		c.rerr = e
		return true
	}
}

func (c *Conn) Write(p []byte) (int, error) {
	if c.hold {
		c.hold, c.held = false, p
		return len(p), nil
	}
	if inFlight.Load() > rawMaxInFlight {
		return c.Conn.Write(p)
	}
	return c.rawWrite(p)
}

func (c *Conn) rawWrite(p []byte) (int, error) {
	if len(p) == 0 {
		return 0, nil
	}
	c.wmu.Lock()
	c.wbuf, c.wn, c.werr = p, 0, 0
	err := c.rc.Write(c.writeFn)
	n, errno := c.wn, c.werr
	c.wbuf = nil
	c.wmu.Unlock()
	switch {
	case err != nil:
		return n, c.opError("write", err)
	case errno != 0:
		return n, c.opError("write", os.NewSyscallError("write", errno))
	}
	return n, nil
}

func (c *Conn) write(fd uintptr) bool {
	return !c.writeWith(syscall.RawSyscall, fd) // when blocked, wait until writable
}

// writeWith writes the rest of wbuf through sys, and reports whether the
// socket would block before it is all written.
func (c *Conn) writeWith(sys sysFn, fd uintptr) (blocked bool) {
	for c.wn < len(c.wbuf) {
		chunk := c.wbuf[c.wn:]
		if len(chunk) > maxRW {
			chunk = chunk[:maxRW]
		}
		n, _, e := sys(syscall.SYS_WRITE, fd, uintptr(unsafe.Pointer(&chunk[0])), uintptr(len(chunk)))
		switch e {
		case 0:
			c.wn += int(n)
		case syscall.EINTR:
		case syscall.EAGAIN:
			return true
		default:
			c.werr = e
			return false
		}
	}
	return false
}

// HoldWrite makes flush's write, if it makes one, wait for the next Read,
// which makes it in the same RawConn.Read that then waits for the answer.
// A request's node cannot answer before it has the request, so the read Go
// would try right after writing it finds nothing: one system call per
// request. Waiting at once is safe inside that RawConn.Read, because the
// netpoller forgets readiness it saw before a read begins, not readiness it
// sees while the read waits, however soon the answer comes. The written
// bytes (flush's buffer) must stay as they are until that Read.
func (c *Conn) HoldWrite(flush func() error) error {
	c.hold = true
	err := flush()
	c.hold = false
	return err
}

// writeThenRead makes the held write, waits for c to be readable and
// reads into p. A write the socket will not take whole at once is
// finished by an ordinary Write, after which the read is an ordinary Read.
func (c *Conn) writeThenRead(p []byte) (int, error) {
	held := c.held
	c.held = nil
	if len(p) == 0 {
		_, err := c.Write(held)
		return 0, err
	}
	c.rmu.Lock()
	c.wmu.Lock()
	c.wbuf, c.wn, c.werr = held, 0, 0
	c.rbuf, c.rn, c.rerr, c.waited = p, 0, 0, false
	err := c.rc.Read(c.heldFn)
	wn, werr, n, rerr := c.wn, c.werr, c.rn, c.rerr
	c.wbuf, c.rbuf = nil, nil
	c.wmu.Unlock()
	c.rmu.Unlock()
	switch {
	case werr != 0:
		return 0, c.opError("write", os.NewSyscallError("write", werr))
	case wn < len(held):
		if err != nil {
			return 0, c.opError("write", err)
		}
		if _, err := c.Write(held[wn:]); err != nil {
			return 0, err
		}
		return c.Read(p)
	case err != nil:
		return 0, c.opError("read", err)
	case rerr != 0:
		return 0, c.opError("read", os.NewSyscallError("read", rerr))
	case n == 0:
		return 0, io.EOF
	}
	return n, nil
}

func (c *Conn) writeThenReadFn(fd uintptr) bool {
	sys := sysFn(syscall.RawSyscall)
	if inFlight.Load() > rawMaxInFlight {
		sys = syscall.Syscall // under load, as Read and Write do
	}
	if !c.waited {
		if c.writeWith(sys, fd) || c.werr != 0 {
			return true // an error, or the rest goes by an ordinary Write
		}
		c.waited = true
		return false // wait: nothing can have come yet
	}
	return c.readWith(sys, fd)
}

// RelayTo copies what c reads to dst until EOF or an error, stamping last
// (when not nil) with the time of every transfer, for a relayed connection
// that no relay loop took (one side is TLS, or the platform is not Linux).
//
// Its reads, and its writes when dst is a raw connection underneath, are
// raw whatever the load. The case against raw calls under load is a
// processor held through a long write while other requests wait; a relay
// has nothing better to do with it. Against the ordinary calls, that spares
// sysmon retaking the processor from a write, and the thread switch that
// brings, on every message.
//
// After a short read it reads again, to EAGAIN, before it waits: the
// netpoller says a socket is ready, not that its peer shut down, so a FIN
// that came with the last data shows only to a further read. (The relay
// loop, whose events say so, spares that read.) It returns the bytes it
// read from c.
func (c *Conn) RelayTo(dst io.Writer, buf []byte, last *atomic.Int64) (int64, error) {
	var (
		errno syscall.Errno
		werr  error
		total int64
	)
	raw, _ := Beneath(dst)
	c.rmu.Lock()
	defer c.rmu.Unlock()
	err := c.rc.Read(func(fd uintptr) bool {
		for {
			n, _, e := syscall.RawSyscall(syscall.SYS_READ, fd, uintptr(unsafe.Pointer(&buf[0])), uintptr(len(buf)))
			switch e {
			case 0:
			case syscall.EINTR:
				continue
			case syscall.EAGAIN:
				return false
			default:
				errno = e
				return true
			}
			if n == 0 {
				return true // EOF
			}
			total += int64(n)
			if last != nil {
				last.Store(time.Now().UnixNano())
			}
			if raw != nil {
				_, werr = raw.rawWrite(buf[:n])
			} else {
				_, werr = dst.Write(buf[:n])
			}
			if werr != nil {
				return true
			}
		}
	})
	switch {
	case err != nil:
		return total, c.opError("read", err)
	case errno != 0:
		return total, c.opError("read", os.NewSyscallError("read", errno))
	}
	return total, werr
}

// Beneath returns the raw connection under c, if any, with the bytes c
// has read from it and not yet handed out: c itself, or a Layered
// connection over one.
func Beneath(c any) (*Conn, []byte) {
	switch c := c.(type) {
	case *Conn:
		return c, nil
	case Layered:
		return c.RawBeneath()
	}
	return nil, nil
}

// Layered is a connection read through a layer of its own (a sniffer's
// prefix, an HTTP/1.1 reader's buffer) over a Conn.
type Layered interface {
	// RawBeneath returns the Conn beneath, or nil, and the bytes the layer
	// read from it and has not handed out. It does not block.
	RawBeneath() (*Conn, []byte)
}

func (c *Conn) opError(op string, err error) error {
	if ope, ok := err.(*net.OpError); ok {
		err = ope.Err // RawConn's own wrapping says "raw-read"
	}
	return &net.OpError{Op: op, Net: "tcp", Source: c.tcp.LocalAddr(), Addr: c.tcp.RemoteAddr(), Err: err}
}

// Close closes the connection, or the relay pair it was handed to. The
// socket closes first: a hand-over that has not stored its pair yet finds
// it closed (NewPair).
func (c *Conn) Close() error {
	err := c.Conn.Close()
	if p := c.relay.Load(); p != nil {
		p.Close()
	}
	if c.onClose != nil && c.closeDone.CompareAndSwap(false, true) {
		c.onClose()
	}
	return err
}

// OnClose makes the first Close run f. Call it before the connection is
// shared.
func (c *Conn) OnClose(f func()) { c.onClose = f }

// CloseWrite half-closes, as relayed upgrades need.
func (c *Conn) CloseWrite() error { return c.tcp.CloseWrite() }

// CloseWrite half-closes c when it can, so the peer sees EOF while the other
// direction goes on.
func CloseWrite(c any) error {
	if cw, ok := c.(interface{ CloseWrite() error }); ok {
		return cw.CloseWrite()
	}
	return nil
}
