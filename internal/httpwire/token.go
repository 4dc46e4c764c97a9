package httpwire

import (
	"net/textproto"
	"strings"
)

// tokenTable says which bytes a token may hold: letters, digits and
// !#$%&'*+-.^_`|~.
var tokenTable = func() (t [256]bool) {
	for c := '0'; c <= '9'; c++ {
		t[c] = true
	}
	for c := 'a'; c <= 'z'; c++ {
		t[c], t[c-'a'+'A'] = true, true
	}
	for _, c := range []byte("!#$%&'*+-.^_`|~") {
		t[c] = true
	}
	return t
}()

// IsTokenByte reports whether c may appear in a token.
func IsTokenByte(c byte) bool { return tokenTable[c] }

// ValidToken reports whether s is a non-empty token: the syntax of a field
// name, a method, a cookie name.
func ValidToken(s string) bool {
	if s == "" {
		return false
	}
	for i := 0; i < len(s); i++ {
		if !tokenTable[s[i]] {
			return false
		}
	}
	return true
}

// ValidLowerToken reports whether s is a field name as HTTP/2 sends it: a
// non-empty token with no upper-case letter (RFC 9113, 8.2.1).
func ValidLowerToken(s string) bool {
	if s == "" {
		return false
	}
	for i := 0; i < len(s); i++ {
		if c := s[i]; !tokenTable[c] || 'A' <= c && c <= 'Z' {
			return false
		}
	}
	return true
}

// HasToken reports whether a comma-separated field (Connection, say), in
// any of its lines, holds token, compared without regard to case.
func HasToken(values []string, token string) bool {
	for _, v := range values {
		for len(v) > 0 {
			var f string
			f, v, _ = strings.Cut(v, ",")
			if strings.EqualFold(textproto.TrimString(f), token) {
				return true
			}
		}
	}
	return false
}
