package proxy

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"slices"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"go.uber.org/zap"

	"github.com/sidecarlb/sidecar/balancer"
	"github.com/sidecarlb/sidecar/config"
	"github.com/sidecarlb/sidecar/discovery"
	"github.com/sidecarlb/sidecar/internal/httpwire"
	"github.com/sidecarlb/sidecar/proxy/resilience"
	"github.com/sidecarlb/sidecar/transcode"
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
	// Name is the listener label of the route's metrics and access log
	// lines: the upstream's name (upstreams[].name), or "forward". If
	// empty, the listener's address is used.
	Name string
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
	// Resilience configures breakers, outlier ejection, retries, slow
	// start and the per-node limits (see nodeLimits). Its zero value turns
	// all of them off but the limits, each of which is 1024 when zero;
	// config.Load fills in the documented defaults.
	Resilience config.Resilience
	// ProxyProtocol, when "v2", starts every connection to a node with a
	// PROXY protocol v2 header carrying the client's address and the
	// listener address it connected to. Only tcp routes use it; empty (the
	// default) sends none.
	ProxyProtocol string
	// Codec, with Transcode on a grpc route, transcodes the calls of
	// Connect, gRPC-Web, JSON and JSON-RPC clients (see transcode.go).
	Codec config.Codec
	// PerService, in the forward proxy's defaults only, carries the
	// services it names (in lower case) with their own protocol and codec.
	PerService map[string]ServiceConfig
}

// ServiceConfig is how the forward proxy carries one service, in place of
// its defaults' Protocol and Codec (proxy.services).
type ServiceConfig struct {
	Protocol string
	Codec    config.Codec
}

// Timeouts bound the phases of a proxied request.
type Timeouts struct {
	// Connect bounds dialling a node; if zero, 1s is used.
	Connect time.Duration
	// Request bounds the whole exchange with a node; zero means none.
	Request time.Duration
	// Idle is how long an unused keep-alive connection to a node is kept;
	// zero means no limit. (config.Load gives the 90s default.)
	Idle time.Duration
	// MaxConnectionAge renews an endpoint's connections this often (±10%),
	// draining the old ones; zero keeps them as long as they work.
	MaxConnectionAge time.Duration
	// Tunnel closes an upgraded connection (WebSocket) once no byte has
	// moved either way for this long; zero means no limit. TCP routes use
	// Idle instead.
	Tunnel time.Duration
}

func (t Timeouts) withDefaults() Timeouts {
	if t.Connect <= 0 {
		t.Connect = time.Second
	}
	return t
}

// Proxy builds the handlers of the proxy listeners and keeps their routes.
type Proxy struct {
	resolver Resolver
	log      *zap.Logger
	metrics  *Metrics
	clock    resilience.Clock // ejections' ends; resilience.System but in tests
	obs      Observability    // the access log and tracing (access.go)
	// refusedLog logs the answers the sidecar makes itself, rate limited.
	refusedLog *zap.Logger
	mesh       Mesh // outbound mTLS to mesh nodes (mesh.go); zero: none
	// h2PingAfter and h2PingTimeout are the h2c pools' ping (h2.Pool's
	// SetPing) on routes made after they are set; zero, as New leaves
	// them: h2's defaults. Tests shorten them.
	h2PingAfter, h2PingTimeout time.Duration

	mu     sync.Mutex
	routes []*route // for Status, in creation order
}

// New returns a Proxy resolving services with resolver. If metrics is nil,
// metrics are kept but not exported.
func New(resolver Resolver, metrics *Metrics, log *zap.Logger) *Proxy {
	if metrics == nil {
		metrics = NewMetrics(nil)
	}
	return &Proxy{resolver: resolver, log: log, metrics: metrics, clock: resilience.System, refusedLog: refusedLog(log)}
}

// Forward returns the handler of the forward-proxy listener: the request's
// host names the service, and defaults (less its Service) says how to carry
// it. Names that are not registered services are refused.
func (p *Proxy) Forward(listener string, defaults RouteConfig) (*Forwarder, error) {
	f := &Forwarder{p: p, listener: listener, name: cmp.Or(defaults.Name, listener)}
	st, err := newForwardState(defaults)
	if err != nil {
		return nil, err
	}
	f.state.Store(st)
	return f, nil
}

// Forwarder is the handler of the forward-proxy listener.
type Forwarder struct {
	p        *Proxy
	listener string
	name     string                       // the listener label of its metrics
	state    atomic.Pointer[forwardState] // swapped by Update
	mu       sync.Mutex                   // serialises route creation and Update
}

// forwardState is the forward proxy's defaults and the routes built from
// them, one per service named so far.
type forwardState struct {
	defaults RouteConfig
	routes   sync.Map // service name → *route
}

func newForwardState(defaults RouteConfig) (*forwardState, error) {
	defaults.Timeouts = defaults.Timeouts.withDefaults()
	if _, err := parseHashKey(defaults.HashKey); err != nil {
		return nil, err
	}
	if _, err := balancer.New(balancerName(defaults.Balancer), balancer.Options{}); err != nil {
		return nil, err
	}
	return &forwardState{defaults: defaults}, nil
}

