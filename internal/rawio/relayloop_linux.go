package rawio

import (
	"errors"
	"fmt"
	"net"
	"os"
	"runtime"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
	"unsafe"
)

// A relay loop copies the bytes of relayed connections (WebSocket and other
// upgrades, TCP routes) in one goroutine per processor, off its own epoll
// set, as HAProxy and nginx do. A goroutine per direction, the other way,
// costs per message a wake-up through the netpoller, a park and the
// runtime's system-call bookkeeping; and since Go's netpoller hands on
// readiness but not which kind, a relay cannot tell that the peer's FIN came
// with the last data, so after every message it must try a read that finds
// nothing. Here each event says what it is (EPOLLRDHUP), one epoll_wait
// serves every connection that became ready together, and reads and writes
// are raw system calls. An idle relayed connection costs its two file
// descriptors and a few hundred bytes: no goroutine and no buffer.
//
// The loop's epoll descriptor is itself registered in Go's netpoller, and
// the loop waits on it inside one RawConn.Read, so the goroutine parks like
// any other when nothing is ready, and the runtime's scheduler is untouched.
type relayLoop struct {
	epfd int
	evfd int // an eventfd that wakes the loop for commands
	file *os.File

	mu     sync.Mutex
	cmds   []*Pair // added or to close, in order; evfd is written for the first
	taking []*Pair // the loop's copy of cmds

	ends    map[int32]*relayEnd
	again   []*Pair // pairs still readable after their turn's budget
	turn    []*Pair
	events  [128]syscall.EpollEvent
	scratch []byte
}

// relayBudget is how many reads one direction gets per turn before the
// others' turns: a bulk transfer does not starve ping-pong traffic.
const relayBudget = 16

// A Pair is two connections whose bytes a relay loop copies both ways.
type Pair struct {
	loop *relayLoop
	ends [2]relayEnd
	last *atomic.Int64 // stamped on every transfer; nil when unused
	// halfClose keeps a direction going after the other ended (TCP). For
	// an upgrade, one direction's end ends the session, as WebSocket
	// closes in-band.
	halfClose bool

	closeReq atomic.Bool
	done     chan struct{}
	err      error // why the pair ended, nil on a clean end; read after done

	// The loop's own.
	added, queued, finished bool
}

// relayEnd is one connection of a pair, and the direction that reads it.
type relayEnd struct {
	p  *Pair
	fd int
	// in: readable as far as we know (cleared on EAGAIN, or on a short read
	// before the peer shut down); out: writable as far as we know; hup: the
	// peer shut down or the socket failed, so read on until EOF.
	in, out, hup bool
	eof          bool   // read returned 0
	shut         bool   // our writes to it are shut down
	read         int64  // bytes from this end, held ones included
	pending      []byte // read from this end, not yet written to the other
	pbuf         *[]byte
}

var (
	relayLoopsOnce sync.Once
	relayLoops     []*relayLoop
	relayLoopsErr  error
	relayNext      atomic.Uint32
)

// pickRelayLoop returns a relay loop, starting them (one per processor) on
// first use.
func pickRelayLoop() (*relayLoop, error) {
	relayLoopsOnce.Do(func() {
		for range runtime.GOMAXPROCS(0) {
			l, err := newRelayLoop()
			if err != nil {
				if len(relayLoops) == 0 {
					relayLoopsErr = err
				}
				return // fewer loops than processors, or goroutine relays
			}
			relayLoops = append(relayLoops, l)
			go l.run()
		}
	})
	if relayLoopsErr != nil {
		return nil, relayLoopsErr
	}
	return relayLoops[relayNext.Add(1)%uint32(len(relayLoops))], nil
}

