#!/usr/bin/env bash
# pubsub-demo.sh shows an order flow over pub/sub, live, and counts what was
# lost.
#
# On loopback only, it starts a Consul dev agent; two instances of a
# "billing" consumer sharing one queue group, and one "shipping" consumer
# getting its own copy of every order, each with its own sidecar; and a
# client-only sidecar that the publisher publishes to. Midway through the
# stream it kills billing-2's sidecar with SIGKILL. When the publisher's
# outbox is empty it counts, per group, the orders that arrived and the
# ones lost (0). It stops every process it started, on Ctrl-C too.
#
#   make demo-pubsub            builds what it needs, then runs this script
#   make demo-pubsub-nats       the same on the nats broker (NATS JetStream)
#   ./examples/pubsub-demo.sh   needs bin/sidecar, bin/orders (make build) and consul
#
# Environment:
#   DEMO_BROKER     http (default: peer to peer over Consul) or nats (a
#                   nats-server with JetStream on BASE+4; bin/nats-server
#                   from make nats, else nats-server on PATH, or NATS_SERVER_BIN)
#   DEMO_ORDERS     orders to publish; default 3000
#   DEMO_RATE       orders per second; default 300
#   DEMO_PORT_BASE  first of the loopback ports BASE..BASE+39; default 19400
#   CONSUL_BIN      the consul binary; default bin/consul, else consul on PATH
set -euo pipefail

cd "$(dirname "$0")/.."

orders=${DEMO_ORDERS:-3000}
rate=${DEMO_RATE:-300}
base=${DEMO_PORT_BASE:-19400}
broker=${DEMO_BROKER:-http}

say() { printf '» %s\n' "$*"; }
die() {
	printf 'pubsub-demo: %s\n' "$*" >&2
	exit 1
}
[[ $orders =~ ^[0-9]+$ ]] && ((orders >= 100)) || die "DEMO_ORDERS must be a whole number, at least 100; got '$orders'"
[[ $rate =~ ^[0-9]+$ ]] && ((rate >= 1)) || die "DEMO_RATE must be a whole number of orders per second; got '$rate'"
[[ $broker == http || $broker == nats ]] || die "DEMO_BROKER must be http or nats; got '$broker'"
[[ $base =~ ^[0-9]+$ ]] && ((base >= 1024 && base <= 65490)) || die "DEMO_PORT_BASE must be a port from 1024 to 65490; got '$base'"

consul=${CONSUL_BIN:-}
if [[ -z $consul ]]; then
	if [[ -x bin/consul ]]; then
		consul=bin/consul
	elif command -v consul >/dev/null 2>&1; then
		consul=$(command -v consul)
	else
		die "no consul binary: run 'make consul' (or 'make demo-pubsub'), put consul on PATH, or set CONSUL_BIN"
	fi
fi
natsd=
if [[ $broker == nats ]]; then
	natsd=${NATS_SERVER_BIN:-}
	if [[ -z $natsd && -x bin/nats-server ]]; then
		natsd=bin/nats-server
	elif [[ -z $natsd ]]; then
		natsd=$(command -v nats-server) || die "no nats-server binary: run 'make nats' (or 'make demo-pubsub-nats'), put nats-server on PATH, or set NATS_SERVER_BIN"
	fi
fi
for b in bin/sidecar bin/orders; do
	[[ -x $b ]] || die "$b is missing: run 'make build' (or 'make demo-pubsub')"
done
command -v curl >/dev/null || die "curl is needed"
unset CONSUL_HTTP_ADDR CONSUL_HTTP_TOKEN CONSUL_HTTP_TOKEN_FILE

# Ports, all on 127.0.0.1: consul, then per consumer N (1 billing-1, 2
# billing-2, 3 shipping-1) its app, admin and peer listener, then the
# publisher's sidecar.
consul_http=$base
app_port() { echo $((base + 10 + $1)); }
admin_port() { echo $((base + 20 + $1)); }
peer_port() { echo $((base + 30 + $1)); }
api_port() { echo $((base + 35 + $1)); }
pub_admin=$((base + 25))
pub_api=$((base + 39))

