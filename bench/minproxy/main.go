// Command minproxy is a yardstick, not a proxy to use: the least a Go
// program can do to carry the bench's latency scenario (HTTP/1.1 GETs
// with short, length-framed answers) from one listener to backends in
// round robin, with the sidecar's raw reads and writes (proxy/rawconn.go)
// and nothing else: no HTTP objects, no header rewriting, no balancer,
// breaker, retries or metrics, and no error handling past closing the
// connection. Measured beside the sidecar and HAProxy, it says how much of
// the sidecar's cost per request is Go's runtime and netpoller, and how
// much the sidecar's own code (BENCHMARKS.md, latency).
//
//	minproxy -listen 127.0.0.1:19500 -backends 127.0.0.1:19100,127.0.0.1:19101
package main

import (
	"bytes"
	"flag"
	"log"
	"net"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"unsafe"
)

func main() {
	listen := flag.String("listen", "127.0.0.1:19500", "address to listen on")
	backends := flag.String("backends", "127.0.0.1:19100", "comma-separated backend addresses")
	flag.Parse()
	ln, err := net.Listen("tcp", *listen)
	if err != nil {
		log.Fatal(err)
	}
	p := &proxy{backends: strings.Split(*backends, ",")}
	for {
		c, err := ln.Accept()
		if err != nil {
			log.Fatal(err)
		}
		go p.serve(c)
	}
}

type proxy struct {
	backends []string
	next     atomic.Uint64
}

// serve carries one app connection's requests, each to the next backend
// over a connection of this app connection's own.
func (p *proxy) serve(c net.Conn) {
	defer c.Close()
	app := newRaw(c)
	nodes := make([]*raw, len(p.backends))
	defer func() {
		for _, n := range nodes {
			if n != nil {
				n.c.Close()
			}
		}
	}()
	req := make([]byte, 8192)
	resp := make([]byte, 8192)
	for {
		n := 0
		for !bytes.Contains(req[:n], []byte("\r\n\r\n")) {
			m := app.read(req[n:])
			if m == 0 || n+m == len(req) {
				return
			}
			n += m
		}
		i := p.next.Add(1) % uint64(len(nodes))
		if nodes[i] == nil {
			nc, err := net.Dial("tcp", p.backends[i])
			if err != nil {
				return
			}
			nodes[i] = newRaw(nc)
		}
		node := nodes[i]
		if !node.write(req[:n]) {
			return
		}
		m := 0
		for !whole(resp[:m]) {
			k := node.read(resp[m:])
			if k == 0 || m+k == len(resp) {
				return
			}
			m += k
		}
		if !app.write(resp[:m]) {
			return
		}
	}
}

// whole reports whether b holds a whole answer framed by Content-Length.
func whole(b []byte) bool {
	end := bytes.Index(b, []byte("\r\n\r\n"))
	if end < 0 {
		return false
	}
	i := bytes.Index(b[:end], []byte("\r\nContent-Length: "))
	if i < 0 {
		return true // no body
	}
	v := b[i+len("\r\nContent-Length: "):]
	v = v[:bytes.IndexByte(v, '\r')]
	n, err := strconv.Atoi(string(v))
	return err == nil && len(b) >= end+4+n
}

// raw reads and writes a TCP connection with raw system calls, parking in
// the netpoller when the socket is not ready, as the sidecar's rawConn does.
type raw struct {
	c      net.Conn
	rc     syscall.RawConn
	buf    []byte
	n      int
	errno  syscall.Errno
	rf, wf func(uintptr) bool
}

func newRaw(c net.Conn) *raw {
	rc, err := c.(*net.TCPConn).SyscallConn()
	if err != nil {
		log.Fatal(err)
	}
	r := &raw{c: c, rc: rc}
	r.rf = func(fd uintptr) bool {
		n, _, e := syscall.RawSyscall(syscall.SYS_READ, fd, uintptr(unsafe.Pointer(&r.buf[0])), uintptr(len(r.buf)))
		if e == syscall.EAGAIN {
			return false
		}
		r.n, r.errno = int(n), e
		return true
	}
	r.wf = func(fd uintptr) bool {
		n, _, e := syscall.RawSyscall(syscall.SYS_WRITE, fd, uintptr(unsafe.Pointer(&r.buf[0])), uintptr(len(r.buf)))
		switch {
		case e == syscall.EAGAIN:
			return false
		case e != 0:
			r.errno = e
			return true
		}
		r.buf = r.buf[n:]
		return len(r.buf) == 0
	}
	return r
}

// read reads into p, returning 0 at EOF or on an error.
func (r *raw) read(p []byte) int {
	r.buf, r.n, r.errno = p, 0, 0
	if err := r.rc.Read(r.rf); err != nil || r.errno != 0 {
		return 0
	}
	return r.n
}

// write writes all of p, reporting whether it could.
func (r *raw) write(p []byte) bool {
	r.buf, r.errno = p, 0
	return r.rc.Write(r.wf) == nil && r.errno == 0
}
