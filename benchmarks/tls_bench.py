#!/usr/bin/env python3
"""
TLS benchmark for the relay -- loopback only.

    PYTHONPATH=. python benchmarks/tls_bench.py [--idle 2000] [--storm 2000]
        [--clients 2] [--repeat 3] [--store sqlite|memory] [--json-out FILE]

Makes a throwaway CA and an /etc/letsencrypt-like directory in a temporary
directory, then for release-buffers on and off (and plain ws:// for
comparison) starts ``twistd -n leeloo --listen letsencrypt:...`` from this
checkout and measures:

  idle   N WSS devices connect (--idle-concurrency handshakes pending at
         most, default 200), register
         into crews of 5 and stay idle; the relay's RSS growth per device,
         read from /proc/PID/status.
  storm  M WSS devices connect at once (500 pending at most, split over
         --clients node processes); seconds until all are registered, on a
         fresh relay; the median of --repeat runs.

The devices are benchmarks/tls_client.mjs (node, no dependencies).  Every
wait is bounded in time; every loop in count.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

from leeloo.testca import LetsEncryptDirectory, ThrowawayCA  # noqa: E402

DOMAIN = "relay.leeloo.test"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


class Relay:
    store = "sqlite"

    def __init__(self, tmp: Path, mode: str) -> None:
        self.port = free_port()
        data = tmp / f"data-{mode}-{self.port}"
        if mode == "plain":
            listen = f"tcp:{self.port}:interface=127.0.0.1"
        else:
            listen = (f"letsencrypt:domain={DOMAIN}:port={self.port}:interface=127.0.0.1:"
                      f"directory={tmp / 'letsencrypt'}:releasebuffers={1 if mode == 'tls' else 0}")
        self.log = open(tmp / f"relay-{mode}-{self.port}.log", "w")
        self.process = subprocess.Popen(
            [sys.executable, "-c", "from twisted.scripts.twistd import run; run()", "--nodaemon", "--pidfile=",
             "--logfile=-", "leeloo", "--listen", listen, "--data-dir", str(data), "--store", self.store,
             # every device connects from one loopback address, far faster than any person
             "--connect-rate", "1000000"],
            env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=self.log, stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                if self.process.poll() is not None:
                    break
                time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"relay did not start; see {self.log.name}")

    def rss(self) -> int:
        return rss_kib(self.process.pid)

    def cpu_seconds(self) -> float:
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(5)
        self.log.close()


def devices(relay: Relay, ca: Path, n: int, concurrency: int, mode: str, clients: int = 1,
            hold: float = 60) -> tuple[list[subprocess.Popen], list[dict]]:
    """
    Start C{clients} node processes opening C{n} devices between them;
    return them (still holding their connections) with their reports.
    """
    node = shutil.which("node")
    procs = []
    offset = 0
    for k in range(clients):
        share = n // clients + (1 if k < n % clients else 0)
        procs.append(subprocess.Popen(
            [node, str(HERE / "tls_client.mjs"), "--port", str(relay.port), "--ca", str(ca),
             "--servername", DOMAIN, "--n", str(share), "--concurrency", str(max(1, concurrency // clients)),
             "--offset", str(offset), "--hold", str(hold), "--max-seconds", str(hold + 60), "--plain", "1" if mode == "plain" else "0"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        ))
        offset += share
    reports = [json.loads(p.stdout.readline() or "{}") for p in procs]
    return procs, reports


def release(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        p.stdin.close()
    for p in procs:
        try:
            p.wait(15)
        except subprocess.TimeoutExpired:
            p.kill()


def idle(tmp: Path, ca: Path, mode: str, n: int, concurrency: int = 200) -> dict:
    relay = Relay(tmp, mode)
    try:
        warm, _ = devices(relay, ca, 50, 50, mode)
        release(warm)
        time.sleep(1)
        before = relay.rss()
        procs, reports = devices(relay, ca, n, concurrency, mode)
        time.sleep(2)  # let the relay settle before reading its RSS
        after = relay.rss()
        registered = sum(r.get("registered", 0) for r in reports)
        release(procs)
        return {
            "mode": mode, "devices": n, "concurrency": concurrency, "registered": registered,
            "rss_before_kib": before, "rss_after_kib": after,
            "kib_per_device": round((after - before) / max(1, registered), 2),
        }
    finally:
        relay.stop()


def storm(tmp: Path, ca: Path, mode: str, n: int, clients: int, repeat: int) -> dict:
    runs = []
    for _ in range(repeat):
        relay = Relay(tmp, mode)
        try:
            cpu0 = relay.cpu_seconds()
            start = time.monotonic()
            procs, reports = devices(relay, ca, n, 500, mode, clients)
            seconds = time.monotonic() - start
            runs.append({
                "seconds": round(seconds, 3),
                "registered": sum(r.get("registered", 0) for r in reports),
                "failed": sum(r.get("failed", 0) for r in reports),
                "relay_cpu_seconds": round(relay.cpu_seconds() - cpu0, 2),
                "errors": [r.get("errors") for r in reports if r.get("errors")],
            })
            release(procs)
        finally:
            relay.stop()
    median = statistics.median(r["seconds"] for r in runs)
    return {"mode": mode, "devices": n, "clients": clients, "median_seconds": median,
            "handshakes_per_second": round(n / median, 1), "runs": runs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--idle", type=int, default=2000, help="idle devices; 0: none [2000]")
    parser.add_argument("--idle-concurrency", type=int, default=200,
                        help="idle: handshakes pending at most [200]")
    parser.add_argument("--storm", type=int, default=2000, help="devices in the reconnect storm; 0: none [2000]")
    parser.add_argument("--clients", type=int, default=2, help="node processes for the storm [2]")
    parser.add_argument("--repeat", type=int, default=3, help="storm runs per mode [3]")
    parser.add_argument("--modes", default="tls,tls-nrb,plain",
                        help="tls (release-buffers on), tls-nrb (off), plain (ws://) [all]")
    parser.add_argument("--store", default="sqlite", choices=["sqlite", "memory"],
                        help="the relay's --store [sqlite, its default]")
    parser.add_argument("--json-out", help="also write the results here")
    options = parser.parse_args()

    Relay.store = options.store
    tmp = Path(tempfile.mkdtemp(prefix="leeloo-tls-bench-"))
    try:
        authority = ThrowawayCA("bench")
        LetsEncryptDirectory(tmp / "letsencrypt").install(DOMAIN, authority.issue([DOMAIN]))
        ca = tmp / "ca.pem"
        ca.write_bytes(authority.root_pem)
        results = {"idle": [], "storm": []}
        for mode in options.modes.split(","):
            if options.idle > 0:
                results["idle"].append(idle(tmp, ca, mode, options.idle, options.idle_concurrency))
                print(json.dumps(results["idle"][-1]), flush=True)
            if options.storm <= 0:
                continue
            results["storm"].append(storm(tmp, ca, mode, options.storm, options.clients, options.repeat))
            print(json.dumps(results["storm"][-1]), flush=True)
        if options.json_out:
            Path(options.json_out).write_text(json.dumps(results, indent=2))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
