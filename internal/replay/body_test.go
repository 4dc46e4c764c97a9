package replay

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"net/http"
	"runtime"
	"sync/atomic"
	"testing"
	"time"

	"github.com/sidecarlb/sidecar/internal/httpwire"
)

// feedSource is a client's body whose reads wait for what the test feeds
// them, one read a feed; it can tell whether a read would wait (TryRead).
type feedSource struct {
	feed    chan feedRead // closed for EOF
	started chan struct{} // a read began
	reads   atomic.Int64
}

type feedRead struct {
	p   string
	err error
}

func newFeedSource() *feedSource {
	return &feedSource{feed: make(chan feedRead, 16), started: make(chan struct{}, 16)}
}

func (s *feedSource) Read(p []byte) (int, error) {
	s.reads.Add(1)
	s.started <- struct{}{}
	f, ok := <-s.feed
	if !ok {
		return 0, io.EOF
	}
	return copy(p, f.p), f.err
}

func (s *feedSource) TryRead(p []byte) (int, error, bool) {
	select {
	case f, ok := <-s.feed:
		s.reads.Add(1)
		if !ok {
			return 0, io.EOF, true
		}
		return copy(p, f.p), f.err, true
	default:
		return 0, nil, false
	}
}

func (s *feedSource) Close() error { return nil }

// trailerSource is a feedSource that fills in the request's trailers when
// it reaches the end of the body, as net/http's request body does.
type trailerSource struct {
	*feedSource
	trailer http.Header
}

func (s *trailerSource) Read(p []byte) (int, error) {
	n, err := s.feedSource.Read(p)
	if err == io.EOF {
		s.trailer.Set("X-Sum", "42")
	}
	return n, err
}

// waitRead waits until a read of s has begun.
func (s *feedSource) waitRead(t *testing.T) {
	t.Helper()
	select {
	case <-s.started:
	case <-time.After(5 * time.Second):
		t.Fatal("no read of the source began")
	}
}

type readResult struct {
	p   string
	err error
}

// readAsync reads once from r on a goroutine of its own.
func readAsync(r io.Reader) <-chan readResult {
	c := make(chan readResult, 1)
	go func() {
		buf := make([]byte, 64)
		n, err := r.Read(buf)
		c <- readResult{string(buf[:n]), err}
	}()
	return c
}

func mustResult(t *testing.T, c <-chan readResult, what string) readResult {
	t.Helper()
	select {
	case r := <-c:
		return r
	case <-time.After(5 * time.Second):
		t.Fatalf("%s: the read never returned", what)
		return readResult{}
	}
}

func mustNext(t *testing.T, b *Body) io.ReadCloser {
	t.Helper()
	r, ok := b.Next()
	if !ok {
		t.Fatal("Next() = false, want a reader: no byte was handed to a try")
	}
	return r
}

func readOnce(r io.Reader) (string, error) {
	buf := make([]byte, 64)
	n, err := r.Read(buf)
	return string(buf[:n]), err
}

