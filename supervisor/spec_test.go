package supervisor

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

func TestNewErrors(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	file := filepath.Join(dir, "file")
	if err := os.WriteFile(file, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name string
		spec Spec
		want string
	}{
		{"no command", Spec{}, "command: required"},
		{"unknown policy", Spec{Command: helper, Restart: "sometimes"}, `restart: unknown policy "sometimes"`},
		{"missing command", Spec{Command: filepath.Join(dir, "nope")}, "command: stat " + filepath.Join(dir, "nope") + ": no such file or directory"},
		{"not executable", Spec{Command: file}, "is not executable"},
		{"relative to dir", Spec{Command: "./nope", Dir: dir}, "command: stat " + filepath.Join(dir, "nope")},
		{"missing chroot", Spec{Command: "/app", Chroot: filepath.Join(dir, "root")}, "chroot: stat " + filepath.Join(dir, "root") + ": no such file or directory"},
		{"chroot is a file", Spec{Command: "/app", Chroot: file}, "is not a directory"},
		{"chroot relative command", Spec{Command: "app", Chroot: dir}, "command: with chroot, must be an absolute path inside"},
		{"chroot missing command", Spec{Command: "/app", Chroot: dir}, "command: /app inside chroot " + dir},
		{"unknown user", Spec{Command: helper, User: "no-such-user-xyz"}, "user: user: unknown user no-such-user-xyz"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			_, err := New(tc.spec, &fakeHealth{}, Options{}, nil)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Errorf("New() error = %v, want it to contain %q", err, tc.want)
			}
		})
	}
}

func TestChrootNeedsRoot(t *testing.T) {
	t.Parallel()
	if os.Geteuid() == 0 {
		// As root, run the check the way a non-root sidecar would see it.
		out, err := runAsNobody(t, "-test.run=^TestChrootNeedsRoot$")
		if err != nil {
			t.Fatalf("as nobody: %v\n%s", err, out)
		}
		if !strings.Contains(out, "chroot: needs root, but the sidecar runs as uid") {
			t.Errorf("as nobody, output = %q, want the needs-root error", out)
		}
		return
	}
	_, err := New(Spec{Command: "/app", Chroot: t.TempDir()}, &fakeHealth{}, Options{}, nil)
	if err == nil || !strings.Contains(err.Error(), "chroot: needs root, but the sidecar runs as uid") {
		t.Fatalf("New() error = %v, want the needs-root error", err)
	}
	t.Log(err) // read by the root run of this test
}

