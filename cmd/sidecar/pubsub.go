package main

import (
	"context"
	"fmt"
	"net"
	"reflect"
	"strconv"
	"sync"
	"time"

	"github.com/hashicorp/consul/api"
	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/zap"

	"github.com/sidecarlb/sidecar/config"
	"github.com/sidecarlb/sidecar/discovery"
	"github.com/sidecarlb/sidecar/heartbeat"
	"github.com/sidecarlb/sidecar/internal/memtune"
	"github.com/sidecarlb/sidecar/pubsub"
	"github.com/sidecarlb/sidecar/pubsub/httpbroker"
	"github.com/sidecarlb/sidecar/pubsub/natsbroker"
	"github.com/sidecarlb/sidecar/pubsub/store"
	"github.com/sidecarlb/sidecar/transcode"
)

// pubsubMemoryFloor is the lowest soft memory limit memtune sets with the
// http broker on: under the 32 MiB RSS target with the binary's own pages.
const pubsubMemoryFloor = 20 << 20

// pubsubRuntime is pub/sub wired up: the store, the publish API, the
// dispatcher, and for a subscriber the peer listener, the delivery to the
// app and one registration per group.
type pubsubRuntime struct {
	cfg        *config.Config
	store      *store.Store
	broker     pubsub.Broker // the http broker's dispatcher
	dispatcher *httpbroker.Dispatcher
	api        *pubsub.API
	app        *pubsub.App        // nil without pubsub.http.listen (no subscriber side)
	nats       *natsbroker.Broker // the nats broker, in place of the store and dispatcher
	consul     *api.Client
	servers    []*server
	log        *zap.Logger
	host       string // the group endpoints' advertised address and port
	port       int

	cancel context.CancelFunc
	wg     sync.WaitGroup // the goroutines start and reloads started

	mu       sync.Mutex      // the fields below; held by reloads and the drain
	ctx      context.Context // set by start; nil before
	groups   map[string]*groupEndpoint
	subs     []config.Subscription // as applied
	records  []httpbroker.Record
	announce context.CancelFunc // the Announce of records; nil before start
	draining bool
}

// groupEndpoint is one group's registration of the peer listener.
type groupEndpoint struct {
	r    *heartbeat.Registrar
	stop context.CancelFunc // ends its Run; nil before start
}

// newPubSub opens the store and binds the listeners; start runs the rest.
// appRegistrar is the app's own registration, nil for a client-only
// sidecar.
func newPubSub(cfg *config.Config, consul *api.Client, cache *discovery.Cache, reg prometheus.Registerer, appRegistrar *heartbeat.Registrar, log *zap.Logger) (*pubsubRuntime, error) {
	ps := &cfg.PubSub
	if ps.Broker == config.BrokerNATS {
		return newNATSPubSub(cfg, reg, appRegistrar, log)
	}
	st, err := store.Open(ps.DataDir, store.Options{})
	if err != nil {
		return nil, fmt.Errorf("pubsub.data_dir: %w", err)
	}
	metrics := pubsub.NewMetrics(reg)
	d := httpbroker.NewDispatcher(st, consul.KV(), cache, httpbroker.DispatcherOptions{Metrics: metrics}, log.Named("broker"))
	if err := d.Load(); err != nil {
		_ = st.Close()
		return nil, fmt.Errorf("pubsub.data_dir: load outbox: %w", err)
	}
	reg.MustRegister(
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "sidecar_pubsub_outbox_messages", Help: "Messages in the outbox, waiting for a final outcome in some group."},
			func() float64 { return float64(st.Pending()) }),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "sidecar_pubsub_outbox_oldest_seconds", Help: "Age of the oldest message in the outbox."},
			func() float64 { return d.Status().OldestSeconds }),
	)
	rt := &pubsubRuntime{cfg: cfg, store: st, broker: d, dispatcher: d, consul: consul, log: log}
	source := pubsub.DefaultSource
	if cfg.Service != nil {
		source = cfg.Service.Name
	}
	rt.api = pubsub.NewAPI(rt.broker, pubsub.APIOptions{Name: ps.Name, Source: source, MaxBytes: ps.MaxMessageBytesN, Metrics: metrics}, log.Named("pubsub"))
	s, err := bind(ps.Listen, rt.api, cfg.Proxy.Timeouts, cfg.Proxy.MaxHeaderBytes, log)
	if err != nil {
		_ = st.Close()
		return nil, fmt.Errorf("pubsub.listen: %w", err)
	}
	rt.servers = append(rt.servers, s)

	// The subscriber side runs with pubsub.http.listen set, subscriptions
	// or not, so a reload can add some.
	if ps.HTTP.Listen == "" || cfg.Service == nil {
		return rt, nil
	}
	healthy := func() bool { return appRegistrar.Status().CheckStatus == api.HealthPassing }
	rt.app = pubsub.NewApp(cfg.Service.ProbeAddr(), nil, healthy, metrics, log.Named("pubsub"))
	s, err = bind(ps.HTTP.Listen, httpbroker.NewServer(rt.app, log.Named("broker")), cfg.Proxy.Timeouts, cfg.Proxy.MaxHeaderBytes, log)
	if err != nil {
		rt.closeListeners()
		_ = st.Close()
		return nil, fmt.Errorf("pubsub.http.listen: %w", err)
	}
	rt.servers = append(rt.servers, s)
	host, portStr, err := net.SplitHostPort(ps.HTTP.Advertise)
	if err != nil {
		// No service.address: advertise no address, Consul gives the node's.
		_, portStr, _ = net.SplitHostPort(ps.HTTP.Listen)
	}
	rt.host = host
	rt.port, _ = strconv.Atoi(portStr)
	rt.groups = map[string]*groupEndpoint{}
	rt.setSubscriptions(cfg.Subscriptions)
	return rt, nil
}

