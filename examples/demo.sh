#!/usr/bin/env bash
# demo.sh shows client-side load balancing with sidecars, live.
#
# On loopback only, it starts a Consul dev agent, three instances of the echo
# example, each with its own sidecar registering it in Consul, and a
# client-only sidecar with an upstream port for echo (round_robin). Then
# examples/loadgen sends traffic through that port and shows how it spreads
# over the instances. A third of the way in, the demo kills echo-2: its
# sidecar's probe fails, the check goes critical and echo-2 leaves rotation.
# Later it starts echo-2 again and it rejoins. The demo ends by itself and
# stops every process it started, on Ctrl-C too.
#
#   make demo              builds what it needs, then runs this script
#   ./examples/demo.sh     needs bin/sidecar, bin/echo (make build) and consul
#
# Environment:
#   DEMO_SECONDS    length of the traffic phase in seconds, at least 10; default 25
#   DEMO_RATE       requests per second; default 200
#   DEMO_PORT_BASE  first of the loopback ports BASE..BASE+31 it uses; default 19100
#   DEMO_PLAIN=1    print one line a second even on a terminal
#   CONSUL_BIN      the consul binary; default bin/consul, else consul on PATH
set -euo pipefail

cd "$(dirname "$0")/.."

seconds=${DEMO_SECONDS:-25}
rate=${DEMO_RATE:-200}
base=${DEMO_PORT_BASE:-19100}

say() { printf '» %s\n' "$*"; }
die() {
	printf 'demo: %s\n' "$*" >&2
	exit 1
}

[[ $seconds =~ ^[0-9]+$ ]] && ((seconds >= 10)) || die "DEMO_SECONDS must be a whole number of seconds, at least 10; got '$seconds'"
[[ $rate =~ ^[0-9]+$ ]] && ((rate >= 1)) || die "DEMO_RATE must be a whole number of requests per second; got '$rate'"
[[ $base =~ ^[0-9]+$ ]] && ((base >= 1024 && base <= 65500)) || die "DEMO_PORT_BASE must be a port from 1024 to 65500; got '$base'"

# Ports, all on 127.0.0.1.
consul_http=$base
consul_serf_lan=$((base + 1))
consul_serf_wan=$((base + 2))
consul_server=$((base + 3))
echo_port() { echo $((base + 10 + $1)); }  # echo-N
admin_port() { echo $((base + 20 + $1)); } # sidecar-N
client_admin=$((base + 30))
upstream=$((base + 31))

# Binaries.
consul=${CONSUL_BIN:-}
if [[ -z $consul ]]; then
	if [[ -x bin/consul ]]; then
		consul=bin/consul
	elif command -v consul >/dev/null 2>&1; then
		consul=$(command -v consul)
	else
		die "no consul binary: run 'make consul' (or 'make demo'), put consul on PATH, or set CONSUL_BIN"
	fi
fi
for b in bin/sidecar bin/echo; do
	[[ -x $b ]] || die "$b is missing: run 'make build' (or 'make demo')"