// runAsNobody runs this test binary as user nobody with args and -test.v.
func runAsNobody(t *testing.T, args ...string) (string, error) {
	t.Helper()
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	cred, err := lookupUser("nobody")
	if err != nil {
		t.Skipf("no user nobody: %v", err)
	}
	// The test binary must be reachable by nobody.
	dir, err := os.MkdirTemp("", "supervisor-nobody-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	_ = os.Chmod(dir, 0o755)
	bin := filepath.Join(dir, "supervisor.test")
	copyFile(t, self, bin)
	spec := Spec{Command: bin, Args: append([]string{"-test.v"}, args...), Dir: dir, User: "nobody",
		Env: []string{"SUPERVISOR_TEST_NO_HELPER=1"}, Restart: RestartNever}
	h := newHarness(t, spec, Options{})
	if h.app.cred.Uid != cred.Uid {
		t.Fatalf("cred uid = %d, want %d", h.app.cred.Uid, cred.Uid)
	}
	h.run()
	st := h.waitState(StateExited, 20*time.Second)
	if st.LastExit != "exit status 0" {
		return h.out.String(), &exitError{st.LastExit + " " + st.Reason}
	}
	return h.out.String(), nil
}

// copyFile copies an executable with cp: a file this process wrote could be
// held open by a child forked meanwhile and fail to run ("text file busy").
func copyFile(t *testing.T, from, to string) {
	t.Helper()
	if out, err := exec.Command("cp", from, to).CombinedOutput(); err != nil {
		t.Fatalf("cp %s %s: %v\n%s", from, to, err, out)
	}
}

type exitError struct{ s string }

func (e *exitError) Error() string { return e.s }

// TestChroot runs the static helper inside a root holding only itself.
func TestChroot(t *testing.T) {
	t.Parallel()
	if os.Geteuid() != 0 {
		t.Skip("chroot needs root")
	}
	root := t.TempDir()
	if err := os.MkdirAll(filepath.Join(root, "bin"), 0o755); err != nil {
		t.Fatal(err)
	}
	copyFile(t, helper, filepath.Join(root, "bin", "app"))
	h := newHarness(t, Spec{Command: "/bin/app", Args: []string{"-starts", "/started", "-exit", "0"}, Chroot: root, Restart: RestartNever}, Options{})
	h.run()
	if st := h.waitState(StateExited, 5*time.Second); st.LastExit != "exit status 0" {
		t.Fatalf("app in chroot: %+v", st)
	}
	if _, err := os.Stat(filepath.Join(root, "started")); err != nil {
		t.Errorf("the app did not write /started inside the chroot: %v", err)
	}
}

func TestUser(t *testing.T) {
	t.Parallel()
	if os.Geteuid() != 0 {
		t.Skip("running as another user needs root")
	}
	cred, err := lookupUser("nobody")
	if err != nil {
		t.Skipf("no user nobody: %v", err)
	}
	h := newHarness(t, Spec{Command: helper, Args: []string{"-uid", "-exit", "0"}, User: "nobody", Restart: RestartNever}, Options{})
	h.run()
	h.waitState(StateExited, 5*time.Second)
	if want := fmt.Sprintf("uid %d gid %d", cred.Uid, cred.Gid); !strings.Contains(h.out.String(), want) {
		t.Errorf("output = %q, want %q", h.out.String(), want)
	}
}

func TestLineWriter(t *testing.T) {
	t.Parallel()
	var out bytes.Buffer
	w := newLineWriter(&out, "[app] ")
	for _, s := range []string{"one\ntw", "o\n", "", "three\nfour"} {
		if n, err := w.Write([]byte(s)); n != len(s) || err != nil {
			t.Fatalf("Write(%q) = %d, %v", s, n, err)
		}
	}
	if got, want := out.String(), "[app] one\n[app] two\n[app] three\n"; got != want {
		t.Errorf("before Flush: %q, want %q", got, want)
	}
	w.Flush()
	w.Flush()
	if got, want := out.String(), "[app] one\n[app] two\n[app] three\n[app] four\n"; got != want {
		t.Errorf("after Flush: %q, want %q", got, want)
	}
	out.Reset()
	_, _ = w.Write(bytes.Repeat([]byte("x"), maxLine+10))
	if got := out.Len(); got != len("[app] ")+maxLine+10+1 {
		t.Errorf("long line: wrote %d bytes, want it all as one line", got)
	}
}

func TestFormatBytes(t *testing.T) {
	t.Parallel()
	tests := []struct {
		n    int64
		want string
	}{
		{0, "0B"}, {1023, "1023B"}, {1024, "1KiB"}, {1536, "1.5KiB"},
		{256 << 20, "256MiB"}, {3 << 30, "3GiB"}, {5 << 40, "5TiB"},
	}
	for _, tc := range tests {
		if got := FormatBytes(tc.n); got != tc.want {
			t.Errorf("FormatBytes(%d) = %q, want %q", tc.n, got, tc.want)
		}
	}
}

func TestRoutes(t *testing.T) {
	t.Parallel()
	h := start(t, Spec{Build: "echo broken; exit 1"}, Options{}, "-say", "up")
	st := h.waitState(StateRunning, 5*time.Second)
	mux := http.NewServeMux()
	for p, hd := range h.app.Routes() {
		mux.Handle(p, hd)
	}
	srv := httptest.NewServer(mux)
	defer srv.Close()

	post := func(path string) (int, Result) {
		t.Helper()
		resp, err := http.Post(srv.URL+path, "", nil)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		var r Result
		b, _ := io.ReadAll(resp.Body)
		if err := json.Unmarshal(b, &r); err != nil {
			t.Fatalf("POST %s: %v in %s", path, err, b)
		}
		return resp.StatusCode, r
	}
	if code, r := post("/app/update"); code != http.StatusUnprocessableEntity || r.OK || r.BuildOutput != "broken\n" || r.App.PID != st.PID {
		t.Errorf("POST /app/update = %d %+v, want 422 with the build output and the app untouched", code, r)
	}
	code, r := post("/app/restart")
	if code != http.StatusOK || !r.OK || r.PreviousPID != st.PID || r.App.PID == st.PID || r.App.PID == 0 {
		t.Errorf("POST /app/restart = %d %+v, want 200 with a new pid", code, r)
	}
	resp, err := http.Get(srv.URL + "/app")
	if err != nil {
		t.Fatal(err)
	}
	var got Status
	_ = json.NewDecoder(resp.Body).Decode(&got)
	resp.Body.Close()
	if got.PID != r.App.PID || got.State != StateRunning {
		t.Errorf("GET /app = %+v, want running pid %d", got, r.App.PID)
	}
	if code, r := post("/app/kill"); code != http.StatusOK || r.App.State != StateKilled {
		t.Errorf("POST /app/kill = %d %+v, want 200 killed", code, r)
	}
}
