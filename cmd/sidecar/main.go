// Command sidecar is a per-instance sidecar proxy: it registers the local
// app in Consul with a TTL heartbeat, resolves services through cached
// Consul watches, and balances the app's outbound traffic over healthy
// nodes.
//
//	sidecar [-config FILE]              run (default ./config.yaml)
//	sidecar run [-config FILE] -- CMD…  run, starting and supervising CMD as the app
//	sidecar validate [-config FILE]     check a config and exit
//	sidecar status|kill|restart|update [-config FILE | -admin ADDR]
//	                                    control a running sidecar's app
//	sidecar version                     print the version
//
// The sidecar never daemonizes: it runs in the foreground, for systemd
// (examples/systemd/sidecar.service) and containers.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"syscall"

	"github.com/sidecarlb/sidecar/config"
)

// version is set at build time with -ldflags "-X main.version=…".
var version = "dev"

// Exit codes.
const (
	exitOK     = 0
	exitFail   = 1
	exitConfig = 2
)

func main() {
	os.Exit(run(os.Args[1:], os.Stdout, os.Stderr))
}

func run(args []string, stdout, stderr io.Writer) int {
	cmd := "serve"
	if len(args) > 0 && len(args[0]) > 0 && args[0][0] != '-' {
		cmd, args = args[0], args[1:]
	}
	switch cmd {
	case "version":
		fmt.Fprintf(stdout, "sidecar %s\n", version)
		return exitOK
	case "validate":
		path, code := parseFlags("validate", args, stderr)
		if code >= 0 {
			return code
		}
		if _, err := loadConfig(path, stderr); err != nil {
			return exitConfig
		}
		fmt.Fprintf(stdout, "%s: ok\n", path)
		return exitOK
	case "serve":
		path, code := parseFlags("sidecar", args, stderr)
		if code >= 0 {
			return code
		}
		cfg, err := loadConfig(path, stderr)
		if err != nil {
			return exitConfig
		}
		ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
		defer stop()
		if err := serve(ctx, cfg, stderr); err != nil {
			fmt.Fprintf(stderr, "sidecar: %v\n", err)
			return exitFail
		}
		return exitOK
	case "run":
		return runApp(args, stderr)
	case "status", "kill", "restart", "update":
		return control(cmd, args, stdout, stderr)
	case "help", "-h", "--help":
		usage(stdout)
		return exitOK
	}
	fmt.Fprintf(stderr, "sidecar: unknown command %q\n", cmd)
	usage(stderr)
	return exitConfig
}

// parseFlags parses -config. It returns the config path and -1, or an exit
// code when the program should stop.
func parseFlags(name string, args []string, stderr io.Writer) (string, int) {
	fs := flag.NewFlagSet(name, flag.ContinueOnError)
	fs.SetOutput(stderr)
	path := fs.String("config", "config.yaml", "config file")
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return "", exitOK
		}
		return "", exitConfig
	}
	if fs.NArg() > 0 {
		fmt.Fprintf(stderr, "%s: unexpected arguments %q\n", name, fs.Args())
		return "", exitConfig
	}
	return *path, -1
}

// loadConfig loads and validates the config, printing every problem on its
// own line.
func loadConfig(path string, stderr io.Writer) (*config.Config, error) {
	cfg, err := config.Load(path)
	if err != nil {
		fmt.Fprintln(stderr, err)
		return nil, err
	}
	return cfg, nil
}

func usage(w io.Writer) {
	fmt.Fprint(w, `usage:
  sidecar [-config FILE]              run the sidecar (default ./config.yaml)
  sidecar run [-config FILE] -- CMD ARGS...
                                      run the sidecar, starting CMD as the app
                                      (sets service.run.command and args)
  sidecar validate [-config FILE]     check a config file and exit (2 when invalid)
  sidecar status  [-config FILE | -admin ADDR] [-json]
                                      show the app, its registration and upstreams
  sidecar kill    [-config FILE | -admin ADDR]
                                      deregister, drain, stop the app
  sidecar restart [-config FILE | -admin ADDR]
                                      rolling restart: out of rotation, drain, restart,
                                      wait until passing in Consul again
  sidecar update  [-config FILE | -admin ADDR]
                                      run service.run.build; only when it succeeds,
                                      a rolling restart
  sidecar version                     print the version
`+"  control commands read admin.listen and admin.token from the config, or\n"+
		"  take -admin ADDR with the token in $"+tokenEnv+"\n")
}
