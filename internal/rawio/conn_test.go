package rawio

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"sync"
	"testing"
	"time"
)

// rawPair returns a Conn client and the plain server end of a loopback
// TCP connection.
func rawPair(t testing.TB) (*Conn, net.Conn) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	accepted := make(chan net.Conn, 1)
	go func() {
		c, _ := ln.Accept()
		accepted <- c
	}()
	c, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	srv := <-accepted
	if srv == nil {
		t.Fatal("accept failed")
	}
	rc, ok := Wrap(c).(*Conn)
	if !ok {
		t.Fatalf("Wrap(%T) did not wrap", c)
	}
	t.Cleanup(func() { rc.Close(); srv.Close() })
	return rc, srv
}

// TestRawConn runs the same checks on the raw path (idle) and on the
// runtime's own path (busy).
func TestRawConn(t *testing.T) {
	for _, busy := range []bool{false, true} {
		name := "raw"
		if busy {
			name = "busy"
		}
		t.Run(name, func(t *testing.T) {
			if busy {
				inFlight.Add(2)
				defer inFlight.Add(-2)
			}
			t.Run("round trip and EOF", func(t *testing.T) {
				c, srv := rawPair(t)
				// 8 MiB is far past the socket buffers: writes go out in
				// parts, waiting in the netpoller in between.
				big := bytes.Repeat([]byte("0123456789abcdef"), 512<<10)
				errc := make(chan error, 1)
				go func() {
					_, err := c.Write(big)
					errc <- err
					c.CloseWrite()
				}()
				got, err := io.ReadAll(srv)
				if err != nil || !bytes.Equal(got, big) {
					t.Fatalf("server read %d bytes, %v; want %d", len(got), err, len(big))
				}
				if err := <-errc; err != nil {
					t.Fatalf("write: %v", err)
				}
				if _, err := srv.Write([]byte("pong")); err != nil {
					t.Fatal(err)
				}
				srv.Close()
				got, err = io.ReadAll(c)
				if err != nil || string(got) != "pong" {
					t.Fatalf("client read %q, %v; want pong and a clean EOF", got, err)
				}
			})
			t.Run("concurrent writers", func(t *testing.T) {
				// Each Write goes out whole, as net.Conn promises, however
				// many goroutines write at once.
				c, srv := rawPair(t)
				const writers, msgs, size = 4, 200, 3000
				var wg sync.WaitGroup
				for w := range writers {
					wg.Add(1)
					go func() {
						defer wg.Done()
						msg := bytes.Repeat([]byte{byte('a' + w)}, size)
						for range msgs {
							if _, err := c.Write(msg); err != nil {
								t.Errorf("write: %v", err)
								return
							}
						}
					}()
				}
				go func() { wg.Wait(); c.CloseWrite() }()
				srv.SetReadDeadline(time.Now().Add(10 * time.Second))
				got, err := io.ReadAll(srv)
				if err != nil || len(got) != writers*msgs*size {
					t.Fatalf("read %d bytes, %v; want %d", len(got), err, writers*msgs*size)
				}
				for i := 0; i < len(got); i += size {
					if m := got[i : i+size]; !bytes.Equal(m, bytes.Repeat(m[:1], size)) {
						t.Fatalf("message %d is interleaved with another", i/size)
					}
				}
			})
			t.Run("read deadline", func(t *testing.T) {
				c, _ := rawPair(t)
				c.SetReadDeadline(time.Now().Add(50 * time.Millisecond))
				start := time.Now()
				_, err := c.Read(make([]byte, 10))
				var ne net.Error
				if !errors.As(err, &ne) || !ne.Timeout() || !errors.Is(err, os.ErrDeadlineExceeded) {
					t.Fatalf("read past deadline = %v, want a timeout", err)
				}
				if d := time.Since(start); d > 5*time.Second {
					t.Fatalf("deadline took %v", d)
				}
			})
			t.Run("closed", func(t *testing.T) {
				c, _ := rawPair(t)
				done := make(chan error, 1)
				go func() {
					_, err := c.Read(make([]byte, 10))
					done <- err
				}()
				time.Sleep(20 * time.Millisecond)
				c.Close()
				select {
				case err := <-done:
					if !errors.Is(err, net.ErrClosed) {
						t.Fatalf("read on closed conn = %v, want net.ErrClosed", err)
					}
				case <-time.After(5 * time.Second):
					t.Fatal("a blocked read did not end when the conn closed")
				}
				if _, err := c.Write([]byte("x")); !errors.Is(err, net.ErrClosed) {
					t.Fatalf("write on closed conn = %v, want net.ErrClosed", err)
				}
			})
			t.Run("reset", func(t *testing.T) {
				c, srv := rawPair(t)
				srv.(*net.TCPConn).SetLinger(0)
				srv.Close()
				_, err := c.Read(make([]byte, 10))
				var ope *net.OpError
				if !errors.As(err, &ope) || ope.Op != "read" {
					t.Fatalf("read after reset = %v, want a read *net.OpError", err)
				}
			})
		})
	}
}

