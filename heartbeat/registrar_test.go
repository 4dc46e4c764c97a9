package heartbeat

import (
	"context"
	"encoding/json"
	"errors"
	"reflect"
	"strings"
	"testing"
	"testing/synctest"
	"time"

	"github.com/hashicorp/consul/api"
)

func TestRegistration(t *testing.T) {
	tests := []struct {
		name string
		svc  Service
		opts Options
		want *api.AgentServiceRegistration
	}{
		{
			name: "defaults",
			svc:  Service{Name: "web", Address: "10.0.0.7", Port: 8080},
			want: &api.AgentServiceRegistration{
				ID: "web-10.0.0.7-8080", Name: "web", Address: "10.0.0.7", Port: 8080,
				Check: &api.AgentServiceCheck{
					CheckID: "service:web-10.0.0.7-8080:ttl", Name: "heartbeat",
					Notes: "kept by the sidecar heartbeat",
					TTL:   "5s", DeregisterCriticalServiceAfter: "1m0s", Status: "critical",
				},
			},
		},
		{
			// No address registered: Consul gives peers the node's.
			name: "no address",
			svc:  Service{ID: "web-host1-8080", Name: "web", Port: 8080},
			want: &api.AgentServiceRegistration{
				ID: "web-host1-8080", Name: "web", Port: 8080,
				Check: &api.AgentServiceCheck{
					CheckID: "service:web-host1-8080:ttl", Name: "heartbeat",
					Notes: "kept by the sidecar heartbeat",
					TTL:   "5s", DeregisterCriticalServiceAfter: "1m0s", Status: "critical",
				},
			},
		},
		{
			name: "everything set",
			svc: Service{
				ID: "web-a", Name: "web", Address: "10.0.0.7", Port: 8080,
				Tags: []string{"v2", "canary"}, Meta: map[string]string{"zone": "a"}, Weight: 3,
			},
			opts: Options{TTL: 9 * time.Second, DeregisterCriticalAfter: 2 * time.Minute},
			want: &api.AgentServiceRegistration{
				ID: "web-a", Name: "web", Address: "10.0.0.7", Port: 8080,
				Tags: []string{"v2", "canary"}, Meta: map[string]string{"zone": "a"},
				Weights: &api.AgentWeights{Passing: 3, Warning: 1},
				Check: &api.AgentServiceCheck{
					CheckID: "service:web-a:ttl", Name: "heartbeat",
					Notes: "kept by the sidecar heartbeat",
					TTL:   "9s", DeregisterCriticalServiceAfter: "2m0s", Status: "critical",
				},
			},
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			synctest.Test(t, func(t *testing.T) {
				a := newFakeAgent()
				r := NewRegistrar(a, tc.svc, &fakeProbe{}, tc.opts, nil)
				stop := start(r)
				defer stop()
				synctest.Wait()

				regs := a.get("register", time.Time{})
				if len(regs) != 1 {
					t.Fatalf("got %d registrations, want 1", len(regs))
				}
				if !reflect.DeepEqual(regs[0].reg, tc.want) {
					t.Errorf("registration = %+v\ncheck %+v\nwant %+v\ncheck %+v", regs[0].reg, regs[0].reg.Check, tc.want, tc.want.Check)
				}
				if got := r.CheckID(); got != tc.want.Check.CheckID {
					t.Errorf("CheckID() = %q, want %q", got, tc.want.Check.CheckID)
				}
				if got := r.ServiceID(); got != tc.want.ID {
					t.Errorf("ServiceID() = %q, want %q", got, tc.want.ID)
				}
			})
		})
	}
}

