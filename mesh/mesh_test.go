package mesh

import (
	"bufio"
	"bytes"
	"context"
	"crypto/tls"
	"fmt"
	"io"
	"net"
	"net/http"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"
	"go.uber.org/zap"
	"go.uber.org/zap/zaptest"

	"github.com/sidecarlb/sidecar/internal/leakcheck"
)

func testLogger(t *testing.T) *zap.Logger { return zaptest.NewLogger(t) }

func TestParseServiceID(t *testing.T) {
	tests := []struct {
		uri  string
		want ServiceID
		ok   bool
	}{
		{"spiffe://td.consul/ns/default/dc/dc1/svc/web", ServiceID{"td.consul", "", "default", "dc1", "web"}, true},
		{"spiffe://TD.consul/ap/p1/ns/n/dc/dc2/svc/billing", ServiceID{"td.consul", "p1", "n", "dc2", "billing"}, true},
		{"spiffe://td.consul/agent/client/dc/dc1/id/x", ServiceID{}, false},
		{"https://td.consul/ns/default/dc/dc1/svc/web", ServiceID{}, false},
		{"spiffe://td.consul/ns/default/dc/dc1/svc/", ServiceID{}, false},
		{"spiffe:///ns/default/dc/dc1/svc/web", ServiceID{}, false},
		{"spiffe://td/ap/default/ns/n/dc/dc1/svc/web", ServiceID{"td", "", "n", "dc1", "web"}, true},
		{"spiffe://td/ns/n/dc/dc1/svc/a%3Fb", ServiceID{}, false},
		{"spiffe://td/ns/n/dc/dc1/svc/web/extra", ServiceID{}, false},
		{"spiffe://td/ns/n/dc/dc1/svc/web/", ServiceID{}, false},
		{"spiffe://td/ns/n/dc/dc1//svc/web", ServiceID{}, false},
		{"spiffe://td/ap/p1/ns/n/dc/dc1/svc/web/x", ServiceID{}, false},
		{"spiffe://td/x/y/ns/n/dc/dc1/svc/web", ServiceID{}, false},
		{"spiffe://td/ns/n/dc/dc1/svc/w%65b", ServiceID{}, false},
		{"spiffe://td/ns/n/dc/dc1/svc/web?x=1", ServiceID{}, false},
		{"spiffe://td/ns/n/dc/dc1/svc/web#f", ServiceID{}, false},
		{"spiffe://u@td/ns/n/dc/dc1/svc/web", ServiceID{}, false},
		{"spiffe://td:8500/ns/n/dc/dc1/svc/web", ServiceID{}, false},
		{"spiffe:td/ns/n/dc/dc1/svc/web", ServiceID{}, false},
	}
	for _, tc := range tests {
		t.Run(tc.uri, func(t *testing.T) {
			got, err := ParseServiceID(tc.uri)
			if (err == nil) != tc.ok || got != tc.want {
				t.Fatalf("ParseServiceID() = %+v, %v; want %+v, ok %t", got, err, tc.want, tc.ok)
			}
			if tc.ok && !strings.Contains(tc.uri, "/ap/") && got.URI() != tc.uri {
				t.Errorf("URI() = %q, want %q", got.URI(), tc.uri)
			}
		})
	}
}

