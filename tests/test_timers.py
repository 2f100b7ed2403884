"""
The timer wheel that holds every connection's timeouts.
"""

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from leeloo.timers import TimerWheel


class TimerWheelTests(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.wheel = TimerWheel(self.clock, resolution=0.25, chunk=3)
        self.fired = []

    def test_fires_at_the_next_bucket(self):
        """
        A call runs at its delay rounded up to the wheel's resolution, not
        before, with its arguments.
        """
        self.wheel.call_later(1.1, self.fired.append, "a")
        self.clock.advance(1.1)
        self.assertEqual(self.fired, [])
        self.clock.advance(0.15)
        self.assertEqual(self.fired, ["a"])

    def test_one_reactor_timer_per_bucket(self):
        """
        Many calls due in one bucket share one reactor timer.
        """
        for i in range(1000):
            self.wheel.call_later(5.0, self.fired.append, i)
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)

    def test_cancel(self):
        """
        A cancelled call never runs; a bucket left empty cancels its
        reactor timer.
        """
        keep = self.wheel.call_later(1.0, self.fired.append, "keep")
        drop = self.wheel.call_later(1.0, self.fired.append, "drop")
        drop.cancel()
        drop.cancel()
        self.clock.advance(1.0)
        self.assertEqual(self.fired, ["keep"])
        lonely = self.wheel.call_later(3.0, self.fired.append, "lonely")
        lonely.cancel()
        self.assertEqual(self.clock.getDelayedCalls(), [])
        keep.cancel()
        self.assertEqual(self.wheel.pending(), 0)

    def test_big_bucket_in_chunks(self):
        """
        A due bucket runs in chunks, each in a reactor turn of its own, and
        a call cancelled before its chunk runs does not run.
        """
        turns = []
        call_later = self.clock.callLater
        self.clock.callLater = lambda delay, f, *a: turns.append(delay) or call_later(delay, f, *a)
        calls = []
        self.wheel.call_later(1.0, lambda: calls[5].cancel())
        calls.extend(self.wheel.call_later(1.0, self.fired.append, i) for i in range(7))
        self.clock.advance(1.0)
        self.assertEqual(self.fired, [0, 1, 2, 3, 4, 6])
        self.assertEqual(turns, [1.0, 0, 0])

    def test_failure_logged_others_run(self):
        """
        A call that raises is logged; the others in its bucket still run.
        """
        self.wheel.call_later(1.0, lambda: 1 / 0)
        self.wheel.call_later(1.0, self.fired.append, "after")
        self.clock.advance(1.0)
        self.assertEqual(self.fired, ["after"])
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)
