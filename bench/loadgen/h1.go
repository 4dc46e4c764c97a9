package main

import (
	"bufio"
	"bytes"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"strconv"
	"time"
)

// h1Conn is a minimal HTTP/1.1 keep-alive client on one connection, in the
// manner of wrk: the request bytes are built once, the response is parsed
// just enough to find its end (Content-Length or chunked) and discarded.
// That keeps the load generator's own cost per request small. It is not
// safe for concurrent use.
type h1Conn struct {
	addr string
	req  []byte
	c    net.Conn
	r    *bufio.Reader
}

func newH1Conn(addr, method, path string, body []byte) *h1Conn {
	var b bytes.Buffer
	fmt.Fprintf(&b, "%s %s HTTP/1.1\r\nHost: bench\r\nUser-Agent: sidecar-bench\r\n", method, path)
	if body != nil {
		fmt.Fprintf(&b, "Content-Type: application/octet-stream\r\nContent-Length: %d\r\n", len(body))
	}
	b.WriteString("\r\n")
	b.Write(body)
	return &h1Conn{addr: addr, req: b.Bytes()}
}

var errStatus = errors.New("unexpected status")

// useTLS (-tls) puts every HTTP/1.1 connection under TLS: a proxy that
// terminates TLS from its clients (HAProxy in the mTLS comparison).
var useTLS bool

var tlsConfig = &tls.Config{InsecureSkipVerify: true, NextProtos: []string{"http/1.1"}} //nolint:gosec // a benchmark against loopback peers

// do sends the request and reads the whole answer. Any error closes the
// connection; the next call dials again.
func (h *h1Conn) do() error {
	if h.c == nil {
		c, err := net.DialTimeout("tcp", h.addr, 2*time.Second)
		if err != nil {
			time.Sleep(10 * time.Millisecond) // no busy loop against a dead port
			return err
		}
		if useTLS {
			tc := tls.Client(c, tlsConfig)
			if err := tc.Handshake(); err != nil {
				c.Close()
				time.Sleep(10 * time.Millisecond)
				return err
			}
			c = tc
		}
		h.c = c
		if h.r == nil {
			h.r = bufio.NewReaderSize(c, 64<<10)
		} else {
			h.r.Reset(c)
		}
	}
	if _, err := h.c.Write(h.req); err != nil {
		h.close()
		return err
	}
	status, keep, err := readResponse(h.r)
	if err != nil {
		h.close()
		return err
	}
	if !keep {
		h.close()
	}
	if status != 200 {
		return fmt.Errorf("%w %d", errStatus, status)
	}
	return nil
}

func (h *h1Conn) close() {
	if h.c != nil {
		h.c.Close()
		h.c = nil
	}
}

// readResponse reads one response and discards its body. It reports the
// status and whether the connection may be reused.
func readResponse(r *bufio.Reader) (status int, keep bool, err error) {
	line, err := r.ReadSlice('\n')
	if err != nil {
		return 0, false, err
	}
	if len(line) < 12 || !bytes.HasPrefix(line, []byte("HTTP/1.")) {
		return 0, false, fmt.Errorf("malformed status line %q", line)
	}
	keep = line[7] == '1'
	status, err = atoi(line[9:12])
	if err != nil {
		return 0, false, fmt.Errorf("malformed status line %q", line)
	}
	length, chunked := int64(-1), false
	for {
		line, err = r.ReadSlice('\n')
		if err != nil {
			return 0, false, err
		}
		if len(line) <= 2 {
			break
		}
		i := bytes.IndexByte(line, ':')
		if i < 0 {
			continue
		}
		name, val := line[:i], bytes.TrimSpace(line[i+1:])
		switch {
		case len(name) == 14 && equalFold(name, "content-length"):
			n, err := strconv.ParseInt(string(val), 10, 64)
			if err != nil {
				return 0, false, fmt.Errorf("malformed content-length %q", val)
			}
			length = n
		case len(name) == 17 && equalFold(name, "transfer-encoding"):
			chunked = bytes.Contains(bytes.ToLower(val), []byte("chunked"))
		case len(name) == 10 && equalFold(name, "connection"):
			if equalFold(val, "close") {
				keep = false
			} else if equalFold(val, "keep-alive") {
				keep = true
			}
		}
	}
	switch {
	case status < 200 || status == 204 || status == 304:
	case chunked:
		err = discardChunked(r)
	case length >= 0:
		_, err = r.Discard(int(length))
	default:
		_, err = io.Copy(io.Discard, r)
		keep = false
	}
	return status, keep && err == nil, err
}

func discardChunked(r *bufio.Reader) error {
	for {
		line, err := r.ReadSlice('\n')
		if err != nil {
			return err
		}
		line = bytes.TrimSpace(line)
		if i := bytes.IndexByte(line, ';'); i >= 0 {
			line = line[:i]
		}
		n, err := strconv.ParseInt(string(line), 16, 64)
		if err != nil {
			return fmt.Errorf("malformed chunk size %q", line)
		}
		if n == 0 {
			for { // trailers, then the blank line
				line, err := r.ReadSlice('\n')
				if err != nil {
					return err
				}
				if len(line) <= 2 {
					return nil
				}
			}
		}
		if _, err := r.Discard(int(n) + 2); err != nil {
			return err
		}
	}
}

func atoi(b []byte) (int, error) {
	n := 0
	for _, c := range b {
		if c < '0' || c > '9' {
			return 0, errors.New("not a number")
		}
		n = n*10 + int(c-'0')
	}
	return n, nil
}

// equalFold compares ASCII b with lower-case s, ignoring case.
func equalFold(b []byte, s string) bool {
	if len(b) != len(s) {
		return false
	}
	for i := range b {
		if b[i]|0x20 != s[i] {
			return false
		}
	}
	return true
}
