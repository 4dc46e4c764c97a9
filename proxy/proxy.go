// Package proxy carries the app's outbound requests to healthy nodes: one
// listener per configured upstream, and a forward-proxy listener where the
// request's host names the service.
package proxy

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"sort"
	"strconv"
	"sync"
	"time"

	"go.uber.org/zap"

	"github.com/sidecarlb/sidecar/balancer"
	"github.com/sidecarlb/sidecar/config"
	"github.com/sidecarlb/sidecar/discovery"
)

// Resolver finds the watched endpoint set of a service. *discovery.Cache
// satisfies it. Both methods are called on every request and must be cheap
// once a service is known; they may block on a service's first lookup.
type Resolver interface {
	Watch(ctx context.Context, service string) (*discovery.Watch, error)
	Known(ctx context.Context, service string) (bool, error)
}

// RouteConfig says how requests for a service are carried.
type RouteConfig struct {
	Service string
	// Protocol is "http" (the default; gRPC calls still go over h2c),
	// "http2" or "grpc" (nodes reached over h2c), or "tcp".
	Protocol string
	// Balancer is a balancer name; if empty, round_robin is used.
	Balancer string
	// HashKey is the hash balancer's key: header:NAME, cookie:NAME,
	// query:NAME, path or client_ip.
	HashKey string
	// Tags keeps only the endpoints carrying all of them.
	Tags []string
	// PreserveHost forwards the client's Host header instead of the
	// endpoint's host:port.
	PreserveHost bool
	Timeouts     Timeouts
	// TLS, when not nil, reaches the nodes over TLS.
	TLS *config.TLS
	// Resilience configures breakers, outlier ejection, retries and slow
	// start. Its zero value turns all of them off; config.Load fills in
	// the documented defaults.
	Resilience config.Resilience
}

// Timeouts bound the phases of a proxied request.
type Timeouts struct {
	// Connect bounds dialling a node; if zero, 1s is used.
	Connect time.Duration
	// Request bounds the whole exchange with a node; zero means none.
	Request time.Duration
	// Idle is how long an unused keep-alive connection to a node is kept;
	// if zero, 90s is used.
	Idle time.Duration
	// MaxConnectionAge renews an endpoint's connections this often (±10%),
	// draining the old ones; zero keeps them as long as they work.
	MaxConnectionAge time.Duration
}

func (t Timeouts) withDefaults() Timeouts {
	if t.Connect <= 0 {
		t.Connect = time.Second
	}
	if t.Idle <= 0 {
		t.Idle = 90 * time.Second
	}
	return t
}

// Proxy builds the handlers of the proxy listeners and keeps their routes.
type Proxy struct {
	resolver Resolver
	log      *zap.Logger
	metrics  *Metrics

	mu     sync.Mutex
	routes []*route // for Status, in creation order
}

// New returns a Proxy resolving services with resolver. If metrics is nil,
// metrics are kept but not exported.
func New(resolver Resolver, metrics *Metrics, log *zap.Logger) *Proxy {
	if metrics == nil {
		metrics = NewMetrics(nil)
	}
	return &Proxy{resolver: resolver, log: log, metrics: metrics}
}

// Upstream returns the handler of a per-upstream listener: every request on
// it goes to cfg.Service.
func (p *Proxy) Upstream(listener string, cfg RouteConfig) (http.Handler, error) {
	cfg.Timeouts = cfg.Timeouts.withDefaults()
	rt, err := newRoute(listener, cfg, p.resolver, p.metrics, p.log)
	if err != nil {
		return nil, fmt.Errorf("upstream %q on %s: %w", cfg.Service, listener, err)
	}
	p.addRoute(rt)
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		p.serve(w, r, rt)
	}), nil
}

// Forward returns the handler of the forward-proxy listener: the request's
// host names the service, and defaults (less its Service) says how to carry
// it. Names that are not registered services are refused.
func (p *Proxy) Forward(listener string, defaults RouteConfig) (http.Handler, error) {
	defaults.Timeouts = defaults.Timeouts.withDefaults()
	if _, err := parseHashKey(defaults.HashKey); err != nil {
		return nil, err
	}
	if _, err := balancer.New(orDefault(defaults.Balancer, "round_robin"), balancer.Options{}); err != nil {
		return nil, err
	}
	f := &forwarder{p: p, listener: listener, defaults: defaults}
	return f, nil
}

