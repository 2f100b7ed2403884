"""
The relay core's own cost per crew message, in process, with no sockets:
CREWS crews of SIZE devices (leeloo.testing.Device doubles) on the
in-memory store, MESSAGES crew messages sent round the crews; prints the
median of ROUNDS runs of microseconds per message (receipt, decode,
store journal, fan-out to SIZE - 1 members), and the median time of one
/metrics exposition of that relay, as one JSON line.

    PYTHONPATH=. python benchmarks/core_fanout.py [MESSAGES [ROUNDS]]

It isolates what the core adds per message (the figures for /metrics,
say) from the network and Autobahn, which benchmarks/run.sh measures.
"""

from __future__ import annotations

import gc
import json
import statistics
import sys
import time

from twisted.internet.task import Clock

from leeloo.limits import Rate, RelayLimits
from leeloo.relay import Relay
from leeloo.testing import Device

CREWS = 200
SIZE = 5


def run(messages: int) -> tuple[float, float]:
    clock = Clock()
    clock.advance(1_700_000_000)
    relay = Relay(clock, limits=RelayLimits(messages=Rate(1e9, 10**9), entries=Rate.per_window(10**9, 600)))
    senders = []
    for c in range(CREWS):
        crew = [Device(relay) for _ in range(SIZE)]
        for n, device in enumerate(crew):
            device.send(type="register", device_id=f"leeloo_{c:06x}{n:06x}", crew_code=f"C{c}")
        senders.append(crew[0])
    frame = json.dumps({"type": "message", "msg_type": "text", "payload": {"text": "hello crew"}}).encode()
    gc.collect()
    start = time.perf_counter()
    for i in range(messages):
        senders[i % CREWS].send_frame(frame)
    elapsed = time.perf_counter() - start
    for crew_member in senders:
        crew_member.take()
    return elapsed / messages * 1e6, scrape(relay)


def scrape(relay: Relay) -> float:
    """
    Milliseconds one /metrics exposition takes (median of 20), or -1 where
    the relay has no metrics module.
    """
    try:
        from leeloo.metrics import Metrics
        from leeloo.websocket import RelayServerFactory
    except ImportError:
        return -1.0
    metrics = Metrics(relay, RelayServerFactory(relay))
    times = []
    for _ in range(20):
        start = time.perf_counter()
        metrics.exposition()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main() -> None:
    messages = int(sys.argv[1]) if len(sys.argv) > 1 else 50_000
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 5
    runs = [run(messages) for _ in range(rounds)]
    per_message = [r for r, _ in runs]
    print(json.dumps({"scenario": "core_fanout", "crews": CREWS, "size": SIZE, "messages": messages,
                      "us_per_message_median": round(statistics.median(per_message), 2),
                      "us_per_message_runs": [round(r, 2) for r in per_message],
                      "scrape_ms_median": round(statistics.median(s for _, s in runs), 3)}))


if __name__ == "__main__":
    main()
