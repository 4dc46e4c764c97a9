package h1

import (
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/http/httputil"
	"strings"
	"testing"
	"time"

	"github.com/sidecarlb/sidecar/internal/leakcheck"
)

func TestH1ServerFlushedResponseIsChunked(t *testing.T) {
	leakcheck.Check(t)
	st := h1tStart(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		io.WriteString(w, "first,")
		w.(http.Flusher).Flush()
		io.WriteString(w, "second")
	}), Options{})
	c, br := h1tDial(t, st.addr)
	h1tWrite(t, c, "GET /f HTTP/1.1\r\nHost: svc\r\n\r\n")
	line, h := h1tHead(t, br)
	if !strings.HasPrefix(line, "HTTP/1.1 200 ") {
		t.Fatalf("status line %q, want HTTP/1.1 200", line)
	}
	if te := h.Values("Transfer-Encoding"); len(te) != 1 || te[0] != "chunked" {
		t.Fatalf("Transfer-Encoding %q, want [chunked]", te)
	}
	if cl := h.Values("Content-Length"); len(cl) != 0 {
		t.Fatalf("Content-Length %q on a chunked response", cl)
	}
	body, err := io.ReadAll(httputil.NewChunkedReader(br))
	if err != nil || string(body) != "first,second" {
		t.Fatalf("chunked body %q, %v; want \"first,second\"", body, err)
	}
	// The chunked reader stops at the last chunk: its (empty) trailer follows.
	if crlf, err := br.ReadString('\n'); crlf != "\r\n" || err != nil {
		t.Fatalf("after the last chunk: %q, %v; want an empty trailer", crlf, err)
	}
	// Nothing else is on the wire: a next request answers cleanly.
	h1tWrite(t, c, "GET /f HTTP/1.1\r\nHost: svc\r\n\r\n")
	if resp, body := h1tRead(t, br, "GET"); resp.StatusCode != 200 || body != "first,second" {
		t.Fatalf("second request: %d %q", resp.StatusCode, body)
	}
}

func TestH1ServerSmallUnflushedResponseGetsContentLength(t *testing.T) {
	leakcheck.Check(t)
	st := h1tStart(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		io.WriteString(w, "small")
	}), Options{})
	c, br := h1tDial(t, st.addr)
	h1tWrite(t, c, "GET /s HTTP/1.1\r\nHost: svc\r\n\r\n")
	line, h := h1tHead(t, br)
	if !strings.HasPrefix(line, "HTTP/1.1 200 ") {
		t.Fatalf("status line %q, want HTTP/1.1 200", line)
	}
	// net/http buffers a small answer and, when the handler returns, frames it
	// with a Content-Length rather than chunks.
	if cl, te := h.Get("Content-Length"), h.Values("Transfer-Encoding"); cl != "5" || len(te) != 0 {
		t.Fatalf("Content-Length %q, Transfer-Encoding %q; want 5 and none", cl, te)
	}
	buf := make([]byte, 5)
	if _, err := io.ReadFull(br, buf); err != nil || string(buf) != "small" {
		t.Fatalf("body %q, %v; want \"small\"", buf, err)
	}
}

func TestH1ServerTrailers(t *testing.T) {
	leakcheck.Check(t)
	st := h1tStart(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Trailer", "X-T")
		io.WriteString(w, "body")
		w.Header().Set("X-T", "v")
		w.Header().Set(http.TrailerPrefix+"X-U", "u")
	}), Options{})
	c, br := h1tDial(t, st.addr)
	h1tWrite(t, c, "GET /t HTTP/1.1\r\nHost: svc\r\n\r\n")
	resp, body := h1tRead(t, br, "GET")
	if resp.StatusCode != 200 || body != "body" {
		t.Fatalf("got %d %q, want 200 \"body\"", resp.StatusCode, body)
	}
	if got := resp.Trailer.Get("X-T"); got != "v" {
		t.Errorf("trailer X-T = %q, want \"v\" (trailers %v)", got, resp.Trailer)
	}
	if got := resp.Trailer.Get("X-U"); got != "u" {
		t.Errorf("trailer X-U = %q, want \"u\" (trailers %v)", got, resp.Trailer)
	}
	if got := resp.Header.Get("X-T"); got != "" {
		t.Errorf("X-T also sent as a header: %q", got)
	}
	// The connection stays usable after the trailer block.
	h1tWrite(t, c, "GET /t HTTP/1.1\r\nHost: svc\r\n\r\n")
	if resp, body := h1tRead(t, br, "GET"); resp.StatusCode != 200 || body != "body" {
		t.Fatalf("second request: %d %q", resp.StatusCode, body)
	}
}

