// Command orders is the pub/sub demo's app: "orders publish" publishes
// numbered orders to its sidecar's publish API, "orders consume" receives
// them from its sidecar and lists the ids it got.
//
//	orders publish -api 127.0.0.1:15200 -n 2000 -rate 200
//	orders consume -listen 127.0.0.1:9001 -name billing-1
//
// A consumer answers GET /health, takes POST /orders (a CloudEvent), and
// lists the distinct ids it received at GET /ids, one a line.
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/signal"
	"sort"
	"strings"
	"sync"
	"syscall"
	"time"
)

func main() {
	if len(os.Args) < 2 {
		fmt.Fprintln(os.Stderr, "usage: orders publish|consume [flags]")
		os.Exit(2)
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	var err error
	switch os.Args[1] {
	case "publish":
		err = publish(ctx, os.Args[2:])
	case "consume":
		err = consume(ctx, os.Args[2:])
	default:
		err = fmt.Errorf("unknown command %q (want publish or consume)", os.Args[1])
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "orders:", err)
		os.Exit(1)
	}
}

// publish sends n orders at rate per second, each until its sidecar
// answers 204 (a 503 is retried after its Retry-After).
func publish(ctx context.Context, args []string) error {
	fs := flag.NewFlagSet("publish", flag.ExitOnError)
	api := fs.String("api", "127.0.0.1:15200", "the sidecar's publish API")
	n := fs.Int("n", 1000, "orders to publish")
	rate := fs.Int("rate", 100, "orders per second")
	topic := fs.String("topic", "orders", "topic")
	_ = fs.Parse(args)
	url := "http://" + *api + "/v1.0/publish/pubsub/" + *topic
	tick := time.NewTicker(time.Second / time.Duration(max(*rate, 1)))
	defer tick.Stop()
	client := &http.Client{Timeout: 10 * time.Second}
	for i := 1; i <= *n; i++ {
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-tick.C:
		}
		id := fmt.Sprintf("order-%d", i)
		body := fmt.Sprintf(`{"order":%d,"item":"widget","qty":%d}`, i, 1+i%5)
		for {
			req, _ := http.NewRequestWithContext(ctx, http.MethodPost, url, strings.NewReader(body))
			req.Header.Set("Content-Type", "application/json")
			req.Header.Set("Idempotency-Key", id)
			resp, err := client.Do(req)
			if err == nil {
				_, _ = io.Copy(io.Discard, resp.Body)
				resp.Body.Close()
				if resp.StatusCode == http.StatusNoContent {
					break
				}
				err = fmt.Errorf("status %d", resp.StatusCode)
			}
			if ctx.Err() != nil {
				return ctx.Err()
			}
			fmt.Fprintf(os.Stderr, "publish %s: %v; again in 1s\n", id, err)
			time.Sleep(time.Second)
		}
		if i%500 == 0 || i == *n {
			fmt.Printf("published %d\n", i)
		}
	}
	return nil
}

// consume serves the app side of a subscription.
func consume(ctx context.Context, args []string) error {
	fs := flag.NewFlagSet("consume", flag.ExitOnError)
	listen := fs.String("listen", "127.0.0.1:9001", "listen address")
	name := fs.String("name", "consumer", "name printed in the log")
	_ = fs.Parse(args)
	var mu sync.Mutex
	ids := map[string]bool{}
	deliveries := 0
	mux := http.NewServeMux()
	mux.HandleFunc("GET /health", func(http.ResponseWriter, *http.Request) {})
	mux.HandleFunc("POST /orders", func(w http.ResponseWriter, r *http.Request) {
		var ev struct {
			ID string `json:"id"`
		}
		if err := json.NewDecoder(r.Body).Decode(&ev); err != nil || ev.ID == "" {
			http.Error(w, "want a CloudEvent with an id", http.StatusBadRequest)
			return
		}
		mu.Lock()
		ids[ev.ID] = true
		deliveries++
		d := deliveries
		mu.Unlock()
		if d%500 == 0 {
			fmt.Printf("%s: %d deliveries\n", *name, d)
		}
	})
	mux.HandleFunc("GET /ids", func(w http.ResponseWriter, _ *http.Request) {
		mu.Lock()
		list := make([]string, 0, len(ids))
		for id := range ids {
			list = append(list, id)
		}
		mu.Unlock()
		sort.Strings(list)
		for _, id := range list {
			fmt.Fprintln(w, id)
		}
	})
	srv := &http.Server{Addr: *listen, Handler: mux, ReadHeaderTimeout: 5 * time.Second}
	go func() {
		<-ctx.Done()
		sctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		_ = srv.Shutdown(sctx)
	}()
	if err := srv.ListenAndServe(); err != http.ErrServerClosed {
		return err
	}
	return nil
}
