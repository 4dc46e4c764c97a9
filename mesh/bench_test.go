package mesh

import (
	"context"
	"crypto/tls"
	"fmt"
	"io"
	"net"
	"net/http"
	"syscall"
	"testing"
	"time"

	"go.uber.org/zap"
)

// benchInbound serves an inbound listener in mode in front of a small
// HTTP app, with every caller allowed, and returns its address and web's
// identity.
func benchInbound(b *testing.B, mode string) (string, *Identity) {
	ca := newTestCA(&testing.T{}, "ca")
	agent := newFakeAgent(ca.leaf(&testing.T{}, "billing"), ca)
	webAgent := newFakeAgent(ca.leaf(&testing.T{}, "web"), ca)
	agent.allow(webURI(), true)
	ctx, cancel := context.WithCancel(context.Background())
	billing := NewIdentity(agent, "billing", Options{}, zap.NewNop())
	web := NewIdentity(webAgent, "web", Options{}, zap.NewNop())
	go billing.Run(ctx)
	go web.Run(ctx)
	<-billing.Ready()
	<-web.Ready()
	appLn, _ := net.Listen("tcp", "127.0.0.1:0")
	app := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { _, _ = io.WriteString(w, "ok") })}
	go func() { _ = app.Serve(appLn) }()
	in, err := NewInbound(InboundOptions{Mode: mode, App: appLn.Addr().String(), Identity: billing,
		Authorizer: NewAuthorizer(agent, "billing", AuthorizerOptions{}, zap.NewNop())}, zap.NewNop())
	if err != nil {
		b.Fatal(err)
	}
	ln, _ := net.Listen("tcp", "127.0.0.1:0")
	go func() { _ = in.Serve(ln) }()
	b.Cleanup(func() {
		sctx, c := context.WithTimeout(context.Background(), time.Second)
		defer c()
		_ = in.Shutdown(sctx)
		_ = app.Close()
		cancel()
	})
	return ln.Addr().String(), web
}

// BenchmarkInboundRequest: one keep-alive HTTP/1.1 request through the
// inbound listener, plaintext (permissive) against mTLS (strict); client,
// relay and app on one machine, so ns/op is the whole round trip.
func BenchmarkInboundRequest(b *testing.B) {
	for _, mode := range []string{ModePermissive, ModeStrict} {
		b.Run(mode, func(b *testing.B) {
			addr, web := benchInbound(b, mode)
			tr := &http.Transport{MaxIdleConnsPerHost: 1}
			url := "http://" + addr + "/"
			if mode == ModeStrict {
				tr.TLSClientConfig = web.ClientTLS("billing")
				url = "https://" + addr + "/"
			}
			defer tr.CloseIdleConnections()
			c := &http.Client{Transport: tr}
			b.ReportAllocs()
			b.ResetTimer()
			for b.Loop() {
				resp, err := c.Get(url)
				if err != nil {
					b.Fatal(err)
				}
				_, _ = io.Copy(io.Discard, resp.Body)
				resp.Body.Close()
			}
		})
	}
}

// BenchmarkHandshake: a new mTLS connection to the inbound listener, up
// to and including the intention check (cached), then closed. cpu-µs/op
// is the process's CPU time (user and system) per connection: both ends
// of the handshake, as the two sidecars pay it together; ns/op is wall
// time, which a loaded machine stretches.
func BenchmarkHandshake(b *testing.B) {
	addr, web := benchInbound(b, ModeStrict)
	conf := web.ClientTLS("billing")
	b.ReportAllocs()
	cpu0 := processCPU()
	for b.Loop() {
		c, err := tls.Dial("tcp", addr, conf)
		if err != nil {
			b.Fatal(fmt.Errorf("dial: %w", err))
		}
		c.Close()
	}
	b.ReportMetric(float64(processCPU()-cpu0)/float64(time.Microsecond)/float64(b.N), "cpu-µs/op")
}

// processCPU is the CPU time the process has used, user and system.
func processCPU() time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		return 0
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}
