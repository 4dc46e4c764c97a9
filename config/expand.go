package config

import (
	"fmt"
	"strings"

	"gopkg.in/yaml.v3"
)

// expandEnv is the one environment expander of the config file. It
// replaces "${NAME}" with NAME's value and "${NAME:-default}" with NAME's
// value, or default when NAME is unset or empty; "$$" is a literal "$".
// The default is literal text up to the first "}" (no nesting). With bare,
// "$NAME" expands too (service.run.env's form); without it, a "$" not
// followed by "{" or "$" is kept as it is.
//
// It returns the expansion, the names that are unset and have no default
// (they expand to ""), and a syntax error ("${" without "}", a name that is
// not [A-Za-z_][A-Za-z0-9_]*), the malformed text then being kept as is.
func expandEnv(s string, lookup func(string) (string, bool), bare bool) (out string, unset []string, err error) {
	if !strings.Contains(s, "$") {
		return s, nil, nil
	}
	var b strings.Builder
	for {
		i := strings.IndexByte(s, '$')
		if i < 0 || i == len(s)-1 {
			b.WriteString(s)
			return b.String(), unset, err
		}
		b.WriteString(s[:i])
		s = s[i:]
		switch {
		case s[1] == '$':
			b.WriteByte('$')
			s = s[2:]
		case s[1] == '{':
			end := strings.IndexByte(s, '}')
			if end < 0 {
				if err == nil {
					err = fmt.Errorf("%q has no closing }", s)
				}
				b.WriteString(s)
				return b.String(), unset, err
			}
			name, def, hasDef := strings.Cut(s[2:end], ":-")
			if !validEnvName(name) {
				if err == nil {
					err = fmt.Errorf("invalid variable %q (want ${NAME} or ${NAME:-default}; $$ is a literal $)", s[:end+1])
				}
				b.WriteString(s[:end+1])
				s = s[end+1:]
				continue
			}
			v, ok := lookup(name)
			switch {
			case hasDef && v == "":
				v = def
			case !ok:
				unset = append(unset, name)
			}
			b.WriteString(v)
			s = s[end+1:]
		case bare && validEnvName(s[1:2]):
			n := 1
			for n < len(s) && validEnvName(s[1:n+1]) {
				n++
			}
			v, _ := lookup(s[1:n])
			b.WriteString(v)
			s = s[n:]
		default:
			b.WriteByte('$')
			s = s[1:]
		}
	}
}

// expandScalar returns scalar n with ${VAR} expanded from the environment,
// recording a problem at path for each unset variable without a default
// and for bad syntax. Expansion happens per value after YAML parsing, so a
// value from the environment cannot change the file's structure; the
// result is typed afresh as a plain scalar, so `port: ${PORT:-9001}` is an
// integer and a value that expands to "" counts as absent. The values
// of service.run.env are left alone: resolveRun expands them, once.
func (p *parser) expandScalar(n *yaml.Node, path string) *yaml.Node {
	if p.lookup == nil || n.Kind != yaml.ScalarNode || !strings.Contains(n.Value, "$") ||
		strings.HasPrefix(path, "service.run.env.") || strings.HasPrefix(path, "service.run.env[") {
		return n
	}
	v, unset, err := expandEnv(n.Value, p.lookup, false)
	for _, name := range unset {
		p.fail(n, path, "${%s} is not set", name)
	}
	if err != nil {
		p.fail(n, path, "%v", err)
	}
	if len(unset) > 0 || err != nil || v == "" {
		delete(p.lines, path) // absent: the key's default applies
		return &yaml.Node{Kind: yaml.ScalarNode, Tag: "!!null", Line: n.Line, Column: n.Column}
	}
	if v == n.Value {
		return n
	}
	e := &yaml.Node{Kind: yaml.ScalarNode, Value: v, Line: n.Line, Column: n.Column}
	if e.ShortTag() == "!!null" {
		e.Tag = "!!str" // "null" or "~" from the environment is text, not absence
	}
	return e
}
