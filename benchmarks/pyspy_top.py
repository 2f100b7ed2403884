"""
Where the relay's time goes, from a py-spy ``--format raw`` profile.

    python3 benchmarks/pyspy_top.py saturate.pyspy.txt [--top 25]

Each line of the profile is one stack (outermost frame first, frames
separated by ``;``) and its sample count.  Prints the functions with the most
samples on top of the stack (self), the most samples anywhere in the stack
(inclusive), and self samples by source file.  Only samples where the relay
was busy are recorded (py-spy leaves out idle ones unless --idle).
"""

from __future__ import annotations

import argparse
import re
from collections import Counter

_LINE = re.compile(r"^(.*) (\d+)$")
_STDLIB = re.compile(r"^.*/lib/python3\.\d+/")
_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::\d+)?\)$")


def frame_key(frame: str) -> tuple[str, str]:
    m = _FRAME.match(frame.strip())
    if not m:
        return frame.strip(), "?"
    path = m.group("file")
    if "site-packages/" in path:
        path = path.split("site-packages/", 1)[1]
    elif "/leeloo/" in path:
        path = "leeloo/" + path.rsplit("/leeloo/", 1)[1]
    else:
        path = _STDLIB.sub("stdlib/", path)
    return m.group("func"), path


# What the relay was doing, judged from the whole stack; first match wins.
_PHASES = (
    ("opening handshake (HTTP request, upgrade, onOpen)", ("WebSocketResource.render", "HTTPChannel.", "processHandshake", "_connectionMade", "onOpen")),
    ("connection closed (onClose, member_offline)", ("connectionLost", "onClose", "_connectionLost")),
    ("WAL checkpoints' thread (adbapi; commits are in the writer process)", ("_runInteraction", "ThreadWorker")),
    ("socket writes (send)", ("doWrite", "writeSomeData", "RelayServerProtocol._write")),
    ("fan-out (framing, per-recipient bookkeeping)", ("Relay._fanout", "RelayServerProtocol.send")),
    ("frame in -> decode -> relay core", ("onMessage", "_onMessageEnd")),
    ("frame parsing before the message is whole (processData)", ("processData", "WebSocketProtocol._dataReceived")),
    ("socket reads (doRead / recv)", ("doRead",)),
    ("timers and thread callbacks (commit results, auto-ping)", ("runUntilCurrent", "_notify_bucket", "_sendAutoPing")),
    ("epoll wait and bookkeeping", ("doPoll",)),
)


def phase_of(stack: str, frames: list) -> str:
    for name, needles in _PHASES:
        if any(n in stack for n in needles):
            return name
    return "other"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("profile")
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args()
    self_count: Counter = Counter()
    incl_count: Counter = Counter()
    by_file: Counter = Counter()
    phases: Counter = Counter()
    total = 0
    with open(args.profile, encoding="utf-8", errors="replace") as f:
        for line in f:
            m = _LINE.match(line.rstrip("\n"))
            if not m:
                continue
            stack, count = m.group(1), int(m.group(2))
            frames = [frame_key(fr) for fr in stack.split(";") if fr]
            # py-spy puts the thread's name first; real frames carry a file
            frames = [fr for fr in frames if fr[1] != "?"] or frames
            if not frames:
                continue
            total += count
            phases[phase_of(stack, frames)] += count
            self_count[frames[-1]] += count
            by_file[frames[-1][1]] += count
            for fr in set(frames):
                incl_count[fr] += count
    if not total:
        print("no samples")
        return

    def show(title: str, counter: Counter, fmt) -> None:
        print(f"\n{title}")
        for key, count in counter.most_common(args.top):
            print(f"  {100 * count / total:5.1f}%  {fmt(key)}")

    print(f"{total} busy samples")
    show("by activity:", phases, lambda k: k)
    show("self (top of stack):", self_count, lambda k: f"{k[0]}  [{k[1]}]")
    show("inclusive (anywhere in the stack):", incl_count, lambda k: f"{k[0]}  [{k[1]}]")
    show("self by file:", by_file, lambda k: k)


if __name__ == "__main__":
    main()
