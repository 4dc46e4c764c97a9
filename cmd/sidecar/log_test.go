package main

import (
	"bytes"
	"encoding/json"
	"os"
	"path/filepath"
	"testing"

	"go.uber.org/zap"

	"github.com/sidecarlb/sidecar/config"
)

// TestAccessLogger: off builds none; stdout and a file get JSON lines, the
// file appended to.
func TestAccessLogger(t *testing.T) {
	if l, closeFn, err := newAccessLogger(config.Log{Access: config.AccessOff}, nil); l != nil || err != nil {
		t.Fatalf("newAccessLogger(off) = %v, %v; want nil, nil", l, err)
	} else {
		closeFn()
	}

	var out bytes.Buffer
	l, closeFn, err := newAccessLogger(config.Log{Access: "stdout"}, &out)
	if err != nil {
		t.Fatal(err)
	}
	l.Info("access", zap.Int("status", 200))
	closeFn()
	var line map[string]any
	if err := json.Unmarshal(out.Bytes(), &line); err != nil || line["status"] != float64(200) || line["msg"] != "access" {
		t.Errorf("stdout access line = %q (%v), want JSON with status 200", out.String(), err)
	}

	path := filepath.Join(t.TempDir(), "access.log")
	if err := os.WriteFile(path, []byte("{\"earlier\":1}\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	l, closeFn, err = newAccessLogger(config.Log{Access: path}, nil)
	if err != nil {
		t.Fatal(err)
	}
	l.Info("access", zap.String("path", "/x"))
	closeFn()
	data, _ := os.ReadFile(path)
	if lines := bytes.Split(bytes.TrimSpace(data), []byte("\n")); len(lines) != 2 || !bytes.Contains(lines[1], []byte(`"path":"/x"`)) {
		t.Errorf("access file = %q, want the earlier line and the new one", data)
	}

	if _, _, err := newAccessLogger(config.Log{Access: filepath.Join(t.TempDir(), "no", "such", "dir", "a.log")}, nil); err == nil {
		t.Error("newAccessLogger(a file in a missing directory) = nil error, want one")
	}
}