// TestIdentityRotation: a new leaf and a new root set apply to the next
// handshake, while a connection made before goes on.
func TestIdentityRotation(t *testing.T) {
	leakcheck.Check(t)
	ca1 := newTestCA(t, "ca1")
	billingAgent := newFakeAgent(ca1.leaf(t, "billing"), ca1)
	webAgent := newFakeAgent(ca1.leaf(t, "web"), ca1)
	billing := runIdentity(t, billingAgent, "billing")
	web := runIdentity(t, webAgent, "web")

	ln, err := tls.Listen("tcp", "127.0.0.1:0", billing.ServerTLS())
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() { _, _ = io.Copy(c, c); c.Close() }()
		}
	}()
	echo := func(c *tls.Conn, msg string) error {
		if _, err := c.Write([]byte(msg)); err != nil {
			return err
		}
		buf := make([]byte, len(msg))
		_, err := io.ReadFull(c, buf)
		return err
	}
	dial := func() (*tls.Conn, string) {
		t.Helper()
		c, err := tls.Dial("tcp", ln.Addr().String(), web.ClientTLS("billing"))
		if err != nil {
			t.Fatalf("dial billing: %v", err)
		}
		return c, c.ConnectionState().PeerCertificates[0].SerialNumber.String()
	}
	old, serial1 := dial()
	defer old.Close()

	// Rotate to a new CA: roots first (both trusted), then each leaf.
	ca2 := newTestCA(t, "ca2")
	billingAgent.set(nil, rootList(ca1, ca2))
	webAgent.set(nil, rootList(ca1, ca2))
	newLeaf := ca2.leaf(t, "billing")
	billingAgent.set(newLeaf, nil)
	webAgent.set(ca2.leaf(t, "web"), nil)
	deadline := time.Now().Add(5 * time.Second)
	for billing.Status().Serial != newLeaf.SerialNumber || billing.Status().RootChanges == 0 || web.Status().Rotations == 0 {
		if time.Now().After(deadline) {
			t.Fatalf("rotation not taken: billing %+v, web %+v", billing.Status(), web.Status())
		}
		time.Sleep(5 * time.Millisecond)
	}
	c, serial2 := dial()
	defer c.Close()
	if serial2 == serial1 || serial2 != newLeaf.SerialNumber {
		t.Errorf("after rotation the server presented serial %s, want the new %s (old %s)", serial2, newLeaf.SerialNumber, serial1)
	}
	if err := echo(old, "still here"); err != nil {
		t.Errorf("connection from before the rotation: %v", err)
	}
	// Once ca1 is dropped, a leaf of ca1 is no longer trusted.
	webAgent.set(nil, rootList(ca2))
	deadline = time.Now().Add(5 * time.Second)
	for web.Status().Roots != 1 {
		if time.Now().After(deadline) {
			t.Fatal("roots not replaced")
		}
		time.Sleep(5 * time.Millisecond)
	}
	stale := newFakeAgent(ca1.leaf(t, "billing"), ca1)
	impostor := runIdentity(t, stale, "billing")
	sln, err := tls.Listen("tcp", "127.0.0.1:0", impostor.ServerTLS())
	if err != nil {
		t.Fatal(err)
	}
	defer sln.Close()
	go func() {
		c, err := sln.Accept()
		if err == nil {
			_ = c.(*tls.Conn).Handshake()
			c.Close()
		}
	}()
	if c, err := tls.Dial("tcp", sln.Addr().String(), web.ClientTLS("billing")); err == nil {
		c.Close()
		t.Error("dial a node whose leaf is of a dropped root succeeded, want refused")
	}
}

// TestAuthorizerCache: answers are reused for TTL, asked again after,
// kept when the agent fails, and a caller never seen is denied then.
func TestAuthorizerCache(t *testing.T) {
	ca := newTestCA(t, "ca")
	agent := newFakeAgent(ca.leaf(t, "billing"), ca)
	now := time.Unix(1000, 0)
	a := NewAuthorizer(agent, "billing", AuthorizerOptions{TTL: time.Second, Now: func() time.Time { return now }}, testLogger(t))
	ctx := context.Background()
	agent.allow(webURI(), true)
	if d := a.Authorize(ctx, webURI(), "r"); !d.Allowed {
		t.Fatalf("Authorize(web) = %+v, want allowed", d)
	}
	agent.allow(webURI(), false)
	if d := a.Authorize(ctx, webURI(), "r"); !d.Allowed || agent.callCount() != 1 {
		t.Fatalf("within TTL: Authorize(web) = %+v after %d calls, want the cached allow after 1", d, agent.callCount())
	}
	now = now.Add(time.Second)
	if d := a.Authorize(ctx, webURI(), "r"); d.Allowed || d.Reason != "intention deny" {
		t.Fatalf("after TTL: Authorize(web) = %+v, want denied by intention", d)
	}
	agent.fail(errAgentDown)
	now = now.Add(time.Second)
	if d := a.Authorize(ctx, webURI(), "r"); d.Allowed {
		t.Errorf("agent down: Authorize(web) = %+v, want the last answer, denied", d)
	}
	other := strings.Replace(webURI(), "/svc/web", "/svc/api", 1)
	if d := a.Authorize(ctx, other, "r2"); d.Allowed || !strings.Contains(d.Reason, "agent down") {
		t.Errorf("agent down, caller never seen: Authorize = %+v, want denied with the error", d)
	}
	denials, total := a.Denials()
	if total != 3 || denials[0].Caller != other || denials[0].Remote != "r2" {
		t.Errorf("Denials() = %+v, %d; want 3, newest api's", denials, total)
	}
}

