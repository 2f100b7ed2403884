"""
Floods that stay inside every single limit, against ``twistd leeloo`` as a
child process: what they cost is read from the relay process itself
(``/proc/PID/status``, ``/proc/PID/fd``), what it answers from raw sockets
(no client library sends these on purpose).
"""

from __future__ import annotations

import os
import select
import socket
import struct
import time

from twisted.internet import defer, threads
from twisted.trial.unittest import TestCase

from .support import TIMEOUT, RelayProcess
from .test_limits_loopback import masked, next_frame, raw_exchange, raw_websocket

MiB = 1024 * 1024


def proc_status(pid: int) -> dict[str, int]:
    """
    The C{kB} figures of C{/proc/PID/status} (VmRSS, VmHWM...) in bytes.
    """
    figures = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            name, _, value = line.partition(":")
            parts = value.split()
            if len(parts) == 2 and parts[1] == "kB":
                figures[name] = int(parts[0]) * 1024
    return figures


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def http_get(port: int, path: str, source: str = "127.0.0.1") -> bytes:
    """
    The whole answer to one C{GET path} sent from C{source} (any loopback
    address: a client address of its own).
    """
    return raw_exchange(
        port, f"GET {path} HTTP/1.1\r\nHost: relay.test\r\nConnection: close\r\n\r\n".encode(), source)


def flood(sock: socket.socket, chunk: bytes, seconds: float, limit: int | None = None) -> tuple[int, bool]:
    """
    Send C{chunk} again and again for C{seconds} (or C{limit} bytes),
    reading nothing; return the bytes sent and whether the relay cut the
    connection off.
    """
    sock.settimeout(0.2)
    end = time.monotonic() + seconds
    sent = 0
    while time.monotonic() < end and (limit is None or sent < limit):
        try:
            sent += sock.send(chunk)
        except socket.timeout:
            continue
        except OSError:
            return sent, True
    return sent, False


