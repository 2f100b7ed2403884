"""
The WebSocket adapter: a real Autobahn client against the real Site, wired
in memory with twisted.test.iosim, Autobahn's timers on a Clock.
"""

import json
import os
import re

import txaio
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import EventLoggingObserver, StringTransport
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from leeloo.access import OriginPolicy, TrustedProxies
from leeloo.relay import PRESENCE_GRACE, Relay
from leeloo.testing import MemoryWebSocketClients, RecordingClientProtocol, strip_keys
from leeloo.web import make_site
from leeloo.timers import TimerWheel
from leeloo.websocket import RelayServerFactory, RelayServerProtocol, WebSocketLimits

txaio.use_twisted()


class DeafClient(RecordingClientProtocol):
    """
    A client whose device hung: it never answers a ping.
    """

    def onPing(self, payload):
        pass


class WebSocketTestCase(SynchronousTestCase):
    limits = WebSocketLimits()

    def setUp(self):
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        previous = txaio.config.loop
        txaio.config.loop = self.clock
        self.addCleanup(setattr, txaio.config, "loop", previous)
        self.relay = Relay(self.clock)
        self.factory = RelayServerFactory(self.relay, self.limits)
        self.site = make_site(self.relay, self.factory, None, None, reactor=self.clock)
        self.net = MemoryWebSocketClients(self.site)

    def client(self):
        client = self.net.connect()
        self.assertTrue(client.opened)
        return client

    def send(self, client, **fields):
        client.send_json(fields)
        self.net.flush()

    def registered(self, n, code="ALPHA"):
        clients = []
        for i in range(n):
            c = self.client()
            self.send(c, type="register", device_id=f"d{i}", crew_code=code, device_name=f"D{i}")
            self.assertEqual(strip_keys(c.take()), [{"type": "registered", "device_id": f"d{i}"}])
            clients.append(c)
        return clients


class ContractTests(WebSocketTestCase):
    def test_create_join_share(self):
        """
        Over a real client: create_crew, join_crew (lower-case code),
        member_joined, share_music fan-out without echo, and pong.
        """
        a, b = self.client(), self.client()
        self.send(a, type="create_crew", device_id="a", display_name="Ann")
        [created] = strip_keys(a.take())
        code = created["crew_code"]
        self.assertEqual(created, {"type": "crew_created", "device_id": "a", "crew_code": code})
        self.send(b, type="join_crew", crew_code=code.lower(), device_id="b", display_name="Bob")
        self.assertEqual(
            strip_keys(b.take()),
            [{"type": "crew_joined", "device_id": "b", "crew_code": code, "crew_members": 2,
              "member_names": ["Ann"]}],
        )
        self.assertEqual(a.take(), [{"type": "member_joined", "device_id": "b", "display_name": "Bob",
                                     "crew_code": code}])
        self.send(b, type="share_music", spotify_uri="spotify:track:1", artist="A", track="T", album="B")
        [shared] = a.take()
        self.assertEqual((shared["type"], shared["pushed_by"]), ("music_shared", "Bob"))
        self.assertEqual(b.take(), [])
        self.send(b, type="ping")
        self.assertEqual(b.take(), [{"type": "pong"}])

    def test_message_and_reaction(self):
        """
        message and reaction reach the rest of the crew over real frames.
        """
        a, b, c = self.registered(3)
        self.send(a, type="message", msg_type="nudge")
        self.send(b, type="reaction", reaction_type="love")
        self.assertEqual([m["type"] for m in c.take()], ["message", "reaction"])
        self.assertEqual([m["type"] for m in a.take()], ["reaction"])
        self.assertEqual([m["type"] for m in b.take()], ["message"])

    def test_member_offline_on_close(self):
        """
        A client that closes its WebSocket is announced member_offline.
        """
        a, b = self.registered(2)
        a.sendClose(1000)
        self.net.flush()
        self.clock.advance(PRESENCE_GRACE)
        self.net.flush()
        self.assertEqual(b.take(), [{"type": "member_offline", "device_id": "d0", "display_name": "D0",
                                     "crew_code": "ALPHA"}])
        self.assertEqual(self.relay.stats().devices, 1)

    def test_dropped_connection_goes_offline(self):
        """
        A connection lost without a close handshake is announced too.
        """
        a, b = self.registered(2)
        a.transport.loseConnection()
        self.net.flush()
        self.clock.advance(PRESENCE_GRACE)
        self.net.flush()
        self.assertEqual(b.take()[0]["type"], "member_offline")

    def test_framed_once_per_fanout(self):
        """
        One fan-out prepares its frame once for all members.
        """
        a, b, c, d = self.registered(4)
        prepared = []
        original = self.factory.prepareMessage
        self.factory.prepareMessage = lambda payload: prepared.append(payload) or original(payload)
        self.send(a, type="message", payload={"text": "x"})
        self.assertEqual(len(prepared), 1)
        self.assertEqual([len(x.take()) for x in (b, c, d)], [1, 1, 1])


class BadInputTests(WebSocketTestCase):
    limits = WebSocketLimits(max_message_size=1024)

    def test_bad_frames_answered_and_connection_kept(self):
        """
        Every malformed frame is answered with its error code and the
        connection keeps working.
        """
        a, b = self.registered(2)
        for raw, code in [
            (b"{{{", "invalid_json"),
            (b'"a string"', "invalid_message"),
            (b"{}", "invalid_message"),
            (b'{"type":"nope"}', "unknown_type"),
            (b'{"type":"register","device_id":[1]}', "invalid_message"),
            (b'{"type":"message","payload":[]}', "invalid_message"),
        ]:
            a.sendMessage(raw)
            self.net.flush()
            [reply] = a.take()
            self.assertEqual((reply["type"], reply["error"]), ("error", code))
        self.send(a, type="reaction", reaction_type="fire")
        self.assertEqual([m["type"] for m in b.take()], ["reaction"])
        self.assertFalse(a.closed)

    def test_not_in_crew(self):
        """
        A crew message before joining a crew is answered not_in_crew.
        """
        c = self.client()
        self.send(c, type="message", payload={"text": "hello?"})
        self.assertEqual(c.take()[0]["error"], "not_in_crew")

    def test_binary_frame(self):
        """
        A binary frame is answered binary_not_supported; the connection stays.
        """
        a, b = self.registered(2)
        a.sendMessage(b"\x00\x01", isBinary=True)
        self.net.flush()
        self.assertEqual(a.take()[0]["error"], "binary_not_supported")
        self.send(a, type="ping")
        self.assertEqual(a.take(), [{"type": "pong"}])

    def test_oversized_message_closed_1009(self):
        """
        A message over the size limit is refused with close 1009, and the
        rest of the crew hears the device went offline.
        """
        a, b = self.registered(2)
        a.sendMessage(b'{"type":"message","payload":{"text":"' + b"x" * 2000 + b'"}}')
        self.net.flush()
        self.assertTrue(a.closed)
        self.assertEqual(a.close_code, 1009)
        self.clock.advance(PRESENCE_GRACE)
        self.net.flush()
        self.assertEqual(b.take()[0]["type"], "member_offline")

    def test_invalid_utf8_closed(self):
        """
        A text frame that is not UTF-8 is a protocol error Autobahn closes
        with 1007; other connections are unaffected.
        """
        a, b = self.registered(2)
        a.sendMessage(b"\xff\xfe\xfd")
        self.net.flush()
        self.assertEqual(a.close_code, 1007)
        self.send(b, type="ping")
        self.assertEqual(b.take()[-1], {"type": "pong"})

    def test_bug_closes_1011(self):
        """
        A bug while handling a frame is logged and that connection closed
        with 1011; the relay goes on serving others.
        """
        a, b = self.registered(2)

        def broken(session, message, size):
            raise ZeroDivisionError("a bug")

        from leeloo.messages import Ping

        self.patch(self.relay.handlers, "by_type", {**self.relay.handlers.by_type, Ping: broken})
        self.send(a, type="ping")
        self.assertEqual(a.close_code, 1011)
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)
        self.send(b, type="reaction", reaction_type="love")
        self.assertFalse(b.closed)


class LimitTests(WebSocketTestCase):
    def test_options_set_explicitly(self):
        """
        Autobahn's limits are the relay's, not Autobahn's open defaults.
        """
        f = self.factory
        self.assertEqual(f.maxMessagePayloadSize, 64 * 1024)
        self.assertEqual(f.maxFramePayloadSize, 64 * 1024)
        self.assertFalse(f.failByDrop)
        self.assertFalse(f.webStatus)
        self.assertGreater(f.openHandshakeTimeout, 0)
        self.assertGreater(f.closeHandshakeTimeout, 0)
        self.assertGreater(f.autoPingInterval, 0)
        self.assertLessEqual(f.autoPingInterval + f.autoPingTimeout, 60)

    def test_options_read_from_class(self):
        """
        A connection reads Autobahn's options from its factory's protocol
        class; its own __dict__ holds no copy of them.
        """
        self.registered(1)
        server = self.relay.devices["d0"].peer
        self.assertEqual(server.maxMessagePayloadSize, 64 * 1024)
        self.assertEqual(server.autoPingInterval, 25)
        self.assertEqual(set(vars(server)) & set(server.CONFIG_ATTRS), set())

    def test_compression_offer_declined(self):
        """
        A client offering permessage-deflate (as the websockets package
        does) connects, uncompressed.
        """
        from autobahn.websocket.compress import PerMessageDeflateOffer

        client = self.net.connect(options={"perMessageCompressionOffers": [PerMessageDeflateOffer()]})
        self.assertTrue(client.opened)
        self.assertEqual(client.websocket_extensions_in_use, [])
        self.send(client, type="ping")
        self.assertEqual(client.take(), [{"type": "pong"}])

    def test_dead_peer_found_by_ping(self):
        """
        A peer that stops answering pings is dropped within a minute and
        announced offline.
        """
        [b] = self.registered(1)
        a = self.net.connect(protocol=DeafClient)
        self.send(a, type="join_crew", crew_code="ALPHA", device_id="deaf")
        b.take()
        for _ in range(60):
            self.clock.advance(1)
            self.net.flush()
        self.assertEqual(b.take(), [{"type": "member_offline", "device_id": "deaf", "display_name": "deaf",
                                     "crew_code": "ALPHA"}])
        self.assertTrue(a.closed)


