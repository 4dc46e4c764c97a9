package heartbeat

import (
	"context"
	"fmt"
	"net"
	"net/url"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"
	"go.uber.org/zap/zaptest"
)

// The tests run inside testing/synctest bubbles: time is virtual, so waiting
// out a TTL or a backoff costs nothing, and synctest.Wait lets the Registrar
// settle before a check. Registrars and fakes must be created in the bubble.

// call is one call the fake agent received.
type call struct {
	at     time.Time
	op     string // "register", "update", "deregister"
	reg    *api.AgentServiceRegistration
	id     string // check ID for update, service ID for deregister
	status string
	output string
	err    error // what the fake returned
}

// fakeAgent is an in-memory Consul agent that records calls, can fail them
// on demand and can forget its services as a restarted agent would.
type fakeAgent struct {
	mu       sync.Mutex
	calls    []call
	services map[string]bool
	checks   map[string]bool

	down        error // every call fails with it
	registerErr []error
	deregErr    error
	unknownErr  error // UpdateTTL's answer for an unknown check
	amnesiac    bool  // forgets every check at once: all updates fail
}

func newFakeAgent() *fakeAgent {
	return &fakeAgent{services: map[string]bool{}, checks: map[string]bool{}}
}

// errConnRefused is the error of an agent that is not listening, as the
// api client returns it.
var errConnRefused error = &url.Error{
	Op:  "Put",
	URL: "http://127.0.0.1:8500/v1/agent/service/register",
	Err: &net.OpError{Op: "dial", Net: "tcp", Err: syscall.ECONNREFUSED},
}

func (a *fakeAgent) record(c call) error {
	c.at = time.Now()
	a.calls = append(a.calls, c)
	return c.err
}

func (a *fakeAgent) ServiceRegisterOpts(reg *api.AgentServiceRegistration, _ api.ServiceRegisterOpts) error {
	a.mu.Lock()
	defer a.mu.Unlock()
	c := call{op: "register", reg: reg, status: reg.Check.Status}
	switch {
	case a.down != nil:
		c.err = a.down
	case len(a.registerErr) > 0:
		c.err, a.registerErr = a.registerErr[0], a.registerErr[1:]
	default:
		a.services[reg.ID] = true
		a.checks[reg.Check.CheckID] = true
	}
	return a.record(c)
}

func (a *fakeAgent) ServiceDeregisterOpts(id string, _ *api.QueryOptions) error {
	a.mu.Lock()
	defer a.mu.Unlock()
	c := call{op: "deregister", id: id}
	switch {
	case a.down != nil:
		c.err = a.down
	case a.deregErr != nil:
		c.err = a.deregErr
	case !a.services[id]:
		c.err = api.StatusError{Code: 404, Body: fmt.Sprintf("Unknown service ID %q. Ensure that the service ID is passed, not the service name.", id)}
	default:
		delete(a.services, id)
		clear(a.checks)
	}
	return a.record(c)
}

func (a *fakeAgent) UpdateTTLOpts(id, output, status string, _ *api.QueryOptions) error {
	a.mu.Lock()
	defer a.mu.Unlock()
	c := call{op: "update", id: id, status: status, output: output}
	switch {
	case a.down != nil:
		c.err = a.down
	case !a.checks[id] || a.amnesiac:
		c.err = a.unknownErr
		if c.err == nil {
			c.err = api.StatusError{Code: 404, Body: fmt.Sprintf("Unknown check ID %q. Ensure that the check ID is passed, not the check name.", id)}
		}
	}
	return a.record(c)
}

// forget drops every service and check, as an agent restarted without its
// state does.
func (a *fakeAgent) forget() {
	a.mu.Lock()
	defer a.mu.Unlock()
	clear(a.services)
	clear(a.checks)
}

func (a *fakeAgent) setDown(err error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	a.down = err
}

// get returns the calls of kind op (all calls if op is "") made at or after
// since.
func (a *fakeAgent) get(op string, since time.Time) []call {
	a.mu.Lock()
	defer a.mu.Unlock()
	var out []call
	for _, c := range a.calls {
		if (op == "" || c.op == op) && !c.at.Before(since) {
			out = append(out, c)
		}
	}
	return out
}

// okUpdates returns the accepted updates made at or after since.
func (a *fakeAgent) okUpdates(since time.Time) []call {
	var out []call
	for _, c := range a.get("update", since) {
		if c.err == nil {
			out = append(out, c)
		}
	}
	return out
}

// fakeProbe answers with a settable result; with delay it takes that long,
// or until its context ends.
type fakeProbe struct {
	mu    sync.Mutex
	err   error
	delay time.Duration
	calls int
}

const okOutput = "GET http://127.0.0.1:8080/health: 200 OK"

func (p *fakeProbe) set(err error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.err = err
}

func (p *fakeProbe) count() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.calls
}

func (p *fakeProbe) Probe(ctx context.Context) (string, error) {
	p.mu.Lock()
	p.calls++
	delay := p.delay
	p.mu.Unlock()
	if delay > 0 {
		select {
		case <-time.After(delay):
		case <-ctx.Done():
			return "", ctx.Err()
		}
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.err != nil {
		return "", p.err
	}
	return okOutput, nil
}

var testService = Service{ID: "web-1", Name: "web", Address: "127.0.0.1", Port: 8080}

// start runs r until the returned stop is called; stop waits for Run to
// return.
func start(r *Registrar) (stop func()) {
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		defer close(done)
		r.Run(ctx)
	}()
	return func() {
		cancel()
		<-done
	}
}

func newTestRegistrar(t *testing.T, a Agent, p Prober, opts Options) *Registrar {
	return NewRegistrar(a, testService, p, opts, zaptest.NewLogger(t))
}
