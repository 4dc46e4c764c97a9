package pubsub

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strconv"
	"strings"
	"sync/atomic"
	"time"

	"go.uber.org/zap"

	"github.com/sidecarlb/sidecar/config"
)

// Publication is one message handed to a Sink, with its Idempotency-Key.
type Publication struct {
	Key string // "" for none
	Msg *Message
}

// Sink takes custody of published messages: the broker's outbox.
type Sink interface {
	// Publish stores pubs durably and returns once they are fsynced; dup[i]
	// is true when pubs[i]'s key was published within the dedup window, and
	// nothing new was stored for it. Publish may block for a commit and is
	// safe for concurrent use. An error means none of pubs is stored.
	Publish(pubs []Publication) (dup []bool, err error)
}

// Dapr-shaped error codes in API answers.
const (
	errNotFound    = "ERR_PUBSUB_NOT_FOUND"
	errTopic       = "ERR_TOPIC_NAME_INVALID"
	errEvent       = "ERR_PUBSUB_CLOUD_EVENTS_SER"
	errTooLarge    = "ERR_PUBSUB_REQUEST_TOO_LARGE"
	errUnavailable = "ERR_PUBSUB_PUBLISH_MESSAGE"
	errBadRequest  = "ERR_MALFORMED_REQUEST"
)

// API is the app's publish API on pubsub.listen, with Dapr's paths:
//
//	POST /v1.0/publish/{pubsub}/{topic}
//	POST /v1.0-alpha1/publish/bulk/{pubsub}/{topic}
//	GET  /v1.0/healthz
//
// It answers 204 only after the Sink has the message on disk.
type API struct {
	mux      *http.ServeMux
	name     string
	source   string
	maxBytes atomic.Int64 // max_message_bytes; SetMaxBytes changes it
	sink     Sink
	metrics  *Metrics
	log      *zap.Logger
	now      func() time.Time
}

// APIOptions configure an API.
type APIOptions struct {
	Name     string // the {pubsub} segment
	Source   string // the CloudEvent source: the publishing service's name
	MaxBytes int64  // max_message_bytes
	Metrics  *Metrics
	Now      func() time.Time // if nil, time.Now
}

// SetMaxBytes changes max_message_bytes for the requests that start after
// it; safe for concurrent use.
func (a *API) SetMaxBytes(n int64) { a.maxBytes.Store(n) }

// NewAPI returns the publish API over sink.
func NewAPI(sink Sink, opts APIOptions, log *zap.Logger) *API {
	a := &API{mux: http.NewServeMux(), name: opts.Name, source: opts.Source, sink: sink, metrics: opts.Metrics, log: log, now: opts.Now}
	a.maxBytes.Store(opts.MaxBytes)
	if a.source == "" {
		a.source = DefaultSource
	}
	if a.now == nil {
		a.now = time.Now
	}
	a.mux.HandleFunc("POST /v1.0/publish/{pubsub}/{topic}", func(w http.ResponseWriter, r *http.Request) {
		a.publish(w, r, r.PathValue("pubsub"), r.PathValue("topic"))
	})
	a.mux.HandleFunc("POST /v1.0-alpha1/publish/bulk/{pubsub}/{topic}", a.bulk)
	a.mux.HandleFunc("GET /v1.0/healthz", func(w http.ResponseWriter, _ *http.Request) { w.WriteHeader(http.StatusNoContent) })
	a.mux.HandleFunc("GET /v1.0/healthz/outbound", func(w http.ResponseWriter, _ *http.Request) { w.WriteHeader(http.StatusNoContent) })
	return a
}

func (a *API) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	// The publish path, the hot one, without the mux's pattern matching
	// (three allocations a request), when it is a path the mux would take
	// as it is: two plain segments after the prefix, neither "." nor "..".
	if r.Method == http.MethodPost && r.URL.RawPath == "" {
		if rest, ok := strings.CutPrefix(r.URL.Path, "/v1.0/publish/"); ok {
			ps, topic, ok := strings.Cut(rest, "/")
			if ok && plainSegment(ps) && plainSegment(topic) && !strings.Contains(topic, "/") {
				a.publish(w, r, ps, topic)
				return
			}
		}
	}
	a.mux.ServeHTTP(w, r)
}

func plainSegment(s string) bool { return s != "" && s != "." && s != ".." }

// apiError answers status with Dapr's error body.
func apiError(w http.ResponseWriter, status int, code, format string, args ...any) {
	w.Header().Set("Content-Type", "application/json")
	if status == http.StatusServiceUnavailable {
		w.Header().Set("Retry-After", "1")
	}
	w.WriteHeader(status)
	_ = json.NewEncoder(w).Encode(map[string]string{"errorCode": code, "message": fmt.Sprintf(format, args...)})
}

