package config

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"reflect"
	"slices"
	"strconv"
	"strings"
	"time"

	"gopkg.in/yaml.v3"
)

// The decoder walks a yaml.Node tree together with the Go value it fills,
// so that every problem carries the full key path ("upstreams[1].protocol").
// It knows structs (by yaml tag), pointers, slices, maps with string keys,
// strings, ints, bools, float64 and time.Duration (a Go duration string).
// Values start out as defaults; a key absent from the file, or present with
// a null value, leaves its default alone.

const (
	maxVisits = 1 << 16 // nodes visited, aliases expanded; plenty for a config
	maxDepth  = 64      // nesting, including alias and merge indirection
)

var durationType = reflect.TypeFor[time.Duration]()

// defaulter is implemented by types whose new values start from defaults.
type defaulter interface{ setDefaults() }

// parseYAML returns the root node of a one-document file, or nil for an
// empty, comment-only or null document.
func parseYAML(data []byte) (root *yaml.Node, err error) {
	defer func() {
		if r := recover(); r != nil {
			root, err = nil, fmt.Errorf("yaml parser failed: %v", r)
		}
	}()
	dec := yaml.NewDecoder(bytes.NewReader(data))
	var doc yaml.Node
	if err := dec.Decode(&doc); err != nil {
		if errors.Is(err, io.EOF) {
			return nil, nil
		}
		return nil, yamlError(err)
	}
	var next yaml.Node
	switch err := dec.Decode(&next); {
	case err == nil:
		return nil, fmt.Errorf("line %d: a second YAML document; the file must hold one", next.Line)
	case !errors.Is(err, io.EOF):
		return nil, yamlError(err)
	}
	if doc.Kind != yaml.DocumentNode || len(doc.Content) == 0 {
		return nil, nil
	}
	root = doc.Content[0]
	if isNull(root) {
		return nil, nil
	}
	return root, nil
}

// yamlError drops the "yaml: " prefix: the source name takes its place.
func yamlError(err error) error {
	return errors.New(strings.TrimPrefix(err.Error(), "yaml: "))
}

func (p *parser) decodeRoot(root *yaml.Node, c *Config) {
	if root == nil {
		return
	}
	if r := resolveAlias(root); r.Kind != yaml.MappingNode {
		p.fail(r, "", "the file must be a YAML mapping of sections (service, consul, admin, log, discovery, proxy, upstreams), got %s", describe(r))
		return
	}
	p.decode(root, reflect.ValueOf(c).Elem(), "", 0)
}

// fail records a decoding problem at path and marks the path as failed.
func (p *parser) fail(n *yaml.Node, path, format string, args ...any) {
	p.failed = append(p.failed, path)
	p.add(&Problem{Source: p.source, Path: path, Line: n.Line, Message: fmt.Sprintf(format, args...)})
}

// spend charges one node visit and reports whether the budget allows it.
func (p *parser) spend(n *yaml.Node, path string, depth int) bool {
	p.budget--
	switch {
	case p.budget == -1:
		// The rest goes undecoded, so any later problem would be noise.
		p.fail(n, path, "document too large or too many alias expansions")
		p.failed = append(p.failed, "")
		return false
	case p.budget < 0:
		return false
	case depth > maxDepth:
		p.fail(n, path, "nested too deeply (or an alias refers to itself)")
		return false
	}
	return true
}

func (p *parser) decode(n *yaml.Node, v reflect.Value, path string, depth int) {
	if !p.spend(n, path, depth) {
		return
	}
	if n.Kind == yaml.AliasNode {
		if n.Alias != nil {
			p.decode(n.Alias, v, path, depth+1)
		}
		return
	}
	p.value(p.expandScalar(n, path), v, path, depth)
}

// value decodes n, a node whose environment variables are expanded, into v.
func (p *parser) value(n *yaml.Node, v reflect.Value, path string, depth int) {
	if isNull(n) {
		return
	}
	if v.Kind() == reflect.Pointer {
		if v.IsNil() {
			nv := reflect.New(v.Type().Elem())
			setDefaults(nv)
			v.Set(nv)
		}
		if p.spend(n, path, depth+1) {
			p.value(n, v.Elem(), path, depth+1)
		}
		return
	}
	if v.Type() == durationType {
		p.duration(n, v, path)
		return
	}
	switch v.Kind() {
	case reflect.Struct:
		p.structure(n, v, path, depth)
	case reflect.Map:
		p.mapping(n, v, path, depth)
	case reflect.Slice:
		p.sequence(n, v, path, depth)
	case reflect.String:
		if p.scalar(n, path, "a string") {
			v.SetString(n.Value)
		}
	case reflect.Int, reflect.Int8, reflect.Int16, reflect.Int32, reflect.Int64:
		p.integer(n, v, path)
	case reflect.Bool:
		if !p.scalar(n, path, "true or false") {
			return
		}
		var b bool
		if n.ShortTag() != "!!bool" || n.Decode(&b) != nil {
			p.fail(n, path, "want true or false, got %s", describe(n))
			return
		}
		v.SetBool(b)
	case reflect.Float64:
		if !p.scalar(n, path, "a number") {
			return
		}
		var f float64
		if t := n.ShortTag(); (t != "!!float" && t != "!!int") || n.Decode(&f) != nil {
			p.fail(n, path, "want a number, got %s", describe(n))
			return
		}
		v.SetFloat(f)
	default:
		p.fail(n, path, "internal error: cannot decode into %s", v.Type())
	}
}

