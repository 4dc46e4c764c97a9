package transcode_test

import (
	"encoding/json"
	"testing"

	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protoreflect"
	"google.golang.org/protobuf/types/dynamicpb"

	"github.com/sidecarlb/sidecar/transcode"
	"github.com/sidecarlb/sidecar/transcode/transcodetest"
)

func TestFileMessageJSON(t *testing.T) {
	set := transcodetest.DescriptorSet(1)
	f, err := transcode.LoadFileFromBytes(set)
	if err != nil {
		t.Fatal(err)
	}
	files, err := transcode.ParseDescriptorSet(set)
	if err != nil {
		t.Fatal(err)
	}
	md, err := files.FindDescriptorByName("test.v1.EchoRequest")
	if err != nil {
		t.Fatal(err)
	}
	msg := dynamicpb.NewMessage(md.(protoreflect.MessageDescriptor))
	msg.Set(md.(protoreflect.MessageDescriptor).Fields().ByName("text"), protoreflect.ValueOfString("hi"))
	msg.Set(md.(protoreflect.MessageDescriptor).Fields().ByName("count"), protoreflect.ValueOfInt32(3))
	data, err := proto.Marshal(msg)
	if err != nil {
		t.Fatal(err)
	}
	got, err := f.MessageJSON("test.v1.EchoRequest", data)
	if err != nil {
		t.Fatal(err)
	}
	var fields map[string]any
	if err := json.Unmarshal(got, &fields); err != nil || fields["text"] != "hi" || fields["count"] != float64(3) {
		t.Errorf("MessageJSON = %s (%v), want text hi and count 3", got, err)
	}
	for name, data := range map[string][]byte{"test.v1.Nope": data, "test.v1.Echo": data, "test.v1.EchoRequest": {0xff, 0xff}} {
		if b, err := f.MessageJSON(name, data); err == nil {
			t.Errorf("MessageJSON(%s) = %s, want an error", name, b)
		}
	}
}
