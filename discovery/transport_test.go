package discovery

import (
	"net/http"
	"net/http/httptest"
	"sync"
	"testing"
	"time"
)

func TestTransportMaxStale(t *testing.T) {
	var mu sync.Mutex
	var got []string
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		got = append(got, r.Method+" "+r.URL.RawQuery)
		mu.Unlock()
	}))
	defer srv.Close()
	tr := &http.Transport{}
	defer tr.CloseIdleConnections()
	rt := NewTransport(tr, 3, 10*time.Second)
	if tr.MaxConnsPerHost != 3 || tr.MaxIdleConnsPerHost != 3 {
		t.Errorf("MaxConnsPerHost, MaxIdleConnsPerHost = %d, %d; want 3, 3", tr.MaxConnsPerHost, tr.MaxIdleConnsPerHost)
	}
	c := &http.Client{Transport: rt}
	for _, tc := range []struct{ method, query, want string }{
		{http.MethodGet, "stale=&index=5", "GET index=5&max_stale=10s&stale="},
		{http.MethodGet, "index=5", "GET index=5"},
		{http.MethodGet, "stale=&max_stale=1s", "GET stale=&max_stale=1s"},
		{http.MethodPut, "stale=", "PUT stale="},
	} {
		mu.Lock()
		got = nil
		mu.Unlock()
		req, _ := http.NewRequest(tc.method, srv.URL+"/v1/health/state/any?"+tc.query, nil)
		resp, err := c.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		mu.Lock()
		if len(got) != 1 || got[0] != tc.want {
			t.Errorf("%s ?%s reached the server as %q, want %q", tc.method, tc.query, got, tc.want)
		}
		mu.Unlock()
	}
}
