package pubsub

import (
	"context"
	"encoding/json"
	"errors"
	"io"
	"net"
	"net/http"
	"net/url"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"go.uber.org/zap"

	"github.com/sidecarlb/sidecar/internal/h1"
)

// Subscription is one topic the local app receives, as the subscriber's
// sidecar delivers it.
type Subscription struct {
	Topic       string
	Group       string
	Route       string // path on the app
	ContentMode string // structured, binary or raw
	MaxInFlight int
	Timeout     time.Duration
	// Convert, when set, turns each message into the form the app asked
	// for (deliver_content_type) before it is sent.
	Convert Converter
}

// App delivers messages to the local app: POST service.address:port+route,
// at most MaxInFlight at once per subscription, none while the app is
// unhealthy or the sidecar is draining. Safe for concurrent use.
type App struct {
	host     string // the app's host:port
	pool     *h1.Pool
	healthy  func() bool
	metrics  *Metrics
	log      *zap.Logger
	subs     atomic.Pointer[map[subKey]*appSub] // replaced whole by Update
	draining atomic.Bool
	// drainMu orders inflight.Add after the draining check against
	// Drain's Wait: a WaitGroup must not grow from zero during a Wait.
	drainMu  sync.Mutex
	inflight sync.WaitGroup
}

type subKey struct{ topic, group string }

type appSub struct {
	Subscription
	sem    chan struct{}
	url    *url.URL // http://host:port + Route, shared read-only by every request
	urlErr error    // why Route does not make a URL
}

// Bounds of the connections to the app.
const (
	appConnectTimeout = 2 * time.Second
	appIdleTimeout    = 90 * time.Second
)

// NewApp returns an App delivering to the app at addr (host:port). healthy
// reports the app's check; nil means always healthy. Deliveries go over
// the sidecar's own HTTP/1.1 client pool (internal/h1), keep-alive
// connections that the subscriptions' max_in_flight bound: a delivery
// takes a connection only while it holds one of its subscription's slots.
func NewApp(addr string, subs []Subscription, healthy func() bool, metrics *Metrics, log *zap.Logger) *App {
	a := &App{
		host:    addr,
		pool:    h1.NewPool(appConnectTimeout, appIdleTimeout, nil),
		healthy: healthy,
		metrics: metrics,
		log:     log,
	}
	a.Update(subs)
	return a
}

// Update replaces the subscriptions, matched by topic and group, for the
// deliveries that start after it returns: a delivery in flight finishes
// with the subscription it started with; one of a removed subscription
// answers NotDelivered (the publisher sends it to another instance). A
// subscription whose max_in_flight stays keeps its slots, so the bound
// holds across the change; a new bound starts with fresh slots, and the
// deliveries in flight under the old one are not counted against it.
// Update must not be called concurrently with itself; it is safe alongside
// Deliver.
func (a *App) Update(subs []Subscription) {
	var old map[subKey]*appSub // nil (empty) on the first call
	if p := a.subs.Load(); p != nil {
		old = *p
	}
	m := make(map[subKey]*appSub, len(subs))
	for _, s := range subs {
		k := subKey{s.Topic, s.Group}
		as := &appSub{Subscription: s}
		as.url, as.urlErr = url.Parse("http://" + a.host + s.Route)
		if o, ok := old[k]; ok && o.MaxInFlight == s.MaxInFlight {
			as.sem = o.sem
		} else {
			as.sem = make(chan struct{}, s.MaxInFlight)
		}
		m[k] = as
	}
	a.subs.Store(&m)
}

// Has reports whether topic and group are subscribed here.
func (a *App) Has(topic, group string) bool {
	_, ok := (*a.subs.Load())[subKey{topic, group}]
	return ok
}

// Ready reports whether a delivery now could reach the app: the sidecar is
// not draining and the app's check passes.
func (a *App) Ready() bool {
	return !a.draining.Load() && (a.healthy == nil || a.healthy())
}

// Drain stops new deliveries (they answer NotDelivered) and waits for those
// in flight, until ctx ends.
func (a *App) Drain(ctx context.Context) error {
	a.drainMu.Lock()
	a.draining.Store(true)
	a.drainMu.Unlock()
	done := make(chan struct{})
	go func() { a.inflight.Wait(); close(done) }()
	select {
	case <-done:
		return nil
	case <-ctx.Done():
		select {
		case <-done:
			return nil
		default:
			return ctx.Err()
		}
	}
}