// setSubscriptions makes subs the subscriptions in force, matched by topic
// and group: the app takes the deliveries of the new set first (a removed
// one answers "not delivered" from now on, its deliveries in flight
// finish), then a new group's endpoint registers, a gone group's
// deregisters, and the records are written again to KV when they changed.
// A gone subscription's record stays in KV: its group stays durable and
// its messages wait for another instance. rt.mu is held, or start has not
// run.
func (rt *pubsubRuntime) setSubscriptions(subs []config.Subscription) {
	appSubs := make([]pubsub.Subscription, 0, len(subs))
	records := make([]httpbroker.Record, 0, len(subs))
	groups := map[string]bool{}
	for _, sub := range subs {
		appSubs = append(appSubs, appSubscription(sub, rt.log))
		records = append(records, httpbroker.Record{
			Topic: sub.Topic, Group: sub.Group, Service: httpbroker.ServiceName(sub.Group), Delivery: sub.Delivery,
			MaxInFlight: sub.MaxInFlight, Timeout: sub.Timeout, MaxAttempts: sub.Retry.MaxAttempts,
			Backoff: sub.Retry.Backoff, MaxBackoff: sub.Retry.MaxBackoff, DeadLetter: sub.DeadLetterTopic,
			Ordering: sub.Ordering,
		})
		groups[sub.Group] = true
	}
	rt.app.Update(appSubs)
	rt.subs = subs
	for group := range groups {
		if _, ok := rt.groups[group]; ok || rt.draining {
			continue
		}
		g := &groupEndpoint{r: newGroupRegistrar(rt.cfg.Service, group, rt.host, rt.port, rt.consul.Agent(), rt.log.Named("heartbeat"))}
		rt.groups[group] = g
		rt.runGroup(g)
	}
	for group, g := range rt.groups {
		if groups[group] {
			continue
		}
		delete(rt.groups, group)
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		if err := g.r.Deregister(ctx); err != nil {
			rt.log.Warn("deregister group endpoint failed", zap.String("id", g.r.ServiceID()), zap.Error(err))
		}
		cancel()
		if g.stop != nil {
			g.stop()
		}
	}
	if !reflect.DeepEqual(records, rt.records) {
		rt.records = records
		rt.runAnnounce()
	}
}

// runGroup runs g's registrar once start has run; start runs it otherwise.
func (rt *pubsubRuntime) runGroup(g *groupEndpoint) {
	if rt.ctx == nil {
		return
	}
	ctx, cancel := context.WithCancel(rt.ctx)
	g.stop = cancel
	rt.wg.Go(func() { g.r.Run(ctx) })
}

// runAnnounce (re)starts the announcement of rt.records once start has
// run: the first pass writes every record at once.
func (rt *pubsubRuntime) runAnnounce() {
	if rt.ctx == nil {
		return
	}
	if rt.announce != nil {
		rt.announce()
	}
	if len(rt.records) == 0 {
		rt.announce = nil
		return
	}
	ctx, cancel := context.WithCancel(rt.ctx)
	rt.announce = cancel
	records := rt.records
	rt.wg.Go(func() { httpbroker.Announce(ctx, rt.consul.KV(), records, 30*time.Second, rt.log.Named("broker")) })
}

// reload applies a reload's effective config: pubsub.max_message_bytes and
// the subscriptions (see setSubscriptions). It blocks while a gone group
// deregisters (at most 5s). Nil-safe.
func (rt *pubsubRuntime) reload(cfg *config.Config) {
	if rt == nil {
		return
	}
	rt.api.SetMaxBytes(cfg.PubSub.MaxMessageBytesN)
	if rt.app == nil {
		return
	}
	rt.mu.Lock()
	defer rt.mu.Unlock()
	if !reflect.DeepEqual(cfg.Subscriptions, rt.subs) {
		rt.setSubscriptions(cfg.Subscriptions)
	}
}

