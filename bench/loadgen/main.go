// Command loadgen is the benchmark's load generator: the same client code
// drives every peer (direct, sidecar, HAProxy, nginx).
//
//	loadgen -mode get -targets 127.0.0.1:9101,127.0.0.1:9102 -c 64 -duration 5s
//
// Modes:
//
//	get    closed loop, HTTP/1.1 keep-alive GET /get (100 B), -c connections
//	post   closed loop, HTTP/1.1 keep-alive POST /echo, -size bytes both ways
//	h2c    closed loop, GET /get over h2c, -c streams on one connection per target
//	grpc   closed loop, gRPC UnaryCall, -c streams on one connection per target
//	bidi   gRPC FullDuplexCall, -c streams with -depth messages in flight each
//	ws     closed loop, WebSocket ping-pong of -size bytes, -c connections
//	rate   open loop, HTTP/1.1 GET /get at -rate requests/s over -c connections
//
// Workers (connections, streams) are spread over the targets in turn. After
// -warmup it prints "measure" on stdout, after -duration "done", then one
// line of JSON with the figures of the measured part. The harness reads the
// two markers to sample the proxy's CPU time over exactly that window.
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// Result is what loadgen prints as JSON. Latencies are in microseconds.
type Result struct {
	Mode        string  `json:"mode"`
	Targets     int     `json:"targets"`
	Workers     int     `json:"workers"`
	Requests    int64   `json:"requests"`
	Errors      int64   `json:"errors"`
	ErrorSample string  `json:"error_sample,omitempty"`
	Seconds     float64 `json:"seconds"`
	RPS         float64 `json:"rps"`
	MeanUS      float64 `json:"mean_us"`
	P50US       float64 `json:"p50_us"`
	P90US       float64 `json:"p90_us"`
	P99US       float64 `json:"p99_us"`
	P999US      float64 `json:"p999_us"`
	MaxUS       float64 `json:"max_us"`
	// Rate mode only: latency from the request's scheduled send time, which
	// counts queueing behind a stalled request (no coordinated omission).
	SchedP50US  float64 `json:"sched_p50_us,omitempty"`
	SchedP99US  float64 `json:"sched_p99_us,omitempty"`
	SchedP999US float64 `json:"sched_p999_us,omitempty"`
}

// Phases of a run.
const (
	phaseWarmup int32 = iota
	phaseMeasure
	phaseStop
)

// worker is one connection or stream's measurements.
type worker struct {
	hist     *hist
	sched    *hist
	n        int64
	errors   int64
	errFirst error
}

func newWorker() *worker { return &worker{hist: newHist()} }

func (w *worker) fail(err error) {
	w.errors++
	if w.errFirst == nil {
		w.errFirst = err
	}
}

type options struct {
	mode     string
	targets  []string
	workers  int
	duration time.Duration
	warmup   time.Duration
	rate     float64
	size     int
	depth    int
}

func main() {
	var o options
	var targets string
	flag.StringVar(&o.mode, "mode", "get", "get, post, h2c, grpc, bidi, ws, rate or connect")
	flag.StringVar(&targets, "targets", "127.0.0.1:9101", "comma-separated host:port list")
	flag.IntVar(&o.workers, "c", 64, "connections (get, post, ws, rate) or concurrent streams (h2c, grpc, bidi)")
	flag.DurationVar(&o.duration, "duration", 5*time.Second, "measured time")
	flag.DurationVar(&o.warmup, "warmup", time.Second, "unmeasured time before it")
	flag.Float64Var(&o.rate, "rate", 1000, "requests per second (rate mode)")
	flag.IntVar(&o.size, "size", 4096, "body bytes (post), payload bytes (grpc, bidi, ws, connect: default 100)")
	flag.IntVar(&o.depth, "depth", 32, "messages in flight per stream (bidi)")
	flag.BoolVar(&useTLS, "tls", false, "get, post, rate: speak TLS (any certificate accepted) to the targets")
	flag.Parse()
	o.targets = strings.Split(targets, ",")
	sizeSet := false
	flag.Visit(func(f *flag.Flag) { sizeSet = sizeSet || f.Name == "size" })
	if !sizeSet && o.mode != "post" {
		o.size = 100
	}
	if o.workers < 1 || o.duration <= 0 {
		fatalf("need -c ≥ 1 and -duration > 0")
	}
	res, err := run(o)
	if err != nil {
		fatalf("%v", err)
	}
	out, _ := json.Marshal(res)
	fmt.Println(string(out))
}

func fatalf(format string, args ...any) {
	fmt.Fprintf(os.Stderr, "loadgen: "+format+"\n", args...)
	os.Exit(1)
}

