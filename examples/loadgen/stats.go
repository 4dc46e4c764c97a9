package main

import (
	"fmt"
	"io"
	"math"
	"slices"
	"strings"
	"time"
)

// stats aggregates the results of a run, one second at a time. It belongs to
// the loop in runLoad and is not safe for concurrent use.
type stats struct {
	start, stop time.Time
	byName      map[string]*instance
	names       []string // sorted
	events      []event

	errNow   int // failed requests in the current second
	errTotal int
	reasons  map[string]int
	errTimes []time.Time // of the latest maxErrTimes failures, in arrival order

	latency hist // of every answer
}

// instance is what stats knows of one answering instance.
type instance struct {
	name     string
	window   []time.Duration // latencies of this second's answers
	total    int
	lastSeen time.Time
	since    time.Time // when it (re)joined rotation
	left     bool
	leftAt   time.Time // when it left: its last answer, or a failure after it
	backAt   time.Time // its first answer since it left; zero until then
	isNew    bool      // first answered in this second, unknown at the start
}

// maxErrTimes bounds how many failure times stats keeps.
const maxErrTimes = 100000

// event is a narration line from the -events file.
type event struct {
	at   time.Time
	text string
}

// second is what one second of the run looked like.
type second struct {
	elapsed  time.Duration
	rows     []row // one per instance, by name
	all      row
	errNow   int
	errTotal int
	reasons  string
	news     []string // instances that left, came back or joined
}

type row struct {
	name     string
	n, total int
	p50, p99 time.Duration
	leftAt   time.Duration // since the start; 0 while in rotation
}

func newStats(start time.Time, known []string) *stats {
	s := &stats{start: start, byName: map[string]*instance{}, reasons: map[string]int{}}
	for _, name := range known {
		s.instance(name, start).isNew = false
	}
	return s
}

// instance returns the instance named name, adding it first seen at at.
func (s *stats) instance(name string, at time.Time) *instance {
	in, ok := s.byName[name]
	if !ok {
		in = &instance{name: name, since: at, isNew: true}
		s.byName[name] = in
		i, _ := slices.BinarySearch(s.names, name)
		s.names = slices.Insert(s.names, i, name)
	}
	return in
}

func (s *stats) add(r result) {
	if r.err != "" {
		s.errNow++
		s.errTotal++
		s.reasons[r.err]++
		if len(s.errTimes) == maxErrTimes {
			s.errTimes = slices.Delete(s.errTimes, 0, maxErrTimes/2)
		}
		s.errTimes = append(s.errTimes, r.at)
		return
	}
	in := s.instance(r.instance, r.at)
	in.window = append(in.window, r.latency)
	in.total++
	in.lastSeen = r.at
	if in.left && in.backAt.IsZero() {
		in.backAt = r.at
	}
	s.latency.add(r.latency)
}

// event records a narration line read at readAt and returns it.
func (s *stats) event(line string, readAt time.Time) event {
	e := parseEvent(line, readAt)
	s.events = append(s.events, e)
	return e
}

// failedSince returns how many requests failed at or after t, and when the
// last of them did.
func (s *stats) failedSince(t time.Time) (n int, last time.Time) {
	for i := len(s.errTimes) - 1; i >= 0 && !s.errTimes[i].Before(t); i-- {
		n++
		if s.errTimes[i].After(last) {
			last = s.errTimes[i]
		}
	}
	return n, last
}

// lastEventNaming returns the latest event after t whose text names name.
func (s *stats) lastEventNaming(name string, after time.Time) (event, bool) {
	for i := len(s.events) - 1; i >= 0; i-- {
		e := s.events[i]
		if !e.at.After(after) {
			break
		}
		if names(e.text, name) {
			return e, true
		}
	}
	return event{}, false
}

// tick closes the current second at now and starts the next.
func (s *stats) tick(now time.Time) second {
	sec := second{
		elapsed:  now.Sub(s.start),
		errNow:   s.errNow,
		errTotal: s.errTotal,
		reasons:  s.reasonText(),
	}
	var all []time.Duration
	for _, name := range s.names {
		in := s.byName[name]
		n := len(in.window)
		switch {
		case in.isNew:
			in.isNew = false
			sec.news = append(sec.news, name+" joined rotation")
		case !in.left && n == 0 && in.total > 0:
			sec.news = append(sec.news, s.leave(in))
		case in.left && n > 0:
			sec.news = append(sec.news, s.backText(in))
			in.left, in.since, in.backAt = false, in.backAt, time.Time{}
		}
		r := row{name: name, n: n, total: in.total, p50: percentile(in.window, 0.50), p99: percentile(in.window, 0.99)}
		if in.left {
			r.leftAt = in.leftAt.Sub(s.start)
		}
		sec.rows = append(sec.rows, r)
		sec.all.n += n
		sec.all.total += in.total
		all = append(all, in.window...)
		in.window = in.window[:0]
	}
	sec.all.name = "all"
	sec.all.p50, sec.all.p99 = percentile(all, 0.50), percentile(all, 0.99)
	s.errNow = 0
	return sec
}

