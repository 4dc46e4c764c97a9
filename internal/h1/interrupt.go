package h1

import (
	"context"
	"errors"
	"fmt"
	"os"
	"sync"
	"time"
)

// exchange is the context of one request on a connection.
type exchange struct {
	ctx         context.Context
	deadline    time.Time
	hasDeadline bool
	// What interrupts the exchange's I/O when ctx ends: the app
	// connection's interrupter, or a context.AfterFunc.
	ci       *interrupter
	stopFunc func() bool
}

// arm makes the end of x.ctx call interrupt, until stop.
func (x *exchange) arm(interrupt func()) {
	if x.ctx.Done() == nil {
		return
	}
	if ci, _ := x.ctx.Value(interrupterKey{}).(*interrupter); ci != nil && ci.ctx == x.ctx && ci.arm(interrupt) {
		x.ci = ci
		return
	}
	x.stopFunc = context.AfterFunc(x.ctx, interrupt)
}

// stop undoes arm. It reports false when ctx ended and interrupt was
// called (or is being called), true otherwise.
func (x *exchange) stop() bool {
	switch {
	case x.ci != nil:
		ci := x.ci
		x.ci = nil
		return ci.stop()
	case x.stopFunc != nil:
		f := x.stopFunc
		x.stopFunc = nil
		return f()
	}
	return true
}

// interrupterKey is the context key of an app connection's interrupter.
type interrupterKey struct{}

// interrupter does for the exchanges of one app connection, one at a time,
// what a context.AfterFunc on their shared context would do, without the
// three allocations such a registration costs per request. The HTTP/1.1
// server makes one per connection, registered once with context.AfterFunc,
// and puts it in the connection's context (see WithInterrupter). Its
// methods are safe for concurrent use and do not block.
type interrupter struct {
	ctx   context.Context // the context it serves, and no context derived from it
	mu    sync.Mutex
	fn    func() // armed
	ended bool   // ctx ended
}

// WithInterrupter returns a context carrying a new interrupter for itself,
// and end, which does at once what the context's end would do to the
// interrupter, without the goroutine context.AfterFunc starts for that.
// It is an Options.ConnContext: the server calls it once per app
// connection, and the Pool's exchanges on that connection's requests
// borrow the interrupter in turn.
func WithInterrupter(ctx context.Context) (context.Context, func()) {
	ci := &interrupter{}
	ci.ctx = context.WithValue(ctx, interrupterKey{}, ci)
	stop := context.AfterFunc(ci.ctx, ci.fire)
	return ci.ctx, func() {
		if stop() {
			ci.fire()
		}
	}
}

// arm sets fn to be called when ctx ends. It reports false, doing nothing,
// when an exchange already holds the interrupter.
func (ci *interrupter) arm(fn func()) bool {
	ci.mu.Lock()
	if ci.fn != nil {
		ci.mu.Unlock()
		return false
	}
	if ci.ended {
		ci.mu.Unlock()
		go fn() // as context.AfterFunc does for a context already done
		return true
	}
	ci.fn = fn
	ci.mu.Unlock()
	return true
}

// stop disarms the interrupter, reporting whether that kept fn from being
// called.
func (ci *interrupter) stop() bool {
	ci.mu.Lock()
	defer ci.mu.Unlock()
	stopped := ci.fn != nil && !ci.ended
	ci.fn = nil
	return stopped
}

func (ci *interrupter) fire() {
	ci.mu.Lock()
	ci.ended = true
	fn := ci.fn
	ci.mu.Unlock()
	if fn != nil {
		fn()
	}
}

// wrap names the context's error in err when the context ended, so that
// callers see a timeout or a cancellation rather than an I/O error.
func (x *exchange) wrap(err error) error {
	if cerr := x.ctx.Err(); cerr != nil {
		return fmt.Errorf("%w: %w", cerr, err)
	}
	if x.hasDeadline && errors.Is(err, os.ErrDeadlineExceeded) && !time.Now().Before(x.deadline) {
		return fmt.Errorf("%w: %w", context.DeadlineExceeded, err)
	}
	return err
}
