#!/usr/bin/env bash
# This relay against the Node.js relay it replaces, on one machine in one run.
#
#   benchmarks/sidebyside.sh PEER_SRC [-o OUTDIR] [-r ROUNDS] [-f "FIGURE ..."]
#
# PEER_SRC is a checkout of the public squid-baby/Leeloo_Ui repository (its
# code is never copied into this one).  Its leeloo_server/server.js is
# installed outside this repository (PEER_DIR, default a new temporary
# directory) with express 4, ws 8 and dotenv 16, and run on loopback with
# benchmarks/peer/loopback-listen.cjs and quiet-console.cjs preloaded (its
# console.log silenced, as a production deployment would).  Then every
# figure is measured with benchmarks/run.sh against the Node original, this
# relay (default SQLite store) and this relay with --store memory, one after
# the other for each figure, and ROUNDS times (default 1); the ratios are
# printed (benchmarks/sidebyside.py) and written to OUTDIR/ratios.txt.
#
# Figures (-f picks some): idle (memory per device, N=10,000), sat2k and
# sat10k (sustained deliveries/s with p99 <= 50 ms at N=2,000 and 10,000),
# fanout (p99 at 8,000 deliveries/s, N=10,000), cpu2k (the relay's CPU per
# 1,000 deliveries at 4,000 deliveries/s, N=2,000), storm (10,000 devices at once, 500 pending: time until all
# registered).  SIDES="node relay memory" (and "checkout", below).
#
# The relay sides run as the README's deployment runs the relay: on the
# system's Python (RELAY_PYTHON, default /usr/bin/python3, Debian's
# optimised build), in a virtualenv outside this repository (RELAY_VENV,
# default /tmp/leeloo-bench-relay-venv, made once with the checkout's
# dependencies pip-installed, and reused), the checkout's code on
# PYTHONPATH.  An interpreter built without optimisations (pyenv's default
# build, say, which a checkout's .venv may come from) costs the relay a
# quarter of its Python's speed, which production does not pay.  The side
# "checkout" runs the twistd on PATH (default store) beside, to show it;
# RELAY_PYTHON=path runs every relay side on that twistd.
set -uo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PEER_SRC="${1:-}"
[ -n "$PEER_SRC" ] && [ "${PEER_SRC#-}" = "$PEER_SRC" ] || { sed -n '2,32p' "$0"; exit 2; }
shift
OUTDIR=""
ROUNDS=1
FIGURES="idle sat2k sat10k fanout cpu2k storm"
while [ $# -gt 0 ]; do
  case "$1" in
    -o) OUTDIR="$2"; shift 2 ;;
    -r) ROUNDS="$2"; shift 2 ;;
    -f) FIGURES="$2"; shift 2 ;;
    *) echo "sidebyside.sh: unknown option $1" >&2; exit 2 ;;
  esac
done
SIDES="${SIDES:-node relay memory}"
SERVER_JS="$PEER_SRC/leeloo_server/server.js"
[ -f "$SERVER_JS" ] || { echo "sidebyside.sh: no leeloo_server/server.js in $PEER_SRC" >&2; exit 2; }
[ -n "$OUTDIR" ] || OUTDIR="$HERE/out/$(date +%Y%m%d-%H%M%S)-sidebyside"
mkdir -p "$OUTDIR"

PEER_DIR="${PEER_DIR:-$(mktemp -d /tmp/leeloo-node-original.XXXXXX)}"
case "$(cd "$PEER_DIR" && pwd)/" in
  "$(cd "$HERE/.." && pwd)/"*) echo "sidebyside.sh: PEER_DIR must be outside this repository" >&2; exit 2 ;;
esac
# Installed afresh unless a whole install is there (a PEER_DIR with packages
# but no server.js, say, from an install that was cut short, is completed).
if [ ! -d "$PEER_DIR/node_modules/ws" ] || ! cmp -s "$SERVER_JS" "$PEER_DIR/server.js"; then
  cp "$SERVER_JS" "$PEER_DIR/server.js"
  [ -d "$PEER_SRC/leeloo_server/public" ] && cp -r "$PEER_SRC/leeloo_server/public" "$PEER_DIR/"
  printf '{"name":"leeloo-node-original","private":true}\n' >"$PEER_DIR/package.json"
  echo "sidebyside.sh: installing the Node original in $PEER_DIR (express 4, ws 8, dotenv 16)" >&2
  (cd "$PEER_DIR" && npm install --no-audit --no-fund express@4 ws@8 dotenv@16 >/dev/null) ||
    { echo "sidebyside.sh: npm install failed in $PEER_DIR" >&2; exit 1; }
