package main

import (
	"testing"
	"time"

	"github.com/sidecarlb/sidecar/config"
	"github.com/sidecarlb/sidecar/proxy"
)

// TestTimeouts: every timeout the proxy takes reaches it from the file.
func TestTimeouts(t *testing.T) {
	in := config.Timeouts{Connect: 1 * time.Second, Request: 2 * time.Second, Idle: 3 * time.Second,
		ReadHeader: 4 * time.Second, MaxConnectionAge: 5 * time.Second, Tunnel: 6 * time.Second}
	want := proxy.Timeouts{Connect: 1 * time.Second, Request: 2 * time.Second, Idle: 3 * time.Second,
		MaxConnectionAge: 5 * time.Second, Tunnel: 6 * time.Second}
	if got := timeouts(in); got != want {
		t.Errorf("timeouts(%+v) = %+v, want %+v", in, got, want)
	}
}
