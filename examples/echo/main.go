// Command echo is the small example service of the demo and the tests: it
// answers every request with its instance name, and its health can be
// switched off and on to watch it leave and rejoin rotation.
//
//	echo -listen 127.0.0.1:9001 -name echo-1
//
// GET /health answers 200 while healthy, 503 after POST /fail, until POST
// /recover. Every other path answers "NAME METHOD PATH" and echoes a request
// body back.
package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"log"
	"net/http"
	"os"
	"os/signal"
	"sync/atomic"
	"syscall"
	"time"
)

func main() {
	listen := flag.String("listen", "127.0.0.1:9001", "address to listen on")
	name := flag.String("name", "", "instance name in answers (default: the listen address)")
	flag.Parse()
	if *name == "" {
		*name = *listen
	}
	var healthy atomic.Bool
	healthy.Store(true)

	mux := http.NewServeMux()
	mux.HandleFunc("GET /health", func(w http.ResponseWriter, _ *http.Request) {
		if !healthy.Load() {
			http.Error(w, "unhealthy", http.StatusServiceUnavailable)
			return
		}
		fmt.Fprintln(w, "ok")
	})
	mux.HandleFunc("POST /fail", func(w http.ResponseWriter, _ *http.Request) { healthy.Store(false) })
	mux.HandleFunc("POST /recover", func(w http.ResponseWriter, _ *http.Request) { healthy.Store(true) })
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("X-Instance", *name)
		if d, err := time.ParseDuration(r.URL.Query().Get("sleep")); err == nil && d > 0 && d < time.Minute {
			time.Sleep(d)
		}
		fmt.Fprintf(w, "%s %s %s\n", *name, r.Method, r.URL.Path)
		if r.Body != nil {
			_, _ = io.Copy(w, r.Body)
		}
	})

	srv := &http.Server{Addr: *listen, Handler: mux, ReadHeaderTimeout: 10 * time.Second}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	go func() {
		<-ctx.Done()
		sctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		_ = srv.Shutdown(sctx)
	}()
	if err := srv.ListenAndServe(); err != nil && err != http.ErrServerClosed {
		log.Fatal(err)
	}
}
