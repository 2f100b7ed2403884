"""
The figures of a benchmarks/multinode.sh run, and how they should grow on
separate machines.

    python3 benchmarks/multinode.py OUTDIR

For each result (OUTDIR/CONFIG-rROUND-SCENARIO.json, one loadgen JSON
line) it prints the configuration (sqlite, or K nodes on one Redis), the
load average before it, and for saturate: the highest deliveries/s
sustained with p99 under the threshold, p50/p99 at that step, and at that
step the relays' CPU per delivery (all nodes together, and per node) and
Redis's (from /proc/PID/stat, --aux-pid); for fanout: deliveries/s and
the latency percentiles at the fixed rate.

Then the projection.  On one 2-core machine every node, Redis and the load
generator share the same cores, so the total cannot grow with K.  On
separate machines each node has its own core (a relay node is one Python
reactor: about one core is what it can use) and Redis its own (it is
single-threaded).  With c_relays(K) the CPU-seconds all K nodes together
spend per delivery (each node carries 1/K of the deliveries) and
c_redis(K) Redis's, both measured at K nodes, and u the share of a core a
node used at its best step when it ran alone on SQLite:

    deliveries/s(K) ~= min(K * u / c_relays(K), u / c_redis(K))

c_relays and c_redis are fitted as a + b*K over the measured K (cross-node
fan-out costs each node one pub/sub message per crew message per other
node, and Redis one write per subscribed node), and extrapolated; a slope
the noise makes negative is taken as 0 (adding nodes adds work per
delivery, never removes it).
"""

from __future__ import annotations

import glob
import json
import os
import re
import sys


def load(outdir: str) -> list[dict]:
    rows = []
    for path in sorted(glob.glob(os.path.join(outdir, "*-r*-*.json"))):
        m = re.match(r"(.+)-r(\d+)-(\w+)\.json$", os.path.basename(path))
        if not m:
            continue
        config, rnd, scenario = m.group(1), int(m.group(2)), m.group(3)
        try:
            with open(path) as f:
                r = json.loads(f.read().strip().splitlines()[-1])
        except (OSError, ValueError, IndexError) as e:
            rows.append({"config": config, "round": rnd, "scenario": scenario, "error": str(e)})
            continue
        load_path = path[:-len(".json")] + ".loadavg"
        loadavg = open(load_path).read().strip() if os.path.exists(load_path) else "?"
        rows.append({"config": config, "round": rnd, "scenario": scenario, "result": r, "loadavg": loadavg})
    return rows


def nodes_of(config: str) -> int:
    return 1 if config == "sqlite" else int(config)


def step_costs(step: dict, k: int) -> dict:
    """
    CPU per delivery at a step: the relays' (all nodes) and Redis's, in
    microseconds, and the relays' CPU share per node.
    """
    send = step.get("send") or step
    rate = step.get("deliveries_per_s") or 0
    out = {}
    if rate and send.get("server_cpu_pct") is not None:
        out["relays_us"] = send["server_cpu_pct"] / 100 / rate * 1e6
        out["node_us"] = out["relays_us"] / k
        out["node_core"] = send["server_cpu_pct"] / 100 / k
    if rate and send.get("aux_cpu_pct") is not None:
        out["redis_us"] = send["aux_cpu_pct"] / 100 / rate * 1e6
        out["redis_core"] = send["aux_cpu_pct"] / 100
    return out


def fit(points: list[tuple[int, float]]) -> tuple[float, float] | None:
    """
    Least squares a + b*K over C{points}; a constant with one point.
    """
    if not points:
        return None
    n = len(points)
    mk = sum(k for k, _ in points) / n
    mv = sum(v for _, v in points) / n
    if len({k for k, _ in points}) < 2:
        return mv, 0.0
    b = sum((k - mk) * (v - mv) for k, v in points) / sum((k - mk) ** 2 for k, _ in points)
    if b < 0:
        return mv, 0.0
    return mv - b * mk, b