func setDefaults(ptr reflect.Value) {
	if d, ok := ptr.Interface().(defaulter); ok {
		d.setDefaults()
	}
}

// scalar reports whether n is a scalar, recording a problem if it is not.
func (p *parser) scalar(n *yaml.Node, path, want string) bool {
	if n.Kind == yaml.ScalarNode {
		return true
	}
	p.fail(n, path, "want %s, got %s", want, describe(n))
	return false
}

func (p *parser) integer(n *yaml.Node, v reflect.Value, path string) {
	if !p.scalar(n, path, "an integer") {
		return
	}
	var i int64
	if n.ShortTag() != "!!int" || n.Decode(&i) != nil {
		p.fail(n, path, "want an integer, got %s", describe(n))
		return
	}
	if v.OverflowInt(i) {
		p.fail(n, path, "integer %s out of range", n.Value)
		return
	}
	v.SetInt(i)
}

func (p *parser) duration(n *yaml.Node, v reflect.Value, path string) {
	if !p.scalar(n, path, `a duration such as "5s"`) {
		return
	}
	switch n.ShortTag() {
	case "!!int", "!!float":
		p.fail(n, path, "duration %s has no unit (write e.g. %q)", n.Value, n.Value+"s")
		return
	case "!!str":
	default:
		p.fail(n, path, `want a duration such as "5s", got %s`, describe(n))
		return
	}
	d, err := time.ParseDuration(n.Value)
	if err != nil {
		p.fail(n, path, `invalid duration %q (write e.g. "500ms", "5s" or "1m30s")`, n.Value)
		return
	}
	v.SetInt(int64(d))
}

func (p *parser) structure(n *yaml.Node, v reflect.Value, path string, depth int) {
	if n.Kind != yaml.MappingNode {
		p.fail(n, path, "want a mapping, got %s", describe(n))
		return
	}
	names, index := fields(v.Type())
	p.pairs(n, path, depth, func(key string, kn, vn *yaml.Node) {
		i, ok := index[key]
		if !ok {
			guess := suggest(key, names)
			if guess != "" {
				p.guessed[child(path, guess)] = true
				p.fail(kn, child(path, key), "unknown key (did you mean %q?)", guess)
			} else {
				p.fail(kn, child(path, key), "unknown key (want one of %s)", strings.Join(names, ", "))
			}
			return
		}
		p.decode(vn, v.Field(i), child(path, key), depth+1)
	})
}

func (p *parser) mapping(n *yaml.Node, v reflect.Value, path string, depth int) {
	if n.Kind != yaml.MappingNode {
		p.fail(n, path, "want a mapping, got %s", describe(n))
		return
	}
	if v.Type().Key().Kind() != reflect.String {
		p.fail(n, path, "internal error: cannot decode into %s", v.Type())
		return
	}
	if v.IsNil() {
		v.Set(reflect.MakeMap(v.Type()))
	}
	p.pairs(n, path, depth, func(key string, kn, vn *yaml.Node) {
		ev := reflect.New(v.Type().Elem()).Elem()
		p.decode(vn, ev, child(path, key), depth+1)
		v.SetMapIndex(reflect.ValueOf(key).Convert(v.Type().Key()), ev)
	})
}

func (p *parser) sequence(n *yaml.Node, v reflect.Value, path string, depth int) {
	if n.Kind != yaml.SequenceNode {
		p.fail(n, path, "want a list, got %s", describe(n))
		return
	}
	s := reflect.MakeSlice(v.Type(), len(n.Content), len(n.Content))
	for i, en := range n.Content {
		ep := fmt.Sprintf("%s[%d]", path, i)
		p.lines[ep] = en.Line
		setDefaults(s.Index(i).Addr())
		p.decode(en, s.Index(i), ep, depth+1)
	}
	v.Set(s)
}

