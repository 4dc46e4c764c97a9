package proxy

import (
	"context"
	"net"
	"net/http"
	"strconv"
	"testing"
	"time"

	"github.com/sidecarlb/sidecar/discovery"
)

// taggedBackend is a discovery backend serving one fixed set of endpoints,
// with their tags, for every service.
type taggedBackend struct{ eps []discovery.Endpoint }

func (b taggedBackend) Watch(ctx context.Context, service string, sink discovery.Sink) {
	now := time.Now()
	sink.Publish(&discovery.Snapshot{Service: service, Endpoints: b.eps, Updated: now})
	sink.Confirm(now)
	<-ctx.Done()
}

func (taggedBackend) Known(context.Context, string) (bool, error) { return true, nil }
func (taggedBackend) Close()                                      {}

// TestUpstreamTagsAll: a route's tags keep only the endpoints carrying
// every one of them, not those carrying any.
func TestUpstreamTagsAll(t *testing.T) {
	nodes := startNodes(t, 4)
	tags := [][]string{{"v1"}, {"canary"}, {"canary", "v1"}, {"v1", "x", "canary"}}
	var eps []discovery.Endpoint
	for i, n := range nodes {
		host, port, err := net.SplitHostPort(n.Listener.Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		p, _ := strconv.Atoi(port)
		eps = append(eps, discovery.NewEndpoint("n"+strconv.Itoa(i), host, p, tags[i], nil, 1))
	}
	cache := discovery.NewCache(taggedBackend{eps}, discovery.CacheOptions{}, testLogger(t))
	t.Cleanup(cache.Close)

	for _, tc := range []struct {
		name string
		tags []string
		want map[string]bool // nodes that may answer, by name
	}{
		{"none", nil, map[string]bool{"node-0": true, "node-1": true, "node-2": true, "node-3": true}},
		{"one", []string{"canary"}, map[string]bool{"node-1": true, "node-2": true, "node-3": true}},
		{"all of two", []string{"v1", "canary"}, map[string]bool{"node-2": true, "node-3": true}},
		{"all of three", []string{"canary", "x", "v1"}, map[string]bool{"node-3": true}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			px := startUpstream(t, cache, RouteConfig{Service: "svc", Tags: tc.tags})
			c := newClient(t, nil)
			seen := map[string]bool{}
			for i := range 4 * len(nodes) {
				r := doGet(t, c, px.URL+"/", nil)
				if r.status != http.StatusOK {
					t.Fatalf("GET #%d: status %d, want 200", i, r.status)
				}
				name := r.header.Get("X-Instance")
				if !tc.want[name] {
					t.Fatalf("GET #%d with tags %v answered by %q (tags %v), want one of %v", i, tc.tags, name, tagsOf(tags, name), tc.want)
				}
				seen[name] = true
			}
			if len(seen) != len(tc.want) {
				t.Errorf("tags %v: answered by %v, want every one of %v", tc.tags, seen, tc.want)
			}
		})
	}
}

func tagsOf(tags [][]string, node string) []string {
	i, err := strconv.Atoi(node[len("node-"):])
	if err != nil || i >= len(tags) {
		return nil
	}
	return tags[i]
}