class BoundedTests(TestCase):
    """
    One relay process per test, its memory and file descriptors measured
    before and after the abuse.
    """

    timeout = 90
    args: tuple[str, ...] = ()

    @defer.inlineCallbacks
    def start(self, *args):
        relay = RelayProcess(self, "--listen", "tcp:0:interface=127.0.0.1", "--store", "memory", *args)
        self.port = yield relay.proto.port
        self.relay = relay
        self.pid = relay.transport.pid
        # Everything a request touches is imported and warm.
        answer = yield threads.deferToThread(http_get, self.port, "/", "127.0.0.9")
        self.assertIn(b" 200 ", answer.split(b"\r\n", 1)[0])
        self.before = proc_status(self.pid)

    def growth(self) -> int:
        """
        How much the relay's peak resident memory grew since L{start}.
        """
        return proc_status(self.pid)["VmHWM"] - self.before["VmHWM"]

    @defer.inlineCallbacks
    def test_pipelining_without_reading(self):
        """
        A client pipelining C{GET /} without reading the answers is read
        from only while its unsent answers fit the transport's buffer: the
        relay's memory hardly grows, and the client, whose waiting answers
        do not put its deadline off, is cut off at the request deadline.
        """
        yield self.start("--request-timeout", "2")

        def attack():
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.connect(("127.0.0.1", self.port))
            try:
                return flood(sock, b"GET / HTTP/1.1\r\nHost: relay.test\r\n\r\n" * 500, seconds=10)
            finally:
                sock.close()

        sent, cut_off = yield threads.deferToThread(attack)
        growth = self.growth()
        self.assertTrue(cut_off, f"the relay read {sent} bytes of requests and never cut the client off")
        self.assertLess(growth, 4 * MiB, f"grew {growth} bytes for {sent} bytes of requests")

    @defer.inlineCallbacks
    def test_pings_without_reading(self):
        """
        A client sending pings (inside the message rate) without reading
        the pongs is disconnected once they pass --max-unsent-bytes, as for
        any other frame the relay sends it: memory hardly grows.
        """
        yield self.start("--messages-per-second", "1000000", "--message-burst", "1000000")

        def attack():
            sock = raw_websocket(self.port, receive_buffer=4096)
            try:
                return flood(sock, masked(0x9, b"p" * 125) * 200, seconds=20, limit=30 * MiB)
            finally:
                sock.close()

        sent, cut_off = yield threads.deferToThread(attack)
        growth = self.growth()
        self.assertTrue(cut_off, f"{sent} bytes of pings, and the relay kept the reader")
        self.assertLess(growth, 4 * MiB, f"grew {growth} bytes for {sent} bytes of pings")

    @defer.inlineCallbacks
    def test_many_fragments(self):
        """
        Messages sent one byte a frame (well inside --max-message-size) are
        refused with close 1009 at the 65th frame, and the fragments are not
        kept: ten connections of 30,000 fragments cost the relay almost
        nothing.
        """
        yield self.start()
        fragments = 30_000

        def attack():
            sockets = [raw_websocket(self.port) for _ in range(10)]
            frames = masked(0x1, b"{", fin=False) + masked(0x0, b" ", fin=False) * fragments
            for sock in sockets:
                try:
                    sock.sendall(frames + masked(0x9, b"done"))
                except OSError:
                    pass
            answers = []
            for sock in sockets:
                # The pong to the last ping says the relay read everything;
                # a close frame that it refused the message.
                while True:
                    frame = next_frame(sock)
                    if frame is None or frame[0] in (0x8, 0xA):
                        break
                answers.append(None if frame is None else
                               (frame[0], struct.unpack("!H", frame[1][:2])[0] if frame[0] == 0x8 else None))
                sock.close()
            return answers

        answers = yield threads.deferToThread(attack)
        growth = self.growth()
        self.assertEqual(answers, [(0x8, 1009)] * 10)
        self.assertLess(growth, 4 * MiB)

    @defer.inlineCallbacks
    def test_idle_connections_capped(self):
        """
        Plain TCP connections that never send a byte count against
        --max-connections-per-address: past it the relay closes them (after
        a short wait for a request to answer 503), so it holds no more
        descriptors for one address; another address still gets in.
        """
        yield self.start("--max-connections-per-address", "50", "--connect-rate", "100000",
                         "--request-timeout", "30")
        fds_before = open_fds(self.pid)

        def attack():
            sockets = []
            for _ in range(100):
                sock = socket.socket()
                sock.settimeout(TIMEOUT)
                sock.connect(("127.0.0.1", self.port))
                sockets.append(sock)
            # Wait for the relay to close those it refused (they become
            # readable: end of file or reset), for TIMEOUT at most.
            closed = set()
            end = time.monotonic() + TIMEOUT
            while len(closed) < 50 and time.monotonic() < end:
                readable, _, _ = select.select([s for s in sockets if s not in closed], [], [],
                                               max(0.0, end - time.monotonic()))
                closed.update(readable)
            # Answered once the relay has seen everything before it.
            health = http_get(self.port, "/health", "127.0.0.2")
            held = open_fds(self.pid) - fds_before
            for sock in sockets:
                sock.close()
            return health, held, len(closed)

        health, held, closed = yield threads.deferToThread(attack)
        self.assertIn(b" 200 ", health.split(b"\r\n", 1)[0])
        self.assertEqual(closed, 50)
        # The 50 let in, and a few the relay may have opened meanwhile.
        self.assertLessEqual(held, 55)

    @defer.inlineCallbacks
    def test_reconnecting_is_no_way_around_the_message_rate(self):
        """
        A client that opens a new connection for each burst of messages
        (each within the per-connection rate) gets no more through than
        --connect-rate connections' worth: 20 at once, then 10 a second.
        """
        yield self.start()
        burst = masked(0x1, b'{"type":"ping"}') * 40

        def attack():
            answered = refused = 0
            start = time.monotonic()
            while time.monotonic() - start < 3:
                try:
                    sock = raw_websocket(self.port)
                except (AssertionError, OSError):
                    refused += 1
                    continue
                sock.sendall(burst)
                for _ in range(40):
                    frame = next_frame(sock)
                    if frame is None:
                        break
                    answered += b'"pong"' in frame[1]
                sock.close()
            return answered, refused, time.monotonic() - start

        answered, refused, elapsed = yield threads.deferToThread(attack)
        self.assertLessEqual(answered, (20 + 10 * elapsed + 1) * 40, f"{answered} in {elapsed:.1f}s")
        self.assertGreater(refused, 0)
