package httpwire

import (
	"maps"
	"net/http"
	"slices"
	"testing"
)

func TestRemoveHopHeaders(t *testing.T) {
	tests := []struct {
		name string
		in   http.Header
		want http.Header
	}{
		{
			name: "standard hop headers",
			in: http.Header{
				"Connection":          {"keep-alive"},
				"Proxy-Connection":    {"keep-alive"},
				"Keep-Alive":          {"timeout=5"},
				"Proxy-Authenticate":  {"Basic"},
				"Proxy-Authorization": {"Basic eDp5"},
				"Te":                  {"gzip"},
				"Trailer":             {"X-Sum"},
				"Transfer-Encoding":   {"chunked"},
				"Upgrade":             {"websocket"},
				"Content-Type":        {"text/plain"},
				"Authorization":       {"Bearer t"},
			},
			want: http.Header{"Content-Type": {"text/plain"}, "Authorization": {"Bearer t"}},
		},
		{
			name: "connection lists more",
			in: http.Header{
				"Connection": {"X-A, x-b ,,  X-C", "x-d"},
				"X-A":        {"1"}, "X-B": {"1"}, "X-C": {"1"}, "X-D": {"1"}, "X-E": {"1"},
			},
			want: http.Header{"X-E": {"1"}},
		},
		{
			name: "connection names an end-to-end header",
			in:   http.Header{"Connection": {"Cookie"}, "Cookie": {"a=1"}, "Accept": {"*/*"}},
			want: http.Header{"Accept": {"*/*"}},
		},
		{
			name: "te trailers kept",
			in:   http.Header{"Te": {"trailers"}},
			want: http.Header{"Te": {"trailers"}},
		},
		{
			name: "te trailers among others",
			in:   http.Header{"Te": {"gzip;q=0.5, Trailers"}},
			want: http.Header{"Te": {"trailers"}},
		},
		{
			name: "te trailers listed in connection",
			// RFC 9110 section 10.1.4: a sender of TE must list it in
			// Connection.
			in:   http.Header{"Connection": {"TE"}, "Te": {"trailers"}},
			want: http.Header{"Te": {"trailers"}},
		},
		{
			name: "te without trailers",
			in:   http.Header{"Te": {"deflate"}},
			want: http.Header{},
		},
		{
			name: "nothing to remove",
			in:   http.Header{"Accept": {"*/*"}},
			want: http.Header{"Accept": {"*/*"}},
		},
		{
			name: "empty",
			in:   http.Header{},
			want: http.Header{},
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			h := tc.in.Clone()
			RemoveHopHeaders(h)
			if !maps.EqualFunc(h, tc.want, slices.Equal) {
				t.Errorf("RemoveHopHeaders(%v) = %v, want %v", tc.in, h, tc.want)
			}
		})
	}
}

func TestUpgradeType(t *testing.T) {
	tests := []struct {
		name string
		h    http.Header
		want string
	}{
		{"websocket", http.Header{"Connection": {"Upgrade"}, "Upgrade": {"websocket"}}, "websocket"},
		{"among other tokens", http.Header{"Connection": {"keep-alive, upgrade"}, "Upgrade": {"h2c"}}, "h2c"},
		{"second line", http.Header{"Connection": {"keep-alive", "UPGRADE"}, "Upgrade": {"x"}}, "x"},
		{"Upgrade without Connection", http.Header{"Upgrade": {"websocket"}}, ""},
		{"Connection without upgrade", http.Header{"Connection": {"close"}, "Upgrade": {"websocket"}}, ""},
		{"token inside another", http.Header{"Connection": {"upgrades"}, "Upgrade": {"websocket"}}, ""},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			if got := UpgradeType(tc.h); got != tc.want {
				t.Errorf("UpgradeType(%v) = %q, want %q", tc.h, got, tc.want)
			}
		})
	}
}