type forwarder struct {
	p        *Proxy
	listener string
	defaults RouteConfig
	routes   sync.Map // service name → *route
	mu       sync.Mutex
}

func (f *forwarder) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if r.Method == http.MethodConnect {
		http.Error(w, "sidecar: CONNECT is not supported; address the service by name", http.StatusMethodNotAllowed)
		return
	}
	fail := writeError
	if isGRPC(r) {
		fail = func(w http.ResponseWriter, err error) int { writeGRPCError(w, err); return http.StatusOK }
	}
	name, err := serviceFromRequest(r)
	if err != nil {
		f.p.metrics.refused.WithLabelValues(f.listener, "", "bad_service_name").Inc()
		fail(w, err)
		return
	}
	rt, err := f.route(r.Context(), name)
	if err != nil {
		_, code := classify(err)
		f.p.metrics.refused.WithLabelValues(f.listener, "", code).Inc() // no client-chosen label values
		fail(w, err)
		return
	}
	f.p.serve(w, r, rt)
}

// route returns the route of a service, creating it on first use once
// discovery confirms the name is registered.
func (f *forwarder) route(ctx context.Context, name string) (*route, error) {
	known, err := f.p.resolver.Known(ctx, name)
	if err != nil {
		return nil, &proxyError{name, fmt.Errorf("%w: %w", ErrDiscovery, err)}
	}
	if !known {
		return nil, &proxyError{name, ErrUnknownService}
	}
	if rt, ok := f.routes.Load(name); ok {
		return rt.(*route), nil
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	if rt, ok := f.routes.Load(name); ok {
		return rt.(*route), nil
	}
	cfg := f.defaults
	cfg.Service = name
	rt, err := newRoute(f.listener, cfg, f.p.resolver, f.p.metrics, f.p.log)
	if err != nil {
		return nil, err
	}
	f.routes.Store(name, rt)
	f.p.addRoute(rt)
	return rt, nil
}

func (p *Proxy) addRoute(rt *route) {
	p.mu.Lock()
	p.routes = append(p.routes, rt)
	p.mu.Unlock()
}

// Status lists every route with its current endpoints, sorted by listener
// and service.
func (p *Proxy) Status() []RouteStatus {
	p.mu.Lock()
	routes := append([]*route(nil), p.routes...)
	p.mu.Unlock()
	out := make([]RouteStatus, 0, len(routes))
	for _, rt := range routes {
		out = append(out, rt.status())
	}
	sort.SliceStable(out, func(i, j int) bool {
		if out[i].Listener != out[j].Listener {
			return out[i].Listener < out[j].Listener
		}
		return out[i].Service < out[j].Service
	})
	return out
}

// serve carries one request to a node picked by rt and copies the answer
// back.
func (p *Proxy) serve(w http.ResponseWriter, r *http.Request, rt *route) {
	start := time.Now()
	m := &rt.metrics
	m.inflight.Inc()
	defer m.inflight.Dec()

	if r.Method == http.MethodConnect {
		http.Error(w, "sidecar: CONNECT is not supported", http.StatusMethodNotAllowed)
		return
	}
	if proto := upgradeType(r.Header); proto != "" && r.ProtoMajor == 1 {
		p.serveUpgrade(w, r, rt, proto, start)
		return
	}
	grpc := isGRPC(r)
	fail := writeError
	if grpc {
		fail = func(w http.ResponseWriter, err error) int { writeGRPCError(w, err); return http.StatusOK }
	}

	ctx := r.Context()
	timeout := rt.cfg.Timeouts.Request
	if grpc {
		if d, ok := grpcTimeout(r.Header.Get("Grpc-Timeout")); ok && (timeout <= 0 || d < timeout) {
			timeout = d
		}
	}
	if timeout > 0 {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, timeout)
		defer cancel()
	}
	if r.ProtoMajor == 1 && r.ContentLength != 0 {
		// Let a streaming HTTP/1.1 client read the answer while it sends.
		_ = http.NewResponseController(w).EnableFullDuplex()
	}
	resp, e, pk, err := p.roundTrip(ctx, r, rt, grpc, start)
	if err != nil {
		if r.Context().Err() != nil {
			// The client went away; nobody is left to answer.
			m.refused("client_closed")
			return
		}
		if ctx.Err() == context.DeadlineExceeded {
			err = fmt.Errorf("%w after %v: %w", ErrUpstreamTimeout, timeout, err)
		}
		_, code := classify(err)
		m.refused(code)
		if pe := (*proxyError)(nil); !errors.As(err, &pe) {
			err = &proxyError{rt.cfg.Service, err} // name the service once
		}
		fail(w, err)
		return
	}
	defer resp.Body.Close()

	copyResponseHeader(w.Header(), resp)
	w.WriteHeader(resp.StatusCode)
	e.requests[codeClass(resp.StatusCode)].Inc()
	if resp.ContentLength < 0 {
		// A stream: the client may need the headers before any message.
		_ = http.NewResponseController(w).Flush()
	}
	err = copyBody(w, resp)
	if len(resp.Trailer) > 0 {
		h := w.Header()
		for k, vv := range resp.Trailer {
			h[http.TrailerPrefix+k] = vv
		}
	}
	done(pk, err, start)
	m.duration.Observe(time.Since(start).Seconds())
	if err != nil && !errors.Is(err, errClientGone) {
		// The node failed mid-body: abort so the client sees a broken
		// response, not a short one that looks complete.
		p.log.Debug("upstream body failed", zap.String("service", rt.cfg.Service),
			zap.String("endpoint", e.Addr), zap.Error(err))
		panic(http.ErrAbortHandler)
	}
}

