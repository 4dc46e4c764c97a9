package transcode_test

import (
	"context"
	"errors"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"go.uber.org/zap/zaptest"
	"google.golang.org/grpc/codes"

	"github.com/sidecarlb/sidecar/internal/leakcheck"
	"github.com/sidecarlb/sidecar/transcode"
	"github.com/sidecarlb/sidecar/transcode/transcodetest"
)

// clock is a settable clock for Schemas.
type clock struct{ t atomic.Int64 }

func newClock() *clock { c := &clock{}; c.t.Store(time.Now().UnixNano()); return c }

func (c *clock) now() time.Time      { return time.Unix(0, c.t.Load()) }
func (c *clock) add(d time.Duration) { c.t.Add(int64(d)) }
func reflectionOf(addr string) *transcode.Reflection {
	return &transcode.Reflection{
		Node: func(context.Context, []string) (string, string, error) { return addr, addr, nil },
	}
}

// fetchCounter counts OnFetch calls by result.
type fetchCounter struct {
	mu   sync.Mutex
	ok   int
	errs []error
}

func (f *fetchCounter) onFetch(_ string, err error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if err == nil {
		f.ok++
	} else {
		f.errs = append(f.errs, err)
	}
}

func (f *fetchCounter) oks() int { f.mu.Lock(); defer f.mu.Unlock(); return f.ok }

func newSchemas(t *testing.T, c *clock, fc *fetchCounter, sources ...transcode.Source) *transcode.Schemas {
	opts := transcode.SchemaOptions{Refresh: time.Minute, Retry: time.Second, Log: zaptest.NewLogger(t)}
	if c != nil {
		opts.Now = c.now
	}
	if fc != nil {
		opts.OnFetch = fc.onFetch
	}
	s := transcode.NewSchemas(sources, opts)
	t.Cleanup(s.Close)
	return s
}

func wantCode(t *testing.T, err error, code codes.Code, httpStatus int) {
	t.Helper()
	var e *transcode.Error
	if !errors.As(err, &e) {
		t.Fatalf("error = %v, want a transcode.Error %v", err, code)
	}
	if e.Code != code || e.HTTPStatus != httpStatus {
		t.Fatalf("error = %v (code %v, HTTP %d), want code %v, HTTP %d", e, e.Code, e.HTTPStatus, code, httpStatus)
	}
}

// TestSchemasFetchOnceForConcurrentCalls: 32 concurrent first calls share
// one reflection stream; later calls make none.
func TestSchemasFetchOnceForConcurrentCalls(t *testing.T) {
	leakcheck.Check(t)
	node := transcodetest.Start(t, 1, transcodetest.ReflectionV1, "")
	fc := &fetchCounter{}
	s := newSchemas(t, nil, fc, reflectionOf(node.Addr))
	var wg sync.WaitGroup
	for range 32 {
		wg.Go(func() {
			if md, err := s.Method(context.Background(), transcodetest.Service, "Say"); err != nil || md.Name() != "Say" {
				t.Errorf("Method(Say) = %v, %v", md, err)
			}
		})
	}
	wg.Wait()
	for range 100 {
		if _, err := s.Method(context.Background(), transcodetest.Service, "Count"); err != nil {
			t.Fatal(err)
		}
	}
	if n := node.ReflectionCalls.Load(); n != 1 {
		t.Errorf("reflection calls on the node = %d, want 1", n)
	}
	if n := fc.oks(); n != 1 {
		t.Errorf("fetches = %d, want 1", n)
	}
}

// TestSchemasReflectionV1Alpha: a node with only v1alpha is asked again
// in v1alpha.
func TestSchemasReflectionV1Alpha(t *testing.T) {
	node := transcodetest.Start(t, 1, transcodetest.ReflectionV1Alpha, "")
	s := newSchemas(t, nil, nil, reflectionOf(node.Addr))
	md, err := s.Method(context.Background(), transcodetest.Service, "Say")
	if err != nil {
		t.Fatalf("Method(Say) error = %v", err)
	}
	// The import came along.
	if at := md.Input().Fields().ByName("at"); at == nil || at.Message().FullName() != "google.protobuf.Timestamp" {
		t.Errorf("EchoRequest.at = %v, want a google.protobuf.Timestamp", at)
	}
}

