package httpwire

import (
	"bufio"
	"strings"
	"testing"
)

func TestWriteField(t *testing.T) {
	const bufSize = 8 << 10 // the HTTP/1.1 engines' write buffer
	long := strings.Repeat("v", 2*bufSize)
	tests := []struct {
		name, k, v, want string
	}{
		{"plain", "X-A", "1", "X-A: 1\r\n"},
		{"trimmed", "X-A", " \t1 2\t ", "X-A: 1 2\r\n"},
		{"line breaks become spaces", "X-A", "a\r\nX-Evil: 1\nb\rc", "X-A: a  X-Evil: 1 b c\r\n"},
		{"empty", "X-A", "", "X-A: \r\n"},
		{"longer than the buffer", "X-Long", long, "X-Long: " + long + "\r\n"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			var sb strings.Builder
			w := bufio.NewWriterSize(&sb, bufSize)
			w.WriteString("HTTP/1.1 200 OK\r\n") // not at the buffer's start
			WriteField(w, tc.k, tc.v)
			w.Flush()
			if got := strings.TrimPrefix(sb.String(), "HTTP/1.1 200 OK\r\n"); got != tc.want {
				t.Errorf("WriteField(%q, %q) wrote %.80q, want %.80q", tc.k, tc.v, got, tc.want)
			}
		})
	}
}
