package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/signal"
	"runtime/debug"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/hashicorp/consul/api"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"go.uber.org/zap"

	"github.com/sidecarlb/sidecar/admin"
	"github.com/sidecarlb/sidecar/config"
	"github.com/sidecarlb/sidecar/discovery"
	"github.com/sidecarlb/sidecar/heartbeat"
	"github.com/sidecarlb/sidecar/proxy"
	"github.com/sidecarlb/sidecar/supervisor"
)

// shutdownTimeout bounds how long in-flight requests may take to finish
// once the listeners close.
const shutdownTimeout = 10 * time.Second

// serve runs the sidecar until ctx is done, then shuts down in order:
// deregister, drain, stop the app (with service.run), close the listeners.
// Meanwhile SIGHUP and POST /reload on the admin listener reload the config
// with load (see reloader).
func serve(ctx context.Context, cfg *config.Config, load func() (*config.Config, error), logOut io.Writer) error {
	hup := make(chan os.Signal, 1)
	signal.Notify(hup, syscall.SIGHUP) // from now on SIGHUP reloads, never kills
	defer signal.Stop(hup)
	log, level, err := newLogger(cfg.Log, logOut)
	if err != nil {
		return err
	}
	defer func() { _ = log.Sync() }()
	if n := cfg.Limits.MemoryN; n > 0 {
		debug.SetMemoryLimit(n) // limits.memory; else GOMEMLIMIT, as the runtime read it
		log.Info("soft memory limit", zap.Int64("bytes", n))
	}

	consul, err := newConsulClient(cfg.Consul, cfg.Discovery)
	if err != nil {
		return err
	}

	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	registerBuildInfo(reg)

	backend, err := newBackend(cfg, consul, log)
	if err != nil {
		return err
	}
	cache := discovery.NewCache(backend, cacheOptions(cfg.Discovery), log.Named("discovery"))
	defer cache.Close()
	reg.MustRegister(cache.Collector())

	px := proxy.New(cache, proxy.NewMetricsWith(reg, proxy.MetricsOptions{NoEndpointLabels: !cfg.Metrics.EndpointLabels}), log.Named("proxy"))
	access, closeAccess, reopenAccess, err := newAccessLogger(cfg.Log, os.Stdout)
	if err != nil {
		return err
	}
	defer closeAccess()
	px.SetObservability(proxy.Observability{Access: access, AccessSample: cfg.Log.AccessSample, StartTraces: cfg.Tracing.Start})
	// With security.mtls on, the identity the proxy dials mesh nodes with:
	// before the listeners build their routes.
	mr, err := newMeshIdentity(cfg, reg, px, log)
	if err != nil {
		return err
	}
	defer mr.stop()
	servers, err := listen(cfg, px, cache, log)
	if err != nil {
		return err
	}

	var registrar *heartbeat.Registrar
	gate := &meshGate{on: cfg.Security.MTLS != config.MTLSOff && cfg.Service != nil && cfg.Service.Inbound != nil}
	if s := cfg.Service; s != nil {
		registrar = newRegistrar(s, consul.Agent(), gate, log.Named("heartbeat"))
		registerHeartbeatMetrics(reg, registrar)
	}

	sections := statusSections(px, cache, registrar)
	// service.run: the supervisor holds the check critical until the app
	// has started; it must exist before the registrar runs.
	var app *supervisor.App
	if registrar != nil && cfg.Service.Run != nil {
		if app, err = newApp(cfg.Service, registrar, consul.Agent(), log.Named("app")); err != nil {
			closeAll(servers)
			return err
		}
		sections["app"] = func() any { return app.Status() }
		registerAppMetrics(reg, app)
	}
	var ps *pubsubRuntime
	if cfg.PubSub.Enabled() {
		if ps, err = newPubSub(cfg, consul, cache, reg, registrar, log); err != nil {
			closeAll(servers)
			return err
		}
		sections["pubsub"] = ps.status
	}
	ready := newReadiness(cfg, registrar, cache)
	adminHandler := newAdminHandler(cfg, sections, reg, ready, app)
	rl := &reloader{load: load, log: log.Named("reload"), level: level, px: px, cache: cache, backend: backend, registrar: registrar, pubsub: ps, reopen: reopenAccess}
	ready.current = rl.upstreamKeys
	rl.init(cfg, servers, reg) // the proxy listeners; pub/sub's are not reloaded
	drain := &drainer{ready: ready, registrar: registrar, pubsub: ps, log: serviceLogger(log, cfg.Service), service: func() *config.Service { return rl.config().Service }}
	adminHandler.Handle("POST /reload", rl)
	adminHandler.HandlePrivate("GET /config", admin.Document(func() (any, error) { return rl.config().Masked() }))
	// GET too: a Kubernetes httpGet preStop hook can only GET.
	adminHandler.HandlePrivate("POST /drain", drain)
	adminHandler.HandlePrivate("GET /drain", drain)
	adminSrv, servers, err := bindAdmin(cfg, adminHandler, servers, ps, mr, gate, log)
	if err != nil {
		return err
	}
	if mr != nil {
		sections["mesh"] = mr.status // read by /status from the admin handler, not serving yet
	}

	running := &serving{errs: make(chan error, 1)}
	rl.start, rl.drain = running.start, &running.wg // before the admin listener takes POST /reload
	for _, s := range servers {
		running.start(s)
	}

	ps.start()
	stopHeartbeat := runOwned(registrar != nil, func(ctx context.Context) { registrar.Run(ctx) })
	stopApp := runOwned(app != nil, func(ctx context.Context) { app.Run(ctx) })
	log.Info("sidecar started", zap.String("version", version), zap.String("admin", cfg.Admin.Listen),
		zap.Int("listeners", len(servers)-1))
	ready.started.Store(true)
	notifyCtx, stopNotify := context.WithCancel(ctx)
	notifyDone := make(chan struct{})
	go func() { defer close(notifyDone); notifyReady(notifyCtx, ready.check, &rl.readySent, log) }()
	// Routes follow discovery between requests: /status and the series
	// drop nodes that left at once.
	defer runOwned(true, func(ctx context.Context) { px.Follow(ctx, 0) })()
	hupCtx, stopHUP := context.WithCancel(ctx)
	hupDone := make(chan struct{})
	go func() { defer close(hupDone); rl.handleHUP(hupCtx, hup) }()

	var failure error
	select {
	case <-ctx.Done():
	case failure = <-running.errs:
		log.Error("listener failed", zap.Error(failure))
	}

	// Shutdown: out of the registry first, so peers stop sending; then let
	// traffic drain; then close the listeners and wait for requests.
	log.Info("shutting down")
	ready.draining.Store(true)
	stopHUP()
	<-hupDone
	servers = append(rl.close(), adminSrv) // as the last reload left them
	if mr != nil && mr.server != nil {
		servers = append(servers, mr.server)
	}
	if ps != nil {
		servers = append(servers, ps.servers...)
	}
	stopNotify()
	<-notifyDone
	notifyStopping(log)
	// Deregister and drain, unless /drain did already.
	drain.drain(failure == nil)
	// Then stop the app (stop signal, SIGKILL after stop_timeout).
	stopApp()
	stopHeartbeat()
	adminHandler.Close() // the dashboards' streams end, so the admin listener can close
	shutdownAll(servers, log)
	running.wg.Wait()
	ps.stop()
	log.Info("stopped")
	return failure
}

