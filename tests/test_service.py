"""
Tests for L{leeloo.service}: the named services of the relay's tree, the
store closed only once the relay has flushed it, and the timers.
"""

import os

import txaio
from twisted.internet.defer import Deferred
from twisted.internet.testing import EventLoggingObserver, MemoryReactorClock
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from leeloo.listening import Listener
from leeloo.service import StoreService, build_service
from leeloo.store import MemoryStore
from leeloo.tap import Options

from .support import log_texts


class TimerTests(SynchronousTestCase):
    def test_timer_callable_never_raises(self):
        """
        A timer's callable that raises, or whose Deferred fails, is logged
        and does not propagate (a TimerService would stop for good).
        """
        from twisted.internet.defer import fail
        from twisted.logger import Logger

        from leeloo.service import _never_raises

        log = Logger()
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        _never_raises(lambda: 1 / 0, log, "sync")()
        _never_raises(lambda: fail(ValueError("disk")), log, "async")()
        self.assertEqual([e["what"] for e in events], ["sync", "async"])
        self.assertTrue(all(e.get("log_failure") for e in events))
        self.flushLoggedErrors(ZeroDivisionError, ValueError)

    def test_prune_logs_counts(self):
        """
        The retention timer logs how many messages and crews it pruned.
        """
        from twisted.internet.task import Clock
        from twisted.logger import Logger

        from leeloo.relay import Relay
        from leeloo.service import _prune

        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        self.successResultOf(_prune(Relay(Clock()), Logger()))
        [event] = [e for e in events if "messages" in e]
        self.assertEqual((event["messages"], event["crews"]), (0, 0))



class TreeTestCase(SynchronousTestCase):
    def build(self, *argv, environ=None, file_limit=None):
        previous = txaio.config.loop
        self.addCleanup(setattr, txaio.config, "loop", previous)
        self.tmp = self.mktemp()
        os.makedirs(self.tmp)
        options = Options(environ={})
        options.parseOptions(["--data-dir", os.path.join(self.tmp, "data"), "--store", "memory", *argv])
        self.reactor = MemoryReactorClock()
        self.notified = []
        tree = build_service(options.config, self.reactor, exit=self.fail, notify=self.notified.append,
                             environ=environ or {})
        # Not this test process's own limit.
        tree.getServiceNamed("relay").file_limit = file_limit or (lambda needed: (needed, needed))
        return tree


class NamedServiceTests(TreeTestCase):
    def test_named_services(self):
        """
        The tree holds the store, relay, timers, web, readiness and
        admin-files services by name; admin only with --admin-listen; tls, acme and watchdog only
        where configured.
        """
        tree = self.build()
        self.assertEqual(sorted(tree.namedServices), ["admin-files", "readiness", "relay", "store", "timers", "web"])
        tree = self.build("--admin-listen", "tcp:9100:interface=127.0.0.1",
                          environ={"WATCHDOG_USEC": "10000000"})
        self.assertEqual(sorted(tree.namedServices),
                         ["admin", "admin-files", "readiness", "relay", "store", "timers", "watchdog", "web"])

    def test_parts_reachable_by_name(self):
        """
        Each named service holds its part: the store the relay uses, the
        relay, the public and admin sites with their listeners, the timers.
        """
        tree = self.build("--listen", "tcp:8080:interface=127.0.0.1", "--redirect-listen", "tcp:8081",
                          "--admin-listen", "tcp:9100:interface=127.0.0.1")
        relay = tree.getServiceNamed("relay").relay
        self.assertIs(tree.getServiceNamed("store").store, relay.store)
        web = tree.getServiceNamed("web")
        self.assertIs(web.site, tree.site)
        self.assertEqual([(l.option, l.description) for l in web.listeners],
                         [("--listen", "tcp:8080:interface=127.0.0.1"), ("--redirect-listen", "tcp:8081")])
        self.assertIs(web.listeners[1].factory, web.redirect_site)
        admin = tree.getServiceNamed("admin")
        self.assertIs(admin.site, tree.admin_site)
        self.assertEqual([l.factory for l in admin.listeners], [admin.site])
        timers = tree.getServiceNamed("timers")
        self.assertEqual((timers.getServiceNamed("expire").step, timers.getServiceNamed("retention").step),
                         (60, 3600))

    def test_readiness_waits_for_every_listener(self):
        """
        The relay is ready once every listener of web and admin listens,
        and the reactor runs.
        """
        tree = self.build("--redirect-listen", "tcp:8081", "--admin-listen", "tcp:9100:interface=127.0.0.1")
        self.assertEqual(len(tree.getServiceNamed("readiness").listeners), 3)
        self.assertTrue(all(isinstance(l, Listener) for l in tree.listeners))
        tree.privilegedStartService()
        tree.startService()
        self.addCleanup(tree.stopService)
        self.assertEqual(self.notified, [])
        self.reactor.running = True
        for hook, args, kwargs in self.reactor.whenRunningHooks:
            hook(*args, **kwargs)
        [ready] = self.notified
        self.assertTrue(ready.startswith("READY=1\nSTATUS=ready: "))

    def test_watchdog_pings_through_notify(self):
        """
        With WATCHDOG_USEC, the watchdog service pings through the same
        notify as the readiness, at half the interval.
        """
        tree = self.build(environ={"WATCHDOG_USEC": "10000000"})
        tree.getServiceNamed("watchdog").startService()
        self.reactor.advance(5)
        tree.getServiceNamed("watchdog").stopService()
        self.assertEqual(self.notified, ["WATCHDOG=1", "WATCHDOG=1"])


