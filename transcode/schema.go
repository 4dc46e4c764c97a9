package transcode

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"go.uber.org/zap"
	"google.golang.org/grpc/codes"
	"google.golang.org/protobuf/reflect/protoreflect"
	"google.golang.org/protobuf/reflect/protoregistry"
)

// Source fetches the descriptors that define a service.
type Source interface {
	// Fetch returns files holding service (a full name, "pkg.Service") and
	// everything it depends on. It blocks until they are fetched or ctx
	// ends, and is safe for concurrent use. ErrNoSchema: the source
	// cannot describe services (the node has no reflection service);
	// ErrUnknownService: it can, but not this one.
	Fetch(ctx context.Context, service string) (*protoregistry.Files, error)
	// Name names the source in metrics and logs: "reflection" or "file".
	Name() string
}

// Lister is a Source that can list the services it describes.
type Lister interface {
	// Services returns the full names of the services the source knows.
	// It blocks, and is safe for concurrent use.
	Services(ctx context.Context) ([]string, error)
}

var (
	// ErrNoSchema: a source cannot describe any service.
	ErrNoSchema = errors.New("no schema source")
	// ErrUnknownService: a source knows no such service.
	ErrUnknownService = errors.New("unknown service")
)

// Schemas keeps the descriptors of the services one route calls, fetched
// from its sources once per service (and per version of its nodes: see
// WithVersion) and kept: concurrent first calls share
// one fetch, a schema older than Refresh is fetched again in the
// background while the old one serves, and a method the schema does not
// know fetches it again (at most once per Retry) before it is refused.
// Its methods are safe for concurrent use.
type Schemas struct {
	sources []Source
	opts    SchemaOptions

	ctx    context.Context // owns the fetches; cancelled by Close
	cancel context.CancelFunc
	wg     sync.WaitGroup

	slots sync.Map // service name, or "name@version" → *slot

	// unknownSlots counts the slots kept for names no source knows, which
	// come from clients' paths: past maxUnknownSlots, such a slot is
	// dropped after its fetch rather than kept, so made-up names cannot
	// grow the map without bound.
	unknownSlots atomic.Int64

	namesMu sync.Mutex // serialises listings; never held on the hot path
	names   atomic.Pointer[nameIndex]
}

// SchemaOptions tune a Schemas.
type SchemaOptions struct {
	// Refresh is how old a schema may grow before it is fetched again; if
	// zero, 5m is used.
	Refresh time.Duration
	// Retry is the least time between two fetches of one service made
	// because a call named something the schema lacked (or the last fetch
	// failed); if zero, 1s is used.
	Retry time.Duration
	// FetchTimeout bounds one fetch; if zero, 10s is used.
	FetchTimeout time.Duration
	// OnFetch, when not nil, is called after each fetch from a source with
	// its outcome (nil on success). It must not block.
	OnFetch func(source string, err error)
	// Now is the clock; if nil, time.Now is used.
	Now func() time.Time
	Log *zap.Logger
}

// slot is one service's schema: the last fetch's outcome, and the fetch
// under way, if any.
type slot struct {
	cur    atomic.Pointer[fetched]
	mu     sync.Mutex
	flight chan struct{} // closed when the fetch under way ends; nil if none
	// unknown is set while the slot is counted in Schemas.unknownSlots;
	// only the fetch goroutine, one at a time, reads and writes it.
	unknown bool
}

// maxUnknownSlots bounds the slots kept for service names no source knows.
const maxUnknownSlots = 1024

type fetched struct {
	svc protoreflect.ServiceDescriptor
	err error
	at  time.Time
}

// NewSchemas returns a Schemas over sources, asked in order: the next is
// asked when one has no schema or does not know the service.
func NewSchemas(sources []Source, opts SchemaOptions) *Schemas {
	if opts.Refresh <= 0 {
		opts.Refresh = 5 * time.Minute
	}
	if opts.Retry <= 0 {
		opts.Retry = time.Second
	}
	if opts.FetchTimeout <= 0 {
		opts.FetchTimeout = 10 * time.Second
	}
	if opts.Now == nil {
		opts.Now = time.Now
	}
	if opts.Log == nil {
		opts.Log = zap.NewNop()
	}
	ctx, cancel := context.WithCancel(context.Background())
	return &Schemas{sources: sources, opts: opts, ctx: ctx, cancel: cancel}
}

// Inherit starts s with the schemas old has fetched, for a route that
// replaces another with the same sources (a config reload): calls go on
// without fetching them again. Call it before s is used.
func (s *Schemas) Inherit(old *Schemas) {
	old.slots.Range(func(k, v any) bool {
		if f := v.(*slot).cur.Load(); f != nil {
			sl := &slot{}
			sl.cur.Store(f)
			s.slots.Store(k, sl)
		}
		return true
	})
	if idx := old.names.Load(); idx != nil {
		s.names.Store(idx)
	}
}