// statusSections are the /status document's sections that every sidecar
// has: its routes, its discovery watches and, with service:, the
// registration.
func statusSections(px *proxy.Proxy, cache *discovery.Cache, registrar *heartbeat.Registrar) map[string]func() any {
	sections := map[string]func() any{
		"upstreams": func() any { return px.Status() },
		"discovery": func() any { return cache.Snapshots() },
	}
	if registrar != nil {
		sections["service"] = func() any { return registrar.Status() }
	}
	return sections
}

// newReadiness is /ready's check of cfg: the registration, and the
// upstreams' first discovery answers.
func newReadiness(cfg *config.Config, registrar *heartbeat.Registrar, cache *discovery.Cache) *readiness {
	ready := &readiness{registrar: registrar, cache: cache}
	for _, u := range cfg.Upstreams {
		ready.upstreams = append(ready.upstreams, upstreamKey(cfg, u))
	}
	return ready
}

// newAdminHandler is the admin listener's handler: /status with sections,
// /metrics from reg, /ready, pprof when admin.pprof is on, and the
// supervised app's routes when there is one.
func newAdminHandler(cfg *config.Config, sections map[string]func() any, reg *prometheus.Registry, ready *readiness, app *supervisor.App) *admin.Handler {
	h := admin.New(admin.Options{Version: version, Sections: sections, Gatherer: reg, Token: cfg.Admin.Token, Ready: ready.check})
	if cfg.Admin.Pprof {
		h.EnablePprof()
	}
	if app != nil {
		for pattern, route := range app.Routes() {
			h.Handle(pattern, route)
		}
	}
	return h
}

