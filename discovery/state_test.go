package discovery

import (
	"encoding/json"
	"fmt"
	"net/http"
	"net/http/httptest"
	"slices"
	"testing"

	"github.com/hashicorp/consul/api"
)

// TestHealthClientState: NewHealthClient's read of the health state gives
// the state watch the same checks, index and ACL filtering as *api.Health,
// with the query's options sent.
func TestHealthClientState(t *testing.T) {
	checks := api.HealthChecks{
		{Node: "n1", CheckID: "serfHealth", Name: "Serf", Status: api.HealthPassing, Output: "Agent alive"},
		{Node: "n1", CheckID: "c-web", Status: api.HealthCritical, ServiceID: "web-1", ServiceName: "Web",
			ServiceTags: []string{"v1"}, Output: "boom", Definition: api.HealthCheckDefinition{HTTP: "http://x/", IntervalDuration: 10e9}},
	}
	var queries []string
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path != "/v1/health/state/any" {
			http.NotFound(w, r)
			return
		}
		queries = append(queries, r.URL.RawQuery)
		w.Header().Set("X-Consul-Index", "42")
		w.Header().Set("X-Consul-LastContact", "0")
		w.Header().Set("X-Consul-Results-Filtered-By-ACLs", "true")
		_ = json.NewEncoder(w).Encode(checks)
	}))
	defer srv.Close()
	client, err := api.NewClient(&api.Config{Address: srv.Listener.Addr().String()})
	if err != nil {
		t.Fatal(err)
	}
	want, wantMeta, err := healthState(client.Health(), &api.QueryOptions{})
	if err != nil {
		t.Fatal(err)
	}
	got, meta, err := healthState(NewHealthClient(client), &api.QueryOptions{Datacenter: "dc2", AllowStale: true, WaitIndex: 7})
	if err != nil {
		t.Fatalf("healthState() error = %v", err)
	}
	if !slices.EqualFunc(got, want, func(a, b stateCheck) bool {
		return a.Node == b.Node && a.CheckID == b.CheckID && a.Status == b.Status && a.ServiceID == b.ServiceID &&
			a.ServiceName == b.ServiceName && slices.Equal(a.ServiceTags, b.ServiceTags)
	}) || len(got) != 2 {
		t.Errorf("healthState() = %+v, want %+v", got, want)
	}
	if meta.LastIndex != 42 || !meta.ResultsFilteredByACLs || !wantMeta.ResultsFilteredByACLs {
		t.Errorf("meta = %+v, want index 42, filtered by ACLs", meta)
	}
	if q := queries[len(queries)-1]; q != "dc=dc2&index=7&stale=" {
		t.Errorf("query = %q, want dc=dc2&index=7&stale=", q)
	}
	if digestState(got).services["web"] != digestState(want).services["web"] {
		t.Error("the digests of the two reads differ")
	}
}

// BenchmarkHealthStateDecode decodes a health state of 5,000 checks (one
// per service, as in TestDiscoveryScale) into api.HealthChecks, as
// *api.Health does, and into the state watch's stateChecks, as
// NewHealthClient does.
func BenchmarkHealthStateDecode(b *testing.B) {
	checks := make(api.HealthChecks, 0, 5000)
	for s := range 5000 {
		name := fmt.Sprintf("svc-%04d", s)
		checks = append(checks, &api.HealthCheck{Node: fmt.Sprintf("node-%02d", s%10), CheckID: "check-" + name, Name: "alive",
			Status: api.HealthPassing, ServiceID: name, ServiceName: name, ServiceTags: []string{}, CreateIndex: 12345, ModifyIndex: 12345})
	}
	raw, err := json.Marshal(checks)
	if err != nil {
		b.Fatal(err)
	}
	b.Run("api.HealthChecks", func(b *testing.B) {
		b.ReportAllocs()
		b.SetBytes(int64(len(raw)))
		for b.Loop() {
			var out api.HealthChecks
			if err := json.Unmarshal(raw, &out); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("stateChecks", func(b *testing.B) {
		b.ReportAllocs()
		b.SetBytes(int64(len(raw)))
		for b.Loop() {
			var out []stateCheck
			if err := json.Unmarshal(raw, &out); err != nil {
				b.Fatal(err)
			}
		}
	})
}
