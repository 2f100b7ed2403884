"""
Tests for the hardened site of L{leeloo.web} (L{RelaySite}): the deadline
to finish a request, the cap on bodies, the security headers on every
response, the access log, and the upgrade letting go of its request.  Raw
HTTP bytes go into the site's real channel over a L{StringTransport}, with
time from a L{Clock}.
"""

from __future__ import annotations

import gc
import json
import weakref

import txaio
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import ISSLTransport
from twisted.internet.task import Clock
from twisted.internet.testing import EventLoggingObserver, StringTransport
from twisted.logger import formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from leeloo.access import TrustedProxies
from leeloo.relay import Relay
from leeloo.testing import MemoryWebSocketClients
from leeloo import web
from leeloo.web import LINGER, MAX_BODY, HTTPLimits, RelayRequest, RelaySite, make_redirect_site, make_site
from leeloo.websocket import RelayServerFactory

txaio.use_twisted()

START = 1_700_000_000.0
SECURITY_HEADERS = {
    "content-security-policy": "default-src 'none'; script-src 'self'; style-src 'self'; "
                               "img-src 'self' https://i.scdn.co https://mosaic.scdn.co https://*.spotifycdn.com; "
                               "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "x-frame-options": "DENY",
}


@implementer(ISSLTransport)
class TLSStringTransport(StringTransport):
    """
    A StringTransport that says it is TLS.
    """

    def setTcpNoDelay(self, enabled):
        pass


def parse_response(data: bytes) -> tuple[int, dict[str, str], bytes]:
    """
    The status, headers (lower-case names) and body of the first HTTP
    response in C{data}.
    """
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(lines[0].split()[1]), headers, body


class Recorder(Resource):
    """
    Answers with the length of the body it was sent; or, with C{hold},
    never answers until told.
    """

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.rendered: list = []
        self.hold = False

    def render(self, request):
        self.rendered.append(request)
        if self.hold:
            return NOT_DONE_YET
        return b"%d" % len(request.content.read())


class Broken(Resource):
    isLeaf = True

    def render_GET(self, request):
        raise RuntimeError("a bug")


class SiteTestCase(SynchronousTestCase):
    """
    A relay's public site on a Clock, and raw connections to it.
    """

    limits = HTTPLimits()

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(START)
        previous = txaio.config.loop
        txaio.config.loop = self.clock
        self.addCleanup(setattr, txaio.config, "loop", previous)
        self.relay = Relay(self.clock)
        self.factory = RelayServerFactory(self.relay)
        self.site = self.make_site()

    def make_site(self) -> RelaySite:
        site = make_site(self.relay, self.factory, None, "bot-secret", reactor=self.clock, limits=self.limits)
        self.recorder = Recorder()
        site.resource.putChild(b"record", self.recorder)
        site.resource.putChild(b"broken", Broken())
        return site

    def connect(self, host: str = "198.51.100.1", secure: bool = False):
        transport = (TLSStringTransport if secure else StringTransport)(
            hostAddress=IPv4Address("TCP", "127.0.0.1", 8080),
            peerAddress=IPv4Address("TCP", host, 50000),
        )
        channel = self.site.buildProtocol(transport.getPeer())
        # As a TCP connection's: what it delivers to, replaced at an upgrade.
        transport.protocol = channel
        channel.makeConnection(transport)
        return channel, transport

    def request(self, raw: bytes, host: str = "198.51.100.1", secure: bool = False):
        channel, transport = self.connect(host, secure)
        channel.dataReceived(raw)
        return parse_response(transport.value())

    def get(self, path: str, *headers: str, host: str = "198.51.100.1", secure: bool = False):
        lines = [f"GET {path} HTTP/1.1", "Host: relay.test", *headers, "", ""]
        return self.request("\r\n".join(lines).encode(), host, secure)


