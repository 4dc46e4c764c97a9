package h2

import (
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zaptest/observer"

	"github.com/sidecarlb/sidecar/internal/h2/h2test"
	"github.com/sidecarlb/sidecar/internal/leakcheck"
)

// timerPanicConn is a connection that panics the first time its
// SetWriteDeadline or its Close is called, as panicOn says: what a timer
// callback of the HTTP/2 engine calls on the socket when it closes an idle
// connection, or one whose ping went unanswered. SetWriteDeadline panics
// for the second a closing connection gets, not for the writer's stall
// deadline (h2WriteStall).
type timerPanicConn struct {
	net.Conn
	panicOn  string // "SetWriteDeadline" or "Close"
	panicked atomic.Bool
}

func (c *timerPanicConn) SetWriteDeadline(t time.Time) error {
	if c.panicOn == "SetWriteDeadline" && time.Until(t) <= 5*time.Second && c.panicked.CompareAndSwap(false, true) {
		panic("deadline boom")
	}
	return c.Conn.SetWriteDeadline(t)
}

func (c *timerPanicConn) Close() error {
	if c.panicOn == "Close" && c.panicked.CompareAndSwap(false, true) {
		panic("close boom")
	}
	return c.Conn.Close()
}

// waitPanicLogged waits for the log entry of a recovered connection panic
// and checks it names the panic and has the stack of fn.
func waitPanicLogged(t *testing.T, logs *observer.ObservedLogs, panicked, fn string) {
	t.Helper()
	resWait(t, 5*time.Second, "the panic logged", func() bool {
		return logs.FilterMessage("http2 connection panicked").Len() > 0
	})
	entry := logs.FilterMessage("http2 connection panicked").All()[0]
	if fields := entry.ContextMap(); fields["panic"] != panicked || !strings.Contains(fmt.Sprint(fields["stack"]), fn) {
		t.Errorf("logged %q %v, want the panic %q and the stack of %s", entry.Message, fields, panicked, fn)
	}
}

// TestH2NodeConnTimerPanics: a panic in a node connection's idle timer
// (closeIfIdle) or health timer (checkHealth) is logged with its stack and
// ends that connection, as one in its read or write loop does, instead of
// the process.
func TestH2NodeConnTimerPanics(t *testing.T) {
	leakcheck.Check(t)
	tests := []struct {
		name    string
		fn      string
		panicOn string
		panic   string
		setup   func(p *Pool)
	}{
		{"idle timer", "closeIfIdle", "SetWriteDeadline", "deadline boom", func(p *Pool) {
			p.idle = 20 * time.Millisecond
		}},
		{"health timer", "checkHealth", "Close", "close boom", func(p *Pool) {
			p.pingAfter, p.pingTimeout = 20*time.Millisecond, 20*time.Millisecond
		}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			core, logs := observer.New(zap.ErrorLevel)
			p := NewPool(time.Second, 0, nil, zap.New(core))
			p.pingAfter = time.Hour
			tc.setup(p)
			// A node that reads everything and answers nothing, not even
			// the ping.
			sidecar, node := net.Pipe()
			go func() { _, _ = io.Copy(io.Discard, node) }()
			t.Cleanup(func() {
				node.Close()
				sidecar.Close() // in case the panic kept the sidecar from it
			})
			cc := p.start(&timerPanicConn{Conn: sidecar, panicOn: tc.panicOn})
			waitPanicLogged(t, logs, tc.panic, tc.fn)
			select {
			case <-cc.done:
			case <-time.After(5 * time.Second):
				t.Fatal("connection still open after the panic")
			}
		})
	}
}

// TestH2ServerIdleTimerPanics: a panic in an app connection's idle timer
// (closeIfIdle) is logged with its stack and closes that connection; the
// sidecar lives on and serves the next connection.
func TestH2ServerIdleTimerPanics(t *testing.T) {
	leakcheck.Check(t)
	core, logs := observer.New(zap.ErrorLevel)
	srv := newListenerServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		io.WriteString(w, "ok")
	}), Options{IdleTimeout: 50 * time.Millisecond}, zap.New(core))
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	pl := &timerPanicListener{Listener: ln}
	pl.armed.Store(true)
	serveOn(t, srv, pl)

	c := h2test.Dial(t, ln.Addr().String(), true)
	if err := c.ReadUntil(5*time.Second, func() bool { return false }); errors.Is(err, os.ErrDeadlineExceeded) {
		t.Error("connection still open after the panic")
	}
	waitPanicLogged(t, logs, "deadline boom", "closeIfIdle")
	if r := doGet(t, h2test.NewClient(t, nil), "http://"+ln.Addr().String()+"/x", nil); r.status != http.StatusOK || r.body != "ok" {
		t.Errorf("next connection: %d %q, want 200 ok", r.status, r.body)
	}
}

// timerPanicListener wraps the first connection it accepts in a
// timerPanicConn that panics in SetWriteDeadline.
type timerPanicListener struct {
	net.Listener
	armed atomic.Bool
}

func (l *timerPanicListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err != nil || !l.armed.CompareAndSwap(true, false) {
		return c, err
	}
	return &timerPanicConn{Conn: c, panicOn: "SetWriteDeadline"}, nil
}

// serveOn serves srv on ln until the test ends, then closes it and waits
// for Serve to return.
func serveOn(t *testing.T, srv *listenerServer, ln net.Listener) {
	t.Helper()
	done := make(chan struct{})
	go func() {
		defer close(done)
		_ = srv.Serve(ln)
	}()
	t.Cleanup(func() {
		srv.Close()
		<-done
	})
}
