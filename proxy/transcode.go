package proxy

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"reflect"
	"time"

	"go.uber.org/zap"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/sidecarlb/sidecar/config"
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
		creds := insecure.NewCredentials()
		if rt.pool.tls != nil {
			creds = credentials.NewTLS(rt.pool.tls.Clone())
		}
		sources = append(sources, &transcode.Reflection{
			Node:        rt.reflectionNode,
			DialOptions: []grpc.DialOption{grpc.WithTransportCredentials(creds)},
		})
	}
	if c.DescriptorSet != "" {
		f, err := transcode.LoadFile(c.DescriptorSet)
		if err != nil {
			return nil, fmt.Errorf("codec.descriptor_set: %w", err)
		}
		sources = append(sources, f)
	}
	fetches := m.schemaFetches.MustCurryWith(map[string]string{"listener": rt.listener, "service": rt.cfg.Service})
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
	call, err := rt.codec.Decode(r.Context(), r)
	if err != nil {
		// Refused before anything was sent: malformed, unknown method, no schema.
		m.refused("transcode_" + transcode.ConnectCode(errCode(err)))
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
	resp, e, pk, err := p.roundTrip(ctx, call.Request(r), rt, true, start)
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
		w.Header().Set("X-Sidecar-Error", code)
		call.WriteError(w, &transcode.Error{Code: codes.Code(grpcCode(status)), Message: "sidecar: " + err.Error()})
		return
	}
	defer e.limits.endRequest() // after the body's Close
	defer resp.Body.Close()
	e.requests[codeClass(resp.StatusCode)].Inc()
	err = call.Respond(w, resp)
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