class DeadlineTests(SiteTestCase):
    limits = HTTPLimits(request_timeout=10)

    def test_slow_request_aborted(self):
        """
        A connection that has not sent a whole request within the deadline
        is aborted.
        """
        channel, transport = self.connect()
        channel.dataReceived(b"GET / HTTP/1.1\r\nHost: relay.test\r\n")
        self.clock.advance(9.9)
        self.assertFalse(transport.disconnected)
        self.clock.advance(0.1)
        self.assertTrue(transport.disconnected)
        self.assertEqual(self.site.deadlines.expired, 1)

    def test_dripping_bytes_does_not_extend(self):
        """
        Sending a byte now and then does not put the deadline off (as it
        would twisted.web's idle timeout).
        """
        channel, transport = self.connect()
        for byte in b"GET / HTTP/1.1\r\nHost: r":
            if transport.disconnected:
                break
            channel.dataReceived(bytes([byte]))
            self.clock.advance(1)
        self.assertTrue(transport.disconnected)

    def test_silent_connection_aborted(self):
        """
        A connection that sends nothing at all is aborted at the deadline.
        """
        _, transport = self.connect()
        self.clock.advance(10)
        self.assertTrue(transport.disconnected)

    def test_request_in_time_served(self):
        """
        A request sent within the deadline is answered, and its connection
        is not aborted at the deadline while the answer is pending.
        """
        self.recorder.hold = True
        channel, transport = self.connect()
        channel.dataReceived(b"GET /record HTTP/1.1\r\nHost: relay.test\r\n\r\n")
        self.clock.advance(60)
        self.assertFalse(transport.disconnected)
        [request] = self.recorder.rendered
        request.write(b"late")
        request.finish()
        self.assertEqual(parse_response(transport.value())[0], 200)

    def test_idle_keepalive_closed(self):
        """
        After a response, a kept-alive connection has the same deadline to
        send its next request.
        """
        channel, transport = self.connect()
        channel.dataReceived(b"GET /health HTTP/1.1\r\nHost: relay.test\r\n\r\n")
        self.assertEqual(parse_response(transport.value())[0], 200)
        self.clock.advance(9)
        channel.dataReceived(b"GET /health HTTP/1.1\r\nHost: relay.test\r\n\r\n")
        self.clock.advance(9)
        self.assertFalse(transport.disconnected)
        self.clock.advance(1)
        self.assertTrue(transport.disconnected)

    def test_one_timer_for_all_connections(self):
        """
        However many connections wait, the site keeps one timer for their
        deadlines, none once none waits.
        """
        connections = [self.connect() for _ in range(100)]
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        self.assertEqual(len(self.site.deadlines), 100)
        for channel, _ in connections:
            channel.dataReceived(b"GET /health HTTP/1.1\r\nHost: relay.test\r\nConnection: close\r\n\r\n")
            channel.connectionLost(None)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(len(self.site.deadlines), 0)

    def test_later_connections_keep_their_time(self):
        """
        Each connection gets its whole deadline, however the others fare.
        """
        _, first = self.connect()
        self.clock.advance(5)
        _, second = self.connect()
        self.clock.advance(5)
        self.assertEqual((first.disconnected, second.disconnected), (True, False))
        self.clock.advance(4.9)
        self.assertFalse(second.disconnected)
        self.clock.advance(0.6)
        self.assertTrue(second.disconnected)


class UpgradeTests(SiteTestCase):
    limits = HTTPLimits(request_timeout=10)

    def test_websocket_outlives_deadline(self):
        """
        An upgraded WebSocket is not aborted by the request deadline: it
        still works long after.
        """
        net = MemoryWebSocketClients(self.site)
        client = net.connect()
        self.assertTrue(client.opened)
        client.send_json({"type": "register"})
        net.flush()
        client.take()
        for _ in range(60):
            self.clock.advance(1)
            net.flush()
        client.send_json({"type": "ping"})
        net.flush()
        self.assertFalse(client.closed)
        self.assertEqual(client.take(), [{"type": "pong"}])
        self.assertEqual(self.site.deadlines.expired, 0)

    def test_websocket_frees_its_gate_place(self):
        """
        An upgraded connection counts under its address's cap until the
        WebSocket closes, then frees its place (the WebSocket, not the
        channel, sees the connection end).
        """
        self.site.gate = HTTPLimits(max_connections_per_address=1).gate(self.clock)
        net = MemoryWebSocketClients(self.site)
        first = net.connect()
        self.assertTrue(first.opened)
        self.assertEqual(self.site.gate.by_address, {"127.0.0.1": 1})
        refused = net.connect()
        self.assertFalse(refused.opened)
        first.sendClose(1000)
        net.flush()
        self.assertEqual(self.site.gate.by_address, {})
        self.assertTrue(net.connect().opened)

    def test_upgrade_builds_no_request(self):
        """
        A WebSocket upgrade is routed on its request line straight to
        Autobahn: no twisted.web request is built for it, and its HTTP
        channel is freed once the handshake is done (nothing holds it, not
        even a reference cycle).
        """
        requests, channels = self.record()
        gc.disable()
        self.addCleanup(gc.enable)
        client = MemoryWebSocketClients(self.site).connect()
        self.assertTrue(client.opened)
        self.assertEqual(requests, [])
        self.assertEqual(len(channels), 1)
        self.assertIsNone(channels[0]())
        self.assertEqual(len(self.site.deadlines), 0)

    def test_upgrade_request_released(self):
        """
        Without routing (a site given no WebSocket factory), the upgrade
        goes through twisted.web's request to WebSocketResource, and that
        request is freed at once once the connection is upgraded.
        """
        self.site.upgrade = None
        requests, _ = self.record()
        gc.disable()
        self.addCleanup(gc.enable)
        client = MemoryWebSocketClients(self.site).connect()
        self.assertTrue(client.opened)
        self.assertEqual(len(requests), 1)
        self.assertIsNone(requests[0]())

    def record(self):
        """
        Weak references to every request and channel the site builds.
        """
        requests, channels = [], []

        def recording(*args, **kwargs):
            request = RelayRequest(*args, **kwargs)
            requests.append(weakref.ref(request))
            return request

        build = self.site.buildProtocol

        def building(address):
            channel = build(address)
            channels.append(weakref.ref(channel))
            return channel

        self.site.requestFactory = recording
        self.site.buildProtocol = building
        return requests, channels


