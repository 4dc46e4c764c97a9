package proxy

import (
	"io"
	"math/rand/v2"
	"net/http"
	"sync/atomic"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
)

// Observability configures what the proxy tells about each request beyond
// its metrics: the access log and W3C trace context.
type Observability struct {
	// Access, when not nil, gets one Info line per request, upgrade or
	// TCP connection (log.access). Nil (the default) logs none, and the
	// request path does no work for it.
	Access *zap.Logger
	// AccessSample is the share of lines logged, in (0, 1]; if zero, 1
	// (log.access_sample). Answers the sidecar makes itself and 5xx
	// answers are logged whatever the sample.
	AccessSample float64
	// StartTraces gives a request that arrives without a valid traceparent
	// header a new trace (tracing.start): a random trace id and parent id,
	// flagged sampled, sent to the node and logged. A valid traceparent,
	// and the tracestate beside it, are passed on unchanged either way:
	// the sidecar records no span of its own, so it is no parent.
	StartTraces bool
}

// SetObservability sets the access log and tracing. Call it before the
// proxy serves; it is not safe for concurrent use with serving.
func (p *Proxy) SetObservability(o Observability) {
	if o.AccessSample <= 0 || o.AccessSample > 1 {
		o.AccessSample = 1
	}
	p.obs = o
}

// refusedLog is the logger of the answers the sidecar makes itself: Warn,
// at most 10 lines a second and one in 100 past those, so that a storm
// of refusals cannot flood the log.
func refusedLog(log *zap.Logger) *zap.Logger {
	return log.WithOptions(zap.WrapCore(func(c zapcore.Core) zapcore.Core {
		return zapcore.NewSamplerWithOptions(c, time.Second, 10, 100)
	}))
}

// logRefused logs an answer the sidecar made itself instead of a node's,
// whether or not the access log is on. r is nil for a TCP connection.
func (p *Proxy) logRefused(listener, service string, r *http.Request, code string, err error) {
	if ce := p.refusedLog.Check(zap.WarnLevel, "request refused"); ce != nil {
		fields := []zap.Field{zap.String("listener", listener), zap.String("service", service),
			zap.String("error_code", code), zap.Error(err)}
		if r != nil {
			fields = append(fields, zap.String("method", r.Method), zap.String("path", r.URL.Path))
			if id, ok := traceID(r.Header); ok {
				fields = append(fields, zap.String("trace_id", id))
			}
		}
		ce.Write(fields...)
	}
}

// observe starts what p.obs asks of a request: a trace id when it has none
// and StartTraces is set, and, with the access log on, a writer that
// records the answer for the line logAccess writes. It returns w itself
// and a nil recorder with the access log off.
func (p *Proxy) observe(w http.ResponseWriter, r *http.Request, listener string) (http.ResponseWriter, *accessWriter) {
	if p.obs.StartTraces {
		if _, ok := traceID(r.Header); !ok {
			startTrace(r.Header)
		}
	}
	if p.obs.Access == nil {
		return w, nil
	}
	aw := &accessWriter{ResponseWriter: w, start: time.Now(), listener: listener,
		method: r.Method, authority: r.Host, path: r.URL.Path}
	if r.Body != nil && r.Body != http.NoBody {
		aw.in.ReadCloser = r.Body
		r.Body = &aw.in
	}
	aw.traceID, _ = traceID(r.Header)
	return aw, aw
}

// logAccess writes a's line, unless sampling leaves it out.
func (p *Proxy) logAccess(a *accessWriter) {
	code := a.errorCode()
	if code == "" && a.status < 500 && p.obs.AccessSample < 1 && rand.Float64() >= p.obs.AccessSample {
		return
	}
	fields := make([]zap.Field, 0, 16)
	fields = append(fields,
		zap.String("listener", a.listener),
		zap.String("service", a.service),
		zap.String("method", a.method),
		zap.String("authority", a.authority),
		zap.String("path", a.path),
		zap.Int("status", a.status),
	)
	if g := a.grpcStatus(); g != "" {
		fields = append(fields, zap.String("grpc_status", g))
	}
	fields = append(fields,
		zap.Duration("duration", time.Since(a.start)),
		zap.Int64("bytes_in", a.in.n.Load()),
		zap.Int64("bytes_out", a.out),
		zap.String("node", a.node),
		zap.Int("attempts", a.attempts),
	)
	if code != "" {
		fields = append(fields, zap.String("error_code", code))
	}
	if a.traceID != "" {
		fields = append(fields, zap.String("trace_id", a.traceID))
	}
	p.obs.Access.Info("access", fields...)
}

// logTCPAccess writes the access line of a TCP connection: no method,
// path or status; code is the sidecar's error code when no node took it;
// in and out are the bytes from the client and from the node.
func (p *Proxy) logTCPAccess(listener, service, client, node string, attempts int, code string, start time.Time, in, out int64) {
	if code == "" && p.obs.AccessSample < 1 && rand.Float64() >= p.obs.AccessSample {
		return
	}
	fields := []zap.Field{
		zap.String("listener", listener),
		zap.String("service", service),
		zap.String("client", client),
		zap.Duration("duration", time.Since(start)),
		zap.String("node", node),
		zap.Int("attempts", attempts),
		zap.Int64("bytes_in", in),
		zap.Int64("bytes_out", out),
	}
	if code != "" {
		fields = append(fields, zap.String("error_code", code))
	}
	p.obs.Access.Info("access", fields...)
}

