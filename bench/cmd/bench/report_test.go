package main

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestUpdateSection(t *testing.T) {
	tests := []struct {
		name, old, want string
	}{
		{name: "between markers", old: "# B\n\n" + beginMarker + "\nold\n" + endMarker + "\ntail\n",
			want: "# B\n\n" + beginMarker + "\nnew\n" + endMarker + "\ntail\n"},
		{name: "no markers", old: "# B\n",
			want: "# B\n\n## Results\n\n" + beginMarker + "\nnew\n" + endMarker + "\n"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "B.md")
			if err := os.WriteFile(path, []byte(tc.old), 0o644); err != nil {
				t.Fatal(err)
			}
			if err := updateSection(path, "new\n"); err != nil {
				t.Fatal(err)
			}
			got, _ := os.ReadFile(path)
			if string(got) != tc.want {
				t.Errorf("updateSection() wrote %q, want %q", got, tc.want)
			}
		})
	}
}

func TestParseMicro(t *testing.T) {
	out := `goos: linux
BenchmarkProxyHTTP-2   	    5811	    318703 ns/op	   12030 B/op	     137 allocs/op
BenchmarkDirect-2      	   16034	     68901 ns/op	    6407 B/op	      72 allocs/op
BenchmarkPick/round_robin/3-2  77389510  14.77 ns/op  0 B/op  0 allocs/op
PASS`
	got := parseMicro(out)
	if r := got["BenchmarkProxyHTTP"]; r.AllocsPerOp != 137 || r.BytesPerOp != 12030 || r.NsPerOp != 318703 {
		t.Errorf("BenchmarkProxyHTTP = %+v, want 318703 ns, 12030 B, 137 allocs", r)
	}
	if r := got["BenchmarkDirect"]; r.AllocsPerOp != 72 {
		t.Errorf("BenchmarkDirect allocs = %v, want 72", r.AllocsPerOp)
	}
	if _, ok := got["BenchmarkPick/round_robin/3"]; !ok {
		t.Errorf("sub-benchmark name not parsed: %v", got)
	}
}

func TestSpreadAndMedian(t *testing.T) {
	if got, want := spread([]int64{1, 1, 2}), "25/25/50 %"; got != want {
		t.Errorf("spread() = %q, want %q", got, want)
	}
	if got, want := spread([]int64{1, -1, 2}), "?"; got != want {
		t.Errorf("spread() = %q, want %q", got, want)
	}
	if got, want := median([]float64{3, 1, 2}), 2.0; got != want {
		t.Errorf("median() = %v, want %v", got, want)
	}
	if got, want := median([]float64{4, 1, 2, 3}), 2.5; got != want {
		t.Errorf("median() = %v, want %v", got, want)
	}
}

func TestMarkdownBaseLine(t *testing.T) {
	const line = "Peer sidecar-base is the sidecar built at `abc1234` (-base)"
	rep := &report{Machine: machineInfo{Source: "v1-dirty"}}
	if md := rep.markdown(); strings.Contains(md, "sidecar-base") {
		t.Errorf("markdown() without -base mentions sidecar-base:\n%s", md)
	}
	rep.Machine.BaseSource = "abc1234"
	md := rep.markdown()
	if !strings.Contains(md, "in all.\n\n"+line) {
		t.Errorf("markdown() with -base lacks %q under the header:\n%s", line, md)
	}
	if strings.Count(md, "sidecar-base") != 1 {
		t.Errorf("markdown() mentions sidecar-base more than once:\n%s", md)
	}
}
