package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"slices"
	"sync"
	"syscall"
	"time"
)

// instanceHeader names the answering instance in every echo response.
const instanceHeader = "X-Instance"

// result is the outcome of one request.
type result struct {
	at       time.Time     // when it completed
	latency  time.Duration // from sending to the end of the body
	instance string        // X-Instance of a successful answer
	err      string        // "" on success, else a short reason such as "502 connect_failed"
}

// httpDoer is the part of *http.Client loadgen uses.
type httpDoer interface {
	Do(*http.Request) (*http.Response, error)
}

// newClient returns a keep-alive client with one idle connection per worker
// that ignores proxy settings in the environment.
func newClient(workers int, timeout time.Duration) *http.Client {
	return &http.Client{
		Timeout: timeout,
		Transport: &http.Transport{
			Proxy:               nil,
			DialContext:         (&net.Dialer{Timeout: time.Second, KeepAlive: 30 * time.Second}).DialContext,
			MaxIdleConns:        workers,
			MaxIdleConnsPerHost: workers,
			IdleConnTimeout:     90 * time.Second,
		},
	}
}

// do sends one GET and reads the whole body, so the connection is reused.
func do(c httpDoer, url string) result {
	start := time.Now()
	req, err := http.NewRequest(http.MethodGet, url, nil)
	if err != nil {
		return result{at: start, err: "bad request"}
	}
	resp, err := c.Do(req)
	if err != nil {
		now := time.Now()
		return result{at: now, latency: now.Sub(start), err: transportReason(err)}
	}
	_, err = io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	now := time.Now()
	r := result{at: now, latency: now.Sub(start)}
	switch {
	case err != nil:
		r.err = "body: " + transportReason(err)
	case resp.StatusCode < 200 || resp.StatusCode > 299:
		r.err = fmt.Sprint(resp.StatusCode)
		if code := resp.Header.Get("X-Sidecar-Error"); code != "" {
			r.err += " " + code
		}
	case resp.Header.Get(instanceHeader) == "":
		r.err = "no " + instanceHeader
	default:
		r.instance = resp.Header.Get(instanceHeader)
	}
	return r
}

// transportReason names a client-side failure briefly.
func transportReason(err error) string {
	var ne net.Error
	switch {
	case errors.Is(err, syscall.ECONNREFUSED):
		return "connection refused"
	case errors.Is(err, syscall.ECONNRESET):
		return "connection reset"
	case errors.As(err, &ne) && ne.Timeout():
		return "timeout"
	case errors.Is(err, io.EOF), errors.Is(err, io.ErrUnexpectedEOF):
		return "connection closed"
	}
	return "transport error"
}

// generate sends requests at rate per second over workers until ctx is done,
// and waits for the requests in flight. Each worker has one request in
// flight at most; when all are busy, the schedule slips rather than piling up
// more than a second of backlog.
func generate(ctx context.Context, c httpDoer, url string, rate float64, workers int, results chan<- result) {
	interval := time.Duration(float64(time.Second) / rate)
	var mu sync.Mutex
	next := time.Now()
	slot := func() time.Time {
		mu.Lock()
		defer mu.Unlock()
		if now := time.Now(); next.Before(now.Add(-time.Second)) {
			next = now
		}
		t := next
		next = next.Add(interval)
		return t
	}
	var wg sync.WaitGroup
	for range workers {
		wg.Go(func() {
			for {
				t := time.NewTimer(time.Until(slot()))
				select {
				case <-ctx.Done():
					t.Stop()
					return
				case <-t.C:
				}
				results <- do(c, url)
			}
		})
	}
	wg.Wait()
}

// warmUp sends one request at a time until want distinct instances have
// answered or within has passed. It returns their names, sorted, and how long
// that took. waiting is called once, when the first attempts fall short.
func warmUp(parent context.Context, c httpDoer, url string, want int, within time.Duration, waiting func()) ([]string, time.Duration, error) {
	start := time.Now()
	ctx, cancel := context.WithTimeout(parent, within)
	defer cancel()
	seen := map[string]bool{}
	lastErr := "no answer yet"
	attempts := 0
	for {
		r := do(c, url)
		if r.err != "" {
			lastErr = r.err
		} else {
			seen[r.instance] = true
		}
		if len(seen) >= want {
			break
		}
		if attempts++; attempts == 2*want {
			waiting()
		}
		select {
		case <-ctx.Done():
			names := sortedKeys(seen)
			if parent.Err() != nil {
				return nil, 0, fmt.Errorf("interrupted while waiting for %d instances; %d answered: %v", want, len(names), names)
			}
			if len(names) == 0 {
				return nil, 0, fmt.Errorf("no instance answered at %s within %v (last error: %s)", url, within, lastErr)
			}
			return nil, 0, fmt.Errorf("only %d of %d instances answered at %s within %v: %v (last error: %s)",
				len(names), want, url, within, names, lastErr)
		case <-time.After(20 * time.Millisecond):
		}
	}
	return sortedKeys(seen), time.Since(start), nil
}

func sortedKeys[V any](m map[string]V) []string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	return keys
}