done
loadgen=bin/loadgen
stale=
for f in examples/loadgen/*.go; do
	if [[ $f -nt $loadgen ]]; then stale=1; fi
done
if [[ ! -x $loadgen || -n $stale ]]; then
	CGO_ENABLED=0 "${GO:-go}" build -trimpath -o "$loadgen" ./examples/loadgen || die "could not build $loadgen"
fi

# A port that accepts a connection is taken.
port_taken() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
for p in $consul_http $consul_serf_lan $consul_serf_wan $consul_server \
	"$(echo_port 1)" "$(echo_port 2)" "$(echo_port 3)" \
	"$(admin_port 1)" "$(admin_port 2)" "$(admin_port 3)" $client_admin $upstream; do
	if port_taken "$p"; then
		die "port $p on 127.0.0.1 is in use (by an earlier demo still running?); free it, or pick other ports with DEMO_PORT_BASE=29100"
	fi
done

# Settings from the environment must not point the demo at another Consul.
unset CONSUL_HTTP_ADDR CONSUL_HTTP_TOKEN CONSUL_HTTP_TOKEN_FILE CONSUL_HTTP_SSL CONSUL_HTTP_AUTH CONSUL_NAMESPACE CONSUL_PARTITION

dir=$(mktemp -d "${TMPDIR:-/tmp}/sidecar-demo.XXXXXX")
events=$dir/events
: >"$events"

# Every process started, in order: names[i] runs as pids[i] ("" once stopped).
names=()
pids=()
started=0

# start NAME CMD...: run CMD in the background, in its own process group (so
# a Ctrl-C reaches only this script, which then stops everything in order),
# with its output in $dir/NAME.log.
start() {
	local name=$1
	shift
	set -m
	"$@" </dev/null >>"$dir/$name.log" 2>&1 &
	local pid=$!
	set +m
	names+=("$name")
	pids+=("$pid")
	started=$((started + 1))
}

# pid_of NAME: the PID of the running process NAME, or nothing.
pid_of() {
	local i
	for i in "${!names[@]}"; do
		if [[ ${names[$i]} == "$1" && -n ${pids[$i]} ]]; then
			echo "${pids[$i]}"
			return
		fi
	done
}

# stop PID...: SIGTERM each, SIGKILL one still there after 10s, and wait for
# each to exit.
stop() {
	local pid i
	for pid in "$@"; do
		kill -TERM "$pid" 2>/dev/null || true
	done
	for pid in "$@"; do
		for ((i = 0; i < 100; i++)); do
			kill -0 "$pid" 2>/dev/null || break
			sleep 0.1
		done
		{
			kill -KILL "$pid"
			wait "$pid"
		} 2>/dev/null || true
	done
}

# stop_named PATTERN: stop every running process whose name matches the glob.
stop_named() {
	local i list=()
	for i in "${!names[@]}"; do
		# shellcheck disable=SC2053 # $1 is a glob
		if [[ ${names[$i]} == $1 && -n ${pids[$i]} ]]; then
			list+=("${pids[$i]}")
			pids[i]=
		fi
	done
	if ((${#list[@]} > 0)); then
		stop "${list[@]}"
	fi
}

# crash NAME: kill NAME at once with SIGKILL, as a crash would, and wait.
crash() {
	local i
	for i in "${!names[@]}"; do
		if [[ ${names[$i]} == "$1" && -n ${pids[$i]} ]]; then
			{
				kill -KILL "${pids[$i]}"
				wait "${pids[$i]}"
			} 2>/dev/null || true
			pids[i]=
		fi
	done
}

# alive NAME: whether NAME is still running.
alive() {
	local pid
	pid=$(pid_of "$1")
	[[ -n $pid ]] && kill -0 "$pid" 2>/dev/null
}

cleanup() {
	local rc=$?
	trap '' INT TERM HUP # finish the cleanup even on a second Ctrl-C
	# Clients first (loadgen prints its summary), then the sidecars (they
	# deregister from Consul), then the apps, then Consul.
	stop_named 'loadgen*'
	echo
	say "stopping… (the sidecars deregister, then drain for 1s)"
	stop_named client-sidecar
	stop_named 'sidecar-*'
	stop_named 'echo-*'
	stop_named consul
	local i left=0
	for i in "${!pids[@]}"; do
		if [[ -n ${pids[$i]} ]] && kill -0 "${pids[$i]}" 2>/dev/null; then left=$((left + 1)); fi
	done
	if ((left > 0)); then
		say "$left processes would not stop; see $dir"
	else
		say "stopped every process the demo started ($started); logs are in $dir"
	fi
	exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
trap 'exit 129' HUP

# show_logs NAME...: the end of each log, after a failure.
show_logs() {
	local n
	for n in "$@"; do
		[[ -s $dir/$n.log ]] || continue
		printf -- '--- %s (last lines of %s)\n' "$n" "$dir/$n.log" >&2
		tail -n 15 "$dir/$n.log" >&2
	done
}

# now_ms: the time in milliseconds, from $EPOCHREALTIME (bash 5) or, more
# coarsely, $SECONDS.
now_ms() {
	if [[ -n ${EPOCHREALTIME:-} ]]; then
		local t=${EPOCHREALTIME/[.,]/}
		echo $((10#$t / 1000))
	else
		echo $((SECONDS * 1000))
	fi
}

# pause_until MS: sleep in short steps until now_ms reaches MS, so that a
# Ctrl-C is handled at once.
pause_until() {
	while (($(now_ms) < $1)); do
		sleep 0.1
	done
}

# client_has ID: whether the client sidecar's admin /status lists an echo
# endpoint with service ID ID, that is, whether the instance is in its
# rotation.
client_has() (
	exec 3<>"/dev/tcp/127.0.0.1/$client_admin" || exit 2
	printf 'GET /status HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n' >&3
	body= line=
	while IFS= read -r -t 2 line <&3 || [[ -n $line ]]; do
		body+=$line
		line=
	done
	re="\"id\": *\"$1\""
	[[ $body =~ $re ]]
) 2>/dev/null

# until_client WANT ID: wait, up to 10s, until client_has ID is WANT (yes or
# no); print the milliseconds that took, or nothing on a timeout.
until_client() {
	local from now
	from=$(now_ms)
	while :; do
		if client_has "$2"; then [[ $1 == yes ]] && break; else [[ $1 == no ]] && break; fi
		now=$(now_ms)
		((now - from < 10000)) || return 0
		sleep 0.05
	done
	now=$(now_ms)
	echo $((now - from))
}

# secs MS: MS as seconds with one decimal, "0.4s".
secs() { printf '%d.%ds' $(($1 / 1000)) $(($1 % 1000 / 100)); }

# tell TEXT: a narration line for loadgen to print above its table and to
# time instances leaving and rejoining rotation against.
tell() {
	if [[ -n ${EPOCHREALTIME:-} ]]; then
		printf '@%s %s\n' "$EPOCHREALTIME" "$*" >>"$events"
	else
		printf '%s\n' "$*" >>"$events"
	fi
}

say "logs of every process go to $dir"

# Consul: a dev agent on loopback, non-default ports, no DNS or gRPC.
cat >"$dir/consul.hcl" <<EOF
node_name            = "sidecar-demo"
bind_addr            = "127.0.0.1"
client_addr          = "127.0.0.1"
disable_update_check = true
log_level            = "info"
ports {
  http     = $consul_http
  dns      = -1
  grpc     = -1
  grpc_tls = -1
  serf_lan = $consul_serf_lan
  serf_wan = $consul_serf_wan
  server   = $consul_server
}
EOF
say "starting a Consul dev agent on 127.0.0.1:$consul_http"
start consul "$consul" agent -dev -config-file "$dir/consul.hcl"
deadline=$((SECONDS + 30))
until "$consul" catalog services -http-addr="http://127.0.0.1:$consul_http" >/dev/null 2>&1; do
	if ! alive consul; then
		show_logs consul
		die "consul exited"
	fi
	if ((SECONDS >= deadline)); then
		show_logs consul
		die "consul is not ready after 30s"
	fi
	sleep 0.1
done

# Three instances of echo, each registered by its own sidecar.
for n in 1 2 3; do
	cat >"$dir/sidecar-$n.yaml" <<EOF
service:
  name: echo
  id: echo-$n
  port: $(echo_port $n)
  check:
    http: http://127.0.0.1:$(echo_port $n)/health
    interval: 500ms
    timeout: 500ms
  ttl: 3s
  drain: 1s
consul:
  address: 127.0.0.1:$consul_http
admin:
  listen: 127.0.0.1:$(admin_port $n)
log:
  format: console
EOF
	start "echo-$n" bin/echo -listen "127.0.0.1:$(echo_port $n)" -name "echo-$n"
	start "sidecar-$n" bin/sidecar -config "$dir/sidecar-$n.yaml"
done
say "started echo-1, echo-2, echo-3 on 127.0.0.1:$(echo_port 1)-$(echo_port 3), each with a sidecar that registers it (HTTP check every 500ms, TTL 3s)"

# The client's sidecar: no service of its own, one upstream port for echo.
cat >"$dir/client-sidecar.yaml" <<EOF
consul:
  address: 127.0.0.1:$consul_http
admin:
  listen: 127.0.0.1:$client_admin
log:
  format: console
  access: $dir/access.log
upstreams:
  - name: echo
    listen: 127.0.0.1:$upstream
    balancer: round_robin
EOF
start client-sidecar bin/sidecar -config "$dir/client-sidecar.yaml"
say "started the client's sidecar: 127.0.0.1:$upstream balances over healthy echo instances (round_robin)"
say "dashboard: http://127.0.0.1:$client_admin/ (open it in a browser to watch the failover live); access log: $dir/access.log"

# A process that failed at once (a port taken meanwhile, a bad config) is
# better reported now than after the wait below.
sleep 0.3
for n in echo-1 echo-2 echo-3 sidecar-1 sidecar-2 sidecar-3 client-sidecar; do
	if ! alive "$n"; then
		show_logs "$n"
		die "$n exited at start"
	fi
done

url=http://127.0.0.1:$upstream/
start loadgen-wait "$loadgen" -url "$url" -expect 3 -wait 30s -duration 0
rc=0
wait "$(pid_of loadgen-wait)" || rc=$?
if ((rc != 0)); then
	show_logs loadgen-wait consul sidecar-1 sidecar-2 sidecar-3 client-sidecar echo-1 echo-2 echo-3
	die "echo did not answer through the client sidecar"
fi
kill_at=$((seconds * 8000 / 25)) # ms after the start: 8s of 25
restart_at=$((seconds * 15000 / 25))
say "all 3 instances answer through the client sidecar; now sending $rate requests/s to it for ${seconds}s"
say "at ~$(((kill_at + 500) / 1000))s the demo kills echo-2, at ~$(((restart_at + 500) / 1000))s it starts echo-2 again"
echo
# loadgen writes to the terminal itself, so that it can redraw its table.
plain=()
if [[ -n ${DEMO_PLAIN:-} ]]; then plain=(-plain); fi
set -m
"$loadgen" -url "$url" -rate "$rate" -duration "${seconds}s" -concurrency 8 -expect 3 -wait 5s \
	-events "$events" ${plain[@]+"${plain[@]}"} </dev/null 2>>"$dir/loadgen.log" &
lg=$!
set +m
names+=(loadgen)
pids+=("$lg")
started=$((started + 1))
t0=$(now_ms)

pause_until $((t0 + kill_at))
# Narration below must not name echo-2 except when acting on it: loadgen
# times echo-2 leaving and rejoining from the latest line that names it.
if alive loadgen; then
	tell "killing echo-2 (SIGKILL; its sidecar stays up, so its probe fails and the check goes critical)"
	crash echo-2
	took=$(until_client no echo-2)
	if [[ -n $took ]]; then
		tell "the client sidecar dropped it from its endpoints $(secs "$took") after the kill"
	else
		tell "the client sidecar still lists it 10s after the kill"
	fi
fi
pause_until $((t0 + restart_at))
if alive loadgen; then
	tell "starting echo-2 again"
	start echo-2 bin/echo -listen "127.0.0.1:$(echo_port 2)" -name echo-2
	took=$(until_client yes echo-2)
	if [[ -n $took ]]; then
		tell "the client sidecar has it back in its endpoints $(secs "$took") after the start"
	fi
fi

rc=0
wait "$lg" || rc=$?
for i in "${!names[@]}"; do
	[[ ${names[$i]} == loadgen ]] && pids[i]=
done
if [[ -s $dir/access.log ]]; then
	retried=$(grep -c '"attempts":[2-9]' "$dir/access.log" || true)
	refused=$(grep -c '"error_code"' "$dir/access.log" || true)
	say "access log: $(wc -l <"$dir/access.log") requests, $retried retried on another node, $refused answered by the sidecar itself"
	grep -m1 '"error_code"' "$dir/access.log" || grep -m1 '"attempts":[2-9]' "$dir/access.log" || true
fi
exit "$rc"
