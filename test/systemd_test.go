package test

import (
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"testing"

	"github.com/sidecarlb/sidecar/test/consulagent"
)

// maxUnitExposure is the most `systemd-analyze security` may rate the
// example unit (0 is locked down, 10 fully exposed; 4.0 is where systemd
// stops calling a unit "OK").
const maxUnitExposure = 4.0

// TestSystemdUnitHardening rates examples/systemd/sidecar.service with
// `systemd-analyze security --offline` and fails above maxUnitExposure, so
// that hardening taken out of the unit shows. Like the Consul tests, it
// fails when the tool is missing, and skips with -short.
func TestSystemdUnitHardening(t *testing.T) {
	tool, err := exec.LookPath("systemd-analyze")
	if err != nil {
		if testing.Short() {
			t.Skip("no systemd-analyze")
		}
		t.Fatal("no systemd-analyze on PATH (Debian's systemd package has it)")
	}
	unit := filepath.Join(consulagent.RepoRoot(t), "examples", "systemd", "sidecar.service")
	out, err := exec.Command(tool, "security", "--offline=true", "--no-pager", unit).CombinedOutput()
	if err != nil {
		t.Fatalf("systemd-analyze security: %v\n%s", err, out)
	}
	m := regexp.MustCompile(`Overall exposure level for sidecar\.service: ([0-9.]+)`).FindSubmatch(out)
	if m == nil {
		t.Fatalf("no overall exposure level in:\n%s", out)
	}
	level, err := strconv.ParseFloat(string(m[1]), 64)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("exposure level %.1f (at most %.1f)", level, maxUnitExposure)
	if level > maxUnitExposure {
		t.Errorf("systemd-analyze security rates the unit %.1f, want at most %.1f:\n%s", level, maxUnitExposure, out)
	}
}
