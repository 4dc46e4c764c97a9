package proxy

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"go.uber.org/zap"

	"github.com/sidecarlb/sidecar/balancer"
	"github.com/sidecarlb/sidecar/internal/httpwire"
	"github.com/sidecarlb/sidecar/internal/rawio"
)

// serveUpgrade carries a protocol upgrade (WebSocket): one node, picked
// at the handshake, serves the whole connection; the handshake is
// forwarded, and after a 101 both directions are copied until either side
// closes, or until no byte has moved either way for timeouts.tunnel. As
// for any request, a handshake never sent to a node (an open breaker, a
// refused dial) may go to another one, and each node's answer, or failure
// to answer, feeds its breaker and outlier detection. It blocks until the
// session ends.
func (p *Proxy) serveUpgrade(w http.ResponseWriter, r *http.Request, rt *route, proto string, start time.Time) {
	m := &rt.metrics
	fail := func(err error) {
		_, code := classify(err)
		m.refused(code)
		if pe := (*proxyError)(nil); !errors.As(err, &pe) {
			err = &proxyError{rt.cfg.Service, err} // name the service once
		}
		p.logRefused(m.listener, rt.cfg.Service, r, code, err)
		writeError(w, err)
	}
	key, hasKey := rt.key.sum(r)
	prepareOutbound(r, rt)
	out := r.WithContext(r.Context())
	out.Header["Connection"] = []string{"Upgrade"}
	out.Header["Upgrade"] = []string{proto}
	out.Body = nil
	if r.ContentLength != 0 {
		out.Body = r.Body
	}

	var l tryLoop
	l.init(p, r.Context(), rt, key, hasKey, start)
	l.kind, l.upgrade = tryUpgrade, upgradeTry{out: out}
	u := &l.upgrade
	defer l.next.cancel(rt)
	err := l.run()
	if a := accessOf(w); a != nil {
		a.attempts = l.sent
		if err == nil {
			a.node = u.e.Addr
			if u.resp.StatusCode == http.StatusSwitchingProtocols {
				a.status = http.StatusSwitchingProtocols // written on the hijacked connection
			}
		}
	}
	if err != nil {
		if err == errClientClosed {
			m.refused("client_closed")
			return
		}
		fail(err)
		return
	}
	p.answerUpgrade(w, rt, proto, u, start)
}

// answerUpgrade relays the node's answer to the handshake u made: a
// refused handshake as any other answer; after a 101, the session, until
// either side ends it.
func (p *Proxy) answerUpgrade(w http.ResponseWriter, rt *route, proto string, u *upgradeTry, start time.Time) {
	resp, e, pk, breakerDone := u.resp, u.e, u.pk, u.breakerDone
	rt.metrics.countAnswer(e, resp.StatusCode)
	if resp.StatusCode != http.StatusSwitchingProtocols {
		// Refused handshake: relay the answer as it is, and count it as
		// any other answer.
		res := &rt.cfg.Resilience
		gateway := isGatewayStatus(resp.StatusCode, res.Outlier.EjectOn5xx)
		rt.reportTry(e, breakerDone, resp.StatusCode >= 500 && res.Breaker.TripOn5xx, gateway)
		defer resp.Body.Close()
		copyResponseHeader(w.Header(), resp)
		w.WriteHeader(resp.StatusCode)
		err := copyBody(w, resp)
		if err == nil && gateway {
			err = errGateway
		}
		done(pk, err, start)
		return
	}
	backConn, ok := resp.Body.(io.ReadWriteCloser)
	if !ok {
		resp.Body.Close()
		rt.reportTry(e, breakerDone, true, true)
		done(pk, errors.New("101 without a writable body"), start)
		writeError(w, &proxyError{rt.cfg.Service, errors.New("upgrade failed")})
		return
	}
	defer backConn.Close()
	if got := httpwire.UpgradeType(resp.Header); got == "" || !strings.EqualFold(got, proto) {
		rt.reportTry(e, breakerDone, true, true)
		done(pk, fmt.Errorf("node switched to %q, not %q", got, proto), start)
		writeError(w, &proxyError{rt.cfg.Service, fmt.Errorf("node switched to protocol %q, want %q", got, proto)})
		return
	}
	rt.reportTry(e, breakerDone, false, false)

	conn, brw, err := http.NewResponseController(w).Hijack()
	if err != nil {
		// HTTP/2 clients cannot be hijacked; extended CONNECT is not served.
		done(pk, err, start)
		http.Error(w, "sidecar: upgrade needs an HTTP/1.1 connection", http.StatusHTTPVersionNotSupported)
		return
	}
	defer conn.Close()

	// Relay the 101 with the node's headers, Connection and Upgrade kept.
	resp.Body = nil
	resp.Header.Del("Content-Length")
	err = resp.Write(brw)
	if err == nil {
		err = brw.Flush()
	}
	if err != nil {
		done(pk, err, start)
		return
	}
	err = relayUpgraded(conn, brw.Reader, backConn, rt.cfg.Timeouts.Tunnel)
	done(pk, nil, start)
	if err != nil && !errors.Is(err, net.ErrClosed) {
		p.log.Debug("upgraded connection ended", zap.String("service", rt.cfg.Service),
			zap.String("endpoint", e.Addr), zap.Error(err))
	}
}

