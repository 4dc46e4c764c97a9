package pubsub

import (
	"bytes"
	"encoding/base64"
	"encoding/json"
	"fmt"
)

// Unmarshal decodes what Marshal encoded.
func Unmarshal(b []byte) (*Message, error) {
	if m, rest, ok := UnmarshalPrefix(b); ok && len(rest) == 0 {
		return m, nil
	}
	m := new(Message)
	if err := json.Unmarshal(b, m); err != nil {
		return nil, fmt.Errorf("decode message: %w", err)
	}
	return m, nil
}

// UnmarshalPrefix decodes the Message at the start of b, if it is exactly
// as Marshal writes one without extensions (its fields in Marshal's order,
// strings of printable ASCII without escapes), and returns the bytes after
// it. ok is false for anything else, which encoding/json then reads: this
// is a fast path for the messages sidecars write, never a second dialect
// (FuzzUnmarshalPrefix checks that what it accepts, encoding/json reads
// alike).
func UnmarshalPrefix(b []byte) (m *Message, rest []byte, ok bool) {
	m = new(Message)
	d := prefixDecoder{b: b, ok: true}
	d.lit(`{"id":`)
	m.ID = d.str()
	d.lit(`,"source":`)
	m.Source = d.str()
	d.lit(`,"type":`)
	m.Type = d.str()
	d.lit(`,"time":`)
	if q := d.quoted(); d.ok && m.Time.UnmarshalJSON(q) != nil {
		d.ok = false
	}
	d.lit(`,"datacontenttype":`)
	m.DataContentType = d.str()
	d.lit(`,"topic":`)
	m.Topic = d.str()
	d.lit(`,"pubsubname":`)
	m.PubsubName = d.str()
	if d.opt(`,"data":`) {
		q := d.quoted()
		if d.ok {
			q = q[1 : len(q)-1]
			m.Data = make([]byte, base64.StdEncoding.DecodedLen(len(q)))
			n, err := base64.StdEncoding.Decode(m.Data, q)
			m.Data = m.Data[:n]
			d.ok = d.ok && err == nil
		}
	}
	if d.opt(`,"ordering_key":`) {
		m.OrderingKey = d.str()
	}
	d.lit(`}`)
	if !d.ok {
		return nil, nil, false
	}
	return m, d.b, true
}

// prefixDecoder reads the fixed shape UnmarshalPrefix takes; its first
// mismatch clears ok and makes every later read a no-op.
type prefixDecoder struct {
	b  []byte
	ok bool
}

func (d *prefixDecoder) lit(s string) {
	if d.ok && len(d.b) >= len(s) && string(d.b[:len(s)]) == s {
		d.b = d.b[len(s):]
		return
	}
	d.ok = false
}

func (d *prefixDecoder) opt(s string) bool {
	if d.ok && bytes.HasPrefix(d.b, []byte(s)) {
		d.b = d.b[len(s):]
		return true
	}
	return false
}

// quoted returns a JSON string with its quotes, when it is printable ASCII
// without a backslash.
func (d *prefixDecoder) quoted() []byte {
	if !d.ok || len(d.b) == 0 || d.b[0] != '"' {
		d.ok = false
		return nil
	}
	for i := 1; i < len(d.b); i++ {
		switch c := d.b[i]; {
		case c == '"':
			q := d.b[:i+1]
			d.b = d.b[i+1:]
			return q
		case c < 0x20 || c >= 0x7f || c == '\\':
			d.ok = false
			return nil
		}
	}
	d.ok = false
	return nil
}

func (d *prefixDecoder) str() string {
	q := d.quoted()
	if !d.ok {
		return ""
	}
	return string(q[1 : len(q)-1])
}
