package heartbeat

import (
	"context"
	"errors"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"
)

func TestHTTPProbe(t *testing.T) {
	mux := http.NewServeMux()
	mux.HandleFunc("/ok", func(w http.ResponseWriter, r *http.Request) {})
	mux.HandleFunc("/nocontent", func(w http.ResponseWriter, r *http.Request) { w.WriteHeader(http.StatusNoContent) })
	mux.HandleFunc("/broken", func(w http.ResponseWriter, r *http.Request) {
		http.Error(w, "db down\n"+strings.Repeat("x", 10000), http.StatusInternalServerError)
	})
	mux.HandleFunc("/moved", func(w http.ResponseWriter, r *http.Request) { http.Redirect(w, r, "/ok", http.StatusFound) })
	mux.HandleFunc("/slow", func(w http.ResponseWriter, r *http.Request) { <-r.Context().Done() })
	srv := httptest.NewServer(mux)
	defer srv.Close()

	tests := []struct {
		name     string
		path     string
		timeout  time.Duration
		ctxLimit time.Duration // deadline of the caller's context, if set
		want     string        // output when healthy
		wantErr  string        // substring of the error when not
		isErr    error
	}{
		{name: "200", path: "/ok", want: "GET " + srv.URL + "/ok: 200 OK"},
		{name: "204", path: "/nocontent", want: "GET " + srv.URL + "/nocontent: 204 No Content"},
		{name: "redirect followed", path: "/moved", want: "GET " + srv.URL + "/moved: 200 OK"},
		{name: "500 with body", path: "/broken", wantErr: "GET " + srv.URL + "/broken: 500 Internal Server Error: db down\nxxx"},
		{name: "404", path: "/missing", wantErr: "GET " + srv.URL + "/missing: 404 Not Found"},
		{name: "own timeout", path: "/slow", timeout: 50 * time.Millisecond, wantErr: "GET " + srv.URL + "/slow: ", isErr: context.DeadlineExceeded},
		{name: "caller deadline", path: "/slow", ctxLimit: 50 * time.Millisecond, wantErr: "GET " + srv.URL + "/slow: ", isErr: context.DeadlineExceeded},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			ctx := context.Background()
			if tc.ctxLimit > 0 {
				var cancel context.CancelFunc
				ctx, cancel = context.WithTimeout(ctx, tc.ctxLimit)
				defer cancel()
			}
			out, err := HTTPProbe(srv.URL+tc.path, tc.timeout).Probe(ctx)
			if tc.wantErr == "" {
				if err != nil || out != tc.want {
					t.Errorf("Probe() = %q, %v, want %q", out, err, tc.want)
				}
				return
			}
			if err == nil || !strings.HasPrefix(err.Error(), tc.wantErr) {
				t.Fatalf("Probe() = %q, %v, want error starting %q", out, err, tc.wantErr)
			}
			if tc.isErr != nil && !errors.Is(err, tc.isErr) {
				t.Errorf("Probe() error %v is not %v", err, tc.isErr)
			}
			if len(err.Error()) > 100+maxBody {
				t.Errorf("Probe() error is %d bytes, want the body cut to %d", len(err.Error()), maxBody)
			}
		})
	}
}

func TestHTTPProbeRefused(t *testing.T) {
	addr := closedAddr(t)
	_, err := HTTPProbe("http://"+addr+"/health", time.Second).Probe(context.Background())
	if want := "GET http://" + addr + "/health: dial tcp " + addr + ": connect: connection refused"; err == nil || err.Error() != want {
		t.Errorf("Probe() = %v, want %q", err, want)
	}
}

func TestHTTPProbeBadURL(t *testing.T) {
	if _, err := HTTPProbe("http://bad host/", time.Second).Probe(context.Background()); err == nil {
		t.Error("Probe() of a malformed URL succeeded")
	}
}

func TestTCPProbe(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	open := ln.Addr().String()
	closed := closedAddr(t)
	cancelled, cancel := context.WithCancel(context.Background())
	cancel()

	tests := []struct {
		name    string
		addr    string
		ctx     context.Context
		want    string
		wantErr string
	}{
		{name: "listening", addr: open, ctx: context.Background(), want: "TCP connect " + open + ": ok"},
		{name: "closed port", addr: closed, ctx: context.Background(), wantErr: "dial tcp " + closed + ": connect: connection refused"},
		{name: "cancelled", addr: open, ctx: cancelled, wantErr: "operation was canceled"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			out, err := TCPProbe(tc.addr, time.Second).Probe(tc.ctx)
			if tc.wantErr == "" {
				if err != nil || out != tc.want {
					t.Errorf("Probe() = %q, %v, want %q", out, err, tc.want)
				}
				return
			}
			if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
				t.Errorf("Probe() = %q, %v, want error containing %q", out, err, tc.wantErr)
			}
		})
	}
}

func TestProbeStrings(t *testing.T) {
	tests := []struct {
		p    Prober
		want string
	}{
		{HTTPProbe("http://127.0.0.1:8080/health", 0), "HTTP GET http://127.0.0.1:8080/health"},
		{TCPProbe("127.0.0.1:8080", 0), "TCP connect 127.0.0.1:8080"},
	}
	for _, tc := range tests {
		if got := tc.p.(interface{ String() string }).String(); got != tc.want {
			t.Errorf("String() = %q, want %q", got, tc.want)
		}
	}
}

// closedAddr returns a loopback address nothing listens on.
func closedAddr(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close()
	return addr
}
