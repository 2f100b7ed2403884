"""
The relay core, driven with method calls, a recording FakePeer and a Clock:
every row of the WebSocket contract, fan-out, and refusals.
"""

from twisted.internet.defer import maybeDeferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from leeloo.relay import (
    CLOSE_BIND_TIMEOUT,
    CLOSE_GOING_AWAY,
    CLOSE_REPLACED,
    PRESENCE_GRACE,
    Relay,
    generate_crew_code,
    generate_device_id,
)
from leeloo import web
from leeloo.testing import Device, FakePeer, strip_keys

T0 = 1_700_000_000.0


def bot_crews(relay, user_id):
    """
    What the bot API answers for C{user_id}'s crews.
    """
    return [web.bot_crew(c) for c in relay.bot_user_crews(user_id)]


class RelayTestCase(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.clock.advance(T0)
        ids = iter(range(1, 10**6))
        self.relay = Relay(self.clock, message_id=lambda: f"m{next(ids)}")

    def device(self):
        return Device(self.relay, "127.0.0.1")

    def crew_of(self, n, code="ALPHA"):
        """
        n devices registered in crew C{code}, their replies taken.
        """
        devices = []
        for _ in range(n):
            i = self.numbered = getattr(self, "numbered", -1) + 1
            d = self.device()
            d.send(type="register", device_id=f"dev{i}", crew_code=code, device_name=f"Dev {i}")
            d.take()
            devices.append(d)
        return devices


class IdentifierTests(SynchronousTestCase):
    def test_crew_code_format(self):
        """
        Generated crew codes are LEELOO- and four unambiguous characters.
        """
        for _ in range(200):
            self.assertRegex(generate_crew_code(), r"^LEELOO-[ABCDEFGHJKLMNPQRSTUVWXYZ23456789]{4}$")

    def test_device_id_format(self):
        """
        Generated device ids are leeloo_ and 12 hex digits.
        """
        self.assertRegex(generate_device_id(), r"^leeloo_[0-9a-f]{12}$")


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

    def test_generated_codes_do_not_collide(self):
        """
        A generated code never names a crew that already exists.
        """
        codes = iter(["LEELOO-AAAA", "LEELOO-AAAA", "LEELOO-BBBB"])
        relay = Relay(self.clock, crew_code=lambda length: next(codes))
        a, b = Device(relay, "127.0.0.1"), Device(relay, "127.0.0.1")
        a.send(type="create_crew")
        b.send(type="create_crew")
        self.assertEqual([a.take()[0]["crew_code"], b.take()[0]["crew_code"]], ["LEELOO-AAAA", "LEELOO-BBBB"])

    def test_create_existing_code_joins(self):
        """
        create_crew naming an existing crew puts the device in it, and the
        crew hears member_joined.
        """
        [a] = self.crew_of(1, "ALPHA")
        b = self.device()
        b.send(type="create_crew", device_id="b", crew_code="alpha", display_name="Bea")
        self.assertEqual(strip_keys(b.take()), [{"type": "crew_created", "device_id": "b", "crew_code": "ALPHA"}])
        self.assertEqual(a.take(), [{"type": "member_joined", "device_id": "b", "display_name": "Bea"}])


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
            self.assertEqual(other.take(), [{"type": "member_joined", "device_id": "c", "display_name": "Cat"}])

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
        self.assertEqual(a.take(), [{"type": "member_joined", "device_id": "d", "display_name": "Dot"}])

    def test_switching_crews(self):
        """
        Joining another crew leaves the first: it hears member_offline (once
        the presence grace has passed) and no longer receives the device's
        messages.
        """
        a, b = self.crew_of(2, "ALPHA")
        [c] = self.crew_of(1, "BETA")
        b.send(type="join_crew", crew_code="BETA")
        self.clock.advance(PRESENCE_GRACE)
        self.assertEqual(a.take(), [{"type": "member_offline", "device_id": "dev1", "display_name": "Dev 1"}])
        b.send(type="reaction", reaction_type="fire")
        self.assertEqual(a.take(), [])
        self.assertEqual(c.take()[-1]["type"], "reaction")


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
              "seq": 1, "id": "m1"}],
        )

    def test_only_the_crew(self):
        """
        A crew's traffic never reaches another crew.
        """
        a, b = self.crew_of(2, "ALPHA")
        [c] = self.crew_of(1, "BETA")
        a.send(type="reaction", reaction_type="love")
        self.assertEqual(len(b.take()), 1)
        self.assertEqual(c.take(), [])

    def test_encoded_once(self):
        """
        One fan-out encodes its message once: every member gets the same
        bytes object.
        """
        a, b, c = self.crew_of(3)
        a.send(type="message", payload={"text": "x"})
        self.assertIs(b.peer.payloads[-1], c.peer.payloads[-1])

    def test_not_in_crew(self):
        """
        Crew messages from a device in no crew get not_in_crew, whatever
        the type.
        """
        d = self.device()
        for fields in ({"type": "message"}, {"type": "share_music"}, {"type": "reaction", "reaction_type": "love"}):
            d.send(**fields)
            [reply] = d.take()
            self.assertEqual((reply["type"], reply["error"]), ("error", "not_in_crew"))

    def test_ping(self):
        """
        ping gets pong, in a crew or not.
        """
        d = self.device()
        d.send(type="ping")
        self.assertEqual(d.take(), [{"type": "pong"}])


