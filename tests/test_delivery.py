"""
Nothing lost: every crew fan-out is logged with a sequence number before it
is delivered, returning devices get what they missed, acknowledging clients
get each message exactly once, and retention keeps the log bounded.  The
core is driven with a FakePeer, a Clock and a store.
"""

from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from leeloo.relay import DAY, Relay
from leeloo.store import MemoryStore, StoreError
from leeloo import web
from leeloo.testing import Device, FailingMemoryStore, strip_keys

T0 = 1_700_000_000.0


class DeliveryTestCase(SynchronousTestCase):
    replay_limit = 50

    def setUp(self):
        self.clock = Clock()
        self.clock.advance(T0)
        self.store = FailingMemoryStore()
        self.relay = self.make_relay()

    def make_relay(self, **kwargs):
        return Relay(self.clock, self.store, replay_limit=self.replay_limit, **kwargs)

    def device(self, device_id, crew="ALPHA", relay=None, **extra):
        d = Device(relay or self.relay)
        d.send(type="register", device_id=device_id, crew_code=crew, device_name=device_id.title(), **extra)
        return d

    def say(self, device, text, **extra):
        self.clock.advance(0.05)  # a person's pace, within the message rate limit
        device.send(type="message", payload={"text": text}, **extra)


class SequenceTests(DeliveryTestCase):
    def test_fanout_carries_seq_and_id(self):
        """
        Every crew fan-out carries a per-crew seq, counting from 1, and a
        message id; other crews count on their own.
        """
        a, b = self.device("a"), self.device("b")
        x, y = self.device("x", "BETA"), self.device("y", "BETA")
        for d in (a, b, x, y):
            d.take()
        self.say(a, "one")
        a.send(type="share_music", spotify_uri="u", artist="A", track="T", album="B")
        a.send(type="reaction", reaction_type="love")
        self.say(x, "other crew")
        got = b.take()
        self.assertEqual([m["seq"] for m in got], [1, 2, 3])
        self.assertEqual(len({m["id"] for m in got}), 3)
        self.assertEqual(y.take()[0]["seq"], 1)

    def test_logged_before_delivered(self):
        """
        A message is delivered only once its store write has committed.
        """
        pending = []

        class SlowStore(MemoryStore):
            def write(self, ops):
                d = Deferred()
                pending.append((d, ops))
                return d

        self.store = SlowStore()
        self.relay = self.make_relay()
        a, b = self.device("a"), self.device("b")
        while pending:
            pending.pop(0)[0].callback(None)
        a.take(), b.take()
        self.say(a, "hello")
        self.assertEqual(b.take(), [])
        d, ops = pending.pop(0)
        self.assertEqual([kind for kind, _ in ops], ["append"])
        d.callback(None)
        self.assertEqual(b.texts(), ["hello"])

    def test_bot_messages_logged(self):
        """
        Bot messages are logged and replayed like device messages.
        """
        a = self.device("a")
        a.close()
        self.relay.bot_join_crew("7", "ALPHA", "Tom")
        self.relay.bot_message("7", "ALPHA", "Tom", "text", {"text": "from telegram"})
        back = self.device("a")
        self.assertEqual(back.texts(), ["from telegram"])


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
        self.assertEqual(got[0], {"type": "replay_truncated", "from_seq": 1, "to_seq": 3})
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


class ClientMessageIdTests(DeliveryTestCase):
    def test_sent_once_durable(self):
        """
        A message with client_msg_id is answered sent with its id and seq.
        """
        a, b = self.device("a"), self.device("b")
        a.take(), b.take()
        self.say(a, "hi", client_msg_id="c1")
        [sent] = a.take()
        [got] = b.take()
        self.assertEqual(sent, {"type": "sent", "client_msg_id": "c1", "id": got["id"], "seq": got["seq"]})

    def test_resend_not_delivered_twice(self):
        """
        A resend with the same client_msg_id (after a reconnect) is answered
        sent again and neither stored nor delivered twice.
        """
        a, b = self.device("a"), self.device("b")
        a.take(), b.take()
        self.say(a, "hi", client_msg_id="c1")
        first = a.take()
        a.close()
        again = self.device("a")
        again.take()
        self.say(again, "hi", client_msg_id="c1")
        self.assertEqual(again.take(), first)
        self.assertEqual(b.texts(), ["hi"])
        self.assertEqual(len(self.store.log["ALPHA"]), 1)

    def test_resend_after_restart(self):
        """
        The relay remembers client_msg_ids across a restart.
        """
        a = self.device("a")
        self.say(a, "hi", client_msg_id="c1")
        relay = self.make_relay()
        back = self.device("a", relay=relay)
        back.take()
        self.say(back, "hi", client_msg_id="c1")
        [sent] = back.take()
        self.assertEqual((sent["type"], sent["seq"]), ("sent", 1))
        self.assertEqual(len(self.store.log["ALPHA"]), 1)

    def test_same_id_different_body(self):
        """
        Reusing a client_msg_id for a different message is refused; the log
        and the crew are unaffected.
        """
        a, b = self.device("a"), self.device("b")
        a.take(), b.take()
        self.say(a, "hi", client_msg_id="c1")
        a.take(), b.take()
        self.say(a, "something else", client_msg_id="c1")
        [reply] = a.take()
        self.assertEqual((reply["type"], reply["error"]), ("error", "duplicate_client_msg_id"))
        self.assertEqual(b.take(), [])
        self.assertEqual(len(self.store.log["ALPHA"]), 1)

    def test_ids_are_per_sender(self):
        """
        Two devices may use the same client_msg_id.
        """
        a, b = self.device("a"), self.device("b")
        self.say(a, "from a", client_msg_id="same")
        self.say(b, "from b", client_msg_id="same")
        self.assertEqual(len(self.store.log["ALPHA"]), 2)