// Update makes requests that arrive from now on follow defaults: each
// service's route is built afresh on its next request. Requests in flight
// finish on the route they started on, whose node connections then close.
// On error nothing changes. It does not block, and is safe for concurrent
// use with ServeHTTP.
func (f *Forwarder) Update(defaults RouteConfig) error {
	st, err := newForwardState(defaults)
	if err != nil {
		return err
	}
	f.mu.Lock()
	old := f.state.Swap(st)
	f.mu.Unlock()
	old.routes.Range(func(_, v any) bool {
		f.p.retireRoute(v.(*route), false) // the new route of the service keeps its series
		return true
	})
	return nil
}

func (f *Forwarder) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	w, aw := f.p.observe(w, r, f.name)
	if aw != nil {
		defer f.p.logAccess(aw)
	}
	if r.Method == http.MethodConnect {
		f.p.metrics.refused.WithLabelValues(f.name, "", codeConnect).Inc()
		f.p.logRefused(f.name, "", r, codeConnect, errConnect)
		w.Header().Set("X-Sidecar-Error", codeConnect)
		http.Error(w, "sidecar: CONNECT is not supported; address the service by name", http.StatusMethodNotAllowed)
		return
	}
	name, tag, dc, err := serviceFromRequest(r)
	if err != nil {
		f.p.metrics.refused.WithLabelValues(f.name, "", "bad_service_name").Inc()
		f.p.logRefused(f.name, "", r, "bad_service_name", err)
		answerError(w, r, err)
		return
	}
	rt, err := f.route(r.Context(), name, tag, dc)
	if err != nil {
		_, code := classify(err)
		f.p.metrics.refused.WithLabelValues(f.name, "", code).Inc() // no client-chosen label values
		f.p.logRefused(f.name, "", r, code, err)
		answerError(w, r, err)
		return
	}
	f.p.serve(w, r, rt)
}

// route returns the route of the service the client named as sent (with
// the tag its instances must carry and its datacenter, if any), creating it
// on first use once discovery confirms the name is registered. Service names are
// case-insensitive, as in DNS and Consul: every spelling shares the route of
// the lower-case name, and errors name what the client sent. Tags are
// compared as spelt, as Consul does.
func (f *Forwarder) route(ctx context.Context, sent, tag, dc string) (*route, error) {
	name := discovery.Key(strings.ToLower(sent), dc) // no allocation when already lower case and dc is empty
	known, err := f.p.resolver.Known(ctx, name)
	if err != nil {
		return nil, &proxyError{sent, fmt.Errorf("%w: %w", ErrDiscovery, err)}
	}
	if !known {
		return nil, &proxyError{sent, ErrUnknownService}
	}
	key := name
	if tag != "" {
		key = name + "#" + tag // # is in no service name
	}
	if rt, ok := f.state.Load().routes.Load(key); ok {
		return rt.(*route), nil
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	st := f.state.Load()
	if rt, ok := st.routes.Load(key); ok {
		return rt.(*route), nil
	}
	cfg := st.defaults
	cfg.Service = name
	if sc, ok := cfg.PerService[strings.ToLower(sent)]; ok {
		cfg.Protocol, cfg.Codec = sc.Protocol, sc.Codec // a gRPC service, say, that transcodes
	}
	cfg.PerService = nil
	if tag != "" {
		cfg.Tags = append(slices.Clip(cfg.Tags), tag)
	}
	rt, err := newRoute(f.p, f.listener, cfg)
	if err != nil {
		return nil, err
	}
	rt.onDemand = true
	st.routes.Store(key, rt)
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
	setAccessService(w, rt.cfg.Service)

	if r.Method == http.MethodConnect {
		m.refused(codeConnect)
		p.logRefused(m.listener, rt.cfg.Service, r, codeConnect, errConnect)
		w.Header().Set("X-Sidecar-Error", codeConnect)
		http.Error(w, "sidecar: CONNECT is not supported", http.StatusMethodNotAllowed)
		return
	}
	if r.ProtoMajor == 1 {
		if proto := upgradeType(r.Header); proto != "" {
			p.serveUpgrade(w, r, rt, proto, start)
			return
		}
	}
	if rt.codec != nil && (transcode.Match(r.Header.Get("Content-Type")) || transcode.MatchGet(r)) {
		p.serveTranscoded(w, r, rt, start)
		return
	}
	grpc := isGRPC(r)

	ctx := r.Context()
	timeout := requestTimeout(r, rt, grpc)
	if timeout > 0 {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, timeout)
		defer cancel()
	}
	if r.ProtoMajor == 1 && r.ContentLength != 0 {
		// Let a streaming HTTP/1.1 client read the answer while it sends.
		_ = http.NewResponseController(w).EnableFullDuplex()
	}
	resp, e, pk, err := p.roundTrip(ctx, r, rt, grpc, start, accessOf(w))
	if err != nil {
		if r.Context().Err() != nil {
			// The client went away; nobody is left to answer.
			m.refused("client_closed")
			return
		}
		if ctx.Err() == context.DeadlineExceeded || deadlinePassed(ctx) {
			// By the clock too: a node that honours the deadline sent
			// with the request may give up before ctx's timer fires.
			err = fmt.Errorf("%w after %v: %w", ErrUpstreamTimeout, timeout, err)
		}
		_, code := classify(err)
		m.refused(code)
		if pe := (*proxyError)(nil); !errors.As(err, &pe) {
			err = &proxyError{rt.cfg.Service, err} // name the service once
		}
		p.logRefused(m.listener, rt.cfg.Service, r, code, err)
		answerError(w, r, err)
		return
	}
	p.relay(w, rt, resp, e, pk, start)
}

