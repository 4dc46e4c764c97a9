// Package heartbeat registers the local app in Consul with a TTL check and
// keeps that check in step with a probe of the app.
//
// A Registrar owns one service instance. Run registers it with the local
// agent (retrying with jittered backoff while the agent is unreachable),
// probes the app every interval, and reports to the TTL check: a change of
// status at once, the steady state at least every TTL/3 so the TTL never
// lapses. When the agent has forgotten the service (it restarted), Run
// registers it again. Deregister removes the service on shutdown; Run never
// does, so the caller can order deregister → drain → exit. Update registers
// it again with new tags, meta and weight (a config reload), the check
// keeping its status.
//
// # Overrides
//
// SetOverride forces the check to a status with a reason, whatever the probe
// says, and reports it at once; ClearOverride hands control back to the
// probe. The app runner uses them to
//
//   - fail the check the moment the app exits: SetOverride(api.HealthCritical,
//     "app exited: exit status 1");
//   - hold the instance out of rotation while the app starts, or pause it
//     during a rolling restart: SetOverride(api.HealthCritical, "starting")
//     before or during Run, then ClearOverride once the process is up.
//
// After ClearOverride the override's status stays until a probe started after
// the clear has finished, so a probe result from before the override can
// never put the instance back in rotation. The probe runs at once on clear.
package heartbeat

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"os"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hashicorp/consul/api"
	"go.uber.org/zap"

	"github.com/sidecarlb/sidecar/internal/backoff"
)

// Agent is the part of *api.Agent the Registrar uses; *api.Agent satisfies it.
//
// The Registrar passes its context through opts and q (WithContext), so a
// call returns once that context ends. Calls are never concurrent.
type Agent interface {
	ServiceRegisterOpts(reg *api.AgentServiceRegistration, opts api.ServiceRegisterOpts) error
	ServiceDeregisterOpts(serviceID string, q *api.QueryOptions) error
	UpdateTTLOpts(checkID, output, status string, q *api.QueryOptions) error
}

// Service describes the instance to register.
type Service struct {
	// ID is unique among the agent's services. If empty,
	// DefaultID(Name, Address, Port) is used, with the hostname for an empty
	// Address.
	ID      string
	Name    string
	Address string
	Port    int
	Tags    []string
	Meta    map[string]string
	// Weight, if positive, is registered as the passing weight (warning
	// weight 1, Consul's default); if zero, Consul's default of 1 applies.
	Weight int
}

// Options tune a Registrar. Zero values select the documented defaults.
type Options struct {
	// Interval between probes. If zero, 1s is used.
	Interval time.Duration
	// Timeout bounds each probe. If zero, 1s is used.
	Timeout time.Duration
	// TTL of the Consul check; the check is refreshed at least every TTL/3.
	// If zero, 5s is used.
	TTL time.Duration
	// DeregisterCriticalAfter is how long Consul keeps the service while its
	// check is critical before removing it. If zero, 1m is used.
	DeregisterCriticalAfter time.Duration
}

func (o Options) withDefaults() Options {
	def := func(d *time.Duration, v time.Duration) {
		if *d <= 0 {
			*d = v
		}
	}
	def(&o.Interval, time.Second)
	def(&o.Timeout, time.Second)
	def(&o.TTL, 5*time.Second)
	def(&o.DeregisterCriticalAfter, time.Minute)
	return o
}

// Status is a snapshot of a Registrar's state, for the admin endpoint.
type Status struct {
	ServiceID string `json:"service_id"`
	CheckID   string `json:"check_id"`
	// Registered is true while the agent is believed to know the service.
	Registered bool `json:"registered"`
	// CheckStatus and Output are what the check should show: the last probe
	// or the override ("passing", "warning" or "critical").
	CheckStatus string `json:"check_status"`
	Output      string `json:"output"`
	// Overridden is true while SetOverride decides the check.
	Overridden bool `json:"overridden"`
	// LastProbe is when the last probe finished; zero before the first.
	LastProbe time.Time `json:"last_probe"`
	// LastPass is when the last probe that passed finished; zero before
	// the first. ProbeFailures counts the probes that failed.
	LastPass      time.Time `json:"last_pass,omitzero"`
	ProbeFailures int       `json:"probe_failures"`
	// LastUpdate is when Consul last accepted the check's status.
	LastUpdate time.Time `json:"last_update"`
	// LastError is the last Consul error, cleared by the next success.
	LastError string `json:"last_error,omitempty"`
	// Registrations counts successful registrations, including repeats
	// after the agent forgot the service.
	Registrations int  `json:"registrations"`
	Deregistered  bool `json:"deregistered,omitempty"`
}