// pairs calls f for each key of mapping n, after expanding YAML merge keys
// ("<<: *base"): merged pairs come first so the mapping's own keys override
// them. Duplicate keys in one mapping are problems.
func (p *parser) pairs(n *yaml.Node, path string, depth int, f func(key string, kn, vn *yaml.Node)) {
	for i := 0; i+1 < len(n.Content); i += 2 {
		if kn := n.Content[i]; isMerge(kn) {
			p.merge(kn, n.Content[i+1], path, depth+1, f)
		}
	}
	first := map[string]int{} // key → line
	for i := 0; i+1 < len(n.Content); i += 2 {
		kn, vn := resolveAlias(n.Content[i]), n.Content[i+1]
		if isMerge(kn) {
			continue
		}
		if !p.spend(kn, path, depth) {
			return
		}
		if kn.Kind != yaml.ScalarNode {
			p.fail(kn, path, "want a key, got %s", describe(kn))
			continue
		}
		key := kn.Value
		cp := child(path, key)
		if line, dup := first[key]; dup {
			p.fail(kn, cp, "duplicate key (first on line %d)", line)
			continue
		}
		first[key] = kn.Line
		if !isNull(resolveAlias(vn)) {
			p.lines[cp] = kn.Line
		}
		f(key, kn, vn)
	}
}

func (p *parser) merge(kn, vn *yaml.Node, path string, depth int, f func(key string, kn, vn *yaml.Node)) {
	if !p.spend(vn, path, depth) {
		return
	}
	vn = resolveAlias(vn)
	switch vn.Kind {
	case yaml.MappingNode:
		p.pairs(vn, path, depth+1, f)
		return
	case yaml.SequenceNode:
		// Earlier mappings in the list win, so apply them last.
		if slices.ContainsFunc(vn.Content, func(m *yaml.Node) bool { return resolveAlias(m).Kind != yaml.MappingNode }) {
			break
		}
		for _, m := range slices.Backward(vn.Content) {
			p.pairs(resolveAlias(m), path, depth+1, f)
		}
		return
	}
	p.fail(kn, child(path, "<<"), "merge value must be a mapping or a list of mappings, got %s", describe(vn))
}

// resolveAlias follows alias nodes to what they name, a bounded number of times.
func resolveAlias(n *yaml.Node) *yaml.Node {
	for i := 0; n.Kind == yaml.AliasNode && n.Alias != nil && i < maxDepth; i++ {
		n = n.Alias
	}
	return n
}

func isNull(n *yaml.Node) bool {
	return n.Kind == yaml.ScalarNode && n.ShortTag() == "!!null"
}

func isMerge(n *yaml.Node) bool {
	return n.Kind == yaml.ScalarNode && n.ShortTag() == "!!merge"
}

// describe names what a node holds, for "want X, got Y" messages.
func describe(n *yaml.Node) string {
	switch n.Kind {
	case yaml.MappingNode:
		return "a mapping"
	case yaml.SequenceNode:
		return "a list"
	case yaml.AliasNode:
		return "an alias"
	case yaml.ScalarNode:
		if r := []rune(n.Value); len(r) > 40 {
			return strconv.Quote(string(r[:40]) + "…")
		}
		return strconv.Quote(n.Value)
	}
	return "nothing"
}

// child returns the path of key under path: "service.port", or
// `discovery.static["a b"]` for a key that would make the path ambiguous.
func child(path, key string) string {
	plain := key != ""
	for _, r := range key {
		if !(r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || r == '_' || r == '-') {
			plain = false
			break
		}
	}
	switch {
	case !plain:
		return path + "[" + strconv.Quote(key) + "]"
	case path == "":
		return key
	}
	return path + "." + key
}

// fields returns a struct type's yaml key names in declaration order and
// an index from key name to field number.
func fields(t reflect.Type) ([]string, map[string]int) {
	var names []string
	index := map[string]int{}
	for i := range t.NumField() {
		f := t.Field(i)
		name, _, _ := strings.Cut(f.Tag.Get("yaml"), ",")
		if !f.IsExported() || name == "" || name == "-" {
			continue
		}
		names = append(names, name)
		index[name] = i
	}
	return names, index
}

// suggest returns the known key an unknown one probably meant, or "".
func suggest(key string, names []string) string {
	norm := func(s string) string {
		return strings.ToLower(strings.NewReplacer("_", "", "-", "").Replace(s))
	}
	best, bestDist := "", 0
	for _, name := range names {
		if norm(name) == norm(key) {
			return name
		}
		if d := editDistance(key, name); d <= max(1, len(name)/3) && (best == "" || d < bestDist) {
			best, bestDist = name, d
		}
	}
	return best
}

// editDistance is the Levenshtein distance between a and b, by bytes.
func editDistance(a, b string) int {
	if len(a) > 64 || len(b) > 64 {
		return max(len(a), len(b)) // not worth computing for a suggestion
	}
	prev := make([]int, len(b)+1)
	cur := make([]int, len(b)+1)
	for j := range prev {
		prev[j] = j
	}
	for i := 1; i <= len(a); i++ {
		cur[0] = i
		for j := 1; j <= len(b); j++ {
			cost := 1
			if a[i-1] == b[j-1] {
				cost = 0
			}
			cur[j] = min(prev[j]+1, cur[j-1]+1, prev[j-1]+cost)
		}
		prev, cur = cur, prev
	}
	return prev[len(b)]
}
