package mesh

import (
	"bytes"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"runtime/debug"
	"strings"
	"sync"
	"time"

	"go.uber.org/zap"
	"golang.org/x/net/http2"
	"golang.org/x/net/netutil"

	"github.com/sidecarlb/sidecar/internal/rawio"
)

// Modes of security.mtls that run an inbound listener with TLS.
const (
	ModeStrict     = "strict"
	ModePermissive = "permissive"
	ModeOff        = "off"
)

// MetaKey is the service meta key an instance with an inbound listener
// registers, valued with its mode (strict or permissive), so that outbound
// sidecars know to dial it with mTLS.
const MetaKey = "sidecar-mtls"

// tlsRecordHandshake is the first byte of a TLS ClientHello record.
const tlsRecordHandshake = 0x16

// InboundOptions configure an Inbound.
type InboundOptions struct {
	// Mode is strict (mTLS only), permissive (mTLS, or plaintext when the
	// first byte is not a TLS handshake) or off (plaintext relay only).
	Mode string
	// App is the app's host:port, usually on loopback.
	App string
	// Identity and Authorizer are required unless Mode is off.
	Identity   *Identity
	Authorizer *Authorizer
	// HandshakeTimeout bounds the wait for the first byte and the TLS
	// handshake; if zero, 10s is used.
	HandshakeTimeout time.Duration
	// DialTimeout bounds the dial to the app; if zero, 1s is used.
	DialTimeout time.Duration
	// DenyTimeout bounds the wait for a denied caller's first bytes,
	// which say whether it is answered 403 or just closed, and then how
	// long a denied h2 connection is answered before it is closed; if
	// zero, 1s.
	DenyTimeout time.Duration
	// MaxConnections caps the connections open at once on each listener
	// served; past it, Accept waits for one to close, and new callers
	// wait in the kernel's backlog. Zero: no cap.
	MaxConnections int
	Metrics        *Metrics
}

// Inbound is the listener in front of the app. Serve it with Serve; stop
// it with Shutdown. Safe for concurrent use.
type Inbound struct {
	opts InboundOptions
	tls  *tls.Config
	log  *zap.Logger

	ctx    context.Context // ends when Shutdown gives up waiting
	cancel context.CancelFunc

	mu    sync.Mutex
	lns   map[net.Listener]struct{}
	shut  bool // Shutdown began: a Serve that starts now returns at once
	conns map[*liveConn]struct{}
	wg    sync.WaitGroup // accept loops and connection handlers
}

// liveConn is one relayed connection, for the recheck of intentions.
type liveConn struct {
	caller string // SPIFFE URI; empty for plaintext
	remote string
	close  func()
}

// NewInbound returns an inbound listener's server.
func NewInbound(opts InboundOptions, log *zap.Logger) (*Inbound, error) {
	switch opts.Mode {
	case ModeStrict, ModePermissive:
		if opts.Identity == nil || opts.Authorizer == nil {
			return nil, errors.New("inbound: mode " + opts.Mode + " needs an identity and an authorizer")
		}
	case ModeOff:
	default:
		return nil, fmt.Errorf("inbound: unknown mode %q", opts.Mode)
	}
	if opts.HandshakeTimeout <= 0 {
		opts.HandshakeTimeout = 10 * time.Second
	}
	if opts.DialTimeout <= 0 {
		opts.DialTimeout = time.Second
	}
	if opts.DenyTimeout <= 0 {
		opts.DenyTimeout = time.Second
	}
	in := &Inbound{opts: opts, log: log, lns: map[net.Listener]struct{}{}, conns: map[*liveConn]struct{}{}}
	if opts.Identity != nil {
		in.tls = opts.Identity.ServerTLS()
	}
	in.ctx, in.cancel = context.WithCancel(context.Background())
	return in, nil
}

// Serve accepts connections on ln until ln is closed (by Shutdown), and
// returns nil then. While it runs, the callers of open connections are
// authorized again every Authorizer TTL, and the connections of a caller
// now denied are closed.
func (in *Inbound) Serve(ln net.Listener) error {
	in.mu.Lock()
	if in.shut {
		in.mu.Unlock()
		_ = ln.Close()
		return nil
	}
	if in.opts.MaxConnections > 0 {
		// Shutdown closes the wrapper: that also ends an Accept waiting
		// for a slot, and closes ln.
		ln = netutil.LimitListener(ln, in.opts.MaxConnections)
	}
	in.lns[ln] = struct{}{}
	in.wg.Add(1) // the accept loop: Shutdown waits for it too
	in.mu.Unlock()
	defer in.wg.Done()
	rctx, stop := context.WithCancel(in.ctx)
	recheckDone := make(chan struct{})
	go func() { defer close(recheckDone); in.recheck(rctx) }()
	defer func() { stop(); <-recheckDone }()
	var failures int
	for {
		c, err := ln.Accept()
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return nil
			}
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() || errors.Is(err, syscallEMFILE) {
				failures++
				time.Sleep(min(time.Duration(failures)*5*time.Millisecond, time.Second))
				continue
			}
			return err
		}
		failures = 0
		in.wg.Add(1)
		go func() {
			defer in.wg.Done()
			defer func() {
				if r := recover(); r != nil {
					in.log.Error("inbound connection panicked", zap.Any("panic", r), zap.ByteString("stack", debug.Stack()))
					_ = c.Close()
				}
			}()
			in.handle(c)
		}()
	}
}