// accessWriter records what the access log says of a request's answer.
// The request path fills in the route's service, the node and the
// attempts as it learns them.
type accessWriter struct {
	http.ResponseWriter
	start                   time.Time
	listener, service, node string
	method, authority, path string // as the client sent them, before the request is rewritten
	traceID                 string
	status, attempts        int
	out                     int64
	in                      countingBody
}

func (a *accessWriter) WriteHeader(code int) {
	if a.status == 0 || a.status < 200 && code >= 200 {
		a.status = code
	}
	a.ResponseWriter.WriteHeader(code)
}

func (a *accessWriter) Write(b []byte) (int, error) {
	if a.status == 0 {
		a.status = http.StatusOK
	}
	n, err := a.ResponseWriter.Write(b)
	a.out += int64(n)
	return n, err
}

// Unwrap lets http.ResponseController reach the writer's Flush, Hijack
// and deadlines.
func (a *accessWriter) Unwrap() http.ResponseWriter { return a.ResponseWriter }

// AdoptHeader keeps the underlying writer's header adoption (answerHeader).
func (a *accessWriter) AdoptHeader(h http.Header) bool {
	ad, ok := a.ResponseWriter.(headerAdopter)
	return ok && ad.AdoptHeader(h)
}

// errorCode is the X-Sidecar-Error of the answer: set when the sidecar
// answered itself.
func (a *accessWriter) errorCode() string {
	if v := a.Header()["X-Sidecar-Error"]; len(v) > 0 {
		return v[0]
	}
	return ""
}

// grpcStatus is the grpc-status the answer carried, in its header or its
// trailers, or "".
func (a *accessWriter) grpcStatus() string {
	h := a.Header()
	for _, k := range [...]string{"Grpc-Status", http.TrailerPrefix + "Grpc-Status"} {
		if v := h[k]; len(v) > 0 {
			return v[0]
		}
	}
	return ""
}

// setAccess tells w's access line, if it has one, the route's service.
func setAccessService(w http.ResponseWriter, service string) {
	if a, ok := w.(*accessWriter); ok {
		a.service = service
	}
}

// setAccessNode tells w's access line, if it has one, the node that
// answered.
func setAccessNode(w http.ResponseWriter, node string) {
	if a, ok := w.(*accessWriter); ok {
		a.node = node
	}
}

// accessOf returns w's access recorder, or nil.
func accessOf(w http.ResponseWriter) *accessWriter {
	a, _ := w.(*accessWriter)
	return a
}

// countingBody counts the bytes of a request body read.
type countingBody struct {
	io.ReadCloser
	n atomic.Int64 // read by the access line while a try may still read
}

func (c *countingBody) Read(p []byte) (int, error) {
	n, err := c.ReadCloser.Read(p)
	c.n.Add(int64(n))
	return n, err
}

// TryRead passes the body's TryRead through (internal/replay uses it to
// send what is at hand without waiting), so turning the access log on does
// not change how a streamed body is sent.
func (c *countingBody) TryRead(p []byte) (int, error, bool) {
	src, ok := c.ReadCloser.(interface {
		TryRead([]byte) (int, error, bool)
	})
	if !ok {
		return 0, nil, false
	}
	n, err, ok := src.TryRead(p)
	c.n.Add(int64(n))
	return n, err, ok
}

// traceID returns the trace id of a valid W3C traceparent header in h.
func traceID(h http.Header) (string, bool) {
	v := h["Traceparent"]
	if len(v) != 1 || !validTraceparent(v[0]) {
		return "", false
	}
	return v[0][3:35], true
}

// validTraceparent reports whether s is a traceparent this proxy passes
// on: "version-traceid-parentid-flags" in lower-case hex, version not ff,
// ids not all zeros, with nothing after the flags for version 00 (a later
// version may append fields).
func validTraceparent(s string) bool {
	if len(s) < 55 || s[2] != '-' || s[35] != '-' || s[52] != '-' {
		return false
	}
	if !lowerHex(s[0:2]) || !lowerHex(s[3:35]) || !lowerHex(s[36:52]) || !lowerHex(s[53:55]) {
		return false
	}
	if s[0:2] == "ff" || allZeros(s[3:35]) || allZeros(s[36:52]) {
		return false
	}
	if s[0:2] == "00" {
		return len(s) == 55
	}
	return len(s) == 55 || s[55] == '-'
}

func lowerHex(s string) bool {
	for i := 0; i < len(s); i++ {
		c := s[i]
		if (c < '0' || c > '9') && (c < 'a' || c > 'f') {
			return false
		}
	}
	return true
}

func allZeros(s string) bool {
	for i := 0; i < len(s); i++ {
		if s[i] != '0' {
			return false
		}
	}
	return true
}

// startTrace gives h a new traceparent: version 00, a random trace id and
// parent id, sampled. A tracestate belongs to the trace it came with, so
// it goes.
func startTrace(h http.Header) {
	var b [55]byte
	b[0], b[1], b[2] = '0', '0', '-'
	hi, lo := rand.Uint64()|1, rand.Uint64() // never all zeros
	putHex(b[3:19], hi)
	putHex(b[19:35], lo)
	b[35] = '-'
	putHex(b[36:52], rand.Uint64()|1)
	b[52], b[53], b[54] = '-', '0', '1'
	h["Traceparent"] = []string{string(b[:])}
	delete(h, "Tracestate")
}

// putHex writes v as 16 lower-case hex digits into b.
func putHex(b []byte, v uint64) {
	const digits = "0123456789abcdef"
	for i := 15; i >= 0; i-- {
		b[i] = digits[v&0xf]
		v >>= 4
	}
}
