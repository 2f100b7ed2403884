#!/usr/bin/env bash
# What durability costs: the same fan-out scenarios against the relay with
# its in-memory store and with the durable SQLite store, in one run.
#
#   benchmarks/durability.sh [-l LABEL]     (sizes as for run.sh: N, RATE, ...)
#
# Runs `fanout` and `saturate` twice through benchmarks/run.sh (a fresh relay
# per scenario, loopback only), first with --store memory, then with the
# default --store sqlite, and prints both summaries and the throughput cost.
set -uo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
LABEL="durability"
[ "${1:-}" = "-l" ] && { LABEL="$2"; shift 2; }
STAMP="$(date +%Y%m%d-%H%M%S)"
OUT="$HERE/out/$STAMP-$LABEL"
export SCENARIOS="${SCENARIOS:-fanout saturate}"
"$HERE/run.sh" -l "$LABEL-memory" -o "$OUT/memory" -- --store memory >&2
"$HERE/run.sh" -l "$LABEL-sqlite" -o "$OUT/sqlite" -- --store sqlite >&2
echo "== memory store"; cat "$OUT/memory/summary.txt"
echo "== sqlite store (durable)"; cat "$OUT/sqlite/summary.txt"
python3 - "$OUT" <<'PY'
import json, sys
out = sys.argv[1]
def sustained(kind):
    with open(f"{out}/{kind}/saturate.json") as f:
        return json.loads(f.readline())["max_sustained_deliveries_per_s"]
memory, sqlite = sustained("memory"), sustained("sqlite")
print(f"saturate: memory {memory:.0f} deliveries/s, sqlite {sqlite:.0f}: durability costs "
      f"{100 * (1 - sqlite / memory):.1f}% of the in-memory throughput")
PY
