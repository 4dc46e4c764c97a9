package config

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"math/big"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// consulFiles writes a self-signed certificate, its key, a token file, an
// empty file and a CA directory into a temporary folder.
type consulFiles struct {
	dir, cert, key, token, empty, caDir, otherKey string
}

func newConsulFiles(t *testing.T) consulFiles {
	t.Helper()
	dir := t.TempDir()
	f := consulFiles{
		dir: dir, cert: filepath.Join(dir, "cert.pem"), key: filepath.Join(dir, "key.pem"),
		token: filepath.Join(dir, "token"), empty: filepath.Join(dir, "empty"),
		caDir: filepath.Join(dir, "cas"), otherKey: filepath.Join(dir, "other-key.pem"),
	}
	writeKey := func(path string) *ecdsa.PrivateKey {
		k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		if err != nil {
			t.Fatal(err)
		}
		der, err := x509.MarshalECPrivateKey(k)
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(path, pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: der}), 0o600); err != nil {
			t.Fatal(err)
		}
		return k
	}
	k := writeKey(f.key)
	writeKey(f.otherKey)
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "test"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour), IsCA: true, BasicConstraintsValid: true}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &k.PublicKey, k)
	if err != nil {
		t.Fatal(err)
	}
	for path, data := range map[string]string{
		f.cert:  string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})),
		f.token: "  3f6a2a44-token\n",
		f.empty: "\n",
	} {
		if err := os.WriteFile(path, []byte(data), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.Mkdir(f.caDir, 0o700); err != nil {
		t.Fatal(err)
	}
	return f
}

// TestConsulKeys: every consul key the file sets reaches the config as
// written; the environment fills only what the file leaves unset.
func TestConsulKeys(t *testing.T) {
	t.Parallel()
	f := newConsulFiles(t)
	allEnv := map[string]string{
		"CONSUL_HTTP_ADDR": "10.9.9.9:8500", "CONSUL_HTTP_SSL": "true", "CONSUL_HTTP_TOKEN": "env-token",
		"CONSUL_HTTP_TOKEN_FILE": f.token, "CONSUL_CACERT": f.cert, "CONSUL_CAPATH": f.caDir,
		"CONSUL_CLIENT_CERT": f.cert, "CONSUL_CLIENT_KEY": f.key, "CONSUL_TLS_SERVER_NAME": "consul.env",
		"CONSUL_HTTP_SSL_VERIFY": "false", "CONSUL_NAMESPACE": "env-ns", "CONSUL_PARTITION": "env-part",
	}
	tests := []struct {
		name string
		yaml string
		env  map[string]string
		want Consul
	}{
		{
			name: "file sets every key",
			yaml: `consul:
  address: https://consul.local:8501
  token_file: ` + f.token + `
  namespace: team-a
  partition: part-1
  tls: {ca_file: ` + f.cert + `, ca_path: ` + f.caDir + `, cert_file: ` + f.cert + `, key_file: ` + f.key + `, server_name: consul.local, insecure_skip_verify: false}
`,
			env: allEnv,
			want: Consul{Address: "https://consul.local:8501", TokenFile: f.token, Namespace: "team-a", Partition: "part-1",
				TLS: ConsulTLS{CAFile: f.cert, CAPath: f.caDir, CertFile: f.cert, KeyFile: f.key, ServerName: "consul.local"}},
		},
		{
			name: "environment fills an empty file",
			env:  allEnv,
			want: Consul{Address: "https://10.9.9.9:8500", TokenFile: f.token, Namespace: "env-ns", Partition: "env-part",
				TLS: ConsulTLS{CAFile: f.cert, CAPath: f.caDir, CertFile: f.cert, KeyFile: f.key, ServerName: "consul.env", InsecureSkipVerify: true}},
		},
		{
			name: "a token in the file keeps the token file of the environment out",
			yaml: "consul: {token: mine}",
			env:  map[string]string{"CONSUL_HTTP_TOKEN_FILE": f.token, "CONSUL_HTTP_TOKEN": "env-token"},
			want: Consul{Address: "127.0.0.1:8500", Token: "mine"},
		},
		{
			name: "a token file in the file keeps the token of the environment out",
			yaml: "consul: {token_file: " + f.token + "}",
			env:  map[string]string{"CONSUL_HTTP_TOKEN": "env-token"},
			want: Consul{Address: "127.0.0.1:8500", TokenFile: f.token},
		},
		{
			name: "env token without token file",
			env:  map[string]string{"CONSUL_HTTP_TOKEN": "env-token"},
			want: Consul{Address: "127.0.0.1:8500", Token: "env-token"},
		},
		{
			name: "an explicit http:// stays http with CONSUL_HTTP_SSL",
			yaml: "consul: {address: 'http://10.0.0.1:8500'}",
			env:  map[string]string{"CONSUL_HTTP_SSL": "true"},
			want: Consul{Address: "http://10.0.0.1:8500"},
		},
		{
			name: "unix socket",
			yaml: "consul: {address: 'unix:///var/run/consul/consul.sock'}",
			want: Consul{Address: "unix:///var/run/consul/consul.sock"},
		},
		{
			name: "a unix socket stays plain with CONSUL_HTTP_SSL and CONSUL_CACERT",
			yaml: "consul: {address: 'unix:///run/consul.sock'}",
			env:  map[string]string{"CONSUL_HTTP_SSL": "true", "CONSUL_CACERT": f.cert},
			want: Consul{Address: "unix:///run/consul.sock", TLS: ConsulTLS{CAFile: f.cert}},
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			c, err := ParseEnv([]byte(tc.yaml), "config.yaml", env(tc.env))
			if err != nil {
				t.Fatalf("ParseEnv() error:\n%v", err)
			}
			if c.Consul != tc.want {
				t.Errorf("Consul = %+v\nwant %+v", c.Consul, tc.want)
			}
		})
	}
}

