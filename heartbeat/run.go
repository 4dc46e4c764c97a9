package heartbeat

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/hashicorp/consul/api"
	"go.uber.org/zap"
)

// Run registers the service, then probes the app and reports to the check
// until ctx ends. It blocks until then, and returns only once the probe it
// started has returned. Run does not deregister the service; call Deregister
// for that. Run must be called at most once.
func (r *Registrar) Run(ctx context.Context) {
	if !r.running.CompareAndSwap(false, true) {
		r.log.Error("run called twice")
		return
	}
	l := &loop{
		r:       r,
		ctx:     ctx,
		want:    report{api.HealthCritical, "waiting for first probe"},
		retry:   stoppedTimer(),
		refresh: stoppedTimer(),
	}
	defer l.retry.Stop()
	defer l.refresh.Stop()

	probeCtx, cancel := context.WithCancel(ctx)
	var wg sync.WaitGroup
	defer wg.Wait()
	defer cancel()
	results := make(chan probeResult, 1)
	inFlight := false
	probe := func() {
		if inFlight {
			return
		}
		inFlight = true
		seq := l.ovSeq
		wg.Go(func() { results <- r.runProbe(probeCtx, seq) })
	}

	ticker := time.NewTicker(r.opts.Interval)
	defer ticker.Stop()
	l.applyOverride()
	probe()
	l.sync(false)
	for {
		select {
		case <-ctx.Done():
			return
		case <-ticker.C:
			probe()
		case res := <-results:
			inFlight = false
			if l.onProbe(res) {
				probe()
			}
			l.sync(false)
		case <-r.wake:
			if r.resumed.Swap(false) {
				// Register after Deregister: start over.
				l.registered, l.retrying, l.failures = false, false, 0
				l.retry.Stop()
			}
			if l.r.changed.Swap(false) && l.registered {
				// Update: register again with the new tags, meta and
				// weight, and the check's status as it stands.
				l.registered = false
			}
			if l.applyOverride() {
				probe()
			}
			l.sync(false)
		case <-l.retry.C:
			l.retrying = false
			l.sync(false)
		case <-l.refresh.C:
			l.sync(true)
		}
	}
}

func stoppedTimer() *time.Timer {
	t := time.NewTimer(time.Hour)
	t.Stop()
	return t
}

type probeResult struct {
	seq    uint64 // override sequence when the probe started
	at     time.Time
	output string
	err    error
}

// runProbe runs one probe bounded by the probe timeout, turning a panic into
// a failed probe.
func (r *Registrar) runProbe(ctx context.Context, seq uint64) (res probeResult) {
	ctx, cancel := context.WithTimeout(ctx, r.opts.Timeout)
	defer cancel()
	defer func() {
		if v := recover(); v != nil {
			r.log.Error("probe panicked", zap.Any("panic", v), zap.Stack("stack"))
			res.output, res.err = "", fmt.Errorf("probe panicked: %v", v)
		}
		res.seq, res.at = seq, time.Now()
	}()
	res.output, res.err = r.probe.Probe(ctx)
	return res
}

// loop is the state of one Run, owned by its goroutine.
type loop struct {
	r   *Registrar
	ctx context.Context

	ov    *report // override as last applied
	ovSeq uint64  // its sequence number

	want       report // what the check should show
	sent       report // what the agent last accepted
	registered bool
	failures   int  // failed Consul calls since the last accepted update
	retrying   bool // retry timer armed; wait for it before registering
	retry      *time.Timer
	refresh    *time.Timer
}

// applyOverride takes up the Registrar's override, if it changed. It reports
// whether a fresh probe is needed: the override was cleared. Until that probe
// is in, the cleared override's report stands, even if Run never saw the
// override itself.
func (l *loop) applyOverride() bool {
	l.r.mu.Lock()
	ov, cleared, seq := l.r.override, l.r.cleared, l.r.ovSeq
	l.r.mu.Unlock()
	if seq == l.ovSeq {
		return false
	}
	l.ov, l.ovSeq = ov, seq
	if ov != nil {
		l.setWant(*ov)
		return false
	}
	l.setWant(*cleared)
	return true
}

