package rawio

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/sidecarlb/sidecar/internal/leakcheck"
)

// loopPair relays between two loopback connections through a relay loop,
// and returns the pair and the far ends: app talks to the pair's first
// connection, node to its second.
func loopPair(t *testing.T, aHeld, bHeld []byte, halfClose bool, last *atomic.Int64) (p *Pair, app, node *net.TCPConn) {
	t.Helper()
	a, appEnd := rawPair(t)
	b, nodeEnd := rawPair(t)
	p, err := NewPair(a, b, aHeld, bHeld, halfClose, last)
	if err != nil {
		t.Fatalf("NewPair: %v", err)
	}
	t.Cleanup(p.Close)
	return p, appEnd.(*net.TCPConn), nodeEnd.(*net.TCPConn)
}

// waitPair returns the pair's end, failing the test if it takes 5 s.
func waitPair(t *testing.T, p *Pair) error {
	t.Helper()
	select {
	case <-p.done:
		return p.err
	case <-time.After(5 * time.Second):
		t.Fatal("the relay pair did not end")
		return nil
	}
}

func readAllWithin(t *testing.T, c net.Conn) []byte {
	t.Helper()
	c.SetReadDeadline(time.Now().Add(10 * time.Second))
	b, err := io.ReadAll(c)
	if err != nil {
		t.Fatalf("read: %v", err)
	}
	return b
}

// TestRelayLoopHalfClose moves 8 MiB each way at once, far past the socket
// buffers (so writes block and resume on EPOLLOUT), then checks a
// half-close on one side reaches the other while the other direction goes
// on, as a TCP route needs.
func TestRelayLoopHalfClose(t *testing.T) {
	leakcheck.Check(t)
	var last atomic.Int64
	p, app, node := loopPair(t, nil, nil, true, &last)
	up := bytes.Repeat([]byte("app->node "), 800<<10)
	down := bytes.Repeat([]byte("node->app "), 800<<10)
	var wg sync.WaitGroup
	wg.Add(2)
	go func() { defer wg.Done(); app.Write(up); app.CloseWrite() }()
	go func() { defer wg.Done(); node.Write(down) }()
	// The app reads while the node writes: 8 MiB need not fit in the
	// buffers between them.
	var appGot []byte
	var appErr error
	appDone := make(chan struct{})
	go func() {
		defer close(appDone)
		app.SetReadDeadline(time.Now().Add(10 * time.Second))
		appGot, appErr = io.ReadAll(app)
	}()
	if got := readAllWithin(t, node); !bytes.Equal(got, up) {
		t.Fatalf("node read %d bytes, want the app's %d then EOF", len(got), len(up))
	}
	// The app's direction is done; the node's still flows.
	wg.Wait()
	node.Write([]byte(" and after the half-close"))
	node.CloseWrite()
	<-appDone
	want := append(bytes.Clone(down), " and after the half-close"...)
	if appErr != nil || !bytes.Equal(appGot, want) {
		t.Fatalf("app read %d bytes, %v; want %d then EOF", len(appGot), appErr, len(want))
	}
	if err := waitPair(t, p); err != nil {
		t.Fatalf("pair ended with %v, want a clean end", err)
	}
	if last.Load() == 0 {
		t.Error("transfers did not stamp the activity time")
	}
	if aToB, bToA := p.Transferred(); aToB != int64(len(up)) || bToA != int64(len(want)) {
		t.Errorf("Transferred() = %d, %d; want %d, %d", aToB, bToA, len(up), len(want))
	}
}

