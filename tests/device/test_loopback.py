"""
Devices against the real relay service on loopback (the whole service tree
with its SQLite store, on the real reactor): messages, restarts, offline
sends, identity.
"""

import json
import os

from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.trial.unittest import TestCase

from leeloo.device import DeviceStopped

from ..support import ws_session, recv
from .loopback import GatedEndpoint, LoopbackRelay, start_device


class LoopbackTestCase(TestCase):

    timeout = 30

    @defer.inlineCallbacks
    def setUp(self):
        self.relay = yield LoopbackRelay(self).start()

    @defer.inlineCallbacks
    def crew_of_two(self, **b_kwargs):
        """
        Ann creates a crew, Bob joins it; fire with both devices and their
        events once Ann has seen Bob join.
        """
        a, a_events = start_device(self, self.relay.url(), "Ann")
        created = yield a_events.wait("connected", after=0)
        b_state = self.mktemp()
        os.makedirs(b_state)
        with open(os.path.join(b_state, "crew_config.json"), "w") as f:
            json.dump({"crew_code": created["crew_code"]}, f)
        joined = a_events.wait("member_joined")
        b, b_events = start_device(self, self.relay.url(), "Bob", b_state, **b_kwargs)
        yield b_events.wait("connected", after=0)
        yield joined
        return a, a_events, b, b_events


class ExchangeTests(LoopbackTestCase):

    @defer.inlineCallbacks
    def test_two_devices_exchange_every_message_type(self):
        """
        Every msg_type deployed devices use, and one they do not know yet,
        goes from one device to the other, each once, in order, through
        the observers of its type; each send fires with its seq; a device
        leaving is seen as member_offline.
        """
        a, a_events, b, b_events = yield self.crew_of_two()
        by_type = {}
        for msg_type in ("text", "song_push", "reaction", "nudge", "hang_propose", "hang_confirm", "confetti"):
            b.on_message(msg_type, lambda frame, t=msg_type: by_type.setdefault(t, []).append(frame["payload"]))
        sends = [
            a.send_text("hi Bob"),
            a.push_song("spotify:track:1", "Artist", "Track", "Album", "http://art", "for you"),
            a.react("fire"),
            a.nudge(),
            a.propose_hang("2026-12-24 20:00", "dinner"),
            a.confirm_hang(),
            a.send_message("confetti", {"colour": "gold"}),
        ]
        sent = yield defer.gatherResults(sends)
        last = b_events.wait("message", lambda f: f["msg_type"] == "confetti", after=0)
        yield last
        self.assertEqual([s["seq"] for s in sent], sorted(s["seq"] for s in sent))
        self.assertEqual(by_type, {
            "text": [{"text": "hi Bob"}],
            "song_push": [{"artist": "Artist", "track": "Track", "album": "Album",
                           "spotify_uri": "spotify:track:1", "album_art_url": "http://art", "note": "for you"}],
            "reaction": [{"reaction": "fire", "to_device": None}],
            "nudge": [{}],
            "hang_propose": [{"datetime": "2026-12-24 20:00", "description": "dinner"}],
            "hang_confirm": [{}],
            "confetti": [{"colour": "gold"}],
        })
        received = b_events.frames("message")
        self.assertEqual([f["from_name"] for f in received], ["Ann"] * 7)
        self.assertEqual([f["seq"] for f in received], [s["seq"] for s in sent])

        back = a_events.wait("message")
        yield b.send_text("hi Ann")
        self.assertEqual((yield back)["payload"], {"text": "hi Ann"})

        offline = a_events.wait("member_offline")
        yield b.stopService()
        self.assertEqual((yield offline)["display_name"], "Bob")

    @defer.inlineCallbacks
    def test_spotify_tokens_reach_the_device(self):
        """
        Tokens the relay hands to a device id reach that device's observers
        and land in its spotify_tokens.json, exactly.
        """
        a, a_events = start_device(self, self.relay.url(), "Ann")
        yield a_events.wait("connected", after=0)
        tokens = {"access_token": "at", "refresh_token": "rt", "expires_in": 3600}
        arrived = a_events.wait("spotify_auth_complete")
        self.assertTrue(self.relay.relay.deliver_tokens(a.device_id, tokens))
        self.assertEqual((yield arrived)["tokens"], tokens)
        with open(a.state.path("spotify_tokens.json")) as f:
            self.assertEqual(json.load(f), tokens)


