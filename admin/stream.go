package admin

import (
	"bytes"
	"encoding/json"
	"errors"
	"net/http"
	"time"
)

// streamKeepAlive is the longest a stream goes without writing: a comment
// line then, should the document not change.
const streamKeepAlive = 15 * time.Second

// stream serves GET /status/stream: the /status document as server-sent
// events ("event: status"), one at once and then one each StreamEvery
// whenever it changed (uptime aside), until the client goes or Close is
// called. The dashboard reads it; curl -N shows it too.
func (h *Handler) stream(w http.ResponseWriter, r *http.Request) {
	rc := http.NewResponseController(w)
	w.Header().Set("Content-Type", "text/event-stream")
	w.Header().Set("Cache-Control", "no-store")
	// Tell EventSource how soon to come back after the stream breaks.
	if _, err := w.Write([]byte("retry: 1000\n\n")); err != nil {
		return
	}
	t := time.NewTicker(h.opts.StreamEvery)
	defer t.Stop()
	var last []byte
	var lastWrite time.Time
	for {
		msg, changed, err := h.event(last)
		if err != nil {
			return
		}
		now := time.Now()
		switch {
		case msg != nil:
			last, lastWrite = changed, now
		case now.Sub(lastWrite) >= streamKeepAlive:
			msg, lastWrite = []byte(": keep-alive\n\n"), now
		}
		if msg != nil {
			// A client that stops reading must not hold this goroutine
			// (and shutdown) once the socket's buffer is full.
			if err := rc.SetWriteDeadline(now.Add(streamKeepAlive)); err != nil && !errors.Is(err, http.ErrNotSupported) {
				return
			}
			if _, err := w.Write(msg); err != nil {
				return
			}
			if err := rc.Flush(); err != nil {
				return
			}
		}
		select {
		case <-r.Context().Done():
			return
		case <-h.closing:
			return
		case <-t.C:
		}
	}
}

// event returns the status event to send, and the document it compared
// with last (uptime left out, since it always changes), or a nil event
// when nothing else changed.
func (h *Handler) event(last []byte) (msg, doc []byte, err error) {
	doc, msg, err = h.shared()
	if err != nil || bytes.Equal(doc, last) {
		return nil, last, err
	}
	return msg, doc, nil
}

// shared returns the status document (uptime left out) and the event that
// carries it, built at most once per half StreamEvery whatever the number
// of open streams: each dashboard does not walk every section itself.
func (h *Handler) shared() (doc, msg []byte, err error) {
	h.streamMu.Lock()
	defer h.streamMu.Unlock()
	now := time.Now()
	if h.streamDoc != nil && now.Sub(h.streamAt) < h.opts.StreamEvery/2 {
		return h.streamDoc, h.streamMsg, nil
	}
	d := h.document()
	up, err := json.Marshal(d["uptime_seconds"])
	if err != nil {
		return nil, nil, err
	}
	delete(d, "uptime_seconds")
	if doc, err = json.Marshal(d); err != nil {
		return nil, nil, err
	}
	// The event is the document with uptime put first: one data line, as
	// encoding/json writes no raw newline. doc always holds "version".
	msg = make([]byte, 0, len(doc)+len(up)+48)
	msg = append(msg, `event: status`+"\n"+`data: {"uptime_seconds":`...)
	msg = append(msg, up...)
	msg = append(msg, ',')
	msg = append(msg, doc[1:]...)
	msg = append(msg, "\n\n"...)
	h.streamAt, h.streamDoc, h.streamMsg = now, doc, msg
	return doc, msg, nil
}
