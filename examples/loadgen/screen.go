package main

import (
	"fmt"
	"io"
	"os"
	"strings"
	"time"
)

// barWidth is the width of a bar showing a 100% share of a second's answers.
const barWidth = 20

// screen shows the run: on a terminal, a table redrawn in place with
// narration scrolling above it; elsewhere, one line a second and narration
// lines in between. It is not safe for concurrent use.
type screen struct {
	w     io.Writer
	live  bool
	table []string // the table last drawn, in live mode
}

func newScreen(w io.Writer, live bool) *screen { return &screen{w: w, live: live} }

// isTerminal reports whether w looks like a terminal: a character device
// with a TERM that can move the cursor.
func isTerminal(w io.Writer) bool {
	f, ok := w.(*os.File)
	if !ok {
		return false
	}
	fi, err := f.Stat()
	if err != nil || fi.Mode()&os.ModeCharDevice == 0 {
		return false
	}
	term := os.Getenv("TERM")
	return term != "" && term != "dumb"
}

// say prints a narration line stamped with the time since the start.
func (s *screen) say(elapsed time.Duration, text string) {
	line := fmt.Sprintf("%5.1fs » %s\n", elapsed.Seconds(), text)
	if !s.live {
		io.WriteString(s.w, line)
		return
	}
	var b strings.Builder
	s.erase(&b)
	b.WriteString(line)
	for _, l := range s.table {
		b.WriteString(l + "\n")
	}
	io.WriteString(s.w, b.String())
}

// show prints the state after a second: header names the load, of how long
// the run is.
func (s *screen) show(header string, of time.Duration, sec second) {
	if !s.live {
		io.WriteString(s.w, plainLine(sec)+"\n")
		return
	}
	var b strings.Builder
	s.erase(&b)
	s.table = tableLines(header, of, sec)
	for _, l := range s.table {
		b.WriteString(l + "\n")
	}
	io.WriteString(s.w, b.String())
}

// erase moves the cursor back to the first line of the table on screen and
// clears from there down.
func (s *screen) erase(b *strings.Builder) {
	if n := len(s.table); n > 0 {
		fmt.Fprintf(b, "\x1b[%dA\r\x1b[J", n)
	}
}

// tableLines renders sec as a table of one row per instance.
func tableLines(header string, of time.Duration, sec second) []string {
	width := 8
	for _, r := range sec.rows {
		width = max(width, len(r.name))
	}
	lines := []string{
		fmt.Sprintf("  %.0fs of %.0fs · %s", sec.elapsed.Seconds(), of.Seconds(), header),
		fmt.Sprintf("  %-*s %9s %8s %8s %8s", width, "instance", "last 1s", "total", "p50", "p99"),
	}
	for _, r := range sec.rows {
		line := fmt.Sprintf("  %-*s %9d %8d %8s %8s  ", width, r.name, r.n, r.total, ms(r.p50), ms(r.p99))
		if r.leftAt > 0 {
			line += fmt.Sprintf("left rotation at %.1fs", r.leftAt.Seconds())
		} else if sec.all.n > 0 {
			share := float64(r.n) / float64(sec.all.n)
			line += fmt.Sprintf("%-*s %3.0f%%", barWidth, strings.Repeat("█", int(share*barWidth+0.5)), 100*share)
		}
		lines = append(lines, strings.TrimRight(line, " "))
	}
	lines = append(lines,
		strings.TrimRight(fmt.Sprintf("  %-*s %9d %8d %8s %8s  %s", width, "failed", sec.errNow, sec.errTotal, "", "", clip(sec.reasons, 30)), " "),
		fmt.Sprintf("  %-*s %9d %8d %8s %8s", width, "all", sec.all.n+sec.errNow, sec.all.total+sec.errTotal, ms(sec.all.p50), ms(sec.all.p99)),
	)
	return lines
}

// plainLine renders sec as one line: answers per instance in the last
// second, failures, and latency.
func plainLine(sec second) string {
	var b strings.Builder
	fmt.Fprintf(&b, "%5.0fs ", sec.elapsed.Seconds())
	for _, r := range sec.rows {
		fmt.Fprintf(&b, " %s %3d ", r.name, r.n)
	}
	fmt.Fprintf(&b, " failed %d  p50 %s  p99 %s", sec.errNow, ms(sec.all.p50), ms(sec.all.p99))
	return b.String()
}

// ms formats a latency briefly; 0 reads "-".
func ms(d time.Duration) string {
	f := float64(d) / float64(time.Millisecond)
	switch {
	case d <= 0:
		return "-"
	case f < 10:
		return fmt.Sprintf("%.2fms", f)
	case f < 100:
		return fmt.Sprintf("%.1fms", f)
	case f < 10000:
		return fmt.Sprintf("%.0fms", f)
	}
	return fmt.Sprintf("%.1fs", d.Seconds())
}

func clip(s string, n int) string {
	if r := []rune(s); len(r) > n {
		return string(r[:n-1]) + "…"
	}
	return s
}
