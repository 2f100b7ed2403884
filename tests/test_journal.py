"""
The Journal's group commit, against a store whose writes the test commits
or fails by hand and a Clock for the retry delay.
"""

import os

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import LogLevel, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface import implementer

from leeloo.store import (
    APPEND,
    DELETE_CREW,
    PUT_BOT_USER,
    PUT_CREW,
    PUT_MEMBER,
    PUT_TOKEN,
    IStore,
    Journal,
    StoreError,
)


@implementer(IStore)
class ManualStore:
    """
    A store whose writes stay pending until the test commits or fails them.
    C{events} records each write (and whatever else the test notes) in order.
    """

    def __init__(self, events):
        self.events = events
        self.pending = []

    def write(self, ops):
        d = Deferred()
        self.pending.append((list(ops), d))
        self.events.append(("write", list(ops)))
        return d

    @property
    def writing(self):
        """
        The operations of the write in progress.
        """
        [(ops, _)] = self.pending
        return ops

    def commit(self):
        ops, d = self.pending.pop(0)
        d.callback(None)
        return ops

    def refuse(self, reason="disk full", error=None):
        ops, d = self.pending.pop(0)
        d.errback(error or OSError(reason))
        return ops


class RaisingStore:
    """
    A broken store whose write() raises instead of returning a Deferred.
    """

    def write(self, ops):
        raise RuntimeError("broken")


def op(kind, n):
    """
    A distinct operation; the journal never looks inside the argument.
    """
    return (kind, f"{kind}-{n}")


A1, A2, A3 = (op(APPEND, n) for n in (1, 2, 3))
C1, C2 = op(PUT_CREW, 1), op(PUT_CREW, 2)
M1, M2, M3 = (op(PUT_MEMBER, n) for n in (1, 2, 3))


class JournalTestCase(SynchronousTestCase):
    def setUp(self):
        self.events = []
        self.store = ManualStore(self.events)
        self.clock = Clock()
        self.journal = Journal(self.store, self.clock, retry_delay=5.0)

    def note(self, label):
        """
        A callback recording C{label} in the event log when it fires.
        """

        def fired(result):
            self.events.append(("fired", label))
            return result

        return fired

    def put(self, operation, **kwargs):
        d = self.journal.put(operation, **kwargs)
        if d is not None:
            d.addBoth(self.note(operation))
            # Failures the test did not look at are expected ones.
            self.addCleanup(d.addErrback, lambda _: None)
        return d

    def writes(self):
        return [ops for kind, ops in self.events if kind == "write"]


class GatherTests(JournalTestCase):
    """
    With a gathering window, an operation put on an idle journal waits that
    long for others to share its commit.
    """

    def setUp(self):
        super().setUp()
        self.journal = Journal(self.store, self.clock, retry_delay=5.0, gather=0.002)

    def test_gathered_into_one_write(self):
        """
        Operations put within the window go together once it has passed,
        in put order; none is written before.
        """
        self.put(A1)
        self.clock.advance(0.001)
        self.put(C1)
        self.put(A2)
        self.assertEqual(self.writes(), [])
        self.assertFalse(self.journal.idle)
        self.clock.advance(0.001)
        self.assertEqual(self.writes(), [[A1, C1, A2]])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_queued_during_a_commit_goes_at_once(self):
        """
        What is put while a batch commits has waited that long already: it
        is written as soon as the batch has committed.
        """
        self.put(A1)
        self.clock.advance(0.002)
        self.put(A2)
        self.store.commit()
        self.assertEqual(self.writes(), [[A1], [A2]])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_drain_does_not_wait(self):
        """
        Draining (the relay stopping) writes what is gathering at once.
        """
        self.put(A1)
        drained = self.journal.drain()
        self.assertEqual(self.writes(), [[A1]])
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.store.commit()
        self.assertIsNone(self.successResultOf(drained))


class SQLiteGatherTests(TestCase):
    """
    The relay gathers for the SQLite store's window (a real store, with its
    writer process: closed, and the writer gone, after the test).
    """

    def setUp(self):
        self.clock = Clock()

    def test_sqlite_gathers(self):
        """
        The relay gathers for its store's window: SQLite's commits are a
        round trip to its writer each; the memory store has none.
        """
        from twisted.internet import reactor

        from leeloo.relay import Relay
        from leeloo.sqlitestore import SQLiteStore

        directory = self.mktemp()
        os.makedirs(directory)
        store = SQLiteStore(directory, reactor)
        self.addCleanup(store.close)
        journal = Relay(self.clock, store=store).journal
        self.assertEqual((journal.gather, journal.gather_clock), (SQLiteStore.gather_writes, reactor))
        self.assertGreater(SQLiteStore.gather_writes, 0)
        self.assertEqual(Relay(self.clock).journal.gather, 0.0)