func TestRegistrationNotesNameTheProbe(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		a := newFakeAgent()
		p := TCPProbe("127.0.0.1:1", 0)
		r := NewRegistrar(a, testService, ProberFunc(func(context.Context) (string, error) { return "ok", nil }), Options{}, nil)
		if got := r.registration("critical").Check.Notes; got != "kept by the sidecar heartbeat" {
			t.Errorf("Notes = %q for a ProberFunc", got)
		}
		r = NewRegistrar(a, testService, p, Options{}, nil)
		if got, want := r.registration("critical").Check.Notes, "kept by the sidecar heartbeat: TCP connect 127.0.0.1:1"; got != want {
			t.Errorf("Notes = %q, want %q", got, want)
		}
	})
}

func TestPassingRefreshCadence(t *testing.T) {
	tests := []struct {
		name     string
		interval time.Duration
		ttl      time.Duration
	}{
		{"interval much shorter than ttl/3", 100 * time.Millisecond, 6 * time.Second},
		{"interval near ttl/3", 2 * time.Second, 6 * time.Second},
		{"interval longer than ttl", 30 * time.Second, 6 * time.Second},
		{"default options", 0, 0},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			synctest.Test(t, func(t *testing.T) {
				a := newFakeAgent()
				opts := Options{Interval: tc.interval, TTL: tc.ttl}
				r := newTestRegistrar(t, a, &fakeProbe{}, opts)
				ttl := r.opts.TTL
				begin := time.Now()
				stop := start(r)
				const runFor = 2 * time.Minute
				time.Sleep(runFor)
				synctest.Wait()
				stop()

				ups := a.okUpdates(begin)
				if len(ups) < 2 {
					t.Fatalf("got %d updates, want many", len(ups))
				}
				// Registration is followed at once by the initial critical
				// report, then the first probe's passing one.
				if ups[0].status != api.HealthCritical || ups[0].output != "waiting for first probe" {
					t.Errorf("first update = %s %q, want critical \"waiting for first probe\"", ups[0].status, ups[0].output)
				}
				last := begin
				for i, u := range ups[1:] {
					if u.status != api.HealthPassing || u.output != okOutput {
						t.Errorf("update %d = %s %q, want passing %q", i+1, u.status, u.output, okOutput)
					}
					if gap := u.at.Sub(last); gap > ttl/3 {
						t.Errorf("update %d came %v after the previous, want at most ttl/3 = %v", i+1, gap, ttl/3)
					}
					last = u.at
				}
				if gap := begin.Add(runFor).Sub(last); gap > ttl/3 {
					t.Errorf("last update %v before the end, want at most %v", gap, ttl/3)
				}
				if max := int(runFor/(ttl/3)) + 3; len(ups) > max {
					t.Errorf("got %d updates in %v, want at most %d (one per ttl/3, not one per probe)", len(ups), runFor, max)
				}
				if st := r.Status(); !st.Registered || st.CheckStatus != api.HealthPassing || st.Output != okOutput || st.Registrations != 1 || st.LastError != "" {
					t.Errorf("Status() = %+v, want registered once and passing", st)
				}
			})
		})
	}
}