func newRelayLoop() (*relayLoop, error) {
	epfd, err := syscall.EpollCreate1(syscall.EPOLL_CLOEXEC)
	if err != nil {
		return nil, os.NewSyscallError("epoll_create1", err)
	}
	evfd, _, errno := syscall.RawSyscall(syscall.SYS_EVENTFD2, 0, syscall.O_NONBLOCK|syscall.O_CLOEXEC, 0)
	if errno != 0 {
		syscall.Close(epfd)
		return nil, os.NewSyscallError("eventfd2", errno)
	}
	ev := syscall.EpollEvent{Events: syscall.EPOLLIN | epollET, Fd: int32(evfd)}
	if err := syscall.EpollCtl(epfd, syscall.EPOLL_CTL_ADD, int(evfd), &ev); err != nil {
		syscall.Close(epfd)
		syscall.Close(int(evfd))
		return nil, os.NewSyscallError("epoll_ctl", err)
	}
	// Non-blocking, the epoll descriptor goes into the netpoller.
	if err := syscall.SetNonblock(epfd, true); err != nil {
		syscall.Close(epfd)
		syscall.Close(int(evfd))
		return nil, os.NewSyscallError("fcntl", err)
	}
	file := os.NewFile(uintptr(epfd), "relay-epoll")
	// A descriptor the netpoller would not take (out of epoll watches,
	// say) takes no deadline: better goroutine relays than a loop that
	// cannot wait.
	if err := file.SetReadDeadline(time.Time{}); err != nil {
		file.Close()
		syscall.Close(int(evfd))
		return nil, fmt.Errorf("relay loop: %w", err)
	}
	return &relayLoop{
		epfd:    epfd,
		evfd:    int(evfd),
		file:    file,
		ends:    make(map[int32]*relayEnd),
		scratch: make([]byte, 32<<10),
	}, nil
}

// epollET is EPOLLET as the uint32 EpollEvent.Events holds.
const epollET = 1 << 31

const relayEvents = syscall.EPOLLIN | syscall.EPOLLOUT | syscall.EPOLLRDHUP | epollET

// NewPair hands a and b to a relay loop, which copies between them
// until the pair ends; aHeld and bHeld are bytes already read from a and b,
// sent before anything else. On success the loop owns both sockets: a and
// b are closed, and closing either again closes the pair. On an error, a
// and b are as they were.
func NewPair(a, b *Conn, aHeld, bHeld []byte, halfClose bool, last *atomic.Int64) (*Pair, error) {
	l, err := pickRelayLoop()
	if err != nil {
		return nil, err
	}
	p := &Pair{loop: l, last: last, halfClose: halfClose, done: make(chan struct{})}
	for i, c := range [2]*Conn{a, b} {
		fd, err := c.dupFD()
		if err != nil {
			if i == 1 {
				syscall.Close(p.ends[0].fd)
			}
			return nil, err
		}
		p.ends[i] = relayEnd{p: p, fd: fd, in: true, out: true}
	}
	p.ends[0].setPending(aHeld)
	p.ends[1].setPending(bHeld)
	p.ends[0].read, p.ends[1].read = int64(len(aHeld)), int64(len(bHeld))
	// From here a Close of either reaches the pair. Closing the sockets
	// Go's netpoller has takes them out of it; the loop's duplicates stay.
	a.relay.Store(p)
	b.relay.Store(p)
	// A Close between the dup and the Store did not reach the pair: the
	// socket it closed says so.
	if errA, errB := a.tcp.Close(), b.tcp.Close(); errors.Is(errA, net.ErrClosed) || errors.Is(errB, net.ErrClosed) {
		p.closeReq.Store(true)
	}
	l.command(p)
	return p, nil
}

// dupFD duplicates c's socket descriptor.
func (c *Conn) dupFD() (int, error) {
	var (
		fd    uintptr
		errno syscall.Errno
	)
	err := c.rc.Control(func(s uintptr) {
		fd, _, errno = syscall.RawSyscall(syscall.SYS_FCNTL, s, syscall.F_DUPFD_CLOEXEC, 0)
	})
	if err != nil {
		return -1, err
	}
	if errno != 0 {
		return -1, os.NewSyscallError("fcntl", errno)
	}
	return int(fd), nil
}

// Wait blocks until the pair ends, and says why: nil for a clean end,
// net.ErrClosed when it was closed, or the I/O error that ended it.
func (p *Pair) Wait() error {
	<-p.done
	return p.err
}

// Transferred returns how many bytes went from a to b and from b to a,
// the held ones included. Call it once Wait has returned.
func (p *Pair) Transferred() (aToB, bToA int64) { return p.ends[0].read, p.ends[1].read }

// Close ends the pair, closing both sockets; it does not wait.
func (p *Pair) Close() {
	if !p.closeReq.Swap(true) {
		p.loop.command(p)
	}
}

