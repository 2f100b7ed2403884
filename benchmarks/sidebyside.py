"""
The ratios of a side-by-side run (benchmarks/sidebyside.sh): this relay's
figure divided by the Node original's, measured in the same run, with the
targets of issue 17.

    python3 benchmarks/sidebyside.py OUTDIR
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

# figure: (what, unit, how to read it from run.sh's JSON, better, target ratio)
FIGURES = {
    "idle": ("idle memory per device, N=10,000", "KiB", lambda r: r.get("rss_per_device_kib"), "lower", 1.0),
    "sat2k": ("sustained deliveries/s (p99 <= 50 ms), N=2,000", "/s",
              lambda r: r.get("max_sustained_deliveries_per_s"), "higher", 1.5),
    "sat10k": ("sustained deliveries/s, N=10,000", "/s",
               lambda r: r.get("max_sustained_deliveries_per_s"), "higher", 3.0),
    "fanout": ("fan-out p99 at 8,000 deliveries/s, N=10,000", "ms",
               lambda r: (r.get("latency_ms") or {}).get("p99"), "lower", None),
    # What each relay spends per delivery at a rate both sustain: where the
    # load generator shares the cores (N=2,000) it bounds the saturate
    # ratio (no target of its own).
    "cpu2k": ("CPU per 1,000 deliveries at 4,000 deliveries/s, N=2,000", "ms",
              lambda r: 1e6 * r["whole"]["server_cpu_s"] / r["received_deliveries"]
              if r.get("received_deliveries") and (r.get("whole") or {}).get("server_cpu_s") is not None
              else None, "lower", None),
    "storm": ("10,000 devices at once: all registered", "s",
              lambda r: r["elapsed_ms"] / 1000 if r.get("registered") == (r.get("params") or {}).get("n")
              and not r.get("failed") else None, "lower", 1.0),
}


def _failed_at(result: dict) -> float | None:
    """
    The deliveries/s of a ramp's first step when it failed there (so that
    the server sustained none).
    """
    rate, crew = result.get("lowest_failing_msgs_per_s"), (result.get("params") or {}).get("crew_size", 5)
    return None if rate is None or result.get("max_sustained_deliveries_per_s") else rate * (crew - 1)


def value(path: Path, read) -> float | None:
    files = sorted(path.glob("*.json"))
    if not files:
        return None
    try:
        result = json.loads(files[0].read_text().strip().splitlines()[-1])
        return read(result)
    except (ValueError, KeyError, IndexError, TypeError, ZeroDivisionError):
        return None


def show(x: float | None, unit: str, lost: int | None = None) -> str:
    if x is None:
        return "failed"
    text = f"{x:,.0f} {unit}" if abs(x) >= 100 else f"{x:.2f} {unit}"
    return text + (f" (lost {lost:,} deliveries)" if lost else "")


def main(outdir: Path) -> int:
    rounds = sorted(p for p in outdir.glob("r*") if p.is_dir())
    met_everywhere = True
    for rnd in rounds:
        print(f"{rnd.name}: this relay / Node original (target)")
        for fig, (what, unit, read, better, target) in FIGURES.items():
            if not (rnd / f"{fig}-relay").exists():
                continue
            node = value(rnd / f"{fig}-node", read)
            relay = value(rnd / f"{fig}-relay", read)
            memory = value(rnd / f"{fig}-memory", read)
            ratio = relay / node if relay is not None and node else None
            bound, node_note = "", ""
            if ratio is None and node is None and relay is not None and better == "higher":
                # Node sustained no step of the ramp: below its first, failing one.
                first = value(rnd / f"{fig}-node", _failed_at)
                if first:
                    node_note = f"Node sustained no step: p99 over the limit at its first, {first:,.0f} {unit}"
                    ratio, bound = relay / first, ">"
            verdict = ""
            if target is not None:
                met = ratio is not None and (ratio >= target if better == "higher" else ratio <= target)
                met_everywhere &= met
                verdict = f"{'>=' if better == 'higher' else '<='} {target:g}: {'met' if met else 'NOT met'}"
            mem = f"; --store memory {show(memory, unit)}" + (
                f" ({memory / node:.2f})" if memory is not None and node else "") if memory is not None else ""
            checkout = value(rnd / f"{fig}-checkout", read)
            if checkout is not None:
                mem += f"; on the checkout's twistd {show(checkout, unit)}" + (
                    f" ({checkout / node:.2f})" if node else "")
            print(f"  {what}: {'failed' if ratio is None else f'{bound}{ratio:.2f}'}  {verdict}")
            lost = {side: value(rnd / f"{fig}-{side}", lambda r: r.get("lost")) for side in ("node", "relay")}
            node_text = node_note if bound else f"Node {show(node, unit, lost['node'])}"
            print(f"      {node_text}, this relay {show(relay, unit, lost['relay'])}{mem}")
    print("every target met in every round" if met_everywhere and rounds else "not every target met")
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    sys.exit(main(Path(sys.argv[1])))
