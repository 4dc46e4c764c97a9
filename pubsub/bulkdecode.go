package pubsub

import (
	"bytes"
	"encoding/json"
	"errors"
	"unicode/utf8"
)

// decodeBulk decodes a bulk publish request's body, a JSON array of
// entries, as encoding/json decodes it into []bulkEntry. The shape clients
// send is read in one pass (decodeBulkFast): an array of objects with no
// key but entryId, contentType, metadata and event, each at most once,
// spelled exactly so; strings without escapes or control bytes; metadata
// an object of such strings; event a string or an object or array (kept as
// its bytes, checked by json.Valid). A text event without escapes has its
// characters in bulkEntry.text, so they are not decoded a second time; one
// with escapes keeps its quoted bytes for the caller to decode, as
// encoding/json would. Anything else goes
// to encoding/json, so this is a fast path, never a second dialect
// (FuzzDecodeBulk checks that what it accepts, encoding/json reads alike).
// The entries' strings and events are slices of body, which the caller
// must not reuse while they are in use.
// encoding/json would scan the body to validate it, decode it, and scan
// each event again for its RawMessage and for its text.
//
// Both paths stop at more than max entries (errTooManyEntries), so a body
// of many tiny entries ({},{},…) costs no more than max of them.
func decodeBulk(body []byte, max int) ([]bulkEntry, error) {
	if entries, ok := decodeBulkFast(body, max); ok {
		return entries, nil
	} else if len(entries) > max {
		return nil, errTooManyEntries
	}
	if !json.Valid(body) {
		var entries []bulkEntry
		return nil, json.Unmarshal(body, &entries) // the syntax error's own words
	}
	dec := json.NewDecoder(bytes.NewReader(body))
	if t, err := dec.Token(); err != nil || t != json.Delim('[') {
		var entries []bulkEntry
		return entries, json.Unmarshal(body, &entries) // null, or the type error
	}
	var entries []bulkEntry
	for dec.More() {
		if len(entries) == max {
			return nil, errTooManyEntries
		}
		var e bulkEntry
		if err := dec.Decode(&e); err != nil {
			return nil, err
		}
		entries = append(entries, e)
	}
	return entries, nil
}

// errTooManyEntries is decodeBulk's refusal of more than its max entries.
var errTooManyEntries = errors.New("too many entries")

// bulkScanner reads the fast path's subset of JSON; ok turns false at the
// first byte outside it.
type bulkScanner struct {
	b  []byte
	i  int
	ok bool
}

func (s *bulkScanner) space() {
	for s.i < len(s.b) {
		switch s.b[s.i] {
		case ' ', '\t', '\n', '\r':
			s.i++
		default:
			return
		}
	}
}

// next skips white space and reports whether the next byte is c, taking it
// if so.
func (s *bulkScanner) next(c byte) bool {
	s.space()
	if s.ok && s.i < len(s.b) && s.b[s.i] == c {
		s.i++
		return true
	}
	return false
}

func (s *bulkScanner) want(c byte) {
	if !s.next(c) {
		s.ok = false
	}
}

// str reads a string without escapes or control bytes, of valid UTF-8,
// and returns its characters (a slice of the body: encoding/json would
// return the same bytes).
func (s *bulkScanner) str() []byte {
	if !s.next('"') {
		s.ok = false
		return nil
	}
	start, ascii := s.i, true
	for ; s.i < len(s.b); s.i++ {
		switch c := s.b[s.i]; {
		case c == '"':
			v := s.b[start:s.i:s.i]
			s.i++
			if !ascii && !utf8.Valid(v) {
				s.ok = false // encoding/json would replace the bad bytes
			}
			return v
		case c == '\\' || c < 0x20:
			s.ok = false
			return nil
		case c >= utf8.RuneSelf:
			ascii = false
		}
	}
	s.ok = false
	return nil
}

