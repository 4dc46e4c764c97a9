package test

import (
	"bytes"
	"flag"
	"fmt"
	"net/http"
	"os"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/sidecarlb/sidecar/test/consulagent"
)

// pendingMessages is how many messages TestPubSubPendingRestart leaves
// pending: 20,000 under make test (a race-detector build), 100,000 for
// the memory figure:
//
//	make build && SIDECAR_TEST_BIN=$PWD/bin go test -count=1 -run TestPubSubPendingRestart -v ./test/ -pubsub.pending=100000
var pendingMessages = flag.Int("pubsub.pending", 20_000, "messages TestPubSubPendingRestart leaves pending (a multiple of 1,000)")

// TestPubSubPendingRestart: -pubsub.pending messages of 1 KiB
// (bulk-published 1,000 at a time) wait in the outbox of a sidecar whose
// subscriber group is down; after kill -9 and a restart on the same
// data_dir every one is still pending. The sidecar's memory with them
// pending is logged (the figure for BENCHMARKS.md, not asserted).
func TestPubSubPendingRestart(t *testing.T) {
	if testing.Short() {
		t.Skip("integration test")
	}
	t.Parallel()
	agent := consulagent.Start(t, consulagent.Options{})
	sub := newPSNode(t, agent.Addr(), "audit", startSubApp(t), psSub{"events", "/events", "audit", ""})
	sub.start()
	waitPeers(t, agent, "audit", 1, "events")
	sub.proc.Signal(syscall.SIGTERM)
	sub.proc.Wait(15 * time.Second)
	waitPeers(t, agent, "audit", 0)

	pub := newPSNode(t, agent.Addr(), "", nil).start()
	n, per := *pendingMessages, 1_000
	// A bulk of 1,000 takes seconds in a race-detector build on a busy
	// machine: more than adminHTTP's bound.
	bulkHTTP := &http.Client{Timeout: 2 * time.Minute}
	data := strings.Repeat("x", 1024-2)
	for i := 0; i < n; i += per {
		var b bytes.Buffer
		b.WriteByte('[')
		for j := range per {
			if j > 0 {
				b.WriteByte(',')
			}
			fmt.Fprintf(&b, `{"entryId":"%d","event":%q,"contentType":"text/plain"}`, i+j, data)
		}
		b.WriteByte(']')
		resp, err := bulkHTTP.Post("http://"+pub.api+"/v1.0-alpha1/publish/bulk/pubsub/events", "application/json", &b)
		if err != nil {
			t.Fatalf("bulk publish at %d: %v", i, err)
		}
		resp.Body.Close()
		if resp.StatusCode != http.StatusNoContent {
			t.Fatalf("bulk publish at %d = %d, want 204", i, resp.StatusCode)
		}
	}
	consulagent.WaitFor(t, 60*time.Second, "every message pending", func() bool { return pub.status().Outbox == n })
	t.Logf("sidecar with %d pending: %s", n, memory(pub.proc.Pid()))
	// The soft memory limit follows the live heap each second, and after
	// 5s without a collection one is made (internal/memtune): the
	// garbage of the last bulk goes back by then.
	time.Sleep(7 * time.Second)
	t.Logf("sidecar with %d pending, 7s after the last publish: %s", n, memory(pub.proc.Pid()))
	pub.proc.Signal(syscall.SIGKILL)
	pub.proc.Wait(5 * time.Second)
	pub.start()
	if s := pub.status(); s.Outbox != n {
		t.Errorf("outbox after kill -9 and restart = %d, want %d", s.Outbox, n)
	}
	consulagent.WaitFor(t, 60*time.Second, "the lane to hold every message", func() bool {
		s := pub.status()
		return len(s.Groups) == 1 && s.Groups[0].Pending == n
	})
	t.Logf("sidecar after kill -9 and restart, %d pending: %s", n, memory(pub.proc.Pid()))
}

// memory returns pid's VmRSS, RssAnon and RssFile as /proc shows them.
func memory(pid int) string {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return err.Error()
	}
	var out []string
	for _, line := range strings.Split(string(b), "\n") {
		for _, k := range []string{"VmRSS:", "RssAnon:", "RssFile:"} {
			if strings.HasPrefix(line, k) {
				out = append(out, strings.Join(strings.Fields(line), " "))
			}
		}
	}
	return strings.Join(out, ", ")
}