// newGroupRegistrar registers the peer listener as the group's service,
// with a TTL check that follows the app's own probe.
func newGroupRegistrar(s *config.Service, group, host string, port int, agent *api.Agent, log *zap.Logger) *heartbeat.Registrar {
	var probe heartbeat.Prober
	if s.Check.HTTP != "" {
		probe = heartbeat.HTTPProbe(s.Check.HTTP, s.Check.Timeout)
	} else {
		probe = heartbeat.TCPProbe(s.ProbeAddr(), s.Check.Timeout)
	}
	name := httpbroker.ServiceName(group)
	return heartbeat.NewRegistrar(agent, heartbeat.Service{
		ID: s.ID + "-" + name, Name: name, Address: host, Port: port,
		Meta: map[string]string{"service": s.Name, "service_id": s.ID},
	}, probe, heartbeat.Options{
		Interval:                s.Check.Interval,
		Timeout:                 s.Check.Timeout,
		TTL:                     s.TTL,
		DeregisterCriticalAfter: s.DeregisterCriticalAfter,
	}, log.With(zap.String("group", group)))
}

// start runs the dispatcher, the group registrations and the announcement
// of the subscriptions until stop. A nil runtime (pub/sub off) does nothing.
func (rt *pubsubRuntime) start() {
	if rt == nil {
		return
	}
	ctx, cancel := context.WithCancel(context.Background())
	rt.cancel = cancel
	rt.wg.Go(func() { rt.broker.Run(ctx) })
	if rt.store != nil && rt.cfg.Limits.MemoryN == 0 {
		// The http broker's outbox index and the garbage of bulk publishes:
		// memory freed goes back to the OS within a second. An operator's
		// limits.memory (or GOMEMLIMIT, which memtune checks) is kept.
		rt.wg.Go(func() { memtune.Run(ctx, pubsubMemoryFloor, time.Second) })
	}
	rt.mu.Lock()
	defer rt.mu.Unlock()
	rt.ctx = ctx
	for _, g := range rt.groups {
		rt.runGroup(g)
	}
	rt.runAnnounce()
}

// beginDrain starts drain, bounded by service.drain (at least 1s; 5s for a
// client-only sidecar), and returns a channel closed when it is over: the
// app must run until then. Nil-safe.
func (rt *pubsubRuntime) beginDrain(svc *config.Service) <-chan struct{} {
	done := make(chan struct{})
	if rt == nil {
		close(done)
		return done
	}
	d := 5 * time.Second
	if svc != nil {
		d = max(svc.Drain, time.Second)
	}
	ctx, cancel := context.WithTimeout(context.Background(), d)
	go func() {
		defer close(done)
		defer cancel()
		rt.drain(ctx)
	}()
	return done
}

// drain deregisters the group endpoints, so peers stop sending, answers
// every new delivery "not delivered" (the publisher sends it elsewhere),
// and waits for the deliveries in flight until ctx ends.
func (rt *pubsubRuntime) drain(ctx context.Context) {
	drained := make(chan struct{})
	go func() {
		defer close(drained)
		if rt.app != nil {
			if err := rt.app.Drain(ctx); err != nil {
				rt.log.Warn("deliveries still in flight at the end of the drain", zap.Error(err))
			}
		}
	}()
	rt.mu.Lock()
	rt.draining = true // a reload registers no new group now
	groups := make([]*groupEndpoint, 0, len(rt.groups))
	for _, g := range rt.groups {
		groups = append(groups, g)
	}
	rt.mu.Unlock()
	for _, g := range groups {
		if err := g.r.Deregister(ctx); err != nil {
			rt.log.Warn("deregister group endpoint failed", zap.String("id", g.r.ServiceID()), zap.Error(err))
		}
	}
	<-drained
}

// stop ends the dispatcher and closes the store; call it after the
// listeners have shut down. Nil-safe.
func (rt *pubsubRuntime) stop() {
	if rt == nil {
		return
	}
	if rt.cancel != nil {
		rt.cancel()
		rt.wg.Wait()
	}
	if rt.nats != nil {
		rt.nats.Close()
		if rt.store == nil { // on_unavailable: reject
			return
		}
	}
	if err := rt.store.Close(); err != nil {
		rt.log.Warn("close store", zap.Error(err))
	}
}

func (rt *pubsubRuntime) closeListeners() {
	closeAll(rt.servers)
}

func (rt *pubsubRuntime) status() any {
	if rt.nats != nil {
		return rt.nats.Status()
	}
	return rt.dispatcher.Status()
}

// appSubscription is the delivery side of a configured subscription. A
// descriptor set that cannot be read now (config validation read it)
// leaves payloads as published, and says so.
func appSubscription(sub config.Subscription, log *zap.Logger) pubsub.Subscription {
	s := pubsub.Subscription{Topic: sub.Topic, Group: sub.Group, Route: sub.Route, ContentMode: sub.ContentMode, MaxInFlight: sub.MaxInFlight, Timeout: sub.Timeout}
	if sub.DeliverContentType == config.DeliverJSON {
		f, err := transcode.LoadFile(sub.DescriptorSet)
		if err != nil {
			log.Error("payloads are delivered as published: the descriptor set cannot be read", zap.String("topic", sub.Topic), zap.String("group", sub.Group), zap.Error(err))
			return s
		}
		s.Convert = pubsub.ProtoJSON(f.MessageJSON)
	}
	return s
}
