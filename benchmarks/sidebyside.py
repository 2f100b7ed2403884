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
               lambda r: (r.get("latency_ms") or {}).get("p99") if not r.get("lost") else None, "lower", None),
    "storm": ("10,000 devices at once: all registered", "s",
              lambda r: r["elapsed_ms"] / 1000 if r.get("registered") == (r.get("params") or {}).get("n")
              and not r.get("failed") else None, "lower", 1.0),
}


def value(path: Path, read) -> float | None:
    files = sorted(path.glob("*.json"))
    if not files:
        return None
    try:
        result = json.loads(files[0].read_text().strip().splitlines()[-1])
        return read(result)
    except (ValueError, KeyError, IndexError, TypeError, ZeroDivisionError):
        return None


def show(x: float | None, unit: str) -> str:
    if x is None:
        return "failed"
    return f"{x:,.0f} {unit}" if abs(x) >= 100 else f"{x:.2f} {unit}"


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
            verdict = ""
            if target is not None:
                met = ratio is not None and (ratio >= target if better == "higher" else ratio <= target)
                met_everywhere &= met
                verdict = f"{'>=' if better == 'higher' else '<='} {target:g}: {'met' if met else 'NOT met'}"
            mem = f"; --store memory {show(memory, unit)}" + (
                f" ({memory / node:.2f})" if memory is not None and node else "") if memory is not None else ""
            print(f"  {what}: {'failed' if ratio is None else f'{ratio:.2f}'}  {verdict}")
            print(f"      Node {show(node, unit)}, this relay {show(relay, unit)}{mem}")
    print("every target met in every round" if met_everywhere and rounds else "not every target met")
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    sys.exit(main(Path(sys.argv[1])))
