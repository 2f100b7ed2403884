"""
What a crew message costs a node in a cluster, in process CPU (steadier on
a shared machine than wall time): one crew of 5 online, one member on
this node and 4 on another, through a real Redis.

  - send: L{RedisFanout.publish} of one stored message (the local member
    and the frame to the other node, sent with its turn's), the replies read;
  - receive: one such message arriving from the other node (parsed, and
    sent to 4 local members);
  - local: L{LocalFanout.publish} to 5 local members (the single-node
    path, for scale).

    PYTHONPATH=. python benchmarks/cluster_fanout.py redis://127.0.0.1:PORT/0 [MESSAGES [ROUNDS [PER_TURN]]]

PER_TURN (default 1) messages are published per reactor turn, each turn's
sent as one command (a busy node sends many per turn).

Prints one JSON line: the median over ROUNDS of microseconds of CPU per
message for each, and C{send_alone_us}, the sending loop with no member on
another node (its reactor turns): C{send_us} less it is what the other
node costs the sender.
"""

from __future__ import annotations

import json
import statistics
import sys
import time

from twisted.internet import defer, reactor, task

from leeloo.core.peer import Outgoing
from leeloo.fanout.local import LocalFanout
from leeloo.fanout.redis import RedisFanout, _framed
from leeloo.redisurl import parse_redis_url


class _Peer:
    def send(self, out: Outgoing) -> None:
        out.payload


class _Session:
    def __init__(self, name: str) -> None:
        self.name = name
        self.peer = _Peer()


class _Crew:
    code = "BENCH"
    fanned_seq = 0


class _Membership:
    def __init__(self, name: str) -> None:
        self.session = _Session(name)
        self.peer = self.session.peer
        self.crew = _Crew()
        self.held = None
        self.last_sent_seq = 0


PAYLOAD = json.dumps({"type": "message", "from_device": "leeloo_000000000001", "from_name": "Ann",
                      "msg_type": "text", "payload": {"text": "hello crew"}, "timestamp": 1700000000000,
                      "seq": 1, "id": "m" * 22, "crew_code": "BENCH"}).encode()


@defer.inlineCallbacks
def measure(url: str, messages: int, batch: int) -> dict:
    fanout = RedisFanout(parse_redis_url(url), reactor, node="bench-sender")
    fanout.commands.start()
    yield fanout.commands.call("PING")
    LocalFanout.subscribe(fanout, "BENCH", "local", _Membership("Local"))
    fanout.mirror.apply("bench-other", 1, [["J", "BENCH", f"d{i}", f"D{i}"] for i in range(4)])
    # Sending, BATCH messages per reactor turn.
    start = time.process_time()
    for seq in range(1, messages + 1):
        fanout.publish("BENCH", Outgoing(None, PAYLOAD), None, seq)
        if seq % batch == 0:
            # The end of the turn: its frames go, the reactor reads replies.
            yield task.deferLater(reactor, 0, lambda: None)
    yield fanout.commands.call("PING")
    send = (time.process_time() - start) / messages * 1e6
    # The same loop with no member on another node: what the turns cost.
    alone = RedisFanout(parse_redis_url(url), reactor, node="bench-alone")
    LocalFanout.subscribe(alone, "BENCH", "local", _Membership("Local"))
    start = time.process_time()
    for seq in range(1, messages + 1):
        alone.publish("BENCH", Outgoing(None, PAYLOAD), None, seq)
        if seq % batch == 0:
            yield task.deferLater(reactor, 0, lambda: None)
    turns = (time.process_time() - start) / messages * 1e6
    # Receiving.
    receiver = RedisFanout(parse_redis_url(url), reactor, node="bench-receiver")
    for i in range(4):
        LocalFanout.subscribe(receiver, "BENCH", f"d{i}", _Membership(f"D{i}"))
    channel = receiver.own_channel.encode()
    frames = [_framed(b"M", "BENCH", seq, PAYLOAD) for seq in range(1, messages + 1)]
    start = time.process_time()
    for frame in frames:
        receiver._received(channel, frame)
    receive = (time.process_time() - start) / messages * 1e6
    # The single-node path.
    local = LocalFanout()
    for i in range(5):
        local.subscribe("BENCH", f"d{i}", _Membership(f"D{i}"))
    start = time.process_time()
    for seq in range(1, messages + 1):
        local.publish("BENCH", Outgoing(None, PAYLOAD), None, seq)
    only_local = (time.process_time() - start) / messages * 1e6
    yield fanout.commands.stop()
    return {"send_us": send, "send_alone_us": turns, "receive_us": receive, "local_us": only_local}


@defer.inlineCallbacks
def main(reactor_: object, url: str, messages: int, rounds: int, batch: int) -> defer.Deferred:
    results = []
    for _ in range(rounds):
        results.append((yield measure(url, messages, batch)))
    print(json.dumps({key: round(statistics.median(r[key] for r in results), 2) for key in results[0]}
                     | {"messages": messages, "rounds": rounds, "per_turn": batch}))


if __name__ == "__main__":
    args = sys.argv[1:]
    task.react(main, [args[0], int(args[1]) if len(args) > 1 else 20000, int(args[2]) if len(args) > 2 else 5,
                      int(args[3]) if len(args) > 3 else 1])