// roundTrip sends r to nodes picked by rt until one answers with a response
// to relay, trying again on another node as the route's retry policy
// allows. It returns the response, the endpoint and pick it came from, or
// the last error. pk.Done is left to the caller on success.
func (p *Proxy) roundTrip(ctx context.Context, r *http.Request, rt *route, grpc bool, start time.Time) (resp *http.Response, e *endpoint, pk balancer.Pick, err error) {
	// A gateway answer given up for a retry, kept in case the retry does no
	// better: the set may shrink (an ejection) between deciding to retry and
	// picking, or the next node may fail outright. A node's own answer beats
	// one the sidecar makes up.
	var held *http.Response
	var heldE *endpoint
	defer func() {
		if held != nil && err != nil && r.Context().Err() == nil {
			resp, e, pk, err = held, heldE, balancer.Pick{}, nil
		}
	}()
	res := &rt.cfg.Resilience
	rt.budget.request(start)
	key, hasKey := rt.key.sum(r)
	method := r.Method
	replayable := idempotent(method) || res.Retries.RetryNonIdempotent
	var b *body
	if r.ContentLength != 0 && r.Body != nil && r.Body != http.NoBody {
		var err error
		if b, err = newBody(r, replayable && res.Retries.Attempts > 0); err != nil {
			return nil, nil, balancer.Pick{}, fmt.Errorf("read request body: %w", err)
		}
	}
	prepareOutbound(r, rt)
	useH2 := rt.h2 || grpc

	var (
		triedBuf [4]string
		tried    = triedBuf[:0]
		lastErr  error
		retries  int
	)
	for picks := 0; ; picks++ {
		e, pk, err := rt.pick(ctx, key, hasKey, tried)
		if err != nil {
			if lastErr != nil {
				return nil, nil, pk, lastErr
			}
			return nil, nil, pk, err
		}
		if len(tried) > 0 && slicesContains(tried, e.ID) {
			// Every node left has been tried.
			release(pk)
			return nil, nil, balancer.Pick{}, lastErr
		}
		breakerDone, err := e.allow()
		if err != nil {
			// Never reached the node: always worth another.
			release(pk)
			lastErr = &proxyError{rt.cfg.Service, err}
			tried = append(tried, e.ID)
			if picks > 2*len(rt.state.Load().endpoints) {
				return nil, nil, balancer.Pick{}, lastErr
			}
			continue
		}

		tryCtx, cancel := ctx, context.CancelFunc(nil)
		if d := res.Retries.PerTryTimeout; d > 0 {
			tryCtx, cancel = context.WithTimeout(ctx, d)
		}
		out := r.WithContext(tryCtx)
		out.URL.Host = e.Addr
		out.Body = nil
		if b != nil {
			var ok bool
			if out.Body, ok = b.next(); !ok {
				if cancel != nil {
					cancel()
				}
				breakerDone(nil)
				release(pk)
				return nil, nil, balancer.Pick{}, lastErr
			}
		}
		resp, err := e.roundTrip(useH2, out, b, start)
		if cancel != nil {
			if err != nil || resp == nil {
				cancel()
			} else {
				resp.Body = cancelOnClose{resp.Body, cancel}
			}
		}

		if err != nil {
			if r.Context().Err() != nil {
				breakerDone(nil)
				release(pk)
				return nil, nil, balancer.Pick{}, err
			}
			if b != nil && b.failed() != nil {
				// The client's body broke, not the node.
				breakerDone(nil)
				release(pk)
				return nil, nil, balancer.Pick{}, b.failed()
			}
			breakerDone(errBreakerFailure)
			rt.observe(e, true)
			done(pk, err, start)
			neverSent := isDialError(err)
			lastErr = err
			reason := "connect_failed"
			if !neverSent {
				reason = "upstream_failed"
				if tryCtx.Err() == context.DeadlineExceeded {
					reason = "per_try_timeout"
					lastErr = fmt.Errorf("%w: per-try timeout %v: %w", ErrUpstreamTimeout, res.Retries.PerTryTimeout, err)
				}
			}
			if !p.retry(ctx, rt, reason, neverSent || (replayable && (b == nil || b.replayable())), &retries, neverSent) {
				return nil, nil, balancer.Pick{}, lastErr
			}
			tried = append(tried, e.ID)
			continue
		}

		gateway := isGatewayStatus(resp.StatusCode, res.Outlier.EjectOn5xx)
		if resp.StatusCode >= 500 && res.Breaker.TripOn5xx {
			breakerDone(errBreakerFailure)
		} else {
			breakerDone(nil)
		}
		rt.observe(e, gateway)
		if gateway && isGatewayStatus(resp.StatusCode, false) && replayable && (b == nil || b.replayable()) &&
			len(tried)+1 < rt.state.Load().eligible &&
			p.retry(ctx, rt, "status_"+strconv.Itoa(resp.StatusCode), true, &retries, false) {
			held, heldE = hold(resp), e
			done(pk, errGateway, start)
			lastErr = fmt.Errorf("%w: %s", errGateway, resp.Status)
			tried = append(tried, e.ID)
			continue
		}
		if gateway {
			// Counts as slow for latency-aware balancing.
			pk2 := pk
			pk2.Done = nil
			done(pk, errGateway, start)
			return resp, e, pk2, nil
		}
		return resp, e, pk, nil
	}
}

