package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"maps"
	"os/signal"
	"slices"
	"syscall"
	"time"

	"github.com/hashicorp/consul/api"
	"go.uber.org/zap"

	"github.com/sidecarlb/sidecar/config"
	"github.com/sidecarlb/sidecar/heartbeat"
	"github.com/sidecarlb/sidecar/supervisor"
)

// runApp is `sidecar run [-config FILE] -- CMD ARGS…`: serve, with CMD ARGS
// as service.run.command and args.
func runApp(args []string, stderr io.Writer) int {
	fs := newFlagSet("run", stderr)
	path := fs.String("config", "config.yaml", "config file")
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return exitOK
		}
		return exitConfig
	}
	if fs.NArg() == 0 {
		fmt.Fprintln(stderr, "sidecar run: missing the app's command: sidecar run [-config FILE] -- CMD ARGS…")
		return exitConfig
	}
	cfg, err := loadConfig(*path, stderr)
	if err != nil {
		return exitConfig
	}
	if cfg.Service == nil {
		fmt.Fprintf(stderr, "%s: service: required by sidecar run (the app's name and port, to register it)\n", *path)
		return exitConfig
	}
	if cfg.Service.Run == nil {
		cfg.Service.Run = config.DefaultRun()
	}
	cfg.Service.Run.Command, cfg.Service.Run.Args = fs.Arg(0), fs.Args()[1:]
	// A reload reads the file as the start did, the command line included.
	load := func() (*config.Config, error) {
		next, err := config.Load(*path)
		if err == nil && next.Service != nil {
			if next.Service.Run == nil {
				next.Service.Run = config.DefaultRun()
			}
			next.Service.Run.Command, next.Service.Run.Args = fs.Arg(0), fs.Args()[1:]
		}
		return next, err
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	if err := serve(ctx, cfg, load, stderr); err != nil {
		fmt.Fprintf(stderr, "sidecar: %v\n", err)
		return exitFail
	}
	return exitOK
}

// stopSignals maps service.run.stop_signal, as Load normalises it.
var stopSignals = map[string]syscall.Signal{
	"SIGTERM": syscall.SIGTERM, "SIGINT": syscall.SIGINT, "SIGQUIT": syscall.SIGQUIT, "SIGHUP": syscall.SIGHUP,
	"SIGUSR1": syscall.SIGUSR1, "SIGUSR2": syscall.SIGUSR2, "SIGKILL": syscall.SIGKILL,
}

// newApp wires the supervisor of service.run to the registrar: it holds the
// check while the app starts, deregisters on kill, and waits for the agent
// to see the instance passing after a rolling restart.
func newApp(s *config.Service, reg *heartbeat.Registrar, agent *api.Agent, log *zap.Logger) (*supervisor.App, error) {
	r := s.Run
	if r.Command == "" {
		return nil, errors.New("service.run.command: required (or give the command after --: sidecar run -- CMD ARGS…)")
	}
	var env []string
	for _, k := range slices.Sorted(maps.Keys(r.Env)) {
		env = append(env, k+"="+r.Env[k])
	}
	crashLoop := r.CrashLoop.Restarts
	if crashLoop == 0 {
		crashLoop = -1 // off
	}
	app, err := supervisor.New(supervisor.Spec{
		Command: r.Command, Args: r.Args, Env: env, Dir: r.Dir,
		Chroot: r.Chroot, User: r.User, Build: r.Build, Output: r.Output,
		Restart:    r.Restart,
		BackoffMin: r.Backoff.Min, BackoffMax: r.Backoff.Max,
		CrashLoopRestarts: crashLoop, CrashLoopWindow: r.CrashLoop.Window,
		MemoryLimit: r.MemoryLimitBytes,
		StopSignal:  stopSignals[r.StopSignal], StopTimeout: r.StopTimeout,
	}, reg, supervisor.Options{
		Drain:      s.Drain,
		Deregister: reg.Deregister,
		Register:   reg.Register,
		Ready:      instanceReady(reg, agent),
	}, log)
	if err != nil {
		return nil, fmt.Errorf("service.run: %w", err)
	}
	return app, nil
}

// instanceReady returns a wait until the registrar reports the instance
// registered and passing on its own probe, and the agent agrees.
func instanceReady(reg *heartbeat.Registrar, agent *api.Agent) func(context.Context) error {
	filter := fmt.Sprintf("CheckID == %q", reg.CheckID())
	return func(ctx context.Context) error {
		for {
			st := reg.Status()
			if st.Registered && !st.Overridden && st.CheckStatus == api.HealthPassing {
				checks, err := agent.ChecksWithFilterOpts(filter, (&api.QueryOptions{}).WithContext(ctx))
				if c := checks[reg.CheckID()]; err == nil && c != nil && c.Status == api.HealthPassing {
					return nil
				}
			}
			select {
			case <-ctx.Done():
				return fmt.Errorf("check %s: %s: %w", st.CheckStatus, st.Output, ctx.Err())
			case <-time.After(50 * time.Millisecond):
			}
		}
	}
}
