"""
L{leeloo.core.operator}: what the relay's operator changes reaches the
cache, the store and the connected devices together.
"""

from leeloo.core.defaults import PRESENCE_GRACE
from leeloo.core.operator import Imported, Refused
from leeloo.messages import CLOSE_OPERATOR, InvalidCrewCode
from leeloo.relay import Relay
from leeloo.sealing import Sealer
from leeloo.store import MemoryStore, TokenRecord
from leeloo.testing import Device
from tests.core.support import ClockTestCase, HeldStore

ALPHA = "LEELOO-ALFA"
BRAVO = "LEELOO-BRVO"


class OperatorTestCase(ClockTestCase):
    def setUp(self):
        super().setUp()
        self.store = self.make_store()
        self.relay = Relay(self.clock, self.store)
        self.operator = self.relay.operator

    def make_store(self):
        return MemoryStore()

    def member(self, device_id, code=ALPHA, kind="join_crew", **extra):
        d = Device(self.relay)
        if kind == "register":
            d.send(type="register", device_id=device_id, crew_code=code, device_name=device_id, **extra)
        else:
            d.send(type="create_crew" if code not in self.relay.crews else "join_crew", device_id=device_id,
                   crew_code=code, display_name=device_id, **extra)
        d.take()
        return d

    def say(self, device, text, **extra):
        self.clock.advance(0.05)
        device.send(type="message", payload={"text": text}, **extra)

    def done(self, d):
        return self.successResultOf(d)


class ResetKeyTests(OperatorTestCase):
    def test_key_forgotten(self):
        """
        reset_key forgets the device's key in the relay and its store: the
        next key the device presents binds.
        """
        a = self.member("leeloo_a", device_key="old-key")
        a.close()
        self.assertEqual(self.done(self.operator.reset_key("leeloo_a")), {"device_id": "leeloo_a", "closed": False})
        self.assertNotIn("leeloo_a", self.store.devices)
        b = Device(self.relay)
        b.send(type="join_crew", device_id="leeloo_a", crew_code=ALPHA, device_key="new-key")
        self.assertEqual(b.take()[0]["type"], "crew_joined")

    def test_connection_closed(self):
        """
        A device connected when its key is reset is closed with 4004.
        """
        a = self.member("leeloo_a")
        self.assertTrue(self.done(self.operator.reset_key("leeloo_a"))["closed"])
        self.assertEqual(a.peer.closed[0], CLOSE_OPERATOR)

    def test_unknown_device(self):
        """
        An unknown device id is refused.
        """
        self.assertRaises(Refused, self.operator.reset_key, "leeloo_nobody")


class RemoveTests(OperatorTestCase):
    def test_online_member_leaves(self):
        """
        A removed member online is told crew_left and leaves the crew, whose
        members hear member_offline; its connection stays open.
        """
        a, b = self.member("leeloo_a"), self.member("leeloo_b")
        a.take()
        answer = self.done(self.operator.remove("leeloo_b", ALPHA.lower()))
        self.assertEqual(answer, {"device_id": "leeloo_b", "crew_code": ALPHA, "online": True})
        self.assertEqual(b.take(), [{"type": "crew_left", "crew_code": ALPHA}])
        self.assertIsNone(b.peer.closed)
        self.clock.advance(PRESENCE_GRACE + 1)
        self.assertEqual([m["type"] for m in a.take()], ["member_offline"])
        self.say(a, "after")
        self.assertEqual(b.take(), [])

    def test_member_gone_from_store(self):
        """
        The member's record goes from the crew and its store: a relay
        started on the store does not hold it.
        """
        self.member("leeloo_a")
        self.member("leeloo_b").close()
        self.done(self.operator.remove("leeloo_b", ALPHA))
        self.assertNotIn("leeloo_b", self.relay.crews[ALPHA].members)
        self.assertEqual([d for (_, d) in self.store.members], ["leeloo_a"])
        again = Relay(self.clock, self.store)
        self.assertEqual(list(again.crews[ALPHA].members), ["leeloo_a"])

    def test_not_a_member(self):
        """
        A device that is not a member, or a crew that does not exist, is
        refused.
        """
        self.member("leeloo_a")
        self.assertRaises(Refused, self.operator.remove, "leeloo_z", ALPHA)
        self.assertRaises(Refused, self.operator.remove, "leeloo_a", BRAVO)


