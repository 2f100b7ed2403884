"""
Bounded under attack, in the core: crew codes that run out, entries that
count, presence churn, resends, durable answers, the crew log's bound and
the store's back-pressure.  Plain calls, a recording FakePeer and a Clock.
"""

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from leeloo.limits import Rate, RelayLimits
from leeloo.messages import CrewLimit, StoreUnavailable
from leeloo.relay import CODE_TRIES, DAY, MAX_GENERATED_CODE_LENGTH, PRESENCE_GRACE, Relay
from leeloo.store import MemoryStore
from leeloo.testing import Device, FailingMemoryStore

T0 = 1_700_000_000.0


class HeldStore(MemoryStore):
    """
    A MemoryStore whose writes wait until the test releases them (C{held}
    holds a Deferred per write; firing it applies the write).
    """

    def __init__(self):
        super().__init__()
        self.held = []

    def write(self, ops):
        d = Deferred()
        self.held.append(d)
        return d.addCallback(lambda _: MemoryStore.write(self, ops))

    def release(self):
        while self.held:
            self.held.pop(0).callback(None)


class BoundsTestCase(SynchronousTestCase):
    limits = RelayLimits(messages=Rate(1000, 1000), entries=Rate.per_window(1000, 600))

    def setUp(self):
        self.clock = Clock()
        self.clock.advance(T0)
        self.store = FailingMemoryStore()
        self.relay = self.make_relay()

    def make_relay(self, **kwargs):
        kwargs.setdefault("limits", self.limits)
        return Relay(self.clock, self.store, **kwargs)

    def device(self, address="192.0.2.1"):
        return Device(self.relay, address)

    def member(self, device_id, code="ALPHA", name=None):
        d = self.device()
        d.send(type="register", device_id=device_id, crew_code=code, device_name=name or device_id)
        d.take()
        return d


class CrewCodeTests(BoundsTestCase):
    def test_longer_code_when_taken(self):
        """
        When random codes keep naming existing crews, the relay tries a
        few, then makes codes one character longer.
        """
        calls = []

        def same(length):
            calls.append(length)
            return "LEELOO-" + "A" * length

        self.relay = self.make_relay(crew_code=same)
        a, b = self.device(), self.device()
        a.send(type="create_crew")
        b.send(type="create_crew")
        self.assertEqual([a.take()[0]["crew_code"], b.take()[0]["crew_code"]], ["LEELOO-AAAA", "LEELOO-AAAAA"])
        self.assertEqual(calls, [4] + [4] * CODE_TRIES + [5])

    def test_codes_run_out(self):
        """
        When no code up to the longest is free, create_crew is answered
        crew_limit after a bounded number of tries, and the connection
        still works.
        """
        calls = []

        def one(length):
            calls.append(length)
            if len(calls) > 1000:
                raise AssertionError("the code search does not end")
            return "LEELOO-ONLY"

        self.relay = self.make_relay(crew_code=one)
        a, b = self.device(), self.device()
        a.send(type="create_crew")
        del calls[:]
        b.send(type="create_crew")
        [error] = b.take()
        self.assertEqual(error["error"], "crew_limit")
        self.assertEqual(len(calls), CODE_TRIES * (MAX_GENERATED_CODE_LENGTH - 4 + 1))
        b.send(type="ping")
        self.assertEqual(b.take(), [{"type": "pong"}])

    def test_bot_codes_run_out(self):
        """
        The bot API's crew creation gives up with CrewLimit too.
        """
        self.relay = self.make_relay(crew_code=lambda length: "LEELOO-ONLY")
        self.successResultOf(self.relay.bot_create_crew("1", "Tina"))
        self.assertRaises(CrewLimit, self.relay.bot_create_crew, "2", "Tom")


