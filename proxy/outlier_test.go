package proxy

import (
	"net/http"
	"testing"
	"time"

	"github.com/sidecarlb/sidecar/proxy/resilience"
)

func TestOutlierEjection(t *testing.T) {
	base := resDefaults(t)
	base.Breaker.Enabled = false
	base.Retries.Backoff = time.Millisecond
	base.Outlier.ConsecutiveFailures = 3
	base.Outlier.BaseEjection = 10 * time.Second

	t.Run("consecutive 503s eject", func(t *testing.T) {
		nodes := resStartNodes(t, 3)
		bad := nodes[2]
		bad.status.Store(http.StatusServiceUnavailable)
		s := resProxy(t, resAddrs(nodes), RouteConfig{Resilience: base})
		for i := range 60 {
			if r := s.do(t, http.MethodGet, "/", nil); r.status != http.StatusOK {
				t.Fatalf("GET #%d: status %d, want 200", i, r.status)
			}
		}
		if got := bad.hits.Load(); got != 3 {
			t.Errorf("failing node got %d requests, want 3 (then ejected)", got)
		}
		if got := s.ejected(); len(got) != 1 || got[0] != bad.addr {
			t.Errorf("ejected endpoints = %v, want [%s]", got, bad.addr)
		}
		e := s.endpoint(t, bad.addr)
		if until := time.Until(*e.EjectedUntil); until < 8*time.Second || until > 10*time.Second {
			t.Errorf("ejected_until in %v, want about 10s", until)
		}
		if got := s.metric(t, "sidecar_outlier_ejections_total", map[string]string{"endpoint": bad.addr}); got != 1 {
			t.Errorf("sidecar_outlier_ejections_total = %v, want 1", got)
		}
	})

	t.Run("max ejection percent", func(t *testing.T) {
		nodes := resStartNodes(t, 3)
		for _, n := range nodes {
			n.status.Store(http.StatusServiceUnavailable)
		}
		s := resProxy(t, resAddrs(nodes), RouteConfig{Resilience: base})
		for range 60 {
			s.do(t, http.MethodGet, "/", nil)
		}
		if got := s.ejected(); len(got) != 1 {
			t.Errorf("ejected endpoints = %v, want exactly 1 of 3 (max_ejection_percent 50)", got)
		}
		if got := s.metric(t, "sidecar_outlier_ejections_refused_total", nil); got == 0 {
			t.Error("sidecar_outlier_ejections_refused_total = 0, want > 0")
		}
	})

	for _, tc := range []struct {
		status     int
		ejectOn5xx bool
		want       bool
	}{
		{http.StatusNotFound, false, false},
		{http.StatusTooManyRequests, false, false},
		{http.StatusInternalServerError, false, false},
		{http.StatusNotFound, true, false},
		{http.StatusInternalServerError, true, true},
		{http.StatusBadGateway, false, true},
		{http.StatusGatewayTimeout, false, true},
	} {
		name := http.StatusText(tc.status)
		if tc.ejectOn5xx {
			name += " with eject_on_5xx"
		}
		t.Run(name, func(t *testing.T) {
			res := base
			res.Outlier.EjectOn5xx = tc.ejectOn5xx
			nodes := resStartNodes(t, 3)
			bad := nodes[0]
			bad.status.Store(int64(tc.status))
			s := resProxy(t, resAddrs(nodes), RouteConfig{Resilience: res})
			for range 30 {
				s.do(t, http.MethodGet, "/", nil)
			}
			got := len(s.ejected()) == 1
			if got != tc.want {
				t.Errorf("node answering %d ejected = %v, want %v (ejected: %v)", tc.status, got, tc.want, s.ejected())
			}
		})
	}

	t.Run("ejection ends", func(t *testing.T) {
		res := base
		res.Outlier.BaseEjection = 300 * time.Millisecond
		nodes := resStartNodes(t, 3)
		bad := nodes[1]
		bad.status.Store(http.StatusServiceUnavailable)
		clk := resilience.NewManual(time.Unix(1_700_000_000, 0))
		s := resProxyClock(t, resAddrs(nodes), RouteConfig{Resilience: res}, clk)
		for range 20 {
			s.do(t, http.MethodGet, "/", nil)
		}
		if got := s.ejected(); len(got) != 1 {
			t.Fatalf("ejected endpoints = %v, want [%s]", got, bad.addr)
		}
		bad.status.Store(http.StatusOK)
		hits := bad.hits.Load()
		clk.Advance(299 * time.Millisecond)
		for range 9 {
			s.do(t, http.MethodGet, "/", nil)
		}
		if got := bad.hits.Load(); got != hits {
			t.Errorf("ejected node got %d requests while ejected", got-hits)
		}
		clk.Advance(time.Millisecond)
		if got, n := s.ejected(), s.eligible(); len(got) != 0 || n != len(nodes) {
			t.Fatalf("at the ejection's end: ejected %v, %d eligible, want none and %d", got, n, len(nodes))
		}
		hits = bad.hits.Load()
		for i := range 30 {
			if r := s.do(t, http.MethodGet, "/", nil); r.status != http.StatusOK {
				t.Fatalf("GET #%d: status %d, want 200", i, r.status)
			}
		}
		if got := bad.hits.Load() - hits; got < 8 {
			t.Errorf("returned node got %d of 30 requests, want its share (about 10)", got)
		}
	})

	for _, tc := range []struct {
		name      string
		threshold int
		wantPanic bool
	}{
		{"panic threshold 50 with 1 of 2 left", 50, false},
		{"panic threshold 60 with 1 of 2 left", 60, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			res := base
			res.Outlier.PanicThreshold = tc.threshold
			nodes := resStartNodes(t, 2)
			bad := nodes[0]
			bad.status.Store(http.StatusServiceUnavailable)
			s := resProxy(t, resAddrs(nodes), RouteConfig{Resilience: res})
			for range 20 {
				s.do(t, http.MethodGet, "/", nil)
			}
			if got := s.ejected(); len(got) != 1 {
				t.Fatalf("ejected endpoints = %v, want [%s]", got, bad.addr)
			}
			if got := s.panicking(); got != tc.wantPanic {
				t.Errorf("Status().Panic = %v, want %v", got, tc.wantPanic)
			}
			hits := bad.hits.Load()
			for range 20 {
				s.do(t, http.MethodGet, "/", nil)
			}
			got := bad.hits.Load() - hits
			if tc.wantPanic && got == 0 {
				t.Error("in panic the ejected node got no request, want balancing over all")
			}
			if !tc.wantPanic && got != 0 {
				t.Errorf("ejected node got %d requests, want 0", got)
			}
		})
	}
}

