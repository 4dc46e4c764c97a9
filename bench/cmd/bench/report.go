package main

import (
	"bytes"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"
)

// report is everything one run of the harness found; latest.json holds it
// as is and latest.md renders it.
type report struct {
	Machine   machineInfo            `json:"machine"`
	Options   map[string]any         `json:"options"`
	Peers     []peerDoc              `json:"peers"`
	Scenarios []*scenarioResult      `json:"scenarios"`
	Micro     map[string]microResult `json:"microbenchmarks,omitempty"`
	Notes     []string               `json:"notes,omitempty"`
	Elapsed   string                 `json:"elapsed"`
}

type peerDoc struct {
	Name      string              `json:"name"`
	Targets   map[string][]string `json:"targets"`
	IdleRSSKB int64               `json:"idle_rss_kb,omitempty"`
	Notes     []string            `json:"notes"`
}

func peerDocs(peers []*peer) []peerDoc {
	out := make([]peerDoc, len(peers))
	for i, p := range peers {
		out[i] = peerDoc{Name: p.name, Targets: p.targets, IdleRSSKB: p.idleRSSKB, Notes: p.notes}
	}
	return out
}

func (h *harness) optionsDoc() map[string]any {
	pin := "none"
	if h.pinned {
		pin = fmt.Sprintf("proxies on CPU %d, load generator on CPU %d (taskset); backends and Consul unpinned", h.proxyCPU, h.loadCPU)
	}
	return map[string]any{
		"duration": h.opts.duration.String(), "warmup": h.opts.warmup.String(), "runs": h.opts.runs,
		"pinning": pin, "backends": len(h.backends),
	}
}

// Markers of the section the harness rewrites in -update's file.
const (
	beginMarker = "<!-- bench:results:begin -->"
	endMarker   = "<!-- bench:results:end -->"
)

func (h *harness) write(rep *report) error {
	if err := os.MkdirAll(h.opts.out, 0o755); err != nil {
		return err
	}
	js, err := json.MarshalIndent(rep, "", "  ")
	if err != nil {
		return err
	}
	if err := os.WriteFile(filepath.Join(h.opts.out, "latest.json"), append(js, '\n'), 0o644); err != nil {
		return err
	}
	md := rep.markdown()
	mdPath := filepath.Join(h.opts.out, "latest.md")
	if err := os.WriteFile(mdPath, []byte(md), 0o644); err != nil {
		return err
	}
	h.logf("wrote %s and latest.json", mdPath)
	fmt.Print(md)
	if h.opts.update == "" {
		return nil
	}
	if err := updateSection(h.opts.update, md); err != nil {
		return err
	}
	h.logf("rewrote the results section of %s", h.opts.update)
	return nil
}

// updateSection replaces what lies between the markers in path with md, or
// appends a marked section when there are none.
func updateSection(path, md string) error {
	old, err := os.ReadFile(path)
	if err != nil && !os.IsNotExist(err) {
		return err
	}
	section := beginMarker + "\n" + md + endMarker
	var out []byte
	i, j := bytes.Index(old, []byte(beginMarker)), bytes.Index(old, []byte(endMarker))
	if i >= 0 && j > i {
		out = append(out, old[:i]...)
		out = append(out, section...)
		out = append(out, old[j+len(endMarker):]...)
	} else {
		out = append(old, []byte("\n## Results\n\n"+section+"\n")...)
	}
	return os.WriteFile(path, out, 0o644)
}

func (rep *report) scenario(name string) *scenarioResult {
	for _, s := range rep.Scenarios {
		if s.Name == name {
			return s
		}
	}
	return nil
}

