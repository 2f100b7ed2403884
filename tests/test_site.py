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
from twisted.internet.interfaces import ISSLTransport
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import capturedLogs, formatEvent
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from leeloo.access import TrustedProxies
from leeloo.relay import Relay
from leeloo.testing import MemoryWebSocketClients
from leeloo.web import MAX_BODY, HTTPLimits, RelayRequest, RelaySite, make_site
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
        for _ in range(60):
            self.clock.advance(1)
            net.flush()
        client.send_json({"type": "ping"})
        net.flush()
        self.assertFalse(client.closed)
        self.assertEqual(client.take(), [{"type": "pong"}])
        self.assertEqual(self.site.deadlines.expired, 0)

    def test_upgrade_request_released(self):
        """
        Once the connection is upgraded, the HTTP request it came as is
        freed at once (nothing holds it, not even a reference cycle).
        """
        requests = []

        def recording(*args, **kwargs):
            request = RelayRequest(*args, **kwargs)
            requests.append(weakref.ref(request))
            return request

        self.site.requestFactory = recording
        gc.disable()
        self.addCleanup(gc.enable)
        client = MemoryWebSocketClients(self.site).connect()
        self.assertTrue(client.opened)
        self.assertEqual(len(requests), 1)
        self.assertIsNone(requests[0]())


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
        twisted.web's own error pages carry them: 404, 405, 501 and 500.
        """
        self.assertEqual(self.assertHardened(self.get("/nowhere")), 404)
        self.assertEqual(self.assertHardened(self.get("/api/nowhere")), 404)
        self.assertEqual(self.assertHardened(self.request(
            b"POST /health HTTP/1.1\r\nHost: relay.test\r\nContent-Length: 0\r\n\r\n")), 405)
        self.assertEqual(self.assertHardened(self.request(
            b"DELETE /health HTTP/1.1\r\nHost: relay.test\r\n\r\n")), 501)
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
        with capturedLogs() as events:
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