// Close stops the fetches under way and waits for them.
func (s *Schemas) Close() {
	s.cancel()
	s.wg.Wait()
}

// Method returns the descriptor of service's method. It blocks while the
// service's schema is first fetched (or fetched again for a name it
// lacked); otherwise it reads the cached schema and takes no lock. Errors
// are *Error: Unimplemented for an unknown service or method (HTTPStatus
// 415 when no source has a schema at all), Unavailable when a fetch
// failed.
//
// The schema is the one of the nodes of the version ctx carries
// (WithVersion), or of any node when it carries none.
func (s *Schemas) Method(ctx context.Context, service, method string) (protoreflect.MethodDescriptor, error) {
	version := Version(ctx)
	sl := s.slot(service, version)
	f := sl.cur.Load()
	now := s.opts.Now()
	switch {
	case f == nil:
		f = s.wait(ctx, service, version, sl)
	case f.err != nil && now.Sub(f.at) >= s.opts.Retry:
		f = s.wait(ctx, service, version, sl)
	case f.err == nil && now.Sub(f.at) >= s.opts.Refresh:
		s.start(service, version, sl) // the old schema serves meanwhile
	}
	if f == nil {
		return nil, Errorf(codes.Canceled, "waiting for the schema of %s: %v", service, ctx.Err())
	}
	if f.err != nil {
		return nil, f.err
	}
	if md := f.svc.Methods().ByName(protoreflect.Name(method)); md != nil {
		return md, nil
	}
	if now.Sub(f.at) >= s.opts.Retry {
		// A method added since the fetch: ask again.
		if f = s.wait(ctx, service, version, sl); f != nil && f.err == nil {
			if md := f.svc.Methods().ByName(protoreflect.Name(method)); md != nil {
				return md, nil
			}
		}
	}
	return nil, Errorf(codes.Unimplemented, "service %s has no method %s", service, method)
}

// Stale makes the next call to service fetch its schema again, at most
// once per Retry: for a message the schema failed to read (a field added
// on the node). It reports whether a fetch was made and succeeded.
func (s *Schemas) Stale(ctx context.Context, service string) bool {
	version := Version(ctx)
	sl := s.slot(service, version)
	f := sl.cur.Load()
	if f == nil || s.opts.Now().Sub(f.at) < s.opts.Retry {
		return false
	}
	f = s.wait(ctx, service, version, sl)
	return f != nil && f.err == nil
}

// slotKey is the slots' key of service's schema at version.
func slotKey(service, version string) string {
	if version == "" {
		return service
	}
	return service + "@" + version // '@' is in no protobuf name
}

func (s *Schemas) slot(service, version string) *slot {
	key := slotKey(service, version)
	if v, ok := s.slots.Load(key); ok {
		return v.(*slot)
	}
	v, _ := s.slots.LoadOrStore(key, &slot{})
	return v.(*slot)
}

// wait starts a fetch of service unless one is under way, and waits for
// it. It returns nil when ctx ends first.
func (s *Schemas) wait(ctx context.Context, service, version string, sl *slot) *fetched {
	ch := s.start(service, version, sl)
	select {
	case <-ch:
		return sl.cur.Load()
	case <-ctx.Done():
		return nil
	}
}

// start starts a fetch of service unless one is under way, and returns the
// channel closed when it ends.
func (s *Schemas) start(service, version string, sl *slot) <-chan struct{} {
	sl.mu.Lock()
	defer sl.mu.Unlock()
	if sl.flight != nil {
		return sl.flight
	}
	ch := make(chan struct{})
	sl.flight = ch
	s.wg.Add(1)
	go func() {
		defer s.wg.Done()
		f := s.fetch(service, version)
		if prev := sl.cur.Load(); f.err != nil && prev != nil && prev.err == nil && !isUnknown(f.err) {
			// A failed refresh keeps the schema that works, for another Retry.
			s.opts.Log.Warn("schema refresh failed", zap.String("grpc_service", service), zap.String("version", version), zap.Error(f.err))
			f = &fetched{svc: prev.svc, at: f.at.Add(s.opts.Retry - s.opts.Refresh)}
		}
		sl.cur.Store(f)
		s.keepUnknown(slotKey(service, version), sl, f.svc == nil && isUnknown(f.err))
		sl.mu.Lock()
		sl.flight = nil
		sl.mu.Unlock()
		close(ch)
	}()
	return ch
}

// keepUnknown counts sl (at key) among the slots of unknown names when
// unknown, or drops it from the map when maxUnknownSlots are kept already;
// a slot whose name became known leaves the count.
func (s *Schemas) keepUnknown(key string, sl *slot, unknown bool) {
	switch {
	case unknown && !sl.unknown:
		if s.unknownSlots.Add(1) > maxUnknownSlots {
			s.unknownSlots.Add(-1)
			s.slots.CompareAndDelete(key, sl)
			return
		}
		sl.unknown = true
	case !unknown && sl.unknown:
		s.unknownSlots.Add(-1)
		sl.unknown = false
	}
}