// retry decides whether to try again after a failed try, spending from the
// budget unless the try never reached a node, and waits the backoff.
func (p *Proxy) retry(ctx context.Context, rt *route, reason string, allowed bool, retries *int, neverSent bool) bool {
	res := &rt.cfg.Resilience.Retries
	if !allowed || *retries >= res.Attempts {
		return false
	}
	if !neverSent && !rt.budget.spend(time.Now()) {
		rt.metrics.retries.WithLabelValues(reason, "budget_exhausted").Inc()
		return false
	}
	*retries++
	rt.metrics.retries.WithLabelValues(reason, "retried").Inc()
	if neverSent && *retries == 1 {
		return ctx.Err() == nil // another node at once
	}
	return backoff(ctx, res.Backoff, *retries)
}

// isGatewayStatus reports whether a status is a gateway failure: 502, 503
// or 504, or any 5xx when all5xx.
func isGatewayStatus(code int, all5xx bool) bool {
	if all5xx {
		return code >= 500 && code <= 599
	}
	return code == http.StatusBadGateway || code == http.StatusServiceUnavailable || code == http.StatusGatewayTimeout
}

// hold reads a short response into memory so it can still be relayed
// later, or discards it and returns nil when it is long or broken.
func hold(resp *http.Response) *http.Response {
	const limit = 4 << 10
	b, err := io.ReadAll(io.LimitReader(resp.Body, limit+1))
	resp.Body.Close()
	if err != nil || len(b) > limit {
		return nil
	}
	resp.Body = io.NopCloser(bytes.NewReader(b))
	return resp
}

