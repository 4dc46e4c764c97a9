// Package admin serves the sidecar's loopback admin listener: liveness,
// readiness, a JSON status document (also as a stream of server-sent
// events), the live dashboard at GET / and Prometheus metrics.
package admin

import (
	"crypto/subtle"
	"encoding/json"
	"net/http"
	"sort"
	"sync"
	"time"

	"github.com/sidecarlb/sidecar/admin/dashboard"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"gopkg.in/yaml.v3"
)

// Options configure the admin handler.
type Options struct {
	// Version is reported in /status.
	Version string
	// Sections are the parts of /status, by key; each func is called per
	// request and must be safe for concurrent use.
	Sections map[string]func() any
	// Gatherer serves /metrics; if nil, /metrics is not served.
	Gatherer prometheus.Gatherer
	// Now is the clock; if nil, time.Now is used.
	Now func() time.Time
	// Token, if set, is the bearer token ("Authorization: Bearer TOKEN")
	// that requests other than GET and HEAD on routes added with Handle
	// must carry; without it they get 401.
	Token string
	// Ready reports readiness for GET /ready and, if not ready, a one-line
	// reason; it is called per request, must not block and must be safe
	// for concurrent use. If nil, /ready answers as /healthz does.
	Ready func() (ready bool, reason string)
	// StreamEvery is how often GET /status/stream sends the status
	// document; if zero, 250ms is used.
	StreamEvery time.Duration
}

// Handler is the admin listener's handler.
type Handler struct {
	mux     *http.ServeMux
	opts    Options
	started time.Time

	closeOnce sync.Once
	closing   chan struct{} // closed by Close: streams end

	streamMu  sync.Mutex // guards what every stream shares:
	streamAt  time.Time  // when streamDoc was built
	streamDoc []byte     // the status document, uptime left out
	streamMsg []byte     // the event that carries it
}

// New returns the admin handler.
func New(opts Options) *Handler {
	if opts.Now == nil {
		opts.Now = time.Now
	}
	if opts.StreamEvery <= 0 {
		opts.StreamEvery = 250 * time.Millisecond
	}
	h := &Handler{mux: http.NewServeMux(), opts: opts, started: opts.Now(), closing: make(chan struct{})}
	h.mux.HandleFunc("GET /healthz", h.healthz)
	h.mux.HandleFunc("GET /ready", h.ready)
	h.mux.HandleFunc("GET /status", h.status)
	// The dashboard and its stream show what /status does, so they are
	// read as /status is: GET needs no token.
	h.mux.HandleFunc("GET /status/stream", h.stream)
	dashboard.Register(h.mux)
	if opts.Gatherer != nil {
		h.mux.Handle("GET /metrics", promhttp.HandlerFor(opts.Gatherer, promhttp.HandlerOpts{}))
	}
	return h
}

// Handle adds a route to the admin listener, e.g. for app control. With
// Options.Token set, its requests other than GET and HEAD need the token.
func (h *Handler) Handle(pattern string, handler http.Handler) {
	h.mux.Handle(pattern, RequireToken(h.opts.Token, handler))
}

// HandlePrivate adds a route whose every request, GET and HEAD included,
// needs the token when Options.Token is set: for what shows more than
// /status does, such as the running config, and for an action that must
// also be reachable by GET (a Kubernetes httpGet hook can send nothing else).
func (h *Handler) HandlePrivate(pattern string, handler http.Handler) {
	h.mux.Handle(pattern, requireTokenAlways(h.opts.Token, handler))
}

// RequireToken wraps next so that requests other than GET and HEAD must
// carry "Authorization: Bearer token"; others get 401. An empty token
// lets everything through.
func RequireToken(token string, next http.Handler) http.Handler {
	if token == "" {
		return next
	}
	always := requireTokenAlways(token, next)
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Method == http.MethodGet || r.Method == http.MethodHead {
			next.ServeHTTP(w, r)
			return
		}
		always.ServeHTTP(w, r)
	})
}

// requireTokenAlways wraps next so that every request must carry
// "Authorization: Bearer token"; an empty token lets everything through.
func requireTokenAlways(token string, next http.Handler) http.Handler {
	if token == "" {
		return next
	}
	want := []byte("Bearer " + token)
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if subtle.ConstantTimeCompare([]byte(r.Header.Get("Authorization")), want) != 1 {
			w.Header().Set("WWW-Authenticate", `Bearer realm="sidecar admin"`)
			http.Error(w, "missing or wrong admin token (admin.token)", http.StatusUnauthorized)
			return
		}
		next.ServeHTTP(w, r)
	})
}

// Document returns the handler of a read-only document: doc() as indented
// JSON, or as YAML with ?format=yaml; 500 when doc fails. doc is called per
// request and must be safe for concurrent use.
func Document(doc func() (any, error)) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		v, err := doc()
		if err != nil {
			http.Error(w, err.Error(), http.StatusInternalServerError)
			return
		}
		w.Header().Set("Cache-Control", "no-store")
		if r.URL.Query().Get("format") == "yaml" {
			w.Header().Set("Content-Type", "application/yaml")
			_ = yaml.NewEncoder(w).Encode(v)
			return
		}
		w.Header().Set("Content-Type", "application/json")
		enc := json.NewEncoder(w)
		enc.SetIndent("", "  ")
		_ = enc.Encode(v)
	})
}

func (h *Handler) ServeHTTP(w http.ResponseWriter, r *http.Request) { h.mux.ServeHTTP(w, r) }

func (h *Handler) healthz(w http.ResponseWriter, _ *http.Request) {
	w.Header().Set("Content-Type", "text/plain; charset=utf-8")
	_, _ = w.Write([]byte("ok\n"))
}

// readyDoc is the JSON body of /ready.
type readyDoc struct {
	Ready  bool   `json:"ready"`
	Reason string `json:"reason,omitempty"`
}

// ready answers 200 {"ready":true} or 503 {"ready":false,"reason":"..."}.
func (h *Handler) ready(w http.ResponseWriter, _ *http.Request) {
	doc := readyDoc{Ready: true}
	if h.opts.Ready != nil {
		doc.Ready, doc.Reason = h.opts.Ready()
	}
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Cache-Control", "no-store")
	if !doc.Ready {
		w.WriteHeader(http.StatusServiceUnavailable)
	}
	_ = json.NewEncoder(w).Encode(doc)
}

// Close ends the status streams in progress, so that shutting the admin
// listener down need not wait for the dashboards watching it. Later
// streams end at once. Safe to call more than once.
func (h *Handler) Close() { h.closeOnce.Do(func() { close(h.closing) }) }

func (h *Handler) status(w http.ResponseWriter, _ *http.Request) {
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Cache-Control", "no-store")
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	_ = enc.Encode(h.document())
}

// document is the /status document: version, uptime and every section.
func (h *Handler) document() map[string]any {
	doc := map[string]any{
		"version":        h.opts.Version,
		"uptime_seconds": h.opts.Now().Sub(h.started).Seconds(),
	}
	keys := make([]string, 0, len(h.opts.Sections))
	for k := range h.opts.Sections {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	for _, k := range keys {
		doc[k] = h.opts.Sections[k]()
	}
	return doc
}
