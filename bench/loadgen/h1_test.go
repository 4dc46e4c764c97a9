package main

import (
	"bufio"
	"strings"
	"testing"
)

func TestReadResponse(t *testing.T) {
	tests := []struct {
		name    string
		in      string
		status  int
		keep    bool
		rest    string // what must be left unread
		wantErr bool
	}{
		{name: "content-length", in: "HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhelloNEXT", status: 200, keep: true, rest: "NEXT"},
		{name: "chunked with trailer", in: "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n3;x=y\r\nabc\r\n0\r\nGrpc-Status: 0\r\n\r\nNEXT",
			status: 200, keep: true, rest: "NEXT"},
		{name: "connection close", in: "HTTP/1.1 503 Service Unavailable\r\nconnection: Close\r\ncontent-length: 2\r\n\r\nno", status: 503, keep: false},
		{name: "http/1.0 keep-alive", in: "HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 0\r\n\r\n", status: 200, keep: true},
		{name: "no length reads to EOF", in: "HTTP/1.1 200 OK\r\n\r\nall of it", status: 200, keep: false},
		{name: "204 has no body", in: "HTTP/1.1 204 No Content\r\n\r\nNEXT", status: 204, keep: true, rest: "NEXT"},
		{name: "garbage", in: "SSH-2.0-OpenSSH\r\n", wantErr: true},
		{name: "short body", in: "HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc", wantErr: true},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			r := bufio.NewReader(strings.NewReader(tc.in))
			status, keep, err := readResponse(r)
			if tc.wantErr {
				if err == nil {
					t.Fatalf("readResponse() = %d, %v, nil; want an error", status, keep)
				}
				return
			}
			if err != nil {
				t.Fatalf("readResponse() error = %v", err)
			}
			if status != tc.status || keep != tc.keep {
				t.Errorf("readResponse() = %d, %v; want %d, %v", status, keep, tc.status, tc.keep)
			}
			rest := make([]byte, 64)
			n, _ := r.Read(rest)
			if got := string(rest[:n]); got != tc.rest {
				t.Errorf("left unread %q, want %q", got, tc.rest)
			}
		})
	}
}