class DisconnectTests(RelayTestCase):
    def test_member_offline(self):
        """
        When a device disconnects and does not come back within the presence
        grace, the rest of its crew hears member_offline.
        """
        a, b = self.crew_of(2)
        a.close()
        self.clock.advance(PRESENCE_GRACE - 0.1)
        self.assertEqual(b.take(), [])
        self.clock.advance(0.1)
        self.assertEqual(b.take(), [{"type": "member_offline", "device_id": "dev0", "display_name": "Dev 0"}])
        self.assertEqual(self.relay.stats().devices, 1)

    def test_crew_survives_everyone_leaving(self):
        """
        A crew stays known after its last member disconnects, and can be
        joined again.
        """
        [a] = self.crew_of(1)
        a.close()
        self.assertEqual(self.relay.stats().crews, 1)
        d = self.device()
        d.send(type="join_crew", crew_code="ALPHA")
        self.assertEqual(d.take()[0]["crew_members"], 1)

    def test_reconnect_replaces(self):
        """
        A second connection with the same device id replaces the first: the
        old one is closed with 4001 and the crew hears no member_offline.
        """
        a, b = self.crew_of(2)
        again = self.device()
        again.send(type="register", device_id="dev0", crew_code="ALPHA")
        self.assertEqual(a.peer.closed[0], CLOSE_REPLACED)
        a.close()
        self.assertEqual(b.take(), [])
        b.send(type="reaction", reaction_type="love")
        self.assertEqual(again.take()[-1]["type"], "reaction")
        self.assertEqual(a.take(), [])

    def test_shutdown_closes_everyone(self):
        """
        shutdown closes every connection with 1001 going away, and fires
        once they are all closed and the store is flushed.
        """
        a, b = self.crew_of(2)
        idle = self.device()
        done = self.relay.shutdown()
        self.clock.advance(2)
        for d in (a, b, idle):
            self.assertEqual(d.peer.closed[0], CLOSE_GOING_AWAY)
            d.close()
        self.successResultOf(done)

    def test_shutdown_waits_for_every_connection_to_go(self):
        """
        shutdown fires only once every connection it closed has gone (its
        transport wrote the close and the connection ended), not when the
        last close was asked for.
        """
        devices = self.crew_of(3)
        done = self.relay.shutdown(spread=0)
        self.assertTrue(all(d.peer.closed for d in devices))
        devices[0].close()
        devices[1].close()
        self.clock.advance(5)
        self.assertNoResult(done)
        devices[2].close()
        self.successResultOf(done)
        self.assertEqual(self.relay.sessions, set())

    def test_shutdown_gives_up_on_a_connection_after_grace(self):
        """
        A connection still open C{grace} seconds after it was closed is
        given up on: shutdown fires, and the device is offline in its crew.
        """
        a, b = self.crew_of(2)
        done = self.relay.shutdown(spread=0, grace=3)
        b.close()
        self.clock.advance(2.9)
        self.assertNoResult(done)
        self.clock.advance(0.1)
        self.successResultOf(done)
        self.assertEqual((self.relay.sessions, self.relay.devices), (set(), {}))
        self.assertEqual(self.relay.crew_status("ALPHA").device_names, [])

    def test_connection_opening_during_shutdown_is_closed(self):
        """
        A connection that opens while the relay stops is closed with 1001
        at once, and shutdown waits for it too.
        """
        a = self.device()
        done = self.relay.shutdown(spread=0)
        late = self.device()
        self.assertEqual(late.peer.closed[0], CLOSE_GOING_AWAY)
        a.close()
        self.assertNoResult(done)
        late.close()
        self.successResultOf(done)

    def test_shutdown_spreads_closes(self):
        """
        shutdown spreads its closes over the spread window, so the fleet
        does not reconnect in one burst.
        """
        devices = self.crew_of(100)
        done = self.relay.shutdown(spread=2.0, steps=10)
        closed_at_start = sum(d.peer.closed is not None for d in devices)
        self.clock.advance(1.0)
        closed_halfway = sum(d.peer.closed is not None for d in devices)
        self.assertNoResult(done)
        self.clock.advance(1.0)
        self.assertEqual(closed_at_start, 10)
        self.assertEqual(closed_halfway, 60)
        self.assertTrue(all(d.peer.closed for d in devices))
        for d in devices:
            d.close()
        self.successResultOf(done)


