package config

import (
	"encoding/json"
	"strings"
	"testing"
)

func TestMasked(t *testing.T) {
	c := mustParse(t, `
service:
  name: web
  port: 9001
  run:
    command: ./web
    env: {DB_PASSWORD: hunter2, API_KEY: k, GOMAXPROCS: "2", EMPTY_TOKEN: ""}
consul: {token: s3cret}
admin: {listen: 127.0.0.1:15100}
proxy: {hash_key: "header:X-User", timeouts: {connect: 3s}}
`)
	doc, err := c.Masked()
	if err != nil {
		t.Fatal(err)
	}
	data, err := json.Marshal(doc)
	if err != nil {
		t.Fatal(err)
	}
	got := string(data)
	for _, secret := range []string{"s3cret", "hunter2", `"k"`} {
		if strings.Contains(got, secret) {
			t.Errorf("Masked() shows %s: %s", secret, got)
		}
	}
	for _, want := range []string{`"token":"***"`, `"DB_PASSWORD":"***"`, `"API_KEY":"***"`, `"GOMAXPROCS":"2"`,
		`"EMPTY_TOKEN":""`, `"hash_key":"header:X-User"`, `"connect":"3s"`} {
		if !strings.Contains(got, want) {
			t.Errorf("Masked() lacks %s: %s", want, got)
		}
	}
	// admin.token is unset: shown as "" (not set), not as the mask.
	if a := doc["admin"].(map[string]any); a["token"] != "" {
		t.Errorf("admin.token = %q, want \"\"", a["token"])
	}
	if c.Consul.Token != "s3cret" {
		t.Error("Masked() changed the config")
	}
}
