package replay

import (
	"errors"
	"fmt"
	"io"
	"net/http"
	"sync"
	"sync/atomic"

	"github.com/sidecarlb/sidecar/internal/httpwire"
)

// MaxBody is the largest request body kept in memory so it can be
// sent again on a retry. Larger or unsized bodies stream, and are retried
// only when no byte of them was read.
const MaxBody = 64 << 10

// Body is a request body as the tries of one request share it. Each try
// reads it through a Reader of its own, bound to the try's number; the
// body's owner is the latest try, and only the owner's reader takes bytes
// from src. A try given up on may still have a read of src under way (an
// HTTP/2 stream's body goroutine, a Transport's write loop, waiting for the
// app's next bytes): what that read brings is kept for the owner, so no
// byte of a streamed body is lost between tries.
type Body struct {
	src io.ReadCloser
	buf []byte // the whole body, when small enough to replay
	// state is the owner's try number times 2, plus 1 once bytes of src
	// were handed to a try (handed): from then on a streamed body cannot
	// be sent again. One word, so that handing bytes to a try and moving
	// on to the next try cannot cross.
	state  atomic.Uint64
	srcErr atomic.Pointer[error] // a failed read of src, other than EOF

	mu sync.Mutex // held around reads of src
	// stale is what reads of src brought after their try was given up,
	// kept for the owner; nil when none did. Under mu.
	stale *staleRead

	first Reader // the first try's reader, spared an allocation

	// trailer is the request's Trailer map, which src fills in, under mu,
	// when it reaches the end of the body; declared is a copy taken before
	// any read. Each try sends a copy of declared of its own, brought up to
	// date when its reader reaches the end: a stale try's read may be
	// filling trailer in while the next try's request is encoded.
	trailer, declared http.Header
}

// staleRead is what reads of src by tries given up brought.
type staleRead struct {
	p []byte
	// err came with p: io.EOF, or src's error. It stays once p is handed
	// out, src not being read after it.
	err error
}

// ErrStaleTry is what a Reader returns once a later try owns the body.
var ErrStaleTry = errors.New("request body taken over by a later try")

// Reader is what one try sends. Close does nothing: the transport
// closes bodies on errors, and a retry may still need the body.
type Reader struct {
	b       *Body
	try     uint64
	off     int         // in b.buf, when the body is held in memory
	trailer http.Header // the try's copy of the request's trailers, or nil
}