// target checks the {pubsub} and {topic} segments, answering the error.
func (a *API) target(w http.ResponseWriter, ps, topic string) bool {
	if ps != a.name {
		apiError(w, http.StatusNotFound, errNotFound, "pubsub %q not found (this sidecar serves %q)", ps, a.name)
		return false
	}
	if err := config.CheckTopic(topic); err != nil {
		apiError(w, http.StatusBadRequest, errTopic, "topic: %v", err)
		return false
	}
	return true
}

// readBody reads at most limit bytes, answering 413 past it.
func readBody(w http.ResponseWriter, r *http.Request, limit int64) ([]byte, bool) {
	body, err := ReadAll(http.MaxBytesReader(w, r.Body, limit), r.ContentLength)
	var tooBig *http.MaxBytesError
	switch {
	case errors.As(err, &tooBig):
		apiError(w, http.StatusRequestEntityTooLarge, errTooLarge, "body over %d bytes", limit)
		return nil, false
	case err != nil:
		apiError(w, http.StatusBadRequest, errBadRequest, "read body: %v", err)
		return nil, false
	}
	return body, true
}

// ReadAll reads r to its end, as io.ReadAll does, into a buffer sized for
// sizeHint bytes when that is known and under 16 MiB (a request's
// Content-Length), so that a body is read into one allocation rather than
// one that grows from 512 bytes.
func ReadAll(r io.Reader, sizeHint int64) ([]byte, error) {
	if sizeHint <= 0 || sizeHint > 16<<20 {
		return io.ReadAll(r)
	}
	b := make([]byte, 0, sizeHint+1) // +1: EOF is seen without a grow
	for {
		n, err := r.Read(b[len(b):cap(b)])
		b = b[:len(b)+n]
		if err == io.EOF {
			return b, nil
		}
		if err != nil {
			return b, err
		}
		if len(b) == cap(b) {
			b = append(b, 0)[:len(b)] // a body longer than its hint
		}
	}
}

// envelopeSlack is what a CloudEvent's envelope may add to its data.
const envelopeSlack = 64 << 10

func (a *API) publish(w http.ResponseWriter, r *http.Request, ps, topic string) {
	if !a.target(w, ps, topic) {
		return
	}
	ct := r.Header.Get("Content-Type")
	structured := mediaType(ct) == "application/cloudevents+json"
	limit := a.maxBytes.Load()
	if structured {
		limit = limit*4/3 + envelopeSlack // data_base64 grows by a third
	}
	body, ok := readBody(w, r, limit)
	if !ok {
		a.metrics.published(topic, "too_large")
		return
	}
	key := r.Header.Get("Idempotency-Key")
	m, status, code, err := a.message(topic, key, ct, body, structured)
	if err == nil {
		if err = m.setOrdering(r.Header.Get("Sidecar-Ordering-Key")); err != nil {
			status, code = http.StatusBadRequest, errBadRequest
		}
	}
	if err != nil {
		a.metrics.published(topic, "invalid")
		apiError(w, status, code, "%v", err)
		return
	}
	if _, err := a.sink.Publish([]Publication{{Key: key, Msg: m}}); err != nil {
		a.unavailable(w, topic, err)
		return
	}
	a.metrics.published(topic, "ok")
	w.Header().Set("Sidecar-Message-Id", m.ID)
	w.WriteHeader(http.StatusNoContent)
}

func (a *API) unavailable(w http.ResponseWriter, topic string, err error) {
	a.metrics.published(topic, "unavailable")
	a.log.Warn("publish failed", zap.String("topic", topic), zap.Error(err))
	apiError(w, http.StatusServiceUnavailable, errUnavailable, "message not stored: %v", err)
}

// message builds the Message of one publication, or the status to answer.
func (a *API) message(topic, key, ct string, body []byte, structured bool) (*Message, int, string, error) {
	if len(key) > 512 {
		return nil, http.StatusBadRequest, errBadRequest, errors.New("Idempotency-Key longer than 512 bytes")
	}
	m := &Message{ID: key, Source: a.source, Type: DefaultType, Time: a.now().UTC(), Topic: topic, PubsubName: a.name}
	if structured {
		if err := ParseEvent(body, m); err != nil {
			return nil, http.StatusBadRequest, errEvent, err
		}
		if key != "" {
			m.ID = key // the key is the id
		}
	} else {
		m.DataContentType, m.Data = ct, body
	}
	if m.DataContentType == "" {
		m.DataContentType = DefaultDataType
	}
	if limit := a.maxBytes.Load(); int64(len(m.Data)) > limit {
		return nil, http.StatusRequestEntityTooLarge, errTooLarge, fmt.Errorf("data is %d bytes, over max_message_bytes (%d)", len(m.Data), limit)
	}
	if m.ID == "" {
		m.ID = NewID()
	}
	return m, 0, "", nil
}

