package config

import (
	"cmp"
	"fmt"
	"math"
	"slices"
	"strings"
)

// maxProblems caps how many problems one file reports, so a pathological
// document cannot produce an unbounded error.
const maxProblems = 100

// Problem is one thing wrong with a config file.
type Problem struct {
	Source  string // file name as given to Load, or Parse's source
	Path    string // full key path such as "upstreams[1].protocol"; empty for the whole file
	Line    int    // 1-based line of the key in the file, 0 if unknown
	Message string
}

// Error formats the problem as "SOURCE: PATH: message", leaving out the
// parts that are empty.
func (p *Problem) Error() string {
	var b strings.Builder
	if p.Source != "" {
		b.WriteString(p.Source)
		b.WriteString(": ")
	}
	if p.Path != "" {
		b.WriteString(p.Path)
		b.WriteString(": ")
	}
	b.WriteString(p.Message)
	return b.String()
}

// Error is every problem found in one config file, in file order.
// Its Error method puts one problem on each line, ready to print as is.
type Error struct {
	Problems []*Problem
}

func (e *Error) Error() string {
	lines := make([]string, len(e.Problems))
	for i, p := range e.Problems {
		lines[i] = p.Error()
	}
	return strings.Join(lines, "\n")
}

// Unwrap returns the problems, so errors.As finds each *Problem.
func (e *Error) Unwrap() []error {
	errs := make([]error, len(e.Problems))
	for i, p := range e.Problems {
		errs[i] = p
	}
	return errs
}

// parser carries the state of one Parse: the problems found so far, the
// paths whose values failed to decode, and the line of every key present.
type parser struct {
	source   string
	problems []*Problem
	failed   []string                    // paths whose value did not decode
	lines    map[string]int              // path of every key present in the file → its line
	guessed  map[string]bool             // paths suggested for a misspelt key
	budget   int                         // node visits left; guards against alias bombs
	full     bool                        // maxProblems reached
	lookup   func(string) (string, bool) // environment for ${VAR}; nil: no expansion
}

func newParser(source string) *parser {
	return &parser{source: source, lines: map[string]int{}, guessed: map[string]bool{}, budget: maxVisits}
}

func (p *parser) add(pr *Problem) {
	if p.full {
		return
	}
	if len(p.problems) == maxProblems {
		p.full = true
		pr = &Problem{Source: p.source, Message: "too many problems; fix these first"}
	}
	p.problems = append(p.problems, pr)
}

// present reports whether the file set the key at path (to a non-null value).
func (p *parser) present(path string) bool {
	_, ok := p.lines[path]
	return ok
}

// errorf records a semantic problem at path, unless decoding that path or
// one of its parents already failed, or the path is missing only because
// its key was misspelt: one mistake, one message.
func (p *parser) errorf(path, format string, args ...any) {
	if p.guessed[path] && !p.present(path) {
		return
	}
	for _, f := range p.failed {
		if under(path, f) {
			return
		}
	}
	p.add(&Problem{Source: p.source, Path: path, Line: p.lineOf(path), Message: fmt.Sprintf(format, args...)})
}

// lineOf returns the line of path, or of its nearest parent in the file.
func (p *parser) lineOf(path string) int {
	for path != "" {
		if l, ok := p.lines[path]; ok {
			return l
		}
		i := strings.LastIndexAny(path, ".[")
		if i < 0 {
			break
		}
		path = path[:i]
	}
	return 0
}

// under reports whether path is parent or a key below it.
func under(path, parent string) bool {
	if parent == "" || path == parent {
		return true
	}
	if !strings.HasPrefix(path, parent) {
		return false
	}
	c := path[len(parent)]
	return c == '.' || c == '['
}

// err returns the problems as an *Error sorted by line (problems without a
// line last), or nil if there are none.
func (p *parser) err() error {
	if len(p.problems) == 0 {
		return nil
	}
	ps := slices.Clone(p.problems)
	key := func(pr *Problem) int {
		if pr.Line == 0 {
			return math.MaxInt
		}
		return pr.Line
	}
	slices.SortStableFunc(ps, func(a, b *Problem) int { return cmp.Compare(key(a), key(b)) })
	return &Error{Problems: ps}
}
