package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"sync"
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
func serve(ctx context.Context, cfg *config.Config, logOut io.Writer) error {
	log, err := newLogger(cfg.Log, logOut)
	if err != nil {
		return err
	}
	defer func() { _ = log.Sync() }()

	consul, err := newConsulClient(cfg.Consul, cfg.Discovery)
	if err != nil {
		return err
	}

	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))

	backend, err := newBackend(cfg, consul, log)
	if err != nil {
		return err
	}
	cache := discovery.NewCache(backend, discovery.CacheOptions{
		Size:           cfg.Discovery.CacheSize,
		IdleTimeout:    cfg.Discovery.IdleTimeout,
		ResolveTimeout: cfg.Discovery.ResolveTimeout,
	}, log.Named("discovery"))
	defer cache.Close()
	reg.MustRegister(cache.Collector())

	px := proxy.New(cache, proxy.NewMetrics(reg), log.Named("proxy"))
	servers, err := listen(cfg, px, cache, log)
	if err != nil {
		return err
	}

	var registrar *heartbeat.Registrar
	if s := cfg.Service; s != nil {
		registrar = newRegistrar(s, consul.Agent(), log.Named("heartbeat"))
	}

	sections := map[string]func() any{
		"upstreams": func() any { return px.Status() },
		"discovery": func() any { return cache.Snapshots() },
	}
	if registrar != nil {
		sections["service"] = func() any { return registrar.Status() }
	}
	// service.run: the supervisor holds the check critical until the app
	// has started; it must exist before the registrar runs.
	var app *supervisor.App
	if registrar != nil && cfg.Service.Run != nil {
		if app, err = newApp(cfg.Service, registrar, consul.Agent(), log.Named("app")); err != nil {
			closeAll(servers)
			return err
		}
		sections["app"] = func() any { return app.Status() }
	}
	ready := &readiness{registrar: registrar, cache: cache}
	for _, u := range cfg.Upstreams {
		ready.upstreams = append(ready.upstreams, upstreamKey(cfg, u))
	}
	adminHandler := admin.New(admin.Options{Version: version, Sections: sections, Gatherer: reg, Token: cfg.Admin.Token, Ready: ready.check})
	if cfg.Admin.Pprof {
		adminHandler.EnablePprof()
	}
	if app != nil {
		for pattern, h := range app.Routes() {
			adminHandler.Handle(pattern, h)
		}
	}
	adminSrv, err := bind(cfg.Admin.Listen, adminHandler, cfg.Proxy.Timeouts, cfg.Proxy.MaxHeaderBytes, log)
	if err != nil {
		closeAll(servers)
		return fmt.Errorf("admin.listen: %w", err)
	}
	servers = append(servers, adminSrv)

	var wg sync.WaitGroup
	errs := make(chan error, len(servers))
	for _, s := range servers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := s.serve(); err != nil && !errors.Is(err, http.ErrServerClosed) {
				errs <- fmt.Errorf("serve %s: %w", s.name, err)
			}
		}()
	}

	hbCtx, stopHeartbeat := context.WithCancel(context.Background())
	hbDone := make(chan struct{})
	if registrar != nil {
		go func() { defer close(hbDone); registrar.Run(hbCtx) }()
	} else {
		close(hbDone)
	}
	appCtx, stopApp := context.WithCancel(context.Background())
	appDone := make(chan struct{})
	if app != nil {
		go func() { defer close(appDone); app.Run(appCtx) }()
	} else {
		close(appDone)
	}
	log.Info("sidecar started", zap.String("version", version), zap.String("admin", cfg.Admin.Listen),
		zap.Int("listeners", len(servers)-1))
	ready.started.Store(true)
	notifyCtx, stopNotify := context.WithCancel(ctx)
	notifyDone := make(chan struct{})
	go func() { defer close(notifyDone); notifyReady(notifyCtx, ready.check, log) }()

	var failure error
	select {
	case <-ctx.Done():
	case failure = <-errs:
		log.Error("listener failed", zap.Error(failure))
	}

	// Shutdown: out of the registry first, so peers stop sending; then let
	// traffic drain; then close the listeners and wait for requests.
	log.Info("shutting down")
	ready.draining.Store(true)
	stopNotify()
	<-notifyDone
	notifyStopping(log)
	if registrar != nil {
		dctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		if err := registrar.Deregister(dctx); err != nil {
			log.Warn("deregister failed", zap.Error(err))
		} else {
			log.Info("deregistered", zap.String("service", cfg.Service.Name), zap.String("id", registrar.ServiceID()))
		}
		cancel()
		if d := cfg.Service.Drain; d > 0 && failure == nil {
			log.Info("draining", zap.Duration("drain", d))
			time.Sleep(d)
		}
	}
	// Then stop the app (stop signal, SIGKILL after stop_timeout).
	stopApp()
	<-appDone
	stopHeartbeat()
	<-hbDone
	sctx, cancel := context.WithTimeout(context.Background(), shutdownTimeout)
	defer cancel()
	for _, s := range servers {
		if err := s.shutdown(sctx); err != nil {
			log.Warn("listener did not close in time", zap.String("listener", s.name), zap.Error(err))
		}
	}
	wg.Wait()
	log.Info("stopped")
	return failure
}