def fmt(x: float | None, digits: int = 1) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def main(outdir: str) -> int:
    rows = load(outdir)
    if not rows:
        print(f"no results in {outdir}")
        return 1
    node_points: list[tuple[int, float]] = []
    redis_points: list[tuple[int, float]] = []
    alone_core: list[float] = []
    print("config  round scenario  load avg (1/5/15 min)  figures")
    for row in rows:
        config, scenario = row["config"], row["scenario"]
        head = f"{config:7} {row['round']:5} {scenario:9} {row.get('loadavg', '?'):22}"
        r = row.get("result")
        if r is None:
            print(f"{head} unreadable: {row.get('error')}")
            continue
        k = nodes_of(config)
        if scenario == "saturate":
            b = r.get("best_step")
            if not b:
                print(f"{head} no step passed ({r.get('stop_reason')}; {r.get('error', '')})")
                continue
            lat = b.get("latency_ms") or {}
            c = step_costs(b, k)
            print(f"{head} {fmt(r.get('max_sustained_deliveries_per_s'), 0)} deliveries/s sustained "
                  f"(p50 {fmt(lat.get('p50'), 2)} p99 {fmt(lat.get('p99'), 2)} ms; stops by {r.get('stop_reason')}); "
                  f"relays {fmt(c.get('relays_us'))} us CPU/delivery ({fmt(c.get('node_us'))} per node, "
                  f"{fmt(100 * c['node_core'] if 'node_core' in c else None, 0)}% of a core each)"
                  + (f", Redis {fmt(c.get('redis_us'), 2)} us/delivery ({fmt(100 * c['redis_core'], 0)}% of a core)"
                     if "redis_us" in c else ""))
            if config == "sqlite" and "node_core" in c:
                alone_core.append(c["node_core"])
            elif config != "sqlite":
                if "relays_us" in c:
                    node_points.append((k, c["relays_us"]))
                if "redis_us" in c:
                    redis_points.append((k, c["redis_us"]))
        elif scenario == "fanout":
            lat = r.get("latency_ms") or {}
            print(f"{head} {fmt((r.get('params') or {}).get('rate'), 0)} msg/s: {fmt(r.get('deliveries_per_s'), 0)} "
                  f"deliveries/s, lost {r.get('lost')}; p50 {fmt(lat.get('p50'), 2)} p99 {fmt(lat.get('p99'), 2)} "
                  f"max {fmt(lat.get('max'), 2)} ms")
        else:
            print(f"{head} (scenario not summarized)")
    node_fit, redis_fit = fit(node_points), fit(redis_points)
    if node_fit is None or redis_fit is None:
        print("\nno Redis saturate figures: no projection")
        return 0
    u = sum(alone_core) / len(alone_core) if alone_core else 1.0
    print(f"\nProjection on separate machines (one core per node, one for Redis; u = {u:.2f} of a core, "
          f"the share one node used alone at its best step):")
    print(f"  relays' CPU per delivery (all nodes) ~ {node_fit[0]:.1f} + {node_fit[1]:.1f}*K us  (from K = "
          f"{sorted({k for k, _ in node_points})})")
    print(f"  Redis's CPU per delivery             ~ {redis_fit[0]:.2f} + {redis_fit[1]:.2f}*K us")
    for k in range(1, 7):
        relays_us = max(node_fit[0] + node_fit[1] * k, 1e-3)
        redis_us = max(redis_fit[0] + redis_fit[1] * k, 1e-3)
        nodes = k * u / relays_us * 1e6
        redis = u / redis_us * 1e6
        bound = "nodes" if nodes <= redis else "Redis"
        print(f"  K={k}: ~{min(nodes, redis):,.0f} deliveries/s (nodes allow {nodes:,.0f}, Redis {redis:,.0f}; "
              f"bound by {bound})")
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python3 benchmarks/multinode.py OUTDIR")
    sys.exit(main(sys.argv[1]))
