package proxy

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"net"
	"net/http"
	"os"
	"time"

	"go.uber.org/zap"

	"github.com/sidecarlb/sidecar/config"
	"github.com/sidecarlb/sidecar/internal/backoff"
	"github.com/sidecarlb/sidecar/internal/h1"
	"github.com/sidecarlb/sidecar/internal/h2"
	"github.com/sidecarlb/sidecar/internal/rawio"
	"github.com/sidecarlb/sidecar/internal/replay"
)

// useH1Pool sends plain HTTP/1.1 requests that qualify (see h1.Qualifies)
// over an h1.Pool instead of the endpoint's http.Transport.
const useH1Pool = true

// useH2Pool sends plaintext HTTP/2 to nodes over the sidecar's own h2c
// client (h2.Pool) rather than net/http's Transport, which stays in use for
// h2 over TLS.
const useH2Pool = true

// pools are the connection pools of one endpoint: HTTP/1.1 keep-alive and
// HTTP/2 (h2c, or h2 over TLS). They are replaced when they reach their
// maximum age, so long-lived connections are renewed now and then.
type pools struct {
	h1, h2  *http.Transport // h2 is nil when h2c goes over h2c
	fast    *h1.Pool        // plain-text HTTP/1.1 fast path; nil over TLS
	h2c     *h2.Pool        // plain-text HTTP/2; nil over TLS
	expires int64           // unix nanoseconds; 0: never
}

// poolConfig is what an endpoint's pools are built from.
type poolConfig struct {
	timeouts Timeouts
	tls      *tls.Config // nil: plaintext
	log      *zap.Logger // the route's; nil logs nothing
	// meshH1 and meshH2, for a mesh node (mesh.go), put every new
	// connection under mTLS in the dial, ALPN http/1.1 (none for tcp) and
	// h2; the engines above speak as over plaintext. Both nil otherwise.
	meshH1, meshH2 *tls.Config
	// pingAfter and pingTimeout go to the h2c pool's SetPing; zero: h2's
	// defaults.
	pingAfter, pingTimeout time.Duration
}

// newPools returns an endpoint's pools, whose connections count against
// lim (nil: no limits).
func newPools(c *poolConfig, lim *nodeLimits, now time.Time) *pools {
	p := &pools{h1: newTransport(c, false, lim)}
	if useH1Pool && c.tls == nil {
		p.fast = h1.NewPool(c.timeouts.Connect, c.timeouts.Idle, lim)
		if c.meshH1 != nil {
			p.fast.Handshake = handshaker(c.meshH1, c.timeouts.Connect)
		}
	}
	if useH2Pool && c.tls == nil && c.meshH1 == nil {
		p.h2c = h2.NewPool(c.timeouts.Connect, c.timeouts.Idle, lim, c.log)
		p.h2c.SetPing(c.pingAfter, c.pingTimeout)
	} else {
		p.h2 = newTransport(c, true, lim)
	}
	if age := c.timeouts.MaxConnectionAge; age > 0 {
		// ±10% jitter, so the pools of many endpoints do not renew together.
		p.expires = now.Add(backoff.Jitter(age, 0.1)).UnixNano()
	}
	return p
}

func (p *pools) closeIdle() {
	p.h1.CloseIdleConnections()
	if p.h2 != nil {
		p.h2.CloseIdleConnections()
	}
	if p.fast != nil {
		p.fast.CloseIdle()
	}
	if p.h2c != nil {
		p.h2c.CloseIdle()
	}
}

// roundTrip sends out to the endpoint over HTTP/2 or HTTP/1.1; b is out's
// body as roundTrip's tries share it, or nil. Plain HTTP/1.1 requests that
// qualify take the fast path of h1.Pool.
func (e *endpoint) roundTrip(h2 bool, out *http.Request, b *replay.Body, now time.Time) (*http.Response, error) {
	p := e.currentPools(now)
	switch {
	case h2 && p.h2c != nil:
		return p.h2c.RoundTrip(out)
	case h2:
		return p.h2.RoundTrip(out)
	case p.fast != nil:
		var hb h1.Body // nil, rather than a nil *replay.Body
		if b != nil {
			hb = b
		}
		if h1.Qualifies(out, hb) {
			return p.fast.RoundTrip(out, hb, now)
		}
	}
	return p.h1.RoundTrip(out)
}

