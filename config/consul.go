package config

import (
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"os"
	"regexp"
	"strconv"
	"strings"
)

// ConsulTLS says how the sidecar reaches the agent over HTTPS: the CAs it
// trusts, the client certificate it shows (for an agent with
// verify_incoming), and the name it checks. The fields are consul/api's
// TLSConfig, under the names of Consul's own agent configuration.
type ConsulTLS struct {
	// CAFile is a PEM bundle of the CAs that sign the agent's certificate;
	// CAPath a directory of them. Both empty means the system roots.
	CAFile string `yaml:"ca_file"`
	CAPath string `yaml:"ca_path"`
	// CertFile and KeyFile are the client certificate and its key, both or
	// neither.
	CertFile string `yaml:"cert_file"`
	KeyFile  string `yaml:"key_file"`
	// ServerName is checked against the agent's certificate; empty means
	// the host of consul.address.
	ServerName string `yaml:"server_name"`
	// InsecureSkipVerify turns the certificate check off (testing only).
	InsecureSkipVerify bool `yaml:"insecure_skip_verify"`
}

// ConsulEnv lists every CONSUL_* variable the sidecar honours, each with
// the key it fills when the file leaves that key unset. CONSUL_HTTP_AUTH
// has no key: consul/api reads it itself (HTTP basic auth, "user:pass").
var ConsulEnv = []struct{ Name, Key string }{
	{"CONSUL_HTTP_ADDR", "consul.address"},
	{"CONSUL_HTTP_SSL", "consul.address (true: a bare host:port is https)"},
	{"CONSUL_HTTP_TOKEN", "consul.token"},
	{"CONSUL_HTTP_TOKEN_FILE", "consul.token_file"},
	{"CONSUL_HTTP_AUTH", "none (read by consul/api)"},
	{"CONSUL_CACERT", "consul.tls.ca_file"},
	{"CONSUL_CAPATH", "consul.tls.ca_path"},
	{"CONSUL_CLIENT_CERT", "consul.tls.cert_file"},
	{"CONSUL_CLIENT_KEY", "consul.tls.key_file"},
	{"CONSUL_TLS_SERVER_NAME", "consul.tls.server_name"},
	{"CONSUL_HTTP_SSL_VERIFY", "consul.tls.insecure_skip_verify (false: true)"},
	{"CONSUL_NAMESPACE", "consul.namespace"},
	{"CONSUL_PARTITION", "consul.partition"},
}

// consulName is Consul Enterprise's rule for namespace and partition names.
var consulName = regexp.MustCompile(`^[a-zA-Z0-9]([a-zA-Z0-9_-]{0,62}[a-zA-Z0-9])?$`)

// resolveConsul fills what the file left unset under consul from the
// CONSUL_* variables consul/api reads, as consul/api does (a key set in the
// file wins; a variable fills only what the file leaves empty), then checks
// the result. from says where consul.address came from, for messages.
func (p *parser) resolveConsul(c *Consul, getenv func(string) string, from string) {
	fileTLS := c.TLS != ConsulTLS{}
	origin := p.consulFromEnv(c, getenv)
	scheme, rest, _ := strings.Cut(c.Address, "://")
	if rest == "" {
		scheme = "http"
	}
	if fileTLS && scheme != "https" {
		p.errorf("consul.tls", "set, but consul.address %q%s is not https://, so it would not be used", c.Address, from)
	}
	p.checkConsulToken(c, origin)
	p.checkConsulTLS(&c.TLS, origin)
}

// consulOrigin maps a key path to the environment variable that filled it.
type consulOrigin map[string]string

// note says where the value at path came from, for an error message: ""
// when from the file.
func (o consulOrigin) note(path string) string {
	if name := o[path]; name != "" {
		return " (from " + name + ")"
	}
	return ""
}

