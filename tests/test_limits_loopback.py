"""
The transport limits over real loopback sockets: the whole service tree on
the real reactor, devices played by the ``websockets`` package in a thread
and by raw sockets, and the relay's log captured at every level.
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import socket
import struct
import threading
import urllib.request

import txaio
from treq.client import HTTPClient
from twisted.internet import defer, protocol, reactor, threads
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from twisted.trial.unittest import TestCase
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.server import Site

from leeloo.relay import Outgoing
from leeloo.tap import Options, build_service
from leeloo.testing import FakeSpotifyAccounts

from .support import TIMEOUT, listening_port, recv, ws_session


class RelayOnLoopback(TestCase):
    """
    Starts the relay's service tree on 127.0.0.1 with C{args} (memory
    store) and records everything logged while the test runs.
    """

    timeout = 60
    args: tuple[str, ...] = ()
    environ: dict[str, str] = {}

    @defer.inlineCallbacks
    def setUp(self):
        previous = txaio.config.loop
        self.addCleanup(setattr, txaio.config, "loop", previous)
        self.events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        yield self.start(http=self.prepare())

    def prepare(self):
        """
        Set up what the relay needs before it starts; return the HTTP client
        it calls Spotify with (None: its own).
        """
        return None

    @defer.inlineCallbacks
    def start(self, http=None):
        options = Options(environ=self.environ)
        options.parseOptions(["--listen", "tcp:0:interface=127.0.0.1", "--store", "memory",
                              "--data-dir", self.mktemp(), *self.args])
        self.service = build_service(options.config, reactor, http=http)
        self.service.startService()
        self.addCleanup(self.stop)
        port = yield listening_port(self.service)
        self.port = port.getHost().port

    def stop(self):
        if self.service.running:
            return self.service.stopService()

    def logged(self) -> str:
        return "\n".join(formatEvent(e) + " " + repr(e) for e in self.events)


def masked_frame(payload: bytes) -> bytes:
    """
    A masked text frame, as a client sends it.
    """
    mask = os.urandom(4)
    length = len(payload)
    if length < 126:
        head = bytes([0x81, 0x80 | length])
    else:
        head = bytes([0x81, 0x80 | 126]) + struct.pack("!H", length)
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def masked(opcode: int, payload: bytes, fin: bool = True) -> bytes:
    """
    A masked frame as a client sends it (payloads under 126 bytes).
    """
    mask = os.urandom(4)
    return (bytes([(0x80 if fin else 0) | opcode, 0x80 | len(payload)]) + mask
            + bytes(b ^ mask[i % 4] for i, b in enumerate(payload)))


def next_frame(sock: socket.socket) -> tuple[int, bytes] | None:
    """
    The opcode and payload of the next frame the relay sends, or C{None}
    once it has closed the connection.
    """

    def exactly(n: int) -> bytes | None:
        data = b""
        while len(data) < n:
            try:
                chunk = sock.recv(n - len(data))
            except OSError:
                return None
            if not chunk:
                return None
            data += chunk
        return data

    head = exactly(2)
    if head is None:
        return None
    length = head[1] & 0x7F
    if length == 126:
        (length,) = struct.unpack("!H", exactly(2) or b"\0\0")
    elif length == 127:
        (length,) = struct.unpack("!Q", exactly(8) or b"\0" * 8)
    payload = exactly(length)
    return None if payload is None else (head[0] & 0x0F, payload)


def close_code(sock: socket.socket, frame: tuple[int, bytes]) -> int | None:
    """
    Answer the relay's close C{frame} and read until it drops the
    connection (so it is done with it); its close code.
    """
    sock.sendall(masked(0x8, frame[1][:2]))
    while next_frame(sock) is not None:
        pass
    return struct.unpack("!H", frame[1][:2])[0] if len(frame[1]) >= 2 else None


def close_cleanly(sock: socket.socket) -> None:
    """
    Close a raw WebSocket and read until the relay drops it (so it is done
    with the connection when the test ends).
    """
    sock.sendall(masked(0x8, struct.pack("!H", 1000)))
    while next_frame(sock) is not None:
        pass


def raw_websocket(port: int, receive_buffer: int | None = None) -> socket.socket:
    """
    A blocking socket that has done a WebSocket handshake with the relay.
    """
    sock = socket.socket()
    if receive_buffer is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
    sock.settimeout(TIMEOUT)
    sock.connect(("127.0.0.1", port))
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall(
        f"GET /ws HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode())
    response = b""
    while b"\r\n\r\n" not in response:
        response += sock.recv(1)
    assert response.startswith(b"HTTP/1.1 101"), response
    return sock


def read_frame(sock: socket.socket) -> bytes:
    """
    The payload of the next (unmasked, unfragmented) frame the relay sends
    on C{sock}.
    """

    def exactly(n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = sock.recv(n - len(data))
            assert chunk, "the relay closed the connection"
            data += chunk
        return data

    first, second = exactly(2)
    assert first == 0x81, hex(first)
    length = second & 0x7F
    if length == 126:
        (length,) = struct.unpack("!H", exactly(2))
    elif length == 127:
        (length,) = struct.unpack("!Q", exactly(8))
    return exactly(length)


def registered_device(port: int, device_id: str, crew_code: str, receive_buffer: int | None = None) -> socket.socket:
    """
    A raw WebSocket that has registered C{device_id} in C{crew_code} (run
    it in a thread: it blocks).
    """
    sock = raw_websocket(port, receive_buffer)
    sock.sendall(masked_frame(json.dumps(
        {"type": "register", "device_id": device_id, "crew_code": crew_code}).encode()))
    reply = json.loads(read_frame(sock))
    assert reply["type"] == "registered", reply
    return sock

class HalfOpen(protocol.Protocol):
    """
    Starts a WebSocket handshake and never finishes it.
    """

    def __init__(self):
        self.lost = defer.Deferred()

    def connectionMade(self):
        self.transport.write(b"GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n")

    def connectionLost(self, reason):
        self.lost.callback(None)


class DirectWriteTests(RelayOnLoopback):
    """
    A frame for a device goes to its socket at once when nothing is waiting
    in the transport, and after it when something is.
    """

    args = ("--messages-per-second", "100000", "--message-burst", "100000")

    def relay(self):
        return self.service.site.resource.children[b"ws"]._factory.relay

    @defer.inlineCallbacks
    def test_frame_on_the_wire_before_the_reactor_turns(self):
        """
        Sending to a device writes to its socket in the call itself: the
        bytes are there to read before the reactor runs again.
        """
        sock = yield threads.deferToThread(registered_device, self.port, "leeloo_d12ec7d12ec7", "wire")
        peer = self.relay().devices["leeloo_d12ec7d12ec7"].peer
        try:
            peer.send(Outgoing({"type": "pong"}))
            frame = sock.recv(1024, socket.MSG_DONTWAIT)
        finally:
            sock.close()
        self.assertEqual(frame[2:], b'{"type":"pong"}')
        yield peer.is_closed

    @defer.inlineCallbacks
    def test_waits_behind_what_the_transport_holds(self):
        """
        A frame does not overtake bytes the transport is still holding: it
        goes after them.
        """
        sock = yield threads.deferToThread(registered_device, self.port, "leeloo_0de40de40de4", "behind")
        self.addCleanup(sock.close)
        peer = self.relay().devices["leeloo_0de40de40de4"].peer
        first = b'{"type":"first"}'
        # Held by the transport until the reactor turns.
        peer.transport.write(bytes([0x81, len(first)]) + first)
        peer.send(Outgoing({"type": "second"}))
        frames = yield threads.deferToThread(lambda: [read_frame(sock), read_frame(sock)])
        self.assertEqual(frames, [first, b'{"type":"second"}'])
        sock.close()
        yield peer.is_closed

    @defer.inlineCallbacks
    def test_order_kept_when_the_socket_fills(self):
        """
        A device that reads nothing while its crew sends fills its socket;
        what follows waits in the transport, and it gets every message, in
        order, once it reads.
        """
        text = "x" * 4000
        count = 150

        def script(opener):
            full = registered_device(self.port, "leeloo_f0110000f011", "order", receive_buffer=4096)
            with opener() as sender, opener() as witness:
                for ws, device in ((sender, "leeloo_5e0de45e0de4"), (witness, "leeloo_a17e55a17e55")):
                    ws.send(json.dumps({"type": "register", "device_id": device, "crew_code": "order"}))
                    recv(ws)
                for n in range(count):
                    sender.send(json.dumps({"type": "message", "payload": {"text": text, "n": n}}))
                # The witness has them all: so has the full device's share,
                # in its socket or its transport.
                seen = 0
                while seen < count:
                    if recv(witness)["type"] == "message":
                        seen += 1
                got = []
                while len(got) < count:
                    message = json.loads(read_frame(full))
                    if message["type"] == "message":
                        got.append(message["payload"]["n"])
                full.close()
                return got

        got = yield ws_session(self.port, script)
        self.assertEqual(got, list(range(count)))


class HalfOpenHandshakeTests(RelayOnLoopback):
    args = ("--request-timeout", "2", "--connect-rate", "1000")

    @defer.inlineCallbacks
    def test_half_open_handshakes_do_not_stop_a_device(self):
        """
        200 connections that never finish their handshake do not stop a
        device from connecting and registering; the relay aborts them at
        the deadline, and the device's WebSocket keeps working after it.
        """
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", self.port)
        factory = protocol.Factory.forProtocol(HalfOpen)
        half_open = yield defer.gatherResults([endpoint.connect(factory) for _ in range(200)])
        registered = defer.Deferred()
        deadline_passed = threading.Event()

        def device(opener):
            with opener() as ws:
                ws.send(json.dumps({"type": "register", "device_id": "leeloo_aaaaaaaaaaaa", "crew_code": "x"}))
                answer = recv(ws)
                reactor.callFromThread(registered.callback, answer)
                assert deadline_passed.wait(TIMEOUT)
                ws.send(json.dumps({"type": "ping"}))
                return recv(ws)

        session = ws_session(self.port, device)
        answer = yield registered
        waiting_then = len(self.service.site.deadlines)
        yield defer.gatherResults([p.lost for p in half_open])
        deadline_passed.set()
        pong = yield session
        self.assertEqual(answer["type"], "registered")
        self.assertGreaterEqual(waiting_then, 200)
        self.assertGreaterEqual(self.service.site.deadlines.expired, 200)
        self.assertEqual(pong, {"type": "pong"})


class SlowReaderTests(RelayOnLoopback):
    # The flood is faster than any device is allowed to send.
    args = ("--max-unsent-bytes", str(256 * 1024),
            "--messages-per-second", "100000", "--message-burst", "100000", "--presence-grace", "0.1")

    @defer.inlineCallbacks
    def test_slow_reader_cut_off_crew_served(self):
        """
        A device that stops reading while its crew floods it is cut off
        once it is too far behind; the rest of the crew keeps receiving
        everything, and the relay logs the device, not the messages.
        """
        marker = "flood-body-marker-"
        text = (marker * 2000)[:32 * 1024]

        def script(opener):
            slow = raw_websocket(self.port, receive_buffer=4096)
            slow.sendall(masked_frame(json.dumps(
                {"type": "register", "device_id": "leeloo_5105105105", "crew_code": "flood"}).encode()))
            with opener() as flooder, opener() as reader:
                for ws, device in ((flooder, "leeloo_f100d0000000"), (reader, "leeloo_4ead00000000")):
                    ws.send(json.dumps({"type": "register", "device_id": device, "crew_code": "flood"}))
                    recv(ws)
                sent = received = 0
                cut_off_after = None
                while sent < 2000 and (cut_off_after is None or sent < cut_off_after + 5):
                    flooder.send(json.dumps({"type": "message", "payload": {"text": text, "n": sent}}))
                    sent += 1
                    while True:
                        message = recv(reader)
                        if message["type"] == "member_offline":
                            cut_off_after = sent
                        elif message["type"] == "message":
                            received += 1
                            break
                slow.close()
                return sent, received, cut_off_after

        sent, received, cut_off_after = yield ws_session(self.port, script)
        self.assertIsNotNone(cut_off_after, "the slow reader was never cut off")
        self.assertEqual(received, sent)
        self.assertEqual(self.service.site.resource.children[b"ws"]._factory.slow_readers, 1)
        warnings = [formatEvent(e) for e in self.events if e.get("log_level") == LogLevel.warn]
        self.assertTrue(any("leeloo_5105105105" in w for w in warnings), warnings)
        self.assertNotIn(marker, self.logged())


class BodyLimitTests(RelayOnLoopback):
    @defer.inlineCallbacks
    def test_413_while_body_still_sent(self):
        """
        A client sending a body over the limit reads the relay's 413, even
        while it is still sending the body: the relay closes only its side
        and reads on (were it to close with unread data the client would get
        a reset instead).
        """

        deadlines = self.service.site.deadlines
        closed = defer.Deferred()
        done = deadlines.done

        def watching(channel):
            done(channel)
            if not len(deadlines) and not closed.called:
                closed.callback(None)

        self.patch(deadlines, "done", watching)

        def script(opener):
            connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=TIMEOUT)
            try:
                connection.request("POST", "/api/telegram/crew/create", body=b"x" * (32 * 1024 * 1024),
                                   headers={"Content-Type": "application/json"})
                response = connection.getresponse()
                return response.status, json.loads(response.read())
            finally:
                connection.close()

        status, body = yield ws_session(self.port, script)
        self.assertEqual((status, body["error"]), (413, "body_too_large"))
        # The relay lets go of the connection once the client closes it.
        yield closed


class NoSecretsInLogsTests(RelayOnLoopback):
    """
    A whole session with every secret the relay handles, and its log.
    """

    CLIENT_ID = "leak-client-id-8c1f"
    CLIENT_SECRET = "leak-client-secret-77ab"
    BOT_SECRET = "leak-bot-secret-3e9d"
    WRONG_SECRET = "leak-wrong-secret-0f0f"
    CODE = "leak-oauth-code-5a5a"
    OFFLINE_CODE = "leak-oauth-code-6b6b"
    ACCESS_TOKEN = "leak-access-token-1111"
    REFRESH_TOKEN = "leak-refresh-token-2222"
    OFFLINE_ACCESS_TOKEN = "leak-access-token-3333"
    OFFLINE_REFRESH_TOKEN = "leak-refresh-token-4444"
    BODY = "leak-message-body-from-a-device"
    BOT_BODY = "leak-message-body-from-the-bot"
    REDIRECT_URI = "https://relay.leak.test/spotify/callback"

    def prepare(self):
        # Autobahn's own debug events too: every level the relay can log at.
        txaio.set_global_log_level("debug")
        self.addCleanup(txaio.set_global_log_level, "info")

        self.accounts = FakeSpotifyAccounts(self.CLIENT_ID, self.CLIENT_SECRET, self.REDIRECT_URI)
        self.accounts.issue(self.CODE, self.ACCESS_TOKEN, self.REFRESH_TOKEN)
        self.accounts.issue(self.OFFLINE_CODE, self.OFFLINE_ACCESS_TOKEN, self.OFFLINE_REFRESH_TOKEN)
        accounts_port = reactor.listenTCP(0, Site(self.accounts), interface="127.0.0.1")
        self.addCleanup(accounts_port.stopListening)
        pool = HTTPConnectionPool(reactor, persistent=False)
        self.addCleanup(pool.closeCachedConnections)

        self.env_values = {
            "SPOTIFY_CLIENT_ID": self.CLIENT_ID,
            "SPOTIFY_CLIENT_SECRET": self.CLIENT_SECRET,
            "SPOTIFY_REDIRECT_URI": self.REDIRECT_URI,
            "SPOTIFY_ACCOUNTS_URL": f"http://127.0.0.1:{accounts_port.getHost().port}",
            "TELEGRAM_API_SECRET": self.BOT_SECRET,
        }
        env_file = self.mktemp()
        with open(env_file, "w") as f:
            f.writelines(f"{k}={v}\n" for k, v in self.env_values.items())
        os.chmod(env_file, 0o644)
        self.args = ("--env-file", env_file)
        self.environ = {}
        return HTTPClient(Agent(reactor, pool=pool))

    @defer.inlineCallbacks
    def test_full_session_logs_no_secrets(self):
        """
        Through register, join, a message with a body, Spotify tokens
        delivered online and kept for an offline device, the bot API with
        its secret (and a wrong one), /metrics, and a stop, nothing the
        relay logs at any level holds a token, an OAuth code, a secret, a
        message body or a value from the env file.
        """
        base = f"http://127.0.0.1:{self.port}"

        def bot(path, body, secret):
            request = urllib.request.Request(
                base + path, data=json.dumps(body).encode(),
                headers={"Content-Type": "application/json", "X-Api-Secret": secret})
            try:
                return json.load(urllib.request.urlopen(request, timeout=TIMEOUT))
            except urllib.error.HTTPError as e:
                return e.code

        def script(opener):
            seen = {}
            with opener() as a, opener() as b:
                a.send(json.dumps({"type": "register", "device_id": "leeloo_aaaaaaaaaaaa",
                                   "crew_code": "leaky", "device_name": "Ann"}))
                recv(a)
                b.send(json.dumps({"type": "join_crew", "crew_code": "leaky", "device_id": "leeloo_bbbbbbbbbbbb",
                                   "display_name": "Bob"}))
                recv(b)
                recv(a)  # member_joined
                a.send(json.dumps({"type": "message", "msg_type": "text", "payload": {"text": self.BODY}}))
                seen["message"] = recv(b)["payload"]["text"]
                page = urllib.request.urlopen(
                    f"{base}/spotify/callback?code={self.CODE}&state=leeloo_aaaaaaaaaaaa", timeout=TIMEOUT)
                seen["callback"] = page.status
                seen["tokens"] = recv(a)["tokens"]["access_token"]
                urllib.request.urlopen(
                    f"{base}/spotify/callback?code={self.OFFLINE_CODE}&state=leeloo_cccccccccccc",
                    timeout=TIMEOUT)
                with opener() as c:
                    c.send(json.dumps({"type": "register", "device_id": "leeloo_cccccccccccc"}))
                    recv(c)
                    seen["offline_tokens"] = recv(c)["tokens"]["access_token"]
                seen["wrong_secret"] = bot("/api/telegram/crew/join",
                                           {"telegram_user_id": 7, "crew_code": "leaky", "display_name": "T"},
                                           self.WRONG_SECRET)
                bot("/api/telegram/crew/join",
                    {"telegram_user_id": 7, "crew_code": "leaky", "display_name": "T"}, self.BOT_SECRET)
                bot("/api/telegram/message",
                    {"telegram_user_id": 7, "crew_code": "leaky", "sender_name": "T", "msg_type": "text",
                     "payload": {"text": self.BOT_BODY}}, self.BOT_SECRET)
                seen["bot_message"] = recv(b)["payload"]["text"]
                seen["metrics"] = urllib.request.urlopen(base + "/metrics", timeout=TIMEOUT).read().decode()
            return seen

        seen = yield ws_session(self.port, script)
        yield self.stop()
        self.assertEqual(
            (seen["message"], seen["callback"], seen["tokens"], seen["offline_tokens"],
             seen["wrong_secret"], seen["bot_message"]),
            (self.BODY, 200, self.ACCESS_TOKEN, self.OFFLINE_ACCESS_TOKEN, 401, self.BOT_BODY))
        log = self.logged()
        self.assertTrue(any(e["log_level"] == LogLevel.debug for e in self.events), "no debug events captured")
        # The log is there and covers the session: start-up, the env file
        # warning, the callback, the refused secret, the stop.
        for expected in ("LEELOO relay starting", "chmod 600", "Spotify tokens for leeloo_aaaaaaaaaaaa",
                         "wrong or missing secret", "/spotify/callback?...", "closing"):
            self.assertIn(expected, log)
        secrets = [self.CODE, self.OFFLINE_CODE, self.ACCESS_TOKEN, self.REFRESH_TOKEN,
                   self.OFFLINE_ACCESS_TOKEN, self.OFFLINE_REFRESH_TOKEN, self.BODY, self.BOT_BODY,
                   self.WRONG_SECRET, *self.env_values.values()]
        for secret in secrets:
            self.assertNotIn(secret, log)
            self.assertNotIn(secret, seen["metrics"])


def raw_answer(port: int, data: bytes, source: str = "127.0.0.1") -> tuple[int, dict[str, str], bytes]:
    """
    Send C{data} from C{source} (a loopback address) and read the relay's
    answer until it closes: its status, headers (lower-case names) and
    the rest.
    """
    answer = raw_exchange(port, data, source)
    head, _, body = answer.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(lines[0].split()[1]), headers, body


def raw_exchange(port: int, data: bytes, source: str = "127.0.0.1") -> bytes:
    """
    Send C{data} from C{source} and read all the relay answers until it
    closes the connection.
    """
    sock = socket.socket()
    sock.settimeout(TIMEOUT)
    sock.bind((source, 0))
    sock.connect(("127.0.0.1", port))
    try:
        if data:
            sock.sendall(data)
        answer = b""
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            answer += chunk
    finally:
        sock.close()
    return answer


HARDENED = ("content-security-policy", "x-content-type-options", "referrer-policy", "x-frame-options")


class ConnectionCapTests(RelayOnLoopback):
    """
    Every TCP connection counts against its address's cap before a byte
    of it is read.
    """

    args = ("--max-connections-per-address", "3", "--connect-rate", "1000")

    def idle(self, count: int) -> list[socket.socket]:
        sockets = []
        for _ in range(count):
            sock = socket.socket()
            sock.settimeout(TIMEOUT)
            sock.connect(("127.0.0.1", self.port))
            sockets.append(sock)
        self.addCleanup(lambda: [s.close() for s in sockets])
        return sockets

    @defer.inlineCallbacks
    def test_idle_connections_fill_the_cap(self):
        """
        Connections that send nothing fill their address's cap: the next
        one, plain HTTP, is answered 503 with the security headers and
        closed; another address still gets in.
        """
        yield threads.deferToThread(self.idle, 3)
        status, headers, body = yield threads.deferToThread(
            raw_answer, self.port, b"GET /health HTTP/1.1\r\nHost: relay.test\r\n\r\n")
        other, _, _ = yield threads.deferToThread(
            raw_answer, self.port, b"GET /health HTTP/1.1\r\nHost: relay.test\r\nConnection: close\r\n\r\n",
            "127.0.0.2")
        self.assertEqual((status, json.loads(body)["error"]), (503, "too_many_connections"))
        for name in HARDENED:
            self.assertIn(name, headers)
        self.assertEqual(other, 200)
        self.assertEqual(self.service.site.gate.refused["per_address"], 1)

    @defer.inlineCallbacks
    def test_device_refused_then_let_in(self):
        """
        A device (the websockets client) over its address's cap gets 503 at
        its handshake; once one of the connections closes it gets in.
        """
        from websockets.exceptions import InvalidStatus

        gate = self.service.site.gate
        released = defer.Deferred()
        release = gate.release

        def releasing(host):
            release(host)
            if not released.called:
                released.callback(None)

        self.patch(gate, "release", releasing)
        sockets = yield threads.deferToThread(self.idle, 3)

        def refused(opener):
            try:
                with opener():
                    return None
            except InvalidStatus as e:
                return e.response.status_code

        status = yield ws_session(self.port, refused)
        sockets[0].close()
        yield released

        def device(opener):
            with opener() as ws:
                ws.send(json.dumps({"type": "register", "device_id": "leeloo_ca9ca9ca9ca9"}))
                return recv(ws)["type"]

        answer = yield ws_session(self.port, device)
        self.assertEqual((status, answer), (503, "registered"))


class UpgradedConnectionCapTests(RelayOnLoopback):
    args = ("--max-connections-per-address", "2", "--connect-rate", "1000")

    @defer.inlineCallbacks
    def test_closed_websockets_free_their_places(self):
        """
        A WebSocket that closes frees its place under its address's cap
        like a plain HTTP connection: devices connecting one after another
        (and more often than the cap) all get in.
        """
        def devices(opener):
            answers = []
            for n in range(5):
                with opener() as ws:
                    ws.send(json.dumps({"type": "register", "device_id": "leeloo_%012x" % n}))
                    answers.append(recv(ws)["type"])
            return answers

        answers = yield ws_session(self.port, devices)
        self.assertEqual(answers, ["registered"] * 5)
        self.assertEqual(self.service.site.gate.by_address, {})


class ConnectRateTests(RelayOnLoopback):
    """
    New connections from one address are rate limited: reconnecting is no
    way around the per-connection limits.
    """

    args = ("--connect-rate", "2")

    @defer.inlineCallbacks
    def test_burst_then_429(self):
        """
        An address gets a burst of twice --connect-rate connections, then
        429 with Retry-After (and the security headers) until its bucket
        refills; another address is not affected.
        """
        request = b"GET /health HTTP/1.1\r\nHost: relay.test\r\nConnection: close\r\n\r\n"

        def burst():
            return [raw_answer(self.port, request) for _ in range(8)]

        answers = yield threads.deferToThread(burst)
        other, _, _ = yield threads.deferToThread(raw_answer, self.port, request, "127.0.0.2")
        statuses = [status for status, _, _ in answers]
        self.assertEqual(statuses[:4], [200] * 4)
        self.assertIn(429, statuses)
        refused = next(a for a in answers if a[0] == 429)
        self.assertEqual(refused[1]["retry-after"], "1")
        self.assertEqual(json.loads(refused[2])["error"], "connecting_too_fast")
        for name in HARDENED:
            self.assertIn(name, refused[1])
        self.assertEqual(other, 200)


class FragmentTests(RelayOnLoopback):
    """
    A message may come in at most --max-fragments frames.
    """

    args = ("--max-fragments", "8")

    def send_fragmented(self, count: int):
        text = json.dumps({"type": "register", "device_id": "leeloo_f4a9f4a9f4a9"}).encode()
        size = -(-len(text) // count)
        pieces = [text[i:i + size] for i in range(0, len(text), size)]
        pieces += [b""] * (count - len(pieces))
        sock = raw_websocket(self.port)
        try:
            for n, piece in enumerate(pieces):
                sock.sendall(masked(0x1 if n == 0 else 0x0, piece, fin=n == count - 1))
            frame = next_frame(sock)
            if frame is not None and frame[0] == 0x8:
                return "closed", close_code(sock, frame)
            close_cleanly(sock)
        finally:
            sock.close()
        return frame

    @defer.inlineCallbacks
    def test_at_the_limit_accepted(self):
        """
        A message in exactly --max-fragments frames is received whole.
        """
        frame = yield threads.deferToThread(self.send_fragmented, 8)
        self.assertEqual(frame[0], 0x1)
        self.assertEqual(json.loads(frame[1])["type"], "registered")

    @defer.inlineCallbacks
    def test_over_the_limit_closed_1009(self):
        """
        A message in one frame more is refused: the relay closes with 1009
        (message too big), as for a message over --max-message-size.
        """
        answer = yield threads.deferToThread(self.send_fragmented, 9)
        self.assertEqual(answer, ("closed", 1009))


class PingTests(RelayOnLoopback):
    """
    Pings count against --messages-per-second like every other frame.
    """

    @defer.inlineCallbacks
    def test_pings_answered(self):
        """
        Pings within the rate are answered with pongs carrying their
        payload.
        """

        def pings():
            sock = raw_websocket(self.port)
            try:
                sock.sendall(b"".join(masked(0x9, b"ping-%d" % n) for n in range(5)))
                frames = [next_frame(sock) for _ in range(5)]
                close_cleanly(sock)
                return frames
            finally:
                sock.close()

        frames = yield threads.deferToThread(pings)
        self.assertEqual(frames, [(0xA, b"ping-%d" % n) for n in range(5)])

    @defer.inlineCallbacks
    def test_ping_flood_rate_limited(self):
        """
        A burst of 200 pings gets at most the message burst of pongs; the
        rest are refused as rate_limited like text frames, and the
        connection is closed with 4029 after --abuse-strikes refusals.
        """

        def flood():
            sock = raw_websocket(self.port)
            frames = []
            try:
                sock.sendall(masked(0x9, b"x") * 200)
                while True:
                    frame = next_frame(sock)
                    if frame is None:
                        break
                    frames.append(frame)
                    if frame[0] == 0x8:
                        frames.append(close_code(sock, frame))
                        break
            finally:
                sock.close()
            return frames

        frames = yield threads.deferToThread(flood)
        pongs = [f for f in frames[:-1] if f[0] == 0xA]
        errors = [json.loads(f[1]) for f in frames[:-1] if f[0] == 0x1]
        self.assertLessEqual(len(pongs), 41)
        self.assertGreaterEqual(len(pongs), 39)
        self.assertEqual({e["error"] for e in errors}, {"rate_limited"})
        self.assertEqual(frames[-1], 4029)


class MalformedHTTPTests(RelayOnLoopback):
    """
    What twisted.web and Autobahn refuse is answered with a clear status
    and the security headers, and quotes nothing the client sent.
    """

    @defer.inlineCallbacks
    def answer(self, data: bytes):
        status, headers, body = yield threads.deferToThread(raw_answer, self.port, data)
        for name in HARDENED:
            self.assertIn(name, headers, (status, name))
        return status, headers, body

    @defer.inlineCallbacks
    def test_bad_request_hardened(self):
        """
        A request line twisted.web cannot parse gets its 400, with the
        security headers.
        """
        status, _, body = yield self.answer(b"NONSENSE\r\n\r\n")
        self.assertEqual((status, json.loads(body)["error"]), (400, "bad_request"))

    @defer.inlineCallbacks
    def test_request_line_too_long_414(self):
        """
        A request line over the limit is 414.
        """
        status, _, _ = yield self.answer(b"GET /" + b"a" * 20000 + b" HTTP/1.1\r\nHost: relay.test\r\n\r\n")
        self.assertEqual(status, 414)

    @defer.inlineCallbacks
    def test_header_too_long_431(self):
        """
        A header over the limit is 431, and so are headers over the limit
        all together.
        """
        one, _, _ = yield self.answer(b"GET / HTTP/1.1\r\nHost: relay.test\r\nX-Big: " + b"a" * 20000 + b"\r\n\r\n")
        many, _, _ = yield self.answer(
            b"GET / HTTP/1.1\r\nHost: relay.test\r\n"
            + b"".join(b"X-H%d: %s\r\n" % (n, b"a" * 100) for n in range(200)) + b"\r\n")
        self.assertEqual((one, many), (431, 431))

    @defer.inlineCallbacks
    def test_other_methods_405(self):
        """
        A method twisted.web does not know (PUT, DELETE, anything) is 405
        with Allow, not 501.
        """
        put, put_headers, _ = yield self.answer(
            b"PUT / HTTP/1.1\r\nHost: relay.test\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        foo, foo_headers, _ = yield self.answer(
            b"FOO /health HTTP/1.1\r\nHost: relay.test\r\nConnection: close\r\n\r\n")
        self.assertEqual((put, foo), (405, 405))
        self.assertEqual(set(put_headers["allow"].split(", ")), {"GET", "HEAD"})
        self.assertIn("GET", foo_headers["allow"].split(", "))

    def handshake(self, *headers: str) -> bytes:
        lines = ["GET /ws HTTP/1.1", f"Host: 127.0.0.1:{self.port}", "Upgrade: websocket",
                 "Connection: Upgrade", "Sec-WebSocket-Version: 13", *headers, "", ""]
        return "\r\n".join(lines).encode()

    @defer.inlineCallbacks
    def test_null_origin_403(self):
        """
        A handshake with C{Origin: null} (a sandboxed page, a file:// page)
        is 403, as for any origin not allowed.
        """
        status, _, _ = yield self.answer(self.handshake("Origin: null", "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ=="))
        self.assertEqual(status, 403)

    @defer.inlineCallbacks
    def test_bad_key_not_echoed(self):
        """
        A bad Sec-WebSocket-Key is refused with 400 that does not quote it.
        """
        answer = yield threads.deferToThread(
            raw_exchange, self.port, self.handshake("Sec-WebSocket-Key: <b>quoted-key</b>"))
        self.assertTrue(answer.startswith(b"HTTP/1.1 400 Bad Request\r\n"), answer)
        self.assertNotIn(b"quoted-key", answer)