class KeepaliveTests(LoopbackTestCase):

    @defer.inlineCallbacks
    def test_silent_relay_connection_is_dropped_and_replaced(self):
        """
        The device pings the relay over the WebSocket; when the relay stops
        answering (its side stops reading), the device drops the connection
        after the ping timeout and connects again.
        """
        a, a_events = start_device(self, self.relay.url(), "Ann", ping_interval=0.2, ping_timeout=0.3)
        yield a_events.wait("connected", after=0)
        server = self.relay.relay.devices[a.device_id].peer
        dropped = a_events.wait("disconnected")
        back = a_events.wait("connected")
        server.transport.pauseProducing()
        lost = yield dropped
        server.transport.resumeProducing()
        self.assertIn("ping", lost["reason"].lower())
        yield back


class RestartTests(LoopbackTestCase):

    @defer.inlineCallbacks
    def restart(self):
        yield self.relay.stop()
        yield self.relay.start()

    @defer.inlineCallbacks
    def test_restart_under_a_device_replays_what_it_missed_once(self):
        """
        The relay stops and starts again under a connected device; the
        device reconnects by itself and gets what was sent while it was
        away, then live traffic, each message exactly once.
        """
        gate = GatedEndpoint(TCP4ClientEndpoint(reactor, "127.0.0.1", self.relay.port))
        a, a_events, b, b_events = yield self.crew_of_two(endpoint=gate)
        yield a.send_text("before")
        yield b_events.wait("message", after=0)

        gate.close()
        lost = b_events.wait("disconnected")
        yield self.restart()
        yield lost
        yield a_events.wait("connected")
        yield a.send_text("missed 1")
        yield a.send_text("missed 2")

        back = b_events.wait("connected")
        gate.open()
        yield back
        yield b_events.wait("message", lambda f: f["payload"]["text"] == "missed 2", after=0)
        live = b_events.wait("message", lambda f: f["payload"]["text"] == "live")
        yield a.send_text("live")
        yield live
        self.assertEqual([f["payload"]["text"] for f in b_events.frames("message")],
                         ["before", "missed 1", "missed 2", "live"])
        with open(b.state.path("relay_state.json")) as f:
            self.assertEqual(json.load(f)["last_seq"][b.crew_code], b_events.frames("message")[-1]["seq"])

    @defer.inlineCallbacks
    def test_sends_while_the_relay_is_down_arrive_once(self):
        """
        Sends made while the relay is down wait in the outbox and arrive
        once, in order, when it is back; each send then fires with its seq
        and the outbox is empty.
        """
        a, a_events, b, b_events = yield self.crew_of_two()
        lost = a_events.wait("disconnected")
        yield self.relay.stop()
        yield lost
        sends = [a.send_text(f"offline {i}") for i in range(3)]
        with open(a.state.path("outbox.json")) as f:
            self.assertEqual(len(json.load(f)["messages"]), 3)
        yield self.relay.start()
        sent = yield defer.gatherResults(sends)
        yield b_events.wait("message", lambda f: f["payload"]["text"] == "offline 2", after=0)
        marker = b_events.wait("message", lambda f: f["payload"]["text"] == "after")
        yield a.send_text("after")
        yield marker
        self.assertEqual([f["payload"]["text"] for f in b_events.frames("message")],
                         ["offline 0", "offline 1", "offline 2", "after"])
        self.assertEqual(len({s["seq"] for s in sent}), 3)
        with open(a.state.path("outbox.json")) as f:
            self.assertEqual(json.load(f)["messages"], [])


    @defer.inlineCallbacks
    def test_relay_that_lost_its_data(self):
        """
        A relay that comes back without its data (a new data directory)
        does not know the device's crew: the device creates it again under
        the same code, forgets its old position, and gets the new
        messages, whose sequence starts again at 1.
        """
        a, a_events, b, b_events = yield self.crew_of_two()
        yield a.send_text("old 1")
        yield a.send_text("old 2")
        yield b_events.wait("message", lambda f: f["payload"]["text"] == "old 2", after=0)
        code = b.crew_code
        lost = b_events.wait("disconnected")
        yield self.relay.stop()
        yield lost
        fresh = self.relay.data_dir.with_name(self.relay.data_dir.name + "-fresh")
        fresh.mkdir(mode=0o700)
        self.relay.data_dir = fresh
        yield self.relay.start()
        yield defer.gatherResults([a_events.wait("connected"), b_events.wait("connected")])
        self.assertIn(code, self.relay.relay.crews)
        arrived = b_events.wait("message", lambda f: f["payload"]["text"] == "new 1")
        sent = yield a.send_text("new 1")
        self.assertEqual(sent["seq"], 1)
        self.assertEqual((yield arrived)["seq"], 1)
        self.assertEqual((b.crew_code, a.crew_code), (code, code))


