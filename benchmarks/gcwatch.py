"""
Run twistd with the garbage collector's pauses recorded.

    python3 benchmarks/gcwatch.py OUT.json -n --pidfile= leeloo --listen ...

Everything after OUT.json goes to twistd unchanged.  At exit OUT.json holds,
per generation, how many collections ran, their total and longest pause in
milliseconds, and the ten longest pauses with the objects they examined.
A diagnostic for latency spikes that the relay's CPU use does not explain;
it changes no behaviour of the relay.
"""

from __future__ import annotations

import gc
import json
import sys
import time


def main() -> None:
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    out = sys.argv[1]
    stats = {g: {"collections": 0, "total_ms": 0.0, "max_ms": 0.0} for g in range(3)}
    longest: list[tuple[float, int, int]] = []
    started: dict[str, float] = {}

    def callback(phase: str, info: dict) -> None:
        if phase == "start":
            started["t"] = time.perf_counter()
            return
        ms = (time.perf_counter() - started.pop("t", time.perf_counter())) * 1000
        s = stats[info["generation"]]
        s["collections"] += 1
        s["total_ms"] += ms
        s["max_ms"] = max(s["max_ms"], ms)
        if len(longest) < 10 or ms > longest[-1][0]:
            longest.append((ms, info["generation"], info.get("collected", 0)))
            longest.sort(reverse=True)
            del longest[10:]

    def dump() -> None:
        with open(out, "w", encoding="utf-8") as f:
            json.dump(
                {
                    "thresholds": gc.get_threshold(),
                    "per_generation": {str(g): {k: round(v, 3) for k, v in s.items()} for g, s in stats.items()},
                    "longest_ms": [
                        {"ms": round(ms, 3), "generation": g, "collected": c} for ms, g, c in longest
                    ],
                    "objects_tracked_at_exit": len(gc.get_objects()),
                },
                f,
                indent=1,
            )

    gc.callbacks.append(callback)
    from twisted.application import app
    from twisted.scripts.twistd import run

    # twistd ends a run stopped by a signal by killing itself with that
    # signal again, which skips finally clauses and atexit: dump first.
    exit_with_signal = app._exitWithSignal

    def dump_then_exit(sig: int) -> None:
        dump()
        exit_with_signal(sig)

    app._exitWithSignal = dump_then_exit

    sys.argv = ["twistd"] + sys.argv[2:]
    try:
        run()
    finally:
        dump()


if __name__ == "__main__":
    main()
