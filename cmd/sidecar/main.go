// Command sidecar is a per-instance sidecar proxy: it registers the local
// app in Consul with a TTL heartbeat, resolves services through cached
// Consul watches, and balances the app's outbound traffic over healthy
// nodes.
//
//	sidecar [-config FILE]              run (default ./config.yaml)
//	sidecar run [-config FILE] -- CMD…  run, starting and supervising CMD as the app
//	sidecar validate [-config FILE]     check a config and exit
//	sidecar status|kill|restart|update [-config FILE | -admin ADDR] [-timeout D]
//	                                    control a running sidecar's app (status: -json)
//	sidecar drain [-config FILE | -admin ADDR] [-timeout D]
//	                                    deregister and drain before the app is stopped
//	sidecar reload [-config FILE | -admin ADDR] [-json] [-timeout D]
//	                                    make a running sidecar re-read its config file
//	sidecar version                     print the version (also --version)
//	sidecar help [CMD]                  print the usage (also -h, --help)
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
	"runtime/debug"
	"strings"
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
	if len(args) > 0 && cmd == "serve" && (args[0] == "-version" || args[0] == "--version") {
		cmd, args = "version", args[1:]
	}
	if cmd != "help" && cmd != "version" && wantsHelp(args) {
		if !commands[cmd] {
			return unknown(cmd, stderr)
		}
		usage(stdout)
		return exitOK
	}
	switch cmd {
	case "version":
		return runVersion(args, stdout, stderr)
	case "validate":
		return runValidate(args, stdout, stderr)
	case "serve":
		return runServe(args, stderr)
	case "run":
		return runApp(args, stderr)
	case "status", "kill", "restart", "update", "drain", "reload":
		return control(cmd, args, stdout, stderr)
	case "help":
		return runHelp(args, stdout, stderr)
	}
	return unknown(cmd, stderr)
}

// runVersion is `sidecar version`.
func runVersion(args []string, stdout, stderr io.Writer) int {
	if len(args) > 0 {
		fmt.Fprintf(stderr, "sidecar version: unexpected arguments %q\n", args)
		usage(stderr)
		return exitConfig
	}
	fmt.Fprintf(stdout, "sidecar %s\n", buildVersion(version, debug.ReadBuildInfo))
	return exitOK
}

// runValidate is `sidecar validate`.
func runValidate(args []string, stdout, stderr io.Writer) int {
	path, code := parseFlags("validate", args, stderr)
	if code >= 0 {
		return code
	}
	if _, err := loadConfig(path, stderr); err != nil {
		return exitConfig
	}
	fmt.Fprintf(stdout, "%s: ok\n", path)
	return exitOK
}

// runServe is `sidecar serve`, the default command: it serves until
// SIGINT or SIGTERM.
func runServe(args []string, stderr io.Writer) int {
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
	load := func() (*config.Config, error) { return config.Load(path) }
	if err := serve(ctx, cfg, load, stderr); err != nil {
		fmt.Fprintf(stderr, "sidecar: %v\n", err)
		return exitFail
	}
	return exitOK
}

// runHelp is `sidecar help [command]`.
func runHelp(args []string, stdout, stderr io.Writer) int {
	if len(args) > 1 || len(args) == 1 && !commands[args[0]] {
		fmt.Fprintf(stderr, "sidecar help: unknown command %q\n", strings.Join(args, " "))
		usage(stderr)
		return exitConfig
	}
	usage(stdout)
	return exitOK
}

// commands are the subcommands help knows; "serve" is the default one.
var commands = map[string]bool{
	"serve": true, "run": true, "validate": true, "version": true, "help": true,
	"status": true, "kill": true, "restart": true, "update": true, "drain": true, "reload": true,
}

func unknown(cmd string, stderr io.Writer) int {
	fmt.Fprintf(stderr, "sidecar: unknown command %q\n", cmd)
	usage(stderr)
	return exitConfig
}

// wantsHelp reports whether args ask for help (-h, -help, --h, --help)
// before a "--" that starts the app's own command line.
func wantsHelp(args []string) bool {
	for _, a := range args {
		switch a {
		case "--":
			return false
		case "-h", "-help", "--h", "--help":
			return true
		}
	}
	return false
}

// newFlagSet returns a flag set that reports a bad flag with the full
// usage on stderr.
func newFlagSet(name string, stderr io.Writer) *flag.FlagSet {
	fs := flag.NewFlagSet(name, flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.Usage = func() { usage(stderr) }
	return fs
}

// buildVersion is the stamped version, or, for a build not stamped by make
// ("dev"), the module version from the build info (`go install …@v1.2.3`),
// else the VCS revision's first 12 hex digits, "-dirty" when the tree had
// changes (`go build` in a checkout).
func buildVersion(stamped string, info func() (*debug.BuildInfo, bool)) string {
	if stamped != "dev" {
		return stamped
	}
	bi, ok := info()
	if !ok {
		return stamped
	}
	if v := bi.Main.Version; v != "" && v != "(devel)" {
		return v
	}
	var rev, dirty string
	for _, s := range bi.Settings {
		switch s.Key {
		case "vcs.revision":
			rev = s.Value
		case "vcs.modified":
			if s.Value == "true" {
				dirty = "-dirty"
			}
		}
	}
	if rev == "" {
		return stamped
	}
	return rev[:min(12, len(rev))] + dirty
}

// parseFlags parses -config. It returns the config path and -1, or an exit
// code when the program should stop.
func parseFlags(name string, args []string, stderr io.Writer) (string, int) {
	fs := newFlagSet(name, stderr)
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
  sidecar status  [-config FILE | -admin ADDR] [-json] [-timeout 5s]
                                      show the app, its registration and upstreams
  sidecar kill    [-config FILE | -admin ADDR] [-timeout 1m]
                                      deregister, drain, stop the app
  sidecar restart [-config FILE | -admin ADDR] [-timeout 5m]
                                      rolling restart: out of rotation, drain, restart,
                                      wait until passing in Consul again
  sidecar update  [-config FILE | -admin ADDR] [-timeout 15m]
                                      run service.run.build; only when it succeeds,
                                      a rolling restart
  sidecar drain   [-config FILE | -admin ADDR] [-timeout 1m]
                                      deregister, /ready 503, return after service.drain;
                                      the sidecar keeps proxying until it is stopped
  sidecar reload  [-config FILE | -admin ADDR] [-json] [-timeout 30s]
                                      re-read and apply the running sidecar's config
                                      file (as SIGHUP does); exit 2 when invalid
  sidecar version                     print the version (also --version, -version)
  sidecar help [CMD]                  print this usage (also -h, --help)
`+"  control commands read admin.listen and admin.token from the config, or\n"+
		"  take -admin ADDR with the token in $"+tokenEnv+"\n")
}