// requestTimeout is the request's deadline: timeouts.request, or a gRPC
// request's grpc-timeout when shorter; zero for none.
func requestTimeout(r *http.Request, rt *route, grpc bool) time.Duration {
	timeout := rt.cfg.Timeouts.Request
	if grpc {
		if d, ok := httpwire.GRPCTimeout(r.Header.Get("Grpc-Timeout")); ok && (timeout <= 0 || d < timeout) {
			timeout = d
		}
	}
	return timeout
}

// relay relays node e's answer resp to the client, trailers included, and
// ends the request's pick. A node that fails mid-body aborts the client's
// response (http.ErrAbortHandler), so that it does not look complete.
func (p *Proxy) relay(w http.ResponseWriter, rt *route, resp *http.Response, e *endpoint, pk balancer.Pick, start time.Time) {
	defer e.limits.endRequest() // after the body's Close
	defer resp.Body.Close()

	grpc := isGRPCResponse(resp)
	setAccessNode(w, e.Addr)
	answerHeader(w, resp)
	w.WriteHeader(resp.StatusCode)
	if !grpc {
		rt.metrics.countAnswer(e, resp.StatusCode)
	}
	if resp.ContentLength < 0 {
		// A stream: the client may need the headers before any message.
		_ = http.NewResponseController(w).Flush()
	}
	err := copyBody(w, resp)
	if len(resp.Trailer) > 0 {
		h := w.Header()
		for k, vv := range resp.Trailer {
			h[trailerKey(k)] = vv
		}
	}
	if grpc {
		rt.metrics.grpcCall(e, resp) // its status is known once the trailers are in
	}
	outcome := err
	if outcome == nil && isGatewayStatus(resp.StatusCode, rt.cfg.Resilience.Outlier.EjectOn5xx) {
		outcome = errGateway // counts as slow for latency-aware balancing
	}
	done(pk, outcome, start)
	now := time.Now()
	rt.metrics.duration.Observe(now.Sub(start).Seconds())
	e.stats.latency(now, now.Sub(start))
	if err != nil && !errors.Is(err, errClientGone) {
		// The node failed mid-body: abort so the client sees a broken
		// response, not a short one that looks complete.
		p.log.Debug("upstream body failed", zap.String("service", rt.cfg.Service),
			zap.String("endpoint", e.Addr), zap.Error(err))
		panic(http.ErrAbortHandler)
	}
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

// answerHeader gives w the node's response header, less hop-by-hop fields,
// with its trailers announced. A writer that can take the node's map as its
// own (an HTTP/1.1 answer or an HTTP/2 stream with no header yet) does,
// which spares a map and a copy per answer; resp.Header is then the
// answer's, so response sources must not reuse it.
func answerHeader(w http.ResponseWriter, resp *http.Response) {
	if a, ok := w.(headerAdopter); ok && a.AdoptHeader(resp.Header) {
		removeHopHeaders(resp.Header)
		announceTrailers(resp.Header, resp)
		return
	}
	copyResponseHeader(w.Header(), resp)
}

// headerAdopter is a ResponseWriter that can take a header map as its own.
type headerAdopter interface {
	// AdoptHeader makes h the answer's header and reports true, unless the
	// writer has a header already.
	AdoptHeader(h http.Header) bool
}

// copyResponseHeader copies the node's response header, less hop-by-hop
// fields, and announces its trailers.
func copyResponseHeader(dst http.Header, resp *http.Response) {
	removeHopHeaders(resp.Header)
	for k, vv := range resp.Header {
		dst[k] = vv
	}
	announceTrailers(dst, resp)
}

// announceTrailers declares resp's trailers in dst, the answer's header.
func announceTrailers(dst http.Header, resp *http.Response) {
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

// trailerKey returns the header key that makes a server send k as a
// trailer (http.TrailerPrefix + k), without allocating for common keys.
func trailerKey(k string) string {
	if p, ok := commonTrailerKeys[k]; ok {
		return p
	}
	return http.TrailerPrefix + k
}

var commonTrailerKeys = func() map[string]string {
	m := make(map[string]string, len(commonLower))
	for k := range commonLower {
		m[k] = http.TrailerPrefix + k
	}
	return m
}()

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