class EntryBudgetTests(BoundsTestCase):
    limits = RelayLimits(messages=Rate(1000, 1000), entries=Rate.per_window(3, 600))

    def test_create_without_code_counts(self):
        """
        create_crew without a code spends the connection's entry budget.
        """
        d = self.device()
        for _ in range(3):
            d.send(type="create_crew", device_id="leeloo_aaaaaaaaaaaa")
            self.assertEqual(d.types(), ["crew_created"])
        d.send(type="create_crew", device_id="leeloo_aaaaaaaaaaaa")
        [error] = d.take()
        self.assertEqual(error["error"], "rate_limited")

    def test_creates_count_per_address(self):
        """
        New connections from the same address share its entry budget.
        """
        for _ in range(3):
            d = self.device()
            d.send(type="create_crew", crew_code="X" + str(len(self.relay.crews)))
            self.assertEqual(d.types(), ["crew_created"])
        d = self.device()
        d.send(type="create_crew")
        self.assertEqual(d.take()[0]["error"], "rate_limited")
        other = self.device("192.0.2.99")
        other.send(type="create_crew")
        self.assertEqual(other.types(), ["crew_created"])

    def test_returning_member_create_free(self):
        """
        A member's create_crew naming its own crew (a deployed device
        coming back) costs nothing.
        """
        d = self.device()
        d.send(type="create_crew", device_id="leeloo_aaaaaaaaaaaa", crew_code="HOME")
        d.take()
        for _ in range(5):
            again = self.device("192.0.2.1")
            again.send(type="create_crew", device_id="leeloo_aaaaaaaaaaaa", crew_code="HOME")
            self.assertEqual(again.types(), ["crew_created"])

    def test_register_new_device_ids_count(self):
        """
        Registering device ids the relay has never seen spends the budget;
        a known id registers freely.
        """
        for i in range(3):
            d = self.device()
            d.send(type="register", device_id=f"leeloo_{i:012x}")
            self.assertEqual(d.types(), ["registered"])
        d = self.device()
        d.send(type="register", device_id="leeloo_ffffffffffff")
        self.assertEqual(d.take()[0]["error"], "rate_limited")
        d = self.device()
        d.send(type="register")
        self.assertEqual(d.take()[0]["error"], "rate_limited")
        known = self.device()
        known.send(type="register", device_id="leeloo_000000000000")
        self.assertEqual(known.types(), ["registered"])


class DevicePruneTests(BoundsTestCase):
    def test_unused_device_pruned(self):
        """
        A device id in no crew and not seen for the crew TTL is forgotten,
        in memory and in the store.
        """
        d = self.device()
        d.send(type="register", device_id="leeloo_aaaaaaaaaaaa")
        d.close()
        self.clock.advance(self.relay.crew_ttl + 1)
        self.successResultOf(self.relay.prune())
        self.assertNotIn("leeloo_aaaaaaaaaaaa", self.relay.device_keys)
        self.assertNotIn("leeloo_aaaaaaaaaaaa", self.store.devices)

    def test_seen_device_kept(self):
        """
        A device id in no crew that registered within the crew TTL is kept.
        """
        d = self.device()
        d.send(type="register", device_id="leeloo_aaaaaaaaaaaa")
        d.close()
        self.clock.advance(self.relay.crew_ttl - DAY)
        again = self.device()
        again.send(type="register", device_id="leeloo_aaaaaaaaaaaa")
        again.close()
        self.clock.advance(2 * DAY)
        self.successResultOf(self.relay.prune())
        self.assertIn("leeloo_aaaaaaaaaaaa", self.store.devices)

    def test_member_device_kept(self):
        """
        A device that belongs to a crew keeps its record, however long ago
        it was created.
        """
        self.member("leeloo_aaaaaaaaaaaa").close()
        self.member("leeloo_bbbbbbbbbbbb")
        self.clock.advance(self.relay.crew_ttl + 1)
        self.successResultOf(self.relay.prune())
        self.assertIn("leeloo_aaaaaaaaaaaa", self.store.devices)

    def test_online_device_kept(self):
        """
        A device online now keeps its record.
        """
        d = self.device()
        d.send(type="register", device_id="leeloo_aaaaaaaaaaaa")
        self.clock.advance(self.relay.crew_ttl + 1)
        self.successResultOf(self.relay.prune())
        self.assertIn("leeloo_aaaaaaaaaaaa", self.relay.device_keys)


