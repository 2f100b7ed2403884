#!/usr/bin/env bash
# Fan-out across relay nodes sharing one Redis, against one node on SQLite,
# in one run (interleaved), on loopback only.
#
#   benchmarks/multinode.sh [-l LABEL] [-o OUTDIR] [-- EXTRA RELAY ARGS ...]
#
# It starts its own redis-server (AOF on: appendonly yes, appendfsync
# everysec; a temporary directory; a free loopback port) and, for each
# configuration in CONFIGS, in turn and ROUNDS times over:
#   sqlite  one relay node on its default SQLite store (a fresh data dir);
#   K       (a number) K relay nodes with --redis on that Redis (emptied first
#           with FLUSHALL), each on its own port and data dir, all sharing one
#           secrets key file.
# The load generator (benchmarks/loadgen) gets every node's URL (--url
# A,B,C: device i connects to node i mod K, so each crew of 5 spans the
# nodes), their pids (--server-pid, CPU summed) and Redis's (--aux-pid, its
# CPU reported beside), and runs each scenario of SCENARIOS.  The load
# average is recorded before each run.  OUTDIR/CONFIG-rROUND-SCENARIO.json
# (one JSON line each), the nodes' logs, and OUTDIR/summary.txt from
# benchmarks/multinode.py: the figures per configuration, each node's and
# Redis's CPU per delivery, and how the figures should grow on separate
# machines.
#
# Environment (defaults in brackets):
#   CONFIGS="sqlite 1 2 3"   ROUNDS=1   SCENARIOS="saturate"   (also: fanout)
#   N=2000 CREW_SIZE=5 WORKERS=2 CLIENT=raw
#   SAT_START=500 SAT_STEP=4 SAT_FACTOR=2 SAT_REFINE=3 SAT_RETRIES=1 P99_MS=50
#   RATE=1000 DURATION=8 WARMUP=2 (fanout)   CONNECT_RATE=2000
#   SPREAD=device (each crew spans the nodes) or crew (whole crews per node: no
#                 cross-node fan-out, the upper bound)
#   REDIS_SERVER=redis-server   TWISTD=twistd   READY_TIMEOUT=30
#   RELAY_CHECKOUT=DIR  run the relay of another checkout (default: this one)
# The relays run with their per-address and per-connection limits lifted,
# as benchmarks/run.sh does (all the load comes from 127.0.0.1).
set -uo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/.." && pwd)"
LABEL="multinode"
OUTDIR=""
while [ $# -gt 0 ]; do
  case "$1" in
    -l) LABEL="$2"; shift 2 ;;
    -o) OUTDIR="$2"; shift 2 ;;
    --) shift; break ;;
    -h|--help) sed -n '2,33p' "$0"; exit 0 ;;
    *) echo "multinode.sh: unknown option $1 (relay options go after --)" >&2; exit 2 ;;
  esac
done
EXTRA_ARGS=("$@")

CONFIGS="${CONFIGS:-sqlite 1 2 3}"; ROUNDS="${ROUNDS:-1}"; SCENARIOS="${SCENARIOS:-saturate}"
N="${N:-2000}"; CREW_SIZE="${CREW_SIZE:-5}"; WORKERS="${WORKERS:-2}"; CLIENT="${CLIENT:-raw}"
SAT_START="${SAT_START:-500}"; SAT_STEP="${SAT_STEP:-4}"; SAT_FACTOR="${SAT_FACTOR:-2}"
SAT_REFINE="${SAT_REFINE:-3}"; SAT_RETRIES="${SAT_RETRIES:-1}"; P99_MS="${P99_MS:-50}"
SPREAD="${SPREAD:-device}"; RATE="${RATE:-1000}"; DURATION="${DURATION:-8}"; WARMUP="${WARMUP:-2}"; CONNECT_RATE="${CONNECT_RATE:-2000}"
REDIS_SERVER="${REDIS_SERVER:-redis-server}"; READY_TIMEOUT="${READY_TIMEOUT:-30}"
read -ra TWISTD_CMD <<<"${TWISTD:-twistd}"
[ -n "$OUTDIR" ] || OUTDIR="$HERE/out/$(date +%Y%m%d-%H%M%S)-$LABEL"
mkdir -p "$OUTDIR"

ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
command -v node >/dev/null || { echo "multinode.sh: needs Node.js (node 18 or later)" >&2; exit 1; }
command -v "$REDIS_SERVER" >/dev/null || { echo "multinode.sh: needs redis-server (apt-get install redis-server)" >&2; exit 1; }
command -v "${TWISTD_CMD[0]}" >/dev/null || { echo "multinode.sh: ${TWISTD_CMD[0]} not found; pip install -e . first" >&2; exit 1; }
if [ ! -d "$HERE/loadgen/node_modules/ws" ]; then
  echo "multinode.sh: installing the load generator's packages (npm ci)" >&2
  (cd "$HERE/loadgen" && npm ci --no-audit --no-fund >/dev/null) || { echo "multinode.sh: npm ci failed in benchmarks/loadgen" >&2; exit 1; }