# ------------------------------------------------------ transport limits


class GuardedTestCase(WebSocketTestCase):
    """
    A relay whose factory has the given trusted proxies and public URL.
    """

    proxies = TrustedProxies()
    public_url = None

    def setUp(self):
        super().setUp()
        self.factory = RelayServerFactory(self.relay, self.limits, self.proxies, OriginPolicy(self.public_url))
        self.site = make_site(self.relay, self.factory, None, None, reactor=self.clock)
        self.net = MemoryWebSocketClients(self.site)

    def status(self, client):
        """
        The HTTP status the relay answered C{client}'s handshake with.
        """
        return int(client.http_status_line.split()[1])

    def refused(self, client, status):
        self.assertFalse(client.opened)
        self.assertTrue(client.closed)
        self.assertEqual(self.status(client), status)


class PerAddressCapTests(GuardedTestCase):
    limits = WebSocketLimits(max_connections=100, max_connections_per_address=2)

    def test_refused_503(self):
        """
        A connection from an address that has as many open as allowed is
        refused at the handshake with HTTP 503.
        """
        self.net.connect(host="198.51.100.1")
        self.net.connect(host="198.51.100.1")
        self.refused(self.net.connect(host="198.51.100.1"), 503)

    def test_other_addresses_unaffected(self):
        """
        One address at its cap does not stop another address.
        """
        self.net.connect(host="198.51.100.1")
        self.net.connect(host="198.51.100.1")
        self.assertTrue(self.net.connect(host="198.51.100.2").opened)

    def test_slot_freed_on_close(self):
        """
        When one of an address's connections closes, it may open another.
        """
        first = self.net.connect(host="198.51.100.1")
        self.net.connect(host="198.51.100.1")
        first.sendClose(1000)
        self.net.flush()
        self.assertTrue(self.net.connect(host="198.51.100.1").opened)

    def test_slot_freed_on_drop(self):
        """
        A connection dropped without a close handshake frees its slot too.
        """
        first = self.net.connect(host="198.51.100.1")
        self.net.connect(host="198.51.100.1")
        first.transport.loseConnection()
        self.net.flush()
        self.assertTrue(self.net.connect(host="198.51.100.1").opened)

    def test_refusals_counted_and_logged_once(self):
        """
        Every refusal is counted; the relay warns once per address reaching
        its cap, not once per refused connection.
        """
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        for _ in range(5):
            self.net.connect(host="198.51.100.1")
        self.assertEqual(self.factory.refused["per_address"], 3)
        warnings = [formatEvent(e) for e in events
                    if e.get("log_namespace") == "leeloo.websocket" and e["log_level"] == LogLevel.warn]
        self.assertEqual(len(warnings), 1)
        self.assertIn("198.51.100.1", warnings[0])

    def test_refusal_carries_security_headers(self):
        """
        The 503 carries the relay's security headers and an empty body.
        """
        self.net.connect(host="198.51.100.1")
        self.net.connect(host="198.51.100.1")
        client = self.net.connect(host="198.51.100.1")
        self.assertEqual(client.http_headers["x-content-type-options"], "nosniff")
        self.assertEqual(client.http_headers["x-frame-options"], "DENY")
        self.assertIn("default-src 'none'", client.http_headers["content-security-policy"])
        self.assertEqual(client.http_headers["content-length"], "0")


class TotalCapTests(GuardedTestCase):
    limits = WebSocketLimits(max_connections=2, max_connections_per_address=100)

    def test_refused_503(self):
        """
        Once as many connections are open as allowed in total, a new one
        from any address is refused with HTTP 503.
        """
        self.net.connect(host="198.51.100.1")
        self.net.connect(host="198.51.100.2")
        self.refused(self.net.connect(host="198.51.100.3"), 503)
        self.assertEqual(self.factory.refused["total"], 1)

    def test_slot_freed_on_close(self):
        """
        When a connection closes, a new one is accepted again.
        """
        first = self.net.connect(host="198.51.100.1")
        self.net.connect(host="198.51.100.2")
        first.sendClose(1000)
        self.net.flush()
        self.assertTrue(self.net.connect(host="198.51.100.3").opened)
        self.assertEqual(self.factory.caps.total, 2)


class CallbackBugTests(GuardedTestCase):
    """
    A bug in the relay while a connection opens or closes is logged; the
    connection is never left half-registered and its slot is always freed.
    """

    limits = WebSocketLimits(max_connections=100, max_connections_per_address=1)

    def test_bug_in_on_open_closes_1011(self):
        """
        An exception while the relay takes a new connection is logged as a
        failure and that connection closed with 1011; it holds no session
        and no slot, and the address may connect again.
        """
        def broken(peer, address=None):
            raise ZeroDivisionError("a bug")

        self.patch(self.relay, "connect", broken)
        client = self.net.connect(host="198.51.100.1")
        self.net.flush()
        self.assertEqual(client.close_code, 1011)
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)
        self.assertEqual(self.relay.sessions, set())
        self.assertEqual(self.factory.caps.total, 0)
        self.patch(self.relay, "connect", Relay.connect.__get__(self.relay))
        self.assertTrue(self.net.connect(host="198.51.100.1").opened)

    def test_bug_in_on_close_frees_the_slot(self):
        """
        An exception while the relay lets a session go is logged as a
        failure, and the connection's slot is freed all the same.
        """
        first = self.net.connect(host="198.51.100.1")

        def broken(session):
            raise ZeroDivisionError("a bug")

        self.patch(self.relay, "disconnect", broken)
        first.sendClose(1000)
        self.net.flush()
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)
        self.assertEqual(self.factory.caps.total, 0)
        self.assertTrue(self.net.connect(host="198.51.100.1").opened)


class ForwardedForTests(GuardedTestCase):
    proxies = TrustedProxies(["10.0.0.0/8"])
    limits = WebSocketLimits(max_connections_per_address=1)

    def address_of_only_session(self):
        [session] = self.relay.sessions
        return session.address

    def test_trusted_proxy_names_client(self):
        """
        Through a trusted proxy the core is given the address in
        X-Forwarded-For.
        """
        self.net.connect(host="10.0.0.2", headers={"X-Forwarded-For": "203.0.113.9"})
        self.assertEqual(self.address_of_only_session(), "203.0.113.9")

    def test_untrusted_peer_header_ignored(self):
        """
        X-Forwarded-For from a peer that is not a trusted proxy is ignored:
        the core is given the peer's address.
        """
        self.net.connect(host="198.51.100.1", headers={"X-Forwarded-For": "203.0.113.9"})
        self.assertEqual(self.address_of_only_session(), "198.51.100.1")

    def test_cap_counts_forwarded_clients(self):
        """
        Clients behind one trusted proxy are capped each by their own
        address, not the proxy's.
        """
        self.assertTrue(self.net.connect(host="10.0.0.2", headers={"X-Forwarded-For": "203.0.113.9"}).opened)
        self.assertTrue(self.net.connect(host="10.0.0.2", headers={"X-Forwarded-For": "203.0.113.10"}).opened)
        self.refused(self.net.connect(host="10.0.0.2", headers={"X-Forwarded-For": "203.0.113.9"}), 503)

    def test_spoofed_header_does_not_dodge_cap(self):
        """
        An untrusted client cannot escape its cap by sending a different
        X-Forwarded-For each time.
        """
        self.net.connect(host="198.51.100.1", headers={"X-Forwarded-For": "203.0.113.1"})
        self.refused(self.net.connect(host="198.51.100.1", headers={"X-Forwarded-For": "203.0.113.2"}), 503)


class PublicOriginTests(GuardedTestCase):
    public_url = "https://relay.example.org"

    def test_public_origin_opens(self):
        """
        A browser page from the public URL opens a WebSocket.
        """
        self.assertTrue(self.net.connect(headers={"Origin": "https://relay.example.org"}).opened)

    def test_other_origin_refused_403(self):
        """
        A browser page from any other origin is refused with HTTP 403, and
        the refusal is counted.
        """
        self.refused(self.net.connect(headers={"Origin": "https://evil.example.net"}), 403)
        self.refused(self.net.connect(headers={"Origin": "http://relay.example.org"}), 403)
        self.assertEqual(self.factory.refused["origin"], 2)

    def test_no_origin_opens(self):
        """
        A device, which sends no Origin, opens a WebSocket.
        """
        self.assertTrue(self.net.connect().opened)


class SameOriginTests(GuardedTestCase):
    def test_same_host_opens(self):
        """
        Without a public URL, a page from the host and port the handshake
        was sent to opens a WebSocket.
        """
        self.assertTrue(self.net.connect(headers={"Origin": "http://127.0.0.1:8080"}).opened)

    def test_other_host_refused_403(self):
        """
        Without a public URL, a page from another host or port is refused
        with HTTP 403.
        """
        self.refused(self.net.connect(headers={"Origin": "http://evil.example.net"}), 403)
        self.refused(self.net.connect(headers={"Origin": "http://127.0.0.1:9999"}), 403)

    def test_no_origin_opens(self):
        """
        Without a public URL, a device sending no Origin opens a WebSocket.
        """
        self.assertTrue(self.net.connect().opened)


