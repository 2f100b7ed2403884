"""
What one device of a reconnect storm costs the relay in process, with no
sockets: the opening handshake through the real site (RelayChannel's
routing, Autobahn's handshake, the relay's onConnect and onOpen), then its
``register`` (identity, crew entry, the journal on the in-memory store, the
reply), in crews of 5, on the real reactor (not run: timers are only
scheduled, as a storm's are).  The kernel, the database writer and the log
observer are left out; ``benchmarks/run.sh``'s storm has them.

    PYTHONPATH=. python benchmarks/storm_cpu.py [DEVICES [ROUNDS]]

prints one JSON line: the least of ROUNDS (default 3) runs of microseconds
of CPU per device, and every run's.  On a shared machine that varies by
several percent from run to run; for a change of a few percent, count
instructions instead (valgrind's callgrind, the same whatever else the
machine does):

    PYTHONPATH=. python benchmarks/storm_cpu.py --instructions [FEW [MANY]]

runs one round of FEW (default 300) and of MANY (default 1,300) devices
under callgrind and prints the instructions per device (the difference
over MANY - FEW, so that start-up cancels out).
"""

from __future__ import annotations

import gc
import json
import os
import re
import subprocess
import sys
import tempfile
import time

HANDSHAKE = (b"GET /ws HTTP/1.1\r\nHost: 127.0.0.1:8080\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
             b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")


def frame(payload: bytes) -> bytes:
    """
    A masked text frame, as a device sends.
    """
    mask = b"\x01\x02\x03\x04"
    n = len(payload)
    head = bytes([0x81, 0x80 | n]) if n < 126 else bytes([0x81, 0x80 | 126]) + n.to_bytes(2, "big")
    return head + mask + bytes(b ^ mask[i & 3] for i, b in enumerate(payload))


def run(devices: int) -> float:
    """
    Microseconds of CPU per device for C{devices} handshakes and registers.
    """
    import txaio
    from twisted.internet import reactor
    from twisted.internet.address import IPv4Address
    from twisted.internet.testing import StringTransport

    from leeloo.limits import Rate, RelayLimits
    from leeloo.relay import Relay
    from leeloo.web import HTTPLimits, make_site
    from leeloo.websocket import RelayServerFactory, WebSocketLimits

    class Transport(StringTransport):
        def setTcpNoDelay(self, enabled: bool) -> None:
            pass

    txaio.use_twisted()
    txaio.config.loop = reactor
    relay = Relay(reactor, bind_timeout=0, limits=RelayLimits(entries=Rate(1e9, 1e9)))
    factory = RelayServerFactory(relay, WebSocketLimits(max_connections=10**7, max_connections_per_address=10**7))
    site = make_site(relay, factory, None, None, reactor=reactor,
                     limits=HTTPLimits(max_connections_per_address=10**7, connect_rate=1e9))
    frames = [frame(json.dumps({"type": "register", "device_id": f"leeloo_{i:012x}", "crew_code": f"C{i // 5}",
                                "device_name": f"Dev {i}"}).encode()) for i in range(devices)]
    peer, host = IPv4Address("TCP", "127.0.0.1", 40000), IPv4Address("TCP", "127.0.0.1", 8080)
    transports = []
    gc.collect()
    started = time.process_time()
    for data in frames:
        transport = Transport(hostAddress=host, peerAddress=peer)
        channel = site.buildProtocol(peer)
        transport.protocol = channel
        channel.makeConnection(transport)
        channel.dataReceived(HANDSHAKE)
        transport.protocol.dataReceived(data)
        transports.append(transport)
    spent = time.process_time() - started
    registered = sum(b'"registered"' in t.value() for t in transports)
    if registered != devices:
        raise SystemExit(f"storm_cpu: only {registered} of {devices} devices registered")
    return spent / devices * 1e6


def instructions(few: int, many: int) -> dict:
    """
    Instructions per device, from callgrind runs of C{few} and C{many}.
    """
    counts = {}
    for devices in (few, many):
        with tempfile.TemporaryDirectory() as directory:
            out = subprocess.run(
                ["valgrind", "--tool=callgrind", f"--callgrind-out-file={directory}/callgrind.out",
                 sys.executable, os.path.abspath(__file__), str(devices), "1"],
                env=dict(os.environ, PYTHONHASHSEED="0"), capture_output=True, text=True, check=True)
        match = re.search(r"I\s+refs:\s+([\d,]+)", out.stderr)
        if match is None:
            raise SystemExit(f"storm_cpu: no instruction count from valgrind:\n{out.stderr[-2000:]}")
        counts[devices] = int(match.group(1).replace(",", ""))
    return {"instructions_per_device": round((counts[many] - counts[few]) / (many - few)),
            "few": few, "many": many}


def main(argv: list[str]) -> None:
    if argv[:1] == ["--instructions"]:
        few = int(argv[1]) if len(argv) > 1 else 300
        many = int(argv[2]) if len(argv) > 2 else 1300
        print(json.dumps(instructions(few, many)))
        return
    devices = int(argv[0]) if argv else 10000
    rounds = int(argv[1]) if len(argv) > 1 else 3
    from leeloo.process import GC_THRESHOLDS

    # The collector as the relay tunes it (tune_process).
    gc.set_threshold(*GC_THRESHOLDS)
    results = [run(devices) for _ in range(rounds)]
    print(json.dumps({"us_per_device": round(min(results), 1), "rounds": [round(r, 1) for r in results],
                      "devices": devices}))


if __name__ == "__main__":
    main(sys.argv[1:])
