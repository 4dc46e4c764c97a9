// Command app is the supervisor tests' stand-in for an app: it can crash,
// exit with a code, grow its memory, ignore SIGTERM, start a child, print
// lines and serve /health.
package main

import (
	"flag"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"os/signal"
	"syscall"
	"time"
)

func main() {
	code := flag.Int("exit", -1, "exit with this code after -after (-1: run until signalled)")
	after := flag.Duration("after", 0, "delay before -exit")
	starts := flag.String("starts", "", "append the start time (unix ns) and pid to this file")
	grow := flag.Int("grow", 0, "allocate and touch this many MiB every 20ms, without end")
	ignoreTerm := flag.Bool("ignore-term", false, "ignore SIGTERM")
	listen := flag.String("listen", "", "serve GET /health on this address")
	say := flag.String("say", "", "print this to stdout, and \"err: \"+it to stderr, at start")
	uid := flag.Bool("uid", false, "print \"uid N gid N\" at start")
	child := flag.Bool("child", false, "start a child (sleep 1000) in the same process group and print its pid")
	flag.Parse()
	sig := make(chan os.Signal, 1)
	if *ignoreTerm {
		signal.Ignore(syscall.SIGTERM)
		signal.Notify(sig, syscall.SIGINT)
	} else {
		signal.Notify(sig, syscall.SIGINT, syscall.SIGTERM)
	}

	if *starts != "" {
		f, err := os.OpenFile(*starts, os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o644)
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(3)
		}
		fmt.Fprintf(f, "%d %d\n", time.Now().UnixNano(), os.Getpid())
		f.Close()
	}
	if *say != "" {
		fmt.Println(*say)
		fmt.Fprint(os.Stderr, "err: "+*say) // no newline: the supervisor ends the line
	}
	if *uid {
		fmt.Printf("uid %d gid %d\n", os.Getuid(), os.Getgid())
	}
	if *child {
		c := exec.Command("sleep", "1000")
		if err := c.Start(); err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(3)
		}
		fmt.Printf("child %d\n", c.Process.Pid)
	}
	if *listen != "" {
		mux := http.NewServeMux()
		mux.HandleFunc("/health", func(w http.ResponseWriter, _ *http.Request) { fmt.Fprintln(w, "ok") })
		go func() {
			if err := http.ListenAndServe(*listen, mux); err != nil {
				fmt.Fprintln(os.Stderr, err)
				os.Exit(3)
			}
		}()
	}
	if *grow > 0 {
		var keep [][]byte
		go func() {
			for {
				b := make([]byte, *grow<<20)
				for i := 0; i < len(b); i += 4096 {
					b[i] = 1
				}
				keep = append(keep, b)
				time.Sleep(20 * time.Millisecond)
			}
		}()
	}
	if *code >= 0 {
		time.Sleep(*after)
		os.Exit(*code)
	}
	<-sig
}
