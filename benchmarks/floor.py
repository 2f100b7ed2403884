"""
The floor under a reconnect storm: what Twisted and CPython alone cost for
it, with no relay in between.  A plain Twisted TCP server that answers the
WebSocket opening handshake, reads each masked frame, and answers a
``register`` with ``registered`` (anything else with ``pong``): no HTTP
site, no Autobahn, no store, no log line, no limits.  Not a relay (it
checks nothing); a yardstick for benchmarks/run.sh's storm, run beside the
relay and the Node original:

    SERVER="python3 benchmarks/floor.py" SCENARIOS=storm N_STORM=10000 STORM_CONC=500 benchmarks/run.sh

(run.sh gives it its port in $PORT.)  Whatever the relay spends above this
figure is its own (Autobahn's framing, the relay core, the store, the log);
below it nothing on Twisted can go.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os

from twisted.internet import protocol

MAGIC = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


def accept_key(key: bytes) -> bytes:
    return base64.b64encode(hashlib.sha1(key + MAGIC).digest())


def text_frame(payload: bytes) -> bytes:
    """
    An unmasked text frame, as a server sends (payloads under 64 KiB).
    """
    n = len(payload)
    head = bytes([0x81, n]) if n < 126 else bytes([0x81, 126]) + n.to_bytes(2, "big")
    return head + payload


class FloorProtocol(protocol.Protocol):
    opened = False

    def connectionMade(self) -> None:
        self.buffer = b""

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        if not self.opened:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head, self.buffer = self.buffer[:end], self.buffer[end + 4:]
            key = b""
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"sec-websocket-key":
                    key = value.strip()
            self.transport.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                                 b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + accept_key(key) + b"\r\n\r\n")
            self.opened = True
        while len(self.buffer) >= 6:
            length, start = self.buffer[1] & 0x7F, 2
            if length == 126:
                length, start = int.from_bytes(self.buffer[2:4], "big"), 4
            elif length == 127:
                self.transport.loseConnection()
                return
            if len(self.buffer) < start + 4 + length:
                return
            opcode = self.buffer[0] & 0x0F
            mask = self.buffer[start:start + 4]
            masked = self.buffer[start + 4:start + 4 + length]
            self.buffer = self.buffer[start + 4 + length:]
            if opcode == 0x8:
                self.transport.loseConnection()
                return
            payload = bytes(b ^ mask[i & 3] for i, b in enumerate(masked))
            try:
                message = json.loads(payload)
            except ValueError:
                self.transport.loseConnection()
                return
            if isinstance(message, dict) and message.get("type") == "register":
                answer = json.dumps({"type": "registered", "device_id": message.get("device_id"),
                                     "crew_code": message.get("crew_code")}).encode()
            else:
                answer = b'{"type":"pong"}'
            self.transport.write(text_frame(answer))


def main() -> None:
    from twisted.internet import reactor

    factory = protocol.Factory.forProtocol(FloorProtocol)
    port = reactor.listenTCP(int(os.environ["PORT"]), factory, backlog=1024, interface="127.0.0.1")
    print(f"floor: listening on {port.getHost().port}", flush=True)
    reactor.run()


if __name__ == "__main__":
    main()
