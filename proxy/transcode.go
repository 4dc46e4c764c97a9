package proxy

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"net/http"
	"reflect"
	"slices"
	"strings"
	"time"

	"go.uber.org/zap"
	"google.golang.org/grpc/codes"

	"github.com/sidecarlb/sidecar/config"
	"github.com/sidecarlb/sidecar/discovery"
	"github.com/sidecarlb/sidecar/transcode"
)

// newTranscoder returns the transcoder of a grpc route whose codec turns
// transcoding on, or nil.
func newTranscoder(rt *route, m *Metrics) (*transcode.Transcoder, error) {
	c := rt.cfg.Codec
	if !c.Transcode || rt.cfg.Protocol != config.ProtocolGRPC {
		return nil, nil
	}
	var sources []transcode.Source
	if c.Descriptors != config.DescriptorsFile {
		sources = append(sources, &transcode.Reflection{Node: rt.reflectionNode, TLS: rt.pool.tls})
	}
	if c.DescriptorSet != "" {
		f, err := transcode.LoadFile(c.DescriptorSet)
		if err != nil {
			return nil, fmt.Errorf("codec.descriptor_set: %w", err)
		}
		sources = append(sources, f)
	}
	fetches := m.schemaFetches.MustCurryWith(map[string]string{"listener": rt.metrics.listener, "service": rt.cfg.Service})
	return transcode.New(transcode.NewSchemas(sources, transcode.SchemaOptions{
		Refresh: c.Refresh,
		OnFetch: func(source string, err error) {
			result := "ok"
			switch {
			case errors.Is(err, transcode.ErrNoSchema):
				result = "no_schema"
			case errors.Is(err, transcode.ErrUnknownService):
				result = "unknown_service"
			case err != nil:
				result = "error"
			}
			fetches.WithLabelValues(source, result).Inc()
		},
		Log: rt.log.Named("transcode"),
	})), nil
}

// inheritSchemas gives rt the schemas old fetched when both transcode the
// same service from the same sources, so a reload fetches nothing again.
func (rt *route) inheritSchemas(old *route) {
	if rt.codec == nil || old.codec == nil || old.cfg.Service != rt.cfg.Service || old.cfg.Codec != rt.cfg.Codec ||
		!reflect.DeepEqual(old.cfg.TLS, rt.cfg.TLS) {
		return
	}
	rt.codec.Schemas().Inherit(old.codec.Schemas())
}

// reflectionNode picks the node a schema is fetched from, as a request
// would be, without counting it as one.
func (rt *route) reflectionNode(ctx context.Context, exclude []string) (id, addr string, err error) {
	e, pk, err := rt.pick(ctx, 0, false, exclude)
	if err != nil {
		return "", "", err
	}
	release(pk)
	return e.ID, e.Addr, nil
}

// serveTranscoded carries a call a client made in a protocol the route
// transcodes (Connect, gRPC with JSON, gRPC-Web, JSON-RPC): it is read and
// turned into a gRPC call, sent through the same attempt path as native
// calls (balancing, retries, breakers, metrics), and the node's answer is
// turned back.
func (p *Proxy) serveTranscoded(w http.ResponseWriter, r *http.Request, rt *route, start time.Time) {
	m := &rt.metrics
	if v := rt.callVersion(r.Context()); v != "" {
		// Nodes of several versions: the call keeps to one, decoded with
		// its schema and sent to its nodes only.
		r = r.WithContext(transcode.WithVersion(r.Context(), v))
	}
	call, err := rt.codec.Decode(r.Context(), r)
	if err != nil {
		// Refused before anything was sent: malformed, unknown method, no schema.
		code := "transcode_" + transcode.ConnectCode(errCode(err))
		m.refused(code)
		p.logRefused(m.listener, rt.cfg.Service, r, code, err)
		w.Header().Set("X-Sidecar-Error", code)
		call.WriteError(w, err)
		return
	}
	ctx := r.Context()
	timeout := rt.cfg.Timeouts.Request
	if d := call.Timeout(); d > 0 && (timeout <= 0 || d < timeout) {
		timeout = d
	}
	if timeout > 0 {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, timeout)
		defer cancel()
	}
	if r.ProtoMajor == 1 {
		// A client stream over HTTP/1.1 reads answers while it sends.
		_ = http.NewResponseController(w).EnableFullDuplex()
	}
	resp, e, pk, err := p.roundTrip(ctx, call.Request(r), rt, true, start, accessOf(w))
	if err != nil {
		if r.Context().Err() != nil {
			m.refused("client_closed")
			return
		}
		if ctx.Err() == context.DeadlineExceeded || deadlinePassed(ctx) {
			// By the clock too: a node that honours the deadline sent
			// with the request may give up before ctx's timer fires.
			err = fmt.Errorf("%w after %v: %w", ErrUpstreamTimeout, timeout, err)
		}
		status, code := classify(err)
		m.refused(code)
		if pe := (*proxyError)(nil); !errors.As(err, &pe) {
			err = &proxyError{rt.cfg.Service, err}
		}
		p.logRefused(m.listener, rt.cfg.Service, r, code, err)
		w.Header().Set("X-Sidecar-Error", code)
		call.WriteError(w, &transcode.Error{Code: codes.Code(grpcCode(status)), Message: "sidecar: " + err.Error()})
		return
	}
	defer e.limits.endRequest() // after the body's Close
	defer resp.Body.Close()
	setAccessNode(w, e.Addr)
	err = call.Respond(w, resp)
	m.grpcCall(e, resp) // a gRPC call to the node, whatever the client spoke
	outcome := err
	if outcome == nil && isGatewayStatus(resp.StatusCode, rt.cfg.Resilience.Outlier.EjectOn5xx) {
		outcome = errGateway
	}
	done(pk, outcome, start)
	m.duration.Observe(time.Since(start).Seconds())
	if err != nil {
		p.log.Debug("transcoded call failed", zap.String("service", rt.cfg.Service),
			zap.String("endpoint", e.Addr), zap.Error(err))
	}
}

