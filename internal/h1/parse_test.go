package h1

import (
	"bufio"
	"bytes"
	"io"
	"math/rand/v2"
	"net/http"
	"net/textproto"
	"reflect"
	"strings"
	"testing"
)

// parseHeadSeeds are heads parseHead takes and heads it must leave to
// net/http; FuzzParseHead starts from them.
var parseHeadSeeds = []string{
	"GET / HTTP/1.1\r\nHost: a\r\n\r\n",
	"GET /echo?x=1&y=%20 HTTP/1.1\r\nHost: 127.0.0.1:80\r\nUser-Agent: sidecar-bench\r\nAccept: */*\r\n\r\n",
	"POST /p HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhelloGET /next HTTP/1.1\r\nHost: b\r\n\r\n",
	"POST /p HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\nshort",
	"PUT /p HTTP/1.1\r\nHost: a\r\ncontent-length:  007 \r\n\r\n0123456",
	"GET / HTTP/1.1\r\nhost: a\r\nx-dup: 1\r\nX-Dup: 2\r\nconnection: keep-alive, Close\r\n\r\n",
	"GET /a? HTTP/1.1\r\nHost: a\r\n\r\n",
	"GET /a?? HTTP/1.1\r\nHost: a\r\n\r\n",
	"GET //x/./y;z=1 HTTP/1.1\r\nHost: a\r\nEmpty:\r\nTabs:\t v \t\r\n\r\n",
	"GET /%41 HTTP/1.1\r\nHost: a\r\n\r\n",
	"GET /a#f HTTP/1.1\r\nHost: a\r\n\r\n",
	"GET /(x) HTTP/1.1\r\nHost: a\r\n\r\n",
	"GET http://h/p HTTP/1.1\r\nHost: a\r\n\r\n",
	"GET * HTTP/1.1\r\nHost: a\r\n\r\n",
	"GET / HTTP/1.0\r\nHost: a\r\n\r\n",
	"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
	"GET / HTTP/1.1\r\nHost:\r\nHost: b\r\n\r\n",
	"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\nx",
	"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: -1\r\n\r\n",
	"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
	"GET / HTTP/1.1\r\nHost: a\r\nPragma: no-cache\r\n\r\n",
	"GET / HTTP/1.1\r\nHost: a\r\nX: a\r\n folded\r\n\r\n",
	"GET / HTTP/1.1\r\n Host: a\r\n\r\n",
	"GET / HTTP/1.1\r\nHost : a\r\n\r\n",
	"GET / HTTP/1.1\nHost: a\r\n\r\n",
	"GET / HTTP/1.1\r\nHost: a\nX: b\r\n\r\n",
	"GET / HTTP/1.1\r\nHost: a\rX: b\r\n\r\n",
	"GET / HTTP/1.1\r\nX: caf\xc3\xa9\r\nHost: a\r\n\r\n",
	"G(T / HTTP/1.1\r\nHost: a\r\n\r\n",
	"GET  / HTTP/1.1\r\nHost: a\r\n\r\n",
	"GET / HTTP/1.1 \r\nHost: a\r\n\r\n",
	"GET / HTTP/1.1\r\nHost: a\r\n",
	"GET / HTTP/1.1\r\n\r\n",
	"POST / HTTP/1.0\r\nConnection: keep-alive\r\nTransfer-Encoding: chunked\r\n\r\nGET /smuggled HTTP/1.1\r\n\r\n",
	"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
	"POST / HTTP/1.1\nHost: a\nX: y\n Transfer-Encoding: chunked\n\n",
}

// FuzzParseHead holds parseHead to net/http: whatever it accepts,
// http.ReadRequest accepts too and reads the same request, body and all,
// leaving the same bytes behind; whatever it refuses, it has not read.
func FuzzParseHead(f *testing.F) {
	for _, s := range parseHeadSeeds {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, in []byte) { checkParseHead(t, in) })
}

// TestParseHeadMatchesNetHTTP builds heads from parts of the shapes
// parseHead takes, with the near misses it must not, which random bytes
// seldom hit, and holds each to net/http as FuzzParseHead does.
func TestParseHeadMatchesNetHTTP(t *testing.T) {
	methods := []string{"GET", "POST", "PUT", "DELETE", "OPTIONS", "M-SEARCH", "get", "G:T", ""}
	targets := []string{"/", "/a/b", "/a?b=c&d", "/a?", "/a??", "/a?b?", "//x", "/a;b=1,2", "/a:b@c",
		"/~x-y_z.", "/a+b$", "/%20", "/a b", "a", "*", "http://h/", "/\x7f", "/?#", "/?a=%zz"}
	protos := []string{"HTTP/1.1", "HTTP/1.1", "HTTP/1.1", "HTTP/1.0", "HTTP/1.10", "http/1.1", "HTTP/2.0"}
	fields := []string{"Host: a", "Host: a", "host: b:80", "HOST:c", "Host:", "Host: a b", "X-A: 1", "x-a: 2",
		"Content-Length: 3", "content-length: 0", "Content-Length:  4 ", "Content-Length: 3x",
		"Content-Length: 99999999999999999999", "Connection: close", "connection: Keep-Alive",
		"Connection: upgrade, CLOSE", "Expect: 100-continue", "Empty:", "Sp:   v  ", "Tab:\tv\t",
		"Accept-Encoding: gzip, br", "X-Obs: caf\xe9", " Folded: x", "Bad Name: x", "NoColon",
		"Transfer-Encoding: chunked", "Trailer: X", "Pragma: no-cache", "X-Ctl: a\x01b", "X-CR: a\rb"}
	bodies := []string{"", "abc", "abcdefgh", "GET / HTTP/1.1\r\nHost: n\r\n\r\n"}
	rng := rand.New(rand.NewPCG(1, 2))
	pick := func(from []string) string { return from[rng.IntN(len(from))] }
	took := 0
	for range 20000 {
		var b strings.Builder
		b.WriteString(pick(methods) + " " + pick(targets) + " " + pick(protos) + "\r\n")
		for range rng.IntN(6) {
			b.WriteString(pick(fields) + "\r\n")
		}
		b.WriteString("\r\n" + pick(bodies))
		if checkParseHead(t, []byte(b.String())) {
			took++
		}
	}
	// A fast path that refused everything would pass the checks above.
	if took < 500 {
		t.Fatalf("took %d of 20000 heads; the palette should give it thousands", took)
	}
	t.Logf("took %d of 20000", took)
}