// Shutdown closes the listeners, waits for open connections to end until
// ctx is done, then closes them.
func (in *Inbound) Shutdown(ctx context.Context) error {
	in.mu.Lock()
	in.shut = true
	for ln := range in.lns {
		_ = ln.Close()
	}
	in.mu.Unlock()
	done := make(chan struct{})
	go func() { in.wg.Wait(); close(done) }()
	select {
	case <-done:
		in.cancel()
		return nil
	case <-ctx.Done():
	}
	in.cancel()
	in.mu.Lock()
	for lc := range in.conns {
		lc.close()
	}
	in.mu.Unlock()
	<-done
	return ctx.Err()
}

// handle serves one accepted connection: sniff, terminate TLS, authorize,
// relay.
func (in *Inbound) handle(c net.Conn) {
	remote := c.RemoteAddr().String()
	_ = c.SetDeadline(time.Now().Add(in.opts.HandshakeTimeout))
	var first [1]byte
	if _, err := io.ReadFull(c, first[:]); err != nil {
		_ = c.Close()
		return
	}
	pc := &prefixConn{Conn: c, pre: first[:]}
	if first[0] != tlsRecordHandshake || in.opts.Mode == ModeOff {
		if in.opts.Mode == ModeStrict {
			in.opts.Metrics.accepted("refused_plaintext")
			in.log.Debug("plaintext refused", zap.String("remote", remote))
			_ = c.Close()
			return
		}
		in.opts.Metrics.accepted("plaintext")
		_ = c.SetDeadline(time.Time{})
		in.relay(pc, "", remote)
		return
	}
	tc := tls.Server(pc, in.tls)
	hctx, cancel := context.WithTimeout(in.ctx, in.opts.HandshakeTimeout)
	err := tc.HandshakeContext(hctx)
	cancel()
	if err != nil {
		in.opts.Metrics.accepted("handshake_failed")
		in.log.Debug("inbound handshake failed", zap.String("remote", remote), zap.Error(err))
		_ = c.Close()
		return
	}
	in.opts.Metrics.accepted("mtls")
	_, caller, err := CallerID(tc.ConnectionState())
	if err != nil { // ServerTLS verified it; kept for safety
		_ = tc.Close()
		return
	}
	// The wait for the agent is bounded; no answer refuses (fail closed).
	actx, cancel := context.WithTimeout(in.ctx, in.opts.HandshakeTimeout)
	d := in.opts.Authorizer.Decide(actx, caller)
	cancel()
	if in.ctx.Err() != nil { // shutting down: no decision to count
		_ = tc.Close()
		return
	}
	in.opts.Authorizer.Record(caller, remote, d)
	if !d.Allowed {
		in.deny(tc, d)
		return
	}
	_ = c.SetDeadline(time.Time{})
	in.relay(tc, caller, remote)
}

// deny answers a denied caller in its protocol where its first bytes show
// one: HTTP/1.1 gets a 403, h2 a 403 per stream (gRPC: status 7,
// PERMISSION_DENIED); anything else, or silence for DenyTimeout, is closed.
func (in *Inbound) deny(tc *tls.Conn, d Decision) {
	defer tc.Close()
	msg := "denied by intention"
	if d.Reason != "" {
		msg += ": " + d.Reason
	}
	_ = tc.SetDeadline(time.Now().Add(in.opts.DenyTimeout))
	preface := []byte(http2.ClientPreface)
	buf := make([]byte, len(preface))
	n, _ := io.ReadAtLeast(tc, buf, 4)
	buf = buf[:n]
	switch {
	case n >= 4 && bytes.HasPrefix(preface, buf[:4]):
		rest := make([]byte, len(preface)-n)
		if _, err := io.ReadFull(tc, rest); err != nil {
			return
		}
		// The denied connection lives for DenyTimeout, not for as long as
		// the caller keeps it: a caller allowed later must dial again to
		// be asked again, as relayed connections are re-checked.
		_ = tc.SetDeadline(time.Now().Add(in.opts.DenyTimeout))
		// x/net's ServeConn is the one API that serves h2 on a connection
		// already sniffed (STYLE.md); net/http has none.
		h2 := &http2.Server{} //lint:ignore SA1019 ServeConn on a sniffed connection, as above
		//lint:ignore SA1019 ServeConn on a sniffed connection, as above
		h2.ServeConn(&prefixConn{Conn: tc, pre: append(buf, rest...)}, &http2.ServeConnOpts{
			Context: in.ctx,
			Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				if strings.HasPrefix(r.Header.Get("Content-Type"), "application/grpc") {
					w.Header().Set("Content-Type", "application/grpc")
					w.Header().Set("Grpc-Status", "7")
					w.Header().Set("Grpc-Message", msg)
					w.WriteHeader(http.StatusOK)
					return
				}
				http.Error(w, msg, http.StatusForbidden)
			}),
		})
	case n > 0 && looksLikeHTTP1(buf):
		body := msg + "\n"
		_, _ = fmt.Fprintf(tc, "HTTP/1.1 403 Forbidden\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s", len(body), body)
	}
}