class UpgradeRoutingTests(SiteTestCase):
    """
    The channel routes a connection whose first request line is a WebSocket
    upgrade to Autobahn, before twisted.web parses anything, with the
    limits twisted.web would have applied to it; everything else is
    twisted.web's as before.
    """

    limits = HTTPLimits(request_timeout=10)
    HANDSHAKE = (b"GET /ws HTTP/1.1\r\nHost: relay.test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                 b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")

    def requests(self):
        built = []

        def recording(*args, **kwargs):
            built.append(args)
            return RelayRequest(*args, **kwargs)

        self.site.requestFactory = recording
        return built

    def test_upgrade_line(self):
        """
        Only C{GET /ws} (with or without a query) over HTTP/1.1 is routed.
        """
        for line, routed in [
            (b"GET /ws HTTP/1.1", True),
            (b"GET /ws?v=2 HTTP/1.1", True),
            (b"GET /ws HTTP/1.0", False),
            (b"GET /ws/ HTTP/1.1", False),
            (b"GET /wss HTTP/1.1", False),
            (b"POST /ws HTTP/1.1", False),
            (b"GET /ws?a b HTTP/1.1", False),
            (b"get /ws HTTP/1.1", False),
            (b"GET /health HTTP/1.1", False),
        ]:
            self.assertEqual(web.is_upgrade_line(line), routed, line)

    def test_handshake_answered_by_autobahn(self):
        """
        The routed handshake is answered 101 by Autobahn, the connection
        belongs to the WebSocket protocol, and no request was built.
        """
        built = self.requests()
        channel, transport = self.connect()
        channel.dataReceived(self.HANDSHAKE)
        status, headers, _ = parse_response(transport.value())
        self.assertEqual(status, 101)
        self.assertEqual(headers["sec-websocket-accept"], "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=")
        self.assertIsInstance(transport.protocol, self.factory.protocol)
        self.assertEqual(built, [])
        self.assertEqual(self.relay.stats().sessions, 1)

    def test_request_line_in_pieces(self):
        """
        A request line that arrives a few bytes at a time is routed once
        it is whole.
        """
        channel, transport = self.connect()
        channel.dataReceived(self.HANDSHAKE[:2])
        channel.dataReceived(self.HANDSHAKE[2:9])
        self.assertEqual(transport.value(), b"")
        channel.dataReceived(self.HANDSHAKE[9:30])
        transport.protocol.dataReceived(self.HANDSHAKE[30:])
        self.assertEqual(parse_response(transport.value())[0], 101)

    def test_upgrade_over_tls_layer(self):
        """
        Behind a wrapping protocol (TLS's), the wrapped protocol is
        replaced, as WebSocketResource does it.
        """
        from twisted.protocols.policies import ProtocolWrapper, WrappingFactory

        wrapping = WrappingFactory(self.site)
        transport = StringTransport(hostAddress=IPv4Address("TCP", "127.0.0.1", 8080),
                                    peerAddress=IPv4Address("TCP", "198.51.100.1", 50000))
        wrapper = wrapping.buildProtocol(transport.getPeer())
        self.assertIsInstance(wrapper, ProtocolWrapper)
        wrapper.makeConnection(transport)
        wrapper.dataReceived(self.HANDSHAKE)
        self.assertIsInstance(wrapper.wrappedProtocol, self.factory.protocol)
        self.assertEqual(parse_response(transport.value())[0], 101)

    def test_other_requests_to_twisted_web(self):
        """
        Anything else, the WebSocket path without HTTP/1.1 among it, is
        parsed by twisted.web as before.
        """
        built = self.requests()
        self.assertEqual(self.get("/health")[0], 200)
        status, _, _ = self.request(b"GET /ws HTTP/1.0\r\nHost: relay.test\r\n\r\n")
        self.assertEqual(status, 426)
        self.assertEqual(len(built), 2)

    def test_second_request_not_routed(self):
        """
        An upgrade after a plain request on the same connection is
        twisted.web's (and WebSocketResource's), and works.
        """
        built = self.requests()
        channel, transport = self.connect()
        channel.dataReceived(b"GET /health HTTP/1.1\r\nHost: relay.test\r\n\r\n")
        self.assertEqual(parse_response(transport.value())[0], 200)
        transport.clear()
        channel.dataReceived(self.HANDSHAKE)
        self.assertEqual(parse_response(transport.value())[0], 101)
        self.assertEqual(len(built), 2)

    def test_head_too_large(self):
        """
        A routed handshake's head past twisted.web's limits (its size, or
        its number of lines) is answered 431 as a request's would be, and
        nothing more of it is read.
        """
        for head in [b"GET /ws HTTP/1.1\r\nX-A: " + b"a" * 17000 + b"\r\n\r\n",
                     b"GET /ws HTTP/1.1\r\n" + b"X-A: 1\r\n" * 600 + b"\r\n"]:
            channel, transport = self.connect()
            channel.dataReceived(head[:100])
            transport.protocol.dataReceived(head[100:])
            status, _, body = parse_response(transport.value())
            self.assertEqual((status, json.loads(body)["error"]), (431, "headers_too_large"))
            transport.protocol.dataReceived(self.HANDSHAKE)
            self.assertEqual(transport.value().count(b"HTTP/1.1 "), 1)
        self.assertEqual(self.relay.stats().sessions, 0)

    def test_head_at_the_limit(self):
        """
        A handshake whose headers are just under the limit opens.
        """
        channel, transport = self.connect()
        channel.dataReceived(self.HANDSHAKE[:-2] + b"X-A: " + b"a" * 15000 + b"\r\n\r\n")
        self.assertEqual(parse_response(transport.value())[0], 101)

    def test_unfinished_handshake_meets_the_deadline(self):
        """
        A routed handshake whose head never ends is aborted by the request
        deadline, which runs from the connection's start.
        """
        channel, transport = self.connect()
        self.clock.advance(5)
        channel.dataReceived(self.HANDSHAKE[:40])
        self.clock.advance(4.9)
        self.assertFalse(transport.disconnected)
        self.clock.advance(0.1)
        self.assertTrue(transport.disconnected)
        self.assertEqual(self.site.deadlines.expired, 1)

    def test_bad_handshake_refused(self):
        """
        A routed request that is no valid upgrade is refused by Autobahn
        with the relay's headers, and frees its deadline.
        """
        channel, transport = self.connect()
        channel.dataReceived(b"GET /ws HTTP/1.1\r\nHost: relay.test\r\n\r\n")
        status, headers, _ = parse_response(transport.value())
        self.assertEqual(status, 426)
        self.assertEqual(headers["x-content-type-options"], "nosniff")
        transport.protocol.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(len(self.site.deadlines), 0)


