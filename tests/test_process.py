"""
Tests for L{leeloo.process}: the process tuning, the open-file limit, and
systemd's watchdog (C{WATCHDOG=1} over C{NOTIFY_SOCKET}).
"""

import resource

from twisted.internet import defer, reactor
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase

from leeloo.process import (
    FILES_BESIDES_CONNECTIONS,
    GC_THRESHOLDS,
    GIL_SWITCH_INTERVAL,
    Watchdog,
    files_needed,
    open_file_limit_lines,
    raise_open_file_limit,
    tune_malloc,
    tune_process,
    watchdog_interval,
)

from .support import RelayProcess
from .test_listening import Datagrams, short_socket_path


class ProcessTuningTests(SynchronousTestCase):
    def test_interpreter_takes_the_tuning(self):
        """
        CPython takes the relay's GIL switch interval and collector
        thresholds, and the collector is frozen once the reactor runs (these
        fail if CPython drops or changes the knobs).
        """
        import gc
        import sys

        from twisted.internet.testing import MemoryReactor

        self.addCleanup(sys.setswitchinterval, sys.getswitchinterval())
        self.addCleanup(gc.set_threshold, *gc.get_threshold())
        reactor = MemoryReactor()
        tune_process(reactor)
        self.assertAlmostEqual(sys.getswitchinterval(), GIL_SWITCH_INTERVAL)
        self.assertEqual(gc.get_threshold(), GC_THRESHOLDS)
        self.assertEqual([hook for hook, _, _ in reactor.whenRunningHooks], [gc.freeze])

    def test_middle_generation_stays_small(self):
        """
        Under the relay's thresholds, long-lived objects made in a burst
        (10,000 devices connecting) pass through the middle generation a
        few young collections' worth at a time: no collection of it walks
        more than five times the first threshold (at the old 20, one
        walked 22 times it, pausing every delivery of the moment).
        """
        import gc

        self.addCleanup(gc.set_threshold, *gc.get_threshold())
        walked = []

        def middle(phase, info):
            if phase == "start" and info["generation"] == 1:
                walked.append(len(gc.get_objects(0)) + len(gc.get_objects(1)))

        gc.collect()
        gc.set_threshold(*GC_THRESHOLDS)
        gc.callbacks.append(middle)
        try:
            kept = [[i] for i in range(30 * GC_THRESHOLDS[0])]
        finally:
            gc.callbacks.remove(middle)
        self.assertEqual(len(kept), 30 * GC_THRESHOLDS[0])
        self.assertGreater(len(walked), 1)
        self.assertLess(max(walked), 5 * GC_THRESHOLDS[0])

    def test_freeze_moves_objects_out_of_collections(self):
        """
        gc.freeze (run once the relay started) moves every tracked object to
        the permanent generation, out of every later collection.
        """
        import gc

        self.addCleanup(gc.unfreeze)
        gc.freeze()
        self.assertGreater(gc.get_freeze_count(), 0)


class MallocTuningTests(SynchronousTestCase):
    def test_glibc_takes_thresholds(self):
        """
        glibc (this machine's C library, and the servers') accepts the fixed
        mmap and trim thresholds through mallopt.
        """
        self.assertTrue(tune_malloc())


class Limits:
    """
    A stand-in for getrlimit/setrlimit holding one open-file limit.
    """

    def __init__(self, soft, hard, refuse=False):
        self.soft, self.hard, self.refuse = soft, hard, refuse
        self.set = []

    def getrlimit(self, which):
        assert which == resource.RLIMIT_NOFILE
        return self.soft, self.hard

    def setrlimit(self, which, limits):
        if self.refuse:
            raise ValueError("not allowed")
        self.set.append(limits)
        self.soft, self.hard = limits