// TestBodyStaleTry: a try given up while its read of a streamed body waits
// for the client gets nothing from that read, and the bytes it brings go to
// the next try; the body counts as read, and cannot be sent again, only
// once bytes reach a try.
func TestBodyStaleTry(t *testing.T) {
	t.Run("a stale read's bytes go to the next try", func(t *testing.T) {
		src := newFeedSource()
		b := &Body{src: src}
		r1 := mustNext(t, b)
		first := readAsync(r1)
		src.waitRead(t)
		r2 := mustNext(t, b) // while r1's read still waits
		src.feed <- feedRead{p: "abc"}
		if got := mustResult(t, first, "try 1"); got.p != "" || got.err != ErrStaleTry {
			t.Errorf("try 1 Read() = %q, %v; want nothing, %v", got.p, got.err, ErrStaleTry)
		}
		if !b.Replayable() {
			t.Error("Replayable() = false after a stale read, want true: no byte reached a try")
		}
		if p, err := readOnce(r2); p != "abc" || err != nil {
			t.Errorf("try 2 Read() = %q, %v; want %q, nil", p, err, "abc")
		}
		if got := src.reads.Load(); got != 1 {
			t.Errorf("source reads = %d, want 1: the kept bytes come first", got)
		}
		if b.Replayable() {
			t.Error("Replayable() = true after bytes reached try 2, want false")
		}
		if _, ok := b.Next(); ok {
			t.Error("Next() = true after bytes reached try 2, want false")
		}
		if p, err := readOnce(r1); p != "" || err != ErrStaleTry {
			t.Errorf("try 1 Read() again = %q, %v; want nothing, %v", p, err, ErrStaleTry)
		}
		if got := src.reads.Load(); got != 1 {
			t.Errorf("source reads = %d after a stale try's Read, want 1", got)
		}
		src.feed <- feedRead{p: "def"}
		close(src.feed)
		var got []byte
		for {
			p, err := readOnce(r2)
			got = append(got, p...)
			if err == io.EOF {
				break
			}
			if err != nil {
				t.Fatalf("try 2 Read() error = %v", err)
			}
		}
		if string(got) != "def" {
			t.Errorf("try 2 read the rest as %q, want %q", got, "def")
		}
	})

	t.Run("a stale read's trailers reach the next try's own copy", func(t *testing.T) {
		// The source fills in the request's trailers at the end of the
		// body, as net/http's does, while try 2's request, whose trailers
		// are being encoded, must have a map of its own.
		src := &trailerSource{feedSource: newFeedSource(), trailer: http.Header{"X-Sum": nil}}
		b, err := New(&http.Request{Body: src, ContentLength: -1, Trailer: src.trailer}, false)
		if err != nil {
			t.Fatal(err)
		}
		first := readAsync(mustNext(t, b))
		src.waitRead(t)
		r2 := mustNext(t, b).(*Reader)
		encoded := make(chan struct{})
		go func() {
			defer close(encoded)
			for range 1000 {
				for k, vv := range r2.trailer {
					_, _ = k, vv
				}
			}
		}()
		close(src.feed)
		if got := mustResult(t, first, "try 1"); got.err != ErrStaleTry {
			t.Errorf("try 1 Read() = %q, %v; want nothing, %v", got.p, got.err, ErrStaleTry)
		}
		<-encoded
		if p, err := readOnce(r2); p != "" || err != io.EOF {
			t.Fatalf("try 2 Read() = %q, %v; want nothing, EOF", p, err)
		}
		if got := r2.trailer.Get("X-Sum"); got != "42" {
			t.Errorf("try 2's trailer X-Sum = %q after the end of the body, want %q", got, "42")
		}
		r2.trailer.Set("X-Sum", "changed")
		if got := src.trailer.Get("X-Sum"); got != "42" {
			t.Errorf("the request's trailer X-Sum = %q after try 2 changed its own, want %q", got, "42")
		}
	})

	t.Run("the owner's read waits for a stale one and gets its bytes", func(t *testing.T) {
		src := newFeedSource()
		b := &Body{src: src}
		first := readAsync(mustNext(t, b))
		src.waitRead(t)
		second := readAsync(mustNext(t, b))
		src.feed <- feedRead{p: "xyz"}
		if got := mustResult(t, first, "try 1"); got.err != ErrStaleTry {
			t.Errorf("try 1 Read() = %q, %v; want nothing, %v", got.p, got.err, ErrStaleTry)
		}
		if got := mustResult(t, second, "try 2"); got.p != "xyz" || got.err != nil {
			t.Errorf("try 2 Read() = %q, %v; want %q, nil", got.p, got.err, "xyz")
		}
		if got := src.reads.Load(); got != 1 {
			t.Errorf("source reads = %d, want 1", got)
		}
	})

	t.Run("bytes read after the try was given up wait for the next", func(t *testing.T) {
		// A retry decided on, backing off: no next try yet.
		src := newFeedSource()
		b := &Body{src: src}
		first := readAsync(mustNext(t, b))
		src.waitRead(t)
		b.GiveUp()
		src.feed <- feedRead{p: "late"}
		if got := mustResult(t, first, "try 1"); got.p != "" || got.err != ErrStaleTry {
			t.Errorf("try 1 Read() = %q, %v; want nothing, %v", got.p, got.err, ErrStaleTry)
		}
		if !b.Replayable() {
			t.Error("Replayable() = false after a given-up try's read, want true")
		}
		if p, err := readOnce(mustNext(t, b)); p != "late" || err != nil {
			t.Errorf("try 2 Read() = %q, %v; want %q, nil", p, err, "late")
		}
	})

	t.Run("TryRead does not wait behind a stale read", func(t *testing.T) {
		src := newFeedSource()
		b := &Body{src: src}
		first := readAsync(mustNext(t, b))
		src.waitRead(t)
		r2 := mustNext(t, b).(*Reader)
		buf := make([]byte, 64)
		if n, err, ok := r2.TryRead(buf); ok {
			t.Fatalf("TryRead() = %d, %v, true while a stale read holds the source, want ok false", n, err)
		}
		src.feed <- feedRead{p: "q"}
		mustResult(t, first, "try 1")
		if n, err, ok := r2.TryRead(buf); !ok || string(buf[:n]) != "q" || err != nil {
			t.Errorf("TryRead() = %q, %v, %v; want %q, nil, true", buf[:n], err, ok, "q")
		}
		if n, err, ok := r2.TryRead(buf); ok {
			t.Errorf("TryRead() = %d, %v, true with nothing at hand, want ok false", n, err)
		}
		if b.Replayable() {
			t.Error("Replayable() = true after TryRead handed bytes, want false")
		}
	})

	t.Run("a stale read's EOF", func(t *testing.T) {
		src := newFeedSource()
		b := &Body{src: src}
		first := readAsync(mustNext(t, b))
		src.waitRead(t)
		r2 := mustNext(t, b)
		close(src.feed)
		if got := mustResult(t, first, "try 1"); got.err != ErrStaleTry {
			t.Errorf("try 1 Read() error = %v, want %v", got.err, ErrStaleTry)
		}
		if p, err := readOnce(r2); p != "" || err != io.EOF {
			t.Errorf("try 2 Read() = %q, %v; want EOF", p, err)
		}
		// An empty body may go again, and still ends at once.
		r3 := mustNext(t, b)
		if p, err := readOnce(r3); p != "" || err != io.EOF {
			t.Errorf("try 3 Read() = %q, %v; want EOF", p, err)
		}
		if got := src.reads.Load(); got != 1 {
			t.Errorf("source reads = %d, want 1: none after EOF", got)
		}
	})

	t.Run("a stale read's error", func(t *testing.T) {
		src := newFeedSource()
		b := &Body{src: src}
		first := readAsync(mustNext(t, b))
		src.waitRead(t)
		r2 := mustNext(t, b)
		broken := errors.New("client reset")
		src.feed <- feedRead{p: "ab", err: broken}
		if got := mustResult(t, first, "try 1"); got.err != ErrStaleTry {
			t.Errorf("try 1 Read() error = %v, want %v", got.err, ErrStaleTry)
		}
		if err := b.Failed(); !errors.Is(err, httpwire.ErrBadRequestBody) || !errors.Is(err, broken) {
			t.Errorf("Failed() = %v, want %v wrapping %v", err, httpwire.ErrBadRequestBody, broken)
		}
		if p, err := readOnce(r2); p != "ab" || err != nil {
			t.Errorf("try 2 Read() = %q, %v; want %q, nil", p, err, "ab")
		}
		if p, err := readOnce(r2); p != "" || err != broken {
			t.Errorf("try 2 Read() after the kept bytes = %q, %v; want %v", p, err, broken)
		}
	})

	t.Run("a body in memory reads whole on every try", func(t *testing.T) {
		b := &Body{src: http.NoBody, buf: []byte("0123456789")}
		r1 := mustNext(t, b)
		if p, _ := io.ReadAll(io.LimitReader(r1, 4)); string(p) != "0123" {
			t.Fatalf("try 1 read %q, want 0123", p)
		}
		r2 := mustNext(t, b)
		if p, err := io.ReadAll(r2); string(p) != "0123456789" || err != nil {
			t.Errorf("try 2 read %q, %v; want the whole body", p, err)
		}
		if p, err := io.ReadAll(r1); string(p) != "456789" || err != nil {
			t.Errorf("try 1 read on %q, %v; want the rest of its own", p, err)
		}
		if !b.Replayable() {
			t.Error("Replayable() = false for a body in memory, want true")
		}
	})
}