// serviceLogger is log with the service's name, when there is a service.
func serviceLogger(log *zap.Logger, s *config.Service) *zap.Logger {
	if s == nil {
		return log
	}
	return log.With(zap.String("service", s.Name))
}

// serving runs the listeners: each in a goroutine of its own, until it is
// shut down. The first that fails for another reason is sent on errs.
type serving struct {
	wg   sync.WaitGroup
	errs chan error // buffered, 1
}

// start serves s in a new goroutine.
func (r *serving) start(s *server) {
	r.wg.Add(1)
	go func() {
		defer r.wg.Done()
		if err := s.serve(); err != nil && !errors.Is(err, http.ErrServerClosed) {
			select {
			case r.errs <- fmt.Errorf("serve %s: %w", s.name, err):
			default: // one failure stops the sidecar; the first is enough
			}
		}
	}()
}

// runOwned runs run, when on, in a goroutine with a context of its own,
// and returns the func that cancels that context and waits for run to
// return.
func runOwned(on bool, run func(context.Context)) (stop func()) {
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	if on {
		go func() { defer close(done); run(ctx) }()
	} else {
		close(done)
	}
	return func() { cancel(); <-done }
}

// shutdownAll shuts servers down, each given what is left of
// shutdownTimeout.
func shutdownAll(servers []*server, log *zap.Logger) {
	ctx, cancel := context.WithTimeout(context.Background(), shutdownTimeout)
	defer cancel()
	for _, s := range servers {
		if err := s.shutdown(ctx); err != nil {
			log.Warn("listener did not close in time", zap.String("listener", s.name), zap.Error(err))
		}
	}
}

// newConsulClient makes the Consul client from c, in which config.Load has
// already filled what the file left unset from the CONSUL_* variables.
// consul/api's DefaultConfig reads them too; every field it reads is set
// here from c, so the file wins, except CONSUL_HTTP_AUTH, which has no key.
// The HTTP client is built here from c.TLS, so that NewClient's own fallback
// to the environment cannot undo a key the file set (insecure_skip_verify:
// false). A unix:// address gets consul/api's own unix transport. Its
// connections to the agent, for registration, heartbeats, discovery and
// pub/sub alike, are bounded by discovery.max_connections.
func newConsulClient(c config.Consul, d config.Discovery) (*api.Client, error) {
	cc := api.DefaultConfig()
	cc.Address = c.Address
	cc.Scheme = "http" // an https:// address sets https
	cc.Token = c.Token
	cc.TokenFile = c.TokenFile
	cc.Datacenter = c.Datacenter
	cc.Namespace = c.Namespace
	cc.Partition = c.Partition
	cc.TLSConfig = api.TLSConfig{
		Address:            c.TLS.ServerName,
		CAFile:             c.TLS.CAFile,
		CAPath:             c.TLS.CAPath,
		CertFile:           c.TLS.CertFile,
		KeyFile:            c.TLS.KeyFile,
		InsecureSkipVerify: c.TLS.InsecureSkipVerify,
	}
	// HTTP/1.1 over https:// too, as over http://: Go's HTTP/2 client hides
	// a failed handshake ("tls: certificate required") behind "http2: client
	// conn could not be established".
	cc.Transport.ForceAttemptHTTP2 = false
	hc, err := api.NewHttpClient(cc.Transport, cc.TLSConfig)
	if err != nil {
		return nil, fmt.Errorf("consul client: consul.tls: %w", err)
	}
	maxStale := time.Duration(0)
	if d.Consistency == config.ConsistencyStale {
		maxStale = d.MaxStale
	}
	hc.Transport = discovery.NewTransport(cc.Transport, d.MaxConnections, maxStale)
	cc.HttpClient = hc
	client, err := api.NewClient(cc)
	if err != nil {
		return nil, fmt.Errorf("consul client: %w", err)
	}
	return client, nil
}

func newBackend(cfg *config.Config, consul *api.Client, log *zap.Logger) (discovery.Backend, error) {
	if cfg.Discovery.Backend == config.BackendStatic {
		return discovery.NewStatic(cfg.Discovery.Static)
	}
	return discovery.NewConsul(discovery.NewHealthClient(consul), consul.Catalog(), discovery.ConsulOptions{
		Datacenter:  cfg.Consul.Datacenter,
		Datacenters: cfg.RemoteDatacenters(),
		LocalDatacenter: func(ctx context.Context) (string, error) {
			var self struct{ Config struct{ Datacenter string } }
			_, err := consul.Raw().Query("/v1/agent/self", &self, (&api.QueryOptions{}).WithContext(ctx))
			return self.Config.Datacenter, err
		},
		Consistency:    discovery.Consistency(cfg.Discovery.Consistency),
		MaxConnections: cfg.Discovery.MaxConnections,
		StaleFor:       cfg.Discovery.StaleFor,
		ResolveTimeout: cfg.Discovery.ResolveTimeout,
	}, log.Named("discovery")), nil
}