// Deliver delivers m, the attempt-th attempt, to the app. It waits for one
// of the subscription's MaxInFlight slots while ctx lasts; once the app has
// the request, the delivery runs to its own timeout even if ctx ends.
func (a *App) Deliver(ctx context.Context, group string, m *Message, attempt int) Result {
	s, ok := (*a.subs.Load())[subKey{m.Topic, group}]
	switch {
	case !ok:
		return Result{Outcome: NotDelivered, Reason: "not subscribed here"}
	case a.draining.Load():
		return Result{Outcome: NotDelivered, Reason: "draining"}
	case a.healthy != nil && !a.healthy():
		return Result{Outcome: NotDelivered, Reason: "app unhealthy"}
	}
	select {
	case s.sem <- struct{}{}:
	case <-ctx.Done():
		return Result{Outcome: NotDelivered, Reason: "gave up waiting for a slot"}
	}
	defer func() { <-s.sem }()
	a.drainMu.Lock()
	if a.draining.Load() {
		a.drainMu.Unlock()
		return Result{Outcome: NotDelivered, Reason: "draining"}
	}
	a.inflight.Add(1)
	a.drainMu.Unlock()
	defer a.inflight.Done()
	var g interface {
		Inc()
		Dec()
	}
	if a.metrics != nil {
		g = a.metrics.InFlight.WithLabelValues(m.Topic, group)
		g.Inc()
		defer g.Dec()
	}
	// Detached from ctx: once the app has the request it runs to its
	// own timeout.
	r := a.post(s, m, attempt)
	if a.metrics != nil {
		a.metrics.Delivered.WithLabelValues(m.Topic, group, r.Outcome.String()).Inc()
	}
	return r
}

func (a *App) post(s *appSub, m *Message, attempt int) Result {
	ctx := deadlineContext{Context: context.Background(), deadline: time.Now().Add(s.Timeout)}
	if s.Convert != nil {
		if c, err := s.Convert(m); err != nil {
			a.log.Warn("payload delivered as published: it could not be converted", zap.String("topic", m.Topic), zap.String("id", m.ID), zap.Error(err))
		} else {
			m = c
		}
	}
	var body []byte
	ct := m.DataContentType
	if s.ContentMode == "structured" {
		body, ct = m.Structured(), "application/cloudevents+json"
	} else {
		body = m.Data
	}
	if s.urlErr != nil {
		return Result{Outcome: DeadLetter, Reason: "bad request: " + s.urlErr.Error()}
	}
	// The request as http.NewRequestWithContext would build it, without
	// parsing the URL each time.
	n := 3
	if s.ContentMode == "binary" {
		n = 10 + len(m.Extensions)
	}
	req := (&http.Request{Method: http.MethodPost, URL: s.url, Host: a.host, Proto: "HTTP/1.1", ProtoMajor: 1, ProtoMinor: 1,
		Header: make(http.Header, n), ContentLength: int64(len(body))}).WithContext(ctx)
	var hb h1.Body // nil for an empty body
	if len(body) > 0 {
		hb = heldBody(body)
	}
	req.Header["Content-Type"] = []string{ct}
	req.Header["Sidecar-Delivery-Attempt"] = []string{strconv.Itoa(attempt)}
	switch s.ContentMode {
	case "binary":
		req.Header.Set("ce-specversion", SpecVersion)
		req.Header.Set("ce-id", m.ID)
		req.Header.Set("ce-source", m.Source)
		req.Header.Set("ce-type", m.Type)
		req.Header.Set("ce-time", m.Time.UTC().Format(time.RFC3339Nano))
		req.Header.Set("ce-topic", m.Topic)
		req.Header.Set("ce-pubsubname", m.PubsubName)
		for name, v := range m.Extensions {
			req.Header.Set("ce-"+name, extValue(v))
		}
	case "raw":
		req.Header.Set("ce-id", m.ID)
	}
	resp, err := a.pool.RoundTrip(req, hb, time.Now())
	if err != nil {
		var op *net.OpError
		if errors.As(err, &op) && op.Op == "dial" {
			return Result{Outcome: NotDelivered, Reason: "app not reachable: " + err.Error()}
		}
		if errors.Is(err, context.DeadlineExceeded) {
			return Result{Outcome: Retry, Reason: "timeout after " + s.Timeout.String()}
		}
		return Result{Outcome: Retry, Reason: err.Error()}
	}
	defer resp.Body.Close()
	rb, _ := io.ReadAll(io.LimitReader(resp.Body, 64<<10))
	return Classify(resp.StatusCode, resp.Header, rb)
}

// deadlineContext is a context with a deadline and no Done channel: what
// a delivery's request needs. h1.Pool sets the deadline on the
// connection (and the dial), and names an I/O timeout past it
// context.DeadlineExceeded, so no timer or context.AfterFunc is set up per
// delivery as context.WithTimeout would.
type deadlineContext struct {
	context.Context
	deadline time.Time
}

func (c deadlineContext) Deadline() (time.Time, bool) { return c.deadline, true }

// heldBody is a request body held in memory, as h1.Pool takes it: a
// delivery may be sent again on a fresh connection when a reused one
// turns out to have been closed before the app read any of it.
type heldBody []byte

func (b heldBody) Bytes() []byte    { return b }
func (b heldBody) Replayable() bool { return true }

// extValue renders an extension attribute for a ce- header: a string
// without its quotes, anything else as its JSON text.
func extValue(v []byte) string {
	var s string
	if json.Unmarshal(v, &s) == nil {
		return s
	}
	return string(v)
}