class RefusalTests(RelayTestCase):
    def test_errors_keep_session(self):
        """
        Each bad frame gets an error with the contract's code, and the
        session keeps working afterwards.
        """
        a, b = self.crew_of(2)
        cases = [
            (b"not json", "invalid_json"),
            (b"[1,2]", "invalid_message"),
            (b'{"device_id":"x"}', "invalid_message"),
            (b'{"type":"warp"}', "unknown_type"),
            (b'{"type":"register","device_id":["x"]}', "invalid_message"),
            (b'{"type":"message","payload":"text"}', "invalid_message"),
        ]
        for data, code in cases:
            a.send_frame(data)
            [reply] = a.take()
            self.assertEqual((reply["type"], reply["error"]), ("error", code))
            self.assertIsInstance(reply["message"], str)
        self.assertEqual(b.take(), [])
        a.send(type="reaction", reaction_type="love")
        self.assertEqual(b.take()[0]["type"], "reaction")

    def test_binary(self):
        """
        A binary frame gets binary_not_supported.
        """
        d = self.device()
        self.relay.receive_binary(d.session)
        self.assertEqual(d.take()[0]["error"], "binary_not_supported")


class TokenTests(RelayTestCase):
    tokens = {"access_token": "at", "refresh_token": "rt", "expires_in": 3600}

    def test_online_device_gets_tokens(self):
        """
        Tokens for an online device are sent to it at once.
        """
        d = self.device()
        d.send(type="register", device_id="d")
        d.take()
        self.assertTrue(self.relay.deliver_tokens("d", self.tokens))
        self.assertEqual(d.take(), [{"type": "spotify_auth_complete", "tokens": self.tokens}])

    def test_offline_device_gets_tokens_on_return(self):
        """
        Tokens for an offline device are kept and delivered once, right
        after its next register, create_crew or join_crew reply.
        """
        [member] = self.crew_of(1)
        for i, fields in enumerate([
            {"type": "register"},
            {"type": "create_crew"},
            {"type": "join_crew", "crew_code": "ALPHA"},
        ]):
            device_id = f"off{i}"
            self.assertFalse(self.relay.deliver_tokens(device_id, self.tokens))
            d = self.device()
            d.send(device_id=device_id, **fields)
            replies = d.take()
            self.assertEqual(replies[-1], {"type": "spotify_auth_complete", "tokens": self.tokens})
            self.assertEqual(len(replies), 2)
            d.close()
            d2 = self.device()
            d2.send(type="register", device_id=device_id)
            self.assertEqual(len(d2.take()), 1)

    def test_tokens_expire_after_an_hour(self):
        """
        A device that comes back after the hour gets no tokens.
        """
        self.relay.deliver_tokens("late", self.tokens)
        self.clock.advance(3601)
        d = self.device()
        d.send(type="register", device_id="late")
        self.assertEqual(strip_keys(d.take()), [{"type": "registered", "device_id": "late"}])

    def test_expire_forgets_stale_tokens(self):
        """
        expire() forgets tokens past their hour and keeps fresh ones.
        """
        self.relay.deliver_tokens("old", self.tokens)
        self.clock.advance(1800)
        self.relay.deliver_tokens("new", self.tokens)
        self.clock.advance(1801)
        self.assertEqual(self.relay.expire(), 1)
        self.assertEqual(list(self.relay.pending_tokens), ["new"])


