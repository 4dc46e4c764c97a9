package main

import (
	"bytes"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"strconv"
	"strings"
	"time"

	"github.com/sidecarlb/sidecar/discovery"
	"github.com/sidecarlb/sidecar/heartbeat"
	"github.com/sidecarlb/sidecar/proxy"
	"github.com/sidecarlb/sidecar/pubsub/httpbroker"
	"github.com/sidecarlb/sidecar/pubsub/natsbroker"
	"github.com/sidecarlb/sidecar/supervisor"
)

// tokenEnv holds the admin token when -admin replaces -config.
const tokenEnv = "SIDECAR_ADMIN_TOKEN"

// controlTimeouts bound each control command by default: a restart waits
// for the drain and the app's health, an update for the build too.
var controlTimeouts = map[string]time.Duration{
	"status":  5 * time.Second,
	"kill":    time.Minute,
	"restart": 5 * time.Minute,
	"update":  15 * time.Minute,
	"drain":   time.Minute,
	"reload":  30 * time.Second,
}

// control runs status, kill, restart, update, drain or reload against a
// running sidecar, through its admin listener.
func control(cmd string, args []string, stdout, stderr io.Writer) int {
	fs := newFlagSet(cmd, stderr)
	path := fs.String("config", "", "config file naming admin.listen and admin.token (default ./config.yaml)")
	addr := fs.String("admin", "", "admin listener host:port, instead of -config; the token comes from $"+tokenEnv)
	raw := fs.Bool("json", false, "print the answer as JSON")
	timeout := fs.Duration("timeout", controlTimeouts[cmd], "give up after this long")
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return exitOK
		}
		return exitConfig
	}
	if fs.NArg() > 0 {
		fmt.Fprintf(stderr, "sidecar %s: unexpected arguments %q\n", cmd, fs.Args())
		return exitConfig
	}
	target, token, err := adminTarget(*path, *addr)
	if err != nil {
		fmt.Fprintf(stderr, "sidecar %s: %v\n", cmd, err)
		return exitConfig
	}
	c := &adminClient{base: "http://" + target, token: token, http: &http.Client{Timeout: *timeout}}
	switch cmd {
	case "status":
		return c.status(*raw, stdout, stderr)
	case "drain":
		return c.drain(*raw, stdout, stderr)
	case "reload":
		return c.reload(*raw, stdout, stderr)
	}
	return c.act(cmd, *raw, stdout, stderr)
}

// adminTarget returns the admin address to dial and the token to send.
func adminTarget(path, addr string) (target, token string, err error) {
	switch {
	case path != "" && addr != "":
		return "", "", errors.New("give -config or -admin, not both")
	case addr != "":
		target = addr
		token = os.Getenv(tokenEnv)
	default:
		if path == "" {
			path = "config.yaml"
		}
		cfg, err := loadConfig(path, io.Discard)
		if err != nil {
			return "", "", err
		}
		target, token = cfg.Admin.Listen, cfg.Admin.Token
		if token == "" {
			token = os.Getenv(tokenEnv)
		}
	}
	host, port, err := net.SplitHostPort(target)
	if err != nil {
		return "", "", fmt.Errorf("admin address: %w", err)
	}
	// A listener on every interface is reached on loopback.
	switch host {
	case "", "0.0.0.0":
		host = "127.0.0.1"
	case "::":
		host = "::1"
	}
	return net.JoinHostPort(host, port), token, nil
}

type adminClient struct {
	base, token string
	http        *http.Client
}

