package config

import (
	"strings"

	"gopkg.in/yaml.v3"
)

// Mask is what Masked shows in place of a secret that is set.
const Mask = "***"

// Masked returns c as the file's keys shape it (durations as Go duration
// strings), for display, with every secret that is set shown as Mask:
// admin.token, consul.token, and any key, at any depth (service.run.env
// included), whose name ends in token, password, passwd, secret or key,
// hash_key apart. Unset secrets stay "" so that their absence shows.
func (c *Config) Masked() (map[string]any, error) {
	data, err := yaml.Marshal(c)
	if err != nil {
		return nil, err
	}
	var doc map[string]any
	if err := yaml.Unmarshal(data, &doc); err != nil {
		return nil, err
	}
	maskSecrets(doc)
	return doc, nil
}

func maskSecrets(v any) {
	switch v := v.(type) {
	case map[string]any:
		for k, x := range v {
			if s, ok := x.(string); ok && s != "" && isSecret(k) {
				v[k] = Mask
				continue
			}
			maskSecrets(x)
		}
	case []any:
		for _, x := range v {
			maskSecrets(x)
		}
	}
}

// isSecret reports whether a key's name says its value is a secret.
func isSecret(key string) bool {
	k := strings.ToLower(key)
	if k == "hash_key" {
		return false // what the hash balancer hashes, not a key
	}
	for _, s := range []string{"token", "password", "passwd", "secret", "key"} {
		if strings.HasSuffix(k, s) {
			return true
		}
	}
	return false
}