// quoted reads a string that may hold escapes and returns it with its
// quotes, as json.Valid accepts it (a json.RawMessage of it is what
// encoding/json would keep).
func (s *bulkScanner) quoted() []byte {
	start := s.i
	if !s.next('"') {
		s.ok = false
		return nil
	}
	for ; s.i < len(s.b); s.i++ {
		switch c := s.b[s.i]; {
		case c == '\\':
			s.i++
		case c < 0x20:
			s.ok = false
			return nil
		case c == '"':
			s.i++
			v := s.b[start:s.i:s.i]
			if !json.Valid(v) {
				s.ok = false
			}
			return v
		}
	}
	s.ok = false
	return nil
}

// value reads an object or array and returns its bytes, which json.Valid
// must accept: the scan only finds where the value ends.
func (s *bulkScanner) value() []byte {
	s.space()
	start, depth, inStr := s.i, 0, false
	for ; s.i < len(s.b); s.i++ {
		c := s.b[s.i]
		switch {
		case inStr && c == '\\':
			s.i++
		case c == '"':
			inStr = !inStr
		case inStr:
		case c == '{' || c == '[':
			depth++
		case c == '}' || c == ']':
			depth--
			if depth == 0 {
				s.i++
				v := s.b[start:s.i]
				if !json.Valid(v) {
					s.ok = false
				}
				return v[:len(v):len(v)]
			}
		case depth == 0:
			s.ok = false // not an object or array
			return nil
		}
	}
	s.ok = false
	return nil
}

// decodeBulkFast decodes the shape decodeBulk describes; ok is false for
// anything else.
func decodeBulkFast(body []byte, max int) (entries []bulkEntry, ok bool) {
	s := bulkScanner{b: body, ok: true}
	s.want('[')
	entries = make([]bulkEntry, 0, 16)
	lastType := "" // entries of one request mostly share their content type
	if s.next(']') {
		s.space()
		return entries, s.ok && s.i == len(s.b)
	}
	for s.ok {
		var e bulkEntry
		var seen [4]bool
		s.want('{')
		for first := true; s.ok && !s.next('}'); first = false {
			if !first {
				s.want(',')
			}
			key := s.str()
			s.want(':')
			if !s.ok {
				return nil, false
			}
			var k int
			switch string(key) {
			case "entryId":
				k, e.EntryID = 0, string(s.str())
			case "contentType":
				k = 1
				if v := s.str(); string(v) == lastType {
					e.ContentType = lastType
				} else {
					e.ContentType = string(v)
					lastType = e.ContentType
				}
			case "metadata":
				k = 2
				e.Metadata = map[string]string{}
				s.want('{')
				for first := true; s.ok && !s.next('}'); first = false {
					if !first {
						s.want(',')
					}
					mk := s.str()
					s.want(':')
					mv := s.str()
					if _, dup := e.Metadata[string(mk)]; dup {
						s.ok = false // encoding/json keeps the last: not worth the case
					}
					e.Metadata[string(mk)] = string(mv)
				}
			case "event":
				k = 3
				s.space()
				if s.i < len(s.b) && s.b[s.i] == '"' {
					start := s.i
					if e.text = s.str(); s.ok {
						e.Event = s.b[start:s.i:s.i]
					} else {
						// Escapes (JSON.stringify's \n and \", Go's \u003c):
						// this entry's string is decoded on its own later,
						// the rest of the body stays on the fast path.
						s.ok, s.i, e.text = true, start, nil
						e.Event = s.quoted()
					}
				} else {
					e.Event = s.value()
				}
			default:
				return nil, false
			}
			if seen[k] {
				return nil, false
			}
			seen[k] = true
		}
		if !s.ok {
			return nil, false
		}
		entries = append(entries, e)
		if len(entries) > max {
			return entries, false // decodeBulk refuses it for its count
		}
		if s.next(']') {
			s.space()
			return entries, s.ok && s.i == len(s.b)
		}
		s.want(',')
	}
	return nil, false
}
