package natsbroker

import (
	"encoding/json"
	"fmt"
	"strings"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/sidecarlb/sidecar/pubsub"
)

// Messages go into the stream in the binary mode of the CloudEvents NATS
// binding: the attributes as headers, the data as the message's payload,
// with no JSON or base64 to encode at publish and decode at delivery.
// Messages a sidecar before this one stored as JSON (a pubsub.Message,
// no Ce-Specversion header) are still read.
const (
	hdrSpec     = "Ce-Specversion"
	hdrID       = "Ce-Id"
	hdrSource   = "Ce-Source"
	hdrType     = "Ce-Type"
	hdrTime     = "Ce-Time"
	hdrCT       = "Content-Type"
	hdrTopic    = "Sidecar-Topic"
	hdrPubsub   = "Sidecar-Pubsub"
	hdrOrdering = "Sidecar-Ordering-Key"
	hdrExtPfx   = "Ce-"
)

// encodeMsg returns m as a NATS message on subject. An attribute with a
// line break, another control byte or a space at either end (a
// CloudEvent's source or type may hold one) cannot be a header: such a
// message is stored as JSON, as before.
func encodeMsg(subject string, m *pubsub.Message) (*nats.Msg, error) {
	msg := nats.NewMsg(subject)
	if !headerSafe(m) {
		body, err := m.Marshal()
		if err != nil {
			return nil, err
		}
		msg.Data = body
		return msg, nil
	}
	// One backing array for every value and a map sized once: two
	// allocations in place of one per header.
	vals := make([]string, 0, 10+len(m.Extensions))
	h := make(nats.Header, 10+len(m.Extensions))
	set := func(k, v string) {
		vals = append(vals, v)
		h[k] = vals[len(vals)-1 : len(vals) : len(vals)]
	}
	set(hdrSpec, pubsub.SpecVersion)
	set(hdrID, m.ID)
	set(hdrSource, m.Source)
	set(hdrType, m.Type)
	set(hdrTime, m.Time.Format(time.RFC3339Nano))
	set(hdrCT, m.DataContentType)
	set(hdrTopic, m.Topic)
	if m.PubsubName != "" {
		set(hdrPubsub, m.PubsubName)
	}
	if m.OrderingKey != "" {
		set(hdrOrdering, m.OrderingKey)
	}
	for name, v := range m.Extensions {
		set(hdrExtPfx+name, string(v)) // a JSON scalar: no line breaks
	}
	msg.Header = h
	msg.Data = m.Data
	return msg, nil
}

func headerSafe(m *pubsub.Message) bool {
	for _, v := range []string{m.ID, m.Source, m.Type, m.DataContentType, m.Topic, m.PubsubName, m.OrderingKey} {
		if !headerValue(v) {
			return false
		}
	}
	for _, v := range m.Extensions {
		if !headerValue(string(v)) {
			return false
		}
	}
	return true
}

// headerValue reports whether v comes back from a header as it went in:
// no control bytes (a reader drops or refuses them) and no space at
// either end (a reader trims it).
func headerValue(v string) bool {
	if strings.TrimSpace(v) != v {
		return false
	}
	for i := 0; i < len(v); i++ {
		if c := v[i]; c < 0x20 || c == 0x7f {
			return false
		}
	}
	return true
}

// decodeMsg reads a message encodeMsg wrote, or the JSON an earlier
// version stored.
func decodeMsg(h nats.Header, data []byte) (*pubsub.Message, error) {
	if h.Get(hdrSpec) == "" {
		return pubsub.Unmarshal(data)
	}
	if v := h.Get(hdrSpec); v != pubsub.SpecVersion {
		return nil, fmt.Errorf("decode message: specversion %q", v)
	}
	m := &pubsub.Message{
		ID: h.Get(hdrID), Source: h.Get(hdrSource), Type: h.Get(hdrType), DataContentType: h.Get(hdrCT),
		Topic: h.Get(hdrTopic), PubsubName: h.Get(hdrPubsub), OrderingKey: h.Get(hdrOrdering), Data: data,
	}
	if m.ID == "" || m.Topic == "" {
		return nil, fmt.Errorf("decode message: no %s or %s header", hdrID, hdrTopic)
	}
	t, err := time.Parse(time.RFC3339Nano, h.Get(hdrTime))
	if err != nil {
		return nil, fmt.Errorf("decode message: %s: %w", hdrTime, err)
	}
	m.Time = t
	for k, vs := range h {
		name, ok := cutPrefixFold(k, hdrExtPfx)
		if !ok || len(vs) == 0 {
			continue
		}
		switch name = strings.ToLower(name); name {
		case "specversion", "id", "source", "type", "time":
			continue
		}
		if !json.Valid([]byte(vs[0])) {
			return nil, fmt.Errorf("decode message: extension %s is not JSON", name)
		}
		if m.Extensions == nil {
			m.Extensions = map[string]json.RawMessage{}
		}
		m.Extensions[name] = json.RawMessage(vs[0])
	}
	return m, nil
}

func cutPrefixFold(s, prefix string) (string, bool) {
	if len(s) < len(prefix) || !strings.EqualFold(s[:len(prefix)], prefix) {
		return "", false
	}
	return s[len(prefix):], true
}