// looksLikeHTTP1 reports whether b starts like an HTTP/1 request line: an
// upper-case method token followed by a space, or the start of one.
func looksLikeHTTP1(b []byte) bool {
	for i, ch := range b {
		switch {
		case ch == ' ' && i > 0:
			return true
		case ch < 'A' || ch > 'Z':
			return false
		}
	}
	return true
}

// relay dials the app and copies bytes both ways until both sides are
// done, passing half-closes on.
func (in *Inbound) relay(client net.Conn, caller, remote string) {
	app, err := net.DialTimeout("tcp", in.opts.App, in.opts.DialTimeout)
	if err != nil {
		in.log.Warn("dial app failed", zap.String("app", in.opts.App), zap.String("remote", remote), zap.Error(err))
		_ = client.Close()
		return
	}
	var once sync.Once
	closeBoth := func() { once.Do(func() { _ = client.Close(); _ = app.Close() }) }
	lc := &liveConn{caller: caller, remote: remote, close: closeBoth}
	in.mu.Lock()
	in.conns[lc] = struct{}{}
	in.mu.Unlock()
	defer func() {
		in.mu.Lock()
		delete(in.conns, lc)
		in.mu.Unlock()
		closeBoth()
	}()
	done := make(chan struct{})
	go func() {
		defer close(done)
		if _, err := io.Copy(app, client); err != nil {
			closeBoth()
			return
		}
		_ = rawio.CloseWrite(app)
	}()
	if _, err := io.Copy(client, app); err != nil {
		closeBoth()
	} else {
		_ = rawio.CloseWrite(client)
	}
	<-done
}

// recheck authorizes the callers of open connections every TTL and closes
// the connections of those now denied, so that a deny reaches keep-alive
// connections too.
func (in *Inbound) recheck(ctx context.Context) {
	if in.opts.Authorizer == nil {
		return
	}
	t := time.NewTicker(in.opts.Authorizer.TTL())
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		in.mu.Lock()
		byCaller := map[string][]*liveConn{}
		for lc := range in.conns {
			if lc.caller != "" {
				byCaller[lc.caller] = append(byCaller[lc.caller], lc)
			}
		}
		in.mu.Unlock()
		for caller, conns := range byCaller {
			// A round waits at most a TTL for each answer; no answer
			// leaves the connections as they are.
			dctx, cancel := context.WithTimeout(ctx, in.opts.Authorizer.TTL())
			d := in.opts.Authorizer.Decide(dctx, caller)
			cancel()
			if d.Allowed || d.Unanswered || ctx.Err() != nil {
				continue
			}
			for _, lc := range conns {
				in.opts.Authorizer.Record(caller, lc.remote, d)
				lc.close()
			}
		}
	}
}

// Open returns the number of relayed connections, for /status.
func (in *Inbound) Open() int {
	in.mu.Lock()
	defer in.mu.Unlock()
	return len(in.conns)
}

// prefixConn is a net.Conn whose first reads return pre.
type prefixConn struct {
	net.Conn
	pre []byte
}

func (p *prefixConn) Read(b []byte) (int, error) {
	if len(p.pre) > 0 {
		n := copy(b, p.pre)
		p.pre = p.pre[n:]
		return n, nil
	}
	return p.Conn.Read(b)
}

// CloseWrite half-closes the underlying connection, when it can.
func (p *prefixConn) CloseWrite() error { return rawio.CloseWrite(p.Conn) }

// NodeMTLS reports whether a node with service meta meta serves an inbound
// listener with mTLS (strict or permissive), so that an outbound sidecar
// dials it with ClientTLS.
func NodeMTLS(meta map[string]string) bool {
	switch meta[MetaKey] {
	case ModeStrict, ModePermissive:
		return true
	}
	return false
}
