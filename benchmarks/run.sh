#!/usr/bin/env bash
# The LEELOO relay benchmarks in one command, on loopback only.
#
#   benchmarks/run.sh [-l LABEL] [-o OUTDIR] [-- EXTRA RELAY ARGS ...]
#
# For each scenario it starts a fresh relay from this checkout
#   twistd -n --pidfile= leeloo --listen tcp:PORT:interface=127.0.0.1 --data-dir TMPDIR EXTRA...
# on a free loopback port with a temporary data dir, runs the load generator
# (benchmarks/loadgen, Node.js) against it, stops the relay (TERM, then KILL
# after 10 s) and writes OUTDIR/SCENARIO.json (one JSON line), the relay's
# log, and OUTDIR/summary.txt (one line per scenario).  OUTDIR defaults to
# benchmarks/out/DATE-LABEL.
#
# Sizes are environment variables; the defaults took about 4 minutes on a
# 2-core machine (saturate most of it, longer when the machine is busy):
#   SCENARIOS="idle fanout saturate storm"
#   N=2000            devices in every scenario, unless one of these is set:
#   N_IDLE N_FANOUT N_SAT N_STORM
#   CREW_SIZE=5       WORKERS=2 (generator processes)   CLIENT=raw (or ws)
#   HOLD=5            idle: seconds to hold the registered fleet
#   RATE=1000 DURATION=8 WARMUP=2    fanout: messages/s, measured and warm-up seconds
#   SAT_START=500 SAT_STEP=4 SAT_FACTOR=2 SAT_REFINE=3 SAT_RETRIES=1 P99_MS=50   saturate
#   STORM_CONC=500    storm: connections pending at once, in total
#   CONNECT_RATE=2000 devices/s while setting up idle/fanout/saturate
#   PROFILE=py-spy    record the relay with py-spy during saturate, fanout and storm (OUTDIR/SCENARIO.pyspy.txt
#                     and OUTDIR/SCENARIO.profile.txt, the top functions); PROFILE_NATIVE=1 adds --native
#   RAISE_LIMITS=1    pass the relay options that lift its per-address and per-connection
#                     limits (those this relay has); 0 runs it with its defaults
#   LOADGEN_ARGS="..." extra load-generator options for every scenario
#   TWISTD=twistd     the twistd command, split on spaces (e.g. TWISTD="python3 benchmarks/gcwatch.py
#                     /tmp/gc.json" records GC pauses); READY_TIMEOUT=30 seconds for the relay to listen
#   SERVER="CMD ..."  run this server command instead of the relay (split on spaces, run in
#                     SERVER_DIR, its port in $PORT; benchmarks/sidebyside.sh runs the Node original so)
set -uo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/.." && pwd)"
LABEL="local"
OUTDIR=""
while [ $# -gt 0 ]; do
  case "$1" in
    -l) LABEL="$2"; shift 2 ;;
    -o) OUTDIR="$2"; shift 2 ;;
    --) shift; break ;;
    -h|--help) sed -n '2,30p' "$0"; exit 0 ;;
    *) echo "run.sh: unknown option $1 (relay options go after --)" >&2; exit 2 ;;
  esac
done
RELAY_ARGS=("$@")

SCENARIOS="${SCENARIOS:-idle fanout saturate storm}"
N="${N:-2000}"
N_IDLE="${N_IDLE:-$N}"; N_FANOUT="${N_FANOUT:-$N}"; N_SAT="${N_SAT:-$N}"; N_STORM="${N_STORM:-$N}"
CREW_SIZE="${CREW_SIZE:-5}"; WORKERS="${WORKERS:-2}"; CLIENT="${CLIENT:-raw}"
HOLD="${HOLD:-5}"
RATE="${RATE:-1000}"; DURATION="${DURATION:-8}"; WARMUP="${WARMUP:-2}"
SAT_START="${SAT_START:-500}"; SAT_STEP="${SAT_STEP:-4}"; SAT_FACTOR="${SAT_FACTOR:-2}"
SAT_REFINE="${SAT_REFINE:-3}"; SAT_RETRIES="${SAT_RETRIES:-1}"; P99_MS="${P99_MS:-50}"
STORM_CONC="${STORM_CONC:-500}"; CONNECT_RATE="${CONNECT_RATE:-2000}"
PROFILE="${PROFILE:-}"; PROFILE_NATIVE="${PROFILE_NATIVE:-}"
LOADGEN_ARGS="${LOADGEN_ARGS:-}"
read -ra TWISTD_CMD <<<"${TWISTD:-twistd}"
read -ra SERVER_CMD <<<"${SERVER:-}"
SERVER_DIR="${SERVER_DIR:-$PWD}"
READY_TIMEOUT="${READY_TIMEOUT:-30}"
[ -n "$OUTDIR" ] || OUTDIR="$HERE/out/$(date +%Y%m%d-%H%M%S)-$LABEL"
mkdir -p "$OUTDIR"

