package transcode

import (
	"context"
	"fmt"
	"os"

	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protodesc"
	"google.golang.org/protobuf/reflect/protoreflect"
	"google.golang.org/protobuf/reflect/protoregistry"
	"google.golang.org/protobuf/types/descriptorpb"
	"google.golang.org/protobuf/types/dynamicpb"
)

// File is a schema read once from a FileDescriptorSet file (protoc
// --include_imports --descriptor_set_out).
type File struct {
	files *protoregistry.Files
}

// LoadFile reads and checks the FileDescriptorSet at path.
func LoadFile(path string) (*File, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	files, err := ParseDescriptorSet(b)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return &File{files: files}, nil
}

// LoadFileFromBytes is LoadFile of a serialized FileDescriptorSet.
func LoadFileFromBytes(b []byte) (*File, error) {
	files, err := ParseDescriptorSet(b)
	if err != nil {
		return nil, err
	}
	return &File{files: files}, nil
}

// ParseDescriptorSet builds the files of a serialized FileDescriptorSet,
// which must hold every file its files import.
func ParseDescriptorSet(b []byte) (*protoregistry.Files, error) {
	var set descriptorpb.FileDescriptorSet
	if err := proto.Unmarshal(b, &set); err != nil {
		return nil, fmt.Errorf("not a FileDescriptorSet: %w", err)
	}
	files, err := protodesc.NewFiles(&set)
	if err != nil {
		return nil, fmt.Errorf("bad FileDescriptorSet (was it made with --include_imports?): %w", err)
	}
	return files, nil
}

// Name implements Source.
func (*File) Name() string { return "file" }

// Fetch implements Source: the file's schema, when it defines service.
func (f *File) Fetch(_ context.Context, service string) (*protoregistry.Files, error) {
	if d, err := f.files.FindDescriptorByName(protoreflect.FullName(service)); err != nil || d == nil {
		return nil, fmt.Errorf("descriptor set: %w", ErrUnknownService)
	}
	return f.files, nil
}

// Services implements Lister: the services the file defines.
func (f *File) Services(context.Context) ([]string, error) {
	var names []string
	f.files.RangeFiles(func(fd protoreflect.FileDescriptor) bool {
		for i := range fd.Services().Len() {
			names = append(names, string(fd.Services().Get(i).FullName()))
		}
		return true
	})
	return names, nil
}

// MessageJSON returns the JSON form (protojson) of data, a serialized
// message of the type typeName (its full name) defined in the file.
func (f *File) MessageJSON(typeName string, data []byte) ([]byte, error) {
	d, err := f.files.FindDescriptorByName(protoreflect.FullName(typeName))
	if err != nil {
		return nil, fmt.Errorf("message type %s is not in the descriptor set", typeName)
	}
	md, ok := d.(protoreflect.MessageDescriptor)
	if !ok {
		return nil, fmt.Errorf("%s is not a message type", typeName)
	}
	msg := dynamicpb.NewMessage(md)
	if err := proto.Unmarshal(data, msg); err != nil {
		return nil, fmt.Errorf("payload is not a %s: %w", typeName, err)
	}
	return jsonOut.Marshal(msg)
}
