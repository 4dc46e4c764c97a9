package proxy

import (
	"context"
	"io"
	"net"
	"net/http"
	"net/url"
	"testing"
	"time"

	"github.com/sidecarlb/sidecar/internal/leakcheck"
)

// TestUpstreamUpdate: Update swaps the route under an open listener. A
// request in flight finishes on the old route, the client's keep-alive
// connection carries on to the new one, Status shows the new route only,
// and a bad config changes nothing.
func TestUpstreamUpdate(t *testing.T) {
	leakcheck.Check(t)
	started, release := make(chan struct{}), make(chan struct{})
	slow := startServer(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		close(started)
		<-release
		w.Header().Set("X-Instance", "slow")
	}))
	nodes := startNodes(t, 1)
	cache := staticCache(t, map[string][]string{"a": {slow.Listener.Addr().String()}, "b": addrs(nodes)})
	px := New(cache, nil, testLogger(t))
	up, err := px.Upstream("upstream", RouteConfig{Service: "a"})
	if err != nil {
		t.Fatal(err)
	}
	srv := startProxyServer(t, up)
	client := newClient(t, nil)

	req, err := http.NewRequest(http.MethodGet, srv.URL+"/slow", nil)
	if err != nil {
		t.Fatal(err)
	}
	inFlight := goDo(newClient(t, nil), req)
	<-started
	if err := up.Update(RouteConfig{Service: "b", Balancer: "random"}); err != nil {
		t.Fatalf("Update() error = %v", err)
	}
	for range 3 {
		if resp := doGet(t, client, srv.URL+"/", nil); resp.status != http.StatusOK || resp.header.Get("X-Instance") != "node-0" {
			t.Fatalf("after Update: %d from %q, want 200 from node-0", resp.status, resp.header.Get("X-Instance"))
		}
	}
	close(release)
	if resp := <-inFlight; resp.status != http.StatusOK || resp.header.Get("X-Instance") != "slow" {
		t.Errorf("request in flight across Update: %d from %q (%s), want 200 from slow", resp.status, resp.header.Get("X-Instance"), resp.body)
	}
	if n := srv.accepts.Load(); n != 2 {
		t.Errorf("listener accepted %d connections, want 2 (one per client): the keep-alive connection was not kept", n)
	}
	st := px.Status()
	if len(st) != 1 || st[0].Service != "b" || st[0].Balancer != "random" {
		t.Errorf("Status() = %+v, want the one route to b, random", st)
	}

	if err := up.Update(RouteConfig{Service: "a", HashKey: "bogus"}); err == nil {
		t.Error("Update() with a bad hash key: error = nil, want one")
	}
	if resp := doGet(t, client, srv.URL+"/", nil); resp.header.Get("X-Instance") != "node-0" {
		t.Errorf("after a failed Update, answer from %q, want node-0 still", resp.header.Get("X-Instance"))
	}

	up.Retire()
	if st := px.Status(); len(st) != 0 {
		t.Errorf("Status() after Retire = %+v, want none", st)
	}
}

// TestForwarderUpdate: Update gives the forward proxy's services new
// routes built from the new defaults.
func TestForwarderUpdate(t *testing.T) {
	leakcheck.Check(t)
	nodes := startNodes(t, 3)
	px := New(staticCache(t, map[string][]string{"echo": addrs(nodes)}), nil, testLogger(t))
	f, err := px.Forward("forward", RouteConfig{})
	if err != nil {
		t.Fatal(err)
	}
	proxyURL, _ := url.Parse(startProxyServer(t, f).URL)
	client := newClient(t, func(tr *http.Transport) { tr.Proxy = http.ProxyURL(proxyURL) })
	if resp := doGet(t, client, "http://echo/", nil); resp.status != http.StatusOK {
		t.Fatalf("before Update: %d %s", resp.status, resp.body)
	}
	if err := f.Update(RouteConfig{Balancer: "hash", HashKey: "header:X-User"}); err != nil {
		t.Fatalf("Update() error = %v", err)
	}
	first := ""
	for range 6 {
		resp := doGet(t, client, "http://echo/", http.Header{"X-User": {"ann"}})
		if resp.status != http.StatusOK {
			t.Fatalf("after Update: %d %s", resp.status, resp.body)
		}
		if first == "" {
			first = resp.header.Get("X-Instance")
		} else if got := resp.header.Get("X-Instance"); got != first {
			t.Errorf("hash by X-User after Update: %q then %q, want one node", first, got)
		}
	}
	st := px.Status()
	if len(st) != 1 || st[0].Balancer != "hash" {
		t.Errorf("Status() = %+v, want the one route, hash", st)
	}
	if err := f.Update(RouteConfig{Balancer: "bogus"}); err == nil {
		t.Error("Update() with an unknown balancer: error = nil, want one")
	}
}