func (rep *report) markdown() string {
	var b strings.Builder
	m := rep.Machine
	o := rep.Options
	fmt.Fprintf(&b, "Run of %s, %s in all.\n\n", m.Date, rep.Elapsed)
	if m.BaseSource != "" {
		fmt.Fprintf(&b, "Peer sidecar-base is the sidecar built at `%s` (-base), set up, pinned and run like sidecar.\n\n", m.BaseSource)
	}
	b.WriteString("| nproc | CPU model | memory | kernel | OS | Go | HAProxy | nginx | sidecar source |\n|---|---|---|---|---|---|---|---|---|\n")
	fmt.Fprintf(&b, "| %d | %s | %s | %s | %s | %s | %s | %s | %s |\n\n", m.NProc, m.Model, m.MemTotal, m.Kernel, m.OS, m.Go, m.HAProxy, m.Nginx, m.Source)
	fmt.Fprintf(&b, "Each scenario ran %v× per peer for %v after %v of warm-up, peers in rotating order. "+
		"The latency scenario runs at least 7× (its p50 moves by tens of µs from run to run on a shared VM). "+
		"Figures are medians of the runs, except peak RSS (highest run), errors and spread (summed). "+
		"Pinning: %v. Load average (1, 5, 15 min) at the start: %s; it is given before and after each scenario, "+
		"since other work on the machine skews every figure.\n\n", o["runs"], o["duration"], o["warmup"], o["pinning"], m.Load)

	rep.writeTargets(&b)

	for _, s := range rep.Scenarios {
		fmt.Fprintf(&b, "#### %s\n\n", s.Title)
		fmt.Fprintf(&b, "`%s`; load avg before %s, after %s.\n\n", s.Name, s.LoadBefore, s.LoadAfter)
		if s.Latency {
			writeLatencyTable(&b, s)
		} else {
			writeThroughputTable(&b, s)
		}
	}

	b.WriteString("#### Idle RSS (listening, nothing proxied yet)\n\n| peer | RSS MB |\n|---|---|\n")
	for _, p := range rep.Peers {
		if !isDirect(p.Name) {
			fmt.Fprintf(&b, "| %s | %.1f |\n", p.Name, kbMB(p.IdleRSSKB))
		}
	}
	b.WriteString("\n#### Peers\n\n")
	for _, p := range rep.Peers {
		fmt.Fprintf(&b, "- **%s**: %s\n", p.Name, strings.Join(p.Notes, "; "))
	}
	if len(rep.Notes) > 0 {
		b.WriteString("\n#### Notes\n\n")
		for _, n := range rep.Notes {
			fmt.Fprintf(&b, "- %s\n", n)
		}
	}
	b.WriteString("\n")
	return b.String()
}

func writeThroughputTable(b *strings.Builder, s *scenarioResult) {
	direct, hap := s.cell("direct"), s.cell("haproxy")
	fmt.Fprintf(b, "| peer | %s/s | × direct | × haproxy | p50 µs | p99 µs | proxy CPU µs/%s | CPU × haproxy | peak RSS MB | errors | spread over backends |\n",
		s.Unit, s.Unit)
	b.WriteString("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|\n")
	for _, c := range s.Cells {
		if c.OK == 0 {
			fmt.Fprintf(b, "| %s | failed: %s | | | | | | | | | |\n", c.Peer, mdEscape(c.ErrorSample))
			continue
		}
		cpu, cpuRatio, rss := "–", "–", "–"
		if !isDirect(c.Peer) {
			cpu = fmt.Sprintf("%.1f", c.CPUPerReqUS)
			rss = fmt.Sprintf("%.1f", kbMB(c.PeakRSSKB))
			if hap != nil && hap.OK > 0 && hap.CPUPerReqUS > 0 {
				cpuRatio = fmt.Sprintf("%.2f", c.CPUPerReqUS/hap.CPUPerReqUS)
			}
		}
		fmt.Fprintf(b, "| %s | %.0f | %s | %s | %.0f | %.0f | %s | %s | %s | %s | %s |\n",
			c.Peer, c.RPS, ratio(c, direct), ratio(c, hap), c.P50US, c.P99US, cpu, cpuRatio, rss, errs(c), spread(c.Spread))
	}
	b.WriteString("\n")
}

