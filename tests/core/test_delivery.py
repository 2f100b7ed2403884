"""
L{leeloo.core.delivery}: publishing to a crew's log before fan-out,
sequence numbers, C{client_msg_id} answered once durable and never
stored twice, the store's refusals and back-pressure, and the crew
log's bound.
"""

from twisted.internet.defer import Deferred, succeed

from leeloo.store import MemoryStore
from leeloo.testing import Device
from tests.core.support import BoundsTestCase, DeliveryTestCase, HeldStore, RelayTestCase


class FanoutTests(RelayTestCase):
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
        self.assertEqual(sent, {"type": "sent", "client_msg_id": "c1", "id": got["id"], "seq": got["seq"],
                                "crew_code": "ALPHA"})

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


class BugRecoveryTests(DeliveryTestCase):
    """
    A bug in a step of one of the core's Deferred chains is logged as a
    failure and recovered from; it is never left unhandled, and the relay
    goes on serving.
    """

    def test_publish_bug_closes_the_sender(self):
        """
        A bug after a message was stored (an unexpected failure, not a
        ProtocolError) is logged and its sender closed with 1011, not left
        unhandled; the others go on.
        """
        a, b = self.device("a"), self.device("b")
        a.take(), b.take()
        fanout = self.relay.fanout.publish

        def broken(*args, **kwargs):
            raise ZeroDivisionError("a bug")

        self.patch(self.relay.fanout, "publish", broken)
        self.say(a, "boom")
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)
        self.assertEqual(a.peer.closed[0], 1011)
        self.patch(self.relay.fanout, "publish", fanout)
        self.say(b, "still here")
        self.assertFalse(b.peer.closed)
        self.assertEqual([m["type"] for m in b.take()], [])
        self.assertEqual(a.texts(), ["still here"])

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


class FigureTests(DeliveryTestCase):
    """
    What Delivery counts for the metrics: plain counters, read through
    Relay.stats().
    """

    def test_received_by_kind(self):
        """
        Crew messages are counted by kind: the msg_types devices send, any
        other msg_type as other, share_music as song_push and a reaction
        frame as reaction; the bot's messages too.  Other frames are not
        crew messages.
        """
        from leeloo.core.delivery import MESSAGE_KINDS

        a, _ = self.device("a"), self.device("b")
        for msg_type in ("text", "text", "nudge", "hang_propose", "hang_confirm", "song_push", "new-feature"):
            a.send(type="message", msg_type=msg_type, payload={})
        a.send(type="message", payload={"text": "default"})
        a.send(type="share_music", spotify_uri="spotify:track:1", artist="A", track="T", album="B")
        a.send(type="reaction", reaction_type="love")
        a.send(type="message", msg_type="reaction", payload={"reaction": "fire"})
        a.send(type="ping")
        self.relay.bot_join_crew("42", "ALPHA", "Bot")
        self.successResultOf(self.relay.bot_message("42", "ALPHA", "Bot", "text", {"text": "hi"}))
        received = self.relay.stats().messages_received
        self.assertEqual(received, {"text": 4, "reaction": 2, "song_push": 2, "nudge": 1, "hang_propose": 1,
                                    "hang_confirm": 1, "other": 1})
        self.assertEqual(tuple(received), MESSAGE_KINDS)

    def test_deliveries(self):
        """
        A delivery is one crew message fanned out live to one device: the
        sender, a resend answered from memory and presence messages are
        not deliveries.
        """
        a, b, c = self.device("a"), self.device("b"), self.device("c")
        a.send(type="message", payload={"text": "one"}, client_msg_id="m1")
        a.send(type="message", payload={"text": "one"}, client_msg_id="m1")
        c.close()
        self.say(b, "two")
        stats = self.relay.stats()
        self.assertEqual((stats.deliveries, sum(stats.messages_received.values())), (2 + 1, 2))

    def test_fanout_sampled(self):
        """
        The first crew message's fan-out is timed, then one in
        FANOUT_SAMPLE_EVERY.
        """
        from leeloo.core.delivery import FANOUT_SAMPLE_EVERY

        a, _ = self.device("a"), self.device("b")
        for n in range(FANOUT_SAMPLE_EVERY + 1):
            self.say(a, str(n))
        self.assertEqual(self.relay.stats().fanout_seconds.count, 2)
        self.say(a, "again")
        self.assertEqual(self.relay.stats().fanout_seconds.count, 2)

    def test_fanout_time_includes_the_store(self):
        """
        A fan-out is timed from the message's receipt to the last write to
        its crew, its store commit included.
        """
        self.store = HeldStore()
        self.relay = self.make_relay()
        a, b = self.device("a"), self.device("b")
        self.store.release()
        a.send(type="message", payload={"text": "slow"})
        self.clock.advance(0.3)
        self.store.release()
        self.assertEqual(b.texts(), ["slow"])
        figures = self.relay.stats().fanout_seconds
        self.assertEqual(figures.count, 1)
        self.assertAlmostEqual(figures.sum, 0.3)
        buckets = dict(figures.cumulative())
        self.assertEqual((buckets["0.25"], buckets["0.5"]), (0, 1))
