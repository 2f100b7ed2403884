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
        self.events = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)
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
    args = ("--request-timeout", "2")

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