class PresenceTests(BoundsTestCase):
    def test_blip_unannounced(self):
        """
        A device that disconnects and is back within the grace is announced
        neither offline nor joined.
        """
        victim, blip = self.member("v"), self.member("b")
        victim.take()
        blip.close()
        self.clock.advance(PRESENCE_GRACE - 1)
        back = self.device()
        back.send(type="join_crew", crew_code="ALPHA", device_id="b")
        self.clock.advance(PRESENCE_GRACE)
        self.assertEqual(victim.take(), [])

    def test_away_past_grace_announced(self):
        """
        Away longer than the grace: offline once it passes, then joined.
        """
        victim, away = self.member("v"), self.member("b", name="Bea")
        away.close()
        self.clock.advance(PRESENCE_GRACE)
        back = self.device()
        back.send(type="join_crew", crew_code="ALPHA", device_id="b", display_name="Bea")
        self.assertEqual(victim.take(), [
            {"type": "member_offline", "device_id": "b", "display_name": "Bea"},
            {"type": "member_joined", "device_id": "b", "display_name": "Bea"},
        ])

    def test_crew_hopping_quiet(self):
        """
        Devices alternating between two crews send the crews' other members
        no presence frames after their first arrival.
        """
        victim = self.member("v", "ALPHA")
        other = self.member("w", "BETA")
        hoppers = [self.member(f"h{i}", "ALPHA") for i in range(3)]
        victim.take()
        for _ in range(20):
            for h in hoppers:
                h.send(type="join_crew", crew_code="BETA")
            for h in hoppers:
                h.send(type="join_crew", crew_code="ALPHA")
        self.clock.advance(PRESENCE_GRACE)
        self.assertEqual(victim.take(), [])
        self.assertEqual(other.types(), ["member_joined"] * 3 + ["member_offline"] * 3)

    def test_newcomer_hears_return(self):
        """
        A member who arrived while a device was briefly away hears it join
        when it comes back.
        """
        self.member("b", name="Bea").close()
        newcomer = self.device()
        newcomer.send(type="join_crew", crew_code="ALPHA", device_id="n")
        newcomer.take()
        back = self.device()
        back.send(type="join_crew", crew_code="ALPHA", device_id="b", display_name="Bea")
        self.assertEqual(newcomer.take(), [{"type": "member_joined", "device_id": "b", "display_name": "Bea"}])

    def test_stop_cancels_announcements(self):
        """
        When the relay stops, no announcement is left waiting on the clock.
        """
        v = self.member("v")
        self.member("b").close()
        done = self.relay.shutdown(spread=0)
        # Its connection ends after the 1001, as a real transport's does.
        v.close()
        self.successResultOf(done)
        self.assertEqual(self.clock.getDelayedCalls(), [])


class ResendTests(BoundsTestCase):
    def test_resend_under_another_name(self):
        """
        A resend after reconnecting under another display name is answered
        as the same message, not refused as a duplicate.
        """
        self.member("r")
        a = self.device()
        a.send(type="join_crew", crew_code="ALPHA", device_id="a", display_name="Ann")
        a.take()
        a.send(type="message", payload={"text": "hi"}, client_msg_id="c1")
        [sent] = a.take()
        a.close()
        b = self.device()
        b.send(type="join_crew", crew_code="ALPHA", device_id="a", display_name="Annie")
        b.take()
        b.send(type="message", payload={"text": "hi"}, client_msg_id="c1")
        self.assertEqual(b.take(), [sent])

    def test_different_body_still_refused(self):
        """
        The same client_msg_id with another body is still refused.
        """
        a = self.member("a")
        a.send(type="message", payload={"text": "hi"}, client_msg_id="c1")
        a.take()
        a.send(type="message", payload={"text": "ho"}, client_msg_id="c1")
        self.assertEqual(a.take()[0]["error"], "duplicate_client_msg_id")


class StoreRefusalTests(BoundsTestCase):
    def test_refusal_names_client_msg_id(self):
        """
        store_unavailable carries the client_msg_id of the message it
        refuses.
        """
        a = self.member("a")
        self.store.fail_with = OSError("disk full")
        a.send(type="message", payload={"text": "hi"}, client_msg_id="c7")
        [error] = a.take()
        self.assertEqual((error["error"], error["client_msg_id"]), ("store_unavailable", "c7"))

    def test_refusal_spends_no_sequence(self):
        """
        A message the store refused leaves no gap: the next one takes the
        sequence number it would have had.
        """
        a, b = self.member("a"), self.member("b")
        a.send(type="message", payload={"text": "one"})
        self.store.fail_with = OSError("disk full")
        a.send(type="message", payload={"text": "lost"}, client_msg_id="c2")
        self.store.fail_with = None
        self.clock.advance(1)
        a.send(type="message", payload={"text": "two"}, client_msg_id="c3")
        self.assertEqual([(m["payload"]["text"], m["seq"]) for m in b.take() if m["type"] == "message"],
                         [("one", 1), ("two", 2)])
        self.assertEqual([e.seq for e in self.store.log["ALPHA"]], [1, 2])


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

    def test_bot_crew_once_stored(self):
        """
        The bot API's new crew fires with its code only once stored.
        """
        d = self.relay.bot_create_crew("1", "Tina")
        self.assertNoResult(d)
        self.store.release()
        self.assertIn(self.successResultOf(d), self.store.crews)

    def test_bot_crew_not_stored(self):
        """
        A bot crew the store refuses fails with StoreUnavailable.
        """
        self.store = FailingMemoryStore()
        self.relay = self.make_relay()
        self.store.fail_with = OSError("disk full")
        d = self.relay.bot_create_crew("1", "Tina")
        self.clock.advance(self.relay.journal.retry_delay)
        self.failureResultOf(d, StoreUnavailable)