func TestH1ServerHead(t *testing.T) {
	leakcheck.Check(t)
	st := h1tStart(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Length", "5")
		io.WriteString(w, "hello")
	}), Options{})
	c, br := h1tDial(t, st.addr)
	h1tWrite(t, c, "HEAD /h HTTP/1.1\r\nHost: svc\r\n\r\nGET /g HTTP/1.1\r\nHost: svc\r\n\r\n")
	line, h := h1tHead(t, br)
	if !strings.HasPrefix(line, "HTTP/1.1 200 ") {
		t.Fatalf("status line %q", line)
	}
	if got := h.Get("Content-Length"); got != "5" {
		t.Fatalf("HEAD answer's Content-Length %q, want 5", got)
	}
	// The GET's answer follows the HEAD's header block at once.
	if next, err := br.Peek(9); err != nil || string(next) != "HTTP/1.1 " {
		t.Fatalf("after the HEAD answer's header: %q, %v; want the next response", next, err)
	}
	if resp, body := h1tRead(t, br, "GET"); resp.StatusCode != 200 || body != "hello" {
		t.Fatalf("GET after HEAD: %d %q", resp.StatusCode, body)
	}
}

func TestH1ServerNoBodyStatuses(t *testing.T) {
	leakcheck.Check(t)
	writeErrs := make(chan error, 2)
	st := h1tStart(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		switch r.URL.Path {
		case "/204":
			w.WriteHeader(http.StatusNoContent)
		case "/304":
			w.WriteHeader(http.StatusNotModified)
		default:
			io.WriteString(w, "ok")
			return
		}
		_, err := io.WriteString(w, "forbidden body")
		writeErrs <- err
	}), Options{})
	c, br := h1tDial(t, st.addr)
	h1tWrite(t, c, "GET /204 HTTP/1.1\r\nHost: svc\r\n\r\n"+
		"GET /304 HTTP/1.1\r\nHost: svc\r\n\r\n"+
		"GET /ok HTTP/1.1\r\nHost: svc\r\n\r\n")
	for _, code := range []string{"204", "304"} {
		line, h := h1tHead(t, br)
		if !strings.HasPrefix(line, "HTTP/1.1 "+code+" ") {
			t.Fatalf("status line %q, want %s", line, code)
		}
		if te := h.Values("Transfer-Encoding"); len(te) != 0 {
			t.Errorf("%s carries Transfer-Encoding %q", code, te)
		}
		if code == "204" && len(h.Values("Content-Length")) != 0 {
			t.Errorf("204 carries Content-Length %q", h.Values("Content-Length"))
		}
		if next, err := br.Peek(9); err != nil || string(next) != "HTTP/1.1 " {
			t.Fatalf("after the %s header: %q, %v; want the next response", code, next, err)
		}
		// The handler's Write fails (net/http: http.ErrBodyNotAllowed) or
		// is dropped; either way nothing reaches the wire.
		err := h1tRecv(t, writeErrs, time.Second, "the handler's write")
		t.Logf("%s: Write returned %v", code, err)
	}
	if resp, body := h1tRead(t, br, "GET"); resp.StatusCode != 200 || body != "ok" {
		t.Fatalf("request after 204 and 304: %d %q", resp.StatusCode, body)
	}
}

func TestH1ServerAbortHandler(t *testing.T) {
	leakcheck.Check(t)
	st := h1tStart(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		io.WriteString(w, "partial")
		w.(http.Flusher).Flush()
		panic(http.ErrAbortHandler)
	}), Options{})
	c, br := h1tDial(t, st.addr)
	h1tWrite(t, c, "GET /abort HTTP/1.1\r\nHost: svc\r\n\r\n")
	resp, err := http.ReadResponse(br, nil)
	if err != nil {
		t.Fatal(err)
	}
	if len(resp.TransferEncoding) != 1 || resp.TransferEncoding[0] != "chunked" {
		t.Fatalf("Transfer-Encoding %q, want chunked", resp.TransferEncoding)
	}
	body, err := io.ReadAll(resp.Body)
	if err == nil || h1tIsTimeout(err) {
		t.Fatalf("body %q ended with %v; want the connection cut before the last chunk", body, err)
	}
	if string(body) != "partial" {
		t.Errorf("body %q before the cut, want \"partial\"", body)
	}
}

func TestH1ServerShortBody(t *testing.T) {
	leakcheck.Check(t)
	st := h1tStart(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Length", "10")
		io.WriteString(w, "abc")
	}), Options{})
	c, br := h1tDial(t, st.addr)
	h1tWrite(t, c, "GET /short HTTP/1.1\r\nHost: svc\r\n\r\n")
	resp, err := http.ReadResponse(br, nil)
	if err != nil {
		t.Fatal(err)
	}
	if resp.ContentLength != 10 {
		t.Fatalf("ContentLength %d, want 10", resp.ContentLength)
	}
	body, err := io.ReadAll(resp.Body)
	if !errors.Is(err, io.ErrUnexpectedEOF) {
		t.Fatalf("body %q ended with %v, want io.ErrUnexpectedEOF", body, err)
	}
	if string(body) != "abc" {
		t.Errorf("body %q, want \"abc\"", body)
	}
}