// onProbe takes in a probe result. It reports whether another probe is
// needed at once: the result predates the latest ClearOverride.
func (l *loop) onProbe(res probeResult) bool {
	l.r.mu.Lock()
	l.r.status.LastProbe = res.at
	if res.err != nil {
		l.r.status.ProbeFailures++
	} else {
		l.r.status.LastPass = res.at
	}
	l.r.mu.Unlock()
	if l.ov != nil {
		return false
	}
	if res.seq != l.ovSeq {
		return true
	}
	if res.err != nil {
		l.setWant(report{api.HealthCritical, res.err.Error()})
	} else {
		l.setWant(report{api.HealthPassing, res.output})
	}
	return false
}

func (l *loop) setWant(w report) {
	if w.status != l.want.status {
		l.r.log.Info("status changed", zap.String("status", w.status), zap.String("output", w.output))
	}
	l.want = w
	l.r.mu.Lock()
	l.r.status.CheckStatus, l.r.status.Output = w.status, w.output
	l.r.status.Overridden = l.ov != nil
	l.r.mu.Unlock()
}

// sync brings the agent in line with want: registers the service if needed
// (unless a retry is pending), then reports want if its status changed, if
// force is set (refresh due) or right after registering.
func (l *loop) sync(force bool) {
	// At most twice: an update the agent rejects because it forgot the
	// check leads to one immediate registration and update.
	for range 2 {
		if !l.registered {
			if l.retrying {
				return
			}
			if err := l.register(); err != nil {
				l.fail(err, "register failed")
				return
			}
			force = true
		}
		if !force && l.want.status == l.sent.status {
			return
		}
		err := l.update()
		if err == nil {
			return
		}
		if _, answered := httpCode(err); !(answered || forgotten(err)) || l.failures > 1 {
			return // connection trouble or repeated failure: retry timer set
		}
		l.retry.Stop()
		l.retrying = false
	}
}

func (l *loop) register() error {
	reg := l.r.registration(l.want.status)
	err := l.r.call(l.ctx, func() error {
		return l.r.agent.ServiceRegisterOpts(reg, api.ServiceRegisterOpts{}.WithContext(l.ctx))
	})
	if err != nil {
		return err
	}
	l.registered = true
	l.r.mu.Lock()
	l.r.status.Registered = true
	l.r.status.Registrations++
	n := l.r.status.Registrations
	l.r.mu.Unlock()
	l.r.log.Info("registered", zap.Int("registrations", n), zap.String("status", l.want.status))
	return nil
}

func (l *loop) update() error {
	want := l.want
	err := l.r.call(l.ctx, func() error {
		return l.r.agent.UpdateTTLOpts(l.r.checkID, want.output, want.status, (&api.QueryOptions{}).WithContext(l.ctx))
	})
	if err != nil {
		l.registered = false
		l.refresh.Stop()
		if forgotten(err) {
			l.fail(err, "check unknown to agent, registering again")
		} else {
			l.fail(err, "update check failed")
		}
		return err
	}
	l.sent, l.failures = want, 0
	l.refresh.Reset(l.r.opts.TTL / 3)
	l.r.mu.Lock()
	l.r.status.Registered = true
	l.r.status.LastUpdate = time.Now()
	l.r.status.LastError = ""
	l.r.mu.Unlock()
	return nil
}

// fail records a failed Consul call, logs it and arms the retry timer.
// Nothing is recorded when Run is ending or the service was deregistered.
func (l *loop) fail(err error, msg string) {
	if l.ctx.Err() != nil || errors.Is(err, errStopped) {
		l.registered = false
		l.retrying = true // keep Run from calling Consul again
		return
	}
	l.failures++
	l.r.mu.Lock()
	l.r.status.Registered = false
	l.r.status.LastError = err.Error()
	l.r.mu.Unlock()
	// Rate-limited: the first few failures, then about once a minute.
	if l.failures <= 3 || l.failures%12 == 0 {
		l.r.log.Warn(msg, zap.Int("attempt", l.failures), zap.Error(err))
	}
	// Never wait longer than the TTL, so an agent that comes back (empty,
	// after a restart) sees the service again within one TTL.
	l.retry.Reset(min(retryBackoff.Backoff(l.failures), l.r.opts.TTL))
	l.retrying = true
}
