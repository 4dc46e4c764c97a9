package heartbeat

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"strings"
	"time"
)

// Prober checks the local app once.
//
// Probe returns a short description of what it saw ("GET http://…: 200 OK")
// when the app is healthy, and an error whose message says why it is not
// ("GET http://…: 500 Internal Server Error") otherwise; either text becomes
// the output of the Consul check. Probe may block, but must return promptly
// once ctx is done. The Registrar never calls Probe concurrently with itself.
type Prober interface {
	Probe(ctx context.Context) (output string, err error)
}

// ProberFunc adapts a function to the Prober interface.
type ProberFunc func(ctx context.Context) (string, error)

// Probe calls f(ctx).
func (f ProberFunc) Probe(ctx context.Context) (string, error) { return f(ctx) }

// maxBody is how much of an unhealthy response body is quoted in the output.
const maxBody = 256

// HTTPProbe returns a Prober that sends GET url and passes on any 2xx answer.
// Each probe gives up after timeout; if timeout is zero, only the deadline of
// the context passed to Probe applies. Redirects are followed; proxies from
// the environment are not used and connections are not kept alive, so each
// probe sees the app as a new client would.
func HTTPProbe(url string, timeout time.Duration) Prober {
	return &httpProbe{
		url:     url,
		timeout: timeout,
		client: &http.Client{Transport: &http.Transport{
			DialContext:       (&net.Dialer{}).DialContext,
			DisableKeepAlives: true,
		}},
	}
}

type httpProbe struct {
	url     string
	timeout time.Duration
	client  *http.Client
}

func (p *httpProbe) String() string { return "HTTP GET " + p.url }

func (p *httpProbe) Probe(ctx context.Context) (string, error) {
	if p.timeout > 0 {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, p.timeout)
		defer cancel()
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, p.url, nil)
	if err != nil {
		return "", fmt.Errorf("GET %s: %w", p.url, err)
	}
	req.Header.Set("User-Agent", "sidecar-heartbeat")
	resp, err := p.client.Do(req)
	if err != nil {
		// *url.Error repeats the method and URL in its own style; keep ours.
		var uerr *url.Error
		if errors.As(err, &uerr) {
			err = uerr.Err
		}
		return "", fmt.Errorf("GET %s: %w", p.url, err)
	}
	defer resp.Body.Close()
	out := fmt.Sprintf("GET %s: %s", p.url, resp.Status)
	if resp.StatusCode >= 200 && resp.StatusCode <= 299 {
		return out, nil
	}
	body, _ := io.ReadAll(io.LimitReader(resp.Body, maxBody))
	if b := strings.TrimSpace(string(body)); b != "" {
		out += ": " + b
	}
	return "", errors.New(out)
}

// TCPProbe returns a Prober that passes when a TCP connection to addr
// ("host:port") can be opened; the connection is closed at once. Each probe
// gives up after timeout; if timeout is zero, only the deadline of the
// context passed to Probe applies.
func TCPProbe(addr string, timeout time.Duration) Prober {
	return &tcpProbe{addr: addr, dialer: net.Dialer{Timeout: timeout}}
}

type tcpProbe struct {
	addr   string
	dialer net.Dialer
}

func (p *tcpProbe) String() string { return "TCP connect " + p.addr }

func (p *tcpProbe) Probe(ctx context.Context) (string, error) {
	conn, err := p.dialer.DialContext(ctx, "tcp", p.addr)
	if err != nil {
		return "", err // "dial tcp 127.0.0.1:8080: connect: connection refused"
	}
	conn.Close()
	return "TCP connect " + p.addr + ": ok", nil
}
