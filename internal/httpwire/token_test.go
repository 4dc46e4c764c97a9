package httpwire

import (
	"testing"

	"golang.org/x/net/http/httpguts"
)

// TestTokenTable: the one token table agrees with x/net's, byte for byte.
func TestTokenTable(t *testing.T) {
	for c := range 256 {
		if got, want := IsTokenByte(byte(c)), httpguts.IsTokenRune(rune(c)); got != want {
			t.Errorf("IsTokenByte(%q) = %v, want %v", rune(c), got, want)
		}
	}
}

func TestValidToken(t *testing.T) {
	tests := []struct {
		s          string
		token, low bool
	}{
		{"", false, false},
		{"GET", true, false},
		{"x-user", true, true},
		{"X-User", true, false},
		{"!#$%&'*+-.^_`|~09az", true, true},
		{"a b", false, false},
		{"a:b", false, false},
		{"a;b", false, false},
		{"a\x00", false, false},
		{"é", false, false},
		{":path", false, false},
	}
	for _, tc := range tests {
		if got := ValidToken(tc.s); got != tc.token {
			t.Errorf("ValidToken(%q) = %v, want %v", tc.s, got, tc.token)
		}
		if got := ValidLowerToken(tc.s); got != tc.low {
			t.Errorf("ValidLowerToken(%q) = %v, want %v", tc.s, got, tc.low)
		}
	}
}

func TestHasToken(t *testing.T) {
	tests := []struct {
		values []string
		token  string
		want   bool
	}{
		{nil, "close", false},
		{[]string{"close"}, "close", true},
		{[]string{"Keep-Alive, CLOSE"}, "close", true},
		{[]string{"keep-alive", " close "}, "close", true},
		{[]string{"closed"}, "close", false},
		{[]string{"keep-alive"}, "close", false},
		{[]string{","}, "close", false},
	}
	for _, tc := range tests {
		if got := HasToken(tc.values, tc.token); got != tc.want {
			t.Errorf("HasToken(%q, %q) = %v, want %v", tc.values, tc.token, got, tc.want)
		}
	}
}

func TestStatusLine(t *testing.T) {
	tests := []struct {
		code       int
		line, text string
	}{
		{200, "200 OK", "200"},
		{404, "404 Not Found", "404"},
		{599, "599 ", "599"},
		{600, "600", "600"},
		{-1, "-1", "-1"},
	}
	for _, tc := range tests {
		if got := StatusLine(tc.code); got != tc.line {
			t.Errorf("StatusLine(%d) = %q, want %q", tc.code, got, tc.line)
		}
		if got := StatusCode(tc.code); got != tc.text {
			t.Errorf("StatusCode(%d) = %q, want %q", tc.code, got, tc.text)
		}
	}
}