// errClientClosed ends an upgrade's tries when the client went away.
var errClientClosed = errors.New("client closed")

// upgradeTry is an upgrade handshake's side of the tryLoop: the handshake
// goes to one node, and the node that answers it keeps the connection. A
// handshake with a body is tried once.
type upgradeTry struct {
	out *http.Request

	// The node that answered, set by the try that ends the loop.
	resp        *http.Response
	e           *endpoint
	pk          balancer.Pick
	breakerDone func(error)
}

// attempt sends the handshake to e.
func (u *upgradeTry) attempt(l *tryLoop, e *endpoint, pk balancer.Pick, breakerDone func(error)) outcome {
	out := u.out
	out.URL.Host = e.Addr
	var resp *http.Response
	var err error
	if pools := e.currentPools(l.start); pools.fast != nil && out.Body == nil {
		resp, err = pools.fast.RoundTrip(out, nil, l.start)
	} else {
		resp, err = pools.h1.RoundTrip(out)
	}
	switch {
	case err == nil:
		u.resp, u.e, u.pk, u.breakerDone = resp, e, pk, breakerDone
		return outcome{verdict: tryDone}
	case out.Context().Err() != nil:
		// The client went away; not the node's doing.
		breakerDone(nil)
		release(pk)
		return outcome{verdict: tryDone, err: errClientClosed}
	case errors.Is(err, ErrLocalLimit):
		refuseTry(breakerDone, pk)
		return outcome{verdict: tryRefused, err: err}
	}
	l.rt.reportTry(e, breakerDone, true, true)
	done(pk, err, l.start)
	// Only a handshake that never reached a node goes to another.
	neverSent := isDialError(err) && out.Body == nil
	return outcome{verdict: tryFailed, err: err, reason: "connect_failed", allowed: neverSent, neverSent: true}
}

// relayUpgraded copies both ways between the app's connection (with the
// bytes the server read past the handshake in held) and the node's, until
// either side is done: WebSocket closes in-band, so one direction's end is
// the session's. When tunnel is above zero, both connections are closed
// once no byte has moved either way for that long. Over raw connections
// the copying is a relay loop's; otherwise it takes a goroutine per
// direction. It blocks until the session ends and both are closed.
func relayUpgraded(app net.Conn, held *bufio.Reader, node io.ReadWriteCloser, tunnel time.Duration) error {
	var last *atomic.Int64 // nil, so unstamped, without a tunnel timeout
	if tunnel > 0 {
		last = new(atomic.Int64)
		defer closeWhenIdle(tunnel, last, app, node).Stop()
	}
	ar, aPrefix := rawio.Beneath(app)
	nr, nHeld := rawio.Beneath(node)
	if ar != nil && nr != nil {
		aHeld, _ := held.Peek(held.Buffered())
		if len(aPrefix) > 0 {
			aHeld = append(append([]byte(nil), aHeld...), aPrefix...)
		}
		if pr, err := rawio.NewPair(ar, nr, aHeld, nHeld, false, last); err == nil {
			return pr.Wait()
		}
	}
	errc := make(chan error, 2)
	go func() {
		// Bytes the server read past the handshake come first.
		_, err := relay(node, io.LimitReader(held, int64(held.Buffered())), app, last)
		rawio.CloseWrite(node)
		errc <- err
	}()
	go func() {
		_, err := relay(app, nil, node, last)
		rawio.CloseWrite(app)
		errc <- err
	}()
	err := <-errc
	closeBoth(app, node)
	<-errc
	return err
}

