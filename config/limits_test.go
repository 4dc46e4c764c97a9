package config

import "testing"

// TestLimitsMemory: limits.memory is a size, resolved to bytes; empty means
// none; a bad size or one below 16MiB is refused with the key's full path.
func TestLimitsMemory(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name, yaml string
		want       int64
		err        string
	}{
		{name: "unset", yaml: "", want: 0},
		{name: "MiB", yaml: "limits: {memory: 96MiB}", want: 96 << 20},
		{name: "bytes", yaml: "limits: {memory: '67108864'}", want: 64 << 20},
		{name: "bad unit", yaml: "limits: {memory: 64XB}",
			err: `config.yaml: limits.memory: unknown unit in "64XB" (want e.g. 512MiB, 512M, 1GB or a number of bytes)`},
		{name: "too small", yaml: "limits: {memory: 1MiB}", err: `config.yaml: limits.memory: "1MiB" is below the least of 16MiB`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			c, err := ParseEnv([]byte(tc.yaml), "config.yaml", nil)
			if tc.err != "" {
				if err == nil || err.Error() != tc.err {
					t.Fatalf("ParseEnv() error = %v, want %s", err, tc.err)
				}
				return
			}
			if err != nil {
				t.Fatalf("ParseEnv() error = %v", err)
			}
			if c.Limits.MemoryN != tc.want {
				t.Errorf("Limits.MemoryN = %d, want %d", c.Limits.MemoryN, tc.want)
			}
		})
	}
}

// TestLimitsMemoryReload: a changed limits.memory is reported as needing a
// restart, and the running value is kept.
func TestLimitsMemoryReload(t *testing.T) {
	t.Parallel()
	running, err := ParseEnv([]byte("limits: {memory: 96MiB}"), "config.yaml", nil)
	if err != nil {
		t.Fatal(err)
	}
	next, err := ParseEnv([]byte("limits: {memory: 128MiB}"), "config.yaml", nil)
	if err != nil {
		t.Fatal(err)
	}
	r := NewReload(running, next)
	if len(r.Restart) != 1 || r.Restart[0] != "limits.memory" || len(r.Live) != 0 {
		t.Errorf("NewReload() Restart = %v, Live = %v, want [limits.memory], []", r.Restart, r.Live)
	}
	if r.Effective.Limits.MemoryN != 96<<20 {
		t.Errorf("Effective.Limits.MemoryN = %d, want the running 96MiB", r.Effective.Limits.MemoryN)
	}
}