fi
RELAY_CHECKOUT="${RELAY_CHECKOUT:-$REPO}"
export PYTHONPATH="$RELAY_CHECKOUT${PYTHONPATH:+:$PYTHONPATH}"

LIMIT_ARGS=(--join-attempts 1000000 --messages-per-second 100000 --message-burst 100000
            --max-connections-per-address 1000000 --max-connections 1000000 --connect-rate 1000000)

WORK="$(mktemp -d /tmp/leeloo-multinode.XXXXXX)"
REDIS_PID=""
NODE_PIDS=()
free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'
}
wait_gone() {  # $1 pid: TERM, up to 10 s, then KILL
  kill -TERM "$1" 2>/dev/null
  for _ in $(seq 1 100); do kill -0 "$1" 2>/dev/null || break; sleep 0.1; done
  kill -0 "$1" 2>/dev/null && kill -KILL "$1" 2>/dev/null
  wait "$1" 2>/dev/null
}
stop_nodes() {
  for pid in ${NODE_PIDS[@]+"${NODE_PIDS[@]}"}; do wait_gone "$pid"; done
  NODE_PIDS=()
}
cleanup() {
  stop_nodes
  [ -n "$REDIS_PID" ] && wait_gone "$REDIS_PID"
  rm -rf "$WORK"
}
trap cleanup EXIT
trap 'cleanup; exit 130' INT TERM

REDIS_PORT="$(free_port)"
mkdir -p "$WORK/redis"
cat >"$WORK/redis/redis.conf" <<EOF
bind 127.0.0.1
port $REDIS_PORT
dir $WORK/redis
appendonly yes
appendfsync everysec
save ""
daemonize no
logfile "$WORK/redis/redis.log"
maxmemory-policy noeviction
EOF
"$REDIS_SERVER" "$WORK/redis/redis.conf" &
REDIS_PID=$!
for _ in $(seq 1 100); do
  (exec 3<>"/dev/tcp/127.0.0.1/$REDIS_PORT") 2>/dev/null && break
  sleep 0.1
done
REDIS_URL="redis://127.0.0.1:$REDIS_PORT/0"
redis_cli() { redis-cli -p "$REDIS_PORT" "$@" >/dev/null; }
# One secrets key file for every node on the Redis (README: "Deploying several
# nodes"): the first node started creates it, the others read it.

{
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "relay commit: $(git -C "$RELAY_CHECKOUT" rev-parse --short HEAD 2>/dev/null || echo unknown) ($RELAY_CHECKOUT)"
  echo "nproc: $(nproc)"
  echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //')"
  echo "redis: $("$REDIS_SERVER" --version)"
  echo "configs: $CONFIGS; rounds: $ROUNDS; scenarios: $SCENARIOS; N=$N CREW_SIZE=$CREW_SIZE WORKERS=$WORKERS CLIENT=$CLIENT SPREAD=$SPREAD"
} >"$OUTDIR/machine.txt"
echo "multinode.sh: results in $OUTDIR; Redis on port $REDIS_PORT" >&2

