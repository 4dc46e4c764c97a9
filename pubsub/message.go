package pubsub

import (
	"bytes"
	"crypto/rand"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"mime"
	"strings"
	"time"
)

// Defaults of the CloudEvent attributes the sidecar fills in.
const (
	SpecVersion     = "1.0"
	DefaultType     = "com.sidecar.message"
	DefaultSource   = "sidecar"
	DefaultDataType = "text/plain"
)

// Extension attributes set on a dead letter.
const (
	ExtDeadLetterReason   = "deadletterreason"
	ExtDeadLetterAttempts = "deadletterattempts"
)

// Message is one published message: a CloudEvent 1.0 whose data is kept
// as the bytes the app sent. Messages are immutable once published.
type Message struct {
	ID              string    `json:"id"`
	Source          string    `json:"source"`
	Type            string    `json:"type"`
	Time            time.Time `json:"time"`
	DataContentType string    `json:"datacontenttype"`
	Topic           string    `json:"topic"`
	PubsubName      string    `json:"pubsubname"`
	Data            []byte    `json:"data,omitempty"`
	// Extensions are the other CloudEvent attributes, by name, each a JSON
	// scalar.
	Extensions map[string]json.RawMessage `json:"ext,omitempty"`
	// OrderingKey is the Sidecar-Ordering-Key the message was published
	// with; "" for none. It is not delivered.
	OrderingKey string `json:"ordering_key,omitempty"`
}

// NewID returns a random UUID (version 4), the id of a message published
// without an Idempotency-Key.
func NewID() string {
	var b [16]byte
	_, _ = rand.Read(b[:])
	b[6] = b[6]&0x0f | 0x40
	b[8] = b[8]&0x3f | 0x80
	var s [36]byte
	hex.Encode(s[0:8], b[0:4])
	s[8] = '-'
	hex.Encode(s[9:13], b[4:6])
	s[13] = '-'
	hex.Encode(s[14:18], b[6:8])
	s[18] = '-'
	hex.Encode(s[19:23], b[8:10])
	s[23] = '-'
	hex.Encode(s[24:], b[10:])
	return string(s[:])
}

// ErrBadEvent wraps every problem with an app's CloudEvent.
var ErrBadEvent = errors.New("bad cloudevent")

// ParseEvent reads an application/cloudevents+json body into m, whose
// fields hold the defaults for what the event leaves out (id, source, type,
// time). It validates specversion, the types of the core attributes, data
// against data_base64, and the names and types of extensions.
func ParseEvent(body []byte, m *Message) error {
	var attrs map[string]json.RawMessage
	d := json.NewDecoder(bytes.NewReader(body))
	d.UseNumber()
	if err := d.Decode(&attrs); err != nil || attrs == nil {
		return fmt.Errorf("%w: not a JSON object", ErrBadEvent)
	}
	if d.More() {
		return fmt.Errorf("%w: data after the JSON object", ErrBadEvent)
	}
	if err := parseAttributes(attrs, m); err != nil {
		return err
	}
	if err := parseData(attrs, m); err != nil {
		return err
	}
	return parseExtensions(attrs, m)
}

// eventString reads attribute name of attrs into dst: absent or null
// leaves dst as it is, anything but a non-empty string is an error.
func eventString(attrs map[string]json.RawMessage, name string, dst *string) error {
	raw, ok := attrs[name]
	if !ok || string(raw) == "null" {
		return nil
	}
	var s string
	if json.Unmarshal(raw, &s) != nil || s == "" {
		return fmt.Errorf("%w: %s must be a non-empty string", ErrBadEvent, name)
	}
	*dst = s
	return nil
}

// parseAttributes reads the context attributes CloudEvents defines.
func parseAttributes(attrs map[string]json.RawMessage, m *Message) error {
	var spec, tm string
	for _, a := range []struct {
		name string
		dst  *string
	}{{"specversion", &spec}, {"id", &m.ID}, {"source", &m.Source}, {"type", &m.Type}, {"time", &tm}, {"datacontenttype", &m.DataContentType}} {
		if err := eventString(attrs, a.name, a.dst); err != nil {
			return err
		}
	}
	if spec != "" && spec != SpecVersion {
		return fmt.Errorf("%w: specversion %q is not supported (want 1.0)", ErrBadEvent, spec)
	}
	if tm != "" {
		t, err := time.Parse(time.RFC3339Nano, tm)
		if err != nil {
			return fmt.Errorf("%w: time %q is not RFC 3339", ErrBadEvent, tm)
		}
		m.Time = t
	}
	return nil
}

