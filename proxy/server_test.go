package proxy

import (
	"bufio"
	"io"
	"net"
	"net/http"
	"sync"
	"syscall"
	"testing"
	"testing/synctest"
	"time"
)

// TestServerZeroTimeouts: timeouts.read_header and timeouts.idle of 0s mean
// no limit, as config.yaml documents, not the 10s and 90s an empty file
// gets: a head that takes an hour to arrive is read, and a keep-alive
// connection left for a day is still served. The same waits past explicit
// timeouts close the connection.
func TestServerZeroTimeouts(t *testing.T) {
	for _, tc := range []struct {
		name       string
		opts       ServerOptions
		wantServed bool
	}{
		{"zero means no limit", ServerOptions{}, true},
		{"limits", ServerOptions{ReadHeaderTimeout: 10 * time.Second, IdleTimeout: 90 * time.Second}, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			synctest.Test(t, func(t *testing.T) {
				s := NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
					io.WriteString(w, "ok")
				}), tc.opts, testLogger(t))
				ln := newPipeListener()
				served := make(chan struct{})
				go func() {
					defer close(served)
					s.Serve(ln)
				}()
				defer func() {
					s.Close()
					<-served
				}()

				// exchange sends what is left of a request after waiting
				// wait, and reads the answer: false when the server closed
				// the connection meanwhile.
				c := ln.dial(t)
				defer c.Close()
				br := bufio.NewReader(c)
				exchange := func(first string, wait time.Duration, rest string) bool {
					t.Helper()
					if first != "" {
						if _, err := io.WriteString(c, first); err != nil {
							return false
						}
					}
					time.Sleep(wait)
					synctest.Wait()
					if _, err := io.WriteString(c, rest); err != nil {
						return false
					}
					resp, err := http.ReadResponse(br, nil)
					if err != nil {
						return false
					}
					b, err := io.ReadAll(resp.Body)
					resp.Body.Close()
					return err == nil && resp.StatusCode == http.StatusOK && string(b) == "ok"
				}
				const req = "GET / HTTP/1.1\r\nHost: x\r\n\r\n"
				if got := exchange(req[:20], time.Hour, req[20:]); got != tc.wantServed {
					t.Errorf("request whose head took an hour served = %v, want %v", got, tc.wantServed)
				}
				if !tc.wantServed {
					return
				}
				if got := exchange("", 24*time.Hour, req); got != tc.wantServed {
					t.Errorf("request on a connection idle for a day served = %v, want %v", got, tc.wantServed)
				}
			})
		})
	}

	t.Run("idle limit", func(t *testing.T) {
		synctest.Test(t, func(t *testing.T) {
			s := NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				io.WriteString(w, "ok")
			}), ServerOptions{ReadHeaderTimeout: 10 * time.Second, IdleTimeout: 90 * time.Second}, testLogger(t))
			ln := newPipeListener()
			served := make(chan struct{})
			go func() {
				defer close(served)
				s.Serve(ln)
			}()
			defer func() {
				s.Close()
				<-served
			}()
			c := ln.dial(t)
			defer c.Close()
			br := bufio.NewReader(c)
			io.WriteString(c, "GET / HTTP/1.1\r\nHost: x\r\n\r\n")
			resp, err := http.ReadResponse(br, nil)
			if err != nil {
				t.Fatal(err)
			}
			io.ReadAll(resp.Body)
			resp.Body.Close()
			time.Sleep(91 * time.Second)
			synctest.Wait()
			if _, err := br.ReadByte(); err == nil {
				t.Error("connection idle past the 90s idle timeout still open, want it closed")
			}
		})
	})
}

// pipeListener hands the server one end of a net.Pipe per dial: a peer
// that does not read blocks the server's writes at once, with no socket
// buffer to fill first.
type pipeListener struct {
	conns chan net.Conn
	done  chan struct{}
	once  sync.Once
}

func newPipeListener() *pipeListener {
	return &pipeListener{conns: make(chan net.Conn), done: make(chan struct{})}
}

func (l *pipeListener) Accept() (net.Conn, error) {
	select {
	case c := <-l.conns:
		return c, nil
	case <-l.done:
		return nil, net.ErrClosed
	}
}

func (l *pipeListener) Close() error {
	l.once.Do(func() { close(l.done) })
	return nil
}

func (l *pipeListener) Addr() net.Addr { return pipeAddr{} }

type pipeAddr struct{}

// dial returns the client's end of a new connection to the server.
func (l *pipeListener) dial(t *testing.T) net.Conn {
	t.Helper()
	client, server := net.Pipe()
	t.Cleanup(func() { client.Close() })
	select {
	case l.conns <- server:
	case <-time.After(5 * time.Second):
		t.Fatal("server did not accept")
	}
	return client
}

func (pipeAddr) Network() string { return "pipe" }
func (pipeAddr) String() string  { return "pipe" }

// cpuTime is the process's user and system CPU time so far.
func cpuTime() time.Duration {
	var ru syscall.Rusage
	_ = syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}
