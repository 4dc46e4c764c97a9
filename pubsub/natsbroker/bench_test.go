package natsbroker

// Benchmarks of publishing through the sidecar's API to JetStream beside
// the same-run baseline, nats.go publishing directly to the same
// nats-server (a separate process on loopback). Run them without -race:
//
//	go test -run '^$' -bench . -benchtime 5000x ./pubsub/natsbroker/

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"go.uber.org/zap"

	"github.com/sidecarlb/sidecar/internal/h1"
	"github.com/sidecarlb/sidecar/internal/rawio"
	"github.com/sidecarlb/sidecar/pubsub"
	"github.com/sidecarlb/sidecar/test/natsserver"
)

// serveEngine serves h on ln through the sidecar's own HTTP/1.1 engine
// (internal/h1), as cmd/sidecar serves pubsub.listen (its bind), so that
// the benchmarks charge the sidecar for the server it runs rather than
// net/http's. It stops when the benchmark ends.
func serveEngine(b *testing.B, ln net.Listener, h http.Handler) {
	ctx, cancel := context.WithCancel(context.Background())
	srv := h1.NewServer(ctx, h, h1.Options{ReadHeaderTimeout: 10 * time.Second, IdleTimeout: time.Minute}, zap.NewNop())
	var conns sync.WaitGroup
	served := make(chan struct{})
	go func() {
		defer close(served)
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			conns.Go(func() { srv.ServeConn(rawio.Wrap(c), nil) })
		}
	}()
	b.Cleanup(func() {
		ln.Close()
		<-served
		srv.Close()
		conns.Wait()
		cancel()
	})
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

func newRawPublisher(addr, path, contentType string, body []byte) (*rawPublisher, error) {
	c, err := net.Dial("tcp", addr)
	if err != nil {
		return nil, err
	}
	req := fmt.Appendf(nil, "POST %s HTTP/1.1\r\nHost: %s\r\nContent-Type: %s\r\nContent-Length: %d\r\n\r\n", path, addr, contentType, len(body))
	return &rawPublisher{c: c, br: bufio.NewReader(c), req: append(req, body...)}, nil
}

func (p *rawPublisher) publish(context.Context) error {
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

// procCPU is the CPU time process pid has used (user and system, from
// /proc), for nats-server's share of a benchmark; 0 if unknown.
func procCPU(pid int) time.Duration {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return 0
	}
	s := string(b)
	f := strings.Fields(s[strings.LastIndexByte(s, ')')+2:])
	if len(f) < 13 {
		return 0
	}
	ut, _ := strconv.ParseInt(f[11], 10, 64)
	st, _ := strconv.ParseInt(f[12], 10, 64)
	return time.Duration(ut+st) * 10 * time.Millisecond // USER_HZ is 100 on Linux
}

// cpuMeter reports the CPU per message of the test process (cpu-µs/msg:
// client, API and broker) and of nats-server (srv-cpu-µs/msg).
type cpuMeter struct {
	pid       int
	self, srv time.Duration
}

func startCPU(srv *natsserver.Server) cpuMeter {
	return cpuMeter{pid: srv.PID(), self: cpuNow(), srv: procCPU(srv.PID())}
}

func (m cpuMeter) report(b *testing.B, msgs int) {
	b.ReportMetric(float64((cpuNow()-m.self).Microseconds())/float64(msgs), "cpu-µs/msg")
	b.ReportMetric(float64((procCPU(m.pid)-m.srv).Microseconds())/float64(msgs), "srv-cpu-µs/msg")
}