func run(o options) (*Result, error) {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	var phase atomic.Int32
	var loops []func(w *worker)
	var cleanup func()
	var err error
	switch o.mode {
	case "get":
		loops = h1Loops(o, &phase, "GET", "/get", nil)
	case "post":
		loops = h1Loops(o, &phase, "POST", "/echo", make([]byte, o.size))
	case "rate":
		loops = rateLoops(ctx, o, &phase)
	case "h2c":
		loops, cleanup, err = h2cLoops(ctx, o, &phase)
	case "grpc":
		loops, cleanup, err = grpcUnaryLoops(ctx, o, &phase)
	case "bidi":
		loops, cleanup, err = grpcBidiLoops(ctx, o, &phase)
	case "connect":
		loops = connectLoops(o, &phase)
	case "ws":
		loops, err = wsLoops(ctx, o, &phase)
	default:
		return nil, fmt.Errorf("unknown mode %q", o.mode)
	}
	if err != nil {
		return nil, err
	}
	if cleanup != nil {
		defer cleanup()
	}

	workers := make([]*worker, len(loops))
	var wg sync.WaitGroup
	for i, loop := range loops {
		workers[i] = newWorker()
		if o.mode == "rate" {
			workers[i].sched = newHist()
		}
		w := workers[i]
		wg.Go(func() { loop(w) })
	}
	time.Sleep(o.warmup)
	phase.Store(phaseMeasure)
	start := time.Now()
	fmt.Println("measure")
	time.Sleep(o.duration)
	phase.Store(phaseStop)
	elapsed := time.Since(start)
	fmt.Println("done")

	// Let requests in flight finish; do not wait forever on a stuck one.
	finished := make(chan struct{})
	go func() { wg.Wait(); close(finished) }()
	select {
	case <-finished:
	case <-time.After(3 * time.Second):
		cancel()
		select {
		case <-finished:
		case <-time.After(2 * time.Second):
			fmt.Fprintln(os.Stderr, "loadgen: some workers did not stop; reporting without them")
		}
	}

	total, sched := newHist(), newHist()
	res := &Result{Mode: o.mode, Targets: len(o.targets), Workers: len(loops), Seconds: elapsed.Seconds()}
	var errFirst error
	for _, w := range workers {
		total.merge(w.hist)
		if w.sched != nil {
			sched.merge(w.sched)
		}
		res.Requests += w.n
		res.Errors += w.errors
		if errFirst == nil {
			errFirst = w.errFirst
		}
	}
	if errFirst != nil {
		res.ErrorSample = errFirst.Error()
	}
	us := func(ns uint64) float64 { return float64(ns) / 1e3 }
	res.RPS = float64(res.Requests) / elapsed.Seconds()
	res.MeanUS = total.mean() / 1e3
	res.P50US, res.P90US = us(total.quantile(0.5)), us(total.quantile(0.9))
	res.P99US, res.P999US = us(total.quantile(0.99)), us(total.quantile(0.999))
	res.MaxUS = us(total.max)
	if o.mode == "rate" {
		res.SchedP50US, res.SchedP99US, res.SchedP999US = us(sched.quantile(0.5)), us(sched.quantile(0.99)), us(sched.quantile(0.999))
	}
	return res, nil
}

// closedLoop runs op until the phase says stop, recording what completes
// while measuring.
func closedLoop(phase *atomic.Int32, op func() error) func(w *worker) {
	return func(w *worker) {
		for {
			p := phase.Load()
			if p == phaseStop {
				return
			}
			t0 := time.Now()
			err := op()
			if phase.Load() != phaseMeasure || p != phaseMeasure {
				continue
			}
			if err != nil {
				w.fail(err)
				continue
			}
			w.hist.record(time.Since(t0))
			w.n++
		}
	}
}

func h1Loops(o options, phase *atomic.Int32, method, path string, body []byte) []func(*worker) {
	loops := make([]func(*worker), o.workers)
	for i := range loops {
		c := newH1Conn(o.targets[i%len(o.targets)], method, path, body)
		loops[i] = func(w *worker) {
			defer c.close()
			closedLoop(phase, c.do)(w)
		}
	}
	return loops
}

// rateLoops sends GET /get at a fixed rate, open loop: a pacer schedules
// each request at start + i/rate and a pool of connections takes them, so a
// slow answer does not delay the schedule.
func rateLoops(ctx context.Context, o options, phase *atomic.Int32) []func(*worker) {
	type job struct {
		at       time.Time
		measured bool
	}
	total := int((o.warmup + o.duration + time.Second).Seconds() * o.rate)
	jobs := make(chan job, total)
	interval := time.Duration(float64(time.Second) / o.rate)
	go func() {
		defer close(jobs)
		start := time.Now()
		for i := 0; ; i++ {
			at := start.Add(time.Duration(i) * interval)
			if d := time.Until(at); d > 0 {
				select {
				case <-time.After(d):
				case <-ctx.Done():
					return
				}
			}
			p := phase.Load()
			if p == phaseStop {
				return
			}
			select {
			case jobs <- job{at: at, measured: p == phaseMeasure}:
			default: // cannot happen: the buffer holds the whole run
			}
		}
	}()
	loops := make([]func(*worker), o.workers)
	for i := range loops {
		c := newH1Conn(o.targets[i%len(o.targets)], "GET", "/get", nil)
		loops[i] = func(w *worker) {
			defer c.close()
			for j := range jobs {
				if phase.Load() == phaseStop {
					return
				}
				t0 := time.Now()
				err := c.do()
				if !j.measured || phase.Load() != phaseMeasure {
					continue
				}
				if err != nil {
					w.fail(err)
					continue
				}
				now := time.Now()
				w.hist.record(now.Sub(t0))
				w.sched.record(now.Sub(j.at))
				w.n++
			}
		}
	}
	return loops
}
