"""
The WebSocket adapter: a real Autobahn client against the real Site, wired
in memory with twisted.test.iosim, Autobahn's timers on a Clock.
"""

import txaio
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from leeloo.relay import Relay
from leeloo.testing import MemoryWebSocketClients, RecordingClientProtocol, strip_keys
from leeloo.web import make_site
from leeloo.websocket import RelayServerFactory, WebSocketLimits

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
        self.assertEqual(a.take(), [{"type": "member_joined", "device_id": "b", "display_name": "Bob"}])
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
        self.assertEqual(b.take(), [{"type": "member_offline", "device_id": "d0", "display_name": "D0"}])
        self.assertEqual(self.relay.health()["devices"], 1)

    def test_dropped_connection_goes_offline(self):
        """
        A connection lost without a close handshake is announced too.
        """
        a, b = self.registered(2)
        a.transport.loseConnection()
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

        def broken(session, message):
            raise ZeroDivisionError("a bug")

        from leeloo.messages import Ping

        self.patch(self.relay, "_handlers", {**self.relay._handlers, Ping: broken})
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
        self.assertEqual(b.take(), [{"type": "member_offline", "device_id": "deaf", "display_name": "deaf"}])
        self.assertTrue(a.closed)