// BenchmarkPublish: 1 KiB messages, acknowledged by JetStream, one at a
// time (latency percentiles) and from 64 publishers (messages/s): direct
// is nats.go's js.Publish, sidecar the publish API over the broker, both
// on one nats-server and stream.
func BenchmarkPublish(b *testing.B) {
	srv := natsserver.Start(b)
	br, err := New(Options{URLs: []string{srv.URL()}}, nil, nil, zap.NewNop())
	if err != nil {
		b.Fatal(err)
	}
	defer br.Close()
	if err := br.ensureStream(context.Background()); err != nil {
		b.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	serveEngine(b, ln, pubsub.NewAPI(br, pubsub.APIOptions{Name: "pubsub", MaxBytes: 1 << 20}, zap.NewNop()))
	addr := ln.Addr().String()
	const path = "/v1.0/publish/pubsub/bench"
	url := "http://" + addr + path

	nc, err := nats.Connect(srv.URL())
	if err != nil {
		b.Fatal(err)
	}
	defer nc.Close()
	js, _ := jetstream.New(nc)
	body := make([]byte, 1024)
	var seq atomic.Int64

	direct := func(ctx context.Context) error {
		msg := nats.NewMsg(Subject("sidecar", "bench"))
		msg.Data = body
		msg.Header.Set(jetstream.MsgIDHeader, fmt.Sprint("d-", seq.Add(1)))
		_, err := js.PublishMsg(ctx, msg)
		return err
	}
	client := &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: 128}}
	sidecar := func(context.Context) error {
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
	// Bulk of 100: Dapr's bulk API through the sidecar, 4 requests at once.
	var bulk bytes.Buffer
	bulk.WriteString("[")
	for i := range 100 {
		if i > 0 {
			bulk.WriteString(",")
		}
		fmt.Fprintf(&bulk, `{"entryId":"%d","event":"%s","contentType":"text/plain"}`, i, bytes.Repeat([]byte("x"), 1024))
	}
	bulk.WriteString("]")
	bulkURL := "http://" + ln.Addr().String() + "/v1.0-alpha1/publish/bulk/pubsub/bench"
	// The same-run baseline for bulk: nats.go's async publish of 100
	// messages, then a wait for their 100 acks, 4 batches at once.
	b.Run("direct/bulk-100", func(b *testing.B) {
		var next atomic.Int64
		var wg sync.WaitGroup
		var failed atomic.Value
		start := time.Now()
		b.ResetTimer()
		cpu0 := startCPU(srv)
		for range 4 {
			wg.Go(func() {
				futures := make([]jetstream.PubAckFuture, 100)
				for next.Add(100) <= int64(b.N)+99 {
					for i := range futures {
						msg := nats.NewMsg(Subject("sidecar", "bench"))
						msg.Data = body
						msg.Header.Set(jetstream.MsgIDHeader, fmt.Sprint("db-", seq.Add(1)))
						f, err := js.PublishMsgAsync(msg)
						if err != nil {
							failed.Store(err)
							return
						}
						futures[i] = f
					}
					for _, f := range futures {
						select {
						case <-f.Ok():
						case err := <-f.Err():
							failed.Store(err)
							return
						}
					}
				}
			})
		}
		wg.Wait()
		b.StopTimer()
		cpu0.report(b, b.N)
		if err, _ := failed.Load().(error); err != nil {
			b.Fatal(err)
		}
		b.ReportMetric(float64((b.N+99)/100*100)/time.Since(start).Seconds(), "msgs/s")
	})
	b.Run("sidecar/bulk-100", func(b *testing.B) {
		var next atomic.Int64
		var wg sync.WaitGroup
		var failed atomic.Value
		start := time.Now()
		b.ResetTimer()
		cpu0 := startCPU(srv)
		for range 4 {
			wg.Go(func() {
				for next.Add(100) <= int64(b.N)+99 {
					resp, err := client.Post(bulkURL, "application/json", bytes.NewReader(bulk.Bytes()))
					if err != nil {
						failed.Store(err)
						return
					}
					_, _ = io.Copy(io.Discard, resp.Body)
					resp.Body.Close()
					if resp.StatusCode != 204 {
						failed.Store(fmt.Errorf("status %d", resp.StatusCode))
						return
					}
				}
			})
		}
		wg.Wait()
		b.StopTimer()
		cpu0.report(b, b.N)
		if err, _ := failed.Load().(error); err != nil {
			b.Fatal(err)
		}
		b.ReportMetric(float64((b.N+99)/100*100)/time.Since(start).Seconds(), "msgs/s")
	})
	shared := func(f func(context.Context) error) func() (func(context.Context) error, error) {
		return func() (func(context.Context) error, error) { return f, nil }
	}
	// sidecar-raw: the publish API from rawPublishers, one connection each.
	raw := func() (func(context.Context) error, error) {
		p, err := newRawPublisher(addr, path, "application/octet-stream", body)
		if err != nil {
			return nil, err
		}
		b.Cleanup(func() { p.c.Close() })
		return p.publish, nil
	}
	for _, c := range []struct {
		name      string
		publisher func() (func(context.Context) error, error)
	}{{"direct", shared(direct)}, {"sidecar", shared(sidecar)}, {"sidecar-raw", raw}} {
		b.Run(c.name+"/conc-1", func(b *testing.B) {
			publish, err := c.publisher()
			if err != nil {
				b.Fatal(err)
			}
			ctx := context.Background()
			ds := make([]time.Duration, 0, b.N)
			b.ResetTimer()
			cpu0 := startCPU(srv)
			for range b.N {
				start := time.Now()
				if err := publish(ctx); err != nil {
					b.Fatal(err)
				}
				ds = append(ds, time.Since(start))
			}
			b.StopTimer()
			cpu0.report(b, b.N)
			percentiles(b, c.name, ds)
		})
		b.Run(c.name+"/conc-64", func(b *testing.B) {
			ctx := context.Background()
			var next atomic.Int64
			var wg sync.WaitGroup
			var failed atomic.Value
			pubs := make([]func(context.Context) error, 64)
			for i := range pubs {
				p, err := c.publisher()
				if err != nil {
					b.Fatal(err)
				}
				pubs[i] = p
			}
			start := time.Now()
			b.ResetTimer()
			cpu0 := startCPU(srv)
			for _, publish := range pubs {
				wg.Go(func() {
					for next.Add(1) <= int64(b.N) {
						if err := publish(ctx); err != nil {
							failed.Store(err)
							return
						}
					}
				})
			}
			wg.Wait()
			b.StopTimer()
			cpu0.report(b, b.N)
			if err, _ := failed.Load().(error); err != nil {
				b.Fatal(err)
			}
			b.ReportMetric(float64(b.N)/time.Since(start).Seconds(), "msgs/s")
		})
	}
}

