package httpbroker

// Benchmarks of the publish path and of delivery, in one process on
// loopback, beside the disk's own fsync. Run them without -race:
//
//	go test -run '^$' -bench . -benchtime 2000x ./pubsub/httpbroker/

import (
	"bufio"
	"bytes"
	"fmt"
	"io"
	"math"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"runtime"
	"runtime/metrics"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// percentiles reports p50 and p99 of ds, in µs, as metrics named prefix-p50
// and prefix-p99.
func percentiles(b *testing.B, prefix string, ds []time.Duration) {
	if len(ds) == 0 {
		return
	}
	slices.Sort(ds)
	b.ReportMetric(float64(ds[len(ds)/2].Microseconds()), prefix+"-p50-µs")
	b.ReportMetric(float64(ds[len(ds)*99/100].Microseconds()), prefix+"-p99-µs")
}

// cpuNow is the CPU time this process has used (user and system): the
// steadier figure on a shared machine, reported per message.
func cpuNow() time.Duration {
	var ru syscall.Rusage
	_ = syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// schedLatencies is the runtime's histogram of how long goroutines waited
// runnable before they ran: time off CPU spent waiting for a CPU (the
// machine's other processes, or GOMAXPROCS), not for a lock or the disk.
func schedLatencies() *metrics.Float64Histogram {
	s := []metrics.Sample{{Name: "/sched/latencies:seconds"}}
	metrics.Read(s)
	return s[0].Value.Float64Histogram()
}

// reportSchedWait reports the median and p99 wait for a CPU between two
// readings of schedLatencies, in µs.
func reportSchedWait(b *testing.B, before, after *metrics.Float64Histogram) {
	counts := make([]uint64, len(after.Counts))
	var total uint64
	for i := range counts {
		counts[i] = after.Counts[i] - before.Counts[i]
		total += counts[i]
	}
	at := func(q float64) float64 {
		var n uint64
		for i, c := range counts {
			n += c
			if float64(n) >= q*float64(total) {
				return after.Buckets[i+1] * 1e6 // the bucket's upper bound
			}
		}
		return 0
	}
	var sum float64 // each wait taken at its bucket's midpoint
	for i, c := range counts {
		if c > 0 && !math.IsInf(after.Buckets[i], 0) && !math.IsInf(after.Buckets[i+1], 0) {
			sum += float64(c) * (after.Buckets[i] + after.Buckets[i+1]) / 2
		}
	}
	if total > 0 {
		b.ReportMetric(at(0.5), "sched-wait-p50-µs")
		b.ReportMetric(at(0.99), "sched-wait-p99-µs")
		b.ReportMetric(sum/float64(total)*1e6, "sched-wait-mean-µs")
	}
}

// BenchmarkFsync is the baseline: 1 KiB appended to a file in the same
// directory the store uses, then fdatasync, as bbolt does per commit.
func BenchmarkFsync(b *testing.B) {
	f, err := os.Create(filepath.Join(b.TempDir(), "fsync"))
	if err != nil {
		b.Fatal(err)
	}
	defer f.Close()
	buf := make([]byte, 1024)
	ds := make([]time.Duration, 0, b.N)
	b.ResetTimer()
	for range b.N {
		start := time.Now()
		if _, err := f.Write(buf); err != nil {
			b.Fatal(err)
		}
		if err := syscall.Fdatasync(int(f.Fd())); err != nil {
			b.Fatal(err)
		}
		ds = append(ds, time.Since(start))
	}
	percentiles(b, "fsync", ds)
}

func publishOnce(client *http.Client, url string, body []byte) error {
	resp, err := client.Post(url, "application/octet-stream", bytes.NewReader(body))
	if err != nil {
		return err
	}
	_, _ = io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	if resp.StatusCode != 204 {
		return fmt.Errorf("status %d", resp.StatusCode)
	}
	return nil
}

// rawPublisher is a load generator's client, as wrk is: one keep-alive
// connection, the request's bytes built once, the answer read with
// http.ReadResponse; none of net/http's Transport (its two goroutines per
// connection and its per-request allocations), so that more of the
// process's CPU per message is the sidecar's.
type rawPublisher struct {
	c   net.Conn
	br  *bufio.Reader
	req []byte
}

func newRawPublisher(addr, path string, body []byte) (*rawPublisher, error) {
	c, err := net.Dial("tcp", addr)
	if err != nil {
		return nil, err
	}
	req := fmt.Appendf(nil, "POST %s HTTP/1.1\r\nHost: %s\r\nContent-Type: application/octet-stream\r\nContent-Length: %d\r\n\r\n", path, addr, len(body))
	return &rawPublisher{c: c, br: bufio.NewReader(c), req: append(req, body...)}, nil
}

func (p *rawPublisher) publish() error {
	if _, err := p.c.Write(p.req); err != nil {
		return err
	}
	resp, err := http.ReadResponse(p.br, nil)
	if err != nil {
		return err
	}
	_, _ = io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	if resp.StatusCode != 204 {
		return fmt.Errorf("status %d", resp.StatusCode)
	}
	return nil
}

// BenchmarkPublish: 1 KiB messages through the publish API to the fsynced
// store, one connection at a time (latency) and 64 at once (throughput).
// With deliver, the same process also delivers them to an app that answers
// at once (publisher, peer and app share the CPU); without, the group's
// instance is unreachable and the messages stay in the outbox. The
// publishers use net/http's client, or with client=raw a load generator's
// (rawPublisher), whose own CPU is a smaller part of cpu-µs/msg.
func BenchmarkPublish(b *testing.B) {
	body := make([]byte, 1024)
	for _, c := range []struct {
		conc    int
		deliver bool
		raw     bool
	}{{1, false, false}, {64, false, false}, {64, false, true}, {1, true, false}, {64, true, false}, {64, true, true}} {
		conc := c.conc
		name := fmt.Sprintf("publishers=%d/deliver=%v", conc, c.deliver)
		if c.raw {
			name += "/client=raw"
		}
		b.Run(name, func(b *testing.B) {
			r := newRigPeer(b, b.TempDir(), http.HandlerFunc(func(http.ResponseWriter, *http.Request) {}), false, c.deliver)
			const path = "/v1.0/publish/pubsub/orders"
			url := r.api.URL + path
			client := &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: conc}}
			defer client.CloseIdleConnections()
			var mu sync.Mutex
			ds := make([]time.Duration, 0, b.N)
			var wg sync.WaitGroup
			per := (b.N + conc - 1) / conc
			pubs := make([]func() error, conc)
			for i := range pubs {
				pubs[i] = func() error { return publishOnce(client, url, body) }
				if c.raw {
					rp, err := newRawPublisher(strings.TrimPrefix(r.api.URL, "http://"), path, body)
					if err != nil {
						b.Fatal(err)
					}
					defer rp.c.Close()
					pubs[i] = rp.publish
				}
			}
			b.ResetTimer()
			sched0 := schedLatencies()
			cpu0 := cpuNow()
			start := time.Now()
			for _, publish := range pubs {
				wg.Add(1)
				go func() {
					defer wg.Done()
					local := make([]time.Duration, 0, per)
					for range per {
						t0 := time.Now()
						if err := publish(); err != nil {
							b.Error(err)
							return
						}
						local = append(local, time.Since(t0))
					}
					mu.Lock()
					ds = append(ds, local...)
					mu.Unlock()
				}()
			}
			wg.Wait()
			elapsed := time.Since(start)
			b.StopTimer()
			b.ReportMetric(float64((cpuNow()-cpu0).Microseconds())/float64(len(ds)), "cpu-µs/msg")
			reportSchedWait(b, sched0, schedLatencies())
			b.ReportMetric(float64(len(ds))/elapsed.Seconds(), "msgs/s")
			percentiles(b, "publish", ds)
			c, w := r.store.Commits()
			b.ReportMetric(float64(w)/float64(max(c, 1)), "writes/commit")
		})
	}
}

