package main

import (
	"slices"
	"testing"
)

func TestPeerList(t *testing.T) {
	tests := []struct {
		peers  string
		consul bool
		base   string
		want   []string
	}{
		{peers: "direct,direct-1,sidecar,haproxy,nginx",
			want: []string{"direct", "direct-1", "sidecar", "haproxy", "nginx"}},
		{peers: "direct,sidecar", consul: true, want: []string{"direct", "sidecar", "sidecar-consul"}},
		{peers: "direct,sidecar,haproxy", base: "HEAD~1",
			want: []string{"direct", "sidecar", "sidecar-base", "haproxy"}},
		{peers: "direct,sidecar", consul: true, base: "HEAD~1",
			want: []string{"direct", "sidecar", "sidecar-base", "sidecar-consul"}},
		{peers: "direct,haproxy", base: "abc123", want: []string{"direct", "haproxy", "sidecar-base"}},
		{peers: "sidecar-base,sidecar", base: "abc123", want: []string{"sidecar-base", "sidecar"}},
	}
	for _, tc := range tests {
		if got := peerList(tc.peers, tc.consul, tc.base); !slices.Equal(got, tc.want) {
			t.Errorf("peerList(%q, %v, %q) = %q, want %q", tc.peers, tc.consul, tc.base, got, tc.want)
		}
	}
}