// maxOrderingKey bounds Sidecar-Ordering-Key.
const maxOrderingKey = 255

func (m *Message) setOrdering(k string) error {
	if len(k) > maxOrderingKey {
		return fmt.Errorf("Sidecar-Ordering-Key longer than %d bytes", maxOrderingKey)
	}
	m.OrderingKey = k
	return nil
}

// bulkEntry is one entry of Dapr's bulk publish request.
type bulkEntry struct {
	EntryID     string            `json:"entryId"`
	Event       json.RawMessage   `json:"event"`
	ContentType string            `json:"contentType"`
	Metadata    map[string]string `json:"metadata"`
	// text is the event's characters when decodeBulk's fast path read it
	// as a string; nil otherwise.
	text []byte
}

type failedEntry struct {
	EntryID string `json:"entryId"`
	Error   string `json:"error"`
}

// MaxBulkEntries bounds the entries of one bulk request: a broker that
// publishes a request's entries at once must have room for this many.
const MaxBulkEntries = 10_000

// Bounds of one bulk request.
const (
	maxBulkEntries = MaxBulkEntries
	maxBulkBytes   = 256 << 20
)

func (a *API) bulk(w http.ResponseWriter, r *http.Request) {
	topic := r.PathValue("topic")
	if !a.target(w, r.PathValue("pubsub"), topic) {
		return
	}
	body, ok := readBody(w, r, min(16*a.maxBytes.Load(), maxBulkBytes)+envelopeSlack)
	if !ok {
		a.metrics.published(topic, "too_large")
		return
	}
	entries, err := decodeBulk(body, maxBulkEntries)
	if errors.Is(err, errTooManyEntries) {
		apiError(w, http.StatusBadRequest, errBadRequest, "want 1-%d entries, got more", maxBulkEntries)
		return
	}
	if err != nil {
		apiError(w, http.StatusBadRequest, errBadRequest, "body must be a JSON array of {entryId, event, contentType}: %v", err)
		return
	}
	if len(entries) == 0 || len(entries) > maxBulkEntries {
		apiError(w, http.StatusBadRequest, errBadRequest, "want 1-%d entries, got %d", maxBulkEntries, len(entries))
		return
	}
	pubs := make([]Publication, len(entries))
	seen := make(map[string]bool, len(entries))
	for i, e := range entries {
		if e.EntryID == "" || seen[e.EntryID] {
			apiError(w, http.StatusBadRequest, errBadRequest, "entries[%d]: entryId missing or repeated", i)
			return
		}
		seen[e.EntryID] = true
		ct := e.ContentType
		structured := mediaType(ct) == "application/cloudevents+json"
		data := []byte(e.Event)
		var s string
		if !structured && !isJSON(ct) && e.text != nil {
			data = e.text // text sent as a JSON string, read by decodeBulk
		} else if !structured && !isJSON(ct) && json.Unmarshal(e.Event, &s) == nil {
			data = []byte(s) // text sent as a JSON string
		}
		if ct == "" && !structured {
			ct = DefaultDataType
		}
		key := e.Metadata["idempotencyKey"]
		m, status, code, err := a.message(topic, key, ct, data, structured)
		if err == nil {
			if err = m.setOrdering(e.Metadata["orderingKey"]); err != nil {
				status, code = http.StatusBadRequest, errBadRequest
			}
		}
		if err != nil {
			a.metrics.published(topic, "invalid")
			apiError(w, status, code, "entry %q: %v", e.EntryID, err)
			return
		}
		pubs[i] = Publication{Key: key, Msg: m}
	}
	if _, err := a.sink.Publish(pubs); err != nil {
		a.metrics.published(topic, "unavailable")
		a.log.Warn("bulk publish failed", zap.String("topic", topic), zap.Error(err))
		failed := make([]failedEntry, len(entries))
		for i, e := range entries {
			failed[i] = failedEntry{EntryID: e.EntryID, Error: err.Error()}
		}
		w.Header().Set("Content-Type", "application/json")
		w.Header().Set("Retry-After", "1")
		w.WriteHeader(http.StatusInternalServerError)
		_ = json.NewEncoder(w).Encode(map[string]any{"failedEntries": failed, "errorCode": errUnavailable})
		return
	}
	for range pubs {
		a.metrics.published(topic, "ok")
	}
	w.Header().Set("Sidecar-Message-Count", strconv.Itoa(len(pubs)))
	w.WriteHeader(http.StatusNoContent)
}
