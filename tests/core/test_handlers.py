"""
L{leeloo.core.handlers}: what the relay answers to each frame a device
sends (register, create_crew, join_crew, the crew messages, ping), and
what it sends the crew.
"""

from leeloo.testing import Device, FailingMemoryStore, strip_keys
from tests.core.support import T0, BoundsTestCase, DeliveryTestCase, HeldStore, RelayTestCase


class RegisterTests(RelayTestCase):
    def test_register_generates_device_id(self):
        """
        register without device_id is answered with a generated one.
        """
        d = self.device()
        d.send(type="register")
        [reply] = d.take()
        self.assertEqual(set(reply), {"type", "device_id", "device_key"})
        self.assertEqual(reply["type"], "registered")
        self.assertRegex(reply["device_id"], r"^leeloo_[0-9a-f]{12}$")

    def test_register_keeps_given_id(self):
        """
        register with device_id is answered with that id.
        """
        d = self.device()
        d.send(type="register", device_id="leeloo_aaaaaaaaaaaa")
        self.assertEqual(strip_keys(d.take()), [{"type": "registered", "device_id": "leeloo_aaaaaaaaaaaa"}])

    def test_register_without_crew_joins_none(self):
        """
        A device registered without crew_code is connected but in no crew.
        """
        d = self.device()
        d.send(type="register", device_id="a")
        d.take()
        d.send(type="message", payload={"text": "hi"})
        self.assertEqual(d.take()[0]["error"], "not_in_crew")
        self.assertEqual(self.relay.stats().devices, 1)

    def test_register_with_crew_creates_it(self):
        """
        register with an unknown crew_code creates that crew (upper-cased)
        and puts the device in it; nobody else is told.
        """
        a, b = self.device(), self.device()
        a.send(type="register", device_id="a", crew_code="alpha")
        b.send(type="register", device_id="b", crew_code="ALPHA")
        self.assertEqual(strip_keys(a.take()), [{"type": "registered", "device_id": "a"}])
        self.assertEqual(strip_keys(b.take()), [{"type": "registered", "device_id": "b"}])
        self.assertEqual(list(self.relay.crews), ["ALPHA"])
        b.send(type="reaction", reaction_type="love")
        self.assertEqual(a.take()[0]["type"], "reaction")


class CreateCrewTests(RelayTestCase):
    def test_create_generates_code(self):
        """
        create_crew without crew_code answers crew_created with a generated
        code and the device's id.
        """
        d = self.device()
        d.send(type="create_crew", device_id="a", display_name="Ann")
        [reply] = d.take()
        self.assertEqual(set(reply), {"type", "device_id", "crew_code", "device_key"})
        self.assertEqual((reply["type"], reply["device_id"]), ("crew_created", "a"))
        self.assertRegex(reply["crew_code"], r"^LEELOO-[A-HJ-NP-Z2-9]{4}$")
        self.assertIn(reply["crew_code"], self.relay.crews)

    def test_create_with_code(self):
        """
        create_crew with crew_code creates that crew, upper-cased, and
        generates a device id when none is given.
        """
        d = self.device()
        d.send(type="create_crew", crew_code="mycrew")
        [reply] = d.take()
        self.assertEqual(reply["crew_code"], "MYCREW")
        self.assertRegex(reply["device_id"], r"^leeloo_[0-9a-f]{12}$")

    def test_create_existing_code_joins(self):
        """
        create_crew naming an existing crew puts the device in it, and the
        crew hears member_joined.
        """
        [a] = self.crew_of(1, "ALPHA")
        b = self.device()
        b.send(type="create_crew", device_id="b", crew_code="alpha", display_name="Bea")
        self.assertEqual(strip_keys(b.take()), [{"type": "crew_created", "device_id": "b", "crew_code": "ALPHA"}])
        self.assertEqual(a.take(), [{"type": "member_joined", "device_id": "b", "display_name": "Bea", "crew_code": "ALPHA"}])


class JoinCrewTests(RelayTestCase):
    def test_join(self):
        """
        join_crew answers crew_joined with the online count including the
        joiner and the other members' names; the rest hear member_joined.
        """
        a, b = self.crew_of(2, "ALPHA")
        c = self.device()
        c.send(type="join_crew", crew_code="alpha", device_id="c", display_name="Cat")
        self.assertEqual(
            strip_keys(c.take()),
            [{
                "type": "crew_joined",
                "device_id": "c",
                "crew_code": "ALPHA",
                "crew_members": 3,
                "member_names": ["Dev 0", "Dev 1"],
            }],
        )
        for other in (a, b):
            self.assertEqual(other.take(), [{"type": "member_joined", "device_id": "c", "display_name": "Cat",
                                                        "crew_code": "ALPHA"}])

    def test_join_device_name_fallback(self):
        """
        join_crew takes device_name as the display name when display_name
        is missing.
        """
        [a] = self.crew_of(1)
        c = self.device()
        c.send(type="join_crew", crew_code="ALPHA", device_name="Den")
        self.assertEqual(a.take()[0]["display_name"], "Den")

    def test_join_unknown_crew(self):
        """
        join_crew naming no crew gets invalid_crew_code with the original's
        message, and changes nothing.
        """
        d = self.device()
        d.send(type="join_crew", crew_code="nope")
        self.assertEqual(
            d.take(),
            [{"type": "error", "error": "invalid_crew_code", "message": "Crew NOPE not found"}],
        )
        self.assertEqual(self.relay.crews, {})
        self.assertEqual(self.relay.devices, {})

    def test_join_after_register_keeps_name(self):
        """
        A device registered with a name keeps it when it joins without one.
        """
        [a] = self.crew_of(1)
        d = self.device()
        d.send(type="register", device_id="d", device_name="Dot")
        d.send(type="join_crew", crew_code="ALPHA")
        self.assertEqual(a.take(), [{"type": "member_joined", "device_id": "d", "display_name": "Dot", "crew_code": "ALPHA"}])


