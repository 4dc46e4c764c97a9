package transcode

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net/http"
	"slices"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protodesc"
	"google.golang.org/protobuf/reflect/protoregistry"
	"google.golang.org/protobuf/types/descriptorpb"
)

// Reflection fetches schemas from a node's gRPC server reflection service,
// grpc.reflection.v1, falling back to v1alpha: one stream per fetch, to one
// node. The stream goes over net/http's own HTTP/2 client (h2c, or TLS
// with h2 by ALPN) with the few reflection messages encoded by hand
// (reflectionpb.go), so that grpc-go's client and transport are not linked
// into the sidecar for it.
type Reflection struct {
	// Node returns a healthy node to ask, other than those in exclude: an
	// ID to exclude it by, and its address. It may block.
	Node func(ctx context.Context, exclude []string) (id, addr string, err error)
	// TLS, when not nil, reaches the nodes over TLS; nil: h2c.
	TLS *tls.Config
}

// Name implements Source.
func (*Reflection) Name() string { return "reflection" }

// maxReflectionNodes bounds the nodes one fetch tries: a node that cannot
// be reached is passed over, as a call would pass it over.
const maxReflectionNodes = 3

// Fetch implements Source.
func (r *Reflection) Fetch(ctx context.Context, service string) (*protoregistry.Files, error) {
	var tried []string
	var lastErr error
	for range maxReflectionNodes {
		id, addr, err := r.Node(ctx, tried)
		if err != nil {
			if lastErr != nil {
				return nil, lastErr
			}
			return nil, fmt.Errorf("pick a node: %w", err)
		}
		if slices.Contains(tried, id) {
			break
		}
		files, err := r.fetchFrom(ctx, addr, service)
		if status.Code(err) != codes.Unavailable || ctx.Err() != nil {
			return files, err
		}
		tried, lastErr = append(tried, id), err
	}
	return nil, lastErr
}

// Services implements Lister: the services a node lists by reflection.
func (r *Reflection) Services(ctx context.Context) ([]string, error) {
	_, addr, err := r.Node(ctx, nil)
	if err != nil {
		return nil, fmt.Errorf("pick a node: %w", err)
	}
	tr := r.transport()
	defer tr.CloseIdleConnections()
	names, err := listServices(ctx, r.stream(tr, addr, reflectionV1))
	if status.Code(err) == codes.Unimplemented {
		names, err = listServices(ctx, r.stream(tr, addr, reflectionV1Alpha))
		if status.Code(err) == codes.Unimplemented {
			return nil, fmt.Errorf("node %s: %w", addr, ErrNoSchema)
		}
	}
	return names, err
}

// The reflection services' stream paths: v1alpha's messages are v1's on
// the wire.
const (
	reflectionV1      = "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"
	reflectionV1Alpha = "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"
)

// transport is an HTTP/2-only client for one fetch; the caller closes its
// connections when done. The stream's reset is sent on another goroutine,
// so the connection may still count it active then: IdleConnTimeout closes
// it soon after instead of when the node hangs up. The fetch as a whole is
// bounded by the caller's context (FetchTimeout).
func (r *Reflection) transport() *http.Transport {
	var p http.Protocols
	tr := &http.Transport{Protocols: &p, DisableCompression: true, IdleConnTimeout: 5 * time.Second,
		TLSHandshakeTimeout: 10 * time.Second}
	if r.TLS != nil {
		p.SetHTTP2(true)
		tr.TLSClientConfig = r.TLS.Clone()
	} else {
		p.SetUnencryptedHTTP2(true)
	}
	return tr
}

func (r *Reflection) stream(tr *http.Transport, addr, path string) h2Stream {
	scheme := "http"
	if r.TLS != nil {
		scheme = "https"
	}
	return h2Stream{tr: tr, url: scheme + "://" + addr + path}
}

func listServices(ctx context.Context, rs h2Stream) ([]string, error) {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	send, recv, closeSend, err := rs.open(ctx)
	if err != nil {
		return nil, err
	}
	if err := send(reflectionRequest{field: reqListServices, value: "*"}); err != nil && !errors.Is(err, io.EOF) {
		return nil, err
	}
	resp, err := recv() // after io.EOF from send: the stream's status
	if err != nil {
		return nil, err
	}
	_ = closeSend()
	if resp.isErr {
		return nil, status.Error(codes.Code(resp.errCode), resp.errMessage)
	}
	return resp.services, nil
}

func (r *Reflection) fetchFrom(ctx context.Context, addr, service string) (*protoregistry.Files, error) {
	tr := r.transport()
	defer tr.CloseIdleConnections()
	files, err := fetchFiles(ctx, r.stream(tr, addr, reflectionV1), service)
	if status.Code(err) == codes.Unimplemented {
		files, err = fetchFiles(ctx, r.stream(tr, addr, reflectionV1Alpha), service)
		if status.Code(err) == codes.Unimplemented {
			return nil, fmt.Errorf("node %s: %w", addr, ErrNoSchema)
		}
	}
	if err != nil {
		return nil, fmt.Errorf("reflection of %s at %s: %w", service, addr, err)
	}
	return files, nil
}

// h2Stream is one ServerReflectionInfo stream: a POST whose body the
// client writes message by message while it reads the answers.
type h2Stream struct {
	tr  *http.Transport
	url string
}