class ClosingStore(MemoryStore):
    def __init__(self):
        super().__init__()
        self.closed = 0

    def close(self):
        self.closed += 1
        return super().close()


class StoreServiceTests(TreeTestCase):
    def test_closes_after_the_flush(self):
        """
        At stop the store stays open until the relay's flush has fired, and
        closes then even if the flush failed.
        """
        store = ClosingStore()
        service = StoreService(store)
        service.startService()
        flushed = Deferred()
        service.close_after(flushed)
        stopped = service.stopService()
        self.assertEqual(store.closed, 0)
        self.assertNoResult(stopped)
        flushed.errback(RuntimeError("flush failed"))
        self.assertEqual(store.closed, 1)
        self.successResultOf(stopped)

    def test_tree_stop_flushes_then_closes(self):
        """
        Stopping the whole tree closes the store once, after the relay's
        shutdown.
        """
        tree = self.build()
        store = ClosingStore()
        tree.getServiceNamed("store").store = store
        relay_service = tree.getServiceNamed("relay")
        shutdowns = []
        relay_service.relay.shutdown = lambda grace: shutdowns.append(Deferred()) or shutdowns[-1]
        tree.startService()
        stopped = tree.stopService()
        self.assertEqual((len(shutdowns), store.closed), (1, 0))
        shutdowns[0].callback(None)
        self.assertEqual(store.closed, 1)
        self.successResultOf(stopped)


class FileLimitLogTests(TreeTestCase):
    def test_limit_logged_and_warned(self):
        """
        At start the relay logs its open-file limit, and warns when it is
        below what --max-connections needs.
        """
        asked = []
        tree = self.build("--max-connections", "5000", file_limit=lambda needed: asked.append(needed) or (1024, 1024))
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        tree.getServiceNamed("relay").startService()
        self.assertEqual(asked, [5100])
        [info] = [e for e in events if "open_file_limit" in e]
        self.assertEqual((info["open_file_limit"], info["open_file_limit_hard"], info["files_needed"]),
                         (1024, 1024, 5100))
        self.assertIn("open-file limit 1024 is below the 5100 that --max-connections 5000 needs",
                      "\n".join(log_texts(events)))

    def test_enough_not_warned(self):
        """
        A limit that suffices is logged, not warned of.
        """
        tree = self.build("--max-connections", "5000", file_limit=lambda needed: (65536, 65536))
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        tree.getServiceNamed("relay").startService()
        texts = log_texts(events)
        self.assertIn("open-file limit 65536 (hard 65536); --max-connections 5000 needs about 5100", texts)
        self.assertFalse([t for t in texts if "is below" in t])
