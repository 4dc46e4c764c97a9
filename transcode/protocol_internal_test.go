package transcode

import (
	"testing"
	"time"

	"github.com/sidecarlb/sidecar/internal/httpwire"
)

// TestEncodeTimeout: grpc-timeout values keep to eight digits, round up,
// and read back as at least the deadline they carry.
func TestEncodeTimeout(t *testing.T) {
	for _, tc := range []struct {
		d    time.Duration
		want string
	}{
		{time.Nanosecond, "1n"},
		{99999999 * time.Nanosecond, "99999999n"},
		{100 * time.Millisecond, "100000u"},
		{100*time.Second + 1, "100001m"},
		{3000 * time.Hour, "10800000S"},
		{time.Duration(1<<63 - 1), "2562048H"},
	} {
		got := encodeTimeout(tc.d)
		if got != tc.want {
			t.Errorf("encodeTimeout(%v) = %q, want %q", tc.d, got, tc.want)
		}
		if len(got) > 9 {
			t.Errorf("encodeTimeout(%v) = %q: over eight digits", tc.d, got)
		}
		back, ok := httpwire.GRPCTimeout(got)
		if !ok || back < tc.d {
			t.Errorf("encodeTimeout(%v) = %q, reads back as %v, %v: want at least %v", tc.d, got, back, ok, tc.d)
		}
	}
}