// TestOutlierEjectionGrows: each ejection of the same node lasts base ×
// the times it was ejected, and 100 successes after an ejection forgive
// the earlier ones, so the next lasts base again.
func TestOutlierEjectionGrows(t *testing.T) {
	const base = 200 * time.Millisecond
	res := resDefaults(t)
	res.Breaker.Enabled = false
	res.Retries.Attempts = 0
	res.Outlier.ConsecutiveFailures = 3
	res.Outlier.BaseEjection = base
	res.Outlier.MaxEjection = time.Minute
	nodes := resStartNodes(t, 3)
	bad := nodes[0]
	clk := resilience.NewManual(time.Unix(1_700_000_000, 0))
	s := resProxyClock(t, resAddrs(nodes), RouteConfig{Resilience: res}, clk)

	// ejectOnce fails bad until it is ejected and returns how long the
	// ejection lasts by the route's clock; then moves the clock to its end
	// and checks the node is back.
	ejectOnce := func(t *testing.T) time.Duration {
		t.Helper()
		bad.status.Store(http.StatusServiceUnavailable)
		var until *time.Time
		for i := 0; until == nil; i++ {
			if i == 30 {
				t.Fatal("node answering 503 not ejected after 30 requests")
			}
			s.do(t, http.MethodGet, "/", nil)
			until = s.endpoint(t, bad.addr).EjectedUntil
		}
		bad.status.Store(http.StatusOK)
		d := until.Sub(clk.Now())
		clk.Advance(d)
		if got, n := s.ejected(), s.eligible(); len(got) != 0 || n != len(nodes) {
			t.Fatalf("at the ejection's end: ejected %v, %d eligible, want none and %d", got, n, len(nodes))
		}
		return d
	}
	check := func(t *testing.T, what string, want time.Duration) {
		t.Helper()
		if got := ejectOnce(t); got != want {
			t.Errorf("%s lasted %v, want %v", what, got, want)
		}
	}
	check(t, "first ejection", base)
	check(t, "second ejection", 2*base)
	check(t, "third ejection", 3*base)
	// 100 successes on the node forgive the ejections so far.
	from := bad.hits.Load()
	for i := 0; bad.hits.Load()-from < 100; i++ {
		if i == 1000 {
			t.Fatalf("returned node got %d of 1000 requests, want 100", bad.hits.Load()-from)
		}
		if r := s.do(t, http.MethodGet, "/", nil); r.status != http.StatusOK {
			t.Fatalf("GET: status %d, want 200", r.status)
		}
	}
	check(t, "ejection after 100 successes", base)
}