class BodyLimitTests(SiteTestCase):
    def test_content_length_over_limit(self):
        """
        A request whose Content-Length is over the limit is answered 413
        JSON before any of its body is sent, without C{100 Continue}, and
        the resource never sees it.
        """
        channel, transport = self.connect()
        channel.dataReceived(
            b"POST /record HTTP/1.1\r\nHost: relay.test\r\nExpect: 100-continue\r\n"
            b"Content-Length: %d\r\n\r\n" % (MAX_BODY + 1))
        status, headers, body = parse_response(transport.value())
        self.assertEqual(status, 413)
        self.assertEqual(headers["content-type"], "application/json")
        self.assertEqual(json.loads(body)["error"], "body_too_large")
        self.assertNotIn(b"100 Continue", transport.value())
        self.assertTrue(transport.disconnecting)
        self.assertEqual(self.recorder.rendered, [])
        self.assertEqual(self.site.bodies_refused, 1)

    def test_body_after_refusal_ignored(self):
        """
        What the client still sends after the 413 is discarded unread.
        """
        channel, transport = self.connect()
        channel.dataReceived(
            b"POST /record HTTP/1.1\r\nHost: relay.test\r\nContent-Length: 100000\r\n\r\n" + b"x" * 1000)
        for _ in range(99):
            channel.dataReceived(b"x" * 1000)
        channel.dataReceived(b"GET /record HTTP/1.1\r\nHost: relay.test\r\n\r\n")
        self.assertEqual(transport.value().count(b"HTTP/1.1"), 1)
        self.assertEqual(self.recorder.rendered, [])

    def test_chunked_over_limit(self):
        """
        A chunked body is refused with 413 once it passes the limit, and the
        resource never sees it.
        """
        channel, transport = self.connect()
        channel.dataReceived(b"POST /record HTTP/1.1\r\nHost: relay.test\r\nTransfer-Encoding: chunked\r\n\r\n")
        chunk = b"4000\r\n" + b"x" * 0x4000 + b"\r\n"
        for _ in range(4):
            channel.dataReceived(chunk)
        self.assertEqual(transport.value(), b"")
        channel.dataReceived(chunk + b"0\r\n\r\n")
        status, _, _ = parse_response(transport.value())
        self.assertEqual(status, 413)
        self.assertEqual(self.recorder.rendered, [])

    def test_body_at_limit_accepted(self):
        """
        A body of exactly the limit, by length or chunked, reaches the
        resource whole.
        """
        status, _, body = self.request(
            b"POST /record HTTP/1.1\r\nHost: relay.test\r\nContent-Length: %d\r\n\r\n" % MAX_BODY
            + b"x" * MAX_BODY)
        self.assertEqual((status, body), (200, b"%d" % MAX_BODY))
        chunk = b"4000\r\n" + b"x" * 0x4000 + b"\r\n"
        status, _, body = self.request(
            b"POST /record HTTP/1.1\r\nHost: relay.test\r\nTransfer-Encoding: chunked\r\n\r\n"
            + chunk * 4 + b"0\r\n\r\n")
        self.assertEqual((status, body), (200, b"%d" % MAX_BODY))

    def test_bodies_kept_in_memory(self):
        """
        A chunked body is kept in memory, not spooled to a temporary file as
        twisted.web would.
        """
        self.recorder.hold = True
        channel, _ = self.connect()
        channel.dataReceived(b"POST /record HTTP/1.1\r\nHost: relay.test\r\nTransfer-Encoding: chunked\r\n\r\n"
                             b"3\r\nabc\r\n0\r\n\r\n")
        [request] = self.recorder.rendered
        self.assertEqual(type(request.content).__name__, "BytesIO")