func writeLatencyTable(b *strings.Builder, s *scenarioResult) {
	direct := s.cell("direct")
	b.WriteString("| peer | req/s | p50 µs | p99 µs | p99.9 µs | p50 added | p99 added | p99.9 added | p99 from schedule µs | proxy CPU µs/req | errors | spread |\n")
	b.WriteString("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|\n")
	for _, c := range s.Cells {
		if c.OK == 0 {
			fmt.Fprintf(b, "| %s | failed: %s | | | | | | | | | | |\n", c.Peer, mdEscape(c.ErrorSample))
			continue
		}
		add := func(v, d float64) string {
			if direct == nil || direct.OK == 0 || isDirect(c.Peer) {
				return "–"
			}
			return fmt.Sprintf("%+.0f", v-d)
		}
		var d50, d99, d999 float64
		if direct != nil {
			d50, d99, d999 = direct.P50US, direct.P99US, direct.P999US
		}
		cpu := "–"
		if !isDirect(c.Peer) {
			cpu = fmt.Sprintf("%.1f", c.CPUPerReqUS)
		}
		fmt.Fprintf(b, "| %s | %.0f | %.0f | %.0f | %.0f | %s | %s | %s | %.0f | %s | %s | %s |\n",
			c.Peer, c.RPS, c.P50US, c.P99US, c.P999US, add(c.P50US, d50), add(c.P99US, d99), add(c.P999US, d999),
			c.SchedP99US, cpu, errs(c), spread(c.Spread))
	}
	b.WriteString("\nLatency is timed from the moment a request is written; \"p99 from schedule\" times it from when the " +
		"fixed-rate schedule wanted it sent, so it also counts timer lateness and queueing.\n\n")
}

// target is one of the goals, checked against this run.
type target struct {
	goal, measured, verdict string
}

func (rep *report) writeTargets(b *strings.Builder) {
	var ts []target
	cpuTarget := func(name, label string) {
		t := target{goal: "sidecar CPU per request ≤ 2× HAProxy's, " + label}
		s := rep.scenario(name)
		if s == nil {
			ts = append(ts, notMeasured(t))
			return
		}
		sc, hp := s.cell("sidecar"), s.cell("haproxy")
		if sc == nil || hp == nil || sc.OK == 0 || hp.OK == 0 || hp.CPUPerReqUS == 0 {
			ts = append(ts, notMeasured(t))
			return
		}
		r := sc.CPUPerReqUS / hp.CPUPerReqUS
		t.measured = fmt.Sprintf("%.1f µs vs %.1f µs: %.2f×", sc.CPUPerReqUS, hp.CPUPerReqUS, r)
		t.verdict = verdict(r <= 2)
		ts = append(ts, t)
	}
	cpuTarget("h1-get", "HTTP/1.1 GET")
	cpuTarget("grpc-unary", "gRPC unary")

	t := target{goal: "allocations per proxied HTTP/1.1 request (BenchmarkProxyHTTP)"}
	if px, ok := rep.Micro["BenchmarkProxyHTTP"]; ok {
		t.measured = fmt.Sprintf("%.0f allocs/op, %.0f B/op (client + proxy + node in one process)", px.AllocsPerOp, px.BytesPerOp)
		if d, ok := rep.Micro["BenchmarkDirect"]; ok {
			t.measured += fmt.Sprintf("; without the proxy %.0f, so about %.0f allocs and %.0f B are the proxy's",
				d.AllocsPerOp, px.AllocsPerOp-d.AllocsPerOp, px.BytesPerOp-d.BytesPerOp)
		}
		t.verdict = "reported (no bound set)"
	} else {
		t = notMeasured(t)
	}
	ts = append(ts, t)

	t = target{goal: "sidecar idle RSS ≤ 16 MB"}
	if p := rep.peer("sidecar"); p != nil && p.IdleRSSKB > 0 {
		t.measured = fmt.Sprintf("%.1f MB", kbMB(p.IdleRSSKB))
		t.verdict = verdict(kbMB(p.IdleRSSKB) <= 16)
	} else {
		t = notMeasured(t)
	}
	ts = append(ts, t)

	t = target{goal: "sidecar RSS ≤ 32 MB under 64-connection load"}
	var peak int64
	var where []string
	for _, name := range []string{"h1-get", "h1-post", "ws"} {
		if s := rep.scenario(name); s != nil {
			if c := s.cell("sidecar"); c != nil && c.PeakRSSKB > 0 {
				where = append(where, fmt.Sprintf("%s %.1f", name, kbMB(c.PeakRSSKB)))
				peak = max(peak, c.PeakRSSKB)
			}
		}
	}
	if peak > 0 {
		t.measured = fmt.Sprintf("peak %.1f MB (%s)", kbMB(peak), strings.Join(where, ", "))
		t.verdict = verdict(kbMB(peak) <= 32)
	} else {
		t = notMeasured(t)
	}
	ts = append(ts, t)

	t = target{goal: "sidecar adds ≤ 100 µs to p50 at 1,000 req/s"}
	if s := rep.scenario("latency"); s != nil && ok2(s.cell("sidecar"), s.cell("direct")) {
		sc, d := s.cell("sidecar"), s.cell("direct")
		add := sc.P50US - d.P50US
		t.measured = fmt.Sprintf("%+.0f µs (%.0f vs %.0f direct)", add, sc.P50US, d.P50US)
		t.verdict = verdict(add <= 100)
	} else {
		t = notMeasured(t)
	}
	ts = append(ts, t)

	share := func(name, label string, want float64) {
		t := target{goal: fmt.Sprintf("%s through the sidecar ≥ %.0f %% of direct", label, want*100)}
		if s := rep.scenario(name); s != nil && ok2(s.cell("sidecar"), s.cell("direct")) {
			sc, d := s.cell("sidecar"), s.cell("direct")
			r := sc.RPS / d.RPS
			t.measured = fmt.Sprintf("%.0f %% (%.0f vs %.0f /s)", r*100, sc.RPS, d.RPS)
			if d1 := s.cell("direct-1"); d1 != nil && d1.OK > 0 && d1.RPS > 0 {
				t.measured += fmt.Sprintf("; %.0f %% of direct-1 (%.0f /s)", sc.RPS/d1.RPS*100, d1.RPS)
			}
			t.verdict = verdict(r >= want) // against the stricter baseline
		} else {
			t = notMeasured(t)
		}
		ts = append(ts, t)
	}
	share("grpc-unary", "gRPC unary, 64 streams", 0.6)
	share("grpc-bidi", "gRPC bidi messages", 0.7)
	share("ws", "WebSocket ping-pong", 0.7)

	b.WriteString("#### Targets\n\n| target | this run | |\n|---|---|---|\n")
	for _, t := range ts {
		fmt.Fprintf(b, "| %s | %s | %s |\n", t.goal, t.measured, t.verdict)
	}
	b.WriteString("\n")
}