func TestFailureReportedAtOnce(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		a := newFakeAgent()
		p := &fakeProbe{}
		r := newTestRegistrar(t, a, p, Options{Interval: time.Second, TTL: 30 * time.Second})
		stop := start(r)
		defer stop()
		time.Sleep(5500 * time.Millisecond)
		synctest.Wait()

		failAt := time.Now()
		probeErr := errors.New("GET http://127.0.0.1:8080/health: 500 Internal Server Error: db down")
		p.set(probeErr)
		time.Sleep(time.Second) // the next probe
		synctest.Wait()

		ups := a.okUpdates(failAt)
		if len(ups) != 1 {
			t.Fatalf("got %d updates after the failure, want 1: %+v", len(ups), ups)
		}
		if ups[0].status != api.HealthCritical || ups[0].output != probeErr.Error() {
			t.Errorf("update = %s %q, want critical %q", ups[0].status, ups[0].output, probeErr)
		}
		if d := ups[0].at.Sub(failAt); d > time.Second {
			t.Errorf("critical sent %v after the failure, want within one interval", d)
		}
		if st := r.Status(); st.CheckStatus != api.HealthCritical || st.Output != probeErr.Error() {
			t.Errorf("Status() = %+v, want critical with the probe error", st)
		}
		// The last pass stays where the probes last passed; the failure counts.
		if st := r.Status(); !st.LastPass.Before(failAt) || st.LastPass.IsZero() || st.ProbeFailures != 1 {
			t.Errorf("Status() LastPass = %v, ProbeFailures = %d; want a pass before %v and 1 failure", st.LastPass, st.ProbeFailures, failAt)
		}

		// Still failing: refreshed, not resent on every probe.
		time.Sleep(29 * time.Second)
		synctest.Wait()
		if n := len(a.okUpdates(failAt)); n != 3 {
			t.Errorf("got %d updates in 30s failing with ttl 30s, want 3", n)
		}

		recoverAt := time.Now()
		p.set(nil)
		time.Sleep(time.Second)
		synctest.Wait()
		// A refresh of critical may fall on the same instant as the probe.
		ups = lastIs(t, a.okUpdates(recoverAt), api.HealthPassing)
		if ups[len(ups)-1].output != okOutput || ups[len(ups)-1].at.Sub(recoverAt) > time.Second {
			t.Errorf("updates after recovery = %+v, want passing within one interval", ups)
		}
	})
}

// lastIs checks that ups ends with status and that it holds from its first
// occurrence on; it returns ups.
func lastIs(t *testing.T, ups []call, status string) []call {
	t.Helper()
	if len(ups) == 0 {
		t.Fatalf("no updates, want %s", status)
	}
	seen := false
	for _, u := range ups {
		if seen && u.status != status {
			t.Fatalf("updates = %+v, want %s to hold once sent", ups, status)
		}
		seen = seen || u.status == status
	}
	if !seen {
		t.Fatalf("updates = %+v, want %s", ups, status)
	}
	return ups
}

func TestRegisterRetriesWithBackoff(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		a := newFakeAgent()
		const failures = 8
		for range failures {
			a.registerErr = append(a.registerErr, errConnRefused)
		}
		r := newTestRegistrar(t, a, &fakeProbe{}, Options{})
		stop := start(r)
		defer stop()
		time.Sleep(time.Second)
		synctest.Wait()
		if st := r.Status(); st.Registered || st.LastError != errConnRefused.Error() || st.Registrations != 0 {
			t.Errorf("Status() while the agent is down = %+v, want unregistered with the error", st)
		}

		time.Sleep(time.Minute)
		synctest.Wait()
		regs := a.get("register", time.Time{})
		if len(regs) != failures+1 {
			t.Fatalf("got %d registration attempts, want %d", len(regs), failures+1)
		}
		for i := 1; i < len(regs); i++ {
			want := min(backoffBase<<(i-1), backoffMax)
			lo, hi := time.Duration(float64(want)*0.8), time.Duration(float64(want)*1.2)
			if gap := regs[i].at.Sub(regs[i-1].at); gap < lo || gap > hi {
				t.Errorf("attempt %d came %v after the previous, want %v ±20%%", i+1, gap, want)
			}
		}
		if st := r.Status(); !st.Registered || st.LastError != "" || st.Registrations != 1 || st.CheckStatus != api.HealthPassing {
			t.Errorf("Status() after recovery = %+v, want registered once, passing", st)
		}
		if ups := a.okUpdates(regs[len(regs)-1].at); len(ups) == 0 || ups[len(ups)-1].status != api.HealthPassing {
			t.Errorf("updates after registering = %+v, want passing", ups)
		}
	})
}