// TestInboundDeny: a denied caller gets a 403 over HTTP/1.1 and h2, a
// PERMISSION_DENIED status over gRPC, and a closed connection otherwise;
// an allowed one reaches the app.
func TestInboundDeny(t *testing.T) {
	leakcheck.Check(t)
	ca := newTestCA(t, "ca")
	agent := newFakeAgent(ca.leaf(t, "billing"), ca)
	billing := runIdentity(t, agent, "billing")
	web := runIdentity(t, newFakeAgent(ca.leaf(t, "web"), ca), "web")
	appLn, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	app := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { fmt.Fprint(w, "app") })}
	app.Protocols = new(http.Protocols) // HTTP/1.1 and h2c with prior knowledge, as relayed
	app.Protocols.SetHTTP1(true)
	app.Protocols.SetUnencryptedHTTP2(true)
	go func() { _ = app.Serve(appLn) }()
	defer app.Close()
	in, err := NewInbound(InboundOptions{
		Mode: ModeStrict, App: appLn.Addr().String(), Identity: billing,
		Authorizer:  NewAuthorizer(agent, "billing", AuthorizerOptions{TTL: time.Millisecond}, testLogger(t)),
		DenyTimeout: 200 * time.Millisecond,
	}, testLogger(t))
	if err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	served := make(chan error, 1)
	go func() { served <- in.Serve(ln) }()
	defer func() {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer cancel()
		if err := in.Shutdown(ctx); err != nil {
			t.Errorf("Shutdown() = %v", err)
		}
		if err := <-served; err != nil {
			t.Errorf("Serve() = %v", err)
		}
	}()
	url := "https://" + ln.Addr().String() + "/"
	h1 := &http.Client{Timeout: 3 * time.Second, Transport: &http.Transport{TLSClientConfig: web.ClientTLS("billing")}}
	h2tr := &http.Transport{TLSClientConfig: web.ClientTLS("billing", "h2"), Protocols: new(http.Protocols)}
	h2tr.Protocols.SetHTTP2(true)
	h2 := &http.Client{Timeout: 3 * time.Second, Transport: h2tr}
	defer h1.CloseIdleConnections()
	defer h2.CloseIdleConnections()

	agent.allow(webURI(), true)
	for name, c := range map[string]*http.Client{"h1": h1, "h2": h2} {
		resp, err := c.Get(url)
		if err != nil {
			t.Fatalf("%s allowed: %v", name, err)
		}
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != http.StatusOK || string(b) != "app" {
			t.Errorf("%s allowed: %d %q, want 200 app", name, resp.StatusCode, b)
		}
	}
	h1.CloseIdleConnections()
	h2.CloseIdleConnections()

	agent.allow(webURI(), false)
	for name, c := range map[string]*http.Client{"h1": h1, "h2": h2} {
		resp, err := c.Get(url)
		if err != nil {
			t.Fatalf("%s denied: %v", name, err)
		}
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != http.StatusForbidden || !strings.Contains(string(b), "intention deny") {
			t.Errorf("%s denied: %d %q, want 403 naming the intention", name, resp.StatusCode, b)
		}
	}
	req, _ := http.NewRequest(http.MethodPost, url+"pkg.Svc/Method", strings.NewReader("\x00\x00\x00\x00\x00"))
	req.Header.Set("Content-Type", "application/grpc")
	req.Header.Set("TE", "trailers")
	resp, err := h2.Do(req)
	if err != nil {
		t.Fatalf("grpc denied: %v", err)
	}
	_, _ = io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	if got := resp.Header.Get("Grpc-Status") + resp.Trailer.Get("Grpc-Status"); got != "7" {
		t.Errorf("grpc denied: grpc-status %q, want 7 (PERMISSION_DENIED)", got)
	}
	// A silent TCP client: closed once DenyTimeout passes.
	c, err := tls.Dial("tcp", ln.Addr().String(), web.ClientTLS("billing"))
	if err != nil {
		t.Fatalf("tcp denied: handshake: %v", err)
	}
	defer c.Close()
	_ = c.SetReadDeadline(time.Now().Add(3 * time.Second))
	if n, err := bufio.NewReader(c).ReadByte(); err == nil {
		t.Errorf("tcp denied: read %q, want the connection closed", n)
	}
}