// TestSchemasNoReflection: a node without reflection and no descriptor set
// is 415; with a descriptor set file the file serves.
func TestSchemasNoReflection(t *testing.T) {
	node := transcodetest.Start(t, 1, transcodetest.ReflectionNone, "")
	fc := &fetchCounter{}
	s := newSchemas(t, nil, fc, reflectionOf(node.Addr))
	_, err := s.Method(context.Background(), transcodetest.Service, "Say")
	wantCode(t, err, codes.Unimplemented, http.StatusUnsupportedMediaType)
	if len(fc.errs) != 1 || !errors.Is(fc.errs[0], transcode.ErrNoSchema) {
		t.Errorf("fetch errors = %v, want one ErrNoSchema", fc.errs)
	}

	path := filepath.Join(t.TempDir(), "echo.pb")
	if err := os.WriteFile(path, transcodetest.DescriptorSet(1), 0o600); err != nil {
		t.Fatal(err)
	}
	f, err := transcode.LoadFile(path)
	if err != nil {
		t.Fatalf("LoadFile() error = %v", err)
	}
	s = newSchemas(t, nil, nil, reflectionOf(node.Addr), f)
	if _, err := s.Method(context.Background(), transcodetest.Service, "Say"); err != nil {
		t.Errorf("Method(Say) with a descriptor set error = %v", err)
	}
	_, err = s.Method(context.Background(), transcodetest.Service, "Shout")
	wantCode(t, err, codes.Unimplemented, 0)
}

// TestLoadFileErrors: a file that is not a descriptor set, or lacks an
// import, is refused with the reason.
func TestLoadFileErrors(t *testing.T) {
	dir := t.TempDir()
	bad := filepath.Join(dir, "bad.pb")
	_ = os.WriteFile(bad, []byte("not protobuf \xff\xff"), 0o600)
	if _, err := transcode.LoadFile(bad); err == nil {
		t.Error("LoadFile(garbage) error = nil")
	}
	if _, err := transcode.LoadFile(filepath.Join(dir, "missing.pb")); err == nil {
		t.Error("LoadFile(missing) error = nil")
	}
}

// TestSchemasUnknownServiceAndMethod: 501 for both, and a method added on
// the node is found by fetching again, at most once per Retry.
func TestSchemasUnknownServiceAndMethod(t *testing.T) {
	node := transcodetest.Start(t, 1, transcodetest.ReflectionV1, "")
	c := newClock()
	s := newSchemas(t, c, nil, reflectionOf(node.Addr))
	ctx := context.Background()
	_, err := s.Method(ctx, "test.v1.Nope", "Say")
	wantCode(t, err, codes.Unimplemented, 0)

	if _, err := s.Method(ctx, transcodetest.Service, "Say"); err != nil {
		t.Fatal(err)
	}
	_, err = s.Method(ctx, transcodetest.Service, "Shout")
	wantCode(t, err, codes.Unimplemented, 0)
	calls := node.ReflectionCalls.Load()

	// The node is upgraded in place: Shout appears.
	node.Server.Stop()
	node2 := transcodetest.Start(t, 2, transcodetest.ReflectionV1, node.Addr)
	_, err = s.Method(ctx, transcodetest.Service, "Shout")
	wantCode(t, err, codes.Unimplemented, 0) // within Retry: not asked again
	if n := node2.ReflectionCalls.Load(); n != 0 {
		t.Fatalf("reflection calls within Retry = %d, want 0", n)
	}
	c.add(2 * time.Second)
	if _, err := s.Method(ctx, transcodetest.Service, "Shout"); err != nil {
		t.Fatalf("Method(Shout) after the upgrade error = %v", err)
	}
	if n := node2.ReflectionCalls.Load(); n != 1 {
		t.Errorf("reflection calls after the upgrade = %d, want 1 (old node had %d)", n, calls)
	}
}

