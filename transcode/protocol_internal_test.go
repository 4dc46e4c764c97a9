package transcode

import (
	"bytes"
	"compress/gzip"
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

// TestUnframeInflatesOnlyTheFirst: a unary body of many compressed frames
// is refused for its count without inflating past the first, so frames
// that would each inflate to MaxMessage cost one at most. The second frame
// here is not gzip at all: reading it would fail with "bad gzip message".
func TestUnframeInflatesOnlyTheFirst(t *testing.T) {
	var zipped bytes.Buffer
	zw := gzip.NewWriter(&zipped)
	if _, err := zw.Write([]byte("hello")); err != nil {
		t.Fatal(err)
	}
	if err := zw.Close(); err != nil {
		t.Fatal(err)
	}
	body := appendFrame(nil, flagCompressed, zipped.Bytes())
	body = appendFrame(body, flagCompressed, []byte("not gzip"))
	c := &Call{proto: grpcWeb, inGzip: true}
	msgs, err := c.unframe(body)
	if err != nil {
		t.Fatalf("unframe() error = %v, want the two frames counted", err)
	}
	if len(msgs) != 2 || string(msgs[0]) != "hello" {
		t.Fatalf("unframe() = %q, want the first inflated and two in all", msgs)
	}
}