class RenameTests(OperatorTestCase):
    def test_members_online_move(self):
        """
        Members online are told crew_renamed and keep talking in the crew,
        now under its new code.
        """
        a, b = self.member("leeloo_a"), self.member("leeloo_b")
        a.take()
        answer = self.done(self.operator.rename_crew(ALPHA, BRAVO.lower()))
        self.assertEqual(answer, {"old_crew_code": ALPHA, "crew_code": BRAVO, "online": 2})
        self.assertEqual(a.take(), [{"type": "crew_renamed", "crew_code": BRAVO, "old_crew_code": ALPHA}])
        b.take()
        self.say(a, "hello")
        [message] = b.take()
        self.assertEqual((message["payload"], message["crew_code"], message["seq"]), ({"text": "hello"}, BRAVO, 1))

    def test_old_code_on_messages(self):
        """
        A client that names the crew by its old code on a message or an ack
        (it has not taken the new one up) is still heard in the crew; a
        device that is no member there is not.
        """
        a, b = self.member("leeloo_a"), self.member("leeloo_b")
        self.done(self.operator.rename_crew(ALPHA, BRAVO))
        a.take(), b.take()
        self.say(a, "old code", crew_code=ALPHA, client_msg_id="c1")
        [sent] = a.take()
        self.assertEqual((sent["type"], sent["crew_code"]), ("sent", BRAVO))
        [message] = b.take()
        self.assertEqual(message["payload"], {"text": "old code"})
        b.send(type="ack", seq=message["seq"], crew_code=ALPHA)
        self.assertEqual(b.take(), [])
        self.assertEqual(self.relay.crews[BRAVO].members["leeloo_b"].acked_seq, 1)
        c = self.member("leeloo_c", "LEELOO-CCCC")
        c.send(type="message", payload={"text": "x"}, crew_code=ALPHA)
        self.assertEqual(c.take()[0]["error"], "not_in_crew")

    def test_bot_user_follows(self):
        """
        A bot user of the crew that joins or sends with the old code reaches
        it (and is told its new code); another bot user does not.
        """
        a = self.member("leeloo_a")
        self.relay.bot_join_crew("7", ALPHA, "Tina")
        self.done(self.operator.rename_crew(ALPHA, BRAVO))
        a.take()
        self.assertEqual(self.relay.bot_join_crew("7", ALPHA.lower(), "Tina"), (BRAVO, 1))
        self.assertEqual(self.done(self.relay.bot_message("7", ALPHA, "Tina", "text", {"text": "hi"})), 1)
        self.assertEqual([m["payload"] for m in a.take()], [{"text": "hi"}])
        with self.assertRaises(InvalidCrewCode):
            self.relay.bot_join_crew("8", ALPHA, "Tom")

    def test_store_follows(self):
        """
        The store holds the crew, its members and its log under the new
        code, and the old code as an alias: a relay started on it goes on
        where this one was.
        """
        a = self.member("leeloo_a")
        self.member("leeloo_b").close()
        self.say(a, "one")
        self.done(self.operator.rename_crew(ALPHA, BRAVO))
        self.say(a, "two")
        self.assertEqual(list(self.store.crews), [BRAVO])
        self.assertEqual([e.seq for e in self.store.log[BRAVO]], [1, 2])
        self.assertEqual(self.store.aliases, {ALPHA: BRAVO})
        again = Relay(self.clock, self.store)
        self.assertEqual((sorted(again.crews[BRAVO].members), again.crews[BRAVO].fanned_seq),
                         (["leeloo_a", "leeloo_b"], 2))

    def test_deployed_member_finds_it(self):
        """
        A member whose device still has the old code (a deployed device,
        which joins its saved code) is taken to the crew and told its new
        code, and gets what it missed.
        """
        a = self.member("leeloo_a")
        self.member("leeloo_b").close()
        self.done(self.operator.rename_crew(ALPHA, BRAVO))
        self.say(a, "missed")
        b = Device(self.relay)
        b.send(type="join_crew", device_id="leeloo_b", crew_code=ALPHA, display_name="B")
        joined, replayed = b.take()
        self.assertEqual((joined["type"], joined["crew_code"]), ("crew_joined", BRAVO))
        self.assertEqual(replayed["payload"], {"text": "missed"})

    def test_stranger_does_not(self):
        """
        Anyone else naming the old code finds no crew there.
        """
        self.member("leeloo_a")
        self.done(self.operator.rename_crew(ALPHA, BRAVO))
        c = Device(self.relay)
        c.send(type="join_crew", device_id="leeloo_c", crew_code=ALPHA, display_name="C")
        self.assertEqual(c.take()[0]["error"], "invalid_crew_code")

    def test_message_in_flight(self):
        """
        A message the store has not yet taken when the crew is renamed is
        logged and delivered in order with those after it.
        """
        self.store = HeldStore()
        self.relay = Relay(self.clock, self.store)
        a = self.member("leeloo_a")
        self.store.release()
        b = self.member("leeloo_b")
        self.store.release()
        a.take()
        # The store is committing this one while the next waits unnumbered.
        self.say(a, "first")
        self.say(a, "before")
        d = self.relay.operator.rename_crew(ALPHA, BRAVO)
        self.say(a, "after")
        self.store.release()
        self.store.release()
        self.done(d)
        self.assertEqual([(e.seq, e.crew_code) for e in self.store.log[BRAVO]],
                         [(1, BRAVO), (2, BRAVO), (3, BRAVO)])
        self.assertEqual([(m["payload"]["text"], m["seq"]) for m in b.take() if m["type"] == "message"],
                         [("first", 1), ("before", 2), ("after", 3)])

    def test_returning_member_while_it_moves(self):
        """
        A member that comes back before the rename is durable gets what it
        missed once the log has moved.
        """
        self.store = HeldStore()
        self.relay = Relay(self.clock, self.store)
        a = self.member("leeloo_a")
        self.store.release()
        b = self.member("leeloo_b")
        self.store.release()
        b.close()
        self.say(a, "missed")
        self.store.release()
        d = self.relay.operator.rename_crew(ALPHA, BRAVO)
        back = Device(self.relay)
        back.send(type="join_crew", device_id="leeloo_b", crew_code=ALPHA, display_name="B")
        self.assertEqual([m["type"] for m in back.take()], ["crew_joined"])
        self.store.release()
        self.store.release()
        self.done(d)
        self.assertEqual([m["payload"] for m in back.take() if m["type"] == "message"], [{"text": "missed"}])

    def test_refused(self):
        """
        A code another crew has, the crew's own code, or no such crew is
        refused; nothing changes.
        """
        self.member("leeloo_a")
        self.member("leeloo_b", BRAVO)
        self.assertRaises(Refused, self.operator.rename_crew, ALPHA, BRAVO)
        self.assertRaises(Refused, self.operator.rename_crew, ALPHA, ALPHA)
        self.assertRaises(Refused, self.operator.rename_crew, "LEELOO-NONE", "LEELOO-CCCC")
        self.assertEqual(sorted(self.relay.crews), [ALPHA, BRAVO])

    def test_not_onto_another_crews_old_code(self):
        """
        A code another crew was renamed from is refused (its members' devices
        may still use it); the crew's own old code is not.
        """
        self.member("leeloo_a")
        self.member("leeloo_b", BRAVO)
        self.done(self.operator.rename_crew(BRAVO, "LEELOO-CCCC"))
        self.assertRaises(Refused, self.operator.rename_crew, ALPHA, BRAVO)
        self.done(self.operator.rename_crew("LEELOO-CCCC", BRAVO))
        self.assertEqual(sorted(self.relay.crews), [ALPHA, BRAVO])