func isUnknown(err error) bool {
	var e *Error
	return errors.As(err, &e) && e.Code == codes.Unimplemented
}

// fetch asks the sources in turn for service's schema, at version: the
// sources' context carries it, for Reflection's Node to pick a node of it.
func (s *Schemas) fetch(service, version string) (f *fetched) {
	defer func() {
		if r := recover(); r != nil {
			s.opts.Log.Error("schema fetch panicked", zap.String("grpc_service", service), zap.Any("panic", r), zap.Stack("stack"))
			f = &fetched{err: Errorf(codes.Internal, "fetching the schema of %s failed", service), at: s.opts.Now()}
		}
	}()
	ctx, cancel := context.WithTimeout(WithVersion(s.ctx, version), s.opts.FetchTimeout)
	defer cancel()
	unknown := false
	for _, src := range s.sources {
		files, err := src.Fetch(ctx, service)
		if s.opts.OnFetch != nil {
			s.opts.OnFetch(src.Name(), err)
		}
		switch {
		case errors.Is(err, ErrNoSchema):
			continue
		case errors.Is(err, ErrUnknownService):
			unknown = true
			continue
		case err != nil:
			return &fetched{err: Errorf(codes.Unavailable, "fetch the schema of %s by %s: %v", service, src.Name(), err), at: s.opts.Now()}
		}
		d, err := files.FindDescriptorByName(protoreflect.FullName(service))
		sd, ok := d.(protoreflect.ServiceDescriptor)
		if err != nil || !ok {
			unknown = true
			continue
		}
		return &fetched{svc: sd, at: s.opts.Now()}
	}
	if unknown {
		return &fetched{err: Errorf(codes.Unimplemented, "unknown service %s", service), at: s.opts.Now()}
	}
	return &fetched{err: &Error{Code: codes.Unimplemented, HTTPStatus: 415,
		Message: fmt.Sprintf("cannot transcode calls to %s: the node has no gRPC reflection service and codec.descriptor_set is not set", service)},
		at: s.opts.Now()}
}

// FullName returns the full name of the service named short ("Greeter"
// for "pkg.v1.Greeter"), from the services the sources list: go-micro's
// JSON-RPC names services without their package. The list is asked for
// when a name is not in it, at most once per Retry, and kept until
// Refresh. It blocks while the list is fetched; otherwise it takes no
// lock.
func (s *Schemas) FullName(ctx context.Context, short string) (string, error) {
	now := s.opts.Now()
	idx := s.names.Load()
	full, ok := "", false
	if idx != nil {
		full, ok = idx.names[short]
	}
	if idx == nil || (!ok && now.Sub(idx.at) >= s.opts.Retry) || now.Sub(idx.at) >= s.opts.Refresh {
		s.namesMu.Lock()
		if cur := s.names.Load(); cur == idx { // nobody listed meanwhile
			idx = s.listServices(ctx)
			s.names.Store(idx)
		} else {
			idx = cur
		}
		s.namesMu.Unlock()
		full, ok = idx.names[short]
	}
	switch {
	case !ok:
		return "", Errorf(codes.Unimplemented, "unknown service %s", short)
	case full == "":
		return "", Errorf(codes.InvalidArgument, "service name %s is ambiguous: name it with its package", short)
	}
	return full, nil
}

// nameIndex maps short service names to full ones ("" when ambiguous).
type nameIndex struct {
	names map[string]string
	at    time.Time
}

// listServices asks every Lister source for its services.
func (s *Schemas) listServices(ctx context.Context) *nameIndex {
	idx := &nameIndex{names: map[string]string{}, at: s.opts.Now()}
	for _, src := range s.sources {
		l, ok := src.(Lister)
		if !ok {
			continue
		}
		lctx, cancel := context.WithTimeout(ctx, s.opts.FetchTimeout)
		list, err := l.Services(lctx)
		cancel()
		if err != nil {
			s.opts.Log.Debug("list services failed", zap.String("source", src.Name()), zap.Error(err))
			continue
		}
		for _, n := range list {
			short := n[strings.LastIndexByte(n, '.')+1:]
			if prev, dup := idx.names[short]; dup && prev != n {
				idx.names[short] = ""
			} else {
				idx.names[short] = n
			}
		}
	}
	return idx
}

type versionKey struct{}

// WithVersion returns ctx carrying the version of the nodes a call goes
// to: Schemas.Method then answers from the schema fetched from nodes of
// that version, kept apart from other versions', and a fetch's context
// carries it to Reflection's Node. An empty version is no version.
func WithVersion(ctx context.Context, version string) context.Context {
	if version == "" {
		return ctx
	}
	return context.WithValue(ctx, versionKey{}, version)
}

// Version returns the version ctx carries, or "".
func Version(ctx context.Context) string {
	v, _ := ctx.Value(versionKey{}).(string)
	return v
}