class ReplayLimitTests(TestCase):

    timeout = 30

    @defer.inlineCallbacks
    def test_truncated_replay_is_surfaced(self):
        """
        A device that missed more than the relay's replay limit gets the
        newest messages and a replay_truncated naming what it lost, handed
        to its observers.
        """
        self.relay = yield LoopbackRelay(self, replay_limit=2).start()
        gate = GatedEndpoint(TCP4ClientEndpoint(reactor, "127.0.0.1", self.relay.port))
        a, a_events, b, b_events = yield LoopbackTestCase.crew_of_two(self, endpoint=gate)
        yield a.send_text("seen")
        yield b_events.wait("message", after=0)
        gate.close()
        lost = b_events.wait("disconnected")
        b._proto.transport.loseConnection()
        yield lost
        sent = yield defer.gatherResults([a.send_text(f"missed {i}") for i in range(5)])
        truncated = b_events.wait("replay_truncated")
        gate.open()
        gap = yield truncated
        yield b_events.wait("message", lambda f: f["payload"]["text"] == "missed 4", after=0)
        self.assertEqual((gap["from_seq"], gap["to_seq"]), (sent[0]["seq"], sent[2]["seq"]))
        self.assertEqual([f["payload"]["text"] for f in b_events.frames("message")],
                         ["seen", "missed 3", "missed 4"])


class IdentityTests(LoopbackTestCase):

    @defer.inlineCallbacks
    def test_device_key_survives_a_reconnect(self):
        """
        The key the relay issues is kept and bound: after a reconnect the
        device is let in with it, and a connection claiming its id without
        the key is refused with device_auth_failed.
        """
        a, a_events = start_device(self, self.relay.url(), "Ann")
        yield a_events.wait("connected", after=0)
        with open(a.state.path("device_key")) as f:
            key = f.read().strip()
        self.assertTrue(key)
        back = a_events.wait("connected")
        a._proto.transport.loseConnection()
        yield back
        self.assertEqual(a_events.frames("error"), [])
        with open(a.state.path("device_key")) as f:
            self.assertEqual(f.read().strip(), key)

        def impostor(opener):
            with opener() as ws:
                ws.send(json.dumps({"type": "register", "device_id": a.device_id}))
                return recv(ws)

        refused = yield ws_session(self.relay.port, impostor)
        self.assertEqual(refused["error"], "device_auth_failed")

    @defer.inlineCallbacks
    def test_resend_of_a_stored_message_is_delivered_once(self):
        """
        A message the relay stored but whose confirmation the device never
        got (it stopped at once) is resent from the outbox by the next run
        under the same client_msg_id, confirmed, and delivered only once.
        """
        a, a_events, b, b_events = yield self.crew_of_two()
        arrived = b_events.wait("message")
        pending = a.send_text("once")
        # As if the device lost power: the frame leaves, nothing comes back.
        a._proto.transport.loseConnection()
        yield a.stopService()
        self.failureResultOf(pending, DeviceStopped)
        yield arrived
        again, again_events = start_device(self, self.relay.url(), "Ann", str(a.state.directory))
        confirmed = yield again_events.wait("sent", after=0)
        self.assertEqual(json.loads(open(again.state.path("outbox.json")).read())["messages"], [])
        marker = b_events.wait("message", lambda f: f["payload"]["text"] == "next")
        yield again.send_text("next")
        yield marker
        texts = [f["payload"]["text"] for f in b_events.frames("message")]
        self.assertEqual(texts, ["once", "next"])
        self.assertEqual(confirmed["seq"], b_events.frames("message")[0]["seq"])

    @defer.inlineCallbacks
    def test_second_copy_on_the_same_state_stops_the_first(self):
        """
        Two processes on one state directory: the newer connection replaces
        the older (4001), which stops and says why instead of reconnecting.
        """
        a, a_events = start_device(self, self.relay.url(), "Ann")
        yield a_events.wait("connected", after=0)
        stopped = a_events.wait("stopped")
        copy, copy_events = start_device(self, self.relay.url(), "Ann", str(a.state.directory))
        yield copy_events.wait("connected", after=0)
        why = yield stopped
        self.assertEqual(why["error"], "device_replaced")
        self.assertIn("4001", why["message"])
        self.assertFalse(a.running)
        self.assertEqual(len(a_events.frames("connected")), 1)
        self.assertTrue(copy.connected)

    @defer.inlineCallbacks
    def test_stop_while_the_connection_drops_leaves_no_timer(self):
        """
        A device stopped just as its connection drops, after it sent a
        close the relay never answers, leaves no timer running (the test
        fails with a dirty reactor otherwise): Autobahn does not cancel its
        close-handshake timer on a lost connection, the device does.
        """
        a, a_events, b, b_events = yield self.crew_of_two()
        gone = b_events.wait("member_offline")
        proto = a._proto
        proto.sendClose(1000, "bye")
        self.assertIsNotNone(proto.closeHandshakeTimeoutCall)
        proto.transport.abortConnection()
        yield a.stopService()
        self.assertIsNone(proto.closeHandshakeTimeoutCall)
        yield gone

