package config

import (
	"strings"
	"testing"
)

// TestAdminExposure: an admin listener reachable beyond this host needs
// admin.token, or admin.insecure to say it is meant.
func TestAdminExposure(t *testing.T) {
	t.Parallel()
	const refused = `config.yaml: admin.listen: "0.0.0.0:15100" is not a loopback address and admin.token is empty: ...`
	tests := []struct {
		name    string
		admin   string
		refused bool
	}{
		{"default", "{}", false},
		{"loopback v4", "{listen: '127.0.0.1:15100'}", false},
		{"loopback v4 range", "{listen: '127.0.0.2:15100'}", false},
		{"loopback v6", "{listen: '[::1]:15100'}", false},
		{"localhost", "{listen: 'localhost:15100'}", false},
		{"all v4", "{listen: '0.0.0.0:15100'}", true},
		{"all v6", "{listen: '[::]:15100'}", true},
		{"private ip", "{listen: '10.0.0.5:15100'}", true},
		{"hostname", "{listen: 'node1.example.com:15100'}", true},
		{"v4-mapped non-loopback", "{listen: '[::ffff:10.0.0.5]:15100'}", true},
		{"all with token", "{listen: '0.0.0.0:15100', token: s3cret}", false},
		{"all insecure", "{listen: '0.0.0.0:15100', insecure: true}", false},
		{"all insecure false", "{listen: '0.0.0.0:15100', insecure: false}", true},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			c, err := ParseEnv([]byte("admin: "+tc.admin+"\n"), "config.yaml", env(nil))
			if !tc.refused {
				if err != nil {
					t.Fatalf("ParseEnv(admin: %s) error:\n%v\nwant none", tc.admin, err)
				}
				return
			}
			if err == nil {
				t.Fatalf("ParseEnv(admin: %s) = %+v, want an error naming admin.listen", tc.admin, c.Admin)
			}
			if got := err.Error(); !strings.HasPrefix(got, "config.yaml: admin.listen: ") || !strings.Contains(got, "admin.insecure") || strings.Contains(got, "\n") {
				t.Errorf("ParseEnv(admin: %s) error:\n%s\nwant one line like %s", tc.admin, got, refused)
			}
		})
	}
}