// TestRelayLoopSlowReader has the node read a little at a time: the loop
// must hold what it read from the app, stop reading the app, and resume
// when the node's socket drains.
func TestRelayLoopSlowReader(t *testing.T) {
	_, app, node := loopPair(t, nil, nil, true, nil)
	up := make([]byte, 4<<20)
	for i := range up {
		up[i] = byte(i * 7)
	}
	go func() { app.Write(up); app.CloseWrite() }()
	var got []byte
	buf := make([]byte, 1500)
	node.SetReadDeadline(time.Now().Add(20 * time.Second))
	for i := 0; ; i++ {
		n, err := node.Read(buf)
		got = append(got, buf[:n]...)
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatalf("node read: %v after %d bytes", err, len(got))
		}
		if i%200 == 0 {
			time.Sleep(time.Millisecond)
		}
	}
	if !bytes.Equal(got, up) {
		t.Fatalf("node read %d bytes, not the app's %d in order", len(got), len(up))
	}
}

// TestRelayLoopLastDataWithFIN is TestRelayEndsWithLastData for the loop:
// the FIN that came with the last data is seen, before the pair is added
// and while it waits.
func TestRelayLoopLastDataWithFIN(t *testing.T) {
	for _, early := range []bool{true, false} {
		t.Run(fmt.Sprintf("early=%v", early), func(t *testing.T) {
			for range 50 {
				a, appEnd := rawPair(t)
				b, node := rawPair(t)
				app := appEnd.(*net.TCPConn)
				send := func() { app.Write([]byte("last")); app.CloseWrite() }
				if early {
					send()
					time.Sleep(time.Millisecond)
				}
				p, err := NewPair(a, b, nil, nil, true, nil)
				if err != nil {
					t.Fatal(err)
				}
				if !early {
					time.Sleep(time.Millisecond)
					send()
				}
				if got := readAllWithin(t, node); string(got) != "last" {
					t.Fatalf("node read %q, want \"last\" then EOF", got)
				}
				node.Close()
				if err := waitPair(t, p); err != nil {
					t.Fatalf("pair ended with %v", err)
				}
			}
		})
	}
}

// TestRelayLoopSessionEnds checks an upgrade's rule: when one direction
// ends, after its last bytes are through, the whole pair ends.
func TestRelayLoopSessionEnds(t *testing.T) {
	p, app, node := loopPair(t, nil, nil, false, nil)
	app.Write([]byte("bye"))
	app.CloseWrite()
	if err := waitPair(t, p); err != nil {
		t.Fatalf("pair ended with %v, want a clean end", err)
	}
	if got := readAllWithin(t, node); string(got) != "bye" {
		t.Fatalf("node read %q, want \"bye\" then EOF", got)
	}
	if got := readAllWithin(t, app); len(got) != 0 {
		t.Fatalf("app read %q, want EOF", got)
	}
}

// TestRelayLoopHeld checks bytes read before the hand-over go first.
func TestRelayLoopHeld(t *testing.T) {
	p, app, node := loopPair(t, []byte("early-up "), []byte("early-down "), true, nil)
	app.Write([]byte("up"))
	app.CloseWrite()
	node.Write([]byte("down"))
	node.CloseWrite()
	if got := readAllWithin(t, node); string(got) != "early-up up" {
		t.Errorf("node read %q, want \"early-up up\"", got)
	}
	if got := readAllWithin(t, app); string(got) != "early-down down" {
		t.Errorf("app read %q, want \"early-down down\"", got)
	}
	if err := waitPair(t, p); err != nil {
		t.Fatalf("pair ended with %v, want a clean end", err)
	}
	// Held bytes count as the side's they were read from.
	if aToB, bToA := p.Transferred(); aToB != int64(len("early-up up")) || bToA != int64(len("early-down down")) {
		t.Errorf("Transferred() = %d, %d; want %d, %d", aToB, bToA, len("early-up up"), len("early-down down"))
	}
}

