package transcode

import (
	"encoding/base64"
	"io"
	"strings"
	"testing"
	"testing/iotest"
)

// TestBase64Reader: grpc-web-text bodies decode whole, in padded pieces,
// with white space, and a byte at a time; bad ones are errors.
func TestBase64Reader(t *testing.T) {
	enc := base64.StdEncoding.EncodeToString
	for _, tc := range []struct {
		name, in, want string
		wantErr        bool
	}{
		{"whole", enc([]byte("hello, world")), "hello, world", false},
		{"padded pieces", enc([]byte("a")) + enc([]byte("bc")) + enc([]byte("def")), "abcdef", false},
		{"white space", enc([]byte("hello"))[:3] + "\r\n " + enc([]byte("hello"))[3:], "hello", false},
		{"empty", "", "", false},
		{"left over", "aGVsbG8", "", true},
		{"not base64", "!!!!", "", true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			for _, r := range []io.Reader{strings.NewReader(tc.in), iotest.OneByteReader(strings.NewReader(tc.in))} {
				got, err := io.ReadAll(newBase64Reader(r))
				if (err != nil) != tc.wantErr || (!tc.wantErr && string(got) != tc.want) {
					t.Errorf("read %q = %q, %v; want %q, error %v", tc.in, got, err, tc.want, tc.wantErr)
				}
			}
		})
	}
}