class BotTests(RelayTestCase):
    def test_bot_message_reaches_devices(self):
        """
        A bot user's message reaches every online device of its crew with
        from_device "telegram".
        """
        a, b = self.crew_of(2)
        self.relay.bot_join_crew("42", "alpha", "Tom")
        reached = self.successResultOf(self.relay.bot_message("42", "ALPHA", "Tom", "text", {"text": "yo"}))
        self.assertEqual(reached, 2)
        for d in (a, b):
            self.assertEqual(
                d.take(),
                [{"type": "message", "from_device": "telegram", "from_name": "Tom", "msg_type": "text",
                  "payload": {"text": "yo"}, "timestamp": int(T0 * 1000), "seq": 1, "id": "m1"}],
            )

    def test_bot_not_in_crew(self):
        """
        A bot user who has not joined a crew cannot send to it.
        """
        self.crew_of(1)
        from leeloo.messages import NotInCrew

        self.assertRaises(NotInCrew, self.relay.bot_message, "42", "ALPHA", "Tom", "text", {})

    def test_bot_create_and_status(self):
        """
        A crew created by a bot user lists that user; devices joining show up
        in its status.
        """
        code = self.successResultOf(self.relay.bot_create_crew("7", "Tina"))
        d = self.device()
        d.send(type="join_crew", crew_code=code, device_name="Den")
        self.assertEqual(
            web.crew_status(self.relay.crew_status(code.lower())),
            {"crew_code": code, "exists": True, "devices_online": 1, "device_names": ["Den"],
             "telegram_users": 1, "telegram_user_names": ["Tina"]},
        )

    def test_status_unknown(self):
        """
        The status of an unknown crew says it does not exist.
        """
        self.assertEqual(
            web.crew_status(self.relay.crew_status("ZZZ")),
            {"crew_code": "ZZZ", "exists": False, "devices_online": 0, "device_names": [],
             "telegram_users": 0, "telegram_user_names": []},
        )


class HealthTests(RelayTestCase):
    def test_health(self):
        """
        health counts connected devices and known crews, and the uptime.
        """
        self.crew_of(2, "A")
        self.crew_of(1, "B")
        self.clock.advance(42)
        self.assertEqual(web.health(self.relay.stats()),
                         {"status": "ok", "devices": 3, "crews": 2, "crews_online": 2, "uptime": 42})

    def test_crews_online_counts_crews_with_a_member_online(self):
        """
        crews_online counts the crews with at least one member connected
        now: a crew whose members have all gone offline is known but not
        online, and counts again when one comes back.
        """
        [a1, a2] = self.crew_of(2, "A")
        [b] = self.crew_of(1, "B")
        a1.close()
        self.assertEqual(self.relay.stats().crews_online, 2)
        a2.close()
        self.assertEqual((self.relay.stats().crews, self.relay.stats().crews_online), (2, 1))
        back = self.device()
        back.send(type="join_crew", crew_code="A", device_id="dev9", display_name="Nine")
        self.assertEqual(self.relay.stats().crews_online, 2)

    def test_crews_online_after_a_replaced_connection(self):
        """
        A device whose newer connection replaces its older one keeps its
        crew counted once; the crew stops counting when it leaves.
        """
        self.crew_of(1, "A")
        again = self.device()
        again.send(type="register", device_id="dev0", crew_code="A")
        self.assertEqual(self.relay.stats().crews_online, 1)
        again.close()
        self.assertEqual(self.relay.stats().crews_online, 0)

    def test_crews_online_after_a_move(self):
        """
        A device that moves to another crew takes the online count with it.
        """
        [d] = self.crew_of(1, "A")
        self.crew_of(0, "B")
        d.send(type="create_crew", crew_code="B")
        self.assertEqual((self.relay.stats().crews, self.relay.stats().crews_online), (2, 1))
        d.close()
        self.assertEqual(self.relay.stats().crews_online, 0)