func cacheOptions(d config.Discovery) discovery.CacheOptions {
	return discovery.CacheOptions{Size: d.CacheSize, IdleTimeout: d.IdleTimeout, ResolveTimeout: d.ResolveTimeout}
}

// upstreamKey is the discovery key of u: its name, with its datacenter
// when that is not consul.datacenter, and its failover datacenters and
// tags (when the backend is Consul).
func upstreamKey(cfg *config.Config, u config.Upstream) string {
	if cfg.Discovery.Backend == config.BackendStatic {
		return u.Name
	}
	dc := u.Datacenter
	if strings.EqualFold(dc, cfg.Consul.Datacenter) {
		dc = ""
	}
	return discovery.FailoverKey(u.Name, dc, u.Failover, u.Tags)
}

func newRegistrar(s *config.Service, agent *api.Agent, gate *meshGate, log *zap.Logger) *heartbeat.Registrar {
	var probe heartbeat.Prober
	if s.Check.HTTP != "" {
		probe = heartbeat.HTTPProbe(s.Check.HTTP, s.Check.Timeout)
	} else {
		probe = heartbeat.TCPProbe(s.ProbeAddr(), s.Check.Timeout)
	}
	probe = gate.wrap(probe)
	port := s.Port
	if s.Inbound != nil {
		port = s.Inbound.Port() // peers dial the inbound listener
	}
	return heartbeat.NewRegistrar(agent, heartbeat.Service{
		ID: s.ID, Name: s.Name, Address: s.Address, Port: port,
		Tags: s.Tags, Meta: s.Meta, Weight: s.Weight,
	}, probe, heartbeat.Options{
		Interval:                s.Check.Interval,
		Timeout:                 s.Check.Timeout,
		TTL:                     s.TTL,
		DeregisterCriticalAfter: s.DeregisterCriticalAfter,
	}, log)
}

// server is one bound listener and what serves it. A proxy listener also
// has its route: update swaps it, retire drops it once the listener is shut
// down; both are nil on the admin listener.
type server struct {
	name     string
	ln       net.Listener
	serve    func() error
	shutdown func(context.Context) error
	update   func(proxy.RouteConfig) error
	retire   func()
}

// listen binds the forward-proxy listener and every upstream listener, so a
// port in use fails the start rather than a later request.
func listen(cfg *config.Config, px *proxy.Proxy, cache *discovery.Cache, log *zap.Logger) ([]*server, error) {
	var servers []*server
	if cfg.Proxy.Listen != "" {
		f, err := px.Forward(cfg.Proxy.Listen, forwardRoute(cfg.Proxy))
		if err != nil {
			return nil, fmt.Errorf("proxy: %w", err)
		}
		s, err := bind(cfg.Proxy.Listen, f, cfg.Proxy.Timeouts, cfg.Proxy.MaxHeaderBytes, log)
		if err != nil {
			return nil, fmt.Errorf("proxy.listen: %w", err)
		}
		s.update = f.Update
		servers = append(servers, s)
	}
	for i, u := range cfg.Upstreams {
		s, err := listenUpstream(cfg, u, px, cache, log)
		if err != nil {
			closeAll(servers)
			return nil, fmt.Errorf("upstreams[%d] (%s on %s): %w", i, u.Name, u.Listen, err)
		}
		servers = append(servers, s)
	}
	return servers, nil
}

// listenUpstream binds the listener of upstream u, and pins its service in
// the cache.
func listenUpstream(cfg *config.Config, u config.Upstream, px *proxy.Proxy, cache *discovery.Cache, log *zap.Logger) (*server, error) {
	rc := upstreamRoute(cfg, u)
	cache.Pin(rc.Service)
	if u.Protocol == config.ProtocolTCP {
		return bindTCP(px, u.Listen, rc)
	}
	h, err := px.Upstream(u.Listen, rc)
	if err != nil {
		return nil, err
	}
	s, err := bind(u.Listen, h, u.Timeouts, cfg.Proxy.MaxHeaderBytes, log)
	if err != nil {
		h.Retire()
		return nil, err
	}
	s.update, s.retire = h.Update, h.Retire
	return s, nil
}