func errCode(err error) codes.Code {
	var e *transcode.Error
	if errors.As(err, &e) {
		return e.Code
	}
	return codes.Unknown
}

// VersionMeta is the Consul service meta key that carries a node's
// version; a tag "version=V" (or "version:V") serves when the meta is
// absent. A transcoding route whose nodes carry more than one version
// fetches a schema per version, and keeps each call to one version's
// nodes.
const VersionMeta = "version"

// endpointVersion is e's version, or "" for none.
func endpointVersion(e *discovery.Endpoint) string {
	if v := e.Meta[VersionMeta]; v != "" {
		return v
	}
	for _, t := range e.Tags {
		if len(t) > len(VersionMeta)+1 && strings.HasPrefix(t, VersionMeta) && (t[len(VersionMeta)] == '=' || t[len(VersionMeta)] == ':') {
			return t[len(VersionMeta)+1:]
		}
	}
	return ""
}

// versionSet is the versions of a route state's nodes, built once per
// state.
type versionSet struct {
	st      *routeState
	ids     []string            // every endpoint, sorted
	of      map[string]string   // endpoint ID → version
	exclude map[string][]string // version → the IDs of the other versions' nodes
}

// versionsOf returns st's versionSet; nil when its nodes have at most one
// version (then nothing changes for any call).
func (rt *route) versionsOf(st *routeState) *versionSet {
	if vs := rt.versions.Load(); vs != nil && vs.st == st {
		return vs.orNil()
	}
	vs := &versionSet{st: st, of: make(map[string]string, len(st.endpoints)), exclude: map[string][]string{}}
	for id, e := range st.endpoints {
		v := endpointVersion(&e.Endpoint)
		vs.ids = append(vs.ids, id)
		vs.of[id] = v
		if _, ok := vs.exclude[v]; !ok {
			vs.exclude[v] = nil // every version has an entry
		}
	}
	slices.Sort(vs.ids)
	for v := range vs.exclude {
		for _, id := range vs.ids {
			if vs.of[id] != v {
				vs.exclude[v] = append(vs.exclude[v], id)
			}
		}
	}
	rt.versions.Store(vs)
	return vs.orNil()
}

func (vs *versionSet) orNil() *versionSet {
	if len(vs.exclude) <= 1 {
		return nil
	}
	return vs
}

// has reports whether endpoint id is of the version ctx carries.
func (vs *versionSet) has(ctx context.Context, id string) bool {
	v := transcode.Version(ctx)
	return v == "" || vs.of[id] == v
}

// callVersion chooses the version of the nodes a transcoded call goes to:
// "" when they have at most one; otherwise that of a node drawn at random,
// so versions get calls in proportion to their nodes, and the route's
// balancer chooses among the version's nodes.
func (rt *route) callVersion(ctx context.Context) string {
	st := rt.state.Load()
	if w, err := rt.resolver.Watch(ctx, rt.cfg.Service); err == nil && (st == nil || st.snap != w.Snapshot()) {
		st = rt.update(w.Snapshot())
	}
	if st == nil {
		return "" // the pick will say why
	}
	vs := rt.versionsOf(st)
	if vs == nil {
		return ""
	}
	return vs.of[vs.ids[rand.IntN(len(vs.ids))]]
}

// versionExclude adds the nodes of other versions than ctx's to a pick's
// exclude list, when st's nodes have more than one; vs is nil otherwise.
func (rt *route) versionExclude(ctx context.Context, st *routeState, exclude []string) (*versionSet, []string) {
	v := transcode.Version(ctx)
	if v == "" {
		return nil, exclude
	}
	vs := rt.versionsOf(st)
	if vs == nil {
		return nil, exclude
	}
	if len(exclude) == 0 {
		return vs, vs.exclude[v]
	}
	return vs, append(slices.Clip(exclude), vs.exclude[v]...)
}