class BatchTests(JournalTestCase):
    """
    While one batch commits, the next gathers.
    """

    def test_first_op_written_at_once(self):
        """
        An operation put on an idle journal is written at once, alone.
        """
        self.put(A1)
        self.assertEqual(self.writes(), [[A1]])

    def test_ops_wait_for_the_batch_in_progress(self):
        """
        Operations put while a batch commits are not written until it has
        committed, then go together in one write, in put order.
        """
        self.put(A1)
        self.put(C1)
        self.put(A2)
        self.put(M1)
        self.assertEqual(self.writes(), [[A1]])
        self.store.commit()
        self.assertEqual(self.writes(), [[A1], [C1, A2, M1]])

    def test_fires_when_committed(self):
        """
        An operation's Deferred fires with None once its batch commits, and
        not before.
        """
        d = self.put(A1)
        self.assertNoResult(d)
        self.store.commit()
        self.assertIsNone(self.successResultOf(d))

    def test_fires_in_put_order(self):
        """
        The Deferreds of a batch fire in the order their operations were
        put.
        """
        self.put(A1)
        for operation in (C1, A2, M1, A3):
            self.put(operation)
        self.store.commit()
        del self.events[:]
        self.store.commit()
        self.assertEqual(self.events, [("fired", C1), ("fired", A2), ("fired", M1), ("fired", A3)])

    def test_callback_does_not_overtake_its_batch(self):
        """
        An operation put from the callback of an operation in a batch is
        written after every Deferred of that batch has fired, in the next
        batch.
        """
        self.put(A1)
        self.put(A2).addCallback(lambda _: self.put(A3))
        self.put(M1)
        self.store.commit()
        del self.events[:]
        self.store.commit()
        self.assertEqual(self.events, [("fired", A2), ("fired", M1), ("write", [A3])])

    def test_no_wait(self):
        """
        An operation put with wait=False has no Deferred but is written the
        same.
        """
        self.assertIsNone(self.journal.put(A1, wait=False))
        self.assertEqual(self.writes(), [[A1]])

    def test_idle(self):
        """
        The journal is idle when nothing is queued or being committed.
        """
        self.assertTrue(self.journal.idle)
        self.put(A1)
        self.put(A2)
        self.assertFalse(self.journal.idle)
        self.store.commit()
        self.assertFalse(self.journal.idle)
        self.store.commit()
        self.assertTrue(self.journal.idle)

    def test_store_that_raises(self):
        """
        A store whose write() raises fails that batch like a failed write;
        the journal does not wedge.
        """
        journal = Journal(RaisingStore(), self.clock)
        self.assertEqual(str(self.failureResultOf(journal.put(A1), StoreError).value), "broken")
        self.assertTrue(journal.idle)


class KeyedTests(JournalTestCase):
    """
    Operations put with a key coalesce.
    """

    def test_last_wins(self):
        """
        Of the operations queued with one key, only the last put is
        written.
        """
        self.put(A1)
        self.put(M1, key="member")
        self.put(M2, key="member")
        self.put(M3, key="other")
        self.store.commit()
        self.assertEqual(self.store.writing, [M2, M3])

    def test_no_deferred(self):
        """
        A keyed operation gets no Deferred, even when asked to wait.
        """
        self.assertIsNone(self.journal.put(M1, key="member", wait=True))
        self.assertEqual(self.writes(), [[M1]])

    def test_keeps_its_place(self):
        """
        A keyed operation is written where it was put among the others, not
        after operations put later (a member put before its crew is deleted
        must not be written after the delete).
        """
        delete = (DELETE_CREW, "crew")
        self.put(A1)
        self.put(C1)
        self.put(M1, key="member")
        self.put(delete)
        self.store.commit()
        self.assertEqual(self.store.writing, [C1, M1, delete])

    def test_moves_to_its_last_put(self):
        """
        A keyed operation put again takes the place of its last put: the
        batch applies as if each operation were applied in put order.
        """
        self.put(A1)
        self.put(M1, key="member")
        self.put(C1)
        self.put(M2, key="member")
        self.store.commit()
        self.assertEqual(self.store.writing, [C1, M2])

    def test_key_committing_is_not_replaced(self):
        """
        A keyed operation put while one with its key is being committed is
        written in the next batch, not dropped.
        """
        self.put(M1, key="member")
        self.put(M2, key="member")
        self.store.commit()
        self.assertEqual(self.writes(), [[M1], [M2]])