// TestBodyStaleTryHammer: tries move on at random moments while the
// client's bytes trickle in. Whatever the timing, the bytes reach one try
// only, the one that owns the body, whole and in order, and no try after it
// is allowed.
func TestBodyStaleTryHammer(t *testing.T) {
	const (
		parts = 20
		tries = 8
	)
	for round := range 300 {
		pr, pw := io.Pipe()
		b := &Body{src: pr}
		// The client starts sending once start tries were begun, the first
		// of them waiting in a read by then, and goes on while more begin.
		start := round%tries + 1
		send := make(chan struct{})
		var want []byte
		for i := range parts {
			want = fmt.Appendf(want, "<%d.%d>", round, i)
		}
		go func() {
			<-send
			for i := range parts {
				if _, err := pw.Write(fmt.Appendf(nil, "<%d.%d>", round, i)); err != nil {
					return
				}
				if i%(round%3+1) == 0 {
					runtime.Gosched()
				}
			}
			pw.Close()
		}()
		type outcome struct {
			got []byte
			err error
		}
		var outcomes []chan outcome
		for try := 1; ; try++ {
			r, ok := b.Next()
			if !ok {
				break
			}
			c := make(chan outcome, 1)
			outcomes = append(outcomes, c)
			go func() {
				var o outcome
				buf := make([]byte, 3)
				for {
					n, err := r.Read(buf)
					o.got = append(o.got, buf[:n]...)
					if err != nil {
						o.err = err
						break
					}
				}
				c <- o
			}()
			if try == start {
				close(send)
			}
			if try == tries {
				break // the last try reads to the end
			}
			if try%2 == round%2 {
				runtime.Gosched()
			}
		}
		if len(outcomes) < start {
			close(send)
		}
		var holder int
		var got []byte
		for i, c := range outcomes {
			var o outcome
			select {
			case o = <-c:
			case <-time.After(10 * time.Second):
				t.Fatalf("round %d: try %d never ended", round, i+1)
			}
			switch {
			case o.err == io.EOF:
				holder, got = i+1, o.got
			case o.err != ErrStaleTry || len(o.got) > 0:
				t.Fatalf("round %d: stale try %d read %q, %v; want nothing, %v", round, i+1, o.got, o.err, ErrStaleTry)
			}
		}
		if holder != len(outcomes) {
			t.Fatalf("round %d: try %d of %d read to the end, want the last", round, holder, len(outcomes))
		}
		if !bytes.Equal(got, want) {
			t.Fatalf("round %d: try %d read %q, want %q", round, holder, got, want)
		}
	}
}
