package main

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"os"
	"reflect"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"

	"github.com/sidecarlb/sidecar/config"
	"github.com/sidecarlb/sidecar/discovery"
	"github.com/sidecarlb/sidecar/heartbeat"
	"github.com/sidecarlb/sidecar/proxy"
)

// Reload results, the result label of sidecar_config_reloads_total.
const (
	reloadOK      = "ok"      // applied (possibly with keys that need a restart)
	reloadInvalid = "invalid" // the file did not load or validate; nothing changed
	reloadFailed  = "failed"  // valid, but a change could not be applied
)

// reloader re-reads the config file on SIGHUP or POST /reload and applies
// what config.NewReload says applies live: proxy listeners opened, closed
// (drained) and their routes swapped, the log level, the registration's
// tags, meta and weight, pub/sub's subscriptions and max_message_bytes. Reloads run one at a time; none after shutdown
// begins.
type reloader struct {
	load      func() (*config.Config, error)
	log       *zap.Logger
	level     zap.AtomicLevel
	px        *proxy.Proxy
	cache     *discovery.Cache
	backend   discovery.Backend    // the cache's; *discovery.Consul takes stale_for live
	registrar *heartbeat.Registrar // nil for a client-only sidecar
	pubsub    *pubsubRuntime       // nil without pub/sub
	reopen    func() error         // opens the access log file again; nil: none
	start     func(*server)        // serves a newly bound listener
	drain     *sync.WaitGroup      // listeners closed by a reload, until drained

	reloads *prometheus.CounterVec
	lastOK  prometheus.Gauge

	running   atomic.Pointer[config.Config] // the effective config, for /config
	readySent readyNotice                   // systemd was told READY=1

	mu      sync.Mutex
	forward *server            // nil without proxy.listen
	ups     map[string]*server // upstream listeners by listen address
	closed  bool
}

// init registers the reload metrics with reg and takes over the running
// config and its proxy listeners; start and drain must be set before the
// first reload.
func (r *reloader) init(cfg *config.Config, servers []*server, reg prometheus.Registerer) {
	r.ups = make(map[string]*server, len(cfg.Upstreams))
	r.reloads = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "sidecar_config_reloads_total",
		Help: "Config reloads (SIGHUP, sidecar reload), by result: ok, invalid (the file was rejected) or failed (a change could not be applied).",
	}, []string{"result"})
	r.lastOK = prometheus.NewGauge(prometheus.GaugeOpts{
		Name: "sidecar_config_last_reload_success_timestamp_seconds",
		Help: "When the config was last loaded successfully, at start or by a reload, in Unix seconds.",
	})
	for _, res := range []string{reloadOK, reloadInvalid, reloadFailed} {
		r.reloads.WithLabelValues(res)
	}
	reg.MustRegister(r.reloads, r.lastOK)
	r.lastOK.SetToCurrentTime()
	r.running.Store(cfg)
	for _, s := range servers {
		if cfg.Proxy.Listen != "" && s.name == cfg.Proxy.Listen {
			r.forward = s
		} else {
			r.ups[s.name] = s
		}
	}
}

// reloadResult is the answer of POST /reload, as `sidecar reload` prints it.
type reloadResult struct {
	Result string `json:"result"` // ok, invalid or failed
	// Errors are the file's problems (invalid), one per line as
	// `sidecar validate` prints them, or what could not be applied.
	Errors []string `json:"errors,omitempty"`
	// Live names the keys whose change was applied, Restart those kept at
	// their running value until a restart.
	Live    []string `json:"live,omitempty"`
	Restart []string `json:"restart,omitempty"`
	// Opened and Closed are the listener addresses the reload bound and
	// closed (closed ones drain in the background).
	Opened  []string `json:"opened,omitempty"`
	Closed  []string `json:"closed,omitempty"`
	Seconds float64  `json:"seconds"`
}

// handleHUP reloads on every signal from hup until ctx ends.
func (r *reloader) handleHUP(ctx context.Context, hup <-chan os.Signal) {
	for {
		select {
		case <-ctx.Done():
			return
		case <-hup:
			r.reload("SIGHUP")
		}
	}
}

// ServeHTTP is POST /reload: 200 with the result when applied, 400 when
// the file is invalid, 500 when a change failed, 503 once shutting down.
func (r *reloader) ServeHTTP(w http.ResponseWriter, _ *http.Request) {
	res := r.reload("admin")
	code := http.StatusOK
	switch res.Result {
	case reloadInvalid:
		code = http.StatusBadRequest
	case reloadFailed:
		code = http.StatusInternalServerError
	case "":
		code, res.Result = http.StatusServiceUnavailable, reloadFailed
		res.Errors = []string{"shutting down"}
	}
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(code)
	_ = json.NewEncoder(w).Encode(res)
}

