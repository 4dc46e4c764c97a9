package test

import (
	"bytes"
	"context"
	"encoding/xml"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/sidecarlb/sidecar/internal/leakcheck"
	"github.com/sidecarlb/sidecar/proxy"
	"github.com/sidecarlb/sidecar/test/consulagent"
)

// h2specAccepted are the h2spec cases the sidecar is allowed to fail, each
// with why. A case failing that is not here fails the test; so does one
// listed here that passes, so that the list never outlives its reason.
var h2specAccepted = map[string]string{
	// 3.5/2 sends "INVALID CONNECTION PREFACE\r\n\r\n" and expects the
	// connection to close. The listener serves HTTP/1.1 and h2c on one
	// port and tells them apart by the 24-byte preface, so these bytes are
	// an HTTP/1.1 request: the sidecar answers "HTTP/1.1 400 Bad Request",
	// Connection: close, and closes, as Go's net/http does (x/net fails the
	// case too). h2spec reads the answer as a frame ("the frame header
	// looked like an HTTP/1.1 header") and reports that, not the close.
	"http2/3.5/2": "not the preface, so an HTTP/1.1 request: answered 400 and closed, as net/http does",
}

// h2specBinary returns the path of the h2spec binary: $H2SPEC_BIN, or
// bin/h2spec at the repository root (built by `make h2spec`). When there is
// none the test fails, as the Consul tests do; with -short it is skipped.
func h2specBinary(t *testing.T) string {
	t.Helper()
	if p := os.Getenv("H2SPEC_BIN"); p != "" {
		return p
	}
	p := filepath.Join(consulagent.RepoRoot(t), "bin", "h2spec")
	if _, err := os.Stat(p); err != nil {
		msg := "no h2spec binary: run `make h2spec` (builds bin/h2spec) or set H2SPEC_BIN"
		if testing.Short() {
			t.Skip(msg)
		}
		t.Fatal(msg)
	}
	return p
}

// TestH2Spec runs the h2spec HTTP/2 conformance suite, strict cases
// included (h2c, prior knowledge), against every kind of HTTP listener the
// sidecar has, each in front of a real node, and fails on any failed case
// not in h2specAccepted.
//
// h2spec sends its requests to / with :authority 127.0.0.1:PORT (the -h it
// dials). The forward-proxy listener routes by that authority and refuses
// IP addresses and localhost, so it is given the machine's host name when
// that resolves to a loopback address, naming a static service; elsewhere
// it is dialled at 127.0.0.1 and answers each request 400 (an IP is no
// service name) over the same HTTP/2 engine, which is what h2spec checks.
//
// Upstream listeners of protocol tcp are left out: they relay bytes to a
// node without reading HTTP, so h2spec would test the node, not the
// sidecar. The admin listener is the same engine (proxy.Server) in front
// of another handler: what h2spec checks of it is checked here.
func TestH2Spec(t *testing.T) {
	leakcheck.Check(t)
	bin := h2specBinary(t)
	// The nodes answer every request with a body: six of h2spec's
	// stream-state and flow-control cases need DATA to come back, and skip
	// otherwise.
	h2Node, h1Node := h2specNode(t, true), h2specNode(t, false)

	fwdHost := "127.0.0.1"
	if h, ok := loopbackHostname(); ok {
		fwdHost = h
	} else {
		t.Logf("host name does not resolve to loopback: the forward listener is dialled at 127.0.0.1 and answers 400")
	}
	res := protoStatic(t, map[string][]string{
		"h2-node": {h2Node}, "h1-node": {h1Node}, fwdHost: {h1Node},
	})
	listeners := []struct {
		name, host, addr string
	}{
		{"forward", fwdHost, protoForward(t, res, proxy.RouteConfig{})},
		{"upstream http", "127.0.0.1", protoUpstream(t, res, proxy.RouteConfig{Service: "h1-node", Protocol: "http"})},
		{"upstream http2", "127.0.0.1", protoUpstream(t, res, proxy.RouteConfig{Service: "h2-node", Protocol: "http2"})},
		{"upstream grpc", "127.0.0.1", protoUpstream(t, res, proxy.RouteConfig{Service: "h2-node", Protocol: "grpc"})},
	}
	for _, l := range listeners {
		t.Run(l.name, func(t *testing.T) {
			_, port, _ := net.SplitHostPort(l.addr)
			// What h2spec sends reaches a node: GET / with its :authority.
			want := http.StatusOK
			if l.host == "127.0.0.1" && l.name == "forward" {
				want = http.StatusBadRequest
			}
			req, err := http.NewRequestWithContext(protoCtx(t, 10*time.Second), http.MethodGet, "http://"+l.addr+"/", nil)
			if err != nil {
				t.Fatal(err)
			}
			req.Host = net.JoinHostPort(l.host, port)
			resp, err := protoHTTPClient(t, true).Do(req)
			if err != nil {
				t.Fatalf("GET / with :authority %s: %v", req.Host, err)
			}
			resp.Body.Close()
			if resp.StatusCode != want {
				t.Fatalf("GET / with :authority %s = %d, want %d", req.Host, resp.StatusCode, want)
			}
			cases := runH2Spec(t, bin, l.host, port)
			var passed int
			var failed []string
			for _, c := range cases {
				_, accepted := h2specAccepted[c.id]
				switch {
				case c.failed && !accepted:
					t.Errorf("h2spec %s (%s) failed:\n%s", c.id, c.desc, c.detail)
					failed = append(failed, c.id)
				case c.failed:
					failed = append(failed, c.id)
				case accepted:
					t.Errorf("h2spec %s passes but is in h2specAccepted (%s): take it out", c.id, h2specAccepted[c.id])
					passed++
				default:
					passed++
				}
			}
			sort.Strings(failed)
			t.Logf("h2spec on the %s listener: %d of %d passed; failed: %v", l.name, passed, len(cases), failed)
			if len(cases) < 140 {
				t.Errorf("h2spec ran %d cases, want the whole suite (146 with -S)", len(cases))
			}
		})
	}
}