// BenchmarkDeliver: b.N messages already in the outbox are delivered by
// one subscriber to an app that answers at once; msgs/s is the rate from
// the dispatcher's start until the outbox is empty.
func BenchmarkDeliver(b *testing.B) {
	dir := b.TempDir()
	body := make([]byte, 1024)
	fill := newRig(b, dir, http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) { w.WriteHeader(503) }), true)
	fill.stop() // store only: the dispatcher does not run
	<-fill.done
	for i := 0; i < b.N; i += 500 {
		n := min(500, b.N-i)
		pubs := make([]publication, n)
		for j := range pubs {
			pubs[j] = publication{topic: "orders", body: body}
		}
		if err := fill.append(pubs); err != nil {
			b.Fatal(err)
		}
	}
	fill.close()
	b.ResetTimer()
	sched0 := schedLatencies()
	cpu0 := cpuNow()
	start := time.Now()
	r := newRig(b, dir, http.HandlerFunc(func(http.ResponseWriter, *http.Request) {}), false)
	waitFor(b, 10*time.Minute, "the outbox to empty", func() bool { return r.store.Pending() == 0 })
	elapsed := time.Since(start)
	b.StopTimer()
	b.ReportMetric(float64((cpuNow()-cpu0).Microseconds())/float64(b.N), "cpu-µs/msg")
	reportSchedWait(b, sched0, schedLatencies())
	b.ReportMetric(float64(b.N)/elapsed.Seconds(), "msgs/s")
	c, w := r.store.Commits()
	b.ReportMetric(float64(w)/float64(max(c, 1)), "writes/commit")
}

// BenchmarkPendingMemory: the heap a dispatcher holds for 100,000 pending
// messages (1 KiB each) of one topic and group whose only instance is
// unreachable, after loading them from the store as a restart does.
func BenchmarkPendingMemory(b *testing.B) {
	const n = 100_000
	dir := b.TempDir()
	fill := newRigPeer(b, dir, http.NotFoundHandler(), true, false)
	fill.stop()
	<-fill.done
	body := make([]byte, 1024)
	for i := 0; i < n; i += 1000 {
		pubs := make([]publication, 1000)
		for j := range pubs {
			pubs[j] = publication{topic: "orders", body: body}
		}
		if err := fill.append(pubs); err != nil {
			b.Fatal(err)
		}
	}
	fill.close()
	for range b.N {
		runtime.GC()
		var before, after runtime.MemStats
		runtime.ReadMemStats(&before)
		r := newRigPeer(b, dir, http.NotFoundHandler(), true, false)
		waitFor(b, time.Minute, "the lane to hold every message", func() bool { s := r.disp.Status(); return len(s.Groups) == 1 && s.Groups[0].Pending == n })
		runtime.GC()
		runtime.ReadMemStats(&after)
		b.ReportMetric(float64(after.HeapInuse-before.HeapInuse)/(1<<20), "heap-MiB")
		b.ReportMetric(float64(after.HeapInuse-before.HeapInuse)/n, "heap-B/msg")
		// What the process holds from the OS for its heap, freed or not,
		// beside the in-use figure: the garbage of the load the runtime
		// has not returned yet.
		b.ReportMetric(float64(after.HeapSys-after.HeapReleased)/(1<<20), "heap-held-MiB")
		b.ReportMetric(float64(after.TotalAlloc-before.TotalAlloc)/n, "alloc-B/msg")
		r.close()
	}
}