// TestTCPServerUpdate: Update changes where new TCP connections go, while a
// connection already open carries on to its node.
func TestTCPServerUpdate(t *testing.T) {
	leakcheck.Check(t)
	node := startTCPNode(t)
	dead := startTCPNode(t)
	dead.stop() // dials refused
	px := New(staticCache(t, map[string][]string{"live": {node.addr}, "dead": {dead.addr}}), nil, testLogger(t))
	ts, err := px.TCP("tcp", RouteConfig{Service: "live", Protocol: "tcp"})
	if err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	served := make(chan struct{})
	go func() { defer close(served); _ = ts.Serve(ln) }()
	defer func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		_ = ts.Shutdown(ctx)
		<-served
	}()
	s := &tcpSetup{addr: ln.Addr().String()}

	open, err := net.Dial("tcp", s.addr)
	if err != nil {
		t.Fatal(err)
	}
	defer open.Close()
	roundTrip := func(c net.Conn) error {
		c.SetDeadline(time.Now().Add(5 * time.Second))
		if _, err := io.WriteString(c, "ping\n"); err != nil {
			return err
		}
		buf := make([]byte, 5)
		_, err := io.ReadFull(c, buf)
		return err
	}
	if err := roundTrip(open); err != nil {
		t.Fatalf("before Update: %v", err)
	}
	if err := ts.Update(RouteConfig{Service: "dead", Protocol: "tcp"}); err != nil {
		t.Fatalf("Update() error = %v", err)
	}
	if err := s.echo(); err == nil {
		t.Error("a new connection after Update to a dead service echoed, want it closed")
	}
	if err := roundTrip(open); err != nil {
		t.Errorf("the connection open across Update: %v, want it to carry on", err)
	}
	if err := ts.Update(RouteConfig{Service: "live", Protocol: "tcp", ProxyProtocol: "v9"}); err == nil {
		t.Error("Update() with an unknown proxy protocol: error = nil, want one")
	}
	if err := ts.Update(RouteConfig{Service: "live", Protocol: "tcp"}); err != nil {
		t.Fatalf("Update() error = %v", err)
	}
	if err := s.echo(); err != nil {
		t.Errorf("after Update back to a live service: %v", err)
	}
	if st := px.Status(); len(st) != 1 || st[0].Service != "live" {
		t.Errorf("Status() = %+v, want the one route to live", st)
	}
}

// TestUpstreamUpdateKeepsNodeConnections: an Update that builds endpoints
// the same way (here, only the balancer changes) takes over the node
// connections; one that changes the pools (the connect timeout) dials
// afresh.
func TestUpstreamUpdateKeepsNodeConnections(t *testing.T) {
	leakcheck.Check(t)
	node := startNodes(t, 1)[0]
	px := New(staticCache(t, map[string][]string{"echo": {node.Listener.Addr().String()}}), nil, testLogger(t))
	up, err := px.Upstream("upstream", RouteConfig{Service: "echo"})
	if err != nil {
		t.Fatal(err)
	}
	srv := startProxyServer(t, up)
	client := newClient(t, nil)
	get := func(when string) {
		t.Helper()
		for range 3 {
			if resp := doGet(t, client, srv.URL+"/", nil); resp.status != http.StatusOK {
				t.Fatalf("%s: %d %s", when, resp.status, resp.body)
			}
		}
	}
	get("before Update")
	if n := node.accepts.Load(); n != 1 {
		t.Fatalf("node accepted %d connections, want 1", n)
	}
	if err := up.Update(RouteConfig{Service: "echo", Balancer: "least_request"}); err != nil {
		t.Fatal(err)
	}
	get("after a balancer change")
	if n := node.accepts.Load(); n != 1 {
		t.Errorf("after a balancer change the node accepted %d connections, want the 1 kept", n)
	}
	if err := up.Update(RouteConfig{Service: "echo", Timeouts: Timeouts{Connect: 3 * time.Second}}); err != nil {
		t.Fatal(err)
	}
	get("after a connect timeout change")
	if n := node.accepts.Load(); n != 2 {
		t.Errorf("after a connect timeout change the node accepted %d connections, want 2 (new pools)", n)
	}
}
