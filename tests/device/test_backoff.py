"""
L{leeloo.device.backoff.FullJitter}, alone and under a fleet of devices on
a L{Clock}.
"""

import random

from twisted.application.internet import backoffPolicy
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from leeloo.device import FullJitter, LeelooDevice

from .loopback import RefusingEndpoint


class FullJitterTests(SynchronousTestCase):

    def test_ceiling_grows_exponentially_to_the_cap(self):
        """
        The longest delay doubles with each failed attempt from the
        initial delay, and stops at the cap.
        """
        policy = FullJitter(initial=1.0, factor=2.0, cap=60.0)
        self.assertEqual([policy.ceiling(n) for n in range(1, 9)], [1, 2, 4, 8, 16, 32, 60, 60])

    def test_delay_is_drawn_from_zero_to_the_ceiling(self):
        """
        The delay is the random draw times the ceiling: anywhere from zero
        up to it.
        """
        self.assertEqual(FullJitter(random=lambda: 0.0)(5), 0.0)
        self.assertEqual(FullJitter(random=lambda: 0.25)(5), 4.0)
        self.assertEqual(FullJitter(random=lambda: 0.999)(30), 60.0 * 0.999)

    def test_huge_attempt_counts_stay_at_the_cap(self):
        """
        A device that failed for weeks does not overflow: the ceiling stays
        at the cap.
        """
        self.assertEqual(FullJitter(cap=60.0).ceiling(10 ** 6), 60.0)

    def test_after_abuse_waits_at_least_the_cap(self):
        """
        The delay after a 4029 is the cap plus at most a tenth of it.
        """
        self.assertEqual(FullJitter(cap=60.0, random=lambda: 0.0).after_abuse(), 60.0)
        self.assertAlmostEqual(FullJitter(cap=60.0, random=lambda: 0.999).after_abuse(), 65.994)

    def test_nonsense_parameters_are_refused(self):
        """
        A zero initial delay, a shrinking factor or a cap below the initial
        delay is a ValueError.
        """
        for kwargs in ({"initial": 0}, {"factor": 0.5}, {"initial": 5.0, "cap": 1.0}):
            self.assertRaises(ValueError, FullJitter, **kwargs)


class FleetTests(SynchronousTestCase):
    """
    Many devices lose the relay at the same moment; their reconnect
    attempts, timed on one Clock.
    """

    devices = 200

    def fleet(self, policy_for):
        clock = Clock()
        endpoints = []
        for i in range(self.devices):
            endpoint = RefusingEndpoint(clock)
            device = LeelooDevice("ws://relay.test/ws", self.mktemp(), reactor=clock, endpoint=endpoint,
                                  retry_policy=policy_for(i), fsync=False)
            device.startService()
            self.addCleanup(device.stopService)
            endpoints.append(endpoint)
        for _ in range(4000):
            clock.advance(0.05)
        return [e.attempts for e in endpoints]

    def test_retries_spread_over_the_backoff_window(self):
        """
        With full jitter the fleet's retries spread over the whole backoff
        window: the fifth retries of 200 devices fall in many different
        seconds, no second holding more than a fifth of them, and the fifth
        waits alone range over more than 10 s.  Under Twisted's stock
        backoff those waits differ by less than its one second of jitter
        and the densest second holds over twice as many retries.
        """
        rng = random.Random(1)
        ours = self.fleet(lambda i: FullJitter(initial=1.0, cap=60.0, random=rng.random))
        rng = random.Random(1)
        stock = self.fleet(lambda i: backoffPolicy(initialDelay=1.0, maxDelay=60.0, factor=2.0,
                                                   jitter=rng.random))

        def densest(times):
            seconds = {}
            for t in times:
                seconds[int(t)] = seconds.get(int(t), 0) + 1
            return len(seconds), max(seconds.values())

        def fifth_waits(fleet):
            return [attempts[5] - attempts[4] for attempts in fleet]

        distinct, most = densest([attempts[5] for attempts in ours])
        self.assertGreater(distinct, 10)
        self.assertLessEqual(most, self.devices // 5)
        _, stock_most = densest([attempts[5] for attempts in stock])
        self.assertGreater(stock_most, 2 * most)
        waits, stock_waits = fifth_waits(ours), fifth_waits(stock)
        self.assertGreater(max(waits) - min(waits), 10.0)
        self.assertLess(max(stock_waits) - min(stock_waits), 1.0 + 0.1)

    def test_no_wait_exceeds_the_cap(self):
        """
        However long the relay stays away, no device waits longer than the
        cap between two attempts, and every device keeps trying.
        """
        rng = random.Random(2)
        ours = self.fleet(lambda i: FullJitter(initial=1.0, cap=8.0, random=rng.random))
        for attempts in ours:
            gaps = [b - a for a, b in zip(attempts, attempts[1:])]
            self.assertLessEqual(max(gaps), 8.0 + 0.05)
            self.assertGreater(len(attempts), 20)