class DeleteTests(OperatorTestCase):
    def test_members_told_and_closed(self):
        """
        Members online are told crew_deleted, and a connection left in no
        crew is closed with 4004; the crew and its log are gone from the
        relay and its store.
        """
        a, b = self.member("leeloo_a"), self.member("leeloo_b")
        self.say(a, "hi")
        a.take(), b.take()
        self.assertEqual(self.done(self.operator.delete_crew(ALPHA)), {"crew_code": ALPHA, "online": 2, "closed": 2})
        self.assertEqual(a.take(), [{"type": "crew_deleted", "crew_code": ALPHA}])
        self.assertEqual(a.peer.closed[0], CLOSE_OPERATOR)
        self.assertEqual((self.relay.crews, self.store.crews, self.store.log, self.store.members), ({}, {}, {}, {}))

    def test_deployed_device_starts_it_afresh(self):
        """
        A deployed device whose crew was deleted creates it again under its
        saved code when it comes back: an empty crew, whose log starts at 1.
        """
        a = self.member("leeloo_a")
        self.say(a, "old")
        self.done(self.operator.delete_crew(ALPHA))
        a.close()
        b = Device(self.relay)
        b.send(type="join_crew", device_id="leeloo_a", crew_code=ALPHA, display_name="A")
        self.assertEqual(b.take()[0]["error"], "invalid_crew_code")
        b.send(type="create_crew", device_id="leeloo_a", crew_code=ALPHA, display_name="A")
        self.assertEqual(b.take()[0]["type"], "crew_created")
        c = self.member("leeloo_c")
        self.say(b, "new")
        self.assertEqual([(m["payload"]["text"], m["seq"]) for m in c.take() if m["type"] == "message"],
                         [("new", 1)])

    def test_message_in_flight(self):
        """
        A message the store has not yet taken when its crew is deleted goes
        with the crew; the relay's other writes are unaffected.
        """
        self.store = HeldStore()
        self.relay = Relay(self.clock, self.store)
        a = self.member("leeloo_a")
        self.store.release()
        other = self.member("leeloo_b", BRAVO)
        self.store.release()
        # The store is committing this one while the next waits unnumbered.
        self.say(a, "first")
        self.say(a, "before")
        d = self.relay.operator.delete_crew(ALPHA)
        self.say(other, "elsewhere")
        self.store.release()
        self.store.release()
        self.done(d)
        self.assertEqual(list(self.store.crews), [BRAVO])
        self.assertEqual([e.seq for e in self.store.log[BRAVO]], [1])