// TestRelayLoopClose checks that closing either connection handed over (as
// Shutdown and idle timers do) ends the pair and closes both sockets.
func TestRelayLoopClose(t *testing.T) {
	for _, which := range []int{0, 1} {
		t.Run(fmt.Sprint(which), func(t *testing.T) {
			a, appEnd := rawPair(t)
			b, nodeEnd := rawPair(t)
			p, err := NewPair(a, b, nil, nil, true, nil)
			if err != nil {
				t.Fatal(err)
			}
			[]*Conn{a, b}[which].Close()
			if err := waitPair(t, p); !errors.Is(err, net.ErrClosed) {
				t.Fatalf("pair ended with %v, want net.ErrClosed", err)
			}
			for _, c := range []net.Conn{appEnd, nodeEnd} {
				c.SetReadDeadline(time.Now().Add(5 * time.Second))
				if _, err := c.Read(make([]byte, 1)); err != io.EOF {
					t.Errorf("far end read = %v, want EOF", err)
				}
			}
		})
	}
	t.Run("before the loop adds it", func(t *testing.T) {
		a, _ := rawPair(t)
		b, _ := rawPair(t)
		p, err := NewPair(a, b, nil, nil, true, nil)
		if err != nil {
			t.Fatal(err)
		}
		p.Close()
		waitPair(t, p)
	})
}

// TestRelayLoopReset checks a reset from one side ends the pair with the
// error and closes the other side.
func TestRelayLoopReset(t *testing.T) {
	p, app, node := loopPair(t, nil, nil, true, nil)
	node.SetLinger(0)
	node.Close()
	err := waitPair(t, p)
	if err == nil {
		t.Fatal("pair ended cleanly after a reset")
	}
	app.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, rerr := app.Read(make([]byte, 1)); rerr != io.EOF {
		t.Errorf("app read = %v, want EOF", rerr)
	}
}

// TestRelayLoopMany runs 64 ping-pong pairs and one bulk transfer at once
// over the loops, each message checked, so a lost wake-up, a crossed
// buffer or a starved pair would show.
func TestRelayLoopMany(t *testing.T) {
	const pairs, rounds = 64, 300
	var wg sync.WaitGroup
	errs := make(chan error, pairs+1)
	for i := range pairs {
		_, app, node := loopPair(t, nil, nil, false, nil)
		wg.Add(2)
		go func() {
			defer wg.Done()
			io.Copy(node, node) // echo
		}()
		go func() {
			defer wg.Done()
			defer app.Close()
			app.SetDeadline(time.Now().Add(30 * time.Second))
			buf := make([]byte, 4096)
			for r := range rounds {
				msg := bytes.Repeat([]byte{byte(i), byte(r)}, 1+(i*r)%2000)
				if _, err := app.Write(msg); err != nil {
					errs <- err
					return
				}
				if _, err := io.ReadFull(app, buf[:len(msg)]); err != nil {
					errs <- fmt.Errorf("pair %d round %d: %w", i, r, err)
					return
				}
				if !bytes.Equal(buf[:len(msg)], msg) {
					errs <- fmt.Errorf("pair %d round %d: echo differs", i, r)
					return
				}
			}
		}()
	}
	_, app, node := loopPair(t, nil, nil, true, nil)
	bulk := bytes.Repeat([]byte("bulk"), 4<<20)
	wg.Add(1)
	go func() {
		defer wg.Done()
		app.Write(bulk)
		app.CloseWrite()
	}()
	if got := readAllWithin(t, node); !bytes.Equal(got, bulk) {
		t.Errorf("bulk: node read %d bytes, want %d", len(got), len(bulk))
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
}

// TestRelayLoopCloseDuringHandOver closes a connection while it is handed
// to a relay loop, as an idle timer or Shutdown may: either the hand-over
// fails, or the pair it made ends. A pair that missed the Close would copy
// on, and its waiter wait, for as long as both peers stay.
func TestRelayLoopCloseDuringHandOver(t *testing.T) {
	for i := range 1000 {
		a, appEnd := rawPair(t)
		b, nodeEnd := rawPair(t)
		closed := make(chan struct{})
		go func() { a.Close(); close(closed) }()
		p, err := NewPair(a, b, nil, nil, true, nil)
		<-closed
		if err == nil {
			select {
			case <-p.done:
			case <-time.After(time.Second):
				t.Fatalf("round %d: the pair outlived a Close of its connection", i)
			}
		}
		b.Close()
		appEnd.Close()
		nodeEnd.Close()
	}
}