func TestReregisterWhenCheckForgotten(t *testing.T) {
	tests := []struct {
		name string
		err  error // UpdateTTL's error for the unknown check; nil: 404
	}{
		{"404 unknown check", nil},
		{"500 not a ttl check", api.StatusError{Code: 500, Body: `CheckID "service:web-1:ttl" does not have associated TTL`}},
		{"plain unknown check message", errors.New(`Unexpected response code: 500 (Unknown check "service:web-1:ttl")`)},
		{"other agent error", api.StatusError{Code: 500, Body: "rpc error"}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			synctest.Test(t, func(t *testing.T) {
				a := newFakeAgent()
				a.unknownErr = tc.err
				r := newTestRegistrar(t, a, &fakeProbe{}, Options{TTL: 6 * time.Second})
				stop := start(r)
				defer stop()
				time.Sleep(3 * time.Second)
				synctest.Wait()

				a.forget()
				forgotAt := time.Now()
				time.Sleep(2 * time.Second) // past the next refresh
				synctest.Wait()

				calls := a.get("", forgotAt)
				if len(calls) != 3 {
					t.Fatalf("calls after forgetting = %+v, want failed update, register, update", calls)
				}
				if c := calls[0]; c.op != "update" || c.err == nil {
					t.Errorf("call 1 = %s (err %v), want a failed update", c.op, c.err)
				}
				if c := calls[1]; c.op != "register" || c.err != nil || !c.at.Equal(calls[0].at) || c.status != api.HealthPassing {
					t.Errorf("call 2 = %s %s at +%v (err %v), want an immediate passing register", c.op, c.status, c.at.Sub(calls[0].at), c.err)
				}
				if c := calls[2]; c.op != "update" || c.err != nil || !c.at.Equal(calls[0].at) || c.status != api.HealthPassing || c.output != okOutput {
					t.Errorf("call 3 = %s %s %q (err %v), want an immediate passing update", c.op, c.status, c.output, c.err)
				}
				if st := r.Status(); !st.Registered || st.Registrations != 2 || st.LastError != "" {
					t.Errorf("Status() = %+v, want registered twice", st)
				}
			})
		})
	}
}

func TestAgentForgetsRepeatedly(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		// An agent that accepts registrations but rejects every update must
		// not be hammered: after the first immediate retry, back off.
		a := newFakeAgent()
		a.unknownErr = api.StatusError{Code: 500, Body: "rpc error"}
		a.amnesiac = true
		r := newTestRegistrar(t, a, &fakeProbe{}, Options{})
		stop := start(r)
		defer stop()
		time.Sleep(10 * time.Second)
		synctest.Wait()
		if n := len(a.get("register", time.Time{})); n < 3 || n > 10 {
			t.Errorf("got %d registrations in 10s, want a few (backing off)", n)
		}
	})
}

func TestReregisterAfterAgentOutage(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		a := newFakeAgent()
		r := newTestRegistrar(t, a, &fakeProbe{}, Options{})
		stop := start(r)
		defer stop()
		time.Sleep(3 * time.Second)
		synctest.Wait()

		// The agent goes away and comes back without its state.
		a.setDown(errConnRefused)
		a.forget()
		time.Sleep(20 * time.Second)
		synctest.Wait()
		if st := r.Status(); st.Registered || st.LastError != errConnRefused.Error() {
			t.Errorf("Status() during the outage = %+v, want unregistered with the error", st)
		}
		if st := r.Status(); st.CheckStatus != api.HealthPassing {
			t.Errorf("Status().CheckStatus during the outage = %q, want the probe's passing", st.CheckStatus)
		}

		upAt := time.Now()
		a.setDown(nil)
		time.Sleep(backoffMax * 6 / 5)
		synctest.Wait()
		regs := a.get("register", upAt)
		if len(regs) != 1 || regs[0].err != nil {
			t.Fatalf("registrations after the outage = %+v, want one", regs)
		}
		ups := a.okUpdates(upAt)
		if len(ups) == 0 || ups[0].status != api.HealthPassing || !ups[0].at.Equal(regs[0].at) {
			t.Errorf("updates after the outage = %+v, want passing at once", ups)
		}
		if st := r.Status(); !st.Registered || st.Registrations != 2 || st.LastError != "" {
			t.Errorf("Status() = %+v, want registered twice", st)
		}
	})
}