class BindTimeoutTests(RelayTestCase):
    def test_unbound_closed(self):
        """
        A connection that binds no device within the bind timeout is closed
        with 4008.
        """
        idle = self.device()
        self.clock.advance(59.9)
        self.assertIsNone(idle.peer.closed)
        self.clock.advance(0.1)
        self.assertEqual(idle.peer.closed[0], CLOSE_BIND_TIMEOUT)

    def test_failed_entries_do_not_bind(self):
        """
        A join_crew that is refused (and a create_crew fallback refused
        too) binds nothing: the connection is still closed.
        """
        d = self.device()
        d.send(type="join_crew", crew_code="nowhere")
        d.send(type="create_crew", crew_code="a\u0000b")
        self.assertEqual([m["error"] for m in d.take()], ["invalid_crew_code", "invalid_crew_code"])
        self.clock.advance(60)
        self.assertEqual(d.peer.closed[0], CLOSE_BIND_TIMEOUT)

    def test_bound_stays(self):
        """
        register, create_crew or join_crew within the timeout keep the
        connection open.
        """
        self.crew_of(1, "HOME")
        devices = [self.device() for _ in range(3)]
        devices[0].send(type="register")
        devices[1].send(type="create_crew")
        devices[2].send(type="join_crew", crew_code="home")
        self.clock.advance(3600)
        self.assertEqual([d.peer.closed for d in devices], [None, None, None])

    def test_closed_connection_cancels(self):
        """
        A connection that closes before the timeout leaves no timer behind.
        """
        d = self.device()
        d.close()
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_off(self):
        """
        A bind timeout of 0 never closes anyone.
        """
        relay = Relay(self.clock, bind_timeout=0)
        d = Device(relay, "127.0.0.1")
        self.clock.advance(86400)
        self.assertIsNone(d.peer.closed)
        self.assertEqual(self.clock.getDelayedCalls(), [])


class ShutdownWaitTests(RelayTestCase):
    def test_waits_for_answers(self):
        """
        Shutdown fires once every connection is gone (the
        devices answered the close), not before.
        """
        a, b = self.crew_of(2)
        done = self.relay.shutdown(spread=0, grace=5)
        self.assertNoResult(done)
        a.close()
        self.assertNoResult(done)
        b.close()
        self.successResultOf(done)

    def test_gives_up(self):
        """
        shutdown waits at most its grace for connections to go.
        """
        self.crew_of(2)
        done = self.relay.shutdown(spread=0, grace=5)
        self.clock.advance(4.9)
        self.assertNoResult(done)
        self.clock.advance(0.1)
        self.successResultOf(done)


class ConnectTests(RelayTestCase):
    def test_connect_all_or_nothing(self):
        """
        A connection whose registration fails part-way (here its peer
        raising when a stopping relay closes it) leaves nothing behind: no
        session and no bind timer.
        """
        class BrokenPeer(FakePeer):
            def close(self, code, reason):
                raise ZeroDivisionError("a bug")

        self.relay.shutdown(spread=0)
        self.assertRaises(ZeroDivisionError, self.relay.connect, BrokenPeer())
        self.assertEqual(self.relay.sessions, set())
        self.assertEqual(self.clock.getDelayedCalls(), [])


class BotUserCrewsTests(RelayTestCase):
    def created(self, user_id, name):
        """
        The code of a crew the bot user creates (once it is durable, if the
        relay waits for that).
        """
        return self.successResultOf(maybeDeferred(self.relay.bot_create_crew, user_id, name))

    def test_crews_of_user(self):
        """
        bot_user_crews lists a user's crews in join order with its name
        there and the devices online; another user's are not listed.
        """
        self.crew_of(2, "HOME")
        self.relay.bot_join_crew("7", "home", "Tina")
        code = self.created("7", "T.")
        self.created("8", "Other")
        self.assertEqual(bot_crews(self.relay, "7"), [
            {"crew_code": "HOME", "display_name": "Tina", "devices_online": 2},
            {"crew_code": code, "display_name": "T.", "devices_online": 0},
        ])
        self.assertEqual(bot_crews(self.relay, "9"), [])

    def test_pruned_crew_forgotten(self):
        """
        A crew pruned as idle leaves the user's list.
        """
        self.created("7", "Tina")
        self.clock.advance(91 * 86400)
        self.relay.prune()
        self.assertEqual(bot_crews(self.relay, "7"), [])
        self.assertEqual(self.relay.bot_user_index, {})
