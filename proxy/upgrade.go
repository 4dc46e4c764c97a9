package proxy

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"sync/atomic"
	"time"

	"go.uber.org/zap"
)

// serveUpgrade carries a protocol upgrade (WebSocket): the node is picked
// once for the connection, the handshake is forwarded, and after a 101 both
// directions are copied until either side closes.
func (p *Proxy) serveUpgrade(w http.ResponseWriter, r *http.Request, rt *route, proto string, start time.Time) {
	m := &rt.metrics
	key, hasKey := rt.key.sum(r)
	e, pk, err := rt.pick(r.Context(), key, hasKey, nil)
	if err != nil {
		_, code := classify(err)
		m.refused(code)
		writeError(w, err)
		return
	}
	prepareOutbound(r, rt)
	out := r.WithContext(r.Context())
	out.URL.Host = e.Addr
	out.Header["Connection"] = []string{"Upgrade"}
	out.Header["Upgrade"] = []string{proto}
	out.Body = nil
	if r.ContentLength != 0 {
		out.Body = r.Body
	}

	var resp *http.Response
	if pools := e.currentPools(start); pools.fast != nil && out.Body == nil {
		resp, err = pools.fast.roundTrip(out, nil, start)
	} else {
		resp, err = pools.h1.RoundTrip(out)
	}
	if err != nil {
		done(pk, err, start)
		_, code := classify(err)
		m.refused(code)
		writeError(w, &proxyError{rt.cfg.Service, err})
		return
	}
	e.requests[codeClass(resp.StatusCode)].Inc()
	if resp.StatusCode != http.StatusSwitchingProtocols {
		// Refused handshake: relay the answer as it is.
		defer resp.Body.Close()
		copyResponseHeader(w.Header(), resp)
		w.WriteHeader(resp.StatusCode)
		err := copyBody(w, resp)
		done(pk, err, start)
		return
	}
	backConn, ok := resp.Body.(io.ReadWriteCloser)
	if !ok {
		resp.Body.Close()
		done(pk, errors.New("101 without a writable body"), start)
		writeError(w, &proxyError{rt.cfg.Service, errors.New("upgrade failed")})
		return
	}
	defer backConn.Close()
	if got := upgradeType(resp.Header); got == "" || !strings.EqualFold(got, proto) {
		done(pk, fmt.Errorf("node switched to %q, not %q", got, proto), start)
		writeError(w, &proxyError{rt.cfg.Service, fmt.Errorf("node switched to protocol %q, want %q", got, proto)})
		return
	}

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
	err = relayUpgraded(conn, brw.Reader, backConn)
	done(pk, nil, start)
	if err != nil && !errors.Is(err, net.ErrClosed) {
		p.log.Debug("upgraded connection ended", zap.String("service", rt.cfg.Service),
			zap.String("endpoint", e.Addr), zap.Error(err))
	}
}

// relayUpgraded copies both ways between the app's connection (with the
// bytes the server read past the handshake in held) and the node's, until
// either side is done: WebSocket closes in-band, so one direction's end is
// the session's. Over raw connections the copying is a relay loop's;
// otherwise it takes a goroutine per direction.
func relayUpgraded(app net.Conn, held *bufio.Reader, node io.ReadWriteCloser) error {
	ar, aPrefix := rawBeneath(app)
	nr, nHeld := rawBeneath(node)
	if ar != nil && nr != nil {
		aHeld, _ := held.Peek(held.Buffered())
		if len(aPrefix) > 0 {
			aHeld = append(append([]byte(nil), aHeld...), aPrefix...)
		}
		if pr, err := newRelayPair(ar, nr, aHeld, nHeld, false, nil); err == nil {
			return pr.wait()
		}
	}
	errc := make(chan error, 2)
	go func() {
		// Bytes the server read past the handshake come first.
		err := relay(node, io.LimitReader(held, int64(held.Buffered())), app, nil)
		closeWrite(node)
		errc <- err
	}()
	go func() {
		err := relay(app, nil, node, nil)
		closeWrite(app)
		errc <- err
	}()
	err := <-errc
	// Both close at once: a relay blocked writing to one connection holds
	// a read on the other (rawConn.relayTo), and a Close waits for that
	// read, but closing the first wakes the blocked write.
	closed := make(chan struct{})
	go func() {
		app.Close()
		close(closed)
	}()
	node.Close()
	<-closed
	<-errc
	return err
}

// relay copies held, then src, to dst until src ends, stamping last (when
// not nil) with the time of every transfer. When src is a raw connection
// underneath (rawBeneath; what it holds goes first), the copy runs in
// rawConn.relayTo, with raw calls at any load; otherwise it is a plain
// read-write loop.
func relay(dst io.Writer, held io.Reader, src io.Reader, last *atomic.Int64) error {
	bp := bufPool.Get().(*[]byte)
	defer bufPool.Put(bp)
	buf := *bp
	if held != nil {
		if _, err := io.CopyBuffer(dst, held, buf); err != nil {
			return err
		}
	}
	if rc, pending := rawBeneath(src); rc != nil {
		// What src read already goes first; src is not read again.
		if len(pending) > 0 {
			if _, err := dst.Write(pending); err != nil {
				return err
			}
		}
		return rc.relayTo(dst, buf, last)
	}
	for {
		n, err := src.Read(buf)
		if n > 0 {
			if last != nil {
				last.Store(time.Now().UnixNano())
			}
			if _, werr := dst.Write(buf[:n]); werr != nil {
				return werr
			}
		}
		if err == io.EOF {
			return nil
		}
		if err != nil {
			return err
		}
	}
}

// closeWrite half-closes c when it can, so the peer sees EOF while the other
// direction goes on.
func closeWrite(c any) {
	if cw, ok := c.(interface{ CloseWrite() error }); ok {
		_ = cw.CloseWrite()
	}
}
