"""
L{leeloo.limits}: token buckets and the limiter that keeps one per key.
"""

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from leeloo.limits import Bucket, Limiter, Rate


class BucketTests(SynchronousTestCase):
    def test_burst_then_rate(self):
        """
        A bucket allows a burst, then one action per 1/rate seconds, and
        says how long to wait.
        """
        rate = Rate(2.0, 3.0)
        bucket = Bucket(rate.burst, 0.0)
        self.assertEqual([bucket.take(0.0, rate) for _ in range(3)], [0.0, 0.0, 0.0])
        self.assertAlmostEqual(bucket.take(0.0, rate), 0.5)
        self.assertEqual(bucket.take(0.5, rate), 0.0)

    def test_limiter_forgets_full_buckets(self):
        """
        Limiter.sweep forgets keys whose buckets have refilled.
        """
        clock = Clock()
        limiter = Limiter(clock, Rate.per_window(10, 600))
        limiter.take("a")
        clock.advance(30)
        limiter.take("b")
        clock.advance(40)
        self.assertEqual(limiter.sweep(), 1)
        self.assertEqual(list(limiter.buckets), ["b"])