// parseData reads data or data_base64 (not both), defaulting
// datacontenttype to what each implies.
func parseData(attrs map[string]json.RawMessage, m *Message) error {
	data, hasData := attrs["data"]
	b64, hasB64 := attrs["data_base64"]
	_, hasType := attrs["datacontenttype"]
	switch {
	case hasData && hasB64:
		return fmt.Errorf("%w: both data and data_base64", ErrBadEvent)
	case hasB64:
		var s string
		if json.Unmarshal(b64, &s) != nil {
			return fmt.Errorf("%w: data_base64 must be a string", ErrBadEvent)
		}
		b, err := base64.StdEncoding.DecodeString(s)
		if err != nil {
			return fmt.Errorf("%w: data_base64 is not base64", ErrBadEvent)
		}
		m.Data = b
		if !hasType {
			m.DataContentType = "application/octet-stream"
		}
	case hasData && string(data) != "null":
		if !hasType {
			m.DataContentType = "application/json"
		}
		var s string
		if !isJSON(m.DataContentType) && json.Unmarshal(data, &s) == nil {
			m.Data = []byte(s) // text kept as a string
		} else {
			m.Data = append([]byte(nil), data...)
		}
	}
	return nil
}

// parseExtensions keeps every other attribute as an extension: a valid
// name and a scalar value.
func parseExtensions(attrs map[string]json.RawMessage, m *Message) error {
	for name, v := range attrs {
		switch name {
		case "specversion", "id", "source", "type", "time", "datacontenttype", "data", "data_base64", "topic", "pubsubname":
			continue
		}
		if !validExtName(name) {
			return fmt.Errorf("%w: attribute name %q must be 1-20 lower-case letters or digits", ErrBadEvent, name)
		}
		if len(v) == 0 || v[0] == '{' || v[0] == '[' {
			return fmt.Errorf("%w: attribute %s must be a string, number or boolean", ErrBadEvent, name)
		}
		if m.Extensions == nil {
			m.Extensions = map[string]json.RawMessage{}
		}
		m.Extensions[name] = append(json.RawMessage(nil), v...)
	}
	return nil
}

func validExtName(s string) bool {
	if s == "" || len(s) > 20 {
		return false
	}
	for i := 0; i < len(s); i++ {
		if c := s[i]; !(c >= 'a' && c <= 'z' || c >= '0' && c <= '9') {
			return false
		}
	}
	return true
}

// mediaType returns the lower-case media type of a Content-Type value.
func mediaType(ct string) string {
	if simpleMediaType(ct) {
		return ct // what mime.ParseMediaType returns for it, without its allocations
	}
	if mt, _, err := mime.ParseMediaType(ct); err == nil {
		return mt
	}
	mt, _, _ := strings.Cut(ct, ";")
	return strings.ToLower(strings.TrimSpace(mt))
}

// simpleMediaType reports whether ct is a bare type/subtype of lower-case
// letters, digits and the token characters media types use (.+-), with
// nothing to parse, unfold or lower-case.
func simpleMediaType(ct string) bool {
	slash := strings.IndexByte(ct, '/')
	if slash <= 0 || slash == len(ct)-1 {
		return false
	}
	for i := 0; i < len(ct); i++ {
		c := ct[i]
		if !(c >= 'a' && c <= 'z' || c >= '0' && c <= '9' || c == '.' || c == '+' || c == '-' || i == slash) {
			return false
		}
	}
	return true
}

func isJSON(ct string) bool {
	mt := mediaType(ct)
	return mt == "application/json" || strings.HasSuffix(mt, "+json")
}

func isText(ct string) bool {
	mt := mediaType(ct)
	return strings.HasPrefix(mt, "text/") || mt == "application/xml" || strings.HasSuffix(mt, "+xml")
}