func TestOverride(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		a := newFakeAgent()
		p := &fakeProbe{}
		r := newTestRegistrar(t, a, p, Options{Interval: time.Second, TTL: 6 * time.Second})
		stop := start(r)
		defer stop()
		time.Sleep(3 * time.Second)
		synctest.Wait()

		setAt := time.Now()
		r.SetOverride(api.HealthCritical, "app exited: exit status 1")
		synctest.Wait()
		ups := a.okUpdates(setAt)
		if len(ups) != 1 || ups[0].status != api.HealthCritical || ups[0].output != "app exited: exit status 1" || !ups[0].at.Equal(setAt) {
			t.Fatalf("updates after SetOverride = %+v, want critical \"app exited: exit status 1\" at once", ups)
		}
		if st := r.Status(); !st.Overridden || st.CheckStatus != api.HealthCritical {
			t.Errorf("Status() = %+v, want overridden critical", st)
		}

		// The probe still passes, but the override holds.
		time.Sleep(30 * time.Second)
		synctest.Wait()
		for _, u := range a.okUpdates(setAt) {
			if u.status != api.HealthCritical {
				t.Fatalf("update %s %q while overridden, want critical", u.status, u.output)
			}
		}

		clearAt := time.Now()
		probes := p.count()
		r.ClearOverride()
		synctest.Wait()
		if p.count() != probes+1 {
			t.Errorf("ClearOverride ran %d probes at once, want 1", p.count()-probes)
		}
		// A refresh of critical may fall on the same instant as the clear.
		ups = lastIs(t, a.okUpdates(clearAt), api.HealthPassing)
		if !ups[len(ups)-1].at.Equal(clearAt) {
			t.Fatalf("updates after ClearOverride = %+v, want passing at once", ups)
		}
		if st := r.Status(); st.Overridden || st.CheckStatus != api.HealthPassing {
			t.Errorf("Status() = %+v, want passing, not overridden", st)
		}
	})
}

func TestClearOverrideIgnoresStaleProbe(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		a := newFakeAgent()
		p := &fakeProbe{delay: 500 * time.Millisecond}
		r := newTestRegistrar(t, a, p, Options{Interval: time.Minute, Timeout: time.Second})
		stop := start(r)
		defer stop()
		time.Sleep(10 * time.Second)
		synctest.Wait()
		if st := r.Status(); st.CheckStatus != api.HealthPassing {
			t.Fatalf("Status() = %+v, want passing before the test", st)
		}

		// A probe of the healthy app is in flight when the app exits, is
		// restarted and comes back broken.
		time.Sleep(50*time.Second + 100*time.Millisecond) // 0.1s into the next probe
		setAt := time.Now()
		r.SetOverride(api.HealthCritical, "restarting")
		p.set(errors.New("GET http://127.0.0.1:8080/health: 503 Service Unavailable"))
		r.ClearOverride()
		time.Sleep(2 * time.Second)
		synctest.Wait()

		for _, u := range a.okUpdates(setAt) {
			if u.status != api.HealthCritical {
				t.Errorf("update %s %q after the restart, want only critical", u.status, u.output)
			}
		}
		if st := r.Status(); st.CheckStatus != api.HealthCritical || !strings.Contains(st.Output, "503") {
			t.Errorf("Status() = %+v, want critical from the fresh probe", st)
		}
	})
}

func TestOverrideBeforeRun(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		a := newFakeAgent()
		r := newTestRegistrar(t, a, &fakeProbe{}, Options{})
		r.SetOverride(api.HealthCritical, "starting")
		stop := start(r)
		defer stop()
		time.Sleep(10 * time.Second)
		synctest.Wait()
		for _, u := range a.okUpdates(time.Time{}) {
			if u.status != api.HealthCritical {
				t.Fatalf("update %s %q while starting, want critical", u.status, u.output)
			}
		}
		if ups := a.okUpdates(time.Time{}); ups[len(ups)-1].output != "starting" {
			t.Errorf("last update output = %q, want \"starting\"", ups[len(ups)-1].output)
		}

		clearAt := time.Now()
		r.ClearOverride()
		synctest.Wait()
		if ups := a.okUpdates(clearAt); len(ups) != 1 || ups[0].status != api.HealthPassing {
			t.Errorf("updates after ClearOverride = %+v, want passing at once", ups)
		}
	})
}