class SecurityHeaderTests(SiteTestCase):
    def assertHardened(self, response):
        status, headers, _ = response
        for name, value in SECURITY_HEADERS.items():
            self.assertEqual(headers.get(name), value, (status, name))
        return status

    def test_html(self):
        """
        The landing page carries the security headers.
        """
        self.assertEqual(self.assertHardened(self.get("/")), 200)

    def test_json(self):
        """
        JSON answers carry them: /health, and the bot API's errors.
        """
        self.assertEqual(self.assertHardened(self.get("/health")), 200)
        self.assertEqual(self.assertHardened(self.get("/api/telegram/crew/status?crew_code=X")), 401)

    def test_error_pages(self):
        """
        twisted.web's own error pages carry them: 404, 405 (for any method)
        and 500.
        """
        self.assertEqual(self.assertHardened(self.get("/nowhere")), 404)
        self.assertEqual(self.assertHardened(self.get("/api/nowhere")), 404)
        self.assertEqual(self.assertHardened(self.request(
            b"POST /health HTTP/1.1\r\nHost: relay.test\r\nContent-Length: 0\r\n\r\n")), 405)
        self.assertEqual(self.assertHardened(self.request(
            b"DELETE /health HTTP/1.1\r\nHost: relay.test\r\n\r\n")), 405)
        self.assertEqual(self.assertHardened(self.get("/broken")), 500)
        self.flushLoggedErrors(RuntimeError)

    def test_callback_page(self):
        """
        The Spotify callback's pages carry them.
        """
        self.assertEqual(self.assertHardened(self.get("/spotify/callback")), 400)

    def test_body_too_large(self):
        """
        The 413 for a body over the limit carries them.
        """
        self.assertEqual(self.assertHardened(self.request(
            b"POST /record HTTP/1.1\r\nHost: relay.test\r\nContent-Length: 9999999\r\n\r\n")), 413)

    def test_metrics_refusal(self):
        """
        The 404 a remote client gets for /metrics carries them.
        """
        self.assertEqual(self.assertHardened(self.get("/metrics")), 404)

    def test_hsts_over_tls_only(self):
        """
        The public site sends HSTS over TLS, and not over plain HTTP.
        """
        _, headers, _ = self.get("/", secure=True)
        self.assertEqual(headers["strict-transport-security"], "max-age=63072000")
        _, headers, _ = self.get("/")
        self.assertNotIn("strict-transport-security", headers)


