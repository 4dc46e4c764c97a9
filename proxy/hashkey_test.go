package proxy

import (
	"hash/fnv"
	"net/http"
	"net/url"
	"strings"
	"testing"
)

func TestParseHashKey(t *testing.T) {
	tests := []struct {
		spec    string
		want    hashKey
		wantErr bool
	}{
		{spec: "", want: hashKey{}},
		{spec: "path", want: hashKey{kind: hashPath}},
		{spec: "client_ip", want: hashKey{kind: hashClientIP}},
		{spec: "header:X-User", want: hashKey{kind: hashHeader, name: "X-User"}},
		{spec: "header:x-user", want: hashKey{kind: hashHeader, name: "X-User"}},
		{spec: "cookie:session", want: hashKey{kind: hashCookie, name: "session"}},
		{spec: "cookie:Session", want: hashKey{kind: hashCookie, name: "Session"}},
		{spec: "query:user", want: hashKey{kind: hashQuery, name: "user"}},
		{spec: "query:a b", want: hashKey{kind: hashQuery, name: "a b"}}, // any non-empty name

		{spec: "header", wantErr: true},
		{spec: "header:", wantErr: true},
		{spec: "cookie:", wantErr: true},
		{spec: "query:", wantErr: true},
		{spec: ":x", wantErr: true},
		{spec: "Header:X-User", wantErr: true},
		{spec: "body:x", wantErr: true},
		{spec: "path:x", wantErr: true},
		{spec: "client_ip:x", wantErr: true},
		{spec: "ip", wantErr: true},
		{spec: "nope", wantErr: true},
		// Header and cookie names are tokens, as config validation says
		// (one parser for both).
		{spec: "header:X User", wantErr: true},
		{spec: "header:X:User", wantErr: true},
		{spec: "cookie:a;b", wantErr: true},
	}
	for _, tc := range tests {
		t.Run(tc.spec, func(t *testing.T) {
			got, err := parseHashKey(tc.spec)
			if tc.wantErr {
				if err == nil {
					t.Errorf("parseHashKey(%q) = %+v, nil; want an error", tc.spec, got)
				} else if !strings.Contains(err.Error(), tc.spec) {
					t.Errorf("parseHashKey(%q) error = %q, want it to quote the setting", tc.spec, err)
				}
				return
			}
			if err != nil || got != tc.want {
				t.Errorf("parseHashKey(%q) = %+v, %v; want %+v", tc.spec, got, err, tc.want)
			}
		})
	}
}

func TestFNV64(t *testing.T) {
	for _, s := range []string{"", "a", "alice", "10.0.0.1", strings.Repeat("xyz", 100)} {
		h := fnv.New64a()
		h.Write([]byte(s))
		if got, want := fnv64(s), h.Sum64(); got != want {
			t.Errorf("fnv64(%q) = %#x, want %#x", s, got, want)
		}
	}
}

// hashRequest builds a server-side request from raw request-line parts.
func hashRequest(target, remote string, header http.Header) *http.Request {
	u, err := url.ParseRequestURI(target)
	if err != nil {
		panic(err)
	}
	if header == nil {
		header = http.Header{}
	}
	return &http.Request{Method: http.MethodGet, URL: u, Header: header, RemoteAddr: remote}
}