# One descriptor per connection on each side, plus slack.
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
NOFILE="$(ulimit -n)"
for n in "$N_IDLE" "$N_FANOUT" "$N_SAT" "$N_STORM"; do
  if [ "$NOFILE" != unlimited ] && [ "$n" -gt $((NOFILE - 200)) ]; then
    echo "run.sh: open-files limit $NOFILE is too low for $n devices" >&2; exit 1
  fi
done

command -v node >/dev/null || { echo "run.sh: needs Node.js (node 18 or later)" >&2; exit 1; }
[ -n "${SERVER:-}" ] || command -v "${TWISTD_CMD[0]}" >/dev/null || { echo "run.sh: ${TWISTD_CMD[0]} not found; pip install -e . first" >&2; exit 1; }
if [ ! -d "$HERE/loadgen/node_modules/ws" ]; then
  echo "run.sh: installing the load generator's packages (npm ci)" >&2
  (cd "$HERE/loadgen" && npm ci --no-audit --no-fund >/dev/null) || { echo "run.sh: npm ci failed in benchmarks/loadgen" >&2; exit 1; }
fi
if [ "$PROFILE" = py-spy ] && ! command -v py-spy >/dev/null; then
  echo "run.sh: PROFILE=py-spy needs py-spy (pip install py-spy)" >&2; exit 1
fi

# The checkout's relay wins over any installed one.
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"

# The load comes from one loopback address at rates no person reaches: raise
# the relay's per-connection and per-address limits where this relay has them
# (RAISE_LIMITS=0 keeps the relay's defaults).  Extra args after -- come later
# and win.
LIMIT_ARGS=()
if [ "${RAISE_LIMITS:-1}" = 1 ] && [ -z "${SERVER:-}" ]; then
  HELP_TEXT="$("${TWISTD_CMD[@]}" leeloo --help 2>/dev/null)"
  for pair in join-attempts=1000000 messages-per-second=100000 message-burst=100000 \
              max-connections-per-address=1000000 max-connections=1000000 connect-rate=1000000; do
    case "$HELP_TEXT" in *"--${pair%%=*}="*) LIMIT_ARGS+=("--$pair") ;; esac
  done
fi
RELAY_ARGS=(${LIMIT_ARGS[@]+"${LIMIT_ARGS[@]}"} ${RELAY_ARGS[@]+"${RELAY_ARGS[@]}"})

{
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "commit: $(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo unknown)"
  echo "nproc: $(nproc)"
  echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //')"
  echo "python: $(python3 -c 'import sys; print(sys.version.split()[0])')"
  python3 - <<'EOF' 2>/dev/null
from importlib.metadata import version
for name in ("twisted", "autobahn", "txaio"):
    try:
        print(f"{name}: {version(name)}")
    except Exception:
        print(f"{name}: not installed")
EOF
  echo "node: $(node --version)"
  echo "ws: $(node -p "require('$HERE/loadgen/node_modules/ws/package.json').version" 2>/dev/null)"
  if [ -n "${SERVER:-}" ]; then echo "server: $SERVER (in $SERVER_DIR)"; else echo "relay args: ${RELAY_ARGS[*]:-(none)}"; fi
  echo "sizes: N_IDLE=$N_IDLE N_FANOUT=$N_FANOUT N_SAT=$N_SAT N_STORM=$N_STORM CREW_SIZE=$CREW_SIZE WORKERS=$WORKERS CLIENT=$CLIENT"
} >"$OUTDIR/machine.txt"
echo "run.sh: results in $OUTDIR (open-files limit $NOFILE)" >&2

RELAY_PID=""
DATA_DIR=""
PROFILER_PID=""
stop_relay() {  # TERM, up to 10 s, then KILL
  if [ -n "$RELAY_PID" ] && kill -0 "$RELAY_PID" 2>/dev/null; then
    kill -TERM "$RELAY_PID" 2>/dev/null
    for _ in $(seq 1 100); do kill -0 "$RELAY_PID" 2>/dev/null || break; sleep 0.1; done
    if kill -0 "$RELAY_PID" 2>/dev/null; then echo "run.sh: relay ignored TERM for 10 s; KILL" >&2; kill -KILL "$RELAY_PID" 2>/dev/null; fi
  fi
  [ -n "$RELAY_PID" ] && wait "$RELAY_PID" 2>/dev/null
  RELAY_PID=""
  if [ -n "$PROFILER_PID" ]; then
    # py-spy writes its file once the relay is gone; give it 20 s
    for _ in $(seq 1 200); do kill -0 "$PROFILER_PID" 2>/dev/null || break; sleep 0.1; done
    kill -INT "$PROFILER_PID" 2>/dev/null
    wait "$PROFILER_PID" 2>/dev/null
    PROFILER_PID=""
  fi
  [ -n "$DATA_DIR" ] && rm -rf "$DATA_DIR"
  DATA_DIR=""
}
trap stop_relay EXIT
trap 'stop_relay; exit 130' INT TERM

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'
}

