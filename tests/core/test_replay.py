"""
L{leeloo.core.replay}: returning devices get what they missed, then
live traffic; acks and C{last_seq} for clients that resume, age filters
and proofs of receipt for deployed devices that never acknowledge.
"""

from twisted.internet.defer import Deferred, succeed

from leeloo.core.defaults import DAY
from leeloo.relay import Relay
from leeloo.store import MemoryStore
from leeloo.testing import Device, strip_keys
from tests.core.support import DeliveryTestCase


class OfflineDeliveryTests(DeliveryTestCase):
    def test_missed_in_order(self):
        """
        A deployed device that was off gets what it missed, in order, right
        after its registered reply, then live traffic.
        """
        a, b = self.device("a"), self.device("b")
        b.close()
        for text in ("one", "two", "three"):
            self.say(a, text)
        back = self.device("b")
        replies = strip_keys(back.take())
        self.assertEqual(replies[0], {"type": "registered", "device_id": "b"})
        self.assertEqual([m["payload"]["text"] for m in replies[1:]], ["one", "two", "three"])
        self.say(a, "live")
        self.assertEqual(back.texts(), ["live"])

    def test_join_crew_and_create_crew_replay(self):
        """
        join_crew and create_crew with an existing code are returns too.
        """
        a = self.device("a")
        for i, how in enumerate([{"type": "join_crew"}, {"type": "create_crew"}]):
            device_id = f"dev{i}"
            self.device(device_id).close()
            self.say(a, f"missed by {device_id}")
            d = Device(self.relay)
            d.send(device_id=device_id, crew_code="alpha", **how)
            self.assertEqual(d.texts(), [f"missed by {device_id}"])

    def test_no_own_messages(self):
        """
        A device's own messages are never replayed to it.
        """
        a, b = self.device("a"), self.device("b")
        self.say(a, "mine")
        a.close()
        self.say(b, "theirs")
        back = self.device("a")
        self.assertEqual(back.texts(), ["theirs"])

    def test_first_join_starts_at_present(self):
        """
        A device joining a crew for the first time gets no history.
        """
        a = self.device("a")
        self.say(a, "before you came")
        newcomer = self.device("new")
        self.assertEqual(newcomer.texts(), [])

    def test_replay_limit_for_legacy(self):
        """
        A device that does not acknowledge gets at most the last
        replay_limit missed messages, and no replay_truncated (deployed
        devices do not know it).
        """
        a, b = self.device("a"), self.device("b")
        b.close()
        for i in range(60):
            self.say(a, str(i))
        back = self.device("b")
        got = back.take()
        self.assertEqual([m["payload"]["text"] for m in got[1:]], [str(i) for i in range(10, 60)])
        self.assertNotIn("replay_truncated", [m["type"] for m in got])

    def test_replay_max_age(self):
        """
        Messages older than the retention window are not replayed.
        """
        a, b = self.device("a"), self.device("b")
        b.close()
        self.say(a, "old")
        self.clock.advance(8 * DAY)
        self.say(a, "new")
        self.assertEqual(self.device("b").texts(), ["new"])

    def test_live_waits_for_replay(self):
        """
        While a returning device's replay is being read, live messages wait,
        and arrive after the replay, in order, without duplicates.
        """
        reads = []

        class SlowReplay(MemoryStore):
            def replay(self, *args):
                d = Deferred()
                reads.append((d, MemoryStore.replay(self, *args)))
                return d

        self.store = SlowReplay()
        self.relay = self.make_relay()
        a, b = self.device("a"), self.device("b")
        b.close()
        self.say(a, "missed")
        back = self.device("b")
        back.take()
        self.say(a, "live during replay")
        self.assertEqual(back.take(), [])
        d, result = reads.pop()
        d.callback(self.successResultOf(result))
        self.assertEqual(back.texts(), ["missed", "live during replay"])

    def test_delivered_seq_survives_reopen(self):
        """
        After a restart the relay still knows how far each device was
        proven to get: a device that proved it saw everything gets nothing
        again.
        """
        a, b = self.device("a"), self.device("b")
        self.say(a, "seen")
        b.prove()
        b.close()
        a.close()
        relay = self.make_relay()
        self.assertEqual(self.device("b", relay=relay).texts(), [])

    def test_online_at_crash_resumes_from_proof(self):
        """
        A legacy member that was online when the relay died without a
        goodbye resumes from what it was proven to receive: what was only
        written to it is sent again, what it proved is not.
        """
        a, b = self.device("a"), self.device("b")
        self.say(a, "proven")
        b.prove()
        self.say(a, "only written")
        self.assertEqual(b.texts(), ["proven", "only written"])
        relay = self.make_relay()  # the old relay vanished: no disconnects
        self.assertEqual(self.device("b", relay=relay).texts(), ["only written"])