class FullTransport(StringTransport):
    """
    A transport whose buffer is full once C{capacity} bytes wait in it: it
    pauses its producer then, as a socket's transport does past its
    buffer size, and resumes it when L{drain}ed.
    """

    capacity = 1

    def write(self, data):
        super().write(data)
        if len(self.value()) >= self.capacity and self.producer is not None and not self.full:
            self.full = True
            self.producer.pauseProducing()

    full = False

    def drain(self) -> bytes:
        data = self.value()
        self.clear()
        self.full = False
        self.producer.resumeProducing()
        return data


class PipeliningTests(SiteTestCase):
    """
    A client pipelining requests is not read from, and gets no further
    answer, while its answers wait in a full transport.  (These pin
    twisted.web's C{_waitingForTransport} and C{_networkProducer}, and
    LineReceiver's C{paused}, which the channel relies on.)
    """

    limits = HTTPLimits(request_timeout=10)
    REQUEST = b"GET /health HTTP/1.1\r\nHost: relay.test\r\n\r\n"

    def connect_full(self):
        transport = FullTransport(peerAddress=IPv4Address("TCP", "198.51.100.1", 50000))
        channel = self.site.buildProtocol(transport.getPeer())
        channel.makeConnection(transport)
        return channel, transport

    def test_paused_while_answers_wait(self):
        """
        Once an answer fills the transport, the pipelined requests after it
        are neither answered nor read past, until the transport has sent
        what it holds; then the next one is answered.
        """
        channel, transport = self.connect_full()
        channel.dataReceived(self.REQUEST * 5)
        self.assertEqual(transport.value().count(b"HTTP/1.1 200"), 1)
        self.assertEqual(transport.producerState, "paused")
        answered = [transport.drain().count(b"HTTP/1.1 200")]
        for _ in range(4):
            answered.append(transport.drain().count(b"HTTP/1.1 200"))
        self.assertEqual(answered, [1, 1, 1, 1, 1])
        self.assertEqual(transport.producerState, "producing")

    def test_waiting_answers_do_not_put_the_deadline_off(self):
        """
        A client that never reads its answers is aborted at the deadline
        from when it stopped reading, however it keeps pipelining requests.
        """
        channel, transport = self.connect_full()
        channel.dataReceived(self.REQUEST)
        for _ in range(3):
            self.clock.advance(3)
            channel.dataReceived(self.REQUEST * 10)
        self.assertFalse(transport.disconnected)
        self.clock.advance(1)
        self.assertTrue(transport.disconnected)
        self.assertEqual(self.site.deadlines.expired, 1)
        self.assertEqual(transport.value().count(b"HTTP/1.1 200"), 1)

    def test_reading_client_served(self):
        """
        A client that reads its answers gets every pipelined request
        answered, and the deadline runs again from its last answer sent.
        """
        channel, transport = self.connect_full()
        channel.dataReceived(self.REQUEST * 3)
        total = 0
        for _ in range(3):
            self.clock.advance(9)
            total += transport.drain().count(b"HTTP/1.1 200")
        self.assertEqual(total, 3)
        self.assertFalse(transport.disconnected)
        self.clock.advance(9.9)
        self.assertFalse(transport.disconnected)
        self.clock.advance(0.1)
        self.assertTrue(transport.disconnected)


class HalfClosingTransport(StringTransport):
    """
    A StringTransport that can close its writing side only, as TCP's can.
    """

    write_closed = False

    def loseWriteConnection(self):
        self.write_closed = True


