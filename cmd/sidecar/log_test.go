package main

import (
	"bytes"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"go.uber.org/zap"

	"github.com/sidecarlb/sidecar/config"
)

// TestAccessLogger: off builds none; stdout and a file get JSON lines, the
// file appended to.
func TestAccessLogger(t *testing.T) {
	if l, closeFn, _, err := newAccessLogger(config.Log{Access: config.AccessOff}, nil); l != nil || err != nil {
		t.Fatalf("newAccessLogger(off) = %v, %v; want nil, nil", l, err)
	} else {
		closeFn()
	}

	var out bytes.Buffer
	l, closeFn, reopen, err := newAccessLogger(config.Log{Access: "stdout"}, &out)
	if err != nil {
		t.Fatal(err)
	}
	l.Info("access", zap.Int("status", 200))
	if err := reopen(); err != nil {
		t.Errorf("reopen of stdout = %v, want nil", err)
	}
	closeFn()
	var line map[string]any
	if err := json.Unmarshal(out.Bytes(), &line); err != nil || line["status"] != float64(200) || line["msg"] != "access" {
		t.Errorf("stdout access line = %q (%v), want JSON with status 200", out.String(), err)
	}

	path := filepath.Join(t.TempDir(), "access.log")
	if err := os.WriteFile(path, []byte("{\"earlier\":1}\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	l, closeFn, _, err = newAccessLogger(config.Log{Access: path}, nil)
	if err != nil {
		t.Fatal(err)
	}
	l.Info("access", zap.String("path", "/x"))
	closeFn()
	data, _ := os.ReadFile(path)
	if lines := bytes.Split(bytes.TrimSpace(data), []byte("\n")); len(lines) != 2 || !bytes.Contains(lines[1], []byte(`"path":"/x"`)) {
		t.Errorf("access file = %q, want the earlier line and the new one", data)
	}

	if _, _, _, err := newAccessLogger(config.Log{Access: filepath.Join(t.TempDir(), "no", "such", "dir", "a.log")}, nil); err == nil {
		t.Error("newAccessLogger(a file in a missing directory) = nil error, want one")
	}
}

// TestAccessLogReopen: after the file is moved away (logrotate), reopen
// starts a new file at the name; nothing written before or after is lost.
func TestAccessLogReopen(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "access.log")
	l, closeFn, reopen, err := newAccessLogger(config.Log{Access: path}, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer closeFn()
	l.Info("access", zap.Int("n", 1))
	if err := os.Rename(path, path+".1"); err != nil {
		t.Fatal(err)
	}
	l.Info("access", zap.Int("n", 2)) // still the moved file
	if err := reopen(); err != nil {
		t.Fatal(err)
	}
	l.Info("access", zap.Int("n", 3))
	for file, want := range map[string]string{path + ".1": `"n":1` + "\n" + `"n":2`, path: `"n":3`} {
		data, _ := os.ReadFile(file)
		var got []string
		for _, line := range bytes.Split(bytes.TrimSpace(data), []byte("\n")) {
			var m map[string]any
			if json.Unmarshal(line, &m) == nil {
				got = append(got, fmt.Sprintf(`"n":%v`, m["n"]))
			}
		}
		if strings.Join(got, "\n") != want {
			t.Errorf("%s holds %q, want %q", filepath.Base(file), got, want)
		}
	}
	// A name that cannot be opened again keeps the old file in use.
	if err := os.Rename(dir, dir+".gone"); err != nil {
		t.Fatal(err)
	}
	defer os.Rename(dir+".gone", dir)
	if err := reopen(); err == nil {
		t.Error("reopen in a missing directory = nil error, want one")
	}
	l.Info("access", zap.Int("n", 4))
	data, _ := os.ReadFile(filepath.Join(dir+".gone", "access.log"))
	if !bytes.Contains(data, []byte(`"n":4`)) {
		t.Errorf("after a failed reopen the line went elsewhere: %q", data)
	}
}