// checkParseHead holds parseHead to http.ReadRequest on one input.
func checkParseHead(t *testing.T, in []byte) (took bool) {
	t.Helper()
	if len(in) > bufSize {
		return false
	}
	checkScanHead(t, in)
	br := bufio.NewReaderSize(bytes.NewReader(in), bufSize)
	_, _ = br.Peek(len(in))
	var got http.Request
	if !parseHead(br, &got, bufSize) {
		if br.Buffered() != len(in) {
			t.Fatalf("refused %q but read %d bytes of it", in, len(in)-br.Buffered())
		}
		return false
	}
	wbr := bufio.NewReader(bytes.NewReader(in))
	want, err := http.ReadRequest(wbr)
	if err != nil {
		t.Fatalf("took %q, which net/http refuses: %v", in, err)
	}
	checks := []struct {
		field     string
		got, want any
	}{
		{"Method", got.Method, want.Method},
		{"URL", *got.URL, *want.URL},
		{"Proto", got.Proto, want.Proto},
		{"ProtoMajor", got.ProtoMajor, want.ProtoMajor},
		{"ProtoMinor", got.ProtoMinor, want.ProtoMinor},
		{"Header", got.Header, want.Header},
		{"Host", got.Host, want.Host},
		{"RequestURI", got.RequestURI, want.RequestURI},
		{"ContentLength", got.ContentLength, want.ContentLength},
		{"Close", got.Close, want.Close},
		{"TransferEncoding", got.TransferEncoding, want.TransferEncoding},
		{"Trailer", got.Trailer, want.Trailer},
		{"no body", got.Body == http.NoBody, want.Body == http.NoBody},
	}
	for _, c := range checks {
		if !reflect.DeepEqual(c.got, c.want) {
			t.Fatalf("%q: %s is %#v, net/http reads %#v", in, c.field, c.got, c.want)
		}
	}
	gotBody, gotErr := io.ReadAll(got.Body)
	wantBody, wantErr := io.ReadAll(want.Body)
	if !bytes.Equal(gotBody, wantBody) || gotErr != wantErr {
		t.Fatalf("%q: body %q, %v; net/http reads %q, %v", in, gotBody, gotErr, wantBody, wantErr)
	}
	gotRest, _ := io.ReadAll(br)
	wantRest, _ := io.ReadAll(wbr)
	if !bytes.Equal(gotRest, wantRest) {
		t.Fatalf("%q: leaves %q; net/http leaves %q", in, gotRest, wantRest)
	}
	return true
}

// checkScanHead holds scanHead to net/textproto, which http.ReadRequest
// reads a head with: where textproto reads a header, scanHead finds the
// head's end and the same Transfer-Encoding and Content-Length fields,
// which http.ReadRequest may drop from the request it returns.
func checkScanHead(t *testing.T, in []byte) {
	t.Helper()
	tp := textproto.NewReader(bufio.NewReader(bytes.NewReader(in)))
	if _, err := tp.ReadLine(); err != nil {
		return
	}
	h, err := tp.ReadMIMEHeader()
	if err != nil {
		return
	}
	var f headFraming
	if !scanHead(in, &f) {
		t.Fatalf("%q: scanHead missed the head's end", in)
	}
	_, te := h["Transfer-Encoding"]
	_, cl := h["Content-Length"]
	if f.te != te || f.cl != cl {
		t.Fatalf("%q: scanHead sees Transfer-Encoding %v, Content-Length %v; textproto %v, %v", in, f.te, f.cl, te, cl)
	}
}

// TestParseHeadTakesPlainRequests: the fast path is taken by the requests
// it is for (FuzzParseHead only proves it right when it is).
func TestParseHeadTakesPlainRequests(t *testing.T) {
	for _, s := range parseHeadSeeds[:9] {
		br := bufio.NewReaderSize(bytes.NewReader([]byte(s)), bufSize)
		_, _ = br.Peek(len(s))
		var req http.Request
		if !parseHead(br, &req, bufSize) {
			t.Errorf("left %q to net/http", s)
		}
	}
}

func BenchmarkParseHead(b *testing.B) {
	const s = "GET /echo HTTP/1.1\r\nHost: 127.0.0.1:19400\r\nUser-Agent: sidecar-bench\r\nAccept: */*\r\n\r\n"
	r := bytes.NewReader([]byte(s))
	br := bufio.NewReaderSize(r, bufSize)
	var req http.Request
	b.Run("parseHead", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			r.Reset([]byte(s))
			br.Reset(r)
			_, _ = br.Peek(1)
			if !parseHead(br, &req, bufSize) {
				b.Fatal("refused")
			}
		}
	})
	b.Run("ReadRequest", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			r.Reset([]byte(s))
			br.Reset(r)
			if _, err := http.ReadRequest(br); err != nil {
				b.Fatal(err)
			}
		}
	})
}
