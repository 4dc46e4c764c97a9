package discovery

import (
	"errors"
	"slices"
	"testing"
	"time"

	"go.uber.org/zap"
)

func TestFailoverKey(t *testing.T) {
	tests := []struct {
		name                string
		service, dc         string
		failover, tags      []string
		want                string
		wantService, wantDC string
	}{
		{"no failover", "web", "dc1", nil, []string{"v1"}, "web@dc1", "web", "dc1"},
		{"local primary", "web", "", []string{"dc2", "dc3"}, nil, "web|dc2|dc3", "web", ""},
		{"tags", "web", "dc1", []string{"dc2"}, []string{"v1", "a#b"}, "web@dc1|dc2#v1#a%23b", "web", "dc1"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			k := FailoverKey(tc.service, tc.dc, tc.failover, tc.tags)
			if k != tc.want {
				t.Fatalf("FailoverKey() = %q, want %q", k, tc.want)
			}
			s, dc, fo, tags := parseKey(k)
			if s != tc.wantService || dc != tc.wantDC || !slices.Equal(fo, tc.failover) {
				t.Errorf("parseKey(%q) = %q, %q, %v, want %q, %q, %v", k, s, dc, fo, tc.wantService, tc.wantDC, tc.failover)
			}
			if len(tc.failover) > 0 && !slices.Equal(tags, tc.tags) {
				t.Errorf("parseKey(%q) tags = %v, want %v", k, tags, tc.tags)
			}
			if s, dc := SplitKey(k); s != tc.wantService || dc != tc.wantDC {
				t.Errorf("SplitKey(%q) = %q, %q", k, s, dc)
			}
		})
	}
}

// snap returns a snapshot of endpoints with the given tags, one per id.
func snap(tags []string, ids ...string) *Snapshot {
	s := &Snapshot{Service: "web", Updated: time.Now()}
	for i, id := range ids {
		s.Endpoints = append(s.Endpoints, NewEndpoint(id, "10.0.0.1", 8000+i, tags, nil, 1))
	}
	return s
}

func TestFailoverServesFirstHealthyDatacenter(t *testing.T) {
	rec := &recorder{}
	f := &failover{out: rec, key: "web|dc2|dc3#v1", tags: []string{"v1"}, names: []string{"dc1", "dc2", "dc3"},
		snaps: make([]*Snapshot, 3), failed: make([]bool, 3), serving: -1, log: zap.NewNop()}
	dc1, dc2, dc3 := dcSink{f, 0}, dcSink{f, 1}, dcSink{f, 2}
	served := func() (string, []string) {
		s := rec.last()
		if s == nil {
			return "", nil
		}
		if s.Service != "web|dc2|dc3#v1" {
			t.Errorf("Service = %q, want the failover key", s.Service)
		}
		return s.Datacenter, ids(s)
	}
	check := func(step, wantDC string, wantIDs ...string) {
		t.Helper()
		dc, got := served()
		if dc != wantDC || !slices.Equal(got, wantIDs) {
			t.Errorf("%s: served %s %v, want %s %v", step, dc, got, wantDC, wantIDs)
		}
	}

	dc2.Publish(snap([]string{"v1"}, "b1"))
	check("dc1 not answered yet: wait for it", "")
	dc1.Publish(snap(nil))
	check("dc1 empty, dc2 healthy", "dc2", "b1")
	dc1.Publish(snap([]string{"v2"}, "a1"))
	check("dc1 has instances without the tag", "dc2", "b1")
	dc1.Publish(snap([]string{"v1"}, "a1"))
	check("dc1 recovered", "dc1", "a1")
	n, _, _ := rec.count()
	dc2.Publish(snap([]string{"v1"}, "b1", "b2"))
	if m, _, _ := rec.count(); m != n {
		t.Errorf("a change in dc2 while dc1 serves published %d snapshots, want 0", m-n)
	}
	dc1.Publish(snap(nil))
	check("dc1 empties again", "dc2", "b1", "b2")
	dc2.Fail(errors.New("down"))
	dc2.Publish(snap(nil))
	check("dc2 empties: dc3 has not answered and is skipped", "dc1")
	dc3.Publish(snap([]string{"v1"}, "c1"))
	check("dc3 answers healthy", "dc3", "c1")
	if _, _, fails := rec.count(); fails != 1 {
		t.Errorf("failures relayed = %d, want 1 (dc2's, while it served)", fails)
	}
	dc1.Publish(snap([]string{"v1"}, "a2"))
	check("dc1 recovers", "dc1", "a2")
}
