package proxy

import (
	"net/http"
	"slices"
	"testing"
)

func TestAppendForwardedFor(t *testing.T) {
	tests := []struct {
		name  string
		prior []string
		ip    string
		want  []string
	}{
		{"first hop", nil, "10.0.0.1", []string{"10.0.0.1"}},
		{"appended", []string{"1.1.1.1"}, "10.0.0.1", []string{"1.1.1.1, 10.0.0.1"}},
		{"several lines joined", []string{"1.1.1.1", "2.2.2.2, 3.3.3.3"}, "::1", []string{"1.1.1.1, 2.2.2.2, 3.3.3.3, ::1"}},
		{"no ip", []string{"1.1.1.1"}, "", []string{"1.1.1.1"}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			h := http.Header{}
			if tc.prior != nil {
				h["X-Forwarded-For"] = slices.Clone(tc.prior)
			}
			appendForwardedFor(h, tc.ip)
			if got := h["X-Forwarded-For"]; !slices.Equal(got, tc.want) {
				t.Errorf("X-Forwarded-For = %q, want %q", got, tc.want)
			}
		})
	}
}
