package pubsub

import (
	"bytes"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"runtime"
	"strings"
	"sync/atomic"
	"testing"

	"go.uber.org/zap"
)

// TestDeliverOverPool: deliveries go over internal/h1's client pool: one
// keep-alive connection for deliveries one after another, with the body,
// headers and answer intact, and none of http.Transport's per-connection
// goroutines; an answer with a body (read for the outcome) and an answer
// that closes the connection keep working.
func TestDeliverOverPool(t *testing.T) {
	var conns atomic.Int32
	var bodies atomic.Int32
	srv := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		b, _ := io.ReadAll(r.Body)
		if !bytes.Equal(b, []byte(`{"n":1}`)) || r.Header.Get("Content-Type") != "application/json" || r.Header.Get("Ce-Id") != "m1" || r.Header.Get("Sidecar-Delivery-Attempt") != "2" {
			t.Errorf("app got body %q, header %v", b, r.Header)
		}
		switch r.URL.Query().Get("answer") {
		case "":
			w.WriteHeader(http.StatusNoContent)
		case "close":
			w.Header().Set("Connection", "close")
			w.WriteHeader(http.StatusOK)
		case "drop":
			bodies.Add(1)
			w.Header().Set("Content-Type", "application/json")
			_, _ = io.WriteString(w, `{"status":"DROP"}`)
		}
	}))
	srv.Config.ConnState = func(_ net.Conn, s http.ConnState) {
		if s == http.StateNew {
			conns.Add(1)
		}
	}
	srv.Start()
	t.Cleanup(srv.Close)
	sub := testSub("binary")
	subDrop, subClose := sub, sub
	subDrop.Group, subDrop.Route = "drop", "/events?answer=drop"
	subClose.Group, subClose.Route = "close", "/events?answer=close"
	a := NewApp(strings.TrimPrefix(srv.URL, "http://"), []Subscription{sub, subDrop, subClose}, nil, nil, zap.NewNop())

	before := transportGoroutines() // other tests' idle connections
	for i := range 20 {
		if r := a.Deliver(t.Context(), "billing", testMsg(), 2); r.Outcome != Success {
			t.Fatalf("delivery %d = %v (%s), want Success", i, r.Outcome, r.Reason)
		}
	}
	if n := conns.Load(); n != 1 {
		t.Errorf("20 deliveries one after another opened %d connections, want 1", n)
	}
	if n := transportGoroutines(); n > before {
		t.Errorf("%d http.Transport connection goroutines after the deliveries, %d before: the deliveries did not go over the pool", n, before)
	}
	if r := a.Deliver(t.Context(), "drop", testMsg(), 2); r.Outcome != Drop || bodies.Load() != 1 {
		t.Errorf("delivery answered DROP = %v (%s), want Drop", r.Outcome, r.Reason)
	}
	for i := range 3 {
		if r := a.Deliver(t.Context(), "close", testMsg(), 2); r.Outcome != Success {
			t.Errorf("delivery %d answered with Connection: close = %v (%s), want Success", i, r.Outcome, r.Reason)
		}
	}
}

// transportGoroutines counts the goroutines of http.Transport's
// connections (their read and write loops).
func transportGoroutines() int {
	buf := make([]byte, 4<<20)
	buf = buf[:runtime.Stack(buf, true)]
	return bytes.Count(buf, []byte("net/http.(*persistConn)."))
}
