package test

import (
	"bufio"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"

	"github.com/moby/patternmatcher"
	"github.com/moby/patternmatcher/ignorefile"

	"github.com/sidecarlb/sidecar/test/consulagent"
)

// TestDockerBuildContext reads .dockerignore with Docker's own matcher
// (moby/patternmatcher, which the docker CLI and BuildKit use) and checks
// both ways: what is built locally (bin/, bench output, .git) stays out of
// the build context, and every file the image's build needs (go.mod,
// go.sum and each package cmd/sidecar imports from this module) stays in.
func TestDockerBuildContext(t *testing.T) {
	root := consulagent.RepoRoot(t)
	f, err := os.Open(filepath.Join(root, ".dockerignore"))
	if err != nil {
		t.Fatal(err)
	}
	patterns, err := ignorefile.ReadAll(f)
	_ = f.Close()
	if err != nil {
		t.Fatalf(".dockerignore: %v", err)
	}
	pm, err := patternmatcher.New(patterns)
	if err != nil {
		t.Fatalf(".dockerignore: %v", err)
	}
	excluded := func(path string) bool {
		t.Helper()
		ok, err := pm.MatchesOrParentMatches(path)
		if err != nil {
			t.Fatalf("match %s: %v", path, err)
		}
		return ok
	}

	for _, p := range []string{"bin/consul", "bin/sidecar", "bench/results/latest.json", ".git/HEAD", "proxy/proxy.test", "cpu.prof"} {
		if !excluded(p) {
			t.Errorf(".dockerignore lets %s into the build context", p)
		}
	}

	need := []string{"go.mod", "go.sum", "cmd/sidecar/default.pgo"} // the profile: go build -pgo=auto
	list := exec.Command("go", "list", "-deps", "-f", "{{if .Module}}{{if .Module.Main}}{{.Dir}}{{end}}{{end}}", "./cmd/sidecar")
	list.Dir = root
	out, err := list.Output()
	if err != nil {
		t.Fatalf("go list -deps ./cmd/sidecar: %v", err)
	}
	for _, dir := range strings.Fields(string(out)) {
		rel, err := filepath.Rel(root, dir)
		if err != nil {
			t.Fatal(err)
		}
		files, err := filepath.Glob(filepath.Join(dir, "*.go"))
		if err != nil || len(files) == 0 {
			t.Fatalf("no Go files in %s (%v)", dir, err)
		}
		for _, file := range files {
			if !strings.HasSuffix(file, "_test.go") {
				need = append(need, filepath.Join(rel, filepath.Base(file)))
			}
		}
	}
	if len(need) < 10 {
		t.Fatalf("found only %d files the build needs: %v", len(need), need)
	}
	for _, p := range need {
		if excluded(p) {
			t.Errorf(".dockerignore keeps %s, which the image's build needs, out of the build context", p)
		}
	}
}

// TestDockerfile checks the Dockerfile's image metadata and shape: the OCI
// labels, a non-root user, a builder whose Go is the release go.mod names,
// and the config path the Kubernetes manifests and README use.
func TestDockerfile(t *testing.T) {
	root := consulagent.RepoRoot(t)
	df := readLines(t, filepath.Join(root, "Dockerfile"))
	text := strings.Join(df, "\n")

	for _, key := range []string{"title", "description", "source", "version", "revision"} {
		if !strings.Contains(text, "org.opencontainers.image."+key+"=") {
			t.Errorf("Dockerfile has no org.opencontainers.image.%s label", key)
		}
	}
	if !regexp.MustCompile(`(?m)^USER nonroot`).MatchString(text) {
		t.Error("Dockerfile's image does not run as a non-root USER")
	}
	if !strings.Contains(text, `CMD ["-config", "/etc/sidecar/config.yaml"]`) {
		t.Error(`Dockerfile's CMD is not ["-config", "/etc/sidecar/config.yaml"]`)
	}

	var goVersion string
	for _, l := range readLines(t, filepath.Join(root, "go.mod")) {
		if v, ok := strings.CutPrefix(l, "go "); ok {
			goVersion = v
		}
	}
	release := regexp.MustCompile(`^(\d+\.\d+)`).FindString(goVersion)
	if release == "" {
		t.Fatalf("no go directive in go.mod")
	}
	m := regexp.MustCompile(`(?m)^FROM golang:(\S+) AS build`).FindStringSubmatch(text)
	if m == nil {
		t.Fatal("Dockerfile has no `FROM golang:… AS build` stage")
	}
	if m[1] != release && !strings.HasPrefix(m[1], release+".") && !strings.HasPrefix(m[1], release+"-") {
		t.Errorf("Dockerfile builds with golang:%s, go.mod wants go %s", m[1], goVersion)
	}
}

func readLines(t *testing.T, path string) []string {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var lines []string
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		lines = append(lines, sc.Text())
	}
	if err := sc.Err(); err != nil {
		t.Fatal(err)
	}
	return lines
}