// reload re-reads the file and applies it. It blocks until the change is
// applied (not until closed listeners have drained). After close it does
// nothing and returns a zero result.
func (r *reloader) reload(trigger string) reloadResult {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.closed {
		return reloadResult{}
	}
	announced := notifyReloading(&r.readySent, r.log)
	defer notifyReloaded(announced, r.log)
	// Every reload lets a rotated access log go, whatever the file says.
	if r.reopen != nil {
		if err := r.reopen(); err != nil {
			r.log.Error("access log not reopened; writing on to the old file", zap.Error(err))
		}
	}
	start := time.Now()
	res := r.safeApply()
	took := time.Since(start)
	res.Seconds = took.Seconds()
	r.reloads.WithLabelValues(res.Result).Inc()
	fields := []zap.Field{zap.String("trigger", trigger), zap.Duration("took", took)}
	switch res.Result {
	case reloadInvalid:
		r.log.Error("config reload rejected", append(fields, zap.Strings("errors", res.Errors))...)
		return res
	case reloadFailed:
		r.log.Error("config reload failed", append(fields, zap.Strings("errors", res.Errors), zap.Strings("applied", res.Live))...)
	default:
		r.lastOK.SetToCurrentTime()
		r.log.Info("config reloaded", append(fields, zap.Strings("applied", res.Live),
			zap.Strings("opened", res.Opened), zap.Strings("closed", res.Closed))...)
	}
	for _, key := range res.Restart {
		r.log.Warn("config change needs a restart", zap.String("key", key))
	}
	return res
}

// safeApply is apply, with a panic logged and reported as a failed reload
// rather than ending the sidecar.
func (r *reloader) safeApply() (res reloadResult) {
	defer func() {
		if v := recover(); v != nil {
			r.log.Error("config reload panicked", zap.Any("panic", v), zap.Stack("stack"))
			res = reloadResult{Result: reloadFailed, Errors: []string{fmt.Sprintf("panic: %v", v)}}
		}
	}()
	return r.apply()
}

// apply loads the file and applies it; r.mu is held. New listeners are
// bound first, so a port that cannot be bound rejects the reload before
// anything changed.
func (r *reloader) apply() reloadResult {
	next, err := r.load()
	if err != nil {
		return reloadResult{Result: reloadInvalid, Errors: strings.Split(strings.TrimSpace(err.Error()), "\n")}
	}
	running := r.running.Load()
	rel := config.NewReload(running, next)
	eff := rel.Effective
	res := reloadResult{Result: reloadOK, Restart: rel.Restart}
	if !rel.Changed() {
		return res
	}

	// Bind the new listeners; any failure undoes the others.
	added, err := r.bindNew(eff)
	if err != nil {
		res.Result, res.Live = reloadFailed, nil
		res.Errors = []string{err.Error()}
		return res
	}

	// Swap the routes of the listeners that stay, close those that go.
	old := make(map[string]config.Upstream, len(running.Upstreams))
	for _, u := range running.Upstreams {
		old[u.Listen] = u
	}
	for i, u := range eff.Upstreams {
		if s, ok := added[u.Listen]; ok {
			r.ups[u.Listen] = s
			r.start(s)
			res.Opened = append(res.Opened, u.Listen)
			continue
		}
		if reflect.DeepEqual(old[u.Listen], u) {
			continue
		}
		if err := r.ups[u.Listen].update(upstreamRoute(eff, u)); err != nil {
			eff.Upstreams[i] = old[u.Listen] // still running as it was
			res.Result = reloadFailed
			res.Errors = append(res.Errors, fmt.Sprintf("upstreams[%d] (%s on %s): %v", i, u.Name, u.Listen, err))
		}
	}
	for addr, s := range r.ups {
		if !hasListen(eff.Upstreams, addr) {
			delete(r.ups, addr)
			r.closeListener(s)
			res.Closed = append(res.Closed, addr)
		}
	}
	repin(r.cache, running, eff)
	if r.forward != nil && !reflect.DeepEqual(forwardRoute(running.Proxy), forwardRoute(eff.Proxy)) {
		if err := r.forward.update(forwardRoute(eff.Proxy)); err != nil {
			eff.Proxy = running.Proxy
			res.Result = reloadFailed
			res.Errors = append(res.Errors, fmt.Sprintf("proxy: %v", err))
		}
	}

	r.applyLive(eff, running)
	r.running.Store(eff)
	res.Live = config.NewReload(running, eff).Live // less what failed
	return res
}