func (rep *report) peer(name string) *peerDoc {
	for i := range rep.Peers {
		if rep.Peers[i].Name == name {
			return &rep.Peers[i]
		}
	}
	return nil
}

func notMeasured(t target) target {
	t.measured, t.verdict = "not measured", "–"
	return t
}

func ok2(a, b *cell) bool { return a != nil && b != nil && a.OK > 0 && b.OK > 0 && b.RPS > 0 }

func verdict(ok bool) string {
	if ok {
		return "pass"
	}
	return "**fail**"
}

func ratio(c, base *cell) string {
	if base == nil || base.OK == 0 || base.RPS == 0 {
		return "–"
	}
	return fmt.Sprintf("%.2f", c.RPS/base.RPS)
}

func errs(c *cell) string {
	if c.Errors == 0 && c.OK == len(c.Runs) {
		return "0"
	}
	s := fmt.Sprintf("%d", c.Errors)
	if c.OK < len(c.Runs) {
		s += fmt.Sprintf(" (%d/%d runs failed)", len(c.Runs)-c.OK, len(c.Runs))
	}
	if c.ErrorSample != "" {
		s += ": " + mdEscape(truncate(c.ErrorSample, 80))
	}
	return s
}

// spread shows each backend's share of what it served in the runs.
func spread(counts []int64) string {
	var total int64
	for _, n := range counts {
		if n < 0 {
			return "?"
		}
		total += n
	}
	if total == 0 {
		return "–"
	}
	parts := make([]string, len(counts))
	for i, n := range counts {
		parts[i] = fmt.Sprintf("%.0f", float64(n)*100/float64(total))
	}
	return strings.Join(parts, "/") + " %"
}

func kbMB(kb int64) float64 { return float64(kb) / 1024 }

func truncate(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return s[:n] + "…"
}

func mdEscape(s string) string {
	return strings.NewReplacer("|", `\|`, "\n", " ").Replace(s)
}
