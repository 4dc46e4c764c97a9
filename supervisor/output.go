package supervisor

import (
	"bytes"
	"fmt"
	"io"
	"sync"
)

// maxLine is how much of a line without a newline is held before it is
// written out anyway.
const maxLine = 64 << 10

// lineWriter writes what the app prints to out one whole line at a time,
// each with a prefix. It never fails the app's writes: a line out cannot
// take is dropped. It is safe for concurrent use.
type lineWriter struct {
	mu     sync.Mutex
	out    io.Writer
	prefix string
	buf    []byte
}

func newLineWriter(out io.Writer, prefix string) *lineWriter {
	return &lineWriter{out: out, prefix: prefix, buf: append(make([]byte, 0, 256), prefix...)}
}

func (w *lineWriter) Write(p []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	n := len(p)
	for len(p) > 0 {
		i := bytes.IndexByte(p, '\n')
		if i < 0 {
			w.buf = append(w.buf, p...)
			if len(w.buf)-len(w.prefix) >= maxLine {
				w.emit()
			}
			break
		}
		w.buf = append(w.buf, p[:i+1]...)
		p = p[i+1:]
		_, _ = w.out.Write(w.buf)
		w.buf = append(w.buf[:0], w.prefix...)
	}
	return n, nil
}

// emit writes the partial line held, ending it with a newline.
func (w *lineWriter) emit() {
	w.buf = append(w.buf, '\n')
	_, _ = w.out.Write(w.buf)
	w.buf = append(w.buf[:0], w.prefix...)
}

// Flush writes out a last line that had no newline.
func (w *lineWriter) Flush() {
	w.mu.Lock()
	defer w.mu.Unlock()
	if len(w.buf) > len(w.prefix) {
		w.emit()
	}
}

// FormatBytes formats n bytes with a binary unit: "512B", "1.5KiB", "256MiB".
func FormatBytes(n int64) string {
	const unit = 1024
	if n < unit {
		return fmt.Sprintf("%dB", n)
	}
	div, exp := int64(unit), 0
	for m := n / unit; m >= unit && exp < 4; m /= unit {
		div *= unit
		exp++
	}
	v := float64(n) / float64(div)
	s := fmt.Sprintf("%.1f", v)
	if s[len(s)-2:] == ".0" {
		s = s[:len(s)-2]
	}
	return s + []string{"KiB", "MiB", "GiB", "TiB", "PiB"}[exp]
}
