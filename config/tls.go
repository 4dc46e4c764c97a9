package config

import "os"

// TLS says how to reach an upstream's nodes over TLS.
type TLS struct {
	// CAFile is a PEM bundle of the CAs that sign the nodes' certificates;
	// empty means the system roots.
	CAFile string `yaml:"ca_file"`
	// ServerName is checked against the nodes' certificates; empty means
	// the host of each node's address.
	ServerName string `yaml:"server_name"`
	// InsecureSkipVerify turns certificate checks off (testing only).
	InsecureSkipVerify bool `yaml:"insecure_skip_verify"`
}

// validateTLS checks t, read from path.
func (p *parser) validateTLS(path string, t *TLS) {
	if t == nil || t.CAFile == "" {
		return
	}
	if _, err := os.Stat(t.CAFile); err != nil {
		p.errorf(path+".ca_file", "%v", err)
	}
}