// closeBoth closes a and b at once: a relay blocked writing to one holds a
// read on the other (rawio.Conn.RelayTo), and a Close waits for that read,
// but closing the first wakes the blocked write. It returns when both are
// closed.
func closeBoth(a, b io.Closer) {
	closed := make(chan struct{})
	go func() {
		a.Close()
		close(closed)
	}()
	b.Close()
	<-closed
}

// An idleCloser closes two relayed connections once nothing has moved
// between them for a while (closeWhenIdle).
type idleCloser struct {
	d    time.Duration
	last *atomic.Int64
	a, b io.Closer

	mu      sync.Mutex // taken once per d, never per transfer
	t       *time.Timer
	stopped bool // by Stop, or by the close
}

// closeWhenIdle closes a and b once no byte has moved between them for d,
// as last tells: the relay between them stamps it with the time of every
// transfer, and closeWhenIdle stamps it now. The relay pays nothing but
// the stamps; the timer wakes about once per d, not per transfer. Stop the
// idleCloser when the relay ends. A d of zero or less never closes.
func closeWhenIdle(d time.Duration, last *atomic.Int64, a, b io.Closer) *idleCloser {
	ic := &idleCloser{d: d, last: last, a: a, b: b}
	if d <= 0 {
		return ic
	}
	last.Store(time.Now().UnixNano())
	ic.mu.Lock()
	ic.t = time.AfterFunc(d, ic.fire)
	ic.mu.Unlock()
	return ic
}

func (ic *idleCloser) fire() {
	ic.mu.Lock()
	if ic.stopped {
		ic.mu.Unlock()
		return
	}
	if since := time.Since(time.Unix(0, ic.last.Load())); since < ic.d {
		ic.t.Reset(ic.d - since)
		ic.mu.Unlock()
		return
	}
	ic.stopped = true
	ic.mu.Unlock()
	closeBoth(ic.a, ic.b)
}

// Stop keeps the connections from being closed for idleness from now on.
// It does not wait for a close already under way. It is safe to call
// concurrently with the timer, and more than once.
func (ic *idleCloser) Stop() {
	ic.mu.Lock()
	defer ic.mu.Unlock()
	ic.stopped = true
	if ic.t != nil {
		ic.t.Stop()
	}
}

// relay copies held, then src, to dst until src ends, stamping last (when
// not nil) with the time of every transfer. When src is a raw connection
// underneath (rawio.Beneath; what it holds goes first), the copy runs in
// rawio.Conn.RelayTo, with raw calls at any load; otherwise it is a plain
// read-write loop. It returns the bytes it read from held and src.
func relay(dst io.Writer, held io.Reader, src io.Reader, last *atomic.Int64) (total int64, err error) {
	bp := bufPool.Get().(*[]byte)
	defer bufPool.Put(bp)
	buf := *bp
	if held != nil {
		n, err := io.CopyBuffer(dst, held, buf)
		if total += n; err != nil {
			return total, err
		}
	}
	if rc, pending := rawio.Beneath(src); rc != nil {
		// What src read already goes first; src is not read again.
		if len(pending) > 0 {
			n, err := dst.Write(pending)
			if total += int64(n); err != nil {
				return total, err
			}
		}
		n, err := rc.RelayTo(dst, buf, last)
		return total + n, err
	}
	for {
		n, err := src.Read(buf)
		if n > 0 {
			if last != nil {
				last.Store(time.Now().UnixNano())
			}
			if _, werr := dst.Write(buf[:n]); werr != nil {
				return total, werr
			}
			total += int64(n)
		}
		if err == io.EOF {
			return total, nil
		}
		if err != nil {
			return total, err
		}
	}
}
