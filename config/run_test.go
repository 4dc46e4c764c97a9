package config

import (
	"os"
	"reflect"
	"strings"
	"testing"
	"time"
)

func TestRunDefaults(t *testing.T) {
	t.Parallel()
	c, err := ParseEnv([]byte("service: {name: web, port: 9001, run: {command: ./app}}"), "test.yaml", nil)
	if err != nil {
		t.Fatal(err)
	}
	want := DefaultRun()
	want.Command = "./app"
	if got := c.Service.Run; !reflect.DeepEqual(got, want) {
		t.Errorf("Run = %+v, want %+v", got, want)
	}
	if want.Restart != "always" || want.Backoff != (Backoff{time.Second, 30 * time.Second}) ||
		want.CrashLoop != (CrashLoop{5, time.Minute}) || want.StopSignal != "SIGTERM" || want.StopTimeout != 10*time.Second {
		t.Errorf("DefaultRun() = %+v, want the documented defaults", want)
	}
	c, err = ParseEnv([]byte("service: {name: web, port: 9001}"), "test.yaml", nil)
	if err != nil || c.Service.Run != nil {
		t.Errorf("without a run block: Run = %+v, %v; want nil", c.Service.Run, err)
	}
}

func TestRunFull(t *testing.T) {
	t.Parallel()
	c, err := ParseEnv([]byte(`
service:
  name: web
  port: 9001
  run:
    command: /srv/app
    args: [-listen, "127.0.0.1:9001"]
    env: {DB: "${DB_HOST}:5432", HOME_DIR: $HOME, PRICE: "$$5", EMPTY: "${NOPE}", N: 2}
    dir: /srv
    restart: on-failure
    backoff: {min: 500ms, max: 10s}
    crash_loop: {restarts: 3, window: 30s}
    memory_limit: 256MiB
    stop_signal: int
    stop_timeout: 5s
    chroot: /var/jail
    user: app
    build: go build -o app .
    output: /var/log/app.log
`), "test.yaml", env(map[string]string{"DB_HOST": "db.local", "HOME": "/home/app"}))
	if err != nil {
		t.Fatal(err)
	}
	want := &Run{
		Command: "/srv/app", Args: []string{"-listen", "127.0.0.1:9001"},
		Env: map[string]string{"DB": "db.local:5432", "HOME_DIR": "/home/app", "PRICE": "$5", "EMPTY": "", "N": "2"},
		Dir: "/srv", Restart: "on-failure",
		Backoff:     Backoff{500 * time.Millisecond, 10 * time.Second},
		CrashLoop:   CrashLoop{3, 30 * time.Second},
		MemoryLimit: "256MiB", MemoryLimitBytes: 256 << 20,
		StopSignal: "SIGINT", StopTimeout: 5 * time.Second,
		Chroot: "/var/jail", User: "app", Build: "go build -o app .", Output: "/var/log/app.log",
	}
	if got := c.Service.Run; !reflect.DeepEqual(got, want) {
		t.Errorf("Run =\n%+v\nwant\n%+v", got, want)
	}
}