class BarrierTests(JournalTestCase):
    """
    barrier() waits for everything queued before it.
    """

    def test_idle(self):
        """
        On an idle journal a barrier has already fired.
        """
        self.assertIsNone(self.successResultOf(self.journal.barrier()))

    def test_waits_for_queued(self):
        """
        A barrier fires once the operations queued before it are committed:
        not while the batch in progress commits, but after the next.
        """
        self.put(A1)
        self.put(C1)
        self.put(M1, key="member")
        d = self.journal.barrier()
        self.store.commit()
        self.assertNoResult(d)
        self.store.commit()
        self.assertIsNone(self.successResultOf(d))

    def test_after_committing(self):
        """
        A barrier put while a batch commits fires after that batch.
        """
        self.put(A1)
        d = self.journal.barrier().addCallback(self.note("barrier"))
        self.assertNoResult(d)
        self.store.commit()
        self.assertEqual(self.events[-2:], [("fired", A1), ("fired", "barrier")])

    def test_keyed_only(self):
        """
        A barrier waits for queued keyed operations too.
        """
        self.put(A1)
        self.put(M1, key="member")
        d = self.journal.barrier()
        self.store.commit()
        self.assertNoResult(d)
        self.store.commit()
        self.successResultOf(d)

    def test_drain_idle(self):
        """
        drain() on an idle journal has already fired.
        """
        self.successResultOf(self.journal.drain())

    def test_drain(self):
        """
        drain() fires once the batch in progress and everything queued are
        committed.
        """
        self.put(A1)
        self.put(C1)
        d = self.journal.drain()
        self.store.commit()
        self.assertNoResult(d)
        self.store.commit()
        self.successResultOf(d)
        self.assertTrue(self.journal.idle)


class FailureTests(JournalTestCase):
    """
    A batch the store refuses fails its Deferreds; state operations are
    retried, appends are not.
    """

    def setUp(self):
        super().setUp()
        self.logged = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)

    def errors(self):
        return [e for e in self.logged if e["log_level"] == LogLevel.error]

    def test_errback(self):
        """
        Every waiting Deferred of a refused batch fails with StoreError,
        saying why, in put order.
        """
        self.put(A1)
        d1, d2 = self.put(A2), self.put(C1)
        self.store.commit()
        del self.events[:]
        self.store.refuse("disk full")
        self.assertEqual(str(self.failureResultOf(d1, StoreError).value), "disk full")
        self.failureResultOf(d2, StoreError)
        self.assertEqual(self.events, [("fired", A2), ("fired", C1)])

    def test_permanent_refusal_not_retried(self):
        """
        State operations the store refuses for good (not transient) are
        dropped with an error logged, so they do not fail every batch after
        them.
        """
        self.put(A1)
        self.put(C1)
        self.store.commit()
        self.store.refuse(error=StoreError("constraint failed", transient=False))
        self.clock.advance(10)
        self.assertEqual(len(self.writes()), 2)
        self.assertTrue(self.journal.idle)
        self.put(C2)
        self.assertEqual(self.store.commit(), [C2])
        self.assertIn("dropped", " ".join(e["log_format"] for e in self.errors()))

    def test_retry_after_delay(self):
        """
        The state operations of a refused batch (keyed or not) are written
        again after retry_delay, without the appends, in their order.
        """
        self.put(A1)
        self.put(C1)
        self.put(A2)
        self.put(M1, key="member")
        self.put(op(PUT_TOKEN, 1))
        self.store.commit()
        self.store.refuse()
        self.clock.advance(4.9)
        self.assertEqual(len(self.writes()), 2)
        self.clock.advance(0.1)
        self.assertEqual(self.writes()[2], [C1, M1, op(PUT_TOKEN, 1)])

    def test_wait_after_refusal(self):
        """
        Operations queued behind a refused batch wait for the retry delay,
        even when nothing of that batch is retried.
        """
        self.put(A1)
        self.put(C1)
        self.store.refuse()
        self.clock.advance(4.9)
        self.assertEqual(self.writes(), [[A1]])
        self.clock.advance(0.1)
        self.assertEqual(self.writes(), [[A1], [C1]])

    def test_appends_not_retried(self):
        """
        A refused batch of appends is not written again.
        """
        d = self.put(A1)
        self.store.refuse()
        self.failureResultOf(d, StoreError)
        self.clock.advance(60)
        self.assertEqual(self.writes(), [[A1]])
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertTrue(self.journal.idle)

    def test_queued_during_retry_wait(self):
        """
        Operations put while a retry waits are written with it, after the
        retried ones; a keyed one does not replace a retried operation.
        """
        self.put(A1)
        self.put(C1)
        self.put(M1, key="member")
        self.store.commit()
        self.store.refuse()
        self.put(op(PUT_BOT_USER, 1))
        self.put(M2, key="member")
        self.put(A2)
        self.assertEqual(len(self.writes()), 2)
        self.clock.advance(5)
        self.assertEqual(self.writes()[2], [C1, M1, op(PUT_BOT_USER, 1), M2, A2])

    def test_put_from_errback(self):
        """
        An operation put from the errback of a refused operation is written
        with the retry, after it.
        """
        self.put(A1)
        self.put(C1).addErrback(lambda _: self.put(C2))
        self.store.commit()
        self.store.refuse()
        self.clock.advance(5)
        self.assertEqual(self.writes()[2], [C1, C2])

    def test_retried_until_committed(self):
        """
        Retries go on, retry_delay apart, until the store takes the batch.
        """
        self.put(C1)
        for _ in range(3):
            self.store.refuse()
            self.clock.advance(5)
        self.store.commit()
        self.clock.advance(60)
        self.assertEqual(self.writes(), [[C1]] * 4)
        self.assertTrue(self.journal.idle)

    def test_one_error_per_streak(self):
        """
        One error is logged per streak of refused batches, and an info when
        the store takes writes again; the next streak logs again.
        """
        self.put(C1)
        self.store.refuse()
        self.clock.advance(5)
        self.store.refuse()
        self.assertEqual(len(self.errors()), 1)
        self.clock.advance(5)
        self.store.commit()
        self.assertEqual([e["log_format"] for e in self.logged if e["log_level"] == LogLevel.info],
                         ["the store is writable again"])
        self.put(C2)
        self.store.refuse()
        self.assertEqual(len(self.errors()), 2)
        self.assertIn("disk full", self.errors()[1]["error"])

    def test_drain_retries_now(self):
        """
        drain() writes a waiting retry at once rather than after the delay,
        and fires once it commits.
        """
        self.put(C1)
        self.store.refuse()
        d = self.journal.drain()
        self.assertEqual(self.writes(), [[C1], [C1]])
        self.assertNoResult(d)
        self.store.commit()
        self.successResultOf(d)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_barrier_in_refused_batch(self):
        """
        A barrier whose batch is refused fails with StoreError.
        """
        self.put(A1)
        self.put(C1)
        d = self.journal.barrier()
        self.store.commit()
        self.store.refuse()
        self.failureResultOf(d, StoreError)