// open starts the stream. send returns io.EOF once the node has ended it
// (recv then returns its status); recv returns io.EOF at a clean end; a
// node that cannot be reached is an Unavailable status. Everything stops
// when ctx ends.
func (s h2Stream) open(ctx context.Context) (send func(reflectionRequest) error, recv func() (*reflectionResponse, error), closeSend func() error, err error) {
	pr, pw := io.Pipe()
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, s.url, pr)
	if err != nil {
		return nil, nil, nil, err
	}
	req.Header = http.Header{"Content-Type": {"application/grpc"}, "Te": {"trailers"}}
	type answer struct {
		resp *http.Response
		err  error
	}
	answers := make(chan answer, 1)
	go func() {
		resp, err := s.tr.RoundTrip(req)
		answers <- answer{resp, err}
	}()
	context.AfterFunc(ctx, func() { pw.CloseWithError(ctx.Err()) })
	var (
		resp         *http.Response
		hdr          [5]byte
		trailersOnly bool // an OK status in the header: no trailers follow
	)
	send = func(m reflectionRequest) error {
		if _, err := pw.Write(appendFrame(nil, 0, m.marshal())); err != nil {
			return io.EOF // the node ended the stream (or ctx did): recv says how
		}
		return nil
	}
	recv = func() (*reflectionResponse, error) {
		if resp == nil {
			select {
			case a := <-answers:
				if a.err != nil {
					return nil, status.Errorf(codes.Unavailable, "%v", a.err)
				}
				resp = a.resp
				context.AfterFunc(ctx, func() { resp.Body.Close() })
			case <-ctx.Done():
				return nil, status.FromContextError(ctx.Err()).Err()
			}
			if resp.StatusCode != http.StatusOK {
				return nil, status.Errorf(httpToCode(resp.StatusCode), "node answered HTTP %d", resp.StatusCode)
			}
			if st, ok := statusFrom(resp.Header); ok {
				if st != nil {
					return nil, status.Error(st.Code, st.Message) // trailers only
				}
				trailersOnly = true
			}
		}
		flag, msg, err := readFrame(resp.Body, &hdr)
		switch {
		case err == io.EOF:
			st, ok := statusFrom(resp.Trailer)
			if !ok && !trailersOnly {
				return nil, status.Error(codes.Internal, "node sent no grpc-status")
			}
			if st != nil {
				return nil, status.Error(st.Code, st.Message)
			}
			return nil, io.EOF
		case err != nil:
			if ctx.Err() != nil {
				return nil, status.FromContextError(ctx.Err()).Err()
			}
			return nil, status.Errorf(codes.Unavailable, "read the reflection stream: %v", err)
		case flag != 0:
			return nil, status.Errorf(codes.Internal, "reflection message with flags %#x", flag)
		}
		return parseReflectionResponse(msg)
	}
	return send, recv, pw.Close, nil
}

// maxReflectionFiles bounds the files one fetch gathers.
const maxReflectionFiles = 10000

// fetchFiles asks for the file defining service, then for every file it
// depends on that the node did not send along, all on one stream.
func fetchFiles(ctx context.Context, rs h2Stream, service string) (*protoregistry.Files, error) {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	send, recv, closeSend, err := rs.open(ctx)
	if err != nil {
		return nil, err
	}
	got := map[string]*descriptorpb.FileDescriptorProto{}
	ask := func(req reflectionRequest) error {
		if err := send(req); err != nil {
			if errors.Is(err, io.EOF) {
				_, err = recv() // the stream's status
			}
			return err
		}
		resp, err := recv()
		if err != nil {
			return err
		}
		if resp.isErr {
			if codes.Code(resp.errCode) == codes.NotFound {
				return ErrUnknownService
			}
			return status.Error(codes.Code(resp.errCode), resp.errMessage)
		}
		for _, b := range resp.files {
			fd := new(descriptorpb.FileDescriptorProto)
			if err := proto.Unmarshal(b, fd); err != nil {
				return fmt.Errorf("read a file descriptor: %w", err)
			}
			got[fd.GetName()] = fd
		}
		if len(got) > maxReflectionFiles {
			return fmt.Errorf("more than %d files", maxReflectionFiles)
		}
		return nil
	}
	err = ask(reflectionRequest{field: reqFileContainingSymbol, value: service})
	if err != nil {
		return nil, err
	}
	for {
		missing := ""
		for _, fd := range got {
			for _, dep := range fd.GetDependency() {
				if got[dep] == nil {
					missing = dep
					break
				}
			}
		}
		if missing == "" {
			break
		}
		if d, err := protoregistry.GlobalFiles.FindFileByPath(missing); err == nil {
			got[missing] = protodesc.ToFileDescriptorProto(d) // a well-known type linked in
			continue
		}
		if err := ask(reflectionRequest{field: reqFileByFilename, value: missing}); err != nil {
			return nil, fmt.Errorf("file %s: %w", missing, err)
		}
		if got[missing] == nil {
			return nil, fmt.Errorf("file %s: not sent", missing)
		}
	}
	_ = closeSend()
	set := &descriptorpb.FileDescriptorSet{}
	for _, fd := range got {
		set.File = append(set.File, fd)
	}
	files, err := protodesc.NewFiles(set)
	if err != nil {
		return nil, fmt.Errorf("build the schema: %w", err)
	}
	return files, nil
}