func TestSetOverrideStatus(t *testing.T) {
	tests := []struct{ in, want string }{
		{api.HealthPassing, api.HealthPassing},
		{api.HealthWarning, api.HealthWarning},
		{api.HealthCritical, api.HealthCritical},
		{"maintenance", api.HealthCritical},
		{"", api.HealthCritical},
	}
	for _, tc := range tests {
		t.Run(tc.in, func(t *testing.T) {
			r := NewRegistrar(newFakeAgent(), testService, &fakeProbe{}, Options{}, nil)
			r.SetOverride(tc.in, "why")
			if got := r.override.status; got != tc.want {
				t.Errorf("SetOverride(%q) status = %q, want %q", tc.in, got, tc.want)
			}
		})
	}
}

func TestProbePanic(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		a := newFakeAgent()
		calls := 0
		p := ProberFunc(func(context.Context) (string, error) {
			calls++ // only ever called from one goroutine at a time
			if calls == 2 {
				panic("boom")
			}
			return okOutput, nil
		})
		r := newTestRegistrar(t, a, p, Options{Interval: time.Second})
		stop := start(r)
		defer stop()
		time.Sleep(1500 * time.Millisecond)
		synctest.Wait()
		if st := r.Status(); st.CheckStatus != api.HealthCritical || !strings.Contains(st.Output, "probe panicked: boom") {
			t.Errorf("Status() after a panic = %+v, want critical \"probe panicked: boom\"", st)
		}
		time.Sleep(time.Second)
		synctest.Wait()
		if st := r.Status(); st.CheckStatus != api.HealthPassing {
			t.Errorf("Status() after the next probe = %+v, want passing", st)
		}
	})
}

func TestDeregister(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		a := newFakeAgent()
		r := newTestRegistrar(t, a, &fakeProbe{}, Options{})
		stop := start(r)
		defer stop()
		time.Sleep(3 * time.Second)
		synctest.Wait()

		at := time.Now()
		if err := r.Deregister(context.Background()); err != nil {
			t.Fatalf("Deregister() = %v", err)
		}
		deregs := a.get("deregister", at)
		if len(deregs) != 1 || deregs[0].id != testService.ID || deregs[0].err != nil {
			t.Fatalf("deregistrations = %+v, want one of %q", deregs, testService.ID)
		}
		if st := r.Status(); st.Registered || !st.Deregistered {
			t.Errorf("Status() = %+v, want deregistered", st)
		}

		// Run goes on probing but never registers again, although the
		// agent no longer knows the check.
		time.Sleep(time.Minute)
		synctest.Wait()
		if calls := a.get("", at); len(calls) != 1 {
			t.Errorf("calls after Deregister = %+v, want only the deregistration", calls)
		}
		if st := r.Status(); st.LastProbe.Before(at.Add(59 * time.Second)) {
			t.Errorf("Status().LastProbe = %v, want probes to go on", st.LastProbe)
		}
	})
}

