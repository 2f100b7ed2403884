"""
What one text log line costs, in process CPU: a relay ``register`` line
through a Logger, written to a file and flushed, by twistd's own
``textFileLogObserver`` and by the relay's ``leeloo.logs.text`` (what
``twistd --logfile`` runs the relay with).

    PYTHONPATH=. python benchmarks/log_cost.py [EVENTS [ROUNDS]]

Prints one JSON line: the median over ROUNDS (default 5) of microseconds
of CPU per event for each, interleaved, and ``emit_us``, the Logger alone
(an observer that does nothing), which neither can go below.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time

from twisted.logger import Logger, LogPublisher, textFileLogObserver

from leeloo import logs


def per_event(observer, events: int) -> float:
    log = Logger(namespace="leeloo.core.handlers", observer=LogPublisher(observer))
    started = time.process_time()
    for i in range(events):
        log.info("register: device {device_id} from {client_address}, crew {crew_code}",
                 device_id=f"leeloo_{i:012x}", client_address="192.0.2.7", crew_code="LEELOO-7X3K")
    return (time.process_time() - started) / events * 1e6


def main() -> None:
    events = int(sys.argv[1]) if len(sys.argv) > 1 else 20000
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 5
    results: dict[str, list[float]] = {"emit_us": [], "twisted_us": [], "leeloo_us": []}
    with tempfile.TemporaryDirectory() as directory:
        with open(os.path.join(directory, "twistd.log"), "w") as out:
            for _ in range(rounds):
                results["emit_us"].append(per_event(lambda event: None, events))
                results["twisted_us"].append(per_event(textFileLogObserver(out), events))
                results["leeloo_us"].append(per_event(logs.text(out), events))
    figures = {name: round(statistics.median(values), 1) for name, values in results.items()}
    figures.update(events=events, rounds=rounds)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