// command queues p for the loop, to add it or to close it, and wakes the
// loop.
func (l *relayLoop) command(p *Pair) {
	l.mu.Lock()
	wake := len(l.cmds) == 0 // else evfd is written and the loop has yet to take cmds
	l.cmds = append(l.cmds, p)
	l.mu.Unlock()
	if wake {
		one := uint64(1)
		syscall.RawSyscall(syscall.SYS_WRITE, uintptr(l.evfd), uintptr(unsafe.Pointer(&one)), 8)
	}
}

// run is the loop's goroutine. Its work is done inside one RawConn.Read on
// the epoll descriptor, which parks the goroutine in the netpoller when no
// connection is ready.
func (l *relayLoop) run() {
	rc, err := l.file.SyscallConn()
	if err != nil {
		panic(err) // an *os.File always has one
	}
	// poll never reports done and the descriptor is never closed, so this
	// returns only if the runtime stops polling it; every relayed
	// connection on the loop would hang, so say so loudly.
	err = rc.Read(l.poll)
	panic(fmt.Sprintf("sidecar: relay loop stopped: %v", err))
}

// poll handles every ready event, then the turns left over, and reports
// false (wait) once nothing is ready.
func (l *relayLoop) poll(uintptr) bool {
	for {
		n, _, errno := syscall.RawSyscall6(syscall.SYS_EPOLL_PWAIT, uintptr(l.epfd),
			uintptr(unsafe.Pointer(&l.events[0])), uintptr(len(l.events)), 0, 0, 0)
		if errno != 0 {
			n = 0 // EINTR; nothing else happens with a zero timeout
		}
		for i := range int(n) {
			ev := &l.events[i]
			if int(ev.Fd) == l.evfd {
				l.commands()
				continue
			}
			if e := l.ends[ev.Fd]; e != nil {
				l.event(e, ev.Events)
			}
		}
		if len(l.again) == 0 {
			if n == 0 {
				return false
			}
			continue
		}
		// Pairs with more to read take another turn, after the other
		// goroutines have had one: a bulk transfer does not hold the
		// processor until preemption.
		runtime.Gosched()
		l.turn, l.again = l.again, l.turn[:0]
		for _, p := range l.turn {
			p.queued = false
			l.pumpBoth(p)
		}
		clear(l.turn)
	}
}

func (l *relayLoop) commands() {
	var buf [8]byte
	syscall.RawSyscall(syscall.SYS_READ, uintptr(l.evfd), uintptr(unsafe.Pointer(&buf[0])), 8)
	l.mu.Lock()
	l.taking, l.cmds = l.cmds, l.taking[:0]
	l.mu.Unlock()
	for _, p := range l.taking {
		switch {
		case p.finished:
		case p.closeReq.Load():
			l.finish(p, net.ErrClosed)
		case !p.added:
			l.add(p)
		}
	}
	clear(l.taking)
}

func (l *relayLoop) add(p *Pair) {
	p.added = true
	for i := range p.ends {
		e := &p.ends[i]
		ev := syscall.EpollEvent{Events: relayEvents, Fd: int32(e.fd)}
		if err := syscall.EpollCtl(l.epfd, syscall.EPOLL_CTL_ADD, e.fd, &ev); err != nil {
			l.finish(p, os.NewSyscallError("epoll_ctl", err))
			return
		}
		l.ends[int32(e.fd)] = e
	}
	// Both ends start out presumed readable and writable: what came before
	// the registration is read now, and the registration itself reports
	// any readiness, edge-triggered or not.
	l.pumpBoth(p)
}

func (l *relayLoop) event(e *relayEnd, ev uint32) {
	if ev&(syscall.EPOLLIN|syscall.EPOLLRDHUP|syscall.EPOLLHUP|syscall.EPOLLERR) != 0 {
		e.in = true
	}
	if ev&(syscall.EPOLLRDHUP|syscall.EPOLLHUP|syscall.EPOLLERR) != 0 {
		e.hup = true
	}
	if ev&(syscall.EPOLLOUT|syscall.EPOLLHUP|syscall.EPOLLERR) != 0 {
		e.out = true
	}
	l.pumpBoth(e.p)
}

