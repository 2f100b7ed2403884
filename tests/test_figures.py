"""
Tests for L{leeloo.figures} and the figures the relay core keeps for the
metrics (L{leeloo.relay.Relay.stats}): plain counters its parts bump as
they work, read at scrape time.
"""

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from leeloo.core.delivery import FANOUT_SAMPLE_EVERY, MESSAGE_KINDS
from leeloo.figures import Histogram
from leeloo.relay import Relay
from leeloo.store import MemoryStore
from leeloo.testing import Device


class HistogramTests(SynchronousTestCase):
    def test_buckets(self):
        """
        An observation counts in the first bucket whose bound it does not
        exceed (a value equal to a bound counts in it); the cumulative
        buckets end with +Inf, the count of all.
        """
        histogram = Histogram((0.1, 1.0))
        for value in (0.05, 0.1, 0.5, 3.0):
            histogram.observe(value)
        figures = histogram.figures()
        self.assertEqual(figures.counts, (2, 1, 1))
        self.assertEqual(figures.cumulative(), [("0.1", 2), ("1.0", 3), ("+Inf", 4)])
        self.assertEqual((figures.count, figures.sum), (4, 3.65))

    def test_figures_are_a_snapshot(self):
        """
        The figures taken do not move with later observations.
        """
        histogram = Histogram((1.0,))
        figures = histogram.figures()
        histogram.observe(0.5)
        self.assertEqual((figures.counts, figures.count), ((0, 0), 0))


class SlowStore(MemoryStore):
    """
    A memory store whose writes wait until the test lets them through.
    """

    def __init__(self):
        super().__init__()
        self.waiting = []

    def write(self, ops):
        d = Deferred()
        self.waiting.append((ops, d))
        return d

    def commit(self):
        ops, d = self.waiting.pop(0)
        MemoryStore.write(self, ops).chainDeferred(d)


class CoreFigureTests(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.clock.advance(1_000_000)
        self.relay = Relay(self.clock)

    def crew(self, size=3, code="ALPHA"):
        devices = [Device(self.relay) for _ in range(size)]
        for n, device in enumerate(devices):
            device.send(type="register", device_id=f"leeloo_{n:012x}", crew_code=code)
        return devices

    def test_received_by_kind(self):
        """
        Crew messages are counted by kind: the msg_types devices send, any
        other msg_type as other, share_music as song_push and a reaction
        frame as reaction; the bot's messages too.  Other frames are not
        crew messages.
        """
        a, b = self.crew(2)
        for msg_type in ("text", "text", "nudge", "hang_propose", "hang_confirm", "song_push", "new-feature"):
            a.send(type="message", msg_type=msg_type, payload={})
        a.send(type="message", payload={"text": "default"})
        a.send(type="share_music", spotify_uri="spotify:track:1", artist="A", track="T", album="B")
        a.send(type="reaction", reaction_type="love")
        a.send(type="message", msg_type="reaction", payload={"reaction": "fire"})
        a.send(type="ping")
        self.relay.bot_join_crew("42", "ALPHA", "Bot")
        self.successResultOf(self.relay.bot_message("42", "ALPHA", "Bot", "text", {"text": "hi"}))
        self.assertEqual(self.relay.stats().messages_received,
                         {"text": 4, "reaction": 2, "song_push": 2, "nudge": 1, "hang_propose": 1,
                          "hang_confirm": 1, "other": 1})
        self.assertEqual(set(self.relay.stats().messages_received), set(MESSAGE_KINDS))

    def test_deliveries(self):
        """
        A delivery is one crew message fanned out live to one device: the
        sender, a resend answered from memory, and presence messages are
        not deliveries.
        """
        a, b, c = self.crew(3)
        a.send(type="message", payload={"text": "one"}, client_msg_id="m1")
        a.send(type="message", payload={"text": "one"}, client_msg_id="m1")
        c.close()
        b.send(type="message", payload={"text": "two"})
        self.assertEqual(self.relay.stats().deliveries, 2 + 1)
        self.assertEqual(sum(self.relay.stats().messages_received.values()), 2)

    def test_fanout_sampled(self):
        """
        The first crew message's fan-out is timed, then one in
        FANOUT_SAMPLE_EVERY.
        """
        a, b = self.crew(2)
        for n in range(FANOUT_SAMPLE_EVERY + 1):
            a.send(type="message", payload={"text": str(n)})
        self.assertEqual(self.relay.stats().fanout_seconds.count, 2)
        a.send(type="message", payload={"text": "again"})
        self.assertEqual(self.relay.stats().fanout_seconds.count, 2)

    def test_fanout_time_includes_the_store(self):
        """
        A fan-out is timed from the message's receipt to the last write to
        its crew, its store commit included.
        """
        store = SlowStore()
        self.relay = Relay(self.clock, store)
        while store.waiting:
            store.commit()
        a, b = self.crew(2)
        while store.waiting:
            store.commit()
        a.send(type="message", payload={"text": "slow"})
        self.clock.advance(0.3)
        store.commit()
        self.assertEqual(b.texts(), ["slow"])
        figures = self.relay.stats().fanout_seconds
        self.assertEqual(figures.count, 1)
        self.assertAlmostEqual(figures.sum, 0.3)
        self.assertEqual(dict(figures.cumulative())["0.25"], 0)
        self.assertEqual(dict(figures.cumulative())["0.5"], 1)

    def test_replayed(self):
        """
        Messages sent from a crew's log to a device coming back are counted
        as replayed, not as deliveries.
        """
        a, b = self.crew(2)
        [registered] = [m for m in b.take() if m["type"] == "registered"]
        b.send(type="ack", seq=0)
        b.close()
        for n in range(3):
            a.send(type="message", payload={"text": str(n)})
        back = Device(self.relay)
        back.send(type="register", device_id=registered["device_id"], crew_code="ALPHA",
                  **({"device_key": registered["device_key"]} if registered.get("device_key") else {}))
        self.assertEqual(back.texts(), ["0", "1", "2"])
        stats = self.relay.stats()
        self.assertEqual((stats.replayed, stats.deliveries), (3, 0))

    def test_store_figures(self):
        """
        The store journal's queue and batch times are among the relay's
        figures.
        """
        store = SlowStore()
        self.relay = Relay(self.clock, store)
        self.crew(1)
        self.assertGreater(self.relay.stats().store.queue_depth, 0)
        while store.waiting:
            self.clock.advance(0.01)
            store.commit()
        stats = self.relay.stats().store
        self.assertEqual(stats.queue_depth, 0)
        self.assertGreater(stats.batch_seconds.count, 0)
        self.assertAlmostEqual(stats.batch_seconds.sum, 0.01 * stats.batch_seconds.count)
