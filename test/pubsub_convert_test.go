package test

import (
	"encoding/base64"
	"encoding/json"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protoreflect"
	"google.golang.org/protobuf/types/dynamicpb"

	"github.com/sidecarlb/sidecar/test/consulagent"
	"github.com/sidecarlb/sidecar/transcode"
	"github.com/sidecarlb/sidecar/transcode/transcodetest"
)

// TestPubSubDeliverJSON: a protobuf payload published with a dataschema
// reaches a subscription with deliver_content_type: application/json as
// JSON, and another subscription of the same topic as published; a
// payload of a type the descriptor set lacks is delivered as published.
func TestPubSubDeliverJSON(t *testing.T) { forBrokers(t, testPubSubDeliverJSON) }

func testPubSubDeliverJSON(t *testing.T, env *psEnv) {
	set := transcodetest.DescriptorSet(1)
	path := filepath.Join(t.TempDir(), "echo.pb")
	if err := os.WriteFile(path, set, 0o600); err != nil {
		t.Fatal(err)
	}
	payload := echoRequest(t, set, "hi", 3)

	app := startSubApp(t)
	sub := env.node(t, "audit", app,
		psSub{"echoes", "/json", "asjson", ", deliver_content_type: application/json, descriptor_set: " + path},
		psSub{"echoes", "/proto", "asproto", ""}).start()
	env.waitGroup(t, "asjson", 1, false, "echoes")
	env.waitGroup(t, "asproto", 1, false, "echoes")
	pub := env.node(t, "", nil).start()

	publish := func(id, schema string) {
		ev, _ := json.Marshal(map[string]any{
			"specversion": "1.0", "id": id, "source": "test", "type": "echo.requested",
			"datacontenttype": "application/protobuf", "dataschema": schema,
			"data_base64": base64.StdEncoding.EncodeToString(payload),
		})
		req, _ := http.NewRequest("POST", "http://"+pub.api+"/v1.0/publish/pubsub/echoes", strings.NewReader(string(ev)))
		req.Header.Set("Content-Type", "application/cloudevents+json")
		resp, err := adminHTTP.Do(req)
		if err != nil {
			t.Fatalf("publish %s: %v", id, err)
		}
		resp.Body.Close()
		if resp.StatusCode != 204 {
			t.Fatalf("publish %s = %d, want 204", id, resp.StatusCode)
		}
	}
	publish("e-1", "type.googleapis.com/test.v1.EchoRequest")
	publish("e-2", "type.googleapis.com/test.v1.Unknown")
	consulagent.WaitFor(t, 30*time.Second, "both messages at both routes", func() bool {
		return len(app.ids("/json")) == 2 && len(app.ids("/proto")) == 2
	})
	_ = sub

	asJSON := app.event("/json", "e-1")
	data, _ := asJSON["data"].(map[string]any)
	if asJSON["datacontenttype"] != "application/json" || data["text"] != "hi" || data["count"] != float64(3) {
		t.Errorf("deliver_content_type: application/json got %v, want data {text: hi, count: 3} as application/json", asJSON)
	}
	want := base64.StdEncoding.EncodeToString(payload)
	for _, got := range []map[string]any{app.event("/proto", "e-1"), app.event("/json", "e-2"), app.event("/proto", "e-2")} {
		if got["datacontenttype"] != "application/protobuf" || got["data_base64"] != want {
			t.Errorf("got %v, want the payload as published (application/protobuf, data_base64 %s)", got, want)
		}
	}
}

// echoRequest returns a serialized test.v1.EchoRequest of set.
func echoRequest(t *testing.T, set []byte, text string, count int32) []byte {
	t.Helper()
	files, err := transcode.ParseDescriptorSet(set)
	if err != nil {
		t.Fatal(err)
	}
	d, err := files.FindDescriptorByName("test.v1.EchoRequest")
	if err != nil {
		t.Fatal(err)
	}
	md := d.(protoreflect.MessageDescriptor)
	msg := dynamicpb.NewMessage(md)
	msg.Set(md.Fields().ByName("text"), protoreflect.ValueOfString(text))
	msg.Set(md.Fields().ByName("count"), protoreflect.ValueOfInt32(count))
	b, err := proto.Marshal(msg)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// event returns the last CloudEvent delivered at route with id.
func (a *subApp) event(route, id string) map[string]any {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.events[route][id]
}