class CrewLogBoundTests(BoundsTestCase):
    def test_log_capped(self):
        """
        A crew's stored log stays within --crew-log-bytes: the oldest go,
        the newest stay.
        """
        self.relay = self.make_relay(crew_log_bytes=20_000, replay_limit=5)
        a = self.member("a")
        for i in range(100):
            a.send(type="message", payload={"text": "x" * 1000, "n": i})
        log = self.store.log["ALPHA"]
        self.assertLessEqual(sum(len(e.payload) for e in log), 20_000)
        self.assertEqual(log[-1].seq, 100)
        self.assertGreater(len(log), 5)

    def test_replay_window_kept(self):
        """
        The newest --replay-limit messages stay however large they are.
        """
        self.relay = self.make_relay(crew_log_bytes=5_000, replay_limit=8)
        a = self.member("a")
        for i in range(30):
            a.send(type="message", payload={"text": "x" * 1000, "n": i})
        self.assertEqual([e.seq for e in self.store.log["ALPHA"]][-8:], list(range(23, 31)))
        self.assertGreaterEqual(len(self.store.log["ALPHA"]), 8)

    def test_restart_knows_log_size(self):
        """
        A restarted relay knows how big each crew's log is, and keeps it
        bounded from there.
        """
        relay = self.make_relay(crew_log_bytes=1_000_000)
        a = Device(relay, "192.0.2.1")
        a.send(type="register", device_id="a", crew_code="ALPHA")
        for i in range(30):
            a.send(type="message", payload={"text": "x" * 1000})
        self.relay = self.make_relay(crew_log_bytes=20_000, replay_limit=5)
        self.assertGreater(self.relay.crews["ALPHA"].log_bytes, 30_000)
        b = self.member("b")
        b.send(type="message", payload={"text": "y"})
        self.assertLessEqual(sum(len(e.payload) for e in self.store.log["ALPHA"]), 20_000)


class BackPressureTests(BoundsTestCase):
    def setUp(self):
        super().setUp()
        self.store = HeldStore()
        self.relay = self.make_relay(store_queue_bytes=10_000)
        self.a, self.b = self.member("a"), self.member("b")
        self.store.release()

    def test_paused_past_bound(self):
        """
        While more than --store-queue-bytes wait for the store, the relay
        stops reading from the senders; it reads again once the store has
        caught up.
        """
        text = "x" * 1000
        while not self.a.peer.paused:
            self.a.send(type="message", payload={"text": text})
            self.assertLess(self.relay.journal.backlog, 20_000)
        self.assertFalse(self.b.peer.paused)
        self.store.release()
        self.assertFalse(self.a.peer.paused)
        self.assertEqual(self.relay.paused, set())

    def test_quiet_sender_not_paused(self):
        """
        Below the bound nobody is paused.
        """
        self.a.send(type="message", payload={"text": "x" * 1000})
        self.assertFalse(self.a.peer.paused)

    def test_disconnect_forgets_paused(self):
        """
        A paused sender that disconnects is not remembered.
        """
        while not self.a.peer.paused:
            self.a.send(type="message", payload={"text": "x" * 1000})
        self.a.close()
        self.assertEqual(self.relay.paused, set())


class RefusedCreateTests(BoundsTestCase):
    limits = RelayLimits(messages=Rate(1000, 1000), entries=Rate.per_window(1, 600))

    def test_refused_create_searches_no_code(self):
        """
        A create_crew refused by the entry budget does not search for a code.
        """
        calls = []
        self.relay = self.make_relay(crew_code=lambda length: calls.append(length) or f"LEELOO-{len(calls)}")
        d = self.device()
        d.send(type="create_crew")
        d.take()
        del calls[:]
        d.send(type="create_crew")
        self.assertEqual((d.take()[0]["error"], calls), ("rate_limited", []))
