package httpwire

import (
	"math"
	"testing"
	"time"
)

func TestGRPCTimeout(t *testing.T) {
	tests := []struct {
		in   string
		want time.Duration
		ok   bool
	}{
		{"1S", time.Second, true},
		{"250m", 250 * time.Millisecond, true},
		{"5u", 5 * time.Microsecond, true},
		{"7n", 7, true},
		{"2M", 2 * time.Minute, true},
		{"3H", 3 * time.Hour, true},
		{"0m", 0, true},
		{"99999999H", math.MaxInt64, true}, // past a Duration: clamped, not wrapped
		{"99999999M", 99999999 * time.Minute, true},
		{"99999999S", 99999999 * time.Second, true},
		{"", 0, false},
		{"S", 0, false},
		{"1", 0, false},
		{"1s", 0, false},
		{"-1S", 0, false},
		{"123456789S", 0, false}, // 9 digits
		{"1.5S", 0, false},
	}
	for _, tc := range tests {
		got, ok := GRPCTimeout(tc.in)
		if got != tc.want || ok != tc.ok {
			t.Errorf("GRPCTimeout(%q) = %v, %v; want %v, %v", tc.in, got, ok, tc.want, tc.ok)
		}
	}
}

func TestGRPCMessage(t *testing.T) {
	for _, tc := range []struct{ in, enc string }{
		{"", ""},
		{"plain text", "plain text"},
		{"100% sure", "100%25 sure"},
		{"tab\there", "tab%09here"},
		{"caf\u00e9", "caf%C3%A9"},
		{"line\nbreak", "line%0Abreak"},
	} {
		if got := EncodeGRPCMessage(tc.in); got != tc.enc {
			t.Errorf("EncodeGRPCMessage(%q) = %q, want %q", tc.in, got, tc.enc)
		}
		if got := DecodeGRPCMessage(tc.enc); got != tc.in {
			t.Errorf("DecodeGRPCMessage(%q) = %q, want %q", tc.enc, got, tc.in)
		}
	}
	for _, s := range []string{"50%", "%zz", "%4"} {
		if got := DecodeGRPCMessage(s); got != s {
			t.Errorf("DecodeGRPCMessage(%q) = %q, want it as it is", s, got)
		}
	}
}