// Registrar keeps one service registered in the local Consul agent with a
// TTL check that follows a probe of the app. Its methods are safe for
// concurrent use.
type Registrar struct {
	agent   Agent
	svc     Service
	checkID string
	probe   Prober
	opts    Options
	log     *zap.Logger

	running atomic.Bool
	stopped atomic.Bool   // set by Deregister: Run calls Consul no more
	resumed atomic.Bool   // set by Register: Run must register again
	changed atomic.Bool   // set by Update: Run must register again
	sem     chan struct{} // serialises Consul calls of Run and Deregister
	wake    chan struct{} // the override changed

	mu       sync.Mutex
	live     Live    // the registration's tags, meta and weight; Update sets it
	override *report // nil when the probe decides
	cleared  *report // the override ClearOverride last removed
	ovSeq    uint64  // bumped on every SetOverride and ClearOverride
	status   Status
}

// report is what the check shows.
type report struct{ status, output string }

// NewRegistrar returns a Registrar for svc that reports probe's results
// through agent. It does nothing until Run is called. A nil log discards.
func NewRegistrar(agent Agent, svc Service, probe Prober, opts Options, log *zap.Logger) *Registrar {
	if svc.ID == "" {
		host := svc.Address
		if host == "" {
			host, _ = os.Hostname()
		}
		svc.ID = DefaultID(svc.Name, host, svc.Port)
	}
	if log == nil {
		log = zap.NewNop()
	}
	checkID := "service:" + svc.ID + ":ttl"
	r := &Registrar{
		agent:   agent,
		svc:     svc,
		checkID: checkID,
		probe:   probe,
		opts:    opts.withDefaults(),
		log:     log.With(zap.String("service", svc.ID), zap.String("check", checkID)),
		sem:     make(chan struct{}, 1),
		wake:    make(chan struct{}, 1),
	}
	r.live = Live{Tags: svc.Tags, Meta: svc.Meta, Weight: svc.Weight}
	r.status = Status{
		ServiceID:   svc.ID,
		CheckID:     checkID,
		CheckStatus: api.HealthCritical,
		Output:      "waiting for first probe",
	}
	return r
}

// DefaultID derives an instance ID from the service name, host and port
// ("web-10.0.0.7-8080"). Characters other than letters, digits, '.', '_'
// and '-' become '-', since the ID appears in agent URL paths.
func DefaultID(name, host string, port int) string {
	parts := []string{name}
	if host != "" {
		parts = append(parts, host)
	}
	if port > 0 {
		parts = append(parts, strconv.Itoa(port))
	}
	return strings.Map(func(c rune) rune {
		switch {
		case c >= 'a' && c <= 'z', c >= 'A' && c <= 'Z', c >= '0' && c <= '9',
			c == '.', c == '_', c == '-':
			return c
		}
		return '-'
	}, strings.Join(parts, "-"))
}

// ServiceID returns the ID the service is registered under.
func (r *Registrar) ServiceID() string { return r.svc.ID }

// CheckID returns the ID of the TTL check, "service:<service id>:ttl".
func (r *Registrar) CheckID() string { return r.checkID }

// Status returns a snapshot of the Registrar's state. It does not block.
func (r *Registrar) Status() Status {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.status
}

// SetOverride makes the check show status (api.HealthPassing, HealthWarning
// or HealthCritical; any other value counts as critical) with reason as its
// output, whatever the probe says, until ClearOverride. A running Registrar
// reports it at once. SetOverride does not block.
func (r *Registrar) SetOverride(status, reason string) {
	switch status {
	case api.HealthPassing, api.HealthWarning, api.HealthCritical:
	default:
		status = api.HealthCritical
	}
	r.mu.Lock()
	r.override = &report{status: status, output: reason}
	r.ovSeq++
	r.mu.Unlock()
	r.signal()
}

// ClearOverride lets the probe decide the check again. The override's status
// and reason stay until a probe started after this call finishes; a running
// Registrar starts one at once. Without an override, ClearOverride does
// nothing. It does not block.
func (r *Registrar) ClearOverride() {
	r.mu.Lock()
	if r.override == nil {
		r.mu.Unlock()
		return
	}
	r.cleared, r.override = r.override, nil
	r.ovSeq++
	r.mu.Unlock()
	r.signal()
}

// signal wakes Run to take up a changed override.
func (r *Registrar) signal() {
	select {
	case r.wake <- struct{}{}:
	default:
	}
}