fi
RELAY_PYTHON="${RELAY_PYTHON:-/usr/bin/python3}"
RELAY_TWISTD="twistd"
made_by=""
if [ "$RELAY_PYTHON" != path ]; then
  RELAY_VENV="${RELAY_VENV:-/tmp/leeloo-bench-relay-venv}"
  mkdir -p "$RELAY_VENV"
  case "$(cd "$RELAY_VENV" && pwd)/" in
    "$(cd "$HERE/.." && pwd)/"*) echo "sidebyside.sh: RELAY_VENV must be outside this repository" >&2; exit 2 ;;
  esac
  made_by="$("$RELAY_PYTHON" -c 'import sys; print(sys.executable, sys.version.split()[0])')" ||
    { echo "sidebyside.sh: RELAY_PYTHON $RELAY_PYTHON does not run (RELAY_PYTHON=path runs the twistd on PATH)" >&2; exit 2; }
  # Made afresh unless a whole one of this interpreter is there: the
  # checkout's dependencies only (the checkout itself is uninstalled again:
  # run.sh puts its code on PYTHONPATH, and a second copy of its twistd
  # plugin would shadow it).
  if [ ! -x "$RELAY_VENV/bin/twistd" ] || [ "$(cat "$RELAY_VENV/made-by" 2>/dev/null)" != "$made_by" ]; then
    # Only an empty directory or a virtualenv is made afresh: anything else
    # given as RELAY_VENV is not this script's to delete.
    if [ -n "$(ls -A "$RELAY_VENV")" ] && [ ! -f "$RELAY_VENV/pyvenv.cfg" ]; then
      echo "sidebyside.sh: RELAY_VENV $RELAY_VENV is neither empty nor a virtualenv" >&2; exit 2
    fi
    echo "sidebyside.sh: installing the relay's dependencies in $RELAY_VENV ($made_by)" >&2
    rm -rf "$RELAY_VENV"
    # Built from a copy of what is committed (pip builds in the tree it is given).
    src="$(mktemp -d)"
    { git -C "$HERE/.." archive HEAD | tar -x -C "$src" &&
      "$RELAY_PYTHON" -m venv "$RELAY_VENV" &&
      "$RELAY_VENV/bin/pip" install -q --disable-pip-version-check "$src" &&
      "$RELAY_VENV/bin/pip" uninstall -q -y leeloo-relay &&
      echo "$made_by" >"$RELAY_VENV/made-by"; } ||
      { rm -rf "$src"; echo "sidebyside.sh: could not make $RELAY_VENV (Debian: apt install python3-venv)" >&2; exit 1; }
    rm -rf "$src"
  fi
  RELAY_TWISTD="$RELAY_VENV/bin/twistd"
fi
NODE_SERVER="node --require $HERE/peer/loopback-listen.cjs --require $HERE/peer/quiet-console.cjs server.js"

figure_env() {  # the run.sh sizes of a figure
  case "$1" in
    idle) echo "SCENARIOS=idle N_IDLE=10000 HOLD=5" ;;
    sat2k) echo "SCENARIOS=saturate N_SAT=2000 SAT_START=1000 SAT_STEP=2 SAT_REFINE=3" ;;
    # From 250 msg/s: the Node original's p99 passes 50 ms below 1,000 msg/s at N=10,000,
    # and a ramp that starts above it gives a bound, not its figure.
    sat10k) echo "SCENARIOS=saturate N_SAT=10000 SAT_START=250 SAT_STEP=2 SAT_REFINE=3" ;;
    fanout) echo "SCENARIOS=fanout N_FANOUT=10000 RATE=2000 DURATION=8" ;;
    cpu2k) echo "SCENARIOS=fanout N_FANOUT=2000 RATE=1000 DURATION=10" ;;
    storm) echo "SCENARIOS=storm N_STORM=10000 STORM_CONC=500" ;;
    *) return 1 ;;
  esac
}

{
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "commit: $(git -C "$HERE/.." rev-parse --short HEAD 2>/dev/null || echo unknown)"
  echo "peer: $(git -C "$PEER_SRC" rev-parse --short HEAD 2>/dev/null || echo "$PEER_SRC")"
  echo "peer packages: $(cd "$PEER_DIR" && node -p "['express','ws','dotenv'].map(n => n + ' ' + require(n + '/package.json').version).join(', ')")"
  echo "relay: $RELAY_TWISTD${made_by:+ ($made_by)}"
  echo "checkout: $(command -v twistd 2>/dev/null || echo 'no twistd on PATH')"
  echo "figures: $FIGURES; sides: $SIDES; rounds: $ROUNDS"
} >"$OUTDIR/about.txt"
cat "$OUTDIR/about.txt" >&2

for round in $(seq 1 "$ROUNDS"); do
  for fig in $FIGURES; do
    sizes="$(figure_env "$fig")" || { echo "sidebyside.sh: unknown figure $fig" >&2; exit 2; }
    for side in $SIDES; do
      out="$OUTDIR/r$round/$fig-$side"
      echo "=== round $round: $fig, $side" >&2
      case "$side" in
        node) env $sizes SERVER="$NODE_SERVER" SERVER_DIR="$PEER_DIR" "$HERE/run.sh" -l "$side" -o "$out" >/dev/null ;;
        relay) env $sizes TWISTD="$RELAY_TWISTD" "$HERE/run.sh" -l "$side" -o "$out" >/dev/null ;;
        memory) env $sizes TWISTD="$RELAY_TWISTD" "$HERE/run.sh" -l "$side" -o "$out" -- --store memory >/dev/null ;;
        checkout) env $sizes TWISTD=twistd "$HERE/run.sh" -l "$side" -o "$out" >/dev/null ;;
        *) echo "sidebyside.sh: unknown side $side" >&2; exit 2 ;;
      esac
    done
  done
done
python3 "$HERE/sidebyside.py" "$OUTDIR" | tee "$OUTDIR/ratios.txt"