// TestRelayEndsWithLastData checks that a relay sees the end of its source
// when the last data and the FIN arrive together, before the relay starts
// or while it waits: a read may return the data and leave the EOF for the
// next, and no new readiness comes for it.
func TestRelayEndsWithLastData(t *testing.T) {
	run := func(t *testing.T, early bool) {
		c, srv := rawPair(t)
		send := func() {
			srv.Write([]byte("last"))
			srv.(*net.TCPConn).CloseWrite()
		}
		if early {
			send()
			time.Sleep(10 * time.Millisecond)
		}
		var got bytes.Buffer
		done := make(chan error, 1)
		var n int64
		go func() {
			var err error
			n, err = c.RelayTo(&got, make([]byte, 32<<10), nil)
			done <- err
		}()
		if !early {
			time.Sleep(time.Millisecond)
			send()
		}
		select {
		case err := <-done:
			if err != nil || got.String() != "last" || n != 4 {
				t.Fatalf("relay = %q (%d bytes), %v; want \"last\" (4) and nil", got.String(), n, err)
			}
		case <-time.After(5 * time.Second):
			t.Fatal("relay did not see the EOF that came with the last data")
		}
	}
	t.Run("before the relay", func(t *testing.T) { run(t, true) })
	t.Run("while it waits", func(t *testing.T) {
		for range 50 {
			run(t, false)
		}
	})
}

// TestRawConnHoldWrite checks a held write is made by the next Read, which
// then gets the answer, at idle and under load; that a write too big for
// the socket is finished by an ordinary one; and that a failed held write
// is reported as a write.
func TestRawConnHoldWrite(t *testing.T) {
	for _, busy := range []bool{false, true} {
		t.Run(fmt.Sprintf("busy=%v", busy), func(t *testing.T) {
			if busy {
				inFlight.Add(2)
				defer inFlight.Add(-2)
			}
			for _, size := range []int{5, 8 << 20} {
				c, srv := rawPair(t)
				req := bytes.Repeat([]byte("q"), size)
				if err := c.HoldWrite(func() error {
					_, err := c.Write(req)
					return err
				}); err != nil {
					t.Fatal(err)
				}
				if c.held == nil {
					t.Fatal("the write was not held")
				}
				go func() {
					got := make([]byte, size)
					if _, err := io.ReadFull(srv, got); err != nil || !bytes.Equal(got, req) {
						t.Errorf("node read %d bytes, %v; want the request", len(got), err)
					}
					srv.Write([]byte("answer"))
				}()
				buf := make([]byte, 16)
				c.SetReadDeadline(time.Now().Add(10 * time.Second))
				n, err := io.ReadAtLeast(c, buf, len("answer"))
				if err != nil || string(buf[:n]) != "answer" {
					t.Fatalf("size %d: read %q, %v; want the answer", size, buf[:n], err)
				}
				// The next write is not held.
				if _, err := c.Write([]byte("x")); err != nil || c.held != nil {
					t.Fatalf("a later write was held, or failed: %v", err)
				}
			}
		})
	}
	t.Run("failed", func(t *testing.T) {
		c, _ := rawPair(t)
		c.HoldWrite(func() error { _, err := c.Write([]byte("q")); return err })
		c.Conn.(*net.TCPConn).CloseWrite()
		_, err := c.Read(make([]byte, 8))
		var ope *net.OpError
		if !errors.As(err, &ope) || ope.Op != "write" {
			t.Fatalf("read after a failed held write = %v, want a write *net.OpError", err)
		}
	})
}

// BenchmarkIdleBroken measures the check the HTTP/1.1 pool makes on an idle
// connection before it reuses it: one non-blocking peek.
func BenchmarkIdleBroken(b *testing.B) {
	rc, _ := rawPair(b)
	b.ReportAllocs()
	for b.Loop() {
		if rc.IdleBroken() {
			b.Fatal("open connection reported broken")
		}
	}
}