func TestRegisterAfterDeregister(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		a := newFakeAgent()
		r := newTestRegistrar(t, a, &fakeProbe{}, Options{})
		stop := start(r)
		defer stop()
		time.Sleep(3 * time.Second)
		synctest.Wait()
		if err := r.Deregister(context.Background()); err != nil {
			t.Fatalf("Deregister() = %v", err)
		}
		time.Sleep(10 * time.Second)
		synctest.Wait()

		at := time.Now()
		r.Register()
		synctest.Wait()
		regs := a.get("register", at)
		if len(regs) != 1 || regs[0].reg.ID != testService.ID {
			t.Fatalf("registrations after Register() = %+v, want one of %q at once", regs, testService.ID)
		}
		if st := r.Status(); !st.Registered || st.Deregistered || st.CheckStatus != api.HealthPassing {
			t.Errorf("Status() = %+v, want registered and passing again", st)
		}
		// Heartbeats resume.
		time.Sleep(10 * time.Second)
		synctest.Wait()
		if ups := a.get("update", at); len(ups) < 2 {
			t.Errorf("TTL updates after Register() = %d, want the heartbeat to go on", len(ups))
		}
		// Register without a Deregister first does nothing.
		at = time.Now()
		r.Register()
		synctest.Wait()
		if regs := a.get("register", at); len(regs) != 0 {
			t.Errorf("Register() while registered made %d registrations, want 0", len(regs))
		}
	})
}

func TestDeregisterErrors(t *testing.T) {
	agentErr := api.StatusError{Code: 500, Body: "rpc error"}
	tests := []struct {
		name    string
		down    error
		deregEr error
		wantErr error
	}{
		{name: "unknown service counts as removed"},
		{name: "agent error", deregEr: agentErr, wantErr: agentErr},
		{name: "agent down", down: errConnRefused, wantErr: errConnRefused},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			synctest.Test(t, func(t *testing.T) {
				a := newFakeAgent()
				a.down, a.deregErr = tc.down, tc.deregEr
				r := newTestRegistrar(t, a, &fakeProbe{}, Options{})
				err := r.Deregister(context.Background())
				if !errors.Is(err, tc.wantErr) || (err == nil) != (tc.wantErr == nil) {
					t.Errorf("Deregister() = %v, want %v", err, tc.wantErr)
				}
				if err != nil && !strings.Contains(err.Error(), `deregister "web-1"`) {
					t.Errorf("Deregister() = %q, want it to name the service", err)
				}
			})
		})
	}
}

func TestDeregisterWaitsForCallInFlight(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		a := newFakeAgent()
		r := newTestRegistrar(t, a, &fakeProbe{}, Options{})
		r.sem <- struct{}{} // a call of Run in flight
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		defer cancel()
		if err := r.Deregister(ctx); !errors.Is(err, context.DeadlineExceeded) {
			t.Errorf("Deregister() with a call stuck = %v, want deadline exceeded", err)
		}
		<-r.sem
		// Run, started after a failed Deregister, still never registers.
		stop := start(r)
		time.Sleep(10 * time.Second)
		synctest.Wait()
		stop()
		if calls := a.get("", time.Time{}); len(calls) != 0 {
			t.Errorf("calls = %+v, want none after Deregister", calls)
		}
	})
}

func TestRunReturnsOnCancel(t *testing.T) {
	tests := []struct {
		name  string
		agent func() *fakeAgent
		probe *fakeProbe
	}{
		{"healthy", newFakeAgent, &fakeProbe{}},
		{"probe in flight", newFakeAgent, &fakeProbe{delay: time.Hour}},
		{"agent down", func() *fakeAgent { a := newFakeAgent(); a.down = errConnRefused; return a }, &fakeProbe{}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			// synctest.Test fails if a goroutine of the bubble is left
			// behind: this is the leak check.
			synctest.Test(t, func(t *testing.T) {
				r := newTestRegistrar(t, tc.agent(), tc.probe, Options{Timeout: 2 * time.Hour})
				ctx, cancel := context.WithCancel(context.Background())
				done := make(chan struct{})
				go func() {
					defer close(done)
					r.Run(ctx)
				}()
				time.Sleep(10 * time.Second)
				cancel()
				synctest.Wait()
				select {
				case <-done:
				default:
					t.Fatal("Run did not return after cancel")
				}
			})
		})
	}
}