// TestConsulErrors: each bad consul key is named, with the variable it
// came from when the environment set it.
func TestConsulErrors(t *testing.T) {
	t.Parallel()
	f := newConsulFiles(t)
	missing := filepath.Join(f.dir, "missing.pem")
	tests := []struct {
		name string
		yaml string
		env  map[string]string
		want []string
	}{
		{
			name: "token and token file both",
			yaml: "consul: {token: abc, token_file: " + f.token + "}",
			want: []string{"consul.token_file: set together with consul.token; give one of them"},
		},
		{
			name: "missing and empty token files",
			yaml: "consul: {token_file: " + missing + "}",
			want: []string{"consul.token_file: open " + missing + ": no such file or directory"},
		},
		{
			name: "empty token file from the environment",
			env:  map[string]string{"CONSUL_HTTP_TOKEN_FILE": f.empty},
			want: []string{"consul.token_file: " + f.empty + " is empty (from CONSUL_HTTP_TOKEN_FILE)"},
		},
		{
			name: "cert without key",
			yaml: "consul: {address: 'https://c:8501', tls: {cert_file: " + f.cert + "}}",
			want: []string{"consul.tls.key_file: required with consul.tls.cert_file (the client certificate's key)"},
		},
		{
			name: "key without cert from the environment",
			yaml: "consul: {address: 'https://c:8501'}",
			env:  map[string]string{"CONSUL_CLIENT_KEY": f.key},
			want: []string{"consul.tls.cert_file: required with consul.tls.key_file (from CONSUL_CLIENT_KEY) (the client certificate)"},
		},
		{
			name: "cert and key that do not match",
			yaml: "consul: {address: 'https://c:8501', tls: {cert_file: " + f.cert + ", key_file: " + f.otherKey + "}}",
			want: []string{"consul.tls.cert_file: with consul.tls.key_file: tls: private key does not match public key"},
		},
		{
			name: "unreadable tls files",
			yaml: "consul: {address: 'https://c:8501', tls: {ca_file: " + missing + ", ca_path: " + missing + ", cert_file: " + missing + ", key_file: " + f.dir + "}}",
			want: []string{
				"consul.tls.ca_file: open " + missing + ": no such file or directory",
				"consul.tls.ca_path: open " + missing + ": no such file or directory",
				"consul.tls.cert_file: open " + missing + ": no such file or directory",
				"consul.tls.key_file: " + f.dir + " is a directory, want a file",
			},
		},
		{
			name: "ca file without a certificate",
			yaml: "consul: {address: 'https://c:8501', tls: {ca_file: " + f.key + "}}",
			want: []string{"consul.tls.ca_file: " + f.key + " holds no PEM certificate"},
		},
		{
			name: "tls in the file with a plain http address",
			yaml: "consul: {address: '10.0.0.1:8500', tls: {ca_file: " + f.cert + "}}",
			want: []string{`consul.tls: set, but consul.address "10.0.0.1:8500" is not https://, so it would not be used`},
		},
		{
			name: "tls in the file with an http address from the environment",
			yaml: "consul: {tls: {server_name: consul}}",
			env:  map[string]string{"CONSUL_HTTP_ADDR": "http://10.0.0.1:8500"},
			want: []string{`consul.tls: set, but consul.address "http://10.0.0.1:8500" (from CONSUL_HTTP_ADDR) is not https://, so it would not be used`},
		},
		{
			name: "bad booleans in the environment",
			env:  map[string]string{"CONSUL_HTTP_SSL": "yes please", "CONSUL_HTTP_SSL_VERIFY": "maybe"},
			want: []string{
				`consul.tls.insecure_skip_verify: CONSUL_HTTP_SSL_VERIFY="maybe" is not true or false`,
				`consul.address: CONSUL_HTTP_SSL="yes please" is not true or false`,
			},
		},
		{
			name: "bad namespace and partition",
			yaml: "consul: {namespace: 'team a'}",
			env:  map[string]string{"CONSUL_PARTITION": "-x"},
			want: []string{
				`consul.namespace: invalid name "team a": 1-64 letters, digits, '-' and '_', starting and ending with a letter or digit`,
				`consul.partition: invalid name "-x" (from CONSUL_PARTITION): 1-64 letters, digits, '-' and '_', starting and ending with a letter or digit`,
			},
		},
		{
			name: "bad server name",
			yaml: "consul: {address: 'https://c:8501', tls: {server_name: 'a/b'}}",
			want: []string{`consul.tls.server_name: "a/b" is not a host name`},
		},
		{
			name: "tls in the file with a unix socket",
			yaml: "consul: {address: 'unix:///run/consul.sock', tls: {ca_file: " + f.cert + "}}",
			env:  map[string]string{"CONSUL_HTTP_SSL": "true"},
			want: []string{`consul.tls: set, but consul.address "unix:///run/consul.sock" is not https://, so it would not be used`},
		},
		{
			name: "unix address without a path",
			yaml: "consul: {address: 'unix://'}",
			want: []string{`consul.address: want unix:///path/to/consul.sock, got "unix://"`},
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			c, err := ParseEnv([]byte(tc.yaml), "config.yaml", env(tc.env))
			if err == nil {
				t.Fatalf("ParseEnv() = %+v, want an error", c.Consul)
			}
			want := "config.yaml: " + strings.Join(tc.want, "\nconfig.yaml: ")
			if got := err.Error(); got != want {
				t.Errorf("ParseEnv() error:\n%s\nwant:\n%s", got, want)
			}
		})
	}
}

// TestConsulEnvDocumented: the README and config.yaml name every CONSUL_*
// variable the sidecar honours.
func TestConsulEnvDocumented(t *testing.T) {
	t.Parallel()
	for _, doc := range []string{"../README.md", "../config.yaml"} {
		data, err := os.ReadFile(doc)
		if err != nil {
			t.Fatal(err)
		}
		for _, v := range ConsulEnv {
			if !strings.Contains(string(data), v.Name) {
				t.Errorf("%s does not name %s", doc, v.Name)
			}
		}
	}
}