class AckTests(DeliveryTestCase):
    replay_limit = 3

    def test_resume_from_last_seq(self):
        """
        A client passing last_seq resumes after it, whatever the relay
        recorded.
        """
        a, b = self.device("a"), self.device("b")
        for text in ("1", "2", "3"):
            self.say(a, text)
        b.close()
        back = self.device("b", last_seq=1)
        self.assertEqual(back.texts(), ["2", "3"])

    def test_ack_is_the_record(self):
        """
        A device that acknowledged is resumed from its acknowledgement.
        """
        a, b = self.device("a"), self.device("b")
        for text in ("1", "2", "3"):
            self.say(a, text)
        b.send(type="ack", seq=2)
        b.close()
        self.assertEqual(self.device("b").texts(), ["3"])

    def test_truncated(self):
        """
        A resuming client that missed more than the limit gets the newest
        and replay_truncated naming what it lost.
        """
        a, b = self.device("a"), self.device("b")
        b.close()
        for i in range(1, 7):
            self.say(a, str(i))
        back = self.device("b", last_seq=0)
        got = back.take()[1:]
        self.assertEqual(got[0], {"type": "replay_truncated", "from_seq": 1, "to_seq": 3, "crew_code": "ALPHA"})
        self.assertEqual([m["seq"] for m in got[1:]], [4, 5, 6])

    def test_ack_from_the_future(self):
        """
        An ack for a sequence the device was never sent is refused, and
        its record is unchanged.
        """
        a, b = self.device("a"), self.device("b")
        self.say(a, "1")
        b.take()
        b.send(type="ack", seq=5)
        [reply] = b.take()
        self.assertEqual((reply["type"], reply["error"]), ("error", "invalid_ack"))
        self.assertIsNone(self.relay.crews["ALPHA"].members["b"].acked_seq)

    def test_bad_last_seq(self):
        """
        A last_seq that is negative, not an integer, or from the future is
        refused with invalid_last_seq, and the device is not registered.
        """
        a = self.device("a")
        self.say(a, "1")
        for bad in (-1, "3", 1.5, True, 99):
            d = Device(self.relay)
            d.send(type="register", device_id="b", crew_code="ALPHA", last_seq=bad)
            [reply] = d.take()
            self.assertEqual((reply["type"], reply["error"]), ("error", "invalid_last_seq"))
            self.assertNotIn("b", self.relay.devices)

    def test_ack_needs_crew(self):
        """
        An ack from a device in no crew is not_in_crew; a malformed ack is
        invalid_message.
        """
        d = Device(self.relay)
        d.send(type="ack", seq=1)
        d.send(type="ack", seq="x")
        self.assertEqual([m["error"] for m in d.take()], ["not_in_crew", "invalid_message"])


class LegacyReplayTests(DeliveryTestCase):
    """
    A device that never acks nor sends last_seq takes every replayed frame
    for a new one: it gets only what is fresh.
    """

    replay_limit = 10

    def make_relay(self, **kwargs):
        kwargs.setdefault("replay_limit", self.replay_limit)
        return Relay(self.clock, self.store, legacy_replay_age=3600, ephemeral_age=60, **kwargs)

    def away(self):
        a, b = self.device("a"), self.device("b")
        b.close()
        return a

    def nudge(self, device, kind):
        self.clock.advance(0.05)
        if kind == "reaction":
            device.send(type="reaction", reaction_type="fire")
        else:
            device.send(type="message", msg_type=kind, payload={"text": kind})

    def test_older_than_legacy_age(self):
        """
        Messages older than legacy_replay_age are not replayed to a legacy
        device.
        """
        a = self.away()
        self.say(a, "old")
        self.clock.advance(3600)
        self.say(a, "new")
        self.assertEqual(self.device("b").texts(), ["new"])

    def test_ephemeral_older_than_ephemeral_age(self):
        """
        Nudges and reactions (both msg_types and the top-level reaction)
        older than ephemeral_age are not replayed to a legacy device; a
        text of the same age is, and fresh ones are.
        """
        a = self.away()
        for kind in ("nudge", "reaction", "top-level"):
            self.nudge(a, "reaction" if kind == "top-level" else kind)
        self.say(a, "text")
        self.clock.advance(61)
        self.nudge(a, "nudge")
        self.nudge(a, "reaction")
        got = [m for m in self.device("b").take() if m.get("replayed")]
        self.assertEqual([(m["type"], m.get("msg_type")) for m in got],
                         [("message", "text"), ("message", "nudge"), ("reaction", None)])

    def test_filters_before_limit(self):
        """
        The age filters apply first, then the replay limit: stale nudges,
        even the newest, do not use it up.
        """
        self.relay = self.make_relay(replay_limit=3)
        a = self.away()
        self.say(a, "one")
        self.say(a, "two")
        for _ in range(5):
            self.nudge(a, "nudge")
        self.clock.advance(61)
        self.assertEqual(self.device("b").texts(), ["one", "two"])

    def test_resuming_clients_keep_everything(self):
        """
        A client that resumes with last_seq gets old messages and stale
        nudges within retention and the limit, with replay_truncated.
        """
        a = self.device("a")
        self.device("c", last_seq=0).close()
        self.say(a, "old")
        self.nudge(a, "nudge")
        self.clock.advance(2 * 3600)
        got = self.device("c", last_seq=0).take()
        self.assertEqual([m.get("msg_type") for m in got if m.get("replayed")], ["text", "nudge"])

    def test_acking_clients_keep_everything(self):
        """
        A device that once acknowledged is no legacy device: it gets old
        messages too.
        """
        a, c = self.device("a"), self.device("c")
        self.say(a, "first")
        c.send(type="ack", seq=c.take()[-1]["seq"])
        c.close()
        self.say(a, "old")
        self.clock.advance(2 * 3600)
        self.assertEqual(self.device("c").texts(), ["old"])

    def test_replayed_flag_and_timestamp(self):
        """
        Every replayed frame carries "replayed": true and the timestamp of
        when it was sent; live frames carry no flag.
        """
        a = self.away()
        self.say(a, "missed")
        sent_at = int(self.clock.seconds() * 1000)
        self.clock.advance(30)
        b = self.device("b")
        [replayed] = [m for m in b.take() if m["type"] == "message"]
        self.say(a, "live")
        [live] = b.take()
        self.assertEqual((replayed["replayed"], replayed["timestamp"]), (True, sent_at))
        self.assertNotIn("replayed", live)