// bindNew binds the listeners of eff's upstreams that are not running
// yet. On a failure it closes those it bound and names the upstream.
func (r *reloader) bindNew(eff *config.Config) (map[string]*server, error) {
	added := map[string]*server{}
	for i, u := range eff.Upstreams {
		if _, ok := r.ups[u.Listen]; ok {
			continue
		}
		s, err := listenUpstream(eff, u, r.px, r.cache, r.log)
		if err != nil {
			for _, s := range added {
				_ = s.ln.Close()
				s.retire()
			}
			return nil, fmt.Errorf("upstreams[%d] (%s on %s): %v", i, u.Name, u.Listen, err)
		}
		added[u.Listen] = s
	}
	return added, nil
}

// applyLive applies the keys that change in place, without a listener:
// discovery's tuning, the log level, the registration's tags, meta and
// weight, and the subscriptions.
func (r *reloader) applyLive(eff, running *config.Config) {
	if d := eff.Discovery; !reflect.DeepEqual(d, running.Discovery) {
		r.cache.Tune(cacheOptions(d))
		if c, ok := r.backend.(*discovery.Consul); ok {
			c.SetTimeouts(d.StaleFor, d.ResolveTimeout)
		}
	}
	if l, err := zapcore.ParseLevel(eff.Log.Level); err == nil {
		r.level.SetLevel(l)
	}
	if r.registrar != nil && eff.Service != nil && running.Service != nil {
		e, o := eff.Service, running.Service
		if !reflect.DeepEqual(e.Tags, o.Tags) || !reflect.DeepEqual(e.Meta, o.Meta) || e.Weight != o.Weight {
			r.registrar.Update(heartbeat.Live{Tags: e.Tags, Meta: e.Meta, Weight: e.Weight})
		}
	}
	if !reflect.DeepEqual(eff.Subscriptions, running.Subscriptions) || eff.PubSub.MaxMessageBytesN != running.PubSub.MaxMessageBytesN {
		r.pubsub.reload(eff)
	}
}

func hasListen(us []config.Upstream, addr string) bool {
	for _, u := range us {
		if u.Listen == addr {
			return true
		}
	}
	return false
}

// closeListener stops accepting on s at once and lets its requests in
// flight finish, within shutdownTimeout, in the background.
func (r *reloader) closeListener(s *server) {
	r.drain.Add(1)
	go func() {
		defer r.drain.Done()
		defer func() {
			if v := recover(); v != nil {
				r.log.Error("closing a listener panicked", zap.String("listener", s.name), zap.Any("panic", v), zap.Stack("stack"))
			}
		}()
		ctx, cancel := context.WithTimeout(context.Background(), shutdownTimeout)
		defer cancel()
		if err := s.shutdown(ctx); err != nil {
			r.log.Warn("listener did not close in time", zap.String("listener", s.name), zap.Error(err))
		}
		s.retire()
		r.log.Info("listener closed", zap.String("listener", s.name))
	}()
}

// close ends reloading and returns the proxy listeners open now, for the
// shutdown to close.
func (r *reloader) close() []*server {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.closed = true
	var servers []*server
	if r.forward != nil {
		servers = append(servers, r.forward)
	}
	for _, s := range r.ups {
		servers = append(servers, s)
	}
	return servers
}

// config returns the effective running configuration, for GET /config.
func (r *reloader) config() *config.Config { return r.running.Load() }

// upstreamKeys are the discovery keys of the upstreams of the config in
// effect, for /ready; nil before init, when readiness uses its own.
func (r *reloader) upstreamKeys() []string {
	eff := r.config()
	if eff == nil {
		return nil
	}
	keys := make([]string, 0, len(eff.Upstreams))
	for _, u := range eff.Upstreams {
		keys = append(keys, upstreamKey(eff, u))
	}
	return keys
}

// repin pins the services of eff's upstreams and unpins those of running's
// that eff no longer names, so that the cache may evict them.
func repin(cache *discovery.Cache, running, eff *config.Config) {
	keep := make(map[string]bool, len(eff.Upstreams))
	for _, u := range eff.Upstreams {
		k := upstreamKey(eff, u)
		keep[k] = true
		cache.Pin(k)
	}
	for _, u := range running.Upstreams {
		if k := upstreamKey(running, u); !keep[k] {
			cache.Unpin(k)
		}
	}
}