// h2specNode starts a node on loopback that reads each request's body and
// answers 200 with a body of a few hundred bytes, over HTTP/1.1 and, with
// h2c, HTTP/2 with prior knowledge.
func h2specNode(tb testing.TB, h2c bool) string {
	tb.Helper()
	protocols := new(http.Protocols)
	protocols.SetHTTP1(true)
	protocols.SetUnencryptedHTTP2(h2c)
	body := []byte(strings.Repeat("h2spec node answer\n", 20))
	srv := &http.Server{Protocols: protocols, Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		_, _ = io.Copy(io.Discard, r.Body)
		w.Header().Set("Content-Type", "text/plain")
		_, _ = w.Write(body)
	})}
	ln := protoListen(tb)
	protoServeOn(tb, func() error { return srv.Serve(ln) }, func() { srv.Close() })
	return ln.Addr().String()
}

// loopbackHostname returns the machine's host name if it resolves to
// loopback addresses only and the forward proxy may take it as a service
// name.
func loopbackHostname() (string, bool) {
	h, err := os.Hostname()
	if err != nil || h == "" || strings.EqualFold(h, "localhost") || strings.ContainsAny(h, ":[]") {
		return "", false
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	addrs, err := net.DefaultResolver.LookupIPAddr(ctx, h)
	if err != nil || len(addrs) == 0 {
		return "", false
	}
	for _, a := range addrs {
		if !a.IP.IsLoopback() || a.IP.To4() == nil {
			return "", false
		}
	}
	return strings.ToLower(h), true
}

// h2specCase is one case's result.
type h2specCase struct {
	id     string // e.g. "http2/5.1/6": the section's ID and the case's number in it
	desc   string
	failed bool
	detail string
}

// runH2Spec runs h2spec against host:port and returns every case it ran,
// read from its JUnit report.
func runH2Spec(t *testing.T, bin, host, port string) []h2specCase {
	t.Helper()
	report := filepath.Join(t.TempDir(), "h2spec.xml")
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	// -S: the strict cases too (one more: 5.4.1/2, a GOAWAY before the
	// close on a connection error). They come after the others in their
	// section, so the IDs of the others do not move.
	// -o: how long h2spec waits for each answer; a case passes as soon as
	// its answer comes, and a loaded two-core CI machine can be slow.
	cmd := exec.CommandContext(ctx, bin, "-S", "-h", host, "-p", port, "-o", "10", "-j", report)
	out, err := cmd.CombinedOutput()
	var exit *exec.ExitError
	if err != nil && !errors.As(err, &exit) || ctx.Err() != nil {
		t.Fatalf("h2spec: %v\n%s", err, out)
	}
	cases, err := parseH2SpecReport(report)
	if err != nil {
		t.Fatalf("h2spec report: %v\n%s", err, out)
	}
	return cases
}

func parseH2SpecReport(path string) ([]h2specCase, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	// A failure's text can hold the bytes of a frame, control bytes that
	// XML does not allow.
	b = bytes.Map(func(r rune) rune {
		if r < ' ' && r != '\t' && r != '\n' && r != '\r' {
			return '?'
		}
		return r
	}, b)
	var report struct {
		Suites []struct {
			Package string `xml:"package,attr"`
			Cases   []struct {
				ClassName string  `xml:"classname,attr"`
				Failure   *string `xml:"failure"`
				Error     *string `xml:"error"`
				Skipped   *string `xml:"skipped"`
			} `xml:"testcase"`
		} `xml:"testsuite"`
	}
	if err := xml.Unmarshal(b, &report); err != nil {
		return nil, err
	}
	var cases []h2specCase
	for _, s := range report.Suites {
		for i, c := range s.Cases {
			hc := h2specCase{id: fmt.Sprintf("%s/%d", s.Package, i+1), desc: c.ClassName}
			switch {
			case c.Failure != nil:
				hc.failed, hc.detail = true, *c.Failure
			case c.Error != nil:
				hc.failed, hc.detail = true, *c.Error
			case c.Skipped != nil:
				// Only a node that answers without a body makes h2spec
				// skip; these nodes have one.
				hc.failed, hc.detail = true, "skipped"
			}
			cases = append(cases, hc)
		}
	}
	return cases, nil
}
