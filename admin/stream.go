package admin

import (
	"bytes"
	"encoding/json"
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
	d := h.document()
	up := d["uptime_seconds"]
	delete(d, "uptime_seconds")
	if doc, err = json.Marshal(d); err != nil {
		return nil, nil, err
	}
	if bytes.Equal(doc, last) {
		return nil, last, nil
	}
	d["uptime_seconds"] = up
	body, err := json.Marshal(d)
	if err != nil {
		return nil, nil, err
	}
	// One data line: encoding/json writes no raw newline.
	msg = make([]byte, 0, len(body)+32)
	msg = append(msg, "event: status\ndata: "...)
	msg = append(msg, body...)
	msg = append(msg, "\n\n"...)
	return msg, doc, nil
}