func TestHashKeySum(t *testing.T) {
	tests := []struct {
		name   string
		spec   string
		target string
		remote string
		header http.Header
		want   string // the hashed key
		ok     bool
	}{
		{"header", "header:X-User", "/", "", http.Header{"X-User": {"alice"}}, "alice", true},
		{"header first value", "header:x-user", "/", "", http.Header{"X-User": {"alice", "bob"}}, "alice", true},
		{"header missing", "header:X-User", "/", "", http.Header{"X-Other": {"alice"}}, "", false},
		{"header empty", "header:X-User", "/", "", http.Header{"X-User": {""}}, "", false},
		{"cookie", "cookie:session", "/", "", http.Header{"Cookie": {"a=1; session=abc; b=2"}}, "abc", true},
		{"cookie quoted", "cookie:session", "/", "", http.Header{"Cookie": {`session="abc"`}}, "abc", true},
		{"cookie missing", "cookie:session", "/", "", http.Header{"Cookie": {"a=1"}}, "", false},
		{"cookie empty", "cookie:session", "/", "", http.Header{"Cookie": {"session="}}, "", false},
		{"cookie no header", "cookie:session", "/", "", nil, "", false},
		{"cookie name is case sensitive", "cookie:session", "/", "", http.Header{"Cookie": {"Session=abc"}}, "", false},
		{"query", "query:user", "/p?user=bob", "", nil, "bob", true},
		{"query later", "query:user", "/p?x=1&user=bob&user=eve", "", nil, "bob", true},
		{"query escaped kept raw", "query:user", "/p?user=b%20ob", "", nil, "b%20ob", true},
		{"query missing", "query:user", "/p?users=bob", "", nil, "", false},
		{"query empty", "query:user", "/p?user=&x=1", "", nil, "", false},
		{"query bare", "query:user", "/p?user", "", nil, "", false},
		{"query none", "query:user", "/p", "", nil, "", false},
		{"path", "path", "/a/b?x=1", "", nil, "/a/b", true},
		{"path root", "path", "/", "", nil, "/", true},
		{"client ip", "client_ip", "/", "10.1.2.3:5555", nil, "10.1.2.3", true},
		{"client ipv6", "client_ip", "/", "[::1]:80", nil, "::1", true},
		{"client addr without port", "client_ip", "/", "pipe", nil, "pipe", true},
		{"client addr empty", "client_ip", "/", "", nil, "", false},
		{"no key", "", "/", "10.1.2.3:5555", http.Header{"X-User": {"alice"}}, "", false},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			k, err := parseHashKey(tc.spec)
			if err != nil {
				t.Fatal(err)
			}
			got, ok := k.sum(hashRequest(tc.target, tc.remote, tc.header))
			if ok != tc.ok {
				t.Fatalf("sum() ok = %v, want %v", ok, tc.ok)
			}
			if ok && got != fnv64(tc.want) {
				t.Errorf("sum() = %#x, want fnv64(%q) = %#x", got, tc.want, fnv64(tc.want))
			}
		})
	}

	// The client's port does not move it: every connection of one host
	// lands on the same node.
	k, _ := parseHashKey("client_ip")
	a, _ := k.sum(hashRequest("/", "10.1.2.3:1000", nil))
	b, _ := k.sum(hashRequest("/", "10.1.2.3:2000", nil))
	if a != b {
		t.Errorf("sum() of one client on two ports = %#x and %#x, want equal", a, b)
	}
}

func FuzzHashKey(f *testing.F) {
	f.Add("header:X-User", "alice", "user=bob", "/a/b", "10.0.0.1:80")
	f.Add("cookie:session", `"abc"; x=1`, "user=&user=2", "/", "[::1]:80")
	f.Add("query:user", "b%20ob", "user=b%20ob&x", "/%zz", "pipe")
	f.Add("client_ip", "", "", "", "")
	f.Add("path", "\x00\xff", ";;&&==", "//x", "[::1")
	f.Add("header:", "v", "q", "/", ":")
	f.Add("cookie:a=b", "\"", "a=b", "/", "1.2.3.4")
	fixed := []string{"header:X-User", "cookie:session", "query:user", "path", "client_ip"}
	f.Fuzz(func(t *testing.T, spec, value, rawQuery, path, remote string) {
		build := func(key hashKey) *http.Request {
			h := http.Header{
				"X-User": {value},
				"Cookie": {"session=" + value, value},
			}
			if key.kind == hashHeader {
				h[key.name] = []string{value}
			}
			return &http.Request{Method: http.MethodGet, URL: &url.URL{Path: path, RawQuery: rawQuery},
				Header: h, RemoteAddr: remote}
		}
		specs := fixed
		if key, err := parseHashKey(spec); err == nil {
			specs = append(specs[:len(specs):len(specs)], spec)
			if key.kind == hashNone && spec != "" {
				t.Fatalf("parseHashKey(%q) = no key, nil; only the empty setting means no key", spec)
			}
		}
		for _, s := range specs {
			key, err := parseHashKey(s)
			if err != nil {
				t.Fatalf("parseHashKey(%q) error = %v", s, err)
			}
			r := build(key)
			sum1, ok1 := key.sum(r)
			sum2, ok2 := key.sum(r)
			sum3, ok3 := key.sum(build(key))
			if sum1 != sum2 || ok1 != ok2 || sum1 != sum3 || ok1 != ok3 {
				t.Fatalf("%s: sum() = (%#x, %v), (%#x, %v), (%#x, %v) for the same request; want equal",
					s, sum1, ok1, sum2, ok2, sum3, ok3)
			}
			switch key.kind {
			case hashHeader:
				if ok1 != (value != "") || (ok1 && sum1 != fnv64(value)) {
					t.Fatalf("%s: sum() = (%#x, %v) for header %q", s, sum1, ok1, value)
				}
			case hashPath:
				if !ok1 || sum1 != fnv64(path) {
					t.Fatalf("%s: sum() = (%#x, %v) for path %q", s, sum1, ok1, path)
				}
			}
		}
	})
}