// BenchmarkDeliver: messages already in the stream delivered by one
// subscriber sidecar's broker to an app that answers at once (max_in_flight
// 32, structured), in messages/s.
func BenchmarkDeliver(b *testing.B) { benchDeliver(b, 32) }

// BenchmarkDeliverWide is BenchmarkDeliver with max_in_flight 128: if it
// delivers no faster, delivery is bound by CPU rather than by the pulls'
// round trips.
func BenchmarkDeliverWide(b *testing.B) { benchDeliver(b, 128) }

func benchDeliver(b *testing.B, maxInFlight int) {
	srv := natsserver.Start(b)
	var got atomic.Int64
	done := make(chan struct{})
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	app := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		_, _ = io.Copy(io.Discard, r.Body)
		w.WriteHeader(http.StatusNoContent)
		if got.Add(1) == int64(b.N) {
			close(done)
		}
	})}
	go func() { _ = app.Serve(ln) }()
	defer app.Close()
	a := pubsub.NewApp(ln.Addr().String(), []pubsub.Subscription{{Topic: "bench", Group: "g", Route: "/", ContentMode: "structured", MaxInFlight: maxInFlight, Timeout: 10 * time.Second}}, nil, nil, zap.NewNop())
	br, err := New(Options{URLs: []string{srv.URL()}}, a, []Subscription{{Topic: "bench", Group: "g", MaxInFlight: maxInFlight, Policy: pubsub.Policy{MaxAttempts: 3, Backoff: time.Millisecond, MaxBackoff: time.Millisecond}, DeadLetter: "bench.dlq"}}, zap.NewNop())
	if err != nil {
		b.Fatal(err)
	}
	defer br.Close()
	// The consumer exists (deliver-new) before the messages go in.
	setup, cancelSetup := context.WithCancel(context.Background())
	if !br.consumer(setup, br.subs[0], zap.NewNop()) {
		b.Fatal("no consumer")
	}
	cancelSetup()
	body := make([]byte, 1024)
	pubs := make([]pubsub.Publication, 0, 100)
	for i := 0; i < b.N; {
		pubs = pubs[:0]
		for ; len(pubs) < 100 && i < b.N; i++ {
			pubs = append(pubs, pubsub.Publication{Msg: &pubsub.Message{ID: fmt.Sprint("m-", i), Source: "b", Type: pubsub.DefaultType, Time: time.Now(), DataContentType: "application/octet-stream", Topic: "bench", PubsubName: "pubsub", Data: body}})
		}
		if _, err := br.Publish(pubs); err != nil {
			b.Fatal(err)
		}
	}
	ctx, cancel := context.WithCancel(context.Background())
	stopped := make(chan struct{})
	defer func() { cancel(); <-stopped }()
	start := time.Now()
	b.ResetTimer()
	cpu0 := startCPU(srv)
	go func() { br.Run(ctx); close(stopped) }()
	// busy-slots: the deliveries running, sampled each 100 µs; well under
	// max_in_flight when the pulls, not the app's legs, hold delivery back.
	var samples, busy int64
	sampled := make(chan struct{})
	go func() {
		defer close(sampled)
		t := time.NewTicker(100 * time.Microsecond)
		defer t.Stop()
		for {
			select {
			case <-done:
				return
			case <-t.C:
				samples++
				busy += br.inFlight[0].Load()
			}
		}
	}()
	select {
	case <-done:
	case <-time.After(5 * time.Minute):
		b.Fatalf("delivered %d of %d", got.Load(), b.N)
	}
	b.StopTimer()
	<-sampled
	if samples > 0 {
		b.ReportMetric(float64(busy)/float64(samples), "busy-slots")
	}
	cpu0.report(b, b.N)
	b.ReportMetric(float64(b.N)/time.Since(start).Seconds(), "msgs/s")
}

