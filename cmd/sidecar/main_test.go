package main

import (
	"bytes"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestRunCommands(t *testing.T) {
	dir := t.TempDir()
	good := filepath.Join(dir, "good.yaml")
	bad := filepath.Join(dir, "bad.yaml")
	if err := os.WriteFile(good, []byte("proxy: {listen: 127.0.0.1:15001}\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(bad, []byte("service: {name: echo, port: 0}\nupstreams: [{name: a, listen: '127.0.0.1:1', protocol: htp}]\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name       string
		args       []string
		wantCode   int
		wantStdout string
		wantStderr []string
	}{
		{"version", []string{"version"}, exitOK, "sidecar dev", nil},
		{"validate good", []string{"validate", "-config", good}, exitOK, "good.yaml: ok", nil},
		{"validate bad names every key", []string{"validate", "-config", bad}, exitConfig, "",
			[]string{"bad.yaml: service.port: must be 1-65535", `bad.yaml: upstreams[0].protocol: unknown "htp"`}},
		{"validate missing file", []string{"validate", "-config", filepath.Join(dir, "nope.yaml")}, exitConfig, "", []string{"nope.yaml"}},
		{"serve bad config exits 2 before starting", []string{"-config", bad}, exitConfig, "", []string{"service.port"}},
		{"unknown command", []string{"frobnicate"}, exitConfig, "", []string{`unknown command "frobnicate"`}},
		{"unknown flag", []string{"validate", "-nope"}, exitConfig, "", []string{"flag provided but not defined"}},
		{"stray argument", []string{"validate", "-config", good, "extra"}, exitConfig, "", []string{"unexpected arguments"}},
		{"help", []string{"help"}, exitOK, "usage:", nil},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			var stdout, stderr bytes.Buffer
			code := run(tc.args, &stdout, &stderr)
			if code != tc.wantCode {
				t.Fatalf("run(%q) = %d, want %d; stderr:\n%s", tc.args, code, tc.wantCode, stderr.String())
			}
			if !strings.Contains(stdout.String(), tc.wantStdout) {
				t.Errorf("stdout = %q, want it to contain %q", stdout.String(), tc.wantStdout)
			}
			for _, want := range tc.wantStderr {
				if !strings.Contains(stderr.String(), want) {
					t.Errorf("stderr = %q, want it to contain %q", stderr.String(), want)
				}
			}
		})
	}
}