start_relay() {  # $1 = log file; sets PORT RELAY_PID SERVER_PIDS DATA_DIR
  PORT="$(free_port)"
  DATA_DIR="$(mktemp -d /tmp/leeloo-bench-data.XXXXXX)"
  # exec: the started process is the relay itself, so its pid is the one measured
  if [ -n "${SERVER:-}" ]; then
    ( cd "$SERVER_DIR" && PORT="$PORT" exec "${SERVER_CMD[@]}" ) >"$1" 2>&1 &
  else
    ( exec "${TWISTD_CMD[@]}" -n --pidfile= --logfile=- leeloo --listen "tcp:$PORT:interface=127.0.0.1" \
        --data-dir "$DATA_DIR" ${RELAY_ARGS[@]+"${RELAY_ARGS[@]}"} ) >"$1" 2>&1 &
  fi
  RELAY_PID=$!
  for _ in $(seq 1 $((READY_TIMEOUT * 10))); do
    if ! kill -0 "$RELAY_PID" 2>/dev/null; then
      echo "run.sh: the relay exited while starting; its log:" >&2; tail -20 "$1" >&2; RELAY_PID=""; return 1
    fi
    if (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null; then
      sleep 0.5
      # The relay's processes, measured together: the relay and its
      # children (the SQLite store's database writer, started by the
      # store's first request: retention's prune as the relay starts).
      SERVER_PIDS="$RELAY_PID"
      for child in $(pgrep -P "$RELAY_PID"); do SERVER_PIDS="$SERVER_PIDS,$child"; done
      return 0
    fi
    sleep 0.1
  done
  echo "run.sh: the relay did not listen on 127.0.0.1:$PORT within ${READY_TIMEOUT}s" >&2
  stop_relay
  return 1
}

run_scenario() {  # $1 = scenario, $2 = devices, rest = loadgen options
  local sc="$1" n="$2"; shift 2
  local base="$OUTDIR/$sc"
  echo "=== $sc (N=$n)" >&2
  if ! start_relay "$base.relay.log"; then
    echo "{\"scenario\":\"$sc\",\"label\":\"$LABEL\",\"ok\":false,\"error\":\"the relay did not start\"}" >"$base.json"
    return
  fi
  if { [ "$sc" = saturate ] || [ "$sc" = fanout ] || [ "$sc" = storm ]; } && [ "$PROFILE" = py-spy ]; then
    # py-spy cannot read native stacks without pausing the relay (--nonblocking)
    local PYSPY_MODE=--nonblocking
    [ -n "$PROFILE_NATIVE" ] && PYSPY_MODE=--native
    py-spy record --pid "$RELAY_PID" --rate 200 $PYSPY_MODE --format raw \
      -o "$base.pyspy.txt" >"$base.pyspy.log" 2>&1 &
    PROFILER_PID=$!
  fi
  local cmd=(node "$HERE/loadgen/loadgen.mjs" "$sc" --url "ws://127.0.0.1:$PORT/ws" --server-pid "$SERVER_PIDS"
    --n "$n" --crew-size "$CREW_SIZE" --workers "$WORKERS" --client "$CLIENT" --label "$LABEL" "$@")
  # shellcheck disable=SC2206
  cmd+=($LOADGEN_ARGS)
  echo "${cmd[*]}" >"$base.cmd"
  "${cmd[@]}" --json-out "$base.json" >/dev/null 2> >(tee "$base.loadgen.log" >&2)
  local rc=$?
  [ $rc -eq 0 ] || echo "run.sh: $sc finished with exit code $rc (see $base.json)" >&2
  kill -0 "$RELAY_PID" 2>/dev/null || { echo "run.sh: the relay died during $sc; log tail:" >&2; tail -5 "$base.relay.log" >&2; }
  stop_relay
  if [ -s "$base.pyspy.txt" ]; then
    python3 "$HERE/pyspy_top.py" "$base.pyspy.txt" >"$base.profile.txt" 2>&1 && echo "profile: $base.profile.txt" >&2
  fi
}

for sc in $SCENARIOS; do
  case "$sc" in
    idle) run_scenario idle "$N_IDLE" --hold "$HOLD" --connect-rate "$CONNECT_RATE" --max-seconds 600 ;;
    fanout) run_scenario fanout "$N_FANOUT" --rate "$RATE" --duration "$DURATION" --warmup "$WARMUP" \
      --connect-rate "$CONNECT_RATE" --max-seconds 600 ;;
    saturate) run_scenario saturate "$N_SAT" --start-rate "$SAT_START" --step-seconds "$SAT_STEP" \
      --ramp-factor "$SAT_FACTOR" --refine-steps "$SAT_REFINE" --step-retries "$SAT_RETRIES" --p99-ms "$P99_MS" \
      --connect-rate "$CONNECT_RATE" --max-seconds 900 ;;
    storm) run_scenario storm "$N_STORM" --concurrency "$STORM_CONC" --max-seconds 300 ;;
    *) echo "run.sh: unknown scenario $sc (idle fanout saturate storm)" >&2 ;;
  esac
done

echo >&2
node "$HERE/loadgen/summarize.mjs" "$OUTDIR"/*.json | tee "$OUTDIR/summary.txt"
