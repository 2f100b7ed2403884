"""
Where the relay's memory per connection goes.

    python3 benchmarks/memprofile.py [--n 2000] [--top 20]

Runs the relay in this process (the twistd plugin's makeService on a free
loopback port, a temporary data dir), has the load generator connect and
register --n devices (the ``idle`` scenario), and while they are held
compares against the state before: RSS, the bytes tracemalloc traced (by
source line and by file), and the objects the garbage collector tracks (by
type), each divided by the number of devices.  It also lists what one
connection's protocol object holds.  Loopback only; bounded in time.
"""

from __future__ import annotations

import argparse
import gc
import os
import subprocess
import sys
import tempfile
import time
import tracemalloc
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent


def rss_kib() -> int:
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def type_counts() -> Counter:
    counts: Counter = Counter()
    for o in gc.get_objects():
        t = type(o)
        counts[f"{t.__dict__.get('__module__', 'builtins')}.{t.__qualname__}"] += 1
    return counts


def short(path: str) -> str:
    for marker in ("site-packages/", "/leeloo/"):
        if marker in path:
            tail = path.split(marker, 1)[1]
            return tail if marker == "site-packages/" else "leeloo/" + tail
    return path.rsplit("/lib/", 1)[-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--top", type=int, default=20)
    parser.add_argument("--hold", type=float, default=20.0, help="seconds the devices are held (bounds the wait)")
    args = parser.parse_args()

    from twisted.internet import reactor, task

    from leeloo import tap

    tracemalloc.start(1)
    data_dir = tempfile.mkdtemp(prefix="leeloo-memprofile.")
    options = tap.Options()
    argv = ["--listen", "tcp:0:interface=127.0.0.1", "--data-dir", data_dir]
    # every device comes from one loopback address: lift the relay's
    # per-address and per-connection limits where it has them (as run.sh does)
    for name, value in (("join-attempts", "1000000"), ("messages-per-second", "100000"),
                        ("message-burst", "100000"), ("max-connections-per-address", "1000000"),
                        ("max-connections", "1000000"), ("connect-rate", "1000000")):
        if name + "=" in getattr(options, "longOpt", ()):
            argv += [f"--{name}", value]
    options.parseOptions(argv)
    top = tap.makeService(options)
    top.startService()
    relay = top.relay
    report: dict = {}

    def devices() -> int:
        return len(getattr(relay, "devices", ()))

    def measure_before(port: int) -> None:
        gc.collect()
        report["rss0"] = rss_kib()
        report["trace0"] = tracemalloc.take_snapshot()
        report["types0"] = type_counts()
        report["tm0"] = tracemalloc.get_tracemalloc_memory()
        url = f"ws://127.0.0.1:{port}/ws"
        cmd = ["node", str(HERE / "loadgen" / "loadgen.mjs"), "idle", "--url", url, "--n", str(args.n),
               "--hold", str(args.hold), "--server-pid", str(os.getpid()), "--quiet", "--quiet-wait", "0",
               "--max-seconds", str(int(args.hold + 120))]
        report["loadgen"] = subprocess.Popen(cmd, stdout=subprocess.DEVNULL)
        report["deadline"] = time.monotonic() + args.hold + 110
        poll.start(0.5)

    def check() -> None:
        if devices() >= args.n:
            poll.stop()
            reactor.callLater(1.0, measure_after)
        elif time.monotonic() > report["deadline"] or report["loadgen"].poll() is not None:
            poll.stop()
            print(f"only {devices()} of {args.n} devices registered", file=sys.stderr)
            reactor.stop()

    poll = task.LoopingCall(check)

    def measure_after() -> None:
        n = devices()
        gc.collect()
        rss1 = rss_kib()
        trace1 = tracemalloc.take_snapshot()
        types1 = type_counts()
        tm1 = tracemalloc.get_tracemalloc_memory()
        by_line = trace1.compare_to(report["trace0"], "lineno")
        by_file = trace1.compare_to(report["trace0"], "filename")
        traced = sum(d.size_diff for d in by_file)
        print(f"devices registered and held: {n}")
        print(f"RSS growth per device: {(rss1 - report['rss0'] - (tm1 - report['tm0']) / 1024) / n:.2f} KiB "
              f"(tracemalloc's own bookkeeping left out)")
        print(f"Python allocations traced per device: {traced / n / 1024:.2f} KiB")
        print(f"\nbytes per device, by file (top {args.top}):")
        for d in by_file[: args.top]:
            print(f"  {d.size_diff / n:8.0f} B  {d.count_diff / n:6.1f} blocks  {short(d.traceback[0].filename)}")
        print(f"\nbytes per device, by source line (top {args.top}):")
        for d in by_line[: args.top]:
            fr = d.traceback[0]
            print(f"  {d.size_diff / n:8.0f} B  {d.count_diff / n:6.1f} blocks  {short(fr.filename)}:{fr.lineno}")
        diff = types1 - report["types0"]
        print(f"\nobjects tracked by gc per device, by type (top {args.top}):")
        for name, count in diff.most_common(args.top):
            print(f"  {count / n:6.2f}  {name}")
        delayed = reactor.getDelayedCalls()
        print(f"\nreactor timers pending: {len(delayed)} ({len(delayed) / n:.2f} per device)")
        kinds = Counter(getattr(c.func, "__qualname__", repr(c.func)) for c in delayed)
        for name, count in kinds.most_common(5):
            print(f"  {count:6d}  {name}")
        session = next(iter(relay.devices.values()), None)
        proto = getattr(session, "peer", None)
        if proto is not None:
            attrs = vars(proto)
            print(f"\none connection's protocol ({type(proto).__qualname__}): {len(attrs)} instance attributes, "
                  f"__dict__ {sys.getsizeof(attrs)} B: {', '.join(attrs)}")
            config = [k for k in attrs if k in getattr(type(proto), "CONFIG_ATTRS", ())]
            print(f"  of which {len(config)} are Autobahn options copied from the factory")
            for name in ("http_request", "http_headers", "http_request_data", "data", "http_response_data"):
                if name in attrs:
                    value = attrs[name]
                    size = len(value) if isinstance(value, (bytes, str, dict, list)) else "?"
                    print(f"  kept after the upgrade: {name} ({type(value).__name__}, {size})")
            transport = getattr(proto, "transport", None)
            print(f"  transport: {type(transport).__module__}.{type(transport).__qualname__}, "
                  f"{len(vars(transport))} instance attributes, __dict__ {sys.getsizeof(vars(transport))} B")
            held = [len(getattr(t, "dataBuffer", b"")) + getattr(t, "_tempDataLen", 0)
                    for t in (getattr(s.peer, "transport", None) for s in relay.sessions) if t is not None]
            print(f"  unsent bytes the transports hold: {sum(held)} in {sum(1 for h in held if h)} "
                  f"of {len(held)} connections")
            seen = 0
            for ref in gc.get_referrers(proto):
                if seen >= 8:
                    break
                if ref is attrs or ref is session or isinstance(ref, (list, Counter)) or type(ref).__name__ == "frame":
                    continue
                seen += 1
                print(f"  referred to by: {type(ref).__module__}.{type(ref).__qualname__}")
        report["loadgen"].wait(timeout=args.hold + 60)
        reactor.stop()

    from leeloo.listening import Listener

    def listeners(service):
        if isinstance(service, Listener):
            yield service
        for child in getattr(service, "services", ()):
            yield from listeners(child)

    for service in listeners(top):
        d = service.listening
        d.addCallback(lambda port: measure_before(port.getHost().port))
        d.addErrback(lambda f: (print(f.getTraceback(), file=sys.stderr), reactor.stop()))
        break
    else:
        sys.exit("memprofile: the relay has no listening service")
    reactor.callLater(args.hold + 180, reactor.stop)   # the whole run is bounded
    reactor.run()
    loadgen = report.get("loadgen")
    if loadgen is not None and loadgen.poll() is None:
        loadgen.terminate()
        loadgen.wait(timeout=10)


if __name__ == "__main__":
    main()
