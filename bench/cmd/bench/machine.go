package main

import (
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"time"
)

// machineInfo describes where the figures come from.
type machineInfo struct {
	Date     string `json:"date"`
	NProc    int    `json:"nproc"`
	Model    string `json:"cpu_model"`
	MemTotal string `json:"mem_total"`
	Kernel   string `json:"kernel"`
	OS       string `json:"os"`
	Go       string `json:"go"`
	HAProxy  string `json:"haproxy"`
	Nginx    string `json:"nginx"`
	Load     string `json:"loadavg_start"`
	// Source is the commit the sidecar was built from (git describe).
	Source string `json:"sidecar_source"`
	// BaseSource is the commit of -base, built as sidecar-base.
	BaseSource string `json:"sidecar_base_source,omitempty"`
}

func (m machineInfo) summary() string {
	return fmt.Sprintf("%d × %s, %s, Linux %s, %s, %s, %s, %s, load avg %s",
		m.NProc, m.Model, m.MemTotal, m.Kernel, m.OS, m.Go, m.HAProxy, m.Nginx, m.Load)
}

func (h *harness) machine() machineInfo {
	m := machineInfo{
		Date:  time.Now().UTC().Format("2006-01-02 15:04 UTC"),
		NProc: runtime.NumCPU(),
		Load:  loadavg(),
	}
	m.Model = procField("/proc/cpuinfo", "model name")
	m.Source = h.source
	m.BaseSource = h.baseSource
	var kb int64
	if _, err := fmt.Sscan(procField("/proc/meminfo", "MemTotal"), &kb); err == nil {
		m.MemTotal = fmt.Sprintf("%.1f GiB", float64(kb)/(1<<20))
	}
	m.Kernel = strings.TrimSpace(readFile("/proc/sys/kernel/osrelease"))
	m.OS = strings.Trim(procField("/etc/os-release", "PRETTY_NAME="), `"`)
	if out, err := exec.Command("go", "version").Output(); err == nil {
		m.Go = strings.TrimPrefix(strings.TrimSpace(string(out)), "go version ")
	} else {
		m.Go = runtime.Version()
	}
	m.HAProxy, m.Nginx = "not installed", "not installed"
	if p, err := lookSbin("haproxy"); err == nil {
		if out, err := exec.Command(p, "-v").CombinedOutput(); err == nil {
			// "HAProxy version 2.6.12-1+deb12u4 2026/10/17 - https://haproxy.org/"
			m.HAProxy = firstLine(strings.TrimSpace(string(out)))
			if f := strings.Fields(m.HAProxy); len(f) >= 3 {
				m.HAProxy = "HAProxy " + f[2]
			}
		}
	}
	if p, err := lookSbin("nginx"); err == nil {
		if out, err := exec.Command(p, "-v").CombinedOutput(); err == nil {
			m.Nginx = strings.TrimPrefix(firstLine(strings.TrimSpace(string(out))), "nginx version: ")
		}
	}
	return m
}

func readFile(path string) string {
	b, _ := os.ReadFile(path)
	return string(b)
}

// procField returns the value of the first "key: value" (or key=value)
// line of a file.
func procField(path, key string) string {
	for _, line := range strings.Split(readFile(path), "\n") {
		if rest, ok := strings.CutPrefix(line, key); ok {
			rest = strings.TrimSpace(rest)
			rest = strings.TrimSpace(strings.TrimPrefix(rest, ":"))
			return rest
		}
	}
	return "?"
}

// pprofSource is compiled into the sidecar with go build -overlay when
// -profile is given, so the harness can profile it without any change to
// cmd/sidecar: with SIDECAR_BENCH_PPROF=host:port it serves
// /debug/pprof/ on that loopback address.
const pprofSource = `package main

import (
	"net/http"
	"net/http/pprof"
	"os"
)

func init() {
	addr := os.Getenv("SIDECAR_BENCH_PPROF")
	if addr == "" {
		return
	}
	mux := http.NewServeMux()
	mux.HandleFunc("/debug/pprof/", pprof.Index)
	mux.HandleFunc("/debug/pprof/profile", pprof.Profile)
	go func() { _ = http.ListenAndServe(addr, mux) }()
}
`

// pprofOverlay writes the overlay (named file, in the temp dir) that adds
// pprofSource to cmd/sidecar of the tree at root, and returns its path.
func (h *harness) pprofOverlay(root, file string) (string, error) {
	src := filepath.Join(h.tmp, "zz_bench_pprof.go")
	if err := os.WriteFile(src, []byte(pprofSource), 0o644); err != nil {
		return "", err
	}
	target, err := filepath.Abs(filepath.Join(root, "cmd", "sidecar", "zz_bench_pprof.go"))
	if err != nil {
		return "", err
	}
	b, _ := json.Marshal(map[string]map[string]string{"Replace": {target: src}})
	overlay := filepath.Join(h.tmp, file)
	return overlay, os.WriteFile(overlay, b, 0o644)
}