// FuzzParseServiceID: any string either fails or parses to an identity
// whose URI parses back to the same identity.
func FuzzParseServiceID(f *testing.F) {
	f.Add("spiffe://td.consul/ns/default/dc/dc1/svc/web")
	f.Add("spiffe://td.consul/ap/p/ns/default/dc/dc1/svc/web")
	f.Add("spiffe://td/ns//dc/dc1/svc/web")
	f.Fuzz(func(t *testing.T, uri string) {
		id, err := ParseServiceID(uri)
		if err != nil {
			return
		}
		back, err := ParseServiceID(id.URI())
		if err != nil || back != id {
			t.Fatalf("ParseServiceID(%q) = %+v; its URI %q parses to %+v, %v", uri, id, id.URI(), back, err)
		}
	})
}

func TestNodeMTLS(t *testing.T) {
	tests := []struct {
		meta map[string]string
		want bool
	}{
		{nil, false},
		{map[string]string{MetaKey: "strict"}, true},
		{map[string]string{MetaKey: "permissive"}, true},
		{map[string]string{MetaKey: "off"}, false},
		{map[string]string{"zone": "a"}, false},
	}
	for _, tc := range tests {
		if got := NodeMTLS(tc.meta); got != tc.want {
			t.Errorf("NodeMTLS(%v) = %t, want %t", tc.meta, got, tc.want)
		}
	}
}

// TestInboundRelayTCP: bytes pass both ways unchanged over mTLS and over
// plaintext (permissive), and a half-close reaches the app, whose answer
// still comes back.
func TestInboundRelayTCP(t *testing.T) {
	leakcheck.Check(t)
	ca := newTestCA(t, "ca")
	agent := newFakeAgent(ca.leaf(t, "billing"), ca)
	agent.allow(webURI(), true)
	billing := runIdentity(t, agent, "billing")
	web := runIdentity(t, newFakeAgent(ca.leaf(t, "web"), ca), "web")
	// The app reads to EOF, then answers with what it read, reversed.
	appLn, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer appLn.Close()
	go func() {
		for {
			c, err := appLn.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				b, _ := io.ReadAll(c)
				slices.Reverse(b)
				_, _ = c.Write(b)
			}()
		}
	}()
	in, err := NewInbound(InboundOptions{Mode: ModePermissive, App: appLn.Addr().String(), Identity: billing,
		Authorizer: NewAuthorizer(agent, "billing", AuthorizerOptions{}, testLogger(t))}, testLogger(t))
	if err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	served := make(chan struct{})
	go func() { defer close(served); _ = in.Serve(ln) }()
	defer func() {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer cancel()
		_ = in.Shutdown(ctx)
		<-served
	}()
	payload := []byte(strings.Repeat("0123456789abcdef", 8192)) // 128 KiB
	want := slices.Clone(payload)
	slices.Reverse(want)
	for _, mtls := range []bool{true, false} {
		var c net.Conn
		if mtls {
			c, err = tls.Dial("tcp", ln.Addr().String(), web.ClientTLS("billing"))
		} else {
			c, err = net.Dial("tcp", ln.Addr().String())
		}
		if err != nil {
			t.Fatalf("mtls %t: dial: %v", mtls, err)
		}
		_ = c.SetDeadline(time.Now().Add(5 * time.Second))
		if _, err := c.Write(payload); err != nil {
			t.Fatalf("mtls %t: write: %v", mtls, err)
		}
		if err := c.(interface{ CloseWrite() error }).CloseWrite(); err != nil {
			t.Fatalf("mtls %t: CloseWrite: %v", mtls, err)
		}
		got, err := io.ReadAll(c)
		c.Close()
		if err != nil || !bytes.Equal(got, want) {
			t.Errorf("mtls %t: read %d bytes, %v; want the %d bytes reversed", mtls, len(got), err, len(want))
		}
	}
}

// stuckAgent is a fakeAgent whose authorize calls wait for release.
type stuckAgent struct {
	*fakeAgent
	release chan struct{}
}