func (c *adminClient) do(method, path string) (int, []byte, error) {
	req, err := http.NewRequest(method, c.base+path, nil)
	if err != nil {
		return 0, nil, err
	}
	if c.token != "" {
		req.Header.Set("Authorization", "Bearer "+c.token)
	}
	resp, err := c.http.Do(req)
	if err != nil {
		return 0, nil, fmt.Errorf("is the sidecar running? %w", err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	return resp.StatusCode, body, err
}

// act posts /app/<action> and prints the result.
func (c *adminClient) act(action string, raw bool, stdout, stderr io.Writer) int {
	code, body, err := c.do(http.MethodPost, "/app/"+action)
	if err != nil {
		fmt.Fprintf(stderr, "sidecar %s: %v\n", action, err)
		return exitFail
	}
	switch code {
	case http.StatusUnauthorized:
		fmt.Fprintf(stderr, "sidecar %s: the admin token is missing or wrong (admin.token, or $%s with -admin)\n", action, tokenEnv)
		return exitFail
	case http.StatusNotFound, http.StatusMethodNotAllowed:
		fmt.Fprintf(stderr, "sidecar %s: the sidecar at %s runs no app (no service.run)\n", action, c.base)
		return exitFail
	}
	var res supervisor.Result
	if err := json.Unmarshal(body, &res); err != nil {
		fmt.Fprintf(stderr, "sidecar %s: unexpected answer %d: %s\n", action, code, bytes.TrimSpace(body))
		return exitFail
	}
	if raw {
		_, _ = stdout.Write(body)
	} else {
		printResult(stdout, stderr, res)
	}
	if !res.OK {
		if raw {
			fmt.Fprintf(stderr, "sidecar %s: %s\n", action, res.Error)
		}
		return exitFail
	}
	return exitOK
}

func printResult(stdout, stderr io.Writer, res supervisor.Result) {
	took := time.Duration(res.Seconds * float64(time.Second)).Round(time.Millisecond)
	if res.BuildOutput != "" {
		w := stdout
		if !res.OK {
			w = stderr
		}
		fmt.Fprintf(w, "build output:\n%s", res.BuildOutput)
		if !strings.HasSuffix(res.BuildOutput, "\n") {
			fmt.Fprintln(w)
		}
	}
	if !res.OK {
		fmt.Fprintf(stderr, "sidecar %s: %s (after %v); app %s", res.Action, res.Error, took, res.App.State)
		if res.App.PID > 0 {
			fmt.Fprintf(stderr, ", pid %d", res.App.PID)
		}
		fmt.Fprintln(stderr)
		return
	}
	switch res.Action {
	case "kill":
		fmt.Fprintf(stdout, "app killed (was pid %d) and instance deregistered, in %v\n", res.PreviousPID, took)
	default:
		fmt.Fprintf(stdout, "app restarted: pid %d → %d, healthy and registered, in %v\n", res.PreviousPID, res.App.PID, took)
	}
}

// status prints the sidecar's /status.
func (c *adminClient) status(raw bool, stdout, stderr io.Writer) int {
	code, body, err := c.do(http.MethodGet, "/status")
	if err == nil && code != http.StatusOK {
		err = fmt.Errorf("status %d: %s", code, bytes.TrimSpace(body))
	}
	if err != nil {
		fmt.Fprintf(stderr, "sidecar status: %v\n", err)
		return exitFail
	}
	if raw {
		_, _ = stdout.Write(body)
		return exitOK
	}
	var doc map[string]json.RawMessage
	if err := json.Unmarshal(body, &doc); err != nil {
		fmt.Fprintf(stderr, "sidecar status: %v\n", err)
		return exitFail
	}
	printStatus(stdout, doc)
	return exitOK
}

// printStatus prints the sections it knows in a readable form, others as
// JSON.
func printStatus(w io.Writer, doc map[string]json.RawMessage) {
	var version string
	var uptime float64
	_ = json.Unmarshal(doc["version"], &version)
	_ = json.Unmarshal(doc["uptime_seconds"], &uptime)
	fmt.Fprintf(w, "sidecar    %s, up %v\n", version, seconds(uptime))

	if raw, ok := doc["app"]; ok {
		var a supervisor.Status
		if json.Unmarshal(raw, &a) == nil {
			fmt.Fprintf(w, "app        %s", a.State)
			if a.PID > 0 {
				fmt.Fprintf(w, ", pid %d, up %v", a.PID, seconds(a.UptimeSeconds))
			}
			fmt.Fprintf(w, ", %d restarts (policy %s)", a.Restarts, a.Policy)
			if a.RSSBytes > 0 {
				fmt.Fprintf(w, ", rss %s", supervisor.FormatBytes(a.RSSBytes))
				if a.MemoryLimit > 0 {
					fmt.Fprintf(w, " of %s", supervisor.FormatBytes(a.MemoryLimit))
				}
			}
			fmt.Fprintf(w, "\n           %s\n", a.Command)
			if a.Reason != "" {
				fmt.Fprintf(w, "           %s\n", a.Reason)
			}
			if a.LastExit != "" {
				fmt.Fprintf(w, "           last exit: %s, %v ago\n", a.LastExit, time.Since(a.LastExitAt).Round(time.Second))
			}
			if !a.NextStart.IsZero() {
				fmt.Fprintf(w, "           next start in %v\n", time.Until(a.NextStart).Round(time.Millisecond))
			}
		}
	} else {
		fmt.Fprintln(w, "app        not run by this sidecar")
	}

	if raw, ok := doc["service"]; ok {
		var s heartbeat.Status
		if json.Unmarshal(raw, &s) == nil {
			reg := "registered"
			switch {
			case s.Deregistered:
				reg = "deregistered"
			case !s.Registered:
				reg = "not registered"
			}
			fmt.Fprintf(w, "service    %s, %s, check %s: %s\n", s.ServiceID, reg, s.CheckStatus, s.Output)
			if s.LastError != "" {
				fmt.Fprintf(w, "           consul error: %s\n", s.LastError)
			}
		}
	} else {
		fmt.Fprintln(w, "service    none (client only)")
	}

	if raw, ok := doc["upstreams"]; ok {
		var routes []proxy.RouteStatus
		if json.Unmarshal(raw, &routes) == nil {
			fmt.Fprintf(w, "upstreams  %d\n", len(routes))
			for _, r := range routes {
				addrs := make([]string, 0, len(r.Endpoints))
				for _, e := range r.Endpoints {
					addrs = append(addrs, e.Addr)
				}
				fmt.Fprintf(w, "  %s → %s (%s): %d endpoints", r.Listener, r.Service, r.Balancer, len(r.Endpoints))
				if len(addrs) > 0 {
					fmt.Fprintf(w, " %s", strings.Join(addrs, ", "))
				}
				if r.Error != "" {
					fmt.Fprintf(w, "; %s", r.Error)
				}
				fmt.Fprintln(w)
				printEndpoints(w, r)
			}
		}
	}
	if raw, ok := doc["discovery"]; ok {
		printDiscovery(w, raw)
	}
	if raw, ok := doc["pubsub"]; ok {
		printPubSub(w, raw)
	}
	if raw, ok := doc["mesh"]; ok {
		printMesh(w, raw)
	}
}

// printEndpoints prints a route's flags and each node's state, breaker,
// ejection and figures.
func printEndpoints(w io.Writer, r proxy.RouteStatus) {
	if r.Stale {
		fmt.Fprintln(w, "    stale: discovery serves the last set it had")
	}
	if r.Panic {
		fmt.Fprintln(w, "    panic: too few nodes left after ejection, balancing over all")
	}
	for _, e := range r.Endpoints {
		state := e.State
		if state == "" {
			state = "serving"
		}
		fmt.Fprintf(w, "    %s %s, breaker %s", e.Addr, strings.ReplaceAll(state, "_", " "), e.Breaker)
		if e.ConsecutiveFailures > 0 {
			fmt.Fprintf(w, " (%d failures in a row)", e.ConsecutiveFailures)
		}
		if e.EjectedUntil != nil {
			fmt.Fprintf(w, ", ejected for %v more", time.Until(*e.EjectedUntil).Round(time.Second))
		}
		fmt.Fprintf(w, ", %d in flight, %.1f req/s, %.1f%% errors", e.ActiveRequests, e.RequestsPerSecond, 100*e.ErrorRate)
		if l := e.LatencyMS; l != nil {
			fmt.Fprintf(w, ", p50 %.1fms p99 %.1fms", l.P50, l.P99)
		}
		fmt.Fprintln(w)
	}
}

// printDiscovery prints each discovery watch and how fresh its set is.
func printDiscovery(w io.Writer, raw json.RawMessage) {
	var watches []discovery.WatchStatus
	if json.Unmarshal(raw, &watches) != nil {
		return
	}
	fmt.Fprintf(w, "discovery  %d watches\n", len(watches))
	for _, ws := range watches {
		fmt.Fprintf(w, "  %s: ", ws.Service)
		switch {
		case ws.Pending:
			fmt.Fprint(w, "waiting for the first answer")
		case ws.Stale:
			fmt.Fprintf(w, "%d nodes, STALE for %v", ws.Endpoints, seconds(ws.AgeSeconds))
		default:
			fmt.Fprintf(w, "%d nodes, fresh", ws.Endpoints)
		}
		if !ws.Confirmed.IsZero() {
			fmt.Fprintf(w, ", confirmed %v ago", time.Since(ws.Confirmed).Round(time.Second))
		}
		if ws.Error != "" {
			fmt.Fprintf(w, "; %s", ws.Error)
		}
		if ws.ACL != "" {
			fmt.Fprintf(w, "; %s", ws.ACL)
		}
		fmt.Fprintln(w)
	}
}

// printPubSub prints the outbox and each topic and group's backlog.
func printPubSub(w io.Writer, raw json.RawMessage) {
	var n natsbroker.Status
	if json.Unmarshal(raw, &n) == nil && n.Broker == "nats" {
		printNATS(w, n)
		return
	}
	var s httpbroker.Status
	if json.Unmarshal(raw, &s) != nil {
		return
	}
	fmt.Fprintf(w, "pubsub     outbox %d, oldest %v", s.Outbox, seconds(s.OldestSeconds))
	if s.Unassigned > 0 {
		fmt.Fprintf(w, ", %d waiting for the subscriptions from Consul", s.Unassigned)
	}
	fmt.Fprintln(w)
	for _, g := range s.Groups {
		fmt.Fprintf(w, "  %s → %s: %d pending, %d in flight, oldest %v\n", g.Topic, g.Group, g.Pending, g.InFlight, seconds(g.OldestSeconds))
	}
}

// printNATS prints the nats broker's connection and each consumer.
func printNATS(w io.Writer, s natsbroker.Status) {
	state := "disconnected"
	if s.Connected {
		state = "connected to " + s.Server
	}
	fmt.Fprintf(w, "pubsub     nats %s, stream %s", state, s.Stream)
	if s.Spooled > 0 {
		fmt.Fprintf(w, ", %d spooled", s.Spooled)
	}
	fmt.Fprintln(w)
	for _, g := range s.Groups {
		pending := strconv.FormatInt(g.Pending, 10)
		if g.Pending < 0 {
			pending = "?"
		}
		fmt.Fprintf(w, "  %s → %s: %s pending, %d in flight (consumer %s)", g.Topic, g.Group, pending, g.InFlight, g.Consumer)
		if g.Error != "" {
			fmt.Fprintf(w, "; %s", g.Error)
		}
		fmt.Fprintln(w)
	}
}

func seconds(s float64) time.Duration {
	return time.Duration(s * float64(time.Second)).Round(time.Second)
}

// drain posts /drain: the sidecar deregisters and answers once
// service.drain has passed.
func (c *adminClient) drain(raw bool, stdout, stderr io.Writer) int {
	code, body, err := c.do(http.MethodPost, "/drain")
	if err != nil {
		fmt.Fprintf(stderr, "sidecar drain: %v\n", err)
		return exitFail
	}
	if code == http.StatusUnauthorized {
		fmt.Fprintf(stderr, "sidecar drain: the admin token is missing or wrong (admin.token, or $%s with -admin)\n", tokenEnv)
		return exitFail
	}
	var res drainResult
	if err := json.Unmarshal(body, &res); err != nil {
		fmt.Fprintf(stderr, "sidecar drain: unexpected answer %d: %s\n", code, bytes.TrimSpace(body))
		return exitFail
	}
	took := time.Duration(res.Seconds * float64(time.Second)).Round(time.Millisecond)
	switch {
	case raw:
		_, _ = stdout.Write(body)
	case !res.OK:
	case res.Deregistered != "":
		fmt.Fprintf(stdout, "%s deregistered and drained in %v; /ready answers 503 until the sidecar stops\n", res.Deregistered, took)
	default:
		fmt.Fprintf(stdout, "draining (no service registered); /ready answers 503 until the sidecar stops\n")
	}
	if !res.OK {
		fmt.Fprintf(stderr, "sidecar drain: %s (after %v)\n", res.Error, took)
		return exitFail
	}
	return exitOK
}

// reload posts /reload: the sidecar re-reads its config file. It prints
// what was applied and what needs a restart, or the file's problems as
// `sidecar validate` does (exit 2), or what failed to apply (exit 1).
func (c *adminClient) reload(raw bool, stdout, stderr io.Writer) int {
	code, body, err := c.do(http.MethodPost, "/reload")
	if err != nil {
		fmt.Fprintf(stderr, "sidecar reload: %v\n", err)
		return exitFail
	}
	if code == http.StatusUnauthorized {
		fmt.Fprintf(stderr, "sidecar reload: the admin token is missing or wrong (admin.token, or $%s with -admin)\n", tokenEnv)
		return exitFail
	}
	var res reloadResult
	if err := json.Unmarshal(body, &res); err != nil {
		fmt.Fprintf(stderr, "sidecar reload: unexpected answer %d: %s\n", code, bytes.TrimSpace(body))
		return exitFail
	}
	if raw {
		_, _ = stdout.Write(body)
	}
	took := time.Duration(res.Seconds * float64(time.Second)).Round(time.Microsecond)
	switch res.Result {
	case reloadInvalid:
		for _, e := range res.Errors {
			fmt.Fprintln(stderr, e)
		}
		fmt.Fprintln(stderr, "sidecar reload: config rejected; the running config stays")
		return exitConfig
	case reloadOK:
		if !raw {
			switch {
			case len(res.Live) == 0 && len(res.Restart) == 0:
				fmt.Fprintf(stdout, "config reloaded in %v: no change\n", took)
			default:
				fmt.Fprintf(stdout, "config reloaded in %v\n", took)
			}
			printKeys(stdout, "applied", res.Live)
			printKeys(stdout, "listeners opened", res.Opened)
			printKeys(stdout, "listeners closed (draining)", res.Closed)
			printKeys(stdout, "needs a restart (running value kept)", res.Restart)
		}
		return exitOK
	}
	for _, e := range res.Errors {
		fmt.Fprintf(stderr, "sidecar reload: %s\n", e)
	}
	if !raw {
		printKeys(stdout, "applied", res.Live)
		printKeys(stdout, "needs a restart (running value kept)", res.Restart)
	}
	return exitFail
}

func printKeys(w io.Writer, what string, keys []string) {
	if len(keys) > 0 {
		fmt.Fprintf(w, "  %s: %s\n", what, strings.Join(keys, ", "))
	}
}
