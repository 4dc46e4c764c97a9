package test

// Integration test of systemd's notify protocol: the real sidecar binary,
// with $NOTIFY_SOCKET naming a datagram socket the test reads as systemd
// would, the echo example and a real Consul dev agent.

import (
	"net"
	"net/http"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/sidecarlb/sidecar/test/consulagent"
	"github.com/sidecarlb/sidecar/test/harness"
)

// TestSystemdNotify checks that a sidecar started with $NOTIFY_SOCKET (a
// Type=notify unit) sends READY=1 only once it is ready as /ready says it,
// STATUS= with the reason while it is not, RELOADING=1 (with
// MONOTONIC_USEC=) then READY=1 around a SIGHUP reload, and STOPPING=1 when
// SIGTERM starts the shutdown.
func TestSystemdNotify(t *testing.T) {
	agent := consulagent.Start(t, consulagent.Options{})
	sock := filepath.Join(t.TempDir(), "notify.sock")
	conn, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: sock, Net: "unixgram"})
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	t.Setenv("NOTIFY_SOCKET", sock) // inherited by the sidecar

	messages := make(chan string, 64)
	go func() {
		buf := make([]byte, 4096)
		for {
			n, err := conn.Read(buf)
			if err != nil {
				close(messages)
				return
			}
			messages <- string(buf[:n])
		}
	}()
	next := func(what string) string {
		t.Helper()
		select {
		case m, ok := <-messages:
			if !ok {
				t.Fatalf("notify socket closed waiting for %s", what)
			}
			return m
		case <-time.After(15 * time.Second):
			t.Fatalf("no notify message within 15s, waiting for %s", what)
		}
		return ""
	}

	// The sidecar first, with the app down: not ready, and it says why.
	app := newHBApp(t, "echo-notify", agent.Addr())
	app.sidecar = harness.StartSidecar(t, app.adminAddr, app.config())
	if m := next("a STATUS while the app is down"); !strings.HasPrefix(m, "STATUS=") || strings.Contains(m, "READY=1") {
		t.Fatalf("first notify message with the app down = %q, want a STATUS with no READY=1", m)
	}
	if code, _ := readyState(t, app.adminAddr); code != http.StatusServiceUnavailable {
		t.Fatalf("GET /ready with the app down = %d, want 503", code)
	}

	app.echo = harness.StartEcho(t, app.echoAddr, app.id)
	for deadline := time.Now().Add(30 * time.Second); ; {
		if time.Now().After(deadline) {
			t.Fatal("no READY=1 within 30s of the app starting, only STATUS= lines")
		}
		m := next("READY=1")
		if strings.Contains(m, "READY=1") {
			if code, reason := readyState(t, app.adminAddr); code != http.StatusOK {
				t.Fatalf("READY=1 sent while /ready = %d (%s)", code, reason)
			}
			break
		}
		if !strings.HasPrefix(m, "STATUS=") {
			t.Fatalf("notify message %q before READY=1, want STATUS= lines only", m)
		}
	}

	// A reload: RELOADING=1 with the monotonic time, then READY=1.
	app.sidecar.Signal(syscall.SIGHUP)
	if m := next("RELOADING=1"); !strings.Contains(m, "RELOADING=1") || !strings.Contains(m, "MONOTONIC_USEC=") {
		t.Fatalf("first notify message after SIGHUP = %q, want RELOADING=1 and MONOTONIC_USEC=", m)
	}
	if m := next("READY=1 after the reload"); !strings.Contains(m, "READY=1") {
		t.Fatalf("notify message after RELOADING=1 = %q, want READY=1", m)
	}

	app.sidecar.Signal(syscall.SIGTERM)
	if m := next("STOPPING=1"); !strings.Contains(m, "STOPPING=1") {
		t.Fatalf("first notify message after SIGTERM = %q, want STOPPING=1", m)
	}
	if code := app.sidecar.Wait(15 * time.Second); code != 0 {
		t.Fatalf("sidecar exit code = %d, want 0\n%s", code, app.sidecar.Output())
	}
}