// TestSchemasRefresh: a schema older than Refresh is fetched again in the
// background while the old one serves.
func TestSchemasRefresh(t *testing.T) {
	leakcheck.Check(t)
	node := transcodetest.Start(t, 1, transcodetest.ReflectionV1, "")
	c := newClock()
	fc := &fetchCounter{}
	s := newSchemas(t, c, fc, reflectionOf(node.Addr))
	ctx := context.Background()
	if _, err := s.Method(ctx, transcodetest.Service, "Say"); err != nil {
		t.Fatal(err)
	}
	c.add(2 * time.Minute)
	if _, err := s.Method(ctx, transcodetest.Service, "Say"); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(10 * time.Second)
	for fc.oks() < 2 && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	if n := fc.oks(); n != 2 {
		t.Errorf("fetches after Refresh = %d, want 2", n)
	}
}

// TestSchemasFullName: a service named without its package is found in
// the services a node lists by reflection, or a descriptor set defines.
func TestSchemasFullName(t *testing.T) {
	node := transcodetest.Start(t, 1, transcodetest.ReflectionV1Alpha, "")
	f, err := transcode.LoadFileFromBytes(transcodetest.DescriptorSet(1))
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name string
		src  transcode.Source
	}{{"reflection", reflectionOf(node.Addr)}, {"file", f}} {
		t.Run(tc.name, func(t *testing.T) {
			s := newSchemas(t, nil, nil, tc.src)
			if got, err := s.FullName(context.Background(), "Echo"); err != nil || got != transcodetest.Service {
				t.Errorf("FullName(Echo) = %q, %v; want %s", got, err, transcodetest.Service)
			}
			_, err := s.FullName(context.Background(), "Nope")
			wantCode(t, err, codes.Unimplemented, 0)
		})
	}
}

// TestSchemasPerVersion: a call's version (WithVersion) picks the schema
// fetched from a node of that version, each fetched once, kept apart from
// the others and from calls with no version.
func TestSchemasPerVersion(t *testing.T) {
	v1 := transcodetest.Start(t, 1, transcodetest.ReflectionV1, "")
	v2 := transcodetest.Start(t, 2, transcodetest.ReflectionV1, "")
	var mu sync.Mutex
	var asked []string
	src := &transcode.Reflection{Node: func(ctx context.Context, _ []string) (string, string, error) {
		mu.Lock()
		asked = append(asked, transcode.Version(ctx))
		mu.Unlock()
		if transcode.Version(ctx) == "2" {
			return v2.Addr, v2.Addr, nil
		}
		return v1.Addr, v1.Addr, nil
	}}
	s := newSchemas(t, nil, nil, src)
	for range 3 {
		if _, err := s.Method(transcode.WithVersion(context.Background(), "2"), transcodetest.Service, "Shout"); err != nil {
			t.Fatalf("Method(Shout) at version 2 error = %v", err)
		}
		if _, err := s.Method(transcode.WithVersion(context.Background(), "1"), transcodetest.Service, "Say"); err != nil {
			t.Fatalf("Method(Say) at version 1 error = %v", err)
		}
	}
	_, err := s.Method(transcode.WithVersion(context.Background(), "1"), transcodetest.Service, "Shout")
	wantCode(t, err, codes.Unimplemented, 0)
	if _, err := s.Method(context.Background(), transcodetest.Service, "Say"); err != nil {
		t.Fatalf("Method(Say) with no version error = %v", err)
	}
	mu.Lock()
	defer mu.Unlock()
	if want := []string{"2", "1", ""}; !slices.Equal(asked, want) {
		t.Errorf("nodes asked for versions %q, want %q (one fetch each)", asked, want)
	}
	if n1, n2 := v1.ReflectionCalls.Load(), v2.ReflectionCalls.Load(); n1 != 2 || n2 != 1 {
		t.Errorf("reflection streams = v1 %d, v2 %d; want 2 (version 1, none) and 1", n1, n2)
	}
}