class FanoutTests(RelayTestCase):
    def test_message(self):
        """
        message reaches every other member once, with sender id, name,
        msg_type, payload and the relay's timestamp; the sender gets nothing.
        """
        a, b, c = self.crew_of(3)
        self.clock.advance(1.5)
        a.send(type="message", msg_type="song_push", payload={"track": "T", "note": "listen"})
        expected = {
            "type": "message",
            "from_device": "dev0",
            "from_name": "Dev 0",
            "msg_type": "song_push",
            "payload": {"track": "T", "note": "listen"},
            "timestamp": int((T0 + 1.5) * 1000),
            "seq": 1,
            "id": "m1",
            "crew_code": "ALPHA",
        }
        self.assertEqual(b.take(), [expected])
        self.assertEqual(c.take(), [expected])
        self.assertEqual(a.take(), [])

    def test_message_defaults(self):
        """
        A bare message goes out as msg_type "text" with an empty payload.
        """
        a, b = self.crew_of(2)
        a.send(type="message")
        [got] = b.take()
        self.assertEqual((got["msg_type"], got["payload"]), ("text", {}))

    def test_every_device_msg_type_passes_through(self):
        """
        Every msg_type devices send today, and unknown ones, arrive unchanged.
        """
        a, b = self.crew_of(2)
        cases = {
            "text": {"text": "hi"},
            "reaction": {"reaction": "love", "to_device": None},
            "song_push": {"artist": "A", "track": "T", "album": "B", "spotify_uri": "spotify:track:1",
                          "album_art_url": "https://i.scdn.co/x", "note": ""},
            "nudge": {},
            "hang_propose": {"datetime": "2026-12-01T19:00", "description": "pizza"},
            "hang_confirm": {},
            "brand_new": {"nested": {"deep": [1, 2, {"x": None}]}},
        }
        for msg_type, payload in cases.items():
            a.send(type="message", msg_type=msg_type, payload=payload)
            [got] = b.take()
            self.assertEqual((got["msg_type"], got["payload"]), (msg_type, payload))

    def test_share_music(self):
        """
        share_music reaches the crew as music_shared with pushed_by.
        """
        a, b = self.crew_of(2)
        a.send(type="share_music", spotify_uri="spotify:track:9", artist="A", track="T", album="B")
        self.assertEqual(
            b.take(),
            [{
                "type": "music_shared",
                "spotify_uri": "spotify:track:9",
                "artist": "A",
                "track": "T",
                "album": "B",
                "pushed_by": "Dev 0",
                "timestamp": int(T0 * 1000),
                "seq": 1,
                "id": "m1",
                "crew_code": "ALPHA",
            }],
        )
        self.assertEqual(a.take(), [])

    def test_reaction(self):
        """
        reaction reaches the crew with the sender's name as from.
        """
        a, b = self.crew_of(2)
        a.send(type="reaction", reaction_type="fire")
        self.assertEqual(
            b.take(),
            [{"type": "reaction", "reaction_type": "fire", "from": "Dev 0", "timestamp": int(T0 * 1000),
              "seq": 1, "id": "m1", "crew_code": "ALPHA"}],
        )

    def test_ping(self):
        """
        ping gets pong, in a crew or not.
        """
        d = self.device()
        d.send(type="ping")
        self.assertEqual(d.take(), [{"type": "pong"}])


class DurableCreateTests(BoundsTestCase):
    def setUp(self):
        super().setUp()
        self.store = HeldStore()
        self.relay = self.make_relay()

    def test_crew_created_once_stored(self):
        """
        crew_created is answered only once the new crew is in the store.
        """
        d = self.device()
        d.send(type="create_crew", device_id="leeloo_aaaaaaaaaaaa")
        self.assertEqual(d.take(), [])
        self.assertEqual(self.store.crews, {})
        self.store.release()
        [created] = d.take()
        self.assertEqual(created["type"], "crew_created")
        self.assertIn(created["crew_code"], self.store.crews)

    def test_crew_not_stored(self):
        """
        A new crew the store refuses is answered store_unavailable, and
        the device is in no crew.
        """
        self.store = FailingMemoryStore()
        self.relay = self.make_relay()
        self.store.fail_with = OSError("disk full")
        d = self.device()
        d.send(type="create_crew", device_id="leeloo_aaaaaaaaaaaa")
        self.clock.advance(self.relay.journal.retry_delay)
        self.assertEqual([m["error"] for m in d.take()], ["store_unavailable"])
        self.assertIsNone(d.session.crew)


class BugRecoveryTests(DeliveryTestCase):
    """
    A bug in a step of one of the core's Deferred chains is logged as a
    failure and recovered from; it is never left unhandled, and the relay
    goes on serving.
    """

    def test_create_crew_answer_bug_closes(self):
        """
        A bug while answering a crew creation once it is durable is logged
        and that connection closed with 1011.
        """
        def broken(session):
            raise ZeroDivisionError("a bug")

        d = Device(self.relay)
        self.patch(self.relay.tokens, "hand_over", broken)
        d.send(type="create_crew", device_id="a", crew_code="NEWCREW", display_name="A")
        self.clock.advance(1)
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)
        self.assertEqual(d.peer.closed[0], 1011)