class JournalBugTests(JournalTestCase):
    def test_bug_in_on_batch_logged_and_journal_goes_on(self):
        """
        A bug in the journal's on_batch hook is logged as a failure, not
        left unhandled, and later operations are still committed.
        """
        def broken():
            raise ZeroDivisionError("a bug")

        self.journal.on_batch = broken
        self.put(A1)
        self.store.commit()
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)
        self.journal.on_batch = None
        self.put(A2)
        self.assertEqual(self.store.commit(), [A2])


class FigureTests(JournalTestCase):
    """
    The journal's figures for the metrics: its queue and its batch times.
    """

    def test_queue_depth(self):
        """
        The queue depth counts the operations queued and those of the batch
        being committed, not barriers or operations replaced since; their
        bytes too.
        """
        self.put(A1, size=100)
        self.put(C1, size=10)
        self.journal.put(M1, key="m")
        self.journal.put(M1, key="m")
        self.journal.barrier()
        stats = self.journal.stats()
        self.assertEqual((stats.queue_depth, stats.queue_bytes), (3, 110))
        self.store.commit()
        self.assertEqual(self.journal.stats().queue_depth, 2)
        self.store.commit()
        self.assertEqual((self.journal.stats().queue_depth, self.journal.stats().queue_bytes), (0, 0))

    def test_batch_seconds(self):
        """
        Each batch's commit time is observed once it commits or fails;
        batches of only a barrier are not.
        """
        self.successResultOf(self.journal.barrier())
        self.put(A1)
        self.clock.advance(0.3)
        self.store.commit()
        self.put(A2)
        self.clock.advance(0.002)
        self.store.refuse()
        figures = self.journal.stats().batch_seconds
        self.assertEqual(figures.count, 2)
        self.assertAlmostEqual(figures.sum, 0.302)
        buckets = dict(figures.cumulative())
        self.assertEqual((buckets["0.001"], buckets["0.0025"], buckets["0.25"], buckets["0.5"], buckets["+Inf"]),
                         (0, 1, 1, 2, 2))
