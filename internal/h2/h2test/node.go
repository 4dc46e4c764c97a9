package h2test

import (
	"crypto/rand"
	"io"
	"net"
	"net/http"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// Node is a Go HTTP server speaking HTTP/1.1 and h2c with prior knowledge
// on loopback. It counts the connections it accepts and those it closed.
type Node struct {
	Addr    string
	Accepts atomic.Int64
	Closes  atomic.Int64
}

// StartH2C serves h until the test ends, with conf as its HTTP/2 settings
// when not nil.
func StartH2C(t testing.TB, h http.Handler, conf *http.HTTP2Config) *Node {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	n := &Node{Addr: ln.Addr().String()}
	protocols := new(http.Protocols)
	protocols.SetHTTP1(true)
	protocols.SetUnencryptedHTTP2(true)
	srv := &http.Server{Handler: h, Protocols: protocols, HTTP2: conf}
	done := make(chan struct{})
	go func() {
		defer close(done)
		_ = srv.Serve(&trackingListener{Listener: ln, n: n})
	}()
	t.Cleanup(func() {
		srv.Close()
		<-done
	})
	return n
}

type trackingListener struct {
	net.Listener
	n *Node
}

func (l *trackingListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err != nil {
		return nil, err
	}
	l.n.Accepts.Add(1)
	return &trackedConn{Conn: c, n: l.n}, nil
}

type trackedConn struct {
	net.Conn
	n    *Node
	once sync.Once
}

func (c *trackedConn) Close() error {
	c.once.Do(func() { c.n.Closes.Add(1) })
	return c.Conn.Close()
}

// NewClient returns a client speaking h2c with prior knowledge, with conf
// as its HTTP/2 settings when not nil. The test's cleanup closes its idle
// connections.
func NewClient(t testing.TB, conf *http.HTTP2Config) *http.Client {
	protocols := new(http.Protocols)
	protocols.SetUnencryptedHTTP2(true)
	tr := &http.Transport{Protocols: protocols, HTTP2: conf, DisableCompression: true}
	t.Cleanup(tr.CloseIdleConnections)
	return &http.Client{Transport: tr, Timeout: time.Minute}
}

// RandomBytes returns n random bytes.
func RandomBytes(n int) []byte {
	b := make([]byte, n)
	_, _ = rand.Read(b)
	return b
}

// EchoNode streams the request body back as it reads it, and says which
// protocol reached it in X-Node-Proto.
var EchoNode = http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
	w.Header().Set("X-Node-Proto", r.Proto)
	w.Header().Set("Content-Type", "application/octet-stream")
	_, _ = io.Copy(w, r.Body)
})

// AcceptEach serves each connection ln accepts with serve, on a goroutine
// of its own, and closes the connection when serve returns. The test's
// cleanup closes ln and every connection still open, and waits for the
// goroutines.
func AcceptEach(t testing.TB, ln net.Listener, serve func(net.Conn)) {
	var (
		wg     sync.WaitGroup
		mu     sync.Mutex
		conns  = make(map[net.Conn]struct{})
		closed bool
	)
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			nc, err := ln.Accept()
			if err != nil {
				return
			}
			mu.Lock()
			if closed {
				mu.Unlock()
				nc.Close()
				return
			}
			conns[nc] = struct{}{}
			wg.Add(1)
			mu.Unlock()
			go func() {
				defer wg.Done()
				defer nc.Close()
				serve(nc)
			}()
		}
	}()
	t.Cleanup(func() {
		ln.Close()
		mu.Lock()
		closed = true
		for nc := range conns {
			nc.Close()
		}
		mu.Unlock()
		wg.Wait()
	})
}