// leave marks in as out of rotation and says so. When a narration line
// named it before, it was gone once its last answer or the last failure
// since that line came back, whichever is later; the text says how long
// after that line, and how many requests failed meanwhile.
func (s *stats) leave(in *instance) string {
	in.left, in.leftAt = true, in.lastSeen
	e, ok := s.lastEventNaming(in.name, in.since)
	if !ok {
		return fmt.Sprintf("%s left rotation (last answer at %.1fs)", in.name, in.lastSeen.Sub(s.start).Seconds())
	}
	failed, lastErr := s.failedSince(e.at)
	if lastErr.After(in.leftAt) {
		in.leftAt = lastErr
	}
	when := "at once"
	if after := in.leftAt.Sub(e.at); after >= 50*time.Millisecond {
		when = fmt.Sprintf("after %.1fs", after.Seconds())
	}
	switch failed {
	case 0:
		return fmt.Sprintf("%s left rotation %s; no request failed", in.name, when)
	case 1:
		return fmt.Sprintf("%s left rotation %s; 1 request failed meanwhile", in.name, when)
	}
	return fmt.Sprintf("%s left rotation %s; %d requests failed meanwhile", in.name, when, failed)
}

// backText says that in is back in rotation and, when a narration line
// named it since it left, how long after that line.
func (s *stats) backText(in *instance) string {
	e, ok := s.lastEventNaming(in.name, in.leftAt)
	if !ok {
		return fmt.Sprintf("%s back in rotation", in.name)
	}
	return fmt.Sprintf("%s back in rotation after %.1fs", in.name, max(in.backAt.Sub(e.at), 0).Seconds())
}

// reasonText lists the reasons of failed requests, most frequent first.
func (s *stats) reasonText() string {
	keys := sortedKeys(s.reasons)
	slices.SortStableFunc(keys, func(a, b string) int { return s.reasons[b] - s.reasons[a] })
	parts := make([]string, len(keys))
	for i, k := range keys {
		parts[i] = fmt.Sprintf("%s ×%d", k, s.reasons[k])
	}
	return strings.Join(parts, ", ")
}

// end marks the end of the run.
func (s *stats) end(at time.Time) { s.stop = at }

func (s *stats) answered() int { return s.latency.n }

// summary prints the totals of the run.
func (s *stats) summary(w io.Writer) {
	took := s.stop.Sub(s.start)
	answered := s.answered()
	sent := answered + s.errTotal
	fmt.Fprintf(w, "summary: %d requests in %.1fs (%.1f/s): %d answered, %d failed (%s)\n",
		sent, took.Seconds(), float64(sent)/max(took.Seconds(), 0.001), answered, s.errTotal, percent(s.errTotal, sent))
	width := 8
	for _, name := range s.names {
		width = max(width, len(name))
	}
	for _, name := range s.names {
		in := s.byName[name]
		fmt.Fprintf(w, "  %-*s %7d  %6s of answers\n", width, name, in.total, percent(in.total, answered))
	}
	if s.errTotal > 0 {
		fmt.Fprintf(w, "  %-*s %7d  %s\n", width, "failed", s.errTotal, s.reasonText())
	}
	if answered > 0 {
		fmt.Fprintf(w, "  latency of answers: p50 %s, p99 %s\n", ms(s.latency.quantile(0.50)), ms(s.latency.quantile(0.99)))
	}
}

func percent(n, of int) string {
	if of == 0 {
		return "0%"
	}
	return fmt.Sprintf("%.1f%%", 100*float64(n)/float64(of))
}

// percentile returns the q-quantile of d by nearest rank, sorting d in
// place; 0 when d is empty.
func percentile(d []time.Duration, q float64) time.Duration {
	if len(d) == 0 {
		return 0
	}
	slices.Sort(d)
	i := int(math.Ceil(q*float64(len(d)))) - 1
	return d[min(max(i, 0), len(d)-1)]
}

// hist counts latencies in buckets 1% wide, so the summary's percentiles
// need no list of every sample. The zero value is empty and ready.
type hist struct {
	counts map[int]int
	n      int
}

const histGrowth = 1.01

func (h *hist) add(d time.Duration) {
	if h.counts == nil {
		h.counts = map[int]int{}
	}
	b := 0
	if us := float64(d) / float64(time.Microsecond); us > 1 {
		b = int(math.Ceil(math.Log(us) / math.Log(histGrowth)))
	}
	h.counts[b]++
	h.n++
}

// quantile returns the upper bound of the bucket holding the q-quantile.
func (h *hist) quantile(q float64) time.Duration {
	if h.n == 0 {
		return 0
	}
	keys := make([]int, 0, len(h.counts))
	for k := range h.counts {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	rank := max(int(math.Ceil(q*float64(h.n))), 1)
	seen := 0
	for _, k := range keys {
		seen += h.counts[k]
		if seen >= rank {
			return time.Duration(math.Pow(histGrowth, float64(k)) * float64(time.Microsecond))
		}
	}
	return 0
}