func TestH1ServerLongBody(t *testing.T) {
	leakcheck.Check(t)
	errc := make(chan error, 1)
	st := h1tStart(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path != "/long" {
			io.WriteString(w, "next")
			return
		}
		w.Header().Set("Content-Length", "2")
		if _, err := io.WriteString(w, "he"); err != nil {
			errc <- fmt.Errorf("first write: %w", err)
			return
		}
		_, err := io.WriteString(w, "llo")
		errc <- err
	}), Options{})
	c, br := h1tDial(t, st.addr)
	h1tWrite(t, c, "GET /long HTTP/1.1\r\nHost: svc\r\n\r\nGET /next HTTP/1.1\r\nHost: svc\r\n\r\n")
	resp, body := h1tRead(t, br, "GET")
	if resp.ContentLength != 2 || body != "he" {
		t.Fatalf("ContentLength %d body %q, want 2 \"he\"", resp.ContentLength, body)
	}
	if err := h1tRecv(t, errc, time.Second, "the handler"); !errors.Is(err, http.ErrContentLength) {
		t.Errorf("write past Content-Length returned %v, want http.ErrContentLength", err)
	}
	// Exactly 2 bytes: the next thing on the wire is the next response
	// (net/http keeps the connection), or the close.
	next, err := br.Peek(9)
	switch {
	case err == nil && string(next) == "HTTP/1.1 ":
		if resp, body := h1tRead(t, br, "GET"); resp.StatusCode != 200 || body != "next" {
			t.Fatalf("next response %d %q", resp.StatusCode, body)
		}
	case err != nil && !h1tIsTimeout(err) && len(next) == 0:
	default:
		t.Fatalf("after the 2-byte body: %q, %v", next, err)
	}
}

func TestH1ServerDateHeader(t *testing.T) {
	leakcheck.Check(t)
	st := h1tStart(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		io.WriteString(w, "dated")
	}), Options{})
	c, br := h1tDial(t, st.addr)
	h1tWrite(t, c, "GET /d HTTP/1.1\r\nHost: svc\r\n\r\n")
	resp, _ := h1tRead(t, br, "GET")
	date := resp.Header.Get("Date")
	d, err := http.ParseTime(date)
	if err != nil {
		t.Fatalf("Date %q: %v", date, err)
	}
	if skew := time.Since(d); skew < -time.Minute || skew > time.Minute {
		t.Fatalf("Date %q is %v off", date, skew)
	}
}

// A whole answer of declared length reaches the client as its last byte is
// written, while the handler is still running (for a proxied answer: its
// metrics, breaker and balancer feedback, the node connection's return).
func TestH1ServerWholeAnswerSentBeforeHandlerReturns(t *testing.T) {
	leakcheck.Check(t)
	release := make(chan struct{}, 1)
	returned := make(chan struct{}, 1)
	st := h1tStart(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Length", "10")
		io.WriteString(w, "hello")
		io.WriteString(w, "world")
		<-release // the handler's bookkeeping after the body
		returned <- struct{}{}
	}), Options{})
	c, br := h1tDial(t, st.addr)
	for range 2 { // the connection carries the next request as usual
		h1tWrite(t, c, "GET /w HTTP/1.1\r\nHost: svc\r\n\r\n")
		// The handler waits for release, so the answer can only come now if
		// it was sent before the handler returned.
		line, h := h1tHead(t, br)
		buf := make([]byte, 10)
		_, err := io.ReadFull(br, buf)
		if got, want := fmt.Sprintf("%s|%s|%s|%v", line, h.Get("Content-Length"), buf, err), "HTTP/1.1 200 OK|10|helloworld|<nil>"; got != want {
			t.Fatalf("answer = %q, want %q", got, want)
		}
		select {
		case <-returned:
			t.Fatal("the handler returned before it was released")
		default:
		}
		release <- struct{}{}
		h1tRecv(t, returned, h1tTimeout, "the handler to return")
	}
}

// An answer still short of its declared length, or of unknown length, waits
// for the handler: a held short answer still gets its Content-Length.
func TestH1ServerPartialAnswerHeld(t *testing.T) {
	leakcheck.Check(t)
	release := make(chan struct{}, 1)
	st := h1tStart(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/declared" {
			w.Header().Set("Content-Length", "10")
		}
		io.WriteString(w, "hello")
		<-release
		io.WriteString(w, "world")
	}), Options{})
	for _, path := range []string{"/declared", "/unknown"} {
		c, br := h1tDial(t, st.addr)
		h1tWrite(t, c, "GET "+path+" HTTP/1.1\r\nHost: svc\r\n\r\n")
		_ = c.SetReadDeadline(time.Now().Add(50 * time.Millisecond))
		if b, err := br.Peek(1); !h1tIsTimeout(err) {
			t.Fatalf("%s: read %q, %v before the handler finished; want nothing yet", path, b, err)
		}
		_ = c.SetReadDeadline(time.Now().Add(h1tTimeout))
		release <- struct{}{}
		line, h := h1tHead(t, br)
		if !strings.HasPrefix(line, "HTTP/1.1 200 ") || h.Get("Content-Length") != "10" {
			t.Fatalf("%s: %q with Content-Length %q, want 200 with 10", path, line, h.Get("Content-Length"))
		}
	}
}