func TestRunErrors(t *testing.T) {
	t.Parallel()
	tests := []struct{ run, want string }{
		{"{command: ''}", "service.run.command: must not be empty"},
		{"{command: a, restart: sometimes}", `service.run.restart: unknown "sometimes" (want always, on-failure or never)`},
		{"{command: a, backoff: {min: 0s}}", "service.run.backoff.min: must be greater than 0"},
		{"{command: a, backoff: {min: 2s, max: 1s}}", "service.run.backoff.max: must be at least backoff.min (2s), got 1s"},
		{"{command: a, crash_loop: {restarts: -1}}", "service.run.crash_loop.restarts: must be at least 0"},
		{"{command: a, crash_loop: {window: 0s}}", "service.run.crash_loop.window: must be greater than 0"},
		{"{command: a, memory_limit: 12 parsecs}", `service.run.memory_limit: unknown unit in "12 parsecs"`},
		{"{command: a, memory_limit: lots}", `service.run.memory_limit: invalid size "lots"`},
		{"{command: a, memory_limit: 1000}", `service.run.memory_limit: must be at least 1MiB, got "1000"`},
		{"{command: a, stop_signal: SIGSTOP}", `service.run.stop_signal: unknown signal "SIGSTOP"`},
		{"{command: a, stop_timeout: 0s}", "service.run.stop_timeout: must be greater than 0"},
		{"{command: a, stop_timeout: 5}", `service.run.stop_timeout: duration 5 has no unit`},
		{"{command: /a, chroot: jail}", `service.run.chroot: must be an absolute path, got "jail"`},
		{"{command: ./a, chroot: /jail}", `service.run.command: must be an absolute path inside the chroot, got "./a"`},
		{"{command: /a, chroot: /jail, dir: srv}", `service.run.dir: must be an absolute path inside the chroot, got "srv"`},
		{"{command: a, env: {1X: y}}", "service.run.env.1X: invalid variable name"},
		{"{command: a, env: {A-B: y}}", "service.run.env.A-B: invalid variable name"},
		{"{command: a, args: x}", "service.run.args: want a list"},
		{"{command: a, comand: b}", `service.run.comand: unknown key (did you mean "command"?)`},
		{"{command: a, crashloop: {}}", `service.run.crashloop: unknown key (did you mean "crash_loop"?)`},
	}
	for _, tc := range tests {
		t.Run(tc.want, func(t *testing.T) {
			yaml := "service: {name: web, port: 9001, run: " + tc.run + "}"
			_, err := ParseEnv([]byte(yaml), "test.yaml", nil)
			if err == nil || !strings.Contains(err.Error(), "test.yaml: "+tc.want) {
				t.Fatalf("Parse(%q) error = %v, want it to contain %q", yaml, err, tc.want)
			}
		})
	}
}

func TestParseBytes(t *testing.T) {
	t.Parallel()
	tests := []struct {
		in   string
		want int64
		ok   bool
	}{
		{"", 0, true}, {"0", 0, true}, {"1048576", 1 << 20, true}, {"512B", 512, true},
		{"256MiB", 256 << 20, true}, {"512M", 512 << 20, true}, {"512m", 512 << 20, true},
		{"1G", 1 << 30, true}, {"1GiB", 1 << 30, true}, {"1GB", 1e9, true}, {"1.5 GiB", 3 << 29, true},
		{"2K", 2048, true}, {"2KB", 2000, true}, {"1T", 1 << 40, true}, {"1TB", 1e12, true},
		{"-1M", 0, false}, {"M", 0, false}, {"1 parsec", 0, false}, {"1..2M", 0, false}, {"1e30T", 0, false},
	}
	for _, tc := range tests {
		got, err := ParseBytes(tc.in)
		if got != tc.want || (err == nil) != tc.ok {
			t.Errorf("ParseBytes(%q) = %d, %v; want %d, ok=%v", tc.in, got, err, tc.want, tc.ok)
		}
	}
}

// TestExampleRunBlock uncomments the run block of the example file and
// loads it, so the example stays valid.
func TestExampleRunBlock(t *testing.T) {
	t.Parallel()
	data, err := os.ReadFile("../config.yaml")
	if err != nil {
		t.Fatal(err)
	}
	var lines []string
	in := false
	for _, l := range strings.Split(string(data), "\n") {
		switch {
		case l == "  # run:":
			in = true
			l = "  run:"
		case in && strings.HasPrefix(l, "  #   "):
			l = "  " + l[len("  # "):]
		default:
			in = false
		}
		lines = append(lines, l)
	}
	c, err := ParseEnv([]byte(strings.Join(lines, "\n")), "config.yaml", env(map[string]string{"DB_URL": "postgres://db"}))
	if err != nil {
		t.Fatalf("example with the run block uncommented:\n%v", err)
	}
	r := c.Service.Run
	if r == nil || r.Command != "./echo" || r.MemoryLimitBytes != 256<<20 || r.Env["DB_URL"] != "postgres://db" || r.Build == "" {
		t.Errorf("Run = %+v, want the example's run block", r)
	}
}
