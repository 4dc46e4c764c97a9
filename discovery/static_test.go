package discovery

import (
	"context"
	"slices"
	"strings"
	"testing"
	"time"
)

func TestNewStatic(t *testing.T) {
	tests := []struct {
		name     string
		services map[string][]string
		wantErrs []string // substrings, every one must appear
	}{
		{name: "ok", services: map[string][]string{"web": {"b:80", "a:80", "[::1]:443"}, "none": nil}},
		{name: "no port", services: map[string][]string{"web": {"10.0.0.1"}}, wantErrs: []string{`"web"`, `"10.0.0.1"`}},
		{name: "bad port", services: map[string][]string{"web": {"a:http"}}, wantErrs: []string{`port "http"`}},
		{name: "port zero", services: map[string][]string{"web": {"a:0"}}, wantErrs: []string{`port "0"`}},
		{name: "port too big", services: map[string][]string{"web": {"a:65536"}}, wantErrs: []string{`port "65536"`}},
		{name: "empty host", services: map[string][]string{"web": {":80"}}, wantErrs: []string{"empty host"}},
		{name: "duplicate", services: map[string][]string{"web": {"a:80", "a:080"}}, wantErrs: []string{"duplicate"}},
		{name: "empty name", services: map[string][]string{" ": {"a:80"}}, wantErrs: []string{"empty name"}},
		{name: "names differ only in case", services: map[string][]string{"web": {"a:80"}, "Web": {"b:80"}}, wantErrs: []string{`"Web" and "web"`}},
		{
			name:     "every problem",
			services: map[string][]string{"web": {"x"}, "api": {"y:z"}},
			wantErrs: []string{`"web"`, `"api"`},
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			s, err := NewStatic(tc.services)
			if len(tc.wantErrs) == 0 {
				if err != nil || s == nil {
					t.Fatalf("NewStatic() = %v, %v, want a backend", s, err)
				}
				return
			}
			if err == nil {
				t.Fatalf("NewStatic() error = nil, want %q", tc.wantErrs)
			}
			for _, want := range tc.wantErrs {
				if !strings.Contains(err.Error(), want) {
					t.Errorf("NewStatic() error = %q, want it to mention %q", err, want)
				}
			}
		})
	}
}

func TestStaticWatch(t *testing.T) {
	s, err := NewStatic(map[string][]string{"web": {"b:80", "a:80", "[::1]:443"}})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	rec := &recorder{}
	done := make(chan struct{})
	go func() {
		defer close(done)
		s.Watch(ctx, "web", rec)
	}()
	waitUntil(t, "the snapshot", func() bool { return rec.last() != nil })
	snap := rec.last()
	if got, want := ids(snap), []string{"[::1]:443", "a:80", "b:80"}; !slices.Equal(got, want) {
		t.Errorf("IDs = %v, want %v", got, want)
	}
	if e := snap.Endpoints[0]; e.Address != "::1" || e.Port != 443 || e.Addr != "[::1]:443" || e.Weight != 1 {
		t.Errorf("endpoint = %+v", e)
	}
	cancel()
	select {
	case <-done:
	case <-time.After(time.Second):
		t.Fatal("Watch did not return after cancel")
	}
	if n, _, _ := rec.count(); n != 1 {
		t.Errorf("published %d snapshots, want 1", n)
	}
}

func FuzzNewStatic(f *testing.F) {
	for _, s := range []string{"a:80", "[::1]:443", ":80", "a:0", "x", "[a:1", "a:99999"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, entry string) {
		s, err := NewStatic(map[string][]string{"web": {entry}})
		if err != nil {
			return
		}
		e := s.snaps["web"].Endpoints[0]
		if e.Port < 1 || e.Port > 65535 || e.Address == "" || e.ID != e.Addr {
			t.Errorf("NewStatic(%q) endpoint = %+v", entry, e)
		}
	})
}