class GateTests(SiteTestCase):
    """
    The site's L{ConnectionGate} counts every TCP connection by its peer
    address before reading it.
    """

    limits = HTTPLimits(max_connections_per_address=2, connect_rate=5)
    REQUEST = b"GET /record HTTP/1.1\r\nHost: relay.test\r\n\r\n"

    def make_site(self) -> RelaySite:
        site = super().make_site()
        site.gate = self.limits.gate(self.clock, TrustedProxies(["10.0.0.0/8"]))
        return site

    def connect(self, host: str = "198.51.100.1", secure: bool = False):
        if secure:
            return super().connect(host, secure)
        transport = HalfClosingTransport(peerAddress=IPv4Address("TCP", host, 50000))
        channel = self.site.buildProtocol(transport.getPeer())
        channel.makeConnection(transport)
        return channel, transport

    def answer(self, host: str = "198.51.100.1"):
        """
        The answer to a request on a new connection from C{host}.
        """
        channel, transport = self.connect(host)
        channel.dataReceived(self.REQUEST)
        return parse_response(transport.value()), transport

    def test_over_the_cap_refused(self):
        """
        A third connection from an address with two open is answered 503
        once its request arrives, its writing side closed, and the request
        not served; another address gets in.
        """
        self.connect()
        self.connect()
        (status, headers, body), transport = self.answer()
        self.assertEqual((status, json.loads(body)["error"]), (503, "too_many_connections"))
        self.assertEqual(headers["x-frame-options"], "DENY")
        self.assertTrue(transport.write_closed)
        self.assertEqual(self.recorder.rendered, [])
        (status, _, _), _ = self.answer("198.51.100.2")
        self.assertEqual(status, 200)

    def test_turned_away_waits_for_the_request(self):
        """
        A turned-away connection is answered only once it sends (a client
        reads no answer before it has sent its request), and what it sends
        after is discarded unparsed.
        """
        self.connect()
        self.connect()
        channel, transport = self.connect()
        self.assertEqual(transport.value(), b"")
        channel.dataReceived(self.REQUEST)
        channel.dataReceived(self.REQUEST * 3)
        self.assertEqual(transport.value().count(b"HTTP/1.1 "), 1)
        self.assertEqual(self.recorder.rendered, [])

    def test_turned_away_silent_aborted_soon(self):
        """
        A turned-away connection that sends nothing is aborted after
        LINGER seconds, well before the request deadline.
        """
        self.connect()
        self.connect()
        channel, transport = self.connect()
        self.clock.advance(LINGER)
        self.assertTrue(transport.disconnected)
        self.assertEqual(transport.value(), b"")

    def test_flood_of_refusals_answered_at_once(self):
        """
        While MAX_LINGERING turned-away connections wait, more are answered
        and closed at once: refusals hold no descriptors.
        """
        self.patch(web, "MAX_LINGERING", 1)
        self.connect()
        self.connect()
        _, waiting = self.connect()
        _, flooded = self.connect()
        self.assertEqual(waiting.value(), b"")
        self.assertEqual(parse_response(flooded.value())[0], 503)
        self.assertTrue(flooded.disconnecting)

    def test_tls_aborted_unanswered(self):
        """
        Over TLS a connection over the cap is aborted without an answer
        (which would cost the relay a handshake).
        """
        self.connect(secure=True)
        self.connect(secure=True)
        _, transport = self.connect(secure=True)
        self.assertEqual(transport.value(), b"")
        self.assertTrue(transport.disconnected)

    def test_closing_frees_a_place(self):
        """
        Once a connection from an address closes, another may open.
        """
        first, _ = self.connect()
        self.connect()
        first.connectionLost(None)
        (status, _, _), _ = self.answer()
        self.assertEqual(status, 200)

    def test_connect_rate(self):
        """
        Past its burst (twice the rate), an address's new connections are
        answered 429 with Retry-After until its bucket refills; each
        refused attempt spends from it too.
        """
        for _ in range(10):
            channel, transport = self.connect()
            channel.connectionLost(None)
        (status, headers, _), _ = self.answer()
        self.assertEqual((status, headers["retry-after"]), (429, "1"))
        self.clock.advance(0.1)
        (status, _, _), _ = self.answer()
        self.assertEqual(status, 429)
        self.clock.advance(0.2)
        (status, _, _), _ = self.answer()
        self.assertEqual(status, 200)

    def test_refusals_logged_once_per_address(self):
        """
        An address hammering past its limits is warned about once a
        minute, not once a connection.
        """
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        for _ in range(20):
            self.connect()
        warnings = [formatEvent(e) for e in events if "refusing connections" in formatEvent(e)]
        self.assertEqual(len(warnings), 2, warnings)

    def test_trusted_proxy_not_counted(self):
        """
        A trusted proxy's connections carry many clients: the gate does not
        count them.
        """
        statuses = [self.answer("10.0.0.7")[0][0] for _ in range(5)]
        self.assertEqual(statuses, [200] * 5)

    def test_shared_with_the_redirect_site(self):
        """
        A site sharing the gate counts against the same cap: connections to
        port 80 and 443 from one address add up.
        """
        self.connect()
        redirect = make_redirect_site(None, reactor=self.clock, gate=self.site.gate)
        transport = StringTransport(peerAddress=IPv4Address("TCP", "198.51.100.1", 50001))
        redirect.buildProtocol(transport.getPeer()).makeConnection(transport)
        (status, _, _), _ = self.answer()
        self.assertEqual(status, 503)


