package proxy

import (
	"testing"
	"time"
)

func TestNodeStatsSummary(t *testing.T) {
	base := time.Unix(1_000_000, 0)
	for _, tc := range []struct {
		name      string
		record    func(s *nodeStats)
		now       time.Time
		wantRate  float64
		wantErr   float64
		wantP50   float64 // ms; 0: no latency figures
		wantP99Lo float64
		wantP99Hi float64
	}{
		{name: "nothing", now: base.Add(20 * time.Second)},
		{
			name: "tries and failures over the window",
			record: func(s *nodeStats) {
				for i := range 9 {
					s.try(base.Add(time.Duration(11+i)*time.Second), i%3 == 0)
				}
			},
			now:      base.Add(20 * time.Second), // window 9s: seconds 11 to 20
			wantRate: 1, wantErr: 0.333,
		},
		{
			name: "old slots are out of the window",
			record: func(s *nodeStats) {
				s.try(base.Add(2*time.Second), true)
				s.try(base.Add(19*time.Second), false)
			},
			now:      base.Add(20 * time.Second),
			wantRate: 0.111, wantErr: 0,
		},
		{
			name: "latency percentiles",
			record: func(s *nodeStats) {
				at := base.Add(19 * time.Second)
				for range 98 {
					s.latency(at, 3*time.Millisecond) // bucket 2048-4096µs: p50 = 2048 + 2048×50/98 µs
				}
				s.latency(at, 300*time.Millisecond)
				s.latency(at, 300*time.Millisecond)
			},
			now:     base.Add(20 * time.Second),
			wantP50: 3.093, wantP99Lo: 262, wantP99Hi: 525,
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s := &nodeStats{born: base.UnixNano()}
			if tc.record != nil {
				tc.record(s)
			}
			got := s.summary(tc.now)
			if got.WindowSeconds != 9 {
				t.Errorf("WindowSeconds = %v, want 9", got.WindowSeconds)
			}
			if got.RequestsPerSecond != tc.wantRate || got.ErrorRate != tc.wantErr {
				t.Errorf("summary() rate, errors = %v, %v; want %v, %v", got.RequestsPerSecond, got.ErrorRate, tc.wantRate, tc.wantErr)
			}
			switch {
			case tc.wantP50 == 0 && got.LatencyMS != nil:
				t.Errorf("LatencyMS = %+v, want none", got.LatencyMS)
			case tc.wantP50 != 0 && got.LatencyMS == nil:
				t.Errorf("LatencyMS = nil, want p50 %v", tc.wantP50)
			case tc.wantP50 != 0:
				if got.LatencyMS.P50 != tc.wantP50 {
					t.Errorf("P50 = %v, want %v", got.LatencyMS.P50, tc.wantP50)
				}
				if got.LatencyMS.P99 < tc.wantP99Lo || got.LatencyMS.P99 > tc.wantP99Hi {
					t.Errorf("P99 = %v, want in [%v, %v]", got.LatencyMS.P99, tc.wantP99Lo, tc.wantP99Hi)
				}
			}
		})
	}
}

// TestNodeStatsYoung: a node younger than the window is measured over its
// age.
func TestNodeStatsYoung(t *testing.T) {
	born := time.Unix(1_000_000, 0)
	s := &nodeStats{born: born.UnixNano()}
	s.try(born.Add(time.Second), false)
	s.try(born.Add(time.Second), false)
	got := s.summary(born.Add(2 * time.Second))
	if got.WindowSeconds != 2 || got.RequestsPerSecond != 1 {
		t.Errorf("summary() = %+v, want a 2s window at 1/s", got)
	}
}

// TestNodeStatsLazy: a node never asked holds no slots and reports an
// empty window; its first try makes them.
func TestNodeStatsLazy(t *testing.T) {
	born := time.Unix(1_000_000, 0)
	s := &nodeStats{born: born.UnixNano()}
	got := s.summary(born.Add(20 * time.Second))
	if got.RequestsPerSecond != 0 || got.ErrorRate != 0 || got.LatencyMS != nil {
		t.Errorf("summary() of an unused node = %+v, want no figures", got)
	}
	if s.slots.Load() != nil {
		t.Fatal("summary() made the slots of an unused node")
	}
	s.try(born.Add(21*time.Second), true)
	if s.slots.Load() == nil {
		t.Fatal("try() did not make the slots")
	}
	if got := s.summary(born.Add(21 * time.Second)); got.ErrorRate != 1 {
		t.Errorf("summary() after a failed try = %+v, want error rate 1", got)
	}
}