class ProofOfReceiptTests(DeliveryTestCase):
    """
    A legacy device's delivered position moves only on proof of receipt.
    """

    def test_unproven_sent_again(self):
        """
        What was written to a legacy device that went away without proof is
        sent again when it comes back; what it proved is not.
        """
        a, b = self.device("a"), self.device("b")
        self.say(a, "proven")
        b.prove()
        self.say(a, "written")
        b.close()
        self.assertEqual(self.device("b").texts(), ["written"])

    def test_old_mark(self):
        """
        A proof taken before later frames proves only what was sent before
        it.
        """
        a, b = self.device("a"), self.device("b")
        self.say(a, "one")
        mark = self.relay.delivery_mark(b.session)
        self.say(a, "two")
        self.relay.delivered(b.session, mark)
        b.close()
        self.assertEqual(self.device("b").texts(), ["two"])

    def test_mark_from_another_crew(self):
        """
        A proof taken in one crew is not applied after the session moved
        to another.
        """
        a = self.device("a")
        self.device("x", crew="BRAVO")
        b = self.device("b")
        self.say(a, "one")
        self.assertEqual(b.texts(), ["one"])
        mark = self.relay.delivery_mark(b.session)
        b.send(type="join_crew", crew_code="bravo")
        self.relay.delivered(b.session, mark)
        self.assertEqual(self.relay.crews["BRAVO"].members["b"].delivered_seq, 0)
        b.send(type="join_crew", crew_code="alpha")
        self.assertEqual(b.texts(), ["one"])

    def test_proof_stored(self):
        """
        The proven position is written to the store as it moves, so a
        relay that dies without a goodbye resumes from it.
        """
        a, b = self.device("a"), self.device("b")
        self.say(a, "one")
        b.prove()
        self.assertEqual(self.store.members[("ALPHA", "b")].delivered_seq, 1)

    def test_acking_clients_unchanged(self):
        """
        A client that resumes with last_seq keeps today's accounting:
        what was sent counts when it goes away.
        """
        a, c = self.device("a"), self.device("c", last_seq=0)
        self.say(a, "sent")
        c.close()
        self.assertEqual(self.device("c").texts(), [])


class BugRecoveryTests(DeliveryTestCase):
    """
    A bug in a step of one of the core's Deferred chains is logged as a
    failure and recovered from; it is never left unhandled, and the relay
    goes on serving.
    """

    def test_replay_bug_stops_holding(self):
        """
        A bug while sending a returning device its replay is logged; that
        device no longer holds live traffic back and is closed with 1011 (it
        reconnects and is replayed again).
        """
        class BrokenReplay(MemoryStore):
            def replay(self, *args):
                return succeed(None)  # not a Replay: _replayed fails on it

        self.store = BrokenReplay()
        self.relay = self.make_relay()
        a, b = self.device("a"), self.device("b")
        b.close()
        self.say(a, "missed")
        back = self.device("b")
        self.assertEqual(len(self.flushLoggedErrors(AttributeError)), 1)
        self.assertIsNone(back.session.primary.held)
        self.assertEqual(back.peer.closed[0], 1011)
        self.assertFalse(a.peer.closed)


class FigureTests(DeliveryTestCase):
    def test_replayed_counted(self):
        """
        Messages sent from a crew's log to a device coming back are
        counted as replayed, not as deliveries.
        """
        a, b = self.device("a"), self.device("b")
        b.send(type="ack", seq=0)
        b.close()
        for n in range(3):
            self.say(a, str(n))
        back = self.device("b")
        self.assertEqual(back.texts(), ["0", "1", "2"])
        stats = self.relay.stats()
        self.assertEqual((stats.replayed, stats.deliveries), (3, 0))