// BenchmarkPullCycle is one pull cycle alone, with no app: a pull for 8
// messages of a backlog, the 8 received and acked, then the next pull.
// fetch is jetstream's Fetch (the loop before the puller), puller the
// persistent pull; the time per op is one cycle's wall time.
func BenchmarkPullCycle(b *testing.B) {
	const batch = 8
	for _, how := range []string{"fetch", "puller"} {
		b.Run(how, func(b *testing.B) {
			srv := natsserver.Start(b)
			nc, err := nats.Connect(srv.URL())
			if err != nil {
				b.Fatal(err)
			}
			defer nc.Close()
			js, err := jetstream.New(nc)
			if err != nil {
				b.Fatal(err)
			}
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
			defer cancel()
			if _, err := js.CreateStream(ctx, jetstream.StreamConfig{Name: "P", Subjects: []string{"p.>"}}); err != nil {
				b.Fatal(err)
			}
			cons, err := js.CreateOrUpdateConsumer(ctx, "P", jetstream.ConsumerConfig{Durable: "c", AckPolicy: jetstream.AckExplicitPolicy})
			if err != nil {
				b.Fatal(err)
			}
			body := make([]byte, 1024)
			for i := range b.N * batch {
				if _, err := js.PublishAsync("p.x", body); err != nil {
					b.Fatal(err)
				}
				if i%1000 == 999 {
					<-js.PublishAsyncComplete()
				}
			}
			<-js.PublishAsyncComplete()
			p, err := newPuller(nc, "P", "c", batch, 5*time.Second)
			if err != nil {
				b.Fatal(err)
			}
			defer p.stop()
			b.ResetTimer()
			for range b.N {
				if how == "fetch" {
					mb, err := cons.Fetch(batch)
					if err != nil {
						b.Fatal(err)
					}
					for m := range mb.Messages() {
						_ = m.Ack()
					}
					continue
				}
				if err := p.pull(batch, time.Now()); err != nil {
					b.Fatal(err)
				}
				for p.asked > 0 {
					m := <-p.msgs
					if p.take(m) == kindMsg {
						_ = m.Ack()
					}
				}
			}
		})
	}
}