type cancelOnClose struct {
	io.ReadCloser
	cancel context.CancelFunc
}

func (c cancelOnClose) Close() error {
	err := c.ReadCloser.Close()
	c.cancel()
	return err
}

func slicesContains(s []string, v string) bool {
	for _, x := range s {
		if x == v {
			return true
		}
	}
	return false
}

// prepareOutbound turns the client's request into the request to a node,
// in place (the proxy owns r), once for all tries: hop-by-hop headers go;
// X-Forwarded-For and -Proto are set; the Host becomes the node's unless
// the route preserves it. Each try sets the node's address.
func prepareOutbound(r *http.Request, rt *route) {
	out := r
	out.RequestURI = ""
	out.URL.Scheme = rt.scheme
	if !rt.cfg.PreserveHost {
		out.Host = ""
	}
	out.Close = false
	removeHopHeaders(out.Header)
	if ip, _, err := net.SplitHostPort(r.RemoteAddr); err == nil {
		appendForwardedFor(out.Header, ip)
	}
	if _, ok := out.Header["X-Forwarded-Proto"]; !ok {
		out.Header["X-Forwarded-Proto"] = protoHTTP
	}
	if _, ok := out.Header["User-Agent"]; !ok {
		out.Header["User-Agent"] = emptyValue // not Go's default
	}
}

var (
	protoHTTP  = []string{"http"}
	emptyValue = []string{""}
)

// release ends a pick whose request was never sent: its in-flight count
// goes, and latency-aware balancers take no sample.
func release(pk balancer.Pick) {
	if pk.Done != nil {
		pk.Done(balancer.Result{})
	}
}

func done(pk balancer.Pick, err error, start time.Time) {
	if pk.Done != nil {
		now := time.Now()
		pk.Done(balancer.Result{Err: err, Latency: now.Sub(start), At: now})
	}
}

// copyResponseHeader copies the node's response header, less hop-by-hop
// fields, and announces its trailers.
func copyResponseHeader(dst http.Header, resp *http.Response) {
	removeHopHeaders(resp.Header)
	for k, vv := range resp.Header {
		dst[k] = vv
	}
	if len(resp.Trailer) > 0 {
		// Trailers need a chunked answer on HTTP/1.1; an h2 node's short
		// answer carries a length, which would make the server drop them.
		delete(dst, "Content-Length")
		keys := make([]string, 0, len(resp.Trailer))
		for k := range resp.Trailer {
			keys = append(keys, k)
		}
		dst["Trailer"] = keys
	}
}

var bufPool = sync.Pool{New: func() any { b := make([]byte, 32<<10); return &b }}

// copyBody streams the response body to the client, flushing at once when
// the body's length is unknown (streams, server-sent events), so nothing is
// held back.
func copyBody(w http.ResponseWriter, resp *http.Response) error {
	bp := bufPool.Get().(*[]byte)
	defer bufPool.Put(bp)
	buf := *bp
	flush := resp.ContentLength < 0
	rc := http.NewResponseController(w)
	for {
		n, rerr := resp.Body.Read(buf)
		if n > 0 {
			if _, werr := w.Write(buf[:n]); werr != nil {
				return fmt.Errorf("%w: %w", errClientGone, werr)
			}
			if flush {
				if err := rc.Flush(); err != nil {
					return fmt.Errorf("%w: %w", errClientGone, err)
				}
			}
		}
		if rerr == io.EOF {
			return nil
		}
		if rerr != nil {
			return rerr
		}
	}
}

func orDefault(s, def string) string {
	if s == "" {
		return def
	}
	return s
}