// Read reads the try's body: from memory, or, while the try owns the body,
// what a stale try left, then from src. It may block for the client's
// next bytes; it is not for concurrent use, though readers of different
// tries may read at once.
func (r *Reader) Read(p []byte) (int, error) {
	b := r.b
	if b.buf != nil {
		if r.off >= len(b.buf) {
			return 0, io.EOF
		}
		n := copy(p, b.buf[r.off:])
		r.off += n
		return n, nil
	}
	if !b.owns(r.try) {
		return 0, ErrStaleTry
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	if !b.owns(r.try) {
		return 0, ErrStaleTry // moved on while this read waited for b.mu
	}
	n, err, ok := b.pendingLocked(r.try, p)
	if !ok {
		n, err = b.src.Read(p)
		n, err = b.gotLocked(r.try, p[:n], err)
	}
	if err == io.EOF {
		r.takeTrailerLocked()
	}
	return n, err
}

// takeTrailerLocked brings the try's trailers up to date at the end of the
// body, from what src read. b.mu is held.
func (r *Reader) takeTrailerLocked() {
	for k, vv := range r.b.trailer {
		r.trailer[k] = vv
	}
}

// TryRead reads what is at hand without waiting for the client: ok is
// false when a read would wait, or the source cannot tell. It does not
// wait for a stale try's read of src either.
func (r *Reader) TryRead(p []byte) (n int, err error, ok bool) {
	b := r.b
	if b.buf != nil {
		n, err = r.Read(p)
		return n, err, true
	}
	src, can := b.src.(interface {
		TryRead([]byte) (int, error, bool)
	})
	if !can {
		return 0, nil, false
	}
	if !b.owns(r.try) {
		return 0, ErrStaleTry, true
	}
	if !b.mu.TryLock() {
		return 0, nil, false // a stale try's read is under way
	}
	defer b.mu.Unlock()
	if n, err, ok = b.pendingLocked(r.try, p); !ok {
		if n, err, ok = src.TryRead(p); !ok {
			return 0, nil, false
		}
		n, err = b.gotLocked(r.try, p[:n], err)
	}
	if err == io.EOF {
		r.takeTrailerLocked()
	}
	return n, err, true
}

func (r *Reader) Close() error { return nil }

// Failed returns the error that broke reading the client's body, or nil.
func (b *Body) Failed() error {
	if p := b.srcErr.Load(); p != nil {
		return fmt.Errorf("%w: %w", httpwire.ErrBadRequestBody, *p)
	}
	return nil
}

// owns reports whether try owns the body.
func (b *Body) owns(try uint64) bool { return b.state.Load()>>1 == try }

// handed reports whether bytes of src were handed to a try.
func (b *Body) handed() bool { return b.state.Load()&1 != 0 }

// hand marks bytes of src handed to try, reporting false, marking nothing,
// when try no longer owns the body.
func (b *Body) hand(try uint64) bool {
	for {
		s := b.state.Load()
		if s>>1 != try {
			return false
		}
		if s&1 != 0 || b.state.CompareAndSwap(s, s|1) {
			return true
		}
	}
}

// pendingLocked hands try what stale tries' reads left, if anything: ok is
// false when there is nothing, and src is to be read. b.mu is held.
func (b *Body) pendingLocked(try uint64, p []byte) (n int, err error, ok bool) {
	st := b.stale
	switch {
	case st == nil:
		return 0, nil, false
	case len(st.p) == 0:
		return 0, st.err, true
	case !b.hand(try):
		return 0, ErrStaleTry, true
	}
	n = copy(p, st.p)
	st.p = st.p[n:]
	if len(st.p) == 0 && st.err == nil {
		b.stale = nil
	}
	return n, nil, true
}

// gotLocked takes the outcome of try's read of src, p and err: passed on
// while try owns the body, kept for the owner when try lost it while the
// read waited. b.mu is held.
func (b *Body) gotLocked(try uint64, p []byte, err error) (int, error) {
	if err != nil && err != io.EOF {
		e := err // a copy, so that err itself stays off the heap
		b.srcErr.Store(&e)
	}
	switch {
	case len(p) == 0 && (err == nil || b.owns(try)):
		return 0, err
	case len(p) > 0 && b.hand(try):
		return len(p), err
	}
	if b.stale == nil {
		b.stale = new(staleRead)
	}
	b.stale.p = append(b.stale.p, p...)
	if err != nil {
		b.stale.err = err
	}
	return 0, ErrStaleTry
}

// New prepares r's body for tries: read into memory when it is small,
// known in size, and the request may be replayed after reaching a node.
func New(r *http.Request, replayable bool) (*Body, error) {
	b := &Body{src: r.Body}
	if r.Trailer != nil {
		b.trailer, b.declared = r.Trailer, r.Trailer.Clone()
	}
	if replayable && r.ContentLength > 0 && r.ContentLength <= MaxBody {
		b.buf = make([]byte, r.ContentLength)
		if _, err := io.ReadFull(r.Body, b.buf); err != nil {
			return nil, fmt.Errorf("%w: %w", httpwire.ErrBadRequestBody, err)
		}
	}
	return b, nil
}

// Next returns the body for the next try, which owns it from then on, or
// false when the body cannot be sent again: bytes of a streamed body were
// handed to a try. It is for the retry loop alone, between tries.
func (b *Body) Next() (io.ReadCloser, bool) {
	var try uint64
	for {
		s := b.state.Load()
		if b.buf == nil && s&1 != 0 {
			return nil, false
		}
		if b.state.CompareAndSwap(s, s+2) {
			try = s>>1 + 1
			break
		}
	}
	r := &b.first
	if try > 1 {
		r = new(Reader) // an earlier try may still be reading its own
	}
	*r = Reader{b: b, try: try}
	if b.declared != nil {
		r.trailer = b.declared.Clone()
	}
	return r, true
}

// GiveUp takes the body from the latest try, a retry of it being decided
// on: what a read of that try still brings is kept for the next try, even
// while the retry waits out its backoff. Like Next, it is for the retry
// loop alone.
func (b *Body) GiveUp() { b.state.Add(2) }

// Replayable reports whether a try that reached a node may be repeated.
func (b *Body) Replayable() bool { return b.buf != nil || !b.handed() }

// Bytes returns the whole body when it is held in memory, else nil
// (h1.Body).
func (b *Body) Bytes() []byte { return b.buf }

// Trailer returns the try's own copy of the request's trailers (the
// declared ones, brought up to date when the reader reaches the end), or
// nil when the request declared none.
func (r *Reader) Trailer() http.Header { return r.trailer }