func (s stuckAgent) ConnectAuthorize(p *api.AgentAuthorizeParams) (*api.AgentAuthorize, error) {
	<-s.release
	return s.fakeAgent.ConnectAuthorize(p)
}

// TestAuthorizerUnanswered: a caller waits for a hung agent no longer than
// its context and is refused as unanswered (fail closed, not a denial);
// the call still finishes and fills the cache for the next caller.
func TestAuthorizerUnanswered(t *testing.T) {
	ca := newTestCA(t, "ca")
	agent := stuckAgent{newFakeAgent(ca.leaf(t, "billing"), ca), make(chan struct{})}
	agent.allow(webURI(), true)
	a := NewAuthorizer(agent, "billing", AuthorizerOptions{TTL: time.Minute}, testLogger(t))
	for range 2 { // the one that starts the call, then one that waits on it
		ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
		d := a.Decide(ctx, webURI())
		cancel()
		if d.Allowed || !d.Unanswered {
			t.Fatalf("Decide with the agent hung = %+v, want refused as unanswered", d)
		}
	}
	close(agent.release)
	if d := a.Decide(context.Background(), webURI()); !d.Allowed || d.Unanswered {
		t.Fatalf("Decide once the agent answered = %+v, want allowed", d)
	}
	if n := agent.callCount(); n != 1 {
		t.Errorf("authorize calls = %d, want 1: the waiters share the call in flight", n)
	}
}

// TestSameService: a peer is the service dialed only in the dialer's own
// namespace and partition, in any datacenter.
func TestSameService(t *testing.T) {
	own := ServiceID{TrustDomain: "td", Namespace: "default", Datacenter: "dc1", Service: "web"}
	tests := []struct {
		name string
		peer ServiceID
		want bool
	}{
		{"same", ServiceID{"td", "", "default", "dc1", "billing"}, true},
		{"other datacenter", ServiceID{"td", "", "default", "dc2", "billing"}, true},
		{"case", ServiceID{"td", "", "Default", "dc1", "Billing"}, true},
		{"other service", ServiceID{"td", "", "default", "dc1", "payments"}, false},
		{"other namespace", ServiceID{"td", "", "team-b", "dc1", "billing"}, false},
		{"other partition", ServiceID{"td", "p1", "default", "dc1", "billing"}, false},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			if got := sameService(tc.peer, own, "billing"); got != tc.want {
				t.Errorf("sameService(%+v) = %t, want %t", tc.peer, got, tc.want)
			}
		})
	}
}

// TestInboundMaxConnections: past MaxConnections, a new caller is not
// relayed until an open connection closes; then it is.
func TestInboundMaxConnections(t *testing.T) {
	leakcheck.Check(t)
	appLn, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer appLn.Close()
	go func() { // echo
		for {
			c, err := appLn.Accept()
			if err != nil {
				return
			}
			go func() { defer c.Close(); _, _ = io.Copy(c, c) }()
		}
	}()
	in, err := NewInbound(InboundOptions{Mode: ModeOff, App: appLn.Addr().String(), MaxConnections: 2}, testLogger(t))
	if err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	served := make(chan struct{})
	go func() { defer close(served); _ = in.Serve(ln) }()
	defer func() {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer cancel()
		_ = in.Shutdown(ctx)
		<-served
	}()
	echo := func(c net.Conn, wait time.Duration) error {
		_ = c.SetDeadline(time.Now().Add(wait))
		if _, err := c.Write([]byte("x")); err != nil {
			return err
		}
		var b [1]byte
		_, err := io.ReadFull(c, b[:])
		return err
	}
	var conns []net.Conn
	for i := range 3 {
		c, err := net.Dial("tcp", ln.Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		conns = append(conns, c)
		if i < 2 {
			if err := echo(c, 5*time.Second); err != nil {
				t.Fatalf("connection %d under the cap: %v", i, err)
			}
		}
	}
	if err := echo(conns[2], 300*time.Millisecond); err == nil {
		t.Fatal("a third connection was relayed with MaxConnections 2")
	}
	conns[0].Close()
	var b [1]byte // the byte written above comes back once relayed
	_ = conns[2].SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := io.ReadFull(conns[2], b[:]); err != nil {
		t.Fatalf("the third connection once one closed: %v", err)
	}
}