// currentPools returns the endpoint's pools, renewing them first when they
// are past their age. Requests in flight on the old pools finish: their
// connections close once idle.
func (e *endpoint) currentPools(now time.Time) *pools {
	p := e.pools.Load()
	if p.expires != 0 && now.UnixNano() > p.expires {
		if next := newPools(e.poolConfig, e.limits, now); e.pools.CompareAndSwap(p, next) {
			drain(p, e.poolConfig.timeouts.Request)
			p = next
		} else {
			p = e.pools.Load()
		}
	}
	return p
}

// drain closes the idle connections of pools no longer used, now and again
// after the streams in flight on them have had time to end.
func drain(p *pools, grace time.Duration) {
	if p.fast != nil {
		p.fast.Retire() // busy connections close when their exchange ends
	}
	if p.h2c != nil {
		p.h2c.Retire() // connections close when their last stream ends
	}
	p.closeIdle()
	if grace <= 0 {
		grace = 30 * time.Second
	}
	time.AfterFunc(grace, p.closeIdle)
	time.AfterFunc(4*grace, p.closeIdle)
}

// newTransport returns one connection pool: HTTP/1.1, or HTTP/2 when h2 is
// set (h2c with prior knowledge in plaintext, ALPN h2 over TLS). Its
// connections count against lim's max_connections: a dial at the limit
// waits for a slot (the Transport meanwhile hands the request a connection
// that comes back idle, if one does), then fails with ErrLocalLimit.
func newTransport(c *poolConfig, h2 bool, lim *nodeLimits) *http.Transport {
	t := c.timeouts
	d := &net.Dialer{Timeout: t.Connect, KeepAlive: 30 * time.Second}
	mesh := c.meshH1
	if h2 {
		mesh = c.meshH2
	}
	tr := &http.Transport{
		DialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
			if err := lim.acquireConn(ctx, t.Connect); err != nil {
				return nil, err
			}
			c, err := d.DialContext(ctx, network, addr)
			if err != nil {
				lim.endConn()
				return nil, err
			}
			c = rawio.Wrap(c)
			if mesh != nil {
				tc, err := meshHandshake(ctx, c, mesh, addr, t.Connect)
				if err != nil {
					lim.endConn()
					return nil, err
				}
				lim.attach(c) // closing tc closes c
				return tc, nil
			}
			lim.attach(c)
			return c, nil
		},
		MaxIdleConnsPerHost: 1024,
		IdleConnTimeout:     t.Idle,
		// The app negotiates encoding with the node; the proxy adds none.
		DisableCompression:     true,
		MaxResponseHeaderBytes: 1 << 20,
		WriteBufferSize:        32 << 10,
		ReadBufferSize:         32 << 10,
		TLSHandshakeTimeout:    t.Connect,
	}
	tr.Protocols = new(http.Protocols)
	switch {
	case c.tls != nil && h2:
		tr.TLSClientConfig = c.tls.Clone()
		tr.Protocols.SetHTTP2(true)
	case c.tls != nil:
		tr.TLSClientConfig = c.tls.Clone()
		tr.Protocols.SetHTTP1(true)
	case h2:
		tr.Protocols.SetUnencryptedHTTP2(true)
	default:
		tr.Protocols.SetHTTP1(true)
	}
	if h2 {
		tr.HTTP2 = &http.HTTP2Config{
			// Ping a connection silent this long; drop it if unanswered.
			SendPingTimeout: 30 * time.Second,
			PingTimeout:     10 * time.Second,
		}
	}
	return tr
}

// clientTLS builds the TLS client configuration of an upstream, or nil for
// plaintext.
func clientTLS(c *config.TLS) (*tls.Config, error) {
	if c == nil {
		return nil, nil
	}
	conf := &tls.Config{
		ServerName:         c.ServerName,
		InsecureSkipVerify: c.InsecureSkipVerify, //nolint:gosec // the operator's explicit choice
		MinVersion:         tls.VersionTLS12,
	}
	if c.CAFile != "" {
		pem, err := os.ReadFile(c.CAFile)
		if err != nil {
			return nil, fmt.Errorf("tls.ca_file: %w", err)
		}
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM(pem) {
			return nil, fmt.Errorf("tls.ca_file: no PEM certificates in %s", c.CAFile)
		}
		conf.RootCAs = pool
	}
	return conf, nil
}