class StoreFailureTests(DeliveryTestCase):
    def test_store_unavailable(self):
        """
        When the store fails, the sender gets store_unavailable, nothing is
        delivered, connections stay, and sending works again once the store
        recovers.
        """
        a, b = self.device("a"), self.device("b")
        a.take(), b.take()
        self.store.fail_with = OSError("database or disk is full")
        self.say(a, "lost?", client_msg_id="c1")
        [reply] = a.take()
        self.assertEqual((reply["type"], reply["error"]), ("error", "store_unavailable"))
        self.assertEqual(b.take(), [])
        self.assertEqual(len(self.flushLoggedErrors()), 0)
        self.store.fail_with = None
        self.clock.advance(1)
        self.say(a, "lost?", client_msg_id="c1")
        self.assertEqual(a.take()[0]["type"], "sent")
        self.assertEqual(b.texts(), ["lost?"])

    def test_state_retried(self):
        """
        Crew and membership writes that fail are retried until the store
        recovers.
        """
        self.store.fail_with = StoreError("locked")
        self.device("a", crew="NEWCREW")
        self.assertNotIn("NEWCREW", self.store.crews)
        self.store.fail_with = None
        self.clock.advance(1)
        self.assertIn("NEWCREW", self.store.crews)
        self.assertIn(("NEWCREW", "a"), self.store.members)


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

    def test_publish_bug_closes_the_sender(self):
        """
        A bug after a message was stored (an unexpected failure, not a
        ProtocolError) is logged and its sender closed with 1011, not left
        unhandled; the others go on.
        """
        a, b = self.device("a"), self.device("b")
        a.take(), b.take()
        fanout = self.relay.crews_part.fanout

        def broken(*args, **kwargs):
            raise ZeroDivisionError("a bug")

        self.patch(self.relay.crews_part, "fanout", broken)
        self.say(a, "boom")
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)
        self.assertEqual(a.peer.closed[0], 1011)
        self.patch(self.relay.crews_part, "fanout", fanout)
        self.say(b, "still here")
        self.assertFalse(b.peer.closed)
        self.assertEqual([m["type"] for m in b.take()], [])
        self.assertEqual(a.texts(), ["still here"])

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

    def test_trim_bug_retried(self):
        """
        A bug while trimming a crew's log is logged, and the crew does not
        stay marked as trimming: the next message past the bound trims
        again.
        """
        trims = []

        class BrokenTrim(MemoryStore):
            def trim(self, *args):
                trims.append(args)
                return succeed(None)  # not a (first_kept, left) pair

        self.store = BrokenTrim()
        self.relay = self.make_relay(crew_log_bytes=2_000)
        a = self.device("a")
        for i in range(3):
            self.say(a, "x" * 1000)
        self.assertGreaterEqual(len(self.flushLoggedErrors(TypeError)), 1)
        self.assertIsNone(self.relay.crews["ALPHA"].trimming)
        before = len(trims)
        self.say(a, "x" * 1000)
        self.assertEqual(len(trims), before + 1)
        self.flushLoggedErrors(TypeError)


class RetentionTests(DeliveryTestCase):
    def test_prune_old_messages(self):
        """
        prune drops log entries older than the retention window, keeping
        each crew's newest.
        """
        a = self.device("a")
        for text in ("1", "2", "3"):
            self.say(a, text)
        self.clock.advance(8 * DAY)
        self.say(a, "4")
        deleted, crews = self.successResultOf(self.relay.prune())
        self.assertEqual((deleted, crews), (3, 0))
        self.assertEqual([e.seq for e in self.store.log["ALPHA"]], [4])

    def test_newest_client_msg_id_remembered(self):
        """
        The crew's newest message (which the store keeps past retention)
        stays known by its client_msg_id: a resend of it is answered sent,
        not stored again.
        """
        a = self.device("a")
        self.say(a, "only", client_msg_id="c1")
        a.take()
        self.clock.advance(8 * DAY)
        self.successResultOf(self.relay.prune())
        self.say(a, "only", client_msg_id="c1")
        self.assertEqual(a.take()[0]["type"], "sent")
        self.assertEqual(len(self.store.log["ALPHA"]), 1)

    def test_prune_idle_crews(self):
        """
        A crew with no message and no member seen for crew_ttl is forgotten,
        in memory and in the store; an active crew is kept.
        """
        self.device("a", crew="OLD").close()
        self.clock.advance(80 * DAY)
        busy = self.device("b", crew="BUSY")
        self.clock.advance(11 * DAY)
        deleted, crews = self.successResultOf(self.relay.prune())
        self.assertEqual(crews, 1)
        self.assertNotIn("OLD", self.relay.crews)
        self.assertNotIn("OLD", self.store.crews)
        self.assertIn("BUSY", self.relay.crews)
        busy.send(type="ping")
        self.assertEqual(busy.take()[-1], {"type": "pong"})


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


class BotUserRestoreTests(DeliveryTestCase):
    def test_user_crews_restored(self):
        """
        A restarted relay still knows which crews a bot user is in.
        """
        self.device("a", crew="HOME")
        self.relay.bot_join_crew("7", "home", "Tina")
        relay = self.make_relay()
        self.assertEqual([web.bot_crew(c) for c in relay.bot_user_crews("7")],
                         [{"crew_code": "HOME", "display_name": "Tina", "devices_online": 0}])
