package main

import (
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync/atomic"
	"testing"
	"time"
)

func TestParseEvent(t *testing.T) {
	readAt := time.Unix(2000, 0)
	tests := []struct {
		name, line, text string
		at               time.Time
	}{
		{"plain", "killing echo-2", "killing echo-2", readAt},
		{"stamped", "@1000.25 killing echo-2", "killing echo-2", time.Unix(1000, 250_000_000)},
		{"decimal comma", "@1000,5 x", "x", time.Unix(1000, 500_000_000)},
		{"bad stamp", "@soon x", "@soon x", readAt},
		{"stamp alone", "@1000", "@1000", readAt},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			e := parseEvent(tc.line, readAt)
			if e.text != tc.text || !e.at.Equal(tc.at) {
				t.Errorf("parseEvent(%q) = %q at %v, want %q at %v", tc.line, e.text, e.at, tc.text, tc.at)
			}
		})
	}
}

func TestNames(t *testing.T) {
	tests := []struct {
		text, name string
		want       bool
	}{
		{"killing echo-2 (SIGKILL)", "echo-2", true},
		{"killing echo-2.", "echo-2", true},
		{"killing echo-20", "echo-2", false},
		{"starting (echo-2) again", "echo-2", true},
		{"killing echo-2", "echo", false},
	}
	for _, tc := range tests {
		if got := names(tc.text, tc.name); got != tc.want {
			t.Errorf("names(%q, %q) = %v, want %v", tc.text, tc.name, got, tc.want)
		}
	}
}

func TestPercentile(t *testing.T) {
	d := []time.Duration{5, 1, 4, 2, 3, 6, 7, 8, 9, 10}
	if got := percentile(d, 0.5); got != 5 {
		t.Errorf("percentile(p50) = %v, want 5", got)
	}
	if got := percentile(d, 0.99); got != 10 {
		t.Errorf("percentile(p99) = %v, want 10", got)
	}
	if got := percentile(nil, 0.5); got != 0 {
		t.Errorf("percentile(nil) = %v, want 0", got)
	}
	var h hist
	for i := 1; i <= 100; i++ {
		h.add(time.Duration(i) * time.Millisecond)
	}
	if got := h.quantile(0.5); got < 49*time.Millisecond || got > 51*time.Millisecond {
		t.Errorf("hist p50 = %v, want 50ms within 2%%", got)
	}
}

// TestLeaveAndRejoin drives stats through a kill and a restart of one of two
// instances, one second at a time.
func TestLeaveAndRejoin(t *testing.T) {
	start := time.Unix(1000, 0)
	at := func(s float64) time.Time { return start.Add(time.Duration(s * float64(time.Second))) }
	st := newStats(start, []string{"a", "b"})
	answer := func(name string, s float64) { st.add(result{at: at(s), latency: time.Millisecond, instance: name}) }

	answer("a", 0.5)
	answer("b", 0.6)
	if sec := st.tick(at(1)); len(sec.news) != 0 {
		t.Fatalf("tick 1 news = %q, want none", sec.news)
	}
	st.event("killing b", at(1.2))
	answer("a", 1.5)
	st.add(result{at: at(1.6), err: "502 connect_failed"})
	st.add(result{at: at(1.8), err: "502 connect_failed"})
	sec := st.tick(at(2))
	if want := []string{"b left rotation after 0.6s; 2 requests failed meanwhile"}; !slices.Equal(sec.news, want) {
		t.Errorf("tick 2 news = %q, want %q", sec.news, want)
	}
	if sec.rows[1].leftAt != 1800*time.Millisecond || sec.errNow != 2 {
		t.Errorf("tick 2 row b = %+v, errors %d; want left at 1.8s, 2 errors", sec.rows[1], sec.errNow)
	}
	st.event("starting b again", at(2.5))
	answer("a", 2.5)
	answer("b", 2.9)
	answer("c", 2.95)
	sec = st.tick(at(3))
	if want := []string{"b back in rotation after 0.4s", "c joined rotation"}; !slices.Equal(sec.news, want) {
		t.Errorf("tick 3 news = %q, want %q", sec.news, want)
	}
	answer("a", 3.5)
	answer("c", 3.5)
	sec = st.tick(at(4))
	if want := []string{"b left rotation (last answer at 2.9s)"}; !slices.Equal(sec.news, want) {
		t.Errorf("tick 4 news = %q, want %q", sec.news, want)
	}
	if got := sec.rows[1].leftAt; got != 2900*time.Millisecond {
		t.Errorf("tick 4 b left at %v, want 2.9s", got)
	}
	st.event("killing c", at(4.0))
	answer("a", 4.5)
	sec = st.tick(at(5))
	if want := []string{"c left rotation at once; no request failed"}; !slices.Equal(sec.news, want) {
		t.Errorf("tick 5 news = %q, want %q", sec.news, want)
	}
}

func TestEventFile(t *testing.T) {
	path := filepath.Join(t.TempDir(), "events")
	f := &eventFile{path: path}
	if lines, err := f.read(); err != nil || lines != nil {
		t.Fatalf("read() of a missing file = %q, %v; want nothing", lines, err)
	}
	if err := os.WriteFile(path, []byte("one\ntw"), 0o600); err != nil {
		t.Fatal(err)
	}
	if lines, _ := f.read(); !slices.Equal(lines, []string{"one"}) {
		t.Errorf("read() = %q, want [one]", lines)
	}
	fh, err := os.OpenFile(path, os.O_APPEND|os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	fh.WriteString("o\nthree\n")
	fh.Close()
	if lines, _ := f.read(); !slices.Equal(lines, []string{"two", "three"}) {
		t.Errorf("read() = %q, want [two three]", lines)
	}
}

// TestRun runs loadgen against two instances behind one test server.
func TestRun(t *testing.T) {
	var n atomic.Int64
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set(instanceHeader, []string{"x", "y"}[n.Add(1)%2])
	}))
	defer srv.Close()
	var out, errOut strings.Builder
	code := run([]string{"-url", srv.URL, "-rate", "100", "-duration", "1500ms", "-concurrency", "1", "-expect", "2", "-plain"}, &out, &errOut)
	if code != exitOK {
		t.Fatalf("run() = %d, want %d; stderr:\n%s", code, exitOK, errOut.String())
	}
	for _, want := range []string{"2 instances answering", "    1s  x ", "summary: ", "answered, 0 failed"} {
		if !strings.Contains(out.String(), want) {
			t.Errorf("output lacks %q:\n%s", want, out.String())
		}
	}
}

func TestFlags(t *testing.T) {
	tests := []struct {
		name string
		args []string
		want string
	}{
		{"no url", nil, "-url"},
		{"bad rate", []string{"-url", "http://x/", "-rate", "0"}, "-rate"},
		{"zero duration alone", []string{"-url", "http://x/", "-duration", "0s"}, "-duration"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			var out, errOut strings.Builder
			if code := run(tc.args, &out, &errOut); code != exitUsage || !strings.Contains(errOut.String(), tc.want) {
				t.Errorf("run(%q) = %d, %q; want %d naming %s", tc.args, code, errOut.String(), exitUsage, tc.want)
			}
		})
	}
}
