package main

import (
	"bytes"
	"os"
	"path/filepath"
	"runtime/debug"
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
	unsetVar := filepath.Join(dir, "unset.yaml")
	if err := os.WriteFile(unsetVar, []byte("service:\n  name: echo\n  address: ${SIDECAR_TEST_POD_IP}\n  port: ${SIDECAR_TEST_PORT:-9001}\n"), 0o600); err != nil {
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
		{"validate unset variable", []string{"validate", "-config", unsetVar}, exitConfig, "",
			[]string{"unset.yaml: service.address: ${SIDECAR_TEST_POD_IP} is not set"}},
		{"validate missing file", []string{"validate", "-config", filepath.Join(dir, "nope.yaml")}, exitConfig, "", []string{"nope.yaml"}},
		{"serve bad config exits 2 before starting", []string{"-config", bad}, exitConfig, "", []string{"service.port"}},
		{"unknown command", []string{"frobnicate"}, exitConfig, "", []string{`unknown command "frobnicate"`}},
		{"unknown flag", []string{"validate", "-nope"}, exitConfig, "", []string{"flag provided but not defined"}},
		{"stray argument", []string{"validate", "-config", good, "extra"}, exitConfig, "", []string{"unexpected arguments"}},
		{"help", []string{"help"}, exitOK, "usage:", nil},
		{"-h", []string{"-h"}, exitOK, "sidecar update  [-config FILE | -admin ADDR] [-timeout 15m]", nil},
		{"--help", []string{"--help"}, exitOK, "sidecar run [-config FILE] -- CMD ARGS...", nil},
		{"-help", []string{"-help"}, exitOK, "sidecar validate [-config FILE]", nil},
		{"help CMD", []string{"help", "status"}, exitOK, "[-json] [-timeout 5s]", nil},
		{"CMD -h", []string{"validate", "-config", good, "-h"}, exitOK, "sidecar status  [-config FILE | -admin ADDR]", nil},
		{"control -h", []string{"restart", "--help"}, exitOK, "usage:", nil},
		{"help unknown CMD", []string{"help", "frobnicate"}, exitConfig, "", []string{`unknown command "frobnicate"`, "usage:"}},
		{"unknown CMD -h", []string{"frobnicate", "-h"}, exitConfig, "", []string{`unknown command "frobnicate"`, "usage:"}},
		{"--version", []string{"--version"}, exitOK, "sidecar dev", nil},
		{"-version", []string{"-version"}, exitOK, "sidecar dev", nil},
		{"version with arguments", []string{"version", "x"}, exitConfig, "", []string{"unexpected arguments", "usage:"}},
		{"unknown command prints usage", []string{"frobnicate"}, exitConfig, "", []string{"usage:", "sidecar help [CMD]"}},
		{"unknown flag prints usage", []string{"-nope"}, exitConfig, "", []string{"flag provided but not defined: -nope", "sidecar version"}},
		{"unknown control flag prints usage", []string{"status", "-nope"}, exitConfig, "", []string{"flag provided but not defined: -nope", "usage:"}},
		{"unknown run flag prints usage", []string{"run", "-nope", "--", "app"}, exitConfig, "", []string{"flag provided but not defined: -nope", "usage:"}},
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

func TestRunHelpAndErrorStreams(t *testing.T) {
	for _, args := range [][]string{{"-h"}, {"--help"}, {"help"}, {"help", "run"}} {
		var stdout, stderr bytes.Buffer
		if code := run(args, &stdout, &stderr); code != exitOK || stderr.Len() != 0 {
			t.Errorf("run(%q) = %d with stderr %q, want 0 and nothing on stderr", args, code, stderr.String())
		}
	}
	for _, args := range [][]string{{"frobnicate"}, {"-nope"}, {"kill", "-nope"}} {
		var stdout, stderr bytes.Buffer
		if code := run(args, &stdout, &stderr); code != exitConfig || stdout.Len() != 0 {
			t.Errorf("run(%q) = %d with stdout %q, want 2 and nothing on stdout", args, code, stdout.String())
		}
	}
}

func TestBuildVersion(t *testing.T) {
	info := func(version string, settings ...string) func() (*debug.BuildInfo, bool) {
		return func() (*debug.BuildInfo, bool) {
			bi := &debug.BuildInfo{Main: debug.Module{Path: "github.com/sidecarlb/sidecar", Version: version}}
			for i := 0; i+1 < len(settings); i += 2 {
				bi.Settings = append(bi.Settings, debug.BuildSetting{Key: settings[i], Value: settings[i+1]})
			}
			return bi, true
		}
	}
	const rev = "0123456789abcdef0123456789abcdef01234567"
	tests := []struct {
		name    string
		stamped string
		info    func() (*debug.BuildInfo, bool)
		want    string
	}{
		{"stamped by make wins", "v1.2.3", info("v9.9.9"), "v1.2.3"},
		{"go install module version", "dev", info("v1.4.0", "vcs.revision", rev), "v1.4.0"},
		{"go build clean checkout", "dev", info("(devel)", "vcs.revision", rev, "vcs.modified", "false"), "0123456789ab"},
		{"go build dirty checkout", "dev", info("(devel)", "vcs.revision", rev, "vcs.modified", "true"), "0123456789ab-dirty"},
		{"no vcs info", "dev", info("(devel)"), "dev"},
		{"no build info", "dev", func() (*debug.BuildInfo, bool) { return nil, false }, "dev"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			if got := buildVersion(tc.stamped, tc.info); got != tc.want {
				t.Errorf("buildVersion() = %q, want %q", got, tc.want)
			}
		})
	}
}

func TestValidateExpandsEnv(t *testing.T) {
	t.Setenv("SIDECAR_TEST_POD_IP", "10.1.2.3")
	path := filepath.Join(t.TempDir(), "env.yaml")
	if err := os.WriteFile(path, []byte("service:\n  name: echo\n  address: ${SIDECAR_TEST_POD_IP}\n  port: ${SIDECAR_TEST_PORT:-9001}\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	var stdout, stderr bytes.Buffer
	if code := run([]string{"validate", "-config", path}, &stdout, &stderr); code != exitOK {
		t.Fatalf("run(validate) = %d, want 0; stderr:\n%s", code, stderr.String())
	}
}