func TestRunTwice(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		a := newFakeAgent()
		r := newTestRegistrar(t, a, &fakeProbe{}, Options{})
		stop := start(r)
		defer stop()
		synctest.Wait()
		r.Run(context.Background()) // returns at once
		if n := len(a.get("register", time.Time{})); n != 1 {
			t.Errorf("got %d registrations, want 1", n)
		}
	})
}

func TestBackoff(t *testing.T) {
	for n := 1; n <= 40; n++ {
		want := backoffMax
		if n < 10 {
			want = min(backoffBase<<(n-1), backoffMax)
		}
		for range 20 {
			if got := retryBackoff.Backoff(n); got < want*8/10 || got > want*12/10 {
				t.Fatalf("backoff(%d) = %v, want %v ±20%%", n, got, want)
			}
		}
	}
}

func TestDefaultID(t *testing.T) {
	tests := []struct {
		name, host string
		port       int
		want       string
	}{
		{"web", "10.0.0.7", 8080, "web-10.0.0.7-8080"},
		{"web", "host-a.example.com", 80, "web-host-a.example.com-80"},
		{"web", "::1", 8080, "web---1-8080"},
		{"my svc/v2", "h", 1, "my-svc-v2-h-1"},
		{"web", "", 8080, "web-8080"},
		{"web", "h", 0, "web-h"},
	}
	for _, tc := range tests {
		if got := DefaultID(tc.name, tc.host, tc.port); got != tc.want {
			t.Errorf("DefaultID(%q, %q, %d) = %q, want %q", tc.name, tc.host, tc.port, got, tc.want)
		}
	}
}

func TestStatusJSON(t *testing.T) {
	r := NewRegistrar(newFakeAgent(), testService, &fakeProbe{}, Options{}, nil)
	b, err := json.Marshal(r.Status())
	if err != nil {
		t.Fatal(err)
	}
	for _, key := range []string{`"service_id":"web-1"`, `"check_id":"service:web-1:ttl"`, `"registered":false`, `"check_status":"critical"`, `"output":"waiting for first probe"`} {
		if !strings.Contains(string(b), key) {
			t.Errorf("Status JSON %s lacks %s", b, key)
		}
	}
}

// TestUpdateRegistersAgainKeepingPassing: Update registers the service
// again with the new tags, meta and weight and the check's current status,
// so a passing instance is never registered critical.
func TestUpdateRegistersAgainKeepingPassing(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		a := newFakeAgent()
		r := newTestRegistrar(t, a, &fakeProbe{}, Options{})
		stop := start(r)
		defer stop()
		time.Sleep(time.Second)
		synctest.Wait()
		if st := r.Status(); st.CheckStatus != api.HealthPassing {
			t.Fatalf("check %s before Update, want passing", st.CheckStatus)
		}
		since := time.Now()
		r.Update(Live{Tags: []string{"v2"}, Meta: map[string]string{"zone": "b"}, Weight: 7})
		synctest.Wait()
		regs := a.get("register", since)
		if len(regs) != 1 {
			t.Fatalf("got %d registrations after Update, want 1", len(regs))
		}
		reg := regs[0].reg
		if !reflect.DeepEqual(reg.Tags, []string{"v2"}) || reg.Meta["zone"] != "b" || reg.Weights.Passing != 7 {
			t.Errorf("registration after Update: tags %q meta %v weights %+v, want [v2], zone b, 7", reg.Tags, reg.Meta, reg.Weights)
		}
		if reg.ID != r.ServiceID() || reg.Port != testService.Port || reg.Name != testService.Name {
			t.Errorf("registration after Update = %s %s:%d, want the same instance", reg.ID, reg.Name, reg.Port)
		}
		if regs[0].status != api.HealthPassing {
			t.Errorf("registered again with check %s, want passing", regs[0].status)
		}
		for _, u := range a.get("update", since) {
			if u.status != api.HealthPassing {
				t.Errorf("check updated to %s after Update, want passing", u.status)
			}
		}
	})
}