class SlowReaderTests(WebSocketTestCase):
    limits = WebSocketLimits(max_unsent=4096)

    BODY = "lorem-ipsum-body-" * 100  # 1.7 KB

    def server_side(self, device_id):
        return self.relay.devices[device_id].peer

    def test_websocket_is_transport_producer(self):
        """
        After the upgrade the WebSocket, not twisted.web's channel, is its
        transport's producer.
        """
        [a] = self.registered(1)
        server = self.server_side("d0")
        self.assertIs(server.transport.producer, server)

    def test_cut_off_past_limit(self):
        """
        A reader whose transport has paused the relay and that is sent more
        than the limit since is disconnected; the rest of the crew keeps
        receiving and hears it went offline.
        """
        a, b, c = self.registered(3)
        slow = self.server_side("d1")
        slow.transport.producer.pauseProducing()
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        for i in range(4):
            self.send(a, type="message", payload={"text": self.BODY, "n": i})
        self.assertTrue(slow.transport.disconnecting)
        self.net.flush()
        self.clock.advance(PRESENCE_GRACE)
        self.net.flush()
        received = c.take()
        self.assertEqual([m["payload"]["n"] for m in received if m["type"] == "message"], [0, 1, 2, 3])
        self.assertIn({"type": "member_offline", "device_id": "d1", "display_name": "D1", "crew_code": "ALPHA"}, received)
        self.assertEqual(self.factory.slow_readers, 1)
        [warning] = [formatEvent(e) for e in events if e.get("log_level") == LogLevel.warn]
        self.assertIn("d1", warning)
        self.assertNotIn("lorem-ipsum", warning)

    def test_nothing_more_sent_once_cut_off(self):
        """
        Nothing more is written for a reader once it is cut off.
        """
        a, b = self.registered(2)
        slow = self.server_side("d1")
        slow.transport.producer.pauseProducing()
        sent = []
        self.patch(slow.transport, "write", sent.append)
        for i in range(6):
            self.send(a, type="message", payload={"text": self.BODY})
        self.assertEqual(len(sent), 2)

    def test_resume_resets_count(self):
        """
        Bytes sent while paused are forgiven once the transport resumes: a
        reader that catches up is not cut off.
        """
        a, b = self.registered(2)
        slow = self.server_side("d1")
        for _ in range(3):
            slow.transport.producer.pauseProducing()
            self.send(a, type="message", payload={"text": self.BODY})
            self.send(a, type="message", payload={"text": self.BODY})
            slow.transport.producer.resumeProducing()
        self.assertFalse(slow.transport.disconnecting)
        self.assertEqual(len(b.take()), 6)

    def test_unpaused_not_limited(self):
        """
        While the transport has not paused it, a reader is sent any amount.
        """
        a, b = self.registered(2)
        for _ in range(10):
            self.send(a, type="message", payload={"text": self.BODY})
        self.assertEqual(len(b.take()), 10)
        self.assertFalse(self.server_side("d1").transport.disconnecting)


class LifecycleLogTests(WebSocketTestCase):
    BODY = "a-secret-message-body"

    def test_lifecycle_lines_carry_the_fields_never_a_body(self):
        """
        A device registering (id, crew, client address) and disconnecting
        (close code) is logged at info level, as the original relay printed
        (the connection itself is not: those lines name its address);
        nothing a device sends in a message is logged.
        """
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        a = self.net.connect(host="198.51.100.7")
        b = self.net.connect(host="198.51.100.8")
        self.send(a, type="register", device_id="leeloo_aaaaaaaaaaaa", crew_code="alpha")
        self.send(b, type="join_crew", device_id="leeloo_bbbbbbbbbbbb", crew_code="ALPHA",
                  display_name="Bob")
        self.send(a, type="message", msg_type="text", payload={"text": self.BODY})
        self.send(a, type="share_music", spotify_uri=f"spotify:track:{self.BODY}", artist=self.BODY,
                  track=self.BODY, album=self.BODY)
        self.send(a, type="not json" + self.BODY)
        a.sendClose(1000)
        self.net.flush()
        info = [formatEvent(e) for e in events
                if e["log_level"] == LogLevel.info and e["log_namespace"].startswith("leeloo")]
        self.assertFalse([line for line in info if line.startswith("WebSocket connected")])
        self.assertIn("register: device leeloo_aaaaaaaaaaaa from 198.51.100.7, crew ALPHA", info)
        self.assertIn("join_crew: device leeloo_bbbbbbbbbbbb from 198.51.100.8, crew ALPHA", info)
        self.assertIn("device leeloo_aaaaaaaaaaaa at 198.51.100.7 disconnected, close code 1000 from the device",
                      info)
        everything = "\n".join(formatEvent(e) + repr(e) for e in events)
        self.assertNotIn(self.BODY, everything)

    def test_lifecycle_fields_named_by_meaning(self):
        """
        The lifecycle events carry their values under one field name per
        meaning, ready for JSON logs: client_address, crew_code, close_code.
        """
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        a = self.net.connect(host="198.51.100.7")
        self.send(a, type="register", device_id="leeloo_aaaaaaaaaaaa", crew_code="alpha")
        a.sendClose(1000)
        self.net.flush()
        fields = {formatEvent(e).split(":")[0].split(" ")[0]: e for e in events
                  if e["log_namespace"].startswith("leeloo") and e["log_level"] in (LogLevel.debug, LogLevel.info)}
        self.assertEqual((fields["register"]["client_address"], fields["register"]["crew_code"]),
                         ("198.51.100.7", "ALPHA"))
        self.assertEqual((fields["device"]["client_address"], fields["device"]["close_code"]),
                         ("198.51.100.7", 1000))
        for event in fields.values():
            self.assertFalse({"address", "code", "crew", "peer"} & set(event))

    def test_relay_close_logged_with_its_code(self):
        """
        A connection the relay closes is logged with the relay's code.
        """
        [a] = self.registered(1)
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        self.relay.shutdown(spread=0)
        self.net.flush()
        self.assertIn("device d0 at 127.0.0.1 disconnected, close code 1001 from the relay",
                      [formatEvent(e) for e in events])


class PongRecorder(RecordingClientProtocol):
    def onConnect(self, response):
        super().onConnect(response)
        self.pongs = []

    def onPong(self, payload):
        self.pongs.append(payload)


class ControlFrameTests(WebSocketTestCase):
    """
    Pings count like any frame: against the message rate, and their pongs
    against the bytes a reader may leave unread.
    """

    limits = WebSocketLimits(max_unsent=4096)

    def pinger(self):
        client = self.net.connect(PongRecorder)
        self.assertTrue(client.opened)
        return client

    def test_pings_over_the_rate_refused(self):
        """
        Past the message burst, pings get no pong but a rate_limited
        error, as text frames do.
        """
        client = self.pinger()
        for n in range(45):
            client.sendPing(b"%d" % n)
        self.net.flush()
        self.assertEqual(client.pongs, [b"%d" % n for n in range(40)])
        self.assertEqual({m["error"] for m in client.take()}, {"rate_limited"})

    def test_pings_share_the_rate_with_messages(self):
        """
        Pings spend the same bucket as text frames.
        """
        client = self.pinger()
        for n in range(40):
            client.sendPing(b"p")
        self.send(client, type="ping")
        self.assertEqual([m.get("error") for m in client.take()], ["rate_limited"])

    def test_pongs_count_as_unsent(self):
        """
        A reader whose transport is full is disconnected once the pongs
        written for it pass the limit.
        """
        client = self.pinger()
        [server] = self.relay.sessions
        peer = server.peer
        peer.transport.producer.pauseProducing()
        for n in range(40):
            client.sendPing(b"x" * 125)
            self.net.flush()
            if peer.transport.disconnecting:
                break
        self.assertTrue(peer.transport.disconnecting)
        # 32 pongs of 127 bytes fit in 4096; the 33rd does not.
        self.assertEqual(n, 32)
        self.assertEqual(self.factory.slow_readers, 1)


