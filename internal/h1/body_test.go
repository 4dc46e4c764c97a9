package h1

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/sidecarlb/sidecar/internal/leakcheck"
)

func TestH1ServerChunkedRequestBody(t *testing.T) {
	leakcheck.Check(t)
	type seen struct {
		cl  int64
		err error
	}
	seenc := make(chan seen, 1)
	st := h1tStart(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		b, err := io.ReadAll(r.Body)
		seenc <- seen{r.ContentLength, err}
		w.Write(b)
	}), Options{})
	c, br := h1tDial(t, st.addr)
	h1tWrite(t, c, "POST /echo HTTP/1.1\r\nHost: svc\r\nTransfer-Encoding: chunked\r\n\r\n"+
		"5;ext=1\r\nhello\r\n6\r\n world\r\na\r\n0123456789\r\n0\r\n\r\n")
	resp, body := h1tRead(t, br, "POST")
	s := h1tRecv(t, seenc, time.Second, "the handler")
	if s.err != nil {
		t.Fatalf("handler reading the body: %v", s.err)
	}
	if s.cl != -1 {
		t.Errorf("r.ContentLength = %d, want -1 for a chunked body", s.cl)
	}
	if want := "hello world0123456789"; resp.StatusCode != 200 || body != want {
		t.Fatalf("got %d %q, want 200 %q", resp.StatusCode, body, want)
	}
	// The connection stays usable after a chunked body.
	h1tWrite(t, c, "POST /echo HTTP/1.1\r\nHost: svc\r\nContent-Length: 3\r\n\r\nabc")
	if resp, body := h1tRead(t, br, "POST"); resp.StatusCode != 200 || body != "abc" {
		t.Fatalf("second request: %d %q, want 200 \"abc\"", resp.StatusCode, body)
	}
}

func TestH1ServerExpectContinue(t *testing.T) {
	leakcheck.Check(t)
	st := h1tStart(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		b, _ := io.ReadAll(r.Body)
		io.WriteString(w, "got "+string(b))
	}), Options{})
	c, br := h1tDial(t, st.addr)
	h1tWrite(t, c, "POST /up HTTP/1.1\r\nHost: svc\r\nContent-Length: 7\r\nExpect: 100-continue\r\n\r\n")
	// The body is not sent until the interim response arrives.
	if line, _ := h1tHead(t, br); line != "HTTP/1.1 100 Continue" {
		t.Fatalf("first line %q, want HTTP/1.1 100 Continue", line)
	}
	h1tWrite(t, c, "payload")
	resp, body := h1tRead(t, br, "POST")
	if resp.StatusCode != 200 || body != "got payload" {
		t.Fatalf("final response %d %q, want 200 \"got payload\"", resp.StatusCode, body)
	}
}

func TestH1ServerExpectContinueRejected(t *testing.T) {
	leakcheck.Check(t)
	st := h1tStart(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.WriteHeader(http.StatusUnauthorized)
	}), Options{})
	c, br := h1tDial(t, st.addr)
	h1tWrite(t, c, "POST /up HTTP/1.1\r\nHost: svc\r\nContent-Length: 7\r\nExpect: 100-continue\r\n\r\n")
	// No 100 Continue may precede the final answer.
	resp, _ := h1tRead(t, br, "POST")
	if resp.StatusCode != http.StatusUnauthorized {
		t.Fatalf("first response %q, want 401 with no 100 Continue before it", resp.Status)
	}
}

func TestH1ServerUnreadRequestBody(t *testing.T) {
	leakcheck.Check(t)
	st := h1tStart(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		io.WriteString(w, "saw "+r.Method+" "+r.URL.Path)
	}), Options{})
	c, br := h1tDial(t, st.addr)
	body := strings.Repeat("x", 10<<10)
	h1tWrite(t, c, fmt.Sprintf("POST /ignore HTTP/1.1\r\nHost: svc\r\nContent-Length: %d\r\n\r\n%s", len(body), body))
	resp, got := h1tRead(t, br, "POST")
	if resp.StatusCode != 200 || got != "saw POST /ignore" {
		t.Fatalf("first: %d %q", resp.StatusCode, got)
	}
	if resp.Close {
		// Allowed, but then the connection must end here.
		t.Logf("server closed after the unread body")
		h1tExpectClosed(t, br)
		return
	}
	// net/http discards the unread body and keeps the connection.
	h1tWrite(t, c, "GET /second HTTP/1.1\r\nHost: svc\r\n\r\n")
	if resp, got := h1tRead(t, br, "GET"); resp.StatusCode != 200 || got != "saw GET /second" {
		t.Fatalf("second: %d %q, want 200 \"saw GET /second\"", resp.StatusCode, got)
	}
}