// Deregister removes the service and its check from the agent; afterwards the
// Registrar never registers or updates it again, though Run keeps probing
// until its context ends. A service the agent does not know counts as
// removed. Deregister blocks until the agent answers or ctx ends.
func (r *Registrar) Deregister(ctx context.Context) error {
	r.stopped.Store(true)
	select {
	case r.sem <- struct{}{}: // wait for a call of Run in flight
	case <-ctx.Done():
		return fmt.Errorf("deregister %q: %w", r.svc.ID, ctx.Err())
	}
	defer func() { <-r.sem }()
	err := r.agent.ServiceDeregisterOpts(r.svc.ID, (&api.QueryOptions{}).WithContext(ctx))
	if err != nil && !forgotten(err) {
		r.mu.Lock()
		r.status.LastError = err.Error()
		r.mu.Unlock()
		return fmt.Errorf("deregister %q: %w", r.svc.ID, err)
	}
	r.mu.Lock()
	r.status.Registered = false
	r.status.Deregistered = true
	r.mu.Unlock()
	r.log.Info("deregistered")
	return nil
}

// Register undoes Deregister: Run registers the service again at once, with
// the check's current status, and goes on heartbeating. It does nothing
// unless Deregister was called. It does not block and is safe for
// concurrent use.
func (r *Registrar) Register() {
	if !r.stopped.Load() {
		return
	}
	r.mu.Lock()
	r.status.Deregistered = false
	r.mu.Unlock()
	r.resumed.Store(true)
	r.stopped.Store(false)
	r.signal()
	r.log.Info("registering again")
}

// Live is the part of a Service that Update changes on a registered
// instance.
type Live struct {
	Tags   []string
	Meta   map[string]string
	Weight int
}

// Update registers the service again with live's tags, meta and weight,
// keeping its ID, address, port and its check with the check's current
// status, so a passing instance stays passing throughout. A running
// Registrar does it at once; a deregistered one uses them when Register
// brings it back. It does not block and is safe for concurrent use.
func (r *Registrar) Update(live Live) {
	r.mu.Lock()
	r.live = live
	r.mu.Unlock()
	r.changed.Store(true)
	r.signal()
}

// errStopped is returned by call once Deregister has been called.
var errStopped = errors.New("deregistered")

// call runs f unless Deregister has been called, never concurrently with
// another call or with Deregister.
func (r *Registrar) call(ctx context.Context, f func() error) error {
	select {
	case r.sem <- struct{}{}:
	case <-ctx.Done():
		return ctx.Err()
	}
	defer func() { <-r.sem }()
	if r.stopped.Load() {
		return errStopped
	}
	return f()
}

func (r *Registrar) registration(status string) *api.AgentServiceRegistration {
	notes := "kept by the sidecar heartbeat"
	if s, ok := r.probe.(fmt.Stringer); ok {
		notes += ": " + s.String()
	}
	r.mu.Lock()
	live := r.live
	r.mu.Unlock()
	reg := &api.AgentServiceRegistration{
		ID:      r.svc.ID,
		Name:    r.svc.Name,
		Address: r.svc.Address,
		Port:    r.svc.Port,
		Tags:    live.Tags,
		Meta:    live.Meta,
		Check: &api.AgentServiceCheck{
			CheckID:                        r.checkID,
			Name:                           "heartbeat",
			Notes:                          notes,
			TTL:                            r.opts.TTL.String(),
			DeregisterCriticalServiceAfter: r.opts.DeregisterCriticalAfter.String(),
			Status:                         status,
		},
	}
	if live.Weight > 0 {
		reg.Weights = &api.AgentWeights{Passing: live.Weight, Warning: 1}
	}
	return reg
}

// forgotten reports whether err says the agent does not know the service or
// check: a 404, or the messages agents send for a check that is missing or
// is no longer a TTL check.
func forgotten(err error) bool {
	if code, ok := httpCode(err); ok && code == http.StatusNotFound {
		return true
	}
	msg := strings.ToLower(err.Error())
	return strings.Contains(msg, "unknown check") ||
		strings.Contains(msg, "unknown service") ||
		strings.Contains(msg, "does not have associated ttl")
}

// httpCode returns the status code of an agent's error answer; ok is false
// when the agent did not answer (connection refused, timeout…).
func httpCode(err error) (code int, ok bool) {
	var se api.StatusError
	if errors.As(err, &se) {
		return se.Code, true
	}
	var sp *api.StatusError
	if errors.As(err, &sp) && sp != nil {
		return sp.Code, true
	}
	return 0, false
}

// Backoff between failed Consul calls: 200ms doubling up to 5s, ±20%; Run
// caps it at the TTL.
const (
	backoffBase = 200 * time.Millisecond
	backoffMax  = 5 * time.Second
)

// retryBackoff gives the delay before retry number n (n ≥ 1).
var retryBackoff = backoff.Exponential{Base: backoffBase, Max: backoffMax, Jitter: 0.2}