dir=$(mktemp -d "${TMPDIR:-/tmp}/sidecar-pubsub-demo.XXXXXX")
names=()
pids=()
start() {
	local name=$1
	shift
	set -m
	"$@" </dev/null >>"$dir/$name.log" 2>&1 &
	pids+=("$!")
	set +m
	names+=("$name")
}
signal() { # signal SIG NAME
	local i
	for i in "${!names[@]}"; do
		if [[ ${names[$i]} == "$2" && -n ${pids[$i]} ]]; then
			kill "-$1" "${pids[$i]}" 2>/dev/null || true
			wait "${pids[$i]}" 2>/dev/null || true
			pids[i]=
		fi
	done
}
cleanup() {
	local rc=$? i
	trap '' INT TERM HUP
	for ((i = ${#pids[@]} - 1; i >= 0; i--)); do
		if [[ -n ${pids[$i]} ]]; then
			kill -TERM "${pids[$i]}" 2>/dev/null || true
		fi
	done
	for i in "${!pids[@]}"; do
		[[ -n ${pids[$i]} ]] && wait "${pids[$i]}" 2>/dev/null || true
	done
	say "stopped every process the demo started; logs are in $dir"
	exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT

wait_until() { # wait_until SECONDS WHAT CMD...
	local deadline=$((SECONDS + $1)) what=$2
	shift 2
	until "$@" >/dev/null 2>&1; do
		((SECONDS < deadline)) || die "timed out waiting for $what (logs in $dir)"
		sleep 0.2
	done
}

say "starting a Consul dev agent on 127.0.0.1:$consul_http"
start consul "$consul" agent -dev -bind 127.0.0.1 -client 127.0.0.1 -http-port "$consul_http" \
	-serf-lan-port $((base + 1)) -serf-wan-port $((base + 2)) -server-port $((base + 3)) -dns-port -1 -grpc-port -1
wait_until 20 "consul" curl -sf "http://127.0.0.1:$consul_http/v1/status/leader"
# The broker's part of each sidecar's pubsub: section.
broker_yaml=""
if [[ $broker == nats ]]; then
	say "starting nats-server with JetStream on 127.0.0.1:$((base + 4))"
	start nats-server "$natsd" -a 127.0.0.1 -p $((base + 4)) -js -sd "$dir/nats"
	wait_until 20 "nats-server" bash -c "echo > /dev/tcp/127.0.0.1/$((base + 4))"
	broker_yaml="  broker: nats
  nats: {urls: [\"nats://127.0.0.1:$((base + 4))\"]}"
fi

consumer() { # consumer N NAME GROUP
	local n=$1 name=$2 group=$3
	start "$name" bin/orders consume -listen "127.0.0.1:$(app_port "$n")" -name "$name"
	cat >"$dir/$name.yaml" <<YAML
service:
  name: $group
  id: $name
  address: 127.0.0.1
  port: $(app_port "$n")
  check: {http: "http://127.0.0.1:$(app_port "$n")/health", interval: 250ms}
  ttl: 2s
  drain: 1s
consul: {address: 127.0.0.1:$consul_http}
admin: {listen: 127.0.0.1:$(admin_port "$n")}
pubsub:
  listen: 127.0.0.1:$(api_port "$n")
  data_dir: $dir/$name.data
  http: {listen: 127.0.0.1:$(peer_port "$n")}
$broker_yaml
subscriptions:
  - {topic: orders, route: /orders, group: $group}
YAML
	start "$name-sidecar" bin/sidecar -config "$dir/$name.yaml"
}
say "starting billing-1 and billing-2 (group billing: they share the orders) and shipping-1 (group shipping: a copy of each)"
consumer 1 billing-1 billing
consumer 2 billing-2 billing
consumer 3 shipping-1 shipping
passing() { # passing SERVICE COUNT
	[[ $(curl -sf "http://127.0.0.1:$consul_http/v1/health/service/$1?passing" | grep -Ec "\"Service\": ?\"$1\"") -eq $2 ]]
}
consuming() { # consuming N: the sidecar's nats consumer exists
	curl -sf "http://127.0.0.1:$(admin_port "$1")/status" | grep -Eq '"pending": ?[0-9]'
}
if [[ $broker == nats ]]; then
	for n in 1 2 3; do
		wait_until 20 "consumer $n" consuming "$n"
	done
else
	wait_until 20 "two passing billing peers" passing pubsub-billing 2
	wait_until 20 "one passing shipping peer" passing pubsub-shipping 1
fi

cat >"$dir/publisher.yaml" <<YAML
consul: {address: 127.0.0.1:$consul_http}
admin: {listen: 127.0.0.1:$pub_admin}
pubsub:
  listen: 127.0.0.1:$pub_api
  data_dir: $dir/publisher.data
$broker_yaml
YAML
start publisher-sidecar bin/sidecar -config "$dir/publisher.yaml"
wait_until 20 "the publish API" curl -sf "http://127.0.0.1:$pub_api/v1.0/healthz"

say "publishing $orders orders at $rate a second to the publisher's sidecar"
start publisher bin/orders publish -api "127.0.0.1:$pub_api" -n "$orders" -rate "$rate"
half=$((orders / rate / 2))
sleep "$((half > 0 ? half : 1))"
say "kill -9 billing-2's sidecar, mid-stream"
signal KILL billing-2-sidecar
wait_until $((orders / rate + 30)) "the publisher" bash -c "! kill -0 ${pids[${#pids[@]} - 1]} 2>/dev/null"
if [[ $broker == nats ]]; then
	say "published $orders; waiting for the consumers to have nothing pending"
	settled() { # settled N: the consumer of sidecar N has nothing pending or out
		curl -sf "http://127.0.0.1:$(admin_port "$1")/status" | grep -Eq '"pending": ?0,'
	}
	wait_until 120 "billing's consumer" settled 1
	wait_until 120 "shipping's consumer" settled 3
else
	say "published $orders; waiting for the outbox to empty"
	wait_until 120 "the publisher's outbox to empty" bash -c "curl -sf http://127.0.0.1:$pub_admin/status | grep -Eq '\"outbox\": ?0,'"
fi

ids() { curl -sf "http://127.0.0.1:$(app_port "$1")/ids"; }
b1=$(ids 1 | wc -l)
b2=$(ids 2 | wc -l)
billing=$( (ids 1; ids 2) | sort -u | wc -l)
shipping=$(ids 3 | sort -u | wc -l)
echo
printf '  %-10s %8s %8s %8s\n' group received lost instances
printf '  %-10s %8d %8d   billing-1 %d, billing-2 %d\n' billing "$billing" $((orders - billing)) "$b1" "$b2"
printf '  %-10s %8d %8d   shipping-1 %d\n' shipping "$shipping" $((orders - shipping)) "$shipping"
echo
lost=$((2 * orders - billing - shipping))
say "lost: $lost"
((lost == 0)) || exit 1