class ImportTests(OperatorTestCase):
    def test_into_empty_relay(self):
        """
        An import into an empty relay is held by the relay and its store:
        devices find their crews, keys and logs.
        """
        source = MemoryStore()
        old = Relay(self.clock, source)
        a = Device(old)
        a.send(type="create_crew", device_id="leeloo_a", crew_code=ALPHA, display_name="A", device_key="k")
        self.say(a, "kept")
        snapshot = source.load()
        state = Imported(snapshot, [e for entries in source.log.values() for e in entries])
        counts = self.done(self.operator.import_state(state))
        self.assertEqual((counts["crews"], counts["devices"], counts["messages"]), (1, 1, 1))
        self.assertEqual(list(self.store.crews), [ALPHA])
        b = Device(self.relay)
        b.send(type="join_crew", device_id="leeloo_a", crew_code=ALPHA, display_name="A", device_key="wrong")
        self.assertEqual(b.take()[0]["error"], "device_auth_failed")
        c = self.member("leeloo_c")
        self.say(c, "next")
        self.assertEqual([e.seq for e in self.store.log[ALPHA]], [1, 2])

    def test_plain_tokens_sealed(self):
        """
        Pending tokens of an export from before encryption are sealed as
        they are imported (the store never holds them in the clear), and
        still reach their device.
        """
        snapshot = MemoryStore().load()
        snapshot.tokens = [TokenRecord("leeloo_t", {"access_token": "imported-at"}, self.clock.seconds() + 60)]
        self.done(self.operator.import_state(Imported(snapshot)))
        [stored] = self.store.tokens.values()
        self.assertEqual(list(stored.tokens), ["sealed"])
        self.assertNotIn("imported-at", stored.tokens["sealed"])
        device = Device(self.relay)
        device.send(type="register", device_id="leeloo_t")
        self.assertIn({"type": "spotify_auth_complete", "tokens": {"access_token": "imported-at"}}, device.take())

    def test_tokens_of_another_key(self):
        """
        Tokens sealed with another secrets key are refused with a reason
        naming the key; nothing is imported.
        """
        snapshot = MemoryStore().load()
        snapshot.tokens = [TokenRecord("leeloo_t", Sealer().seal_tokens({"access_token": "x"}), 0.0)]
        failure = self.failureResultOf(self.operator.import_state(Imported(snapshot)), Refused)
        self.assertIn("secrets key", str(failure.value))
        self.assertEqual(self.store.tokens, {})

    def test_not_empty(self):
        """
        A relay that holds a crew or a device refuses an import.
        """
        self.member("leeloo_a")
        self.assertRaises(Refused, self.operator.import_state, Imported(MemoryStore().load()))