// newConsulClient returns the one Consul client of the sidecar, for
// registration, heartbeats and discovery alike, its connections to the
// agent bounded by discovery.max_connections.
func newConsulClient(c config.Consul, d config.Discovery) (*api.Client, error) {
	cc := api.DefaultConfig()
	cc.Address = c.Address
	cc.Token = c.Token
	cc.Datacenter = c.Datacenter
	hc, err := api.NewHttpClient(cc.Transport, cc.TLSConfig)
	if err != nil {
		return nil, fmt.Errorf("consul client: %w", err)
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
	return discovery.NewConsul(consul.Health(), consul.Catalog(), discovery.ConsulOptions{
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

// upstreamKey is the discovery key of u: its name, with its datacenter
// when that is not consul.datacenter (and the backend is Consul).
func upstreamKey(cfg *config.Config, u config.Upstream) string {
	if u.Datacenter == "" || u.Datacenter == cfg.Consul.Datacenter || cfg.Discovery.Backend == config.BackendStatic {
		return u.Name
	}
	return discovery.Key(u.Name, u.Datacenter)
}

func newRegistrar(s *config.Service, agent *api.Agent, log *zap.Logger) *heartbeat.Registrar {
	var probe heartbeat.Prober
	if s.Check.HTTP != "" {
		probe = heartbeat.HTTPProbe(s.Check.HTTP, s.Check.Timeout)
	} else {
		probe = heartbeat.TCPProbe(s.ProbeAddr(), s.Check.Timeout)
	}
	return heartbeat.NewRegistrar(agent, heartbeat.Service{
		ID: s.ID, Name: s.Name, Address: s.Address, Port: s.Port,
		Tags: s.Tags, Meta: s.Meta, Weight: s.Weight,
	}, probe, heartbeat.Options{
		Interval:                s.Check.Interval,
		Timeout:                 s.Check.Timeout,
		TTL:                     s.TTL,
		DeregisterCriticalAfter: s.DeregisterCriticalAfter,
	}, log)
}

// server is one bound listener and what serves it.
type server struct {
	name     string
	ln       net.Listener
	serve    func() error
	shutdown func(context.Context) error
}

// listen binds the forward-proxy listener and every upstream listener, so a
// port in use fails the start rather than a later request.
func listen(cfg *config.Config, px *proxy.Proxy, cache *discovery.Cache, log *zap.Logger) ([]*server, error) {
	var servers []*server
	if cfg.Proxy.Listen != "" {
		h, err := px.Forward(cfg.Proxy.Listen, proxy.RouteConfig{
			Balancer:     cfg.Proxy.Balancer,
			HashKey:      cfg.Proxy.HashKey,
			PreserveHost: cfg.Proxy.PreserveHost,
			Timeouts:     timeouts(cfg.Proxy.Timeouts),
			Resilience:   cfg.Proxy.Resilience,
		})
		if err != nil {
			return nil, fmt.Errorf("proxy: %w", err)
		}
		s, err := bind(cfg.Proxy.Listen, h, cfg.Proxy.Timeouts, cfg.Proxy.MaxHeaderBytes, log)
		if err != nil {
			return nil, fmt.Errorf("proxy.listen: %w", err)
		}
		servers = append(servers, s)
	}
	for i, u := range cfg.Upstreams {
		cache.Pin(upstreamKey(cfg, u))
		rc := proxy.RouteConfig{
			Service:       upstreamKey(cfg, u),
			Protocol:      u.Protocol,
			Balancer:      u.Balancer,
			HashKey:       u.HashKey,
			Tags:          u.Tags,
			PreserveHost:  u.PreserveHost,
			Timeouts:      timeouts(u.Timeouts),
			Resilience:    u.Resilience,
			TLS:           u.TLS,
			ProxyProtocol: u.ProxyProtocol,
		}
		var s *server
		var err error
		if u.Protocol == config.ProtocolTCP {
			s, err = bindTCP(px, u.Listen, rc)
		} else {
			var h http.Handler
			if h, err = px.Upstream(u.Listen, rc); err == nil {
				s, err = bind(u.Listen, h, u.Timeouts, cfg.Proxy.MaxHeaderBytes, log)
			}
		}
		if err != nil {
			closeAll(servers)
			return nil, fmt.Errorf("upstreams[%d] (%s on %s): %w", i, u.Name, u.Listen, err)
		}
		servers = append(servers, s)
	}
	return servers, nil
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
		return nil, err
	}
	serve := func() error {
		if err := ts.Serve(ln); !errors.Is(err, net.ErrClosed) {
			return err
		}
		return nil
	}
	return &server{name: addr, ln: ln, serve: serve, shutdown: ts.Shutdown}, nil
}

func closeAll(servers []*server) {
	for _, s := range servers {
		_ = s.ln.Close()
	}
}
