package transcode

import (
	"context"
	"errors"
	"fmt"
	"io"
	"slices"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	rpb "google.golang.org/grpc/reflection/grpc_reflection_v1"
	rpbalpha "google.golang.org/grpc/reflection/grpc_reflection_v1alpha"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protodesc"
	"google.golang.org/protobuf/reflect/protoregistry"
	"google.golang.org/protobuf/types/descriptorpb"
)

// Reflection fetches schemas from a node's gRPC server reflection service,
// grpc.reflection.v1, falling back to v1alpha: one stream per fetch, to one
// node.
type Reflection struct {
	// Node returns a healthy node to ask, other than those in exclude: an
	// ID to exclude it by, and its address. It may block.
	Node func(ctx context.Context, exclude []string) (id, addr string, err error)
	// DialOptions dial the node (transport credentials: insecure or TLS).
	DialOptions []grpc.DialOption
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
	cc, err := grpc.NewClient(addr, r.DialOptions...)
	if err != nil {
		return nil, fmt.Errorf("dial %s: %w", addr, err)
	}
	defer cc.Close()
	names, err := listServices(ctx, v1Stream{rpb.NewServerReflectionClient(cc)})
	if status.Code(err) == codes.Unimplemented {
		names, err = listServices(ctx, v1alphaStream{rpbalpha.NewServerReflectionClient(cc)})
		if status.Code(err) == codes.Unimplemented {
			return nil, fmt.Errorf("node %s: %w", addr, ErrNoSchema)
		}
	}
	return names, err
}

func listServices(ctx context.Context, rs reflectionStream) ([]string, error) {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	send, recv, closeSend, err := rs.open(ctx)
	if err != nil {
		return nil, err
	}
	if err := send(&rpb.ServerReflectionRequest{MessageRequest: &rpb.ServerReflectionRequest_ListServices{}}); err != nil && !errors.Is(err, io.EOF) {
		return nil, err
	}
	resp, err := recv() // after io.EOF from send: the stream's status
	if err != nil {
		return nil, err
	}
	_ = closeSend()
	if e := resp.GetErrorResponse(); e != nil {
		return nil, status.Error(codes.Code(e.ErrorCode), e.ErrorMessage)
	}
	var names []string
	for _, s := range resp.GetListServicesResponse().GetService() {
		names = append(names, s.GetName())
	}
	return names, nil
}

func (r *Reflection) fetchFrom(ctx context.Context, addr, service string) (*protoregistry.Files, error) {
	cc, err := grpc.NewClient(addr, r.DialOptions...)
	if err != nil {
		return nil, fmt.Errorf("dial %s: %w", addr, err)
	}
	defer cc.Close()
	files, err := fetchFiles(ctx, v1Stream{rpb.NewServerReflectionClient(cc)}, service)
	if status.Code(err) == codes.Unimplemented {
		files, err = fetchFiles(ctx, v1alphaStream{rpbalpha.NewServerReflectionClient(cc)}, service)
		if status.Code(err) == codes.Unimplemented {
			return nil, fmt.Errorf("node %s: %w", addr, ErrNoSchema)
		}
	}
	if err != nil {
		return nil, fmt.Errorf("reflection of %s at %s: %w", service, addr, err)
	}
	return files, nil
}

// reflectionStream is one ServerReflectionInfo stream, in v1's messages.
type reflectionStream interface {
	open(ctx context.Context) (send func(*rpb.ServerReflectionRequest) error, recv func() (*rpb.ServerReflectionResponse, error), closeSend func() error, err error)
}

type v1Stream struct{ c rpb.ServerReflectionClient }

func (s v1Stream) open(ctx context.Context) (func(*rpb.ServerReflectionRequest) error, func() (*rpb.ServerReflectionResponse, error), func() error, error) {
	st, err := s.c.ServerReflectionInfo(ctx)
	if err != nil {
		return nil, nil, nil, err
	}
	return st.Send, st.Recv, st.CloseSend, nil
}

// v1alphaStream speaks v1alpha; its messages are v1's on the wire, so they
// are converted by marshalling.
type v1alphaStream struct {
	c rpbalpha.ServerReflectionClient
}

func (s v1alphaStream) open(ctx context.Context) (func(*rpb.ServerReflectionRequest) error, func() (*rpb.ServerReflectionResponse, error), func() error, error) {
	st, err := s.c.ServerReflectionInfo(ctx)
	if err != nil {
		return nil, nil, nil, err
	}
	send := func(req *rpb.ServerReflectionRequest) error {
		//lint:ignore SA1019 v1alpha is deprecated, and still what older servers serve
		var a rpbalpha.ServerReflectionRequest
		if err := convert(req, &a); err != nil {
			return err
		}
		return st.Send(&a)
	}
	recv := func() (*rpb.ServerReflectionResponse, error) {
		a, err := st.Recv()
		if err != nil {
			return nil, err
		}
		var resp rpb.ServerReflectionResponse
		return &resp, convert(a, &resp)
	}
	return send, recv, st.CloseSend, nil
}

func convert(from, to proto.Message) error {
	b, err := proto.Marshal(from)
	if err != nil {
		return err
	}
	return proto.Unmarshal(b, to)
}

// maxReflectionFiles bounds the files one fetch gathers.
const maxReflectionFiles = 10000

// fetchFiles asks for the file defining service, then for every file it
// depends on that the node did not send along, all on one stream.
func fetchFiles(ctx context.Context, rs reflectionStream, service string) (*protoregistry.Files, error) {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	send, recv, closeSend, err := rs.open(ctx)
	if err != nil {
		return nil, err
	}
	got := map[string]*descriptorpb.FileDescriptorProto{}
	ask := func(req *rpb.ServerReflectionRequest) error {
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
		if e := resp.GetErrorResponse(); e != nil {
			if codes.Code(e.ErrorCode) == codes.NotFound {
				return ErrUnknownService
			}
			return status.Error(codes.Code(e.ErrorCode), e.ErrorMessage)
		}
		for _, b := range resp.GetFileDescriptorResponse().GetFileDescriptorProto() {
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
	err = ask(&rpb.ServerReflectionRequest{MessageRequest: &rpb.ServerReflectionRequest_FileContainingSymbol{FileContainingSymbol: service}})
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
		if err := ask(&rpb.ServerReflectionRequest{MessageRequest: &rpb.ServerReflectionRequest_FileByFilename{FileByFilename: missing}}); err != nil {
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