class OpenFileLimitTests(SynchronousTestCase):
    def raise_to(self, needed, limits):
        return raise_open_file_limit(needed, limits.getrlimit, limits.setrlimit)

    def test_needed(self):
        """
        A relay needs a descriptor per connection and a reserve for the rest.
        """
        self.assertEqual(files_needed(20000), 20000 + FILES_BESIDES_CONNECTIONS)

    def test_soft_raised_to_needed(self):
        """
        A soft limit below what is needed is raised to it when the hard
        limit allows, and the hard limit is kept.
        """
        limits = Limits(1024, 524288)
        self.assertEqual(self.raise_to(20100, limits), (20100, 524288))
        self.assertEqual(limits.set, [(20100, 524288)])

    def test_soft_raised_only_to_hard(self):
        """
        The soft limit goes no higher than the hard one.
        """
        limits = Limits(1024, 4096)
        self.assertEqual(self.raise_to(20100, limits), (4096, 4096))

    def test_enough_left_alone(self):
        """
        A soft limit that suffices is not touched.
        """
        limits = Limits(65536, 65536)
        self.assertEqual(self.raise_to(20100, limits), (65536, 65536))
        self.assertEqual(limits.set, [])

    def test_refused_raise_reports_the_limit_in_force(self):
        """
        When the system refuses the raise, the limit in force is reported.
        """
        self.assertEqual(self.raise_to(20100, Limits(1024, 524288, refuse=True)), (1024, 524288))

    def test_lines_below_needed_warn(self):
        """
        Below what --max-connections needs, the relay says so and what to do.
        """
        info, warning = open_file_limit_lines(20000, 1024, 1024)
        self.assertEqual(info, "open-file limit 1024 (hard 1024); --max-connections 20000 needs about 20100")
        self.assertIn("open-file limit 1024 is below the 20100 that --max-connections 20000 needs", warning)
        self.assertIn("LimitNOFILE=", warning)

    def test_lines_enough_no_warning(self):
        """
        A limit that suffices is logged without a warning.
        """
        info, warning = open_file_limit_lines(20000, 65536, resource.RLIM_INFINITY)
        self.assertEqual(info, "open-file limit 65536 (hard unlimited); --max-connections 20000 needs about 20100")
        self.assertIsNone(warning)


class WatchdogIntervalTests(SynchronousTestCase):
    def test_half_of_watchdog_usec(self):
        """
        Pings go at half the interval systemd gives in WATCHDOG_USEC.
        """
        self.assertEqual(watchdog_interval({"WATCHDOG_USEC": "30000000"}, pid=7), 15.0)

    def test_no_watchdog(self):
        """
        Without WATCHDOG_USEC, or with one that is not a positive number,
        there is no watchdog.
        """
        for environ in ({}, {"WATCHDOG_USEC": ""}, {"WATCHDOG_USEC": "0"}, {"WATCHDOG_USEC": "soon"}):
            self.assertIsNone(watchdog_interval(environ, pid=7), environ)

    def test_for_another_process(self):
        """
        A WATCHDOG_PID naming another process means the watchdog is not
        this one's; naming this one, it is.
        """
        self.assertIsNone(watchdog_interval({"WATCHDOG_USEC": "1000000", "WATCHDOG_PID": "8"}, pid=7))
        self.assertEqual(watchdog_interval({"WATCHDOG_USEC": "1000000", "WATCHDOG_PID": "7"}, pid=7), 0.5)


class WatchdogTests(SynchronousTestCase):
    def test_pings_while_running(self):
        """
        The watchdog sends WATCHDOG=1 at once and every interval while it
        runs, and no more once stopped.
        """
        clock, sent = Clock(), []
        watchdog = Watchdog(5.0, sent.append, clock)
        watchdog.startService()
        self.assertEqual(sent, ["WATCHDOG=1"])
        clock.advance(5)
        clock.advance(5)
        self.assertEqual(sent, ["WATCHDOG=1"] * 3)
        watchdog.stopService()
        clock.advance(10)
        self.assertEqual(len(sent), 3)
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_failing_notify_keeps_pinging(self):
        """
        A ping that fails is logged, and the next one is still sent.
        """
        clock, calls = Clock(), []

        def notify(state):
            calls.append(state)
            raise OSError("gone")

        watchdog = Watchdog(1.0, notify, clock)
        watchdog.startService()
        clock.advance(1)
        watchdog.stopService()
        self.assertEqual(len(calls), 2)
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 2)


class TwistdNotifyTests(TestCase):
    """
    ``twistd leeloo`` as a real process, telling a fake service manager.
    """

    timeout = 60

    @defer.inlineCallbacks
    def test_ready_watchdog_stopping(self):
        """
        With WatchdogSec= set (WATCHDOG_USEC), READY=1, WATCHDOG=1 pings at
        half the interval, and STOPPING=1 at SIGTERM arrive on the notify
        socket.
        """
        path = short_socket_path(self)
        datagrams = Datagrams()
        listening = reactor.listenUNIXDatagram(path, datagrams)
        self.addCleanup(listening.stopListening)
        relay = RelayProcess(self, "--listen", "tcp:0:interface=127.0.0.1", "--store", "memory",
                             environ={"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "200000"})
        yield relay.proto.ready()
        while not (any(d.startswith(b"READY=1") for d in datagrams.received)
                   and datagrams.received.count(b"WATCHDOG=1") >= 3):
            yield datagrams.next()
        ended = relay.stop()
        while b"STOPPING=1" not in datagrams.received:
            yield datagrams.next()
        yield ended
        self.assertEqual(datagrams.received.count(b"STOPPING=1"), 1)