// forwardRoute is the forward proxy's route defaults.
func forwardRoute(p config.Proxy) proxy.RouteConfig {
	return proxy.RouteConfig{
		Name:         "forward",
		Balancer:     p.Balancer,
		HashKey:      p.HashKey,
		PreserveHost: p.PreserveHost,
		Timeouts:     timeouts(p.Timeouts),
		Resilience:   p.Resilience,
		PerService:   forwardServices(p.Services),
	}
}

// forwardServices is proxy.services by lower-case name, or nil.
func forwardServices(list []config.ForwardService) map[string]proxy.ServiceConfig {
	if len(list) == 0 {
		return nil
	}
	m := make(map[string]proxy.ServiceConfig, len(list))
	for _, s := range list {
		m[strings.ToLower(s.Name)] = proxy.ServiceConfig{Protocol: s.Protocol, Codec: s.Codec}
	}
	return m
}

// upstreamRoute is the route of upstream u of cfg.
// upstreamName is the listener label of u's metrics and access log lines:
// its name, or name@listen when another upstream has the same name.
func upstreamName(cfg *config.Config, u config.Upstream) string {
	for _, o := range cfg.Upstreams {
		if o.Listen != u.Listen && strings.EqualFold(o.Name, u.Name) {
			return u.Name + "@" + u.Listen
		}
	}
	return u.Name
}

func upstreamRoute(cfg *config.Config, u config.Upstream) proxy.RouteConfig {
	return proxy.RouteConfig{
		Service:       upstreamKey(cfg, u),
		Name:          upstreamName(cfg, u),
		Protocol:      u.Protocol,
		Balancer:      u.Balancer,
		HashKey:       u.HashKey,
		Tags:          u.Tags,
		PreserveHost:  u.PreserveHost,
		Timeouts:      timeouts(u.Timeouts),
		Resilience:    u.Resilience,
		TLS:           u.TLS,
		ProxyProtocol: u.ProxyProtocol,
		Codec:         u.Codec,
	}
}

func timeouts(t config.Timeouts) proxy.Timeouts {
	return proxy.Timeouts{Connect: t.Connect, Request: t.Request, Idle: t.Idle, MaxConnectionAge: t.MaxConnectionAge, Tunnel: t.Tunnel}
}

func bind(addr string, h http.Handler, t config.Timeouts, maxHeaderBytes int, log *zap.Logger) (*server, error) {
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, err
	}
	srv := proxy.NewServer(h, proxy.ServerOptions{ReadHeaderTimeout: t.ReadHeader, IdleTimeout: t.Idle, MaxHeaderBytes: maxHeaderBytes},
		log.Named("http").With(zap.String("listener", addr)))
	return &server{name: addr, ln: ln, serve: func() error { return srv.Serve(ln) }, shutdown: srv.Shutdown}, nil
}

func bindTCP(px *proxy.Proxy, addr string, rc proxy.RouteConfig) (*server, error) {
	ts, err := px.TCP(addr, rc)
	if err != nil {
		return nil, err
	}
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		ts.Retire()
		return nil, err
	}
	serve := func() error {
		if err := ts.Serve(ln); !errors.Is(err, net.ErrClosed) {
			return err
		}
		return nil
	}
	return &server{name: addr, ln: ln, serve: serve, shutdown: ts.Shutdown, update: ts.Update, retire: ts.Retire}, nil
}

// bindAdmin binds the admin listener, then service.inbound's (after the
// proxy's listeners, which reloads manage; served and shut down with the
// admin listener), and returns servers with them and pub/sub's listeners
// added. On an error everything bound is closed and pub/sub stopped, so a
// restart can open its store.
func bindAdmin(cfg *config.Config, h http.Handler, servers []*server, ps *pubsubRuntime, mr *meshRuntime, gate *meshGate, log *zap.Logger) (*server, []*server, error) {
	adminSrv, err := bind(cfg.Admin.Listen, h, cfg.Proxy.Timeouts, cfg.Proxy.MaxHeaderBytes, log)
	if err != nil {
		closeAll(servers)
		if ps != nil {
			ps.closeListeners()
			ps.stop()
		}
		return nil, nil, fmt.Errorf("admin.listen: %w", err)
	}
	servers = append(servers, adminSrv)
	if ps != nil {
		servers = append(servers, ps.servers...)
	}
	if err := mr.bindInbound(cfg, gate, log); err != nil {
		closeAll(servers)
		if ps != nil {
			ps.stop()
		}
		return nil, nil, err
	}
	if mr != nil && mr.server != nil {
		servers = append(servers, mr.server)
	}
	return adminSrv, servers, nil
}

func closeAll(servers []*server) {
	for _, s := range servers {
		_ = s.ln.Close()
	}
}