class FragmentTests(WebSocketTestCase):
    limits = WebSocketLimits(max_fragments=64)

    def test_at_the_limit_received(self):
        """
        A message in --max-fragments frames is received whole.
        """
        client = self.client()
        text = json.dumps({"type": "register", "device_id": "d0", "pad": "x" * 20}).encode()
        client.sendMessage(text, fragmentSize=-(-len(text) // 64))
        self.net.flush()
        self.assertEqual([m["type"] for m in client.take()], ["registered"])

    def test_over_the_limit_closed_1009(self):
        """
        One frame more closes the connection with 1009.
        """
        client = self.client()
        client.sendMessage(b" " * 65, fragmentSize=1)
        self.net.flush()
        self.assertTrue(client.closed)
        self.assertEqual(client.close_code, 1009)

class SilentCloser(RecordingClientProtocol):
    """
    A client whose link died: it never answers a close.
    """

    def onCloseFrame(self, code, reasonRaw):
        return None


class ProofOfReceiptTests(WebSocketTestCase):
    """
    The adapter tells the relay what a legacy device proved it received:
    its pong to the keepalive ping, or its answer to the relay's close.
    """

    limits = WebSocketLimits(auto_ping_interval=5, auto_ping_timeout=5)

    def crew(self, protocol=RecordingClientProtocol):
        [a] = self.registered(1)
        b = self.net.connect(protocol=protocol)
        self.send(b, type="join_crew", crew_code="ALPHA", device_id="b")
        a.take()
        b.take()
        self.send(a, type="message", payload={"text": "one"})
        self.assertEqual([m["payload"]["text"] for m in b.take()], ["one"])
        return a, b

    def delivered(self):
        return self.relay.crews["ALPHA"].members["b"].delivered_seq

    def test_pong_proves(self):
        """
        The pong answering the keepalive ping proves what was sent before
        the ping.  (This pins that Autobahn's auto-ping goes through the
        public sendPing and its pong reaches onPong, which the adapter
        overrides.)
        """
        self.crew()
        self.assertEqual(self.delivered(), 0)
        self.clock.advance(5)
        self.net.flush()
        self.assertEqual(self.delivered(), 1)

    def test_no_pong_no_proof(self):
        """
        A device that answers no ping proves nothing, and is dropped.
        """
        a, b = self.crew(DeafClient)
        for _ in range(12):
            self.clock.advance(1)
            self.net.flush()
        self.assertTrue(b.closed)
        self.assertEqual(self.delivered(), 0)

    def test_ping_before_frames(self):
        """
        A pong proves only the frames sent before its ping; the next one
        proves the rest.
        """
        a, b = self.crew()
        self.clock.advance(5)  # the ping is written, not yet moved
        self.relay.receive(self.relay.devices["d0"], b'{"type":"message","payload":{"text":"two"}}')
        self.net.flush()
        self.assertEqual([m["payload"]["text"] for m in b.take()], ["two"])
        self.assertEqual(self.delivered(), 1)
        self.clock.advance(5)
        self.net.flush()
        self.assertEqual(self.delivered(), 2)

    def test_close_answered_proves(self):
        """
        A device that answers the relay's close proves everything sent
        before it.  (This pins that Autobahn calls onCloseFrame in
        STATE_CLOSING for the answer to its own close.)
        """
        a, b = self.crew()
        self.relay.devices["b"].close(4001, "test")
        self.net.flush()
        self.assertTrue(b.closed)
        self.assertEqual(self.delivered(), 1)

    def test_close_unanswered_proves_nothing(self):
        """
        A device that does not answer the relay's close proves nothing.
        """
        a, b = self.crew(SilentCloser)
        self.relay.devices["b"].close(4001, "test")
        self.net.flush()
        for _ in range(6):
            self.clock.advance(1)
            self.net.flush()
        self.assertNotIn("b", self.relay.devices)
        self.assertEqual(self.delivered(), 0)

    def test_device_close_proves_nothing(self):
        """
        A close the device starts proves nothing: it may have been sent
        before the device read what was in flight.
        """
        a, b = self.crew()
        b.sendClose(1000)
        self.net.flush()
        self.assertEqual(self.delivered(), 0)


class AutobahnPrivatesTests(WebSocketTestCase):
    """
    Pins for each private of Autobahn the adapter reaches into: each test
    fails when Autobahn changes what the adapter relies on.
    """

    def server_protocol(self):
        [session] = self.relay.sessions
        return session.peer

    def test_data_received_goes_to_autobahn_parser(self):
        """
        RelayServerProtocol.dataReceived hands every read to Autobahn's
        private _dataReceived (skipping its debug line), and that parses the
        handshake and the frames.
        """
        from autobahn.websocket.protocol import WebSocketProtocol

        reads = []
        parse = WebSocketProtocol._dataReceived

        def counted(protocol, data):
            reads.append(len(data))
            return parse(protocol, data)

        self.patch(WebSocketProtocol, "_dataReceived", counted)
        client = self.client()
        self.send(client, type="ping")
        self.assertEqual(client.take(), [{"type": "pong"}])
        self.assertGreaterEqual(len(reads), 2)

    def test_timeouts_on_the_factory_wheel(self):
        """
        Autobahn schedules each connection's timeouts (here the auto-ping)
        through the factory's private _batched_timer, which the factory
        replaces with its TimerWheel: a connection's timers are on the wheel.
        """
        wheel = self.factory._batched_timer
        before = wheel.pending()
        self.client()
        self.assertGreater(wheel.pending(), before)

    def test_handshake_leftovers_are_autobahns(self):
        """
        Every handshake attribute the adapter drops in onOpen is one
        Autobahn's path sets during the handshake (a renamed one would be
        kept alive by Autobahn under its new name), and none is held once
        open.
        """
        from leeloo.websocket import _HANDSHAKE_LEFTOVERS, RelayServerProtocol

        self.patch(RelayServerProtocol, "_plain_handshake", lambda protocol: False)
        seen = {}
        on_open = RelayServerProtocol.onOpen

        def recording(protocol):
            seen.update({name: getattr(protocol, name, KeyError) for name in _HANDSHAKE_LEFTOVERS})
            return on_open(protocol)

        self.patch(RelayServerProtocol, "onOpen", recording)
        self.client()
        self.assertEqual(set(seen), set(_HANDSHAKE_LEFTOVERS))
        self.assertEqual([name for name, value in seen.items() if value is KeyError or value is None], [])
        protocol = self.server_protocol()
        self.assertEqual({name: getattr(protocol, name) for name in _HANDSHAKE_LEFTOVERS},
                         dict.fromkeys(_HANDSHAKE_LEFTOVERS))


class AutobahnColourTests(SynchronousTestCase):
    """
    Pins leeloo.websocket's reach into autobahn.util: the flag that turns
    the colours of Autobahn's debug lines off.
    """

    def test_debug_names_uncoloured(self):
        import autobahn.util

        self.assertIn("_HAS_CLICK", vars(autobahn.util))
        self.assertFalse(autobahn.util._HAS_CLICK)
        self.assertEqual(autobahn.util.hl("text", bold=True), "text")
        import autobahn.twisted.websocket
        import autobahn.websocket.protocol

        for module in (autobahn.websocket.protocol, autobahn.twisted.websocket):
            self.assertIn("hltype", vars(module))
            self.assertEqual(module.hltype(RelayServerProtocol.onOpen), "<RelayServerProtocol.onOpen>")


class CompactTests(WebSocketTestCase):
    """
    An idle connection's protocol holds only what is its own: the
    attributes Autobahn sets to their idle values are left to the class
    once the first message is handled, and its send queue is a list.
    These pin the names of Autobahn's attributes that leeloo.websocket
    relies on.
    """

    def server(self, client):
        return self.net.pumps[-1].serverIO.protocol

    def test_autobahn_sets_every_name(self):
        """
        Every attribute left to the class is one Autobahn sets on a
        connection (a name it renames fails here), to its idle value once
        a device has registered (in a message its frame parser takes); so
        do the masker, transport description
        and send queue the relay replaces.
        """
        from leeloo.websocket import _BETWEEN_MESSAGES, _HANDSHAKE_LEFTOVERS, _IDLE_DEFAULTS

        from autobahn.websocket.protocol import WebSocketServerProtocol

        # Autobahn's own connectionMade, handshake and open (the relay's
        # set fewer: ConnectionMadeTests, PlainHandshakeTests; Autobahn's
        # open reads the transport description, which makes it).
        from autobahn.twisted.websocket import WebSocketAdapterProtocol

        self.patch(RelayServerProtocol, "_connectionMade", WebSocketServerProtocol._connectionMade)
        self.patch(RelayServerProtocol, "_plain_handshake", lambda protocol: False)
        self.patch(RelayServerProtocol, "_onOpen", WebSocketAdapterProtocol._onOpen)
        client = self.client()
        server = self.server(client)
        before = {}
        compact = server._compact

        def recording():
            before.update(vars(server))
            compact()

        server._compact = recording
        # In several frames: Autobahn's own parser takes it (a whole
        # message in one frame skips it, WholeMessageTests) and sets all.
        client.sendMessage(json.dumps({"type": "register", "device_id": "d0", "crew_code": "ALPHA"}).encode(),
                           fragmentSize=7)
        self.net.flush()
        # (Those of the handshake are gone once open: AutobahnPrivatesTests.)
        for name in [*_IDLE_DEFAULTS, *_BETWEEN_MESSAGES, "_transport_details", "_valid_events", "_results"]:
            if name not in _HANDSHAKE_LEFTOVERS:
                self.assertIn(name, before, name)
        for name in _BETWEEN_MESSAGES:
            self.assertNotIn(name, vars(server), name)
        after = vars(server)
        for name, idle in _IDLE_DEFAULTS.items():
            self.assertNotIn(name, after, name)
            self.assertEqual(getattr(server, name), idle, name)
        self.assertLess(len(after), len(before) // 2)
        self.assertIsNone(server.current_frame_masker)

    def test_works_after_compacting(self):
        """
        A compacted connection goes on as any: messages both ways, pings
        (Autobahn's own, answered), a message in several frames, and a
        clean close with its code.
        """
        a, b = self.registered(2)
        server = self.server(b)
        self.assertNotIn("wasClean", vars(server))
        self.send(a, type="message", msg_type="text", payload={"text": "hi"})
        [relayed] = b.take()
        self.assertEqual((relayed["type"], relayed["payload"]), ("message", {"text": "hi"}))
        server.sendPing(b"mark")
        self.net.flush()
        self.assertIsNone(server.autoPingPending)
        b.sendMessage(json.dumps({"type": "ping"}).encode(), fragmentSize=3)
        self.net.flush()
        self.assertEqual(b.take(), [{"type": "pong"}])
        b.sendClose(1000)
        self.net.flush()
        self.assertTrue(server.wasClean)
        self.assertEqual(server.remoteCloseCode, 1000)
        self.assertEqual(self.relay.stats().sessions, 1)


def _frame(payload: bytes, opcode: int = 1, fin: bool = True, masked: bool = True, rsv: int = 0,
           long_length: bool = False) -> bytes:
    """
    One client-to-server frame as a device sends it (masked), or broken as
    asked.
    """
    head = bytes([(0x80 if fin else 0) | rsv << 4 | opcode])
    n = len(payload)
    bit = 0x80 if masked else 0
    if n < 126 and not long_length:
        head += bytes([bit | n])
    elif n < 65536:
        head += bytes([bit | 126]) + n.to_bytes(2, "big")
    else:
        head += bytes([bit | 127]) + n.to_bytes(8, "big")
    if not masked:
        return head + payload
    mask = b"\x5a\x13\xc4\x07"
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


class WholeMessageTests(WebSocketTestCase):
    """
    A whole message in one masked frame (what devices send) reaches the
    relay without Autobahn's frame parser; everything else still goes
    through it, in order, with its errors.  These pin the Autobahn state
    the short path reads and sets.
    """

    limits = WebSocketLimits(max_message_size=300)

    def setUp(self):
        super().setUp()
        from autobahn.websocket.protocol import WebSocketProtocol

        self.parsed = []
        parse = WebSocketProtocol.processData

        def counted(protocol):
            if isinstance(protocol, RelayServerProtocol):
                self.parsed.append(protocol)
            return parse(protocol)

        self.patch(WebSocketProtocol, "processData", counted)

    def test_single_frame_messages_skip_autobahns_parser(self):
        """
        Single-frame text and binary messages, several in one read, are
        handled in order without Autobahn's parser.
        """
        [client] = self.registered(1)
        server = self.net.pumps[-1].serverIO.protocol
        del self.parsed[:]
        server.dataReceived(_frame(b'{"type": "ping"}') + _frame(b'{"type": "crews"}') + _frame(b"\x00", 2))
        self.net.flush()
        self.assertEqual([m["type"] for m in client.take()], ["pong", "crews", "error"])
        self.assertEqual(self.parsed, [])

    def test_a_message_restarts_the_ping_timeout(self):
        """
        A message is proof of life, as Autobahn counts any data frame: it
        ends the wait for the pong of the last auto-ping.
        """
        [client] = self.registered(1)
        server = self.net.pumps[-1].serverIO.protocol
        self.assertTrue(server.autoPingRestartOnAnyTraffic)
        server._sendAutoPing()
        self.assertIsNotNone(server.autoPingTimeoutCall)
        server.dataReceived(_frame(b'{"type": "ping"}'))
        self.assertIsNone(server.autoPingTimeoutCall)
        self.assertEqual(self.parsed, [])

    def test_other_frames_go_to_autobahn_in_order(self):
        """
        A control frame, a fragmented message and a frame split across
        reads go through Autobahn's parser, and nothing overtakes them.
        """
        [client] = self.registered(1)
        server = self.net.pumps[-1].serverIO.protocol
        crews = _frame(b'{"type": "crews"}')
        server.dataReceived(_frame(b'{"type": "ping"}') + _frame(b"mark", 9) + crews
                            + _frame(b'{"type": ', fin=False) + _frame(b'"ping"}', 0) + crews[:5])
        self.assertNotEqual(self.parsed, [])
        server.dataReceived(crews[5:] + _frame(b'{"type": "ping"}'))
        self.net.flush()
        self.assertEqual([m["type"] for m in client.take()], ["pong", "crews", "pong", "crews", "pong"])

    def test_autobahns_errors_stand(self):
        """
        What a device must not send is failed as Autobahn fails it: invalid
        UTF-8 (1007), an unmasked frame, set reserved bits or a length not
        minimally encoded (1002), a message over the size limit (1009).
        """
        cases = [
            (_frame(b'{"type": "\xff"}'), 1007),
            (_frame(b'{"type": "ping"}', masked=False), 1002),
            (_frame(b'{"type": "ping"}', rsv=4), 1002),
            (_frame(b'{"type": "ping"}', long_length=True), 1002),
            (_frame(b"x" * 301), 1009),
        ]
        for data, code in cases:
            client = self.client()
            server = self.net.pumps[-1].serverIO.protocol
            server.dataReceived(_frame(b'{"type": "ping"}') + data + _frame(b'{"type": "ping"}'))
            self.net.flush()
            self.assertEqual((client.take(), client.close_code), ([{"type": "pong"}], code), data[:12])

    def test_same_as_autobahns_parser(self):
        """
        For any frames, cut into reads anywhere, the relay hears the same
        messages, and ends in the same state, as with Autobahn's parser
        alone.
        """
        from hypothesis import given, settings
        from hypothesis import strategies as st

        payloads = st.binary(max_size=310) | st.text(max_size=120).map(lambda t: t.encode("utf-8"))
        frames = st.one_of(
            payloads.map(_frame),
            payloads.map(lambda p: _frame(p, 2)),
            st.binary(max_size=125).map(lambda p: _frame(p, 9)),
            st.tuples(payloads, payloads).map(lambda ps: _frame(ps[0], fin=False) + _frame(ps[1], 0)),
            st.builds(_frame, payloads, st.sampled_from([0, 1, 2, 3, 8]), st.booleans(), st.booleans(),
                      st.integers(0, 7), st.booleans()),
        )

        def run(data, cuts, whole):
            # A relay of its own for each run: nothing one leaves (open
            # connections, their count against the caps) reaches the next.
            relay = Relay(self.clock)
            net = MemoryWebSocketClients(make_site(relay, RelayServerFactory(relay, self.limits), None, None,
                                                   reactor=self.clock))
            heard = []
            client = net.connect()
            self.assertTrue(client.opened)
            server = net.pumps[-1].serverIO.protocol
            if not whole:
                server._whole_messages = lambda data: data
            server.onMessage = lambda payload, binary: heard.append((payload, binary))
            start = 0
            for cut in sorted(set(cuts)) + [len(data)]:
                server.dataReceived(data[start:cut])
                start = cut
            net.flush()
            return heard, server.state, client.close_code, server.wasClean

        @settings(max_examples=int(os.environ.get("LEELOO_FRAME_EXAMPLES", 300)), deadline=None, database=None)
        @given(st.lists(frames, max_size=6).map(b"".join), st.lists(st.integers(0, 2000), max_size=4))
        def same(data, cuts):
            self.assertEqual(run(data, cuts, True), run(data, cuts, False))

        same()


class LostBeforeCloseAnsweredTests(WebSocketTestCase):
    """
    A connection that drops before answering the relay's close leaves no
    timer behind: Autobahn's connectionLost cancels its ping and opening
    timers but not the closing handshake's (the name is Autobahn's,
    pinned here).
    """

    def test_no_close_timer_left_on_the_wheel(self):
        [client] = self.registered(1)
        server = self.net.pumps[-1].serverIO.protocol
        wheel = self.factory._batched_timer
        server.close(4000, "going")
        self.assertIsNotNone(server.closeHandshakeTimeoutCall)
        # The device vanishes without reading the close.
        client.transport.abortConnection()
        self.net.flush()
        self.assertEqual(server.state, server.STATE_CLOSED)
        self.assertIsNone(server.closeHandshakeTimeoutCall)
        self.assertEqual(wheel.pending(), 0)


class MessageEndTests(WebSocketTestCase):
    """
    Pins RelayServerProtocol.onMessageEnd, Autobahn's without its "message"
    event: a message (in one frame or several) reaches the relay whole, and
    no event is fired for it (Autobahn's fire makes a Deferred each time).
    """

    def test_whole_message_no_event(self):
        a, b = self.registered(2)
        server = self.net.pumps[0].serverIO.protocol
        fired = []
        server.fire = lambda *args, **kwargs: fired.append(args)
        a.sendMessage(json.dumps({"type": "message", "msg_type": "text", "payload": {"text": "hi"}}).encode(),
                      fragmentSize=5)
        self.net.flush()
        [relayed] = b.take()
        self.assertEqual(relayed["payload"], {"text": "hi"})
        self.assertIsNone(server.message_data)
        self.assertIsNone(server._listeners)
        self.assertEqual(fired, [])


class _Transport(StringTransport):
    """
    A TCP connection's transport in memory, from 127.0.0.1:40000 to the
    relay's port, recording its Nagle setting.
    """

    PEER = IPv4Address("TCP", "127.0.0.1", 40000)

    def __init__(self):
        super().__init__(hostAddress=IPv4Address("TCP", "127.0.0.1", 8080), peerAddress=self.PEER)

    def setTcpNoDelay(self, enabled):
        self.no_delay = enabled


def _site_connection(site):
    """
    A new connection to C{site}, made: its transport, whose C{protocol} is
    whatever reads it (the HTTP channel, then the WebSocket).
    """
    transport = _Transport()
    transport.protocol = site.buildProtocol(transport.PEER)
    transport.protocol.makeConnection(transport)
    return transport


class PeerStringTests(WebSocketTestCase):
    """
    A connection's peer descriptor (Autobahn's C{peer}) is made from the
    address its HTTP channel asked the transport for once
    (leeloo.websocket.peer_string), as Autobahn's peer2str makes it.
    """

    def test_same_as_peer2str(self):
        """
        For TCP over IPv4 and IPv6 and for the addresses it leaves to
        peer2str, given the address or not, the descriptor is peer2str's.
        """
        from autobahn.twisted.util import peer2str
        from twisted.internet.address import IPv6Address, UNIXAddress

        from leeloo.websocket import peer_string

        for address in (IPv4Address("TCP", "192.0.2.7", 40000), IPv6Address("TCP", "2001:db8::1", 443),
                        IPv6Address("TCP", "::ffff:192.0.2.7", 1), UNIXAddress(b"/run/leeloo.sock"), UNIXAddress(None)):
            transport = StringTransport(peerAddress=address)
            self.assertEqual(peer_string(transport, transport.getPeer()), peer2str(transport), address)
            self.assertEqual(peer_string(transport), peer2str(transport), address)
        self.assertEqual(peer_string(None, IPv4Address("TCP", "192.0.2.7", 40000)), "tcp4:192.0.2.7:40000")

    def test_handed_over_connection_asks_once(self):
        """
        An upgrade the site hands over asks its transport for the client's
        address once: the gate, the WebSocket's descriptor and the address
        its session is counted under all come from that answer.
        """
        asked = []

        class Counting(_Transport):
            def getPeer(self):
                asked.append(1)
                return super().getPeer()

        transport = Counting()
        transport.protocol = self.site.buildProtocol(transport.PEER)
        transport.protocol.makeConnection(transport)
        transport.protocol.dataReceived(_handshake(["GET /ws HTTP/1.1", "Host: relay.example.org",
                                                    "Upgrade: websocket", "Connection: Upgrade",
                                                    f"Sec-WebSocket-Key: {_KEY}", "Sec-WebSocket-Version: 13"]))
        protocol = transport.protocol
        self.assertIsInstance(protocol, RelayServerProtocol)
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 101 "))
        self.assertEqual((protocol.peer, protocol.address), ("tcp4:127.0.0.1:40000", "127.0.0.1"))
        self.assertEqual([s.address for s in self.relay.sessions], ["127.0.0.1"])
        self.assertEqual(len(asked), 1)


_CONNECTION_MADE = RelayServerProtocol._connectionMade


class ConnectionMadeTests(WebSocketTestCase):
    """
    RelayServerProtocol._connectionMade leaves a new connection reading as
    Autobahn's own leaves it, setting only what the class does not hold
    already: this pins every attribute Autobahn's sets.
    """

    def made(self, connection_made):
        self.patch(RelayServerProtocol, "_connectionMade", connection_made)
        transport = _Transport()
        protocol = self.factory.buildProtocol(transport.PEER)
        # As twisted.web's channel, which hands the connection over.
        transport.registerProducer(object(), True)
        before = self.factory.countConnections
        protocol.makeConnection(transport)
        self.assertTrue(transport.no_delay)
        self.assertIs(transport.producer, protocol)
        return protocol, self.factory.countConnections - before

    def test_no_delay_set_once(self):
        """
        A TCP connection handed over by twisted.web's channel has
        TCP_NODELAY set once, by the channel; one made directly has it set
        by the WebSocket, as Autobahn's connectionMade does.
        """
        from twisted.internet.interfaces import ITCPTransport
        from zope.interface import directlyProvides

        site = self.site
        calls = []
        transport = _Transport()
        directlyProvides(transport, ITCPTransport)
        transport.setTcpNoDelay = calls.append
        transport.protocol = site.buildProtocol(transport.PEER)
        transport.protocol.makeConnection(transport)
        transport.protocol.dataReceived(_handshake(LazyFutureTests.DEVICE))
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 101 "))
        self.assertIsInstance(transport.protocol, RelayServerProtocol)
        self.assertEqual(calls, [True])
        ours, _ = self.made(_CONNECTION_MADE)
        self.assertTrue(ours.transport.no_delay)

    def test_transport_described_when_asked(self):
        """
        Autobahn's connectionMade describes the transport for every
        connection (create_transport_details: the process and thread ids,
        the TLS state) and takes the peer from it; the relay's takes the
        same peer and holds no description until one is asked for, then
        the one Autobahn's would have made, once.  Without a transport
        there is none, as Autobahn's placeholder holds none.
        """
        from autobahn.twisted.websocket import WebSocketAdapterProtocol

        ours, _ = self.made(_CONNECTION_MADE)
        self.assertNotIn("_transport_details", vars(ours))
        theirs = self.factory.buildProtocol(_Transport.PEER)
        theirs.transport = _Transport()
        self.patch(RelayServerProtocol, "_connectionMade", lambda self: None)
        WebSocketAdapterProtocol.connectionMade(theirs)
        self.assertEqual(ours.peer, theirs.peer)
        self.assertEqual(ours.transport_details.marshal(), theirs._transport_details.marshal())
        self.assertIs(ours.transport_details, ours.transport_details)
        self.assertIsNone(RelayServerProtocol().transport_details)

    def test_tls_described_as_autobahns_open_leaves_it(self):
        """
        Autobahn's _onOpen sets the TLS channel id and peer certificate on
        a description made while connecting, now that TLS is up; the
        relay's leaves a description not made yet to be made when asked
        for, and then it holds the same.
        """
        import autobahn.twisted.util as util
        import autobahn.twisted.websocket as adapter
        from twisted.internet.interfaces import ISSLTransport
        from zope.interface import directlyProvides

        up = []
        for module in (util, adapter):
            self.patch(module, "transport_channel_id", lambda transport, is_server, kind: b"unique" if up else None)
            self.patch(module, "extract_peer_certificate", lambda transport: "certificate" if up else None)

        def opened(asked_before):
            transport = _Transport()
            directlyProvides(transport, ISSLTransport)
            transport.registerProducer(object(), True)
            protocol = self.factory.buildProtocol(transport.PEER)
            protocol.makeConnection(transport)
            if asked_before:
                self.assertIsNone(protocol.transport_details.channel_id["tls-unique"])
            opens = []
            protocol.onOpen = lambda: opens.append(True)
            up.append(True)
            protocol._onOpen()
            details = protocol.transport_details
            up.clear()
            self.assertEqual(opens, [True])
            return details

        early, late = opened(True), opened(False)
        self.assertEqual((early.channel_id, early.peer_cert), ({"tls-unique": b"unique"}, "certificate"))
        self.assertEqual(late.marshal(), early.marshal())

    def test_reads_as_autobahns(self):
        from collections import deque

        from autobahn.websocket.protocol import WebSocketServerProtocol
        from twisted.internet.defer import Deferred

        from leeloo.timers import WheelCall
        from leeloo.websocket import _SendQueue

        ours, counted = self.made(_CONNECTION_MADE)
        theirs, their_count = self.made(WebSocketServerProtocol._connectionMade)
        self.assertEqual((counted, their_count), (1, 1))
        self.assertEqual(ours.peer, "tcp4:127.0.0.1:40000")
        names = set(vars(theirs))
        self.assertIn("utf8validator", names)
        for name in sorted(names):
            mine, autobahns = getattr(ours, name), getattr(theirs, name)
            if name == "transport":
                continue
            if isinstance(autobahns, deque):
                # The relay's send queue: a list with deque's popleft.
                self.assertEqual((type(mine), list(mine)), (_SendQueue, []), name)
            elif isinstance(autobahns, (Deferred, WheelCall, type(theirs.utf8validator), type(theirs.trafficStats),
                                        type(theirs._transport_details))):
                self.assertIs(type(mine), type(autobahns), name)
                if name == "trafficStats":
                    self.assertEqual(vars(mine), vars(autobahns))
            else:
                self.assertEqual(mine, autobahns, name)
        # The UTF-8 validator is made when first asked for, once.
        self.assertIs(ours.utf8validator, ours.utf8validator)
        fresh, _ = self.made(_CONNECTION_MADE)
        self.assertNotIn("utf8validator", vars(fresh))
        self.assertLess(len(vars(fresh)), len(vars(theirs)) // 2)


class OpenHandshakeTimerTests(WebSocketTestCase):
    """
    A connection the HTTP channel hands over (RelayServerProtocol.take_over)
    gets Autobahn's opening handshake timeout only if its first bytes did
    not open it, from the same moment.
    """

    limits = WebSocketLimits(open_handshake_timeout=3)

    def connect(self, data):
        from leeloo.web import HTTPLimits

        # The site's own request deadline well after Autobahn's timeout.
        transport = _site_connection(make_site(self.relay, self.factory, None, None, reactor=self.clock,
                                               limits=HTTPLimits(request_timeout=60)))
        transport.protocol.dataReceived(data)
        return transport

    def test_whole_handshake_sets_no_timer(self):
        wheel = self.factory._batched_timer
        calls = []
        self.patch(wheel, "call_later", lambda delay, f, *a, **k: calls.append(delay) or
                   TimerWheel.call_later(wheel, delay, f, *a, **k))
        transport = self.connect(_handshake(PlainHandshakeTests.DEVICE))
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 101 "))
        # The auto-ping's alone.
        self.assertEqual(calls, [self.limits.auto_ping_interval])
        self.assertIsNone(transport.protocol.openHandshakeTimeoutCall)

    def test_partial_handshake_times_out(self):
        data = _handshake(PlainHandshakeTests.DEVICE)
        transport = self.connect(data[:40])
        protocol = transport.protocol
        self.assertIsInstance(protocol, RelayServerProtocol)
        self.clock.advance(2.9)
        self.assertFalse(transport.disconnecting)
        self.clock.advance(0.35)
        self.assertTrue(protocol.wasOpenHandshakeTimeout)
        self.assertTrue(transport.disconnecting)
        self.assertEqual(transport.value(), b"")


_KEY = "dGhlIHNhbXBsZSBub25jZQ=="
_PLAIN_HANDSHAKE = RelayServerProtocol._plain_handshake


def _handshake(lines, frames=b""):
    """
    An opening handshake of the given request line and header lines, and
    C{frames} after it.
    """
    return "".join(line + "\r\n" for line in lines).encode("iso-8859-1") + b"\r\n" + frames


class DeviceHeadTests(SynchronousTestCase):
    """
    The handshake's short path parses a device's request head with one
    regular expression (leeloo.websocket.device_head): where it gives an
    answer it is parseHttpHeader's (Autobahn's strict parser, which it
    stands in for), and every head parseHttpHeader refuses it leaves to
    parseHttpHeader.
    """

    DEVICE = ["GET /ws HTTP/1.1", "Host: relay.example.org", "Upgrade: websocket", "Connection: Upgrade",
              "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==", "Sec-WebSocket-Version: 13"]

    def autobahn(self, head):
        from autobahn.websocket.protocol import parseHttpHeader

        try:
            return parseHttpHeader(head)
        except ValueError:
            return None

    def test_devices_head_parsed(self):
        """
        A device's head, its values with or without spaces and tabs around
        them, is parsed here, as parseHttpHeader parses it.
        """
        from leeloo.websocket import device_head

        for lines in (self.DEVICE, [self.DEVICE[0], "Host:relay.example.org", "Upgrade: \twebsocket \t",
                                    *self.DEVICE[3:], "X-Empty:", "User-Agent: Python/3.11 websockets/10.4"]):
            head = _handshake(lines)
            parsed = device_head(head)
            self.assertIsNotNone(parsed, lines)
            status, headers, counts = self.autobahn(head)
            self.assertEqual(parsed, (status, headers))
            self.assertEqual(set(counts.values()), {1})
        self.assertEqual(device_head(_handshake(self.DEVICE))[1]["upgrade"], "websocket")

    def test_others_left_to_autobahn(self):
        """
        A duplicated header, another method, a bare LF or CR, a folded
        line, a control character, a space before the colon: none is parsed
        here.
        """
        from leeloo.websocket import device_head

        for lines in ([*self.DEVICE, "Host: other"], ["POST /ws HTTP/1.1", *self.DEVICE[1:]],
                      [*self.DEVICE[:2], "X: a\nb"], [*self.DEVICE[:2], "X: a\rb"], [*self.DEVICE, " folded"],
                      [*self.DEVICE, "X: \x00"], [*self.DEVICE, "X : y"], ["GET /ws HTTP/1.1 ", *self.DEVICE[1:]],
                      ["GET /w\x7fs HTTP/1.1", *self.DEVICE[1:]], [*self.DEVICE, "no colon"]):
            self.assertIsNone(device_head(_handshake(lines)), lines)

    def test_same_as_parse_http_header(self):
        """
        For any head made of header-like lines (names, values and line ends
        drawn from the characters that matter to the parsers), whatever
        device_head gives, parseHttpHeader gives too, with each header
        once; and a long run of spaces in a value parses alike.
        """
        from hypothesis import example, given, settings
        from hypothesis import strategies as st

        from leeloo.websocket import device_head

        # Mostly what parses, so that many heads do; the rest each part of
        # a line can break it with.
        chars = st.sampled_from(list("aZ09-_:!~ \t/,;=\x80\xa0\xff") * 5 + list("\r\n\x00\x1f\x7f\x85"))
        names = st.sampled_from(["Host", "host", "Upgrade", "X-Y", "x", "Sec-WebSocket-Key", "A1", "B2", "c3", "d4",
                                 "a b", "", "Ä", " x"])
        lines = st.one_of(st.tuples(names, st.text(chars, max_size=8)).map(lambda nv: f"{nv[0]}:{nv[1]}"),
                          st.text(chars, max_size=8))
        starts = st.sampled_from(["GET /ws HTTP/1.1", "GET /ws HTTP/1.1", "GET /\xa0 HTTP/1.1", "GET /ws HTTP/1.0",
                                  "GET  /ws HTTP/1.1", "GET /ws\tHTTP/1.1", " GET /ws HTTP/1.1", "get /ws HTTP/1.1"])
        ends = st.sampled_from(["\r\n", "\r\n", "\r\n", " \r\n", "\n", "\r"])

        @settings(max_examples=int(os.environ.get("LEELOO_FRAME_EXAMPLES", 300)) * 3, deadline=None, database=None)
        @given(starts, st.lists(st.tuples(lines, ends), max_size=6))
        @example("GET /ws HTTP/1.1", [("Host: h", "\r\n"), ("X-Y:\t a ", "\r\n")])
        def same(start, body):
            head = (start + "\r\n" + "".join(line + end for line, end in body) + "\r\n").encode("iso-8859-1")
            parsed = device_head(head)
            if parsed is not None:
                seen.add(len(parsed[1]))
                status, headers, counts = self.autobahn(head)
                self.assertEqual(parsed, (status, headers))
                self.assertEqual(set(counts.values()) | {1}, {1})

        seen = set()
        same()
        # Heads with several headers were parsed here, and compared.
        self.assertTrue(seen - {0, 1})
        head = _handshake([*self.DEVICE, "X: " + " " * 5000 + "x" + "\t " * 2000])
        self.assertEqual(device_head(head), self.autobahn(head)[:2])


class PlainHandshakeTests(WebSocketTestCase):
    """
    An opening handshake as devices send it is answered without Autobahn's
    processHandshake (RelayServerProtocol._plain_handshake); any other
    takes Autobahn's path.  For any request both paths answer the same
    bytes and leave the connection, the relay and the log the same: these
    pin the Autobahn state the short path reads and sets.
    """

    DEVICE = ["GET /ws HTTP/1.1", "Host: relay.example.org", "Upgrade: websocket", "Connection: Upgrade",
              f"Sec-WebSocket-Key: {_KEY}", "Sec-WebSocket-Version: 13",
              "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits",
              "User-Agent: Python/3.11 websockets/10.4"]

    def run_handshake(self, data, cuts=(), plain=True, full=False, cluster=None, external_port=None):
        """
        Feed C{data} to a new connection of a relay of its own (cut into
        reads at C{cuts}), by the short path or (C{plain} false) Autobahn's
        alone; return what it answered and what it left.
        """
        relay = Relay(self.clock)
        proxies = TrustedProxies(["127.0.0.0/8"]) if cluster is not None else TrustedProxies()
        factory = RelayServerFactory(relay, WebSocketLimits(max_connections_per_address=1), proxies)
        factory.shared = cluster
        factory.externalPort = external_port
        site = make_site(relay, factory, None, None, reactor=self.clock)
        if full:
            factory.admit("127.0.0.1")
        taken = []
        if plain:
            def recording(protocol):
                taken.append(_PLAIN_HANDSHAKE(protocol))
                return taken[-1]

            self.patch(RelayServerProtocol, "_plain_handshake", recording)
        else:
            self.patch(RelayServerProtocol, "_plain_handshake", lambda protocol: False)
        events = []
        observer = events.append
        globalLogPublisher.addObserver(observer)
        try:
            transport = _site_connection(site)
            start = 0
            for cut in sorted(set(c for c in cuts if c < len(data))) + [len(data)]:
                transport.protocol.dataReceived(data[start:cut])
                start = cut
            if cluster is not None:
                cluster.answer()
        finally:
            globalLogPublisher.removeObserver(observer)
        self.patch(RelayServerProtocol, "_plain_handshake", _PLAIN_HANDSHAKE)
        protocol = transport.protocol
        state = {}
        if isinstance(protocol, RelayServerProtocol):
            from leeloo.websocket import _HANDSHAKE_LEFTOVERS

            missing = object()
            for name, value in vars(protocol).items():
                if name in ("is_open", "is_closed", "_was_opened"):
                    # Made when first asked for (LazyFutureTests): as they read, below.
                    continue
                if name in _HANDSHAKE_LEFTOVERS:
                    # Autobahn's description of the request: only its path
                    # keeps it, on a connection refused before onOpen.
                    continue
                default = getattr(type(protocol), name, missing)
                if value is default or (type(value) is type(default) and value == default):
                    # Reads the same as the class's value.
                    continue
                if value is None or isinstance(value, (bool, int, float, str, bytes)):
                    state[name] = value
                else:
                    state[name] = type(value).__name__
            state["trafficStats"] = str(protocol.trafficStats)
            state["is_open"] = protocol.is_open.called
            state["is_closed"] = protocol.is_closed.called
        sessions = [(s.address, s.device_id) for s in relay.sessions]
        logged = [formatEvent(e) for e in events if e.get("log_level", LogLevel.debug) > LogLevel.debug]
        # (Device keys are random, the same length each time; twisted.web's
        # answers are dated.)
        answer = re.sub(rb'"device_key":"[^"]*"', b'"device_key":"K"', transport.value())
        answer = re.sub(rb"\r\nDate: [^\r]*", b"\r\nDate: D", answer)
        outcome = (answer, transport.disconnecting, state, sessions, factory.caps.total,
                   dict(factory.refused), logged)
        return outcome, taken

    def register(self):
        return _frame(json.dumps({"type": "register", "device_id": "d0", "crew_code": "ALPHA",
                                  "device_name": "D0"}).encode())

    def test_device_handshake_short_path(self):
        """
        What devices send (with the websockets library's compression
        offer) takes the short path; it is answered 101 with Autobahn's
        headers and accept key, and the register after it in the same read
        is handled.
        """
        data = _handshake(self.DEVICE, self.register())
        (answer, dropped, state, sessions, *_), taken = self.run_handshake(data)
        self.assertEqual(taken, [True])
        self.assertTrue(answer.startswith(b"HTTP/1.1 101 Switching Protocols\r\nServer: AutobahnPython/"))
        self.assertIn(b"\r\nUpgrade: WebSocket\r\nConnection: Upgrade\r\n"
                      b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n", answer)
        self.assertIn(b'"registered"', answer)
        self.assertNotIn(b"Sec-WebSocket-Extensions", answer)
        self.assertFalse(dropped)
        self.assertEqual(sessions, [("127.0.0.1", "d0")])
        self.assertEqual(state["state"], RelayServerProtocol.STATE_OPEN)
        self.assertEqual(self.run_handshake(data, plain=False)[0], self.run_handshake(data)[0])

    def test_options_the_short_path_assumes(self):
        """
        The short path leaves out two of Autobahn's checks the factory's
        options make pass: it speaks version 13 alone, and caps
        connections itself (Autobahn's maxConnections off).
        """
        protocol = self.factory.protocol
        self.assertEqual((protocol.versions, protocol.maxConnections, protocol.trustXForwardedFor), ([13], 0, 0))

    def test_others_take_autobahns_path(self):
        """
        A browser's (with Origin), a subprotocol, a query, an offer the
        relay could not refuse, a duplicated header, a bad key: each takes
        Autobahn's path, untouched by the short one.
        """
        cases = [
            self.DEVICE + ["Origin: http://relay.example.org"],
            self.DEVICE + ["Sec-WebSocket-Protocol: chat"],
            ["GET /ws?x=1 HTTP/1.1"] + self.DEVICE[1:],
            self.DEVICE[:6] + ["Sec-WebSocket-Extensions: permessage-deflate; server_max_window_bits=7"],
            self.DEVICE + ["Host: other.example.org"],
            self.DEVICE[:4] + ["Sec-WebSocket-Key: short==", "Sec-WebSocket-Version: 13"],
            self.DEVICE[:5] + ["Sec-WebSocket-Version: 8"],
        ]
        for lines in cases:
            data = _handshake(lines, self.register())
            outcome, taken = self.run_handshake(data)
            self.assertEqual(taken, [False], lines)
            self.assertEqual(outcome, self.run_handshake(data, plain=False)[0], lines)
        # A port in Host, with a public port set for Autobahn to check it
        # against (the relay sets none).
        data = _handshake(["GET /ws HTTP/1.1", "Host: relay.example.org:8080", *self.DEVICE[2:]])
        outcome, taken = self.run_handshake(data, external_port=443)
        self.assertEqual(taken, [False])
        self.assertTrue(outcome[0].startswith(b"HTTP/1.1 400 "))
        self.assertEqual(outcome, self.run_handshake(data, plain=False, external_port=443)[0])

    def test_refusal_same_as_autobahns(self):
        """
        A device over its address's cap is refused by the short path (503)
        as by Autobahn's, with the same warning and counts.
        """
        data = _handshake(self.DEVICE, self.register())
        outcome, taken = self.run_handshake(data, full=True)
        self.assertEqual(taken, [True])
        self.assertTrue(outcome[0].startswith(b"HTTP/1.1 503 "))
        self.assertTrue(outcome[1])
        self.assertEqual(outcome[3], [])
        self.assertEqual(outcome, self.run_handshake(data, plain=False, full=True)[0])

    def test_bug_in_on_connect_same_as_autobahns(self):
        """
        A bug while the relay admits a connection (onConnect raises) is
        answered 500 and logged as Autobahn's path does, and the relay
        holds nothing for it.
        """
        def broken(address):
            raise ZeroDivisionError("a bug")

        self.patch(RelayServerFactory, "admit", lambda factory, address: broken(address))
        data = _handshake(self.DEVICE, self.register())
        outcome, taken = self.run_handshake(data)
        self.assertEqual(taken, [True])
        self.assertTrue(outcome[0].startswith(b"HTTP/1.1 500 "))
        self.assertIn("Unexpected exception in onConnect ['a bug']", outcome[-1])
        self.assertEqual((outcome[3], outcome[4]), ([], 0))

        def without_stacks(outcome):
            # The traceback's last line, the exception: the calls to it
            # differ by path.
            return (*outcome[:-1], [line.splitlines()[-1] for line in outcome[-1]])

        self.assertEqual(without_stacks(outcome), without_stacks(self.run_handshake(data, plain=False)[0]))

    def test_cluster_verdict_same_as_autobahns(self):
        """
        A forwarded client the cluster counts (onConnect's Deferred) opens,
        or is refused, after the verdict as on Autobahn's path.
        """
        from twisted.internet.defer import Deferred

        class Cluster:
            def __init__(self, refused):
                self.refused = refused
                self.verdicts = []

            def admit(self, address, cap):
                self.verdicts.append(Deferred())
                return Ticket(), self.verdicts[-1]

            def answer(self):
                for verdict in self.verdicts:
                    verdict.callback(self.refused)

        class Ticket:
            def release(self):
                pass

        data = _handshake(self.DEVICE + ["X-Forwarded-For: 203.0.113.9"], self.register())
        for refused, status in [(None, b"101"), (("too_many", 1.0), b"503")]:
            outcome, taken = self.run_handshake(data, cluster=Cluster(refused))
            self.assertEqual(taken, [True])
            self.assertEqual(outcome[0][9:12], status)
            self.assertEqual(outcome, self.run_handshake(data, plain=False, cluster=Cluster(refused))[0])

    def test_same_as_autobahns(self):
        """
        For any request (each part of a device's handshake varied, broken,
        duplicated or left out), cut into reads anywhere, with a frame
        after it, the short path answers and leaves everything as
        Autobahn's alone does.
        """
        from hypothesis import example, given, settings
        from hypothesis import strategies as st

        def header(names, values):
            return st.tuples(st.sampled_from(names), st.sampled_from(values)).map(lambda nv: f"{nv[0]}: {nv[1]}")

        request_lines = st.sampled_from([
            "GET /ws HTTP/1.1", "GET /ws HTTP/1.1", "GET /ws/x HTTP/1.1", "GET /ws?a=b HTTP/1.1",
            "GET /ws#f HTTP/1.1", "GET /ws;p HTTP/1.1", "GET //ws HTTP/1.1", "GET /ws HTTP/1.0",
            "get /ws HTTP/1.1", "POST /ws HTTP/1.1", "GET /ws  HTTP/1.1", "GET /ws HTTP/1.1 x",
            "GET http://h/ws HTTP/1.1",
        ])
        headers = st.one_of(
            header(["Host", "host", "HOST"], ["relay.example.org", "127.0.0.1:8080", "h:port", "[::1]", "[::1]:80",
                                              "h:+80", ""]),
            header(["Upgrade", "upgrade"], ["websocket", "WebSocket", "h2c, websocket", "foo", ""]),
            header(["Connection"], ["Upgrade", "upgrade", "keep-alive, Upgrade", "close"]),
            header(["Sec-WebSocket-Key"], [_KEY, _KEY[:-2] + "=x", "AAAAAAAAAAAAAAAAAAAAA$==", "short=="]),
            header(["Sec-WebSocket-Version", "sec-websocket-version"], ["13", "8", "12", "x", "013"]),
            header(["Sec-WebSocket-Extensions"], [
                "permessage-deflate; client_max_window_bits", "permessage-deflate",
                "permessage-deflate; server_max_window_bits=7", "permessage-deflate; foo=1",
                "x-webkit-deflate-frame", "permessage-bzip2", ""]),
            header(["Origin"], ["http://relay.example.org", "null", "not a url"]),
            header(["Sec-WebSocket-Protocol"], ["chat", "chat, chat"]),
            header(["X-Forwarded-For"], ["203.0.113.9"]),
            header(["User-Agent", "X-Other"], ["a", ""]),
            st.sampled_from(["no colon", " Host: folded"]),
        )
        device = st.lists(st.sampled_from(self.DEVICE[1:6]), unique=True, min_size=3).flatmap(st.permutations)
        frames = st.sampled_from([b"", self.register(), _frame(b'{"type": "ping"}') + b"\r\n\r\n"])

        @settings(max_examples=int(os.environ.get("LEELOO_FRAME_EXAMPLES", 300)), deadline=None, database=None)
        @given(request_lines, device, st.lists(headers, max_size=3), frames, st.lists(st.integers(0, 400), max_size=3),
               st.booleans())
        # A device's whole handshake, opened and refused, every time.
        @example("GET /ws HTTP/1.1", self.DEVICE[1:6], [], b"", [], False)
        @example("GET /ws HTTP/1.1", self.DEVICE[1:6], [], b"", [], True)
        @example("GET /ws HTTP/1.1", [*self.DEVICE[1:4], "Sec-WebSocket-Version: 13"],
                 ["Sec-WebSocket-Key: short=="], b"", [], False)
        def same(line, device, others, after, cuts, full):
            data = _handshake([line, *device, *others], after)
            plain, taken = self.run_handshake(data, cuts, full=full)
            self.assertEqual(plain, self.run_handshake(data, cuts, plain=False, full=full)[0])
            seen.add((True in taken, plain[0][9:12]))

        seen = set()
        same()
        # Both paths were compared, the short one opening and refusing.
        self.assertLessEqual({(True, b"101"), (True, b"503"), (False, b"400")}, seen)


class LazyFutureTests(WebSocketTestCase):
    """
    A connection makes Autobahn's C{is_open} and C{is_closed} futures when
    they are first asked for (RelayServerProtocol.__init__, _LazyFuture),
    not every connection in its __init__, and they fire as Autobahn's do.
    These pin what Autobahn's WebSocketProtocol.__init__ sets.
    """

    DEVICE = ["GET /ws HTTP/1.1", "Host: relay.example.org", "Upgrade: websocket", "Connection: Upgrade",
              f"Sec-WebSocket-Key: {_KEY}", "Sec-WebSocket-Version: 13"]

    def test_autobahns_init(self):
        """
        Autobahn's __init__ sets its two futures, its events and a
        placeholder transport description; the relay's sets the same but
        the futures and the placeholder (the class's None), alike.
        """
        from autobahn.twisted.websocket import WebSocketServerProtocol

        theirs, ours = WebSocketServerProtocol(), RelayServerProtocol()
        self.assertEqual(set(vars(theirs)), {"is_open", "is_closed", "_valid_events", "_results",
                                             "_transport_details"})
        self.assertEqual(vars(ours), {name: getattr(theirs, name) for name in ("_valid_events", "_results")})
        self.assertIsNone(ours.transport_details)
        self.assertEqual((type(ours.is_open), ours.is_open.called), (type(theirs.is_open), False))
        self.assertIs(ours.is_open, ours.is_open)
        self.assertIsNot(ours.is_closed, RelayServerProtocol().is_closed)

    def opened(self, cut):
        """
        A connection opened by a device's handshake read in two parts (the
        first C{cut} bytes, then the rest), its WebSocket protocol, and
        whether C{is_open} had fired when asked for after the first part.
        """
        data = _handshake(self.DEVICE)
        transport = _site_connection(self.site)
        transport.protocol.dataReceived(data[:cut])
        early = transport.protocol
        fired_early = None
        if cut < len(data) and isinstance(early, RelayServerProtocol):
            fired_early = early.is_open.called
        transport.protocol.dataReceived(data[cut:])
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 101 "))
        return transport.protocol, fired_early

    def test_opened_without_transport_details(self):
        """
        A device's connection, opened, holds no description of its
        transport (RelayServerProtocol._onOpen does not ask for one);
        asked for, it describes the connection's peer.
        """
        protocol, _ = self.opened(len(_handshake(self.DEVICE)))
        self.assertNotIn("_transport_details", vars(protocol))
        self.assertIsNotNone(protocol.session)
        self.assertEqual(protocol.transport_details.peer, protocol.peer)

    def test_opened_without_them(self):
        """
        A device's connection, opened, holds neither future; asked for,
        C{is_open} has fired and C{is_closed} has not.
        """
        protocol, _ = self.opened(len(_handshake(self.DEVICE)))
        self.assertNotIn("is_open", vars(protocol))
        self.assertNotIn("is_closed", vars(protocol))
        self.assertEqual((protocol.is_open.called, protocol.is_closed.called), (True, False))

    def test_asked_for_before_open(self):
        """
        C{is_open} asked for while the handshake is still being read fires
        when it opens, as Autobahn's.
        """
        protocol, fired_early = self.opened(len(self.DEVICE[0]) + 2 + len(self.DEVICE[1]) + 2)
        self.assertIs(fired_early, False)
        self.assertTrue(protocol.is_open.called)

    def test_autobahns_path(self):
        """
        A handshake Autobahn's path answers resolves C{is_open} itself.
        """
        self.patch(RelayServerProtocol, "_plain_handshake", lambda protocol: False)
        protocol, _ = self.opened(len(_handshake(self.DEVICE)))
        self.assertIn("is_open", vars(protocol))
        self.assertTrue(protocol.is_open.called)

    def test_is_closed_fires(self):
        """
        C{is_closed} fires with the protocol when the connection closes,
        whether or not it was asked for before.
        """
        results = []
        for ask_first in (True, False):
            client = self.client()
            server = self.net.pumps[-1].serverIO.protocol
            if ask_first:
                self.assertFalse(server.is_closed.called)
                server.is_closed.addCallback(results.append)
            else:
                self.assertNotIn("is_closed", vars(server))
            client.sendClose()
            self.net.flush()
            self.assertTrue(server.is_closed.called)
            if not ask_first:
                server.is_closed.addCallback(results.append)
        self.assertEqual(len(results), 2)
        self.assertTrue(all(isinstance(r, RelayServerProtocol) for r in results))
