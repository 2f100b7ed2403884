"""
Tests for benchmarks/floor.py: the storm's yardstick answers a device's
handshake and register as the load generator needs them answered.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase

HERE = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("floor", HERE / "benchmarks" / "floor.py")
floor = importlib.util.module_from_spec(spec)
spec.loader.exec_module(floor)

HANDSHAKE = (b"GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
             b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")


def masked(payload: bytes, opcode: int = 0x1) -> bytes:
    mask = b"\x01\x02\x03\x04"
    n = len(payload)
    head = bytes([0x80 | opcode, 0x80 | n]) if n < 126 else bytes([0x80 | opcode, 0x80 | 126]) + n.to_bytes(2, "big")
    return head + mask + bytes(b ^ mask[i & 3] for i, b in enumerate(payload))


class FloorTests(SynchronousTestCase):
    def connect(self):
        protocol, transport = floor.FloorProtocol(), StringTransport()
        protocol.makeConnection(transport)
        return protocol, transport

    def test_handshake_and_register(self):
        """
        The handshake is answered 101 with RFC 6455's accept key; a
        register, in pieces or whole, with registered naming the device.
        """
        protocol, transport = self.connect()
        data = HANDSHAKE + masked(json.dumps({"type": "register", "device_id": "d1", "crew_code": "C1"}).encode())
        for i in range(0, len(data), 7):
            protocol.dataReceived(data[i:i + 7])
        head, _, frame = transport.value().partition(b"\r\n\r\n")
        self.assertTrue(head.startswith(b"HTTP/1.1 101 "))
        self.assertIn(b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=", head)
        self.assertEqual(frame[0], 0x81)
        self.assertEqual(json.loads(frame[2:]), {"type": "registered", "device_id": "d1", "crew_code": "C1"})

    def test_long_message_and_close(self):
        """
        A message past 125 bytes is read whole (a 16-bit length); a close
        frame, or one that is not JSON, closes the connection.
        """
        protocol, transport = self.connect()
        protocol.dataReceived(HANDSHAKE)
        transport.clear()
        protocol.dataReceived(masked(json.dumps({"type": "ping", "pad": "x" * 300}).encode()))
        self.assertEqual(transport.value(), b"\x81\x0f" + b'{"type":"pong"}')
        protocol.dataReceived(masked(b"", opcode=0x8))
        self.assertTrue(transport.disconnecting)
        other, other_transport = self.connect()
        other.dataReceived(HANDSHAKE + masked(b"not json"))
        self.assertTrue(other_transport.disconnecting)