start_node() {  # $1 log, rest: relay args; appends to NODE_PIDS and URLS
  local log="$1"; shift
  local port; port="$(free_port)"
  local data; data="$(mktemp -d "$WORK/data.XXXXXX")"
  ( exec "${TWISTD_CMD[@]}" -n --pidfile= --logfile=- leeloo --listen "tcp:$port:interface=127.0.0.1" \
      --data-dir "$data" "${LIMIT_ARGS[@]}" "$@" ${EXTRA_ARGS[@]+"${EXTRA_ARGS[@]}"} ) >"$log" 2>&1 &
  local pid=$!
  NODE_PIDS+=("$pid")
  for _ in $(seq 1 $((READY_TIMEOUT * 10))); do
    kill -0 "$pid" 2>/dev/null || { echo "multinode.sh: a node exited while starting; its log:" >&2; tail -20 "$log" >&2; return 1; }
    if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then URLS+=("ws://127.0.0.1:$port/ws"); return 0; fi
    sleep 0.1
  done
  echo "multinode.sh: a node did not listen within ${READY_TIMEOUT}s" >&2
  return 1
}

run_one() {  # $1 config, $2 round, $3 scenario
  local config="$1" round="$2" sc="$3"
  local base="$OUTDIR/$config-r$round-$sc"
  URLS=()
  echo "=== $config (round $round, $sc)" >&2
  local ok=1
  if [ "$config" = sqlite ]; then
    start_node "$base.node1.log" || ok=0
  else
    redis_cli FLUSHALL
    for k in $(seq 1 "$config"); do
      start_node "$base.node$k.log" --redis "$REDIS_URL" --secrets-key-file "$WORK/secrets.key" || { ok=0; break; }
    done
  fi
  if [ "$ok" = 0 ]; then
    echo "{\"scenario\":\"$sc\",\"label\":\"$config\",\"ok\":false,\"error\":\"a node did not start\"}" >"$base.json"
    stop_nodes
    return
  fi
  sleep 0.5
  local pids; pids="$(IFS=,; echo "${NODE_PIDS[*]}")"
  local urls; urls="$(IFS=,; echo "${URLS[*]}")"
  local aux=()
  [ "$config" = sqlite ] || aux=(--aux-pid "$REDIS_PID")
  local cmd=(node "$HERE/loadgen/loadgen.mjs" "$sc" --url "$urls" --server-pid "$pids" ${aux[@]+"${aux[@]}"}
    --n "$N" --crew-size "$CREW_SIZE" --workers "$WORKERS" --client "$CLIENT" --label "$config" --spread "$SPREAD"
    --connect-rate "$CONNECT_RATE" --max-seconds 900)
  case "$sc" in
    saturate) cmd+=(--start-rate "$SAT_START" --step-seconds "$SAT_STEP" --ramp-factor "$SAT_FACTOR"
                    --refine-steps "$SAT_REFINE" --step-retries "$SAT_RETRIES" --p99-ms "$P99_MS") ;;
    fanout) cmd+=(--rate "$RATE" --duration "$DURATION" --warmup "$WARMUP") ;;
    *) echo "multinode.sh: unknown scenario $sc (saturate fanout)" >&2; stop_nodes; return ;;
  esac
  echo "${cmd[*]}" >"$base.cmd"
  cut -d' ' -f1-3 /proc/loadavg >"$base.loadavg"
  "${cmd[@]}" --json-out "$base.json" >/dev/null 2> >(tee "$base.loadgen.log" >&2)
  for pid in "${NODE_PIDS[@]}"; do
    kill -0 "$pid" 2>/dev/null || echo "multinode.sh: a node died during $config $sc" >&2
  done
  stop_nodes
}

for round in $(seq 1 "$ROUNDS"); do
  for sc in $SCENARIOS; do
    for config in $CONFIGS; do
      run_one "$config" "$round" "$sc"
    done
  done
done

echo >&2
python3 "$HERE/multinode.py" "$OUTDIR" | tee "$OUTDIR/summary.txt"