// consulFromEnv fills the consul keys the file leaves empty from consul/api's
// environment variables, as consul/api would, and returns which variable
// filled which key.
func (p *parser) consulFromEnv(c *Consul, getenv func(string) string) consulOrigin {
	origin := consulOrigin{}
	fill := func(path string, v *string, name string) {
		if *v == "" {
			if *v = getenv(name); *v != "" {
				origin[path] = name
			}
		}
	}
	envBool := func(path, name string) (val, set bool) {
		s := getenv(name)
		if s == "" {
			return false, false
		}
		b, err := strconv.ParseBool(s)
		if err != nil {
			p.errorf(path, "%s=%q is not true or false", name, s)
			return false, false
		}
		return b, true
	}

	// Token: consul/api prefers CONSUL_HTTP_TOKEN_FILE to CONSUL_HTTP_TOKEN.
	if c.Token == "" && c.TokenFile == "" {
		fill("consul.token_file", &c.TokenFile, "CONSUL_HTTP_TOKEN_FILE")
		if c.TokenFile == "" {
			c.Token = getenv("CONSUL_HTTP_TOKEN")
		}
	}
	fill("consul.namespace", &c.Namespace, "CONSUL_NAMESPACE")
	fill("consul.partition", &c.Partition, "CONSUL_PARTITION")
	fill("consul.tls.ca_file", &c.TLS.CAFile, "CONSUL_CACERT")
	fill("consul.tls.ca_path", &c.TLS.CAPath, "CONSUL_CAPATH")
	fill("consul.tls.cert_file", &c.TLS.CertFile, "CONSUL_CLIENT_CERT")
	fill("consul.tls.key_file", &c.TLS.KeyFile, "CONSUL_CLIENT_KEY")
	fill("consul.tls.server_name", &c.TLS.ServerName, "CONSUL_TLS_SERVER_NAME")
	if !p.present("consul.tls.insecure_skip_verify") {
		if verify, set := envBool("consul.tls.insecure_skip_verify", "CONSUL_HTTP_SSL_VERIFY"); set && !verify {
			c.TLS.InsecureSkipVerify = true
		}
	}
	if ssl, _ := envBool("consul.address", "CONSUL_HTTP_SSL"); ssl && !strings.Contains(c.Address, "://") {
		c.Address = "https://" + c.Address
	}
	return origin
}

// checkConsulToken checks consul.token, consul.token_file, consul.namespace
// and consul.partition.
func (p *parser) checkConsulToken(c *Consul, origin consulOrigin) {
	if c.Token != "" && c.TokenFile != "" {
		p.errorf("consul.token_file", "set together with consul.token; give one of them")
	}
	if c.TokenFile != "" {
		switch data, err := os.ReadFile(c.TokenFile); {
		case err != nil:
			p.errorf("consul.token_file", "%v%s", err, origin.note("consul.token_file"))
		case strings.TrimSpace(string(data)) == "":
			p.errorf("consul.token_file", "%s is empty%s", c.TokenFile, origin.note("consul.token_file"))
		}
	}
	for _, k := range []struct{ path, v string }{{"consul.namespace", c.Namespace}, {"consul.partition", c.Partition}} {
		if k.v != "" && !consulName.MatchString(k.v) {
			p.errorf(k.path, "invalid name %q%s: 1-64 letters, digits, '-' and '_', starting and ending with a letter or digit", k.v, origin.note(k.path))
		}
	}
}

// checkConsulTLS checks that the files consul.tls names can be read and
// hold what they should.
func (p *parser) checkConsulTLS(t *ConsulTLS, origin consulOrigin) {
	note := origin.note
	if t.CAFile != "" {
		switch pem, err := os.ReadFile(t.CAFile); {
		case err != nil:
			p.errorf("consul.tls.ca_file", "%v%s", err, note("consul.tls.ca_file"))
		case !x509.NewCertPool().AppendCertsFromPEM(pem):
			p.errorf("consul.tls.ca_file", "%s holds no PEM certificate%s", t.CAFile, note("consul.tls.ca_file"))
		}
	}
	if t.CAPath != "" {
		if _, err := os.ReadDir(t.CAPath); err != nil {
			p.errorf("consul.tls.ca_path", "%v%s", err, note("consul.tls.ca_path"))
		}
	}
	certErr, keyErr := readable(t.CertFile), readable(t.KeyFile)
	if certErr != nil {
		p.errorf("consul.tls.cert_file", "%v%s", certErr, note("consul.tls.cert_file"))
	}
	if keyErr != nil {
		p.errorf("consul.tls.key_file", "%v%s", keyErr, note("consul.tls.key_file"))
	}
	switch {
	case t.CertFile != "" && t.KeyFile == "":
		p.errorf("consul.tls.key_file", "required with consul.tls.cert_file%s (the client certificate's key)", note("consul.tls.cert_file"))
	case t.KeyFile != "" && t.CertFile == "":
		p.errorf("consul.tls.cert_file", "required with consul.tls.key_file%s (the client certificate)", note("consul.tls.key_file"))
	case t.CertFile != "" && certErr == nil && keyErr == nil:
		if _, err := tls.LoadX509KeyPair(t.CertFile, t.KeyFile); err != nil {
			p.errorf("consul.tls.cert_file", "with consul.tls.key_file: %v", err)
		}
	}
	if strings.ContainsAny(t.ServerName, " \t\r\n/") {
		p.errorf("consul.tls.server_name", "%q is not a host name%s", t.ServerName, note("consul.tls.server_name"))
	}
}

// readable returns nil for "" or a file that can be read, else the error.
func readable(path string) error {
	if path == "" {
		return nil
	}
	f, err := os.Open(path)
	if err != nil {
		return err
	}
	defer f.Close()
	if fi, err := f.Stat(); err == nil && fi.IsDir() {
		return fmt.Errorf("%s is a directory, want a file", path)
	}
	return nil
}