func (l *relayLoop) pumpBoth(p *Pair) {
	l.pump(&p.ends[0], &p.ends[1])
	l.pump(&p.ends[1], &p.ends[0])
	if p.finished {
		return
	}
	a, b := &p.ends[0], &p.ends[1]
	aDone, bDone := a.eof && b.shut, b.eof && a.shut
	if aDone && bDone || !p.halfClose && (aDone || bDone) {
		l.finish(p, nil)
	}
}

// pump copies what src has, and what it holds, to dst, until src would
// block, dst would block, src ended, or src used its turn's budget.
func (l *relayLoop) pump(src, dst *relayEnd) {
	p := src.p
	for budget := relayBudget; !p.finished; budget-- {
		if len(src.pending) > 0 {
			rest, ok := l.send(dst, src.pending)
			if !ok {
				return
			}
			if len(rest) > 0 {
				src.pending = rest
				return
			}
			src.releasePending()
		}
		if src.eof {
			if !dst.shut {
				dst.shut = true
				syscall.Shutdown(dst.fd, syscall.SHUT_WR)
			}
			return
		}
		if !src.in {
			return
		}
		if budget == 0 {
			if !p.queued {
				p.queued = true
				l.again = append(l.again, p)
			}
			return
		}
		n, _, errno := syscall.RawSyscall(syscall.SYS_READ, uintptr(src.fd),
			uintptr(unsafe.Pointer(&l.scratch[0])), uintptr(len(l.scratch)))
		switch errno {
		case 0:
		case syscall.EINTR:
			continue
		case syscall.EAGAIN:
			src.in = false
			return
		default:
			l.finish(p, os.NewSyscallError("read", errno))
			return
		}
		if n == 0 {
			src.eof = true
			continue
		}
		src.read += int64(n)
		if p.last != nil {
			p.last.Store(time.Now().UnixNano())
		}
		rest, ok := l.send(dst, l.scratch[:n])
		if !ok {
			return
		}
		if len(rest) > 0 {
			src.setPending(rest)
			return
		}
		// A short read drained the socket. Unless the peer has shut down
		// (its FIN may have come with this data, leaving the EOF for a
		// read that no new event would prompt), the next event says when
		// there is more.
		if int(n) < len(l.scratch) && !src.hup {
			src.in = false
			return
		}
	}
}

// send writes b to dst while dst is writable, and returns what is left:
// all of it when dst was not writable, the rest when its send buffer
// filled (dst is then not writable until EPOLLOUT says so). ok is false
// when a write failed, which finished the pair.
func (l *relayLoop) send(dst *relayEnd, b []byte) (rest []byte, ok bool) {
	for dst.out && len(b) > 0 {
		w, _, errno := syscall.RawSyscall(syscall.SYS_WRITE, uintptr(dst.fd),
			uintptr(unsafe.Pointer(&b[0])), uintptr(len(b)))
		switch errno {
		case 0:
			b = b[w:]
		case syscall.EINTR:
		case syscall.EAGAIN:
			dst.out = false
		default:
			l.finish(dst.p, os.NewSyscallError("write", errno))
			return nil, false
		}
	}
	return b, true
}

// pendingPool holds the buffers of bytes read before a hand-over.
var pendingPool = sync.Pool{New: func() any { b := make([]byte, 32<<10); return &b }}

func (e *relayEnd) setPending(b []byte) {
	if len(b) == 0 {
		return
	}
	e.pbuf = pendingPool.Get().(*[]byte)
	e.pending = append((*e.pbuf)[:0], b...)
}

func (e *relayEnd) releasePending() {
	e.pending = nil
	if e.pbuf != nil {
		pendingPool.Put(e.pbuf)
		e.pbuf = nil
	}
}

// finish ends p: both sockets closed, its buffers released, its waiter
// woken.
func (l *relayLoop) finish(p *Pair, err error) {
	if p.finished {
		return
	}
	p.finished = true
	p.err = err
	for i := range p.ends {
		e := &p.ends[i]
		if p.added && l.ends[int32(e.fd)] == e {
			delete(l.ends, int32(e.fd))
			syscall.EpollCtl(l.epfd, syscall.EPOLL_CTL_DEL, e.fd, nil)
		}
		syscall.Close(e.fd)
		e.releasePending()
	}
	close(p.done)
}