func TestH1ServerStreamLargeBody(t *testing.T) {
	leakcheck.Check(t)
	payload := make([]byte, 1<<20)
	for i := range payload {
		payload[i] = byte(i*7 + i>>10)
	}
	st := h1tStart(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		for off := 0; off < len(payload); off += 64 << 10 {
			if _, err := w.Write(payload[off : off+64<<10]); err != nil {
				return
			}
			w.(http.Flusher).Flush()
		}
	}), Options{})
	c, br := h1tDial(t, st.addr)
	h1tWrite(t, c, "GET /big HTTP/1.1\r\nHost: svc\r\n\r\n")
	resp, body := h1tRead(t, br, "GET")
	if resp.StatusCode != 200 || !bytes.Equal([]byte(body), payload) {
		t.Fatalf("status %d, %d body bytes (equal %v), want 200 and the %d-byte payload",
			resp.StatusCode, len(body), bytes.Equal([]byte(body), payload), len(payload))
	}
}

// TestH1ServerBodyReadAfterHandler: a body read the handler left behind
// (as a Transport's write loop can, when a node answers before reading the
// whole upload) fails once the handler has returned. It neither reaches
// the connection's reader, which serves the next request, nor disturbs
// that request's body.
func TestH1ServerBodyReadAfterHandler(t *testing.T) {
	leakcheck.Check(t)
	late := make(chan error, 2)
	var calls atomic.Int32
	h := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if calls.Add(1) == 1 {
			go func() {
				time.Sleep(30 * time.Millisecond)
				_, err := io.ReadAll(r.Body)
				late <- err
			}()
			w.WriteHeader(http.StatusRequestEntityTooLarge)
			return
		}
		b, _ := io.ReadAll(r.Body)
		w.Write(b)
	})
	st := h1tStart(t, h, Options{})
	c, br := h1tDial(t, st.addr)
	h1tWrite(t, c, "POST /first HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n0123456789")
	if resp, _ := h1tRead(t, br, ""); resp.StatusCode != http.StatusRequestEntityTooLarge {
		t.Fatalf("first: %d, want 413", resp.StatusCode)
	}
	// The second request's body arrives in two parts around the late read.
	h1tWrite(t, c, "POST /second HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nabcde")
	time.Sleep(60 * time.Millisecond)
	h1tWrite(t, c, "fghij")
	if resp, body := h1tRead(t, br, ""); resp.StatusCode != http.StatusOK || body != "abcdefghij" {
		t.Fatalf("second: %d %q, want 200 abcdefghij", resp.StatusCode, body)
	}
	select {
	case err := <-late:
		if !errors.Is(err, http.ErrBodyReadAfterClose) {
			t.Fatalf("late read = %v, want http.ErrBodyReadAfterClose", err)
		}
	case <-time.After(h1tTimeout):
		t.Fatal("late read never returned")
	}

	// A read still under way when the handler returns: the connection
	// closes, and its reader is not handed to another.
	started := make(chan struct{})
	h2 := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		go func() {
			close(started)
			_, err := io.ReadAll(r.Body) // the client sends only part of it
			late <- err
		}()
		<-started
		time.Sleep(20 * time.Millisecond) // let the read block
		w.WriteHeader(http.StatusRequestEntityTooLarge)
	})
	st2 := h1tStart(t, h2, Options{})
	c2, br2 := h1tDial(t, st2.addr)
	h1tWrite(t, c2, "POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\n\r\n"+strings.Repeat("u", 300<<10))
	if resp, _ := h1tRead(t, br2, ""); resp.StatusCode != http.StatusRequestEntityTooLarge {
		t.Fatalf("upload: %d, want 413", resp.StatusCode)
	}
	select {
	case err := <-late:
		if err == nil {
			t.Fatal("the lingering read of a cut-off body succeeded")
		}
	case <-time.After(h1tTimeout):
		t.Fatal("the lingering read never returned: the connection stayed open")
	}
}