class BadRequestTests(SiteTestCase):
    """
    What twisted.web cannot parse is answered with a status that says
    why, with the security headers (pinning the channel's override of
    twisted.web's C{_respondToBadRequestAndDisconnect}).
    """

    def refused(self, raw: bytes) -> tuple[int, dict, bytes]:
        channel, transport = self.connect()
        channel.dataReceived(raw)
        response = parse_response(transport.value())
        self.assertEqual(response[1]["x-content-type-options"], "nosniff")
        self.assertEqual(response[1]["connection"], "close")
        self.assertEqual(self.recorder.rendered, [])
        return response

    def test_bad_request_line(self):
        """
        A request line that is not one is 400.
        """
        self.assertEqual(self.refused(b"NONSENSE\r\n\r\n")[0], 400)

    def test_bad_chunk(self):
        """
        A malformed chunked body is 400.
        """
        self.assertEqual(self.refused(
            b"POST /record HTTP/1.1\r\nHost: relay.test\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n")[0], 400)

    def test_request_line_over_the_limit(self):
        """
        A request line over the limit is 414, whether or not its end has
        arrived.
        """
        self.assertEqual(self.refused(b"GET /" + b"a" * 17000 + b" HTTP/1.1\r\n\r\n")[0], 414)
        self.assertEqual(self.refused(b"GET /" + b"a" * 17000)[0], 414)

    def test_header_over_the_limit(self):
        """
        A header over the limit is 431, and so are too many headers or
        headers too large together.
        """
        self.assertEqual(self.refused(
            b"GET / HTTP/1.1\r\nHost: relay.test\r\nX-A: " + b"a" * 17000 + b"\r\n\r\n")[0], 431)
        self.assertEqual(self.refused(
            b"GET / HTTP/1.1\r\n" + b"X-A: 1\r\n" * 600 + b"\r\n")[0], 431)
        self.assertEqual(self.refused(
            b"GET / HTTP/1.1\r\n" + b"X-A: " + b"a" * 9000 + b"\r\nX-B: " + b"b" * 9000 + b"\r\n\r\n")[0], 431)

    def test_headers_at_the_limit_served(self):
        """
        Headers just under the limit are served.
        """
        channel, transport = self.connect()
        channel.dataReceived(b"GET /health HTTP/1.1\r\nHost: relay.test\r\nX-A: " + b"a" * 16000 + b"\r\n\r\n")
        self.assertEqual(parse_response(transport.value())[0], 200)

    def test_unknown_method_405(self):
        """
        A method twisted.web does not know is 405 with the resource's
        Allow, not 501.
        """
        status, headers, _ = self.request(b"PUT / HTTP/1.1\r\nHost: relay.test\r\nContent-Length: 0\r\n\r\n")
        self.assertEqual(status, 405)
        self.assertEqual(set(headers["allow"].split(", ")), {"GET", "HEAD"})


class HSTSTests(SiteTestCase):
    def make_site(self) -> RelaySite:
        self.recorder = Recorder()
        return RelaySite(self.recorder, hsts=b"max-age=300", reactor=self.clock)

    def test_hsts_over_tls(self):
        """
        A RelaySite given an HSTS value sends it over TLS...
        """
        _, headers, _ = self.get("/", secure=True)
        self.assertEqual(headers["strict-transport-security"], "max-age=300")

    def test_no_hsts_in_clear(self):
        """
        ...and never over plain HTTP.
        """
        _, headers, _ = self.get("/")
        self.assertNotIn("strict-transport-security", headers)

    def test_no_hsts_without_value(self):
        """
        A RelaySite without an HSTS value (the admin and redirect sites)
        sends none, even over TLS.
        """
        self.site = RelaySite(self.recorder, reactor=self.clock)
        _, headers, _ = self.get("/", secure=True)
        self.assertNotIn("strict-transport-security", headers)


class AccessLogTests(SiteTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.site.proxies = TrustedProxies(["10.0.0.0/8"])
        self.site.startFactory()
        self.addCleanup(self.site.stopFactory)

    def logged(self, *args, **kwargs) -> str:
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        self.get(*args, **kwargs)
        return "\n".join(formatEvent(e) for e in events)

    def test_no_query_string(self):
        """
        The access log names the path but not the query string, which for
        the Spotify callback holds the OAuth code.
        """
        text = self.logged("/spotify/callback?code=oauth-code-123&state=leeloo_00000000000a")
        self.assertIn("/spotify/callback?...", text)
        self.assertNotIn("oauth-code-123", text)
        self.assertNotIn("leeloo_00000000000a", text)

    def test_forwarded_client_address(self):
        """
        Behind a trusted proxy the access log names the forwarded client.
        """
        text = self.logged("/health", "X-Forwarded-For: 203.0.113.9", host="10.0.0.2")
        self.assertIn('"203.0.113.9"', text)
