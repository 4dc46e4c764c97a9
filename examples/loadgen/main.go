// Command loadgen sends HTTP requests at a steady rate and shows, live, how
// they spread over the instances that answer them. It is the client of the
// demo (examples/demo.sh) and attributes each answer by its X-Instance
// header, which the echo example sets.
//
//	loadgen -url http://127.0.0.1:19131/ -rate 200 -duration 25s -concurrency 8 [-events FILE] [-expect 3]
//
// Every second it prints, per instance, the answers of the last second, the
// total, and p50/p99 latency, with the errors: as a table redrawn in place
// when stdout is a terminal, as one appended line otherwise (or with -plain).
// An instance that gets no request for a whole second after it had traffic
// is reported as having left rotation; one that answers again, as back.
//
// -events names a file another process appends narration lines to. Each new
// line is printed as "» LINE", and the time it was written is used to say how
// long an instance took to leave or rejoin rotation after the latest line
// that names it. A line may start with "@UNIXTIME " (seconds, with a
// fraction) to give that time exactly; otherwise the time it is read is used.
//
// With -expect N it first waits, up to -wait, until N instances have
// answered, so the clock starts on a warm system. With -duration 0 as well
// it does only that and exits: a readiness check for scripts.
//
// It exits 0 after printing a summary, also when stopped early by SIGINT or
// SIGTERM; 1 when -expect instances did not answer in time or no request
// succeeded; 2 on bad flags.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"net/url"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"
)

// Exit codes.
const (
	exitOK    = 0
	exitFail  = 1
	exitUsage = 2
)

type options struct {
	url         string
	rate        float64
	duration    time.Duration
	concurrency int
	timeout     time.Duration
	events      string
	expect      int
	wait        time.Duration
	plain       bool
}

func main() {
	os.Exit(run(os.Args[1:], os.Stdout, os.Stderr))
}

func run(args []string, stdout, stderr io.Writer) int {
	opts, err := parseFlags(args, stderr)
	if err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return exitOK
		}
		return exitUsage
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()

	client := newClient(opts.concurrency, opts.timeout)
	defer client.CloseIdleConnections()

	var known []string
	if opts.expect > 0 {
		seen, took, err := warmUp(ctx, client, opts.url, opts.expect, opts.wait, func() {
			fmt.Fprintf(stdout, "waiting for %d instances to answer at %s\n", opts.expect, opts.url)
		})
		if err != nil {
			fmt.Fprintf(stderr, "loadgen: %v\n", err)
			return exitFail
		}
		fmt.Fprintf(stdout, "%d instances answering after %.1fs: %s\n", len(seen), took.Seconds(), strings.Join(seen, ", "))
		known = seen
	}
	if opts.duration == 0 {
		return exitOK
	}

	sc := newScreen(stdout, !opts.plain && isTerminal(stdout))
	st := runLoad(ctx, client, opts, known, sc)
	st.summary(stdout)
	if st.answered() == 0 {
		return exitFail
	}
	return exitOK
}

func parseFlags(args []string, stderr io.Writer) (*options, error) {
	fs := flag.NewFlagSet("loadgen", flag.ContinueOnError)
	fs.SetOutput(stderr)
	o := &options{}
	fs.StringVar(&o.url, "url", "", "URL to send GET requests to (required)")
	fs.Float64Var(&o.rate, "rate", 200, "requests per second, over all workers")
	fs.DurationVar(&o.duration, "duration", 25*time.Second, "how long to send traffic; 0 with -expect: only wait for the instances")
	fs.IntVar(&o.concurrency, "concurrency", 8, "workers, each with at most one request in flight")
	fs.DurationVar(&o.timeout, "timeout", 2*time.Second, "limit for one request, body included")
	fs.StringVar(&o.events, "events", "", "file of narration lines to print and time against (optional)")
	fs.IntVar(&o.expect, "expect", 0, "wait until this many instances answer before starting; 0 = don't wait")
	fs.DurationVar(&o.wait, "wait", 30*time.Second, "how long -expect may wait")
	fs.BoolVar(&o.plain, "plain", false, "print one line a second even on a terminal")
	if err := fs.Parse(args); err != nil {
		return nil, err
	}
	var problems []error
	if fs.NArg() > 0 {
		problems = append(problems, fmt.Errorf("unexpected arguments %q", fs.Args()))
	}
	if u, err := url.Parse(o.url); o.url == "" || err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
		problems = append(problems, fmt.Errorf("-url: want an http:// or https:// URL, got %q", o.url))
	}
	if o.rate <= 0 {
		problems = append(problems, fmt.Errorf("-rate: must be positive, got %v", o.rate))
	}
	if o.duration < 0 || (o.duration == 0 && o.expect == 0) {
		problems = append(problems, fmt.Errorf("-duration: must be positive (or 0 with -expect), got %v", o.duration))
	}
	if o.concurrency < 1 {
		problems = append(problems, fmt.Errorf("-concurrency: must be at least 1, got %d", o.concurrency))
	}
	if o.timeout <= 0 {
		problems = append(problems, fmt.Errorf("-timeout: must be positive, got %v", o.timeout))
	}
	if o.expect < 0 {
		problems = append(problems, fmt.Errorf("-expect: must not be negative, got %d", o.expect))
	}
	if err := errors.Join(problems...); err != nil {
		fmt.Fprintf(stderr, "loadgen: %v\n", err)
		return nil, err
	}
	return o, nil
}

// runLoad sends traffic for opts.duration, or until ctx is done, and
// reports it every second on sc. It returns the statistics of the run.
func runLoad(ctx context.Context, client httpDoer, opts *options, known []string, sc *screen) *stats {
	start := time.Now()
	st := newStats(start, known)
	loadCtx, cancel := context.WithTimeout(ctx, opts.duration)
	defer cancel()

	results := make(chan result, 1024)
	go func() {
		generate(loadCtx, client, opts.url, opts.rate, opts.concurrency, results)
		close(results)
	}()

	var ev *eventFile
	poll := make(<-chan time.Time) // never fires without -events
	if opts.events != "" {
		ev = &eventFile{path: opts.events}
		t := time.NewTicker(50 * time.Millisecond)
		defer t.Stop()
		poll = t.C
	}
	tick := time.NewTicker(time.Second)
	defer tick.Stop()

	header := fmt.Sprintf("%g req/s over %d workers → %s", opts.rate, opts.concurrency, opts.url)
	for {
		select {
		case r, ok := <-results:
			if !ok {
				st.end(time.Now())
				return st
			}
			st.add(r)
		case now := <-tick.C:
			w := st.tick(now)
			for _, line := range w.news {
				sc.say(now.Sub(start), line)
			}
			sc.show(header, opts.duration, w)
		case now := <-poll:
			lines, err := ev.read()
			if err != nil {
				sc.say(now.Sub(start), fmt.Sprintf("(events: %v)", err))
				ev = nil
				poll = make(<-chan time.Time)
			}
			for _, l := range lines {
				e := st.event(l, now)
				sc.say(e.at.Sub(start), e.text)
			}
		}
	}
}
