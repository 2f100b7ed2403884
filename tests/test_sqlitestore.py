"""
What only the SQLite store does: its connection settings, private files,
schema migrations, refusing a newer schema, failing cleanly (and recovering)
when the database is locked or full, and keeping SQL off the reactor thread.
The IStore contract itself is in test_store.
"""

import fcntl
import os
import socket
import sqlite3
import stat
import signal
import sys
import time

from pathlib import Path

from twisted.internet import reactor, threads
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.logger import globalLogPublisher
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase, TestCase

from leeloo import sqlitestore
from leeloo.sealing import Sealer
from leeloo.sqlitechild import trace_statements
from leeloo.sqlitewriter import WriterProcess
from leeloo.sqlitestore import (
    CATCH_UP_FRAMES,
    DATABASE_NAME,
    JOURNAL_SIZE_LIMIT,
    LOG_COPY_RATE,
    MIGRATIONS,
    SCHEMA_VERSION,
    DatabaseInUse,
    SchemaError,
    SQLiteStore,
    migrate,
    read_log,
    schema_version,
)
from leeloo.store import (
    APPEND,
    PUT_CREW,
    PUT_DEVICE,
    PUT_MEMBER,
    BotUserRecord,
    CrewRecord,
    DeviceRecord,
    LogEntry,
    MemberRecord,
    Replay,
    StoreError,
    TokenRecord,
)

T0 = 1_700_000_000.0
ALPHA = "LEELOO-ALFA"


def crew_op(code=ALPHA):
    return (PUT_CREW, CrewRecord(code, T0, "leeloo_a"))


def append_op(seq, payload=b"{}"):
    return (APPEND, LogEntry(ALPHA, seq, f"m{seq}", "leeloo_a", None, None, T0 + seq, payload))


class SQLiteTestCase(TestCase):
    timeout = 10

    def directory(self):
        path = self.mktemp()
        os.mkdir(path)
        return path

    def open(self, directory=None, **kwargs):
        # Every test's store has a secrets key (migration 9 seals the tokens
        # an earlier release kept in the clear).
        kwargs.setdefault("sealer", Sealer())
        store = SQLiteStore(directory if directory is not None else self.directory(), reactor, **kwargs)
        self.addCleanup(self.close, store)
        return store

    def close(self, store):
        return store.close()  # closing twice is harmless

    def connect(self, directory):
        """
        Another connection to the database in C{directory}, closed after
        the test.
        """
        db = sqlite3.connect(os.path.join(directory, DATABASE_NAME), isolation_level=None)
        self.addCleanup(db.close)
        return db

    def pragma(self, store, name):
        """
        The value of PRAGMA C{name} on the store's writing connection.
        """
        return store._pool.runQuery(f"PRAGMA {name}").addCallback(lambda rows: rows[0][0])


class ConnectionTests(SQLiteTestCase):
    """
    How the store's runtime connection is set up.
    """

    @inlineCallbacks
    def test_wal(self):
        """
        The database is in WAL mode.
        """
        mode = yield self.pragma(self.open(), "journal_mode")
        self.assertEqual(mode, "wal")

    @inlineCallbacks
    def test_synchronous_normal(self):
        """
        By default commits are synchronous=NORMAL (1): they survive a crash
        of the process.
        """
        synchronous = yield self.pragma(self.open(), "synchronous")
        self.assertEqual(synchronous, 1)

    @inlineCallbacks
    def test_synchronous_full(self):
        """
        With fsync=True commits are synchronous=FULL (2): they survive a
        power cut.
        """
        synchronous = yield self.pragma(self.open(fsync=True), "synchronous")
        self.assertEqual(synchronous, 2)

    @inlineCallbacks
    def test_foreign_keys(self):
        """
        Foreign keys are enforced, which deleting a crew relies on to delete
        its members, bot users and log.
        """
        enabled = yield self.pragma(self.open(), "foreign_keys")
        self.assertEqual(enabled, 1)

    @inlineCallbacks
    def test_busy_timeout(self):
        """
        A statement waits two seconds for another connection's lock by
        default, or as long as the store is told.
        """
        default = yield self.pragma(self.open(), "busy_timeout")
        short = yield self.pragma(self.open(busy_timeout=0.25), "busy_timeout")
        self.assertEqual((default, short), (2000, 250))


class FileModeTests(SQLiteTestCase):
    """
    The database holds pending Spotify tokens: only its owner may read it.
    """

    def setUp(self):
        self.addCleanup(os.umask, os.umask(0o022))

    def mode(self, path):
        return stat.S_IMODE(os.stat(path).st_mode)

    @inlineCallbacks
    def test_new_files_private(self):
        """
        The database file and its -wal and -shm files are created mode 0600
        whatever the umask.
        """
        directory = self.directory()
        store = self.open(directory)
        yield store.write([crew_op()])
        path = os.path.join(directory, DATABASE_NAME)
        self.assertEqual(
            {suffix: self.mode(path + suffix) for suffix in ("", "-wal", "-shm")},
            {"": 0o600, "-wal": 0o600, "-shm": 0o600},
        )

    def test_existing_file_tightened(self):
        """
        A database file readable by others is made mode 0600 when opened.
        """
        directory = self.directory()
        path = os.path.join(directory, DATABASE_NAME)
        sqlite3.connect(path).close()
        os.chmod(path, 0o644)
        self.open(directory)
        self.assertEqual(self.mode(path), 0o600)


class MigrationTests(SQLiteTestCase):
    """
    Opening a database brings its schema up to this relay's version.
    """

    def version_1(self):
        """
        A directory with a schema version 1 database, made as the first
        relay made it, holding a crew, a member, a bot user and a token.
        """
        directory = self.directory()
        db = self.connect(directory)
        db.executescript(MIGRATIONS[0])
        db.execute("PRAGMA user_version = 1")
        db.execute("INSERT INTO crews VALUES (?, ?, ?)", (ALPHA, T0, "leeloo_a"))
        db.execute("INSERT INTO members VALUES (?, ?, ?, ?)", (ALPHA, "leeloo_a", "Ann", T0 + 1))
        db.execute("INSERT INTO bot_users VALUES (?, ?, ?)", (ALPHA, "42", "Bob"))
        db.execute("INSERT INTO pending_tokens VALUES (?, ?, ?)",
                   ("leeloo_b", '{"access_token":"at"}', T0 + 600))
        db.close()
        return directory

    def test_new_database(self):
        """
        A new database is created at the current schema version.
        """
        directory = self.directory()
        self.open(directory)
        self.assertEqual(schema_version(self.connect(directory)), SCHEMA_VERSION)

    def test_from_version_1(self):
        """
        A version 1 database is migrated to the current version and its
        crew, member (with nothing delivered or acknowledged, offline), bot
        user and token load (the token sealed by migration 9).
        """
        directory = self.version_1()
        sealer = Sealer()
        snapshot = self.open(directory, sealer=sealer).load()
        self.assertEqual(schema_version(self.connect(directory)), SCHEMA_VERSION)
        [token] = snapshot.tokens
        self.assertEqual(
            (snapshot.crews, snapshot.members, snapshot.bot_users, snapshot.last_seq),
            ([CrewRecord(ALPHA, T0, "leeloo_a")],
             [MemberRecord(ALPHA, "leeloo_a", "Ann", T0 + 1, 0, None, False)],
             [BotUserRecord(ALPHA, "42", "Bob")],
             {}),
        )
        self.assertEqual((token.device_id, sealer.open_tokens(token.tokens), token.expires_at),
                         ("leeloo_b", {"access_token": "at"}, T0 + 600))

    @inlineCallbacks
    def test_migrated_log(self):
        """
        A migrated crew takes log entries and replays them.
        """
        store = self.open(self.version_1())
        yield store.write([append_op(1, b"one")])
        replay = yield store.replay(ALPHA, 0, 1, 0.0, "nobody", 10)
        self.assertEqual(replay, Replay([(1, b"one")]))

    @inlineCallbacks
    def test_migration_marks_ephemeral(self):
        """
        The migration that adds C{ephemeral} marks the nudges and reactions
        already logged: a replay with C{ephemeral_since} leaves them out.
        """
        directory = self.directory()
        db = self.connect(directory)
        migrate(db, next(i for i, script in enumerate(MIGRATIONS) if "ephemeral" in script))
        db.execute("INSERT INTO crews (code, created_at, created_by) VALUES (?, ?, ?)", (ALPHA, T0, "leeloo_a"))
        payloads = [
            b'{"type":"message","msg_type":"text","payload":{"text":"hi"}}',
            b'{"type":"message","msg_type":"nudge","payload":{}}',
            b'{"type":"reaction","reaction_type":"fire","from":"Ann"}',
            b'{"type":"message","msg_type":"reaction","payload":{"reaction":"love"}}',
            b'{"type":"music_shared","track":"T"}',
            b"not json",
        ]
        for seq, payload in enumerate(payloads, 1):
            db.execute("INSERT INTO messages (crew_code, seq, id, sender, created_at, payload) "
                       "VALUES (?, ?, ?, ?, ?, ?)", (ALPHA, seq, f"m{seq}", "leeloo_a", T0, payload))
        db.close()
        store = self.open(directory)
        replay = yield store.replay(ALPHA, 0, 6, 0.0, "nobody", 10, T0 + 1)
        self.assertEqual([seq for seq, _ in replay.entries], [1, 5, 6])

    @inlineCallbacks
    def test_log_kept_in_write_order(self):
        """
        Migration 10 moves the log to a rowid table in the order it was
        written, with every entry (each field) as it was, the crew and
        sequence still its unique key, and the same indexes: a replay, an
        append and a second entry with the same key or client_msg_id are
        as before.
        """
        directory = self.directory()
        db = self.connect(directory)
        migrate(db, 9)
        db.execute("INSERT INTO crews (code, created_at, created_by) VALUES (?, ?, ?)", (ALPHA, T0, "leeloo_a"))
        db.execute("INSERT INTO crews (code, created_at, created_by) VALUES (?, ?, ?)", ("LEELOO-BRAVO", T0, "b"))
        rows = [
            (ALPHA, 1, "m1", "leeloo_a", None, None, T0 + 1, b'{"type":"music_shared"}', 0),
            ("LEELOO-BRAVO", 1, "b1", "b", "c-1", b"\x00\x01digest", T0 + 2, b"\xff binary", 0),
            (ALPHA, 2, "m2", "leeloo_b", "c-1", b"d2", T0 + 3, b'{"type":"reaction"}', 1),
        ]
        # Written in another order than the key's: the copy keeps each row.
        for row in reversed(rows):
            db.execute("INSERT INTO messages VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", row)
        db.commit()
        db.close()
        store = self.open(directory)
        snapshot = store.load()
        self.assertEqual(snapshot.last_seq, {ALPHA: 2, "LEELOO-BRAVO": 1})
        db = self.connect(directory)
        self.assertEqual(schema_version(db), SCHEMA_VERSION)
        [sql] = db.execute("SELECT sql FROM sqlite_master WHERE name = 'messages'").fetchone()
        self.assertNotIn("WITHOUT ROWID", sql.upper())
        indexes = {name for (name,) in db.execute(
            "SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = 'messages'")}
        self.assertTrue({"messages_client_msg_id", "messages_created_at"} <= indexes, indexes)
        entries = [entry for code in (ALPHA, "LEELOO-BRAVO") for entry in read_log(db, code)]
        self.assertEqual(
            sorted((e.crew_code, e.seq, e.id, e.sender, e.client_msg_id, e.digest, e.created_at, e.payload,
                    int(e.ephemeral)) for e in entries),
            sorted(rows))
        # Oldest first, as written since: the rowids follow created_at.
        self.assertEqual([seq for (seq,) in db.execute("SELECT seq FROM messages ORDER BY rowid")], [1, 1, 2])
        for duplicate in ((ALPHA, 2, "x", "leeloo_c", None, None, T0, b"{}", 0),
                          (ALPHA, 3, "x", "leeloo_b", "c-1", None, T0, b"{}", 0)):
            self.assertRaises(sqlite3.IntegrityError, db.execute,
                              "INSERT INTO messages VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", duplicate)
        db.close()
        yield store.write([append_op(3, b"three")])
        replay = yield store.replay(ALPHA, 0, 3, 0.0, "nobody", 10)
        self.assertEqual(replay, Replay([(1, b'{"type":"music_shared"}'), (2, b'{"type":"reaction"}'),
                                         (3, b"three")]))

    def test_log_copy_announced(self):
        """
        Before migration 10 copies a log, the relay says how many entries
        it copies, and asks systemd to wait a minute more than they take at
        LOG_COPY_RATE; an empty log is not announced.
        """
        path = os.path.abspath(os.path.join(self.directory(), "notify"))
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.addCleanup(listener.close)
        listener.bind(path)
        listener.setblocking(False)
        self.patch(os, "environ", dict(os.environ, NOTIFY_SOCKET=path))
        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        for count in (0, 250):
            directory = self.directory()
            db = self.connect(directory)
            migrate(db, 9)
            db.execute("INSERT INTO crews (code, created_at, created_by) VALUES (?, ?, ?)", (ALPHA, T0, "a"))
            db.execute("BEGIN")
            db.executemany("INSERT INTO messages (crew_code, seq, id, sender, created_at, payload) "
                           "VALUES (?, ?, ?, ?, ?, ?)",
                           [(ALPHA, seq, f"m{seq}", "a", T0, b"{}") for seq in range(1, count + 1)])
            db.commit()
            migrate(db)
            db.close()
        self.assertEqual(listener.recv(100), b"EXTEND_TIMEOUT_USEC=%d" % ((60 + 250 / LOG_COPY_RATE) * 1e6))
        self.assertRaises(BlockingIOError, listener.recv, 100)
        lines = [e["log_format"].format(**e) for e in events if "message log" in e.get("log_format", "")]
        self.assertEqual(lines, ["copying the message log (250 entries) into schema version 10"])

    def test_failed_migration(self):
        """
        A migration that fails is rolled back whole: the database stays at
        the version it had, with the tables it had.
        """
        directory = self.version_1()
        self.connect(directory).execute("CREATE TABLE messages (x)")
        self.assertRaises(sqlite3.OperationalError, SQLiteStore, directory, reactor)
        db = self.connect(directory)
        self.assertEqual(schema_version(db), 1)
        columns = [row[1] for row in db.execute("PRAGMA table_info(members)")]
        self.assertNotIn("delivered_seq", columns)

    def test_newer_schema(self):
        """
        A database from a newer relay is refused with SchemaError saying
        both versions and to upgrade the relay, and left as it is.
        """
        directory = self.directory()
        self.connect(directory).execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
        error = self.assertRaises(SchemaError, SQLiteStore, directory, reactor)
        self.assertIn(f"schema version {SCHEMA_VERSION + 1}", str(error))
        self.assertIn(f"this relay's {SCHEMA_VERSION}", str(error))
        self.assertIn("upgrade the relay", str(error))
        self.assertEqual(schema_version(self.connect(directory)), SCHEMA_VERSION + 1)


class FailureTests(SQLiteTestCase):
    """
    A write the database refuses fails with StoreError, applies nothing,
    and the store works again once the cause is gone.
    """

    @inlineCallbacks
    def test_locked(self):
        """
        While another connection holds an exclusive lock, a write fails
        with StoreError once the busy timeout has passed.
        """
        directory = self.directory()
        store = self.open(directory, busy_timeout=0.05)
        self.connect(directory).execute("BEGIN EXCLUSIVE")
        started = time.monotonic()
        error = yield self.assertFailure(store.write([crew_op()]), StoreError)
        self.assertLess(time.monotonic() - started, 1.0)
        self.assertIn("locked", str(error))

    @inlineCallbacks
    def test_unlocked(self):
        """
        A write refused because the database was locked left nothing
        behind, and the same write succeeds once the lock is released.
        """
        directory = self.directory()
        store = self.open(directory, busy_timeout=0.05)
        locker = self.connect(directory)
        locker.execute("BEGIN EXCLUSIVE")
        batch = [crew_op(), append_op(1)]
        yield self.assertFailure(store.write(batch), StoreError)
        locker.execute("ROLLBACK")
        yield store.write(batch)
        replay = yield store.replay(ALPHA, 0, 9, 0.0, "nobody", 10)
        self.assertEqual([seq for seq, _ in replay.entries], [1])

    def limit_pages(self, store, pages):
        return store._pool.runQuery(f"PRAGMA max_page_count = {pages}")

    @inlineCallbacks
    def test_full(self):
        """
        A write to a full database fails with StoreError ('database or disk
        is full'), and leaves nothing behind.
        """
        store = self.open()
        yield store.write([crew_op()])
        yield self.limit_pages(store, 1)
        error = yield self.assertFailure(store.write([append_op(1, b"x" * 100_000)]), StoreError)
        self.assertIn("full", str(error))
        replay = yield store.replay(ALPHA, 0, 9, 0.0, "nobody", 10)
        self.assertEqual(replay, Replay([]))

    @inlineCallbacks
    def test_room_again(self):
        """
        Once there is room again, the write that failed for a full database
        succeeds.
        """
        store = self.open()
        yield store.write([crew_op()])
        yield self.limit_pages(store, 1)
        batch = [append_op(1, b"x" * 100_000)]
        yield self.assertFailure(store.write(batch), StoreError)
        yield self.limit_pages(store, 1_000_000)
        yield store.write(batch)
        replay = yield store.replay(ALPHA, 0, 9, 0.0, "nobody", 10)
        self.assertEqual([seq for seq, _ in replay.entries], [1])


class WriterProcessTests(SQLiteTestCase):
    """
    The reactor never waits on the disk, nor shares its GIL with the
    database's work: the store's SQL runs in a process of its own, which
    holds the database's lock.
    """

    @inlineCallbacks
    def test_sql_in_the_writer_process(self):
        """
        Writes, replays and pruning run their SQL in the writer, a process
        other than the relay's.
        """
        store = self.open()
        yield store._pool.runWithConnection(trace_statements, True)
        yield store.write([crew_op(), append_op(1)])
        yield store.replay(ALPHA, 0, 1, 0.0, "nobody", 10)
        yield store.prune(T0)
        pid, statements = yield store._pool.runWithConnection(trace_statements, False)
        kinds = {sql.split()[0] for sql in statements}
        self.assertTrue({"INSERT", "SELECT", "DELETE"} <= kinds, kinds)
        self.assertEqual(pid, store._pool.pid)
        self.assertNotEqual(pid, os.getpid())

    @inlineCallbacks
    def test_exits_at_close(self):
        """
        Closing the store lets the writer answer what it was sent, then it
        exits, and the database is free for the next store.
        """
        directory = self.directory()
        store = self.open(directory)
        yield store.write([crew_op()])
        pid = store._pool.pid
        written = store.write([append_op(1)])
        closed = store.close()
        yield written
        yield closed
        self.assertRaises(ProcessLookupError, os.kill, pid, 0)
        again = self.open(directory)
        replay = yield again.replay(ALPHA, 0, 9, 0.0, "nobody", 10)
        self.assertEqual([seq for seq, _ in replay.entries], [1])
        yield self.assertFailure(store.write([append_op(2)]), StoreError)

    def test_one_store_a_database(self):
        """
        A second store on a database another store has open is refused,
        with an error that says so.
        """
        self.patch(sqlitestore, "LOCK_WAIT", 0.05)
        directory = self.directory()
        self.open(directory)
        e = self.assertRaises(DatabaseInUse, SQLiteStore, directory, reactor, sealer=Sealer())
        self.assertIn("another relay is using this database", str(e))

    @inlineCallbacks
    def test_writer_holds_the_lock(self):
        """
        The writer holds the database's lock by itself: a relay killed while
        its writer commits leaves the lock held until the writer is done, so
        the relay started after it reads every entry committed.
        """
        self.patch(sqlitestore, "LOCK_WAIT", 0.05)
        directory = self.directory()
        store = self.open(directory)
        yield store.write([crew_op()])
        # The relay's own descriptor gone, as a kill -9 takes it.
        os.close(store._lock)
        store._lock = os.open(os.devnull, os.O_RDONLY)
        self.assertRaises(DatabaseInUse, SQLiteStore, directory, reactor, sealer=Sealer())
        yield store._pool.close()
        self.open(directory)

    @inlineCallbacks
    def test_lock_waits_for_a_writer_finishing(self):
        """
        A store that starts while the lock is held waits for it (the writer
        of a relay that just went finishing its last commit), up to
        LOCK_WAIT, and takes it once it is let go.
        """
        directory = self.directory()
        path = os.path.join(directory, DATABASE_NAME + ".lock")
        holder = yield self.hold_lock(path)
        refused = Deferred()
        flock = fcntl.flock

        def attempt(fd, operation):
            try:
                return flock(fd, operation)
            except BlockingIOError:
                reactor.callFromThread(lambda: refused.called or refused.callback(None))
                raise

        self.patch(sqlitestore.fcntl, "flock", attempt)
        # Taken on a thread of its own, as the relay takes it before its
        # reactor runs: this one lets the holder go once it was refused.
        taking = threads.deferToThread(sqlitestore._lock, Path(path))
        yield refused
        holder.transport.write(b"done\n")
        fd = yield taking
        self.addCleanup(os.close, fd)
        yield holder.ended
        # The store's descriptor holds it now.
        other = os.open(path, os.O_RDWR)
        self.addCleanup(os.close, other)
        self.assertRaises(BlockingIOError, flock, other, fcntl.LOCK_EX | fcntl.LOCK_NB)

    def hold_lock(self, path):
        """
        A process holding the lock on C{path} until it reads a line, as the
        writer of a relay just killed does until its last commit is done;
        fires once it holds it.
        """
        from twisted.internet.protocol import ProcessProtocol

        class Holder(ProcessProtocol):
            def __init__(self):
                self.holding, self.ended = Deferred(), Deferred()

            def outReceived(self, data):
                self.holding.callback(self)

            def processEnded(self, reason):
                self.ended.callback(None)

        holder = Holder()
        code = ("import fcntl, os, sys; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT); "
                "fcntl.flock(fd, fcntl.LOCK_EX); print('held', flush=True); sys.stdin.readline()")
        reactor.spawnProcess(holder, sys.executable, [sys.executable, "-c", code, path], env=os.environ,
                             childFDs={0: "w", 1: "r", 2: 2})
        return holder.holding

    @inlineCallbacks
    def test_ignores_the_signals_that_stop_the_relay(self):
        """
        SIGTERM and SIGINT (which systemd and a terminal send to every
        process of the relay) leave the writer running: it commits what the
        relay flushes while it stops.
        """
        store = self.open()
        # Once it runs (it answered), not while its interpreter starts.
        yield store.write([crew_op()])
        pid = store._pool.pid
        os.kill(pid, signal.SIGTERM)
        os.kill(pid, signal.SIGINT)
        yield store.write([append_op(1)])
        replay = yield store.replay(ALPHA, 0, 9, 0.0, "nobody", 10)
        self.assertEqual([seq for seq, _ in replay.entries], [1])
        self.assertEqual(store._pool.pid, pid)

    @inlineCallbacks
    def test_writer_killed(self):
        """
        A writer killed while a write waits fails that write (transient:
        the journal retries it), and the next write starts another writer
        and is committed; nothing the dead one had not committed is there.
        """
        directory = self.directory()
        store = self.open(directory)
        yield store.write([crew_op()])
        locker = self.connect(directory)
        locker.execute("BEGIN EXCLUSIVE")
        waiting = store.write([append_op(1)])
        dead = store._pool.pid
        os.kill(dead, signal.SIGKILL)
        failure = yield self.assertFailure(waiting, StoreError)
        self.assertTrue(failure.transient)
        locker.execute("ROLLBACK")
        yield store.write([append_op(2)])
        self.assertNotEqual(store._pool.pid, dead)
        replay = yield store.replay(ALPHA, 0, 9, 0.0, "nobody", 10)
        self.assertEqual([seq for seq, _ in replay.entries], [2])


class WriterStartTests(SynchronousTestCase):
    """
    The writer starts once the reactor runs, and a writer that cannot start
    fails what waits for it (transient: retried), not the relay.
    """

    def writer(self, reactor):
        lock = os.open(os.devnull, os.O_RDONLY)
        self.addCleanup(os.close, lock)
        return WriterProcess(reactor, self.mktemp(), False, 1.0, lock)

    def test_starts_when_the_reactor_runs(self):
        """
        A request made before the reactor runs waits for it: the child is
        started then, with the request.
        """
        spawned = []

        class Recording(MemoryReactorClock):
            def spawnProcess(self, *args, **kwargs):
                spawned.append(kwargs["childFDs"])
                raise OSError("recorded")

        reactor = Recording()
        d = self.writer(reactor).runQuery("SELECT 1")
        self.assertNoResult(d)
        self.assertEqual(spawned, [])
        reactor.run()
        self.assertEqual([sorted(fds) for fds in spawned], [[0, 1, 2, 3]])
        self.failureResultOf(d, StoreError)

    def test_cannot_start(self):
        """
        A writer that cannot be started fails each request with a transient
        StoreError, and is tried again at the next; closing it still fires.
        """

        class NoProcesses(MemoryReactorClock):
            def spawnProcess(self, *args, **kwargs):
                raise OSError("no processes here")

        reactor = NoProcesses()
        reactor.run()
        writer = self.writer(reactor)
        for _ in range(2):
            failure = self.failureResultOf(writer.runQuery("SELECT 1"), StoreError)
            self.assertTrue(failure.value.transient)
            self.assertIn("no processes here", str(failure.value))
        self.assertIsNone(self.successResultOf(writer.close()))
        self.failureResultOf(writer.runQuery("SELECT 1"), StoreError)


class StatementTests(SQLiteTestCase):
    """
    A batch's rows of one kind go in one multi-row INSERT (per thousand):
    SQLite lets go of the GIL around every statement, and the database
    thread queues for it behind a busy reactor each time.
    """

    @inlineCallbacks
    def statements_of(self, store, batch):
        yield store._pool.runWithConnection(trace_statements, True)
        yield store.write(batch)
        _, statements = yield store._pool.runWithConnection(trace_statements, False)
        return [sql.split(" (")[0] for sql in statements if sql.startswith("INSERT")]

    @inlineCallbacks
    def test_one_insert_per_kind(self):
        """
        A reconnect storm's batch (new crews, their members and devices)
        with a few log entries is one INSERT per table.
        """
        store = self.open()
        batch = [crew_op(f"LEELOO-C{i}") for i in range(3)]
        batch += [(PUT_MEMBER, MemberRecord(f"LEELOO-C{i % 3}", f"leeloo_{i}", f"D{i}", T0)) for i in range(30)]
        batch += [(PUT_DEVICE, DeviceRecord(f"leeloo_{i}", "h", False, T0)) for i in range(30)]
        batch += [crew_op()] + [append_op(seq) for seq in range(1, 31)]
        inserts = yield self.statements_of(store, batch)
        self.assertEqual(inserts, ["INSERT INTO crews", "INSERT OR REPLACE INTO devices", "INSERT INTO members",
                                   "INSERT INTO messages"])
        rows = yield store._pool.runQuery(
            "SELECT (SELECT COUNT(*) FROM crews), (SELECT COUNT(*) FROM members), (SELECT COUNT(*) FROM devices), "
            "(SELECT COUNT(*) FROM messages)")
        self.assertEqual(rows, [(4, 30, 30, 30)])

    @inlineCallbacks
    def test_a_thousand_rows_a_statement(self):
        """
        Past a thousand rows, another INSERT takes the rest; every row is
        written.
        """
        store = self.open()
        yield store.write([crew_op()])
        members = [(PUT_MEMBER, MemberRecord(ALPHA, f"leeloo_{i}", f"D{i}", T0)) for i in range(1001)]
        inserts = yield self.statements_of(store, members)
        self.assertEqual(inserts, ["INSERT INTO members"] * 2)
        rows = yield store._pool.runQuery("SELECT COUNT(*) FROM members")
        self.assertEqual(rows, [(1001,)])


class CheckpointTests(SQLiteTestCase):
    @inlineCallbacks
    def test_commits_never_checkpoint(self):
        """
        A commit never checkpoints the WAL (that would make it wait for an
        fsync of the database): the writing connection checkpoints only to
        catch up a WAL past its limit (test_starts_over_under_steady_writes).
        """
        store = self.open()
        self.assertEqual((yield self.pragma(store, "wal_autocheckpoint")), 0)

    @inlineCallbacks
    def test_checkpoint_on_its_own_connection(self):
        """
        A checkpoint, on the store's other connection, copies every committed
        WAL frame into the database.
        """
        store = self.open()
        yield store.write([crew_op()] + [append_op(seq) for seq in range(1, 200)])
        busy, frames, copied = (yield store._checkpoints.runQuery("PRAGMA wal_checkpoint(PASSIVE)"))[0]
        self.assertEqual(busy, 0)
        self.assertGreater(frames, 0)
        self.assertEqual(copied, frames)
        self.assertFalse(store._checkpoints is store._pool)
        self.assertTrue(store._checkpointing.running)


class WALSizeTests(SQLiteTestCase):
    def wal_size(self, store):
        return os.path.getsize(f"{store.path}-wal")

    @inlineCallbacks
    def test_journal_size_limit(self):
        """
        Every connection cuts the WAL back to JOURNAL_SIZE_LIMIT when it
        starts over.
        """
        store = self.open()
        self.assertEqual((yield self.pragma(store, "journal_size_limit")), JOURNAL_SIZE_LIMIT)
        limit = yield store._checkpoints.runQuery("PRAGMA journal_size_limit")
        self.assertEqual(limit, [(JOURNAL_SIZE_LIMIT,)])

    @inlineCallbacks
    def test_truncated_when_idle(self):
        """
        After a burst of writes, the first checkpoint with no write since
        the one before truncates the WAL to nothing; while writes come, the
        WAL is left alone.
        """
        store = self.open()
        yield store.write([crew_op()] + [append_op(seq, b"x" * 4096) for seq in range(1, 2000)])
        yield store._checkpoint()
        self.assertGreater(self.wal_size(store), 4 * 1024 * 1024)
        yield store._checkpoint()
        self.assertEqual(self.wal_size(store), 0)
        self.assertIsNone(store._checkpoint())
        yield store.write([append_op(2000)])
        self.assertGreater(self.wal_size(store), 0)

    @inlineCallbacks
    def test_starts_over_under_steady_writes(self):
        """
        Commits that came while the other connection's checkpoint ran leave
        frames it did not copy, and the WAL could never start over while
        writes keep coming; past CATCH_UP_FRAMES the writing connection
        copies them, and the next commit starts the WAL over, cut back to
        JOURNAL_SIZE_LIMIT.
        """
        store = self.open()
        yield store.write([crew_op()] + [append_op(seq, b"x" * 4096) for seq in range(1, 1000)])
        # A reader's snapshot stands for the commit that came while the
        # checkpoint ran: the checkpoint copies only what that snapshot holds.
        reader = self.connect(store.path.parent)
        reader.execute("BEGIN")
        reader.execute("SELECT COUNT(*) FROM messages").fetchone()
        yield store.write([append_op(seq, b"x" * 4096) for seq in range(1000, 2000)])
        checkpoint = store._checkpoints.runQuery
        rows = []

        def then_reader_done(query):
            def done(result):
                rows.extend(result)
                reader.execute("COMMIT")
                return result
            return checkpoint(query).addCallback(done)
        store._checkpoints.runQuery = then_reader_done
        yield store._checkpoint()
        [(busy, frames, copied)] = rows
        self.assertEqual(busy, 0)
        self.assertGreaterEqual(frames, CATCH_UP_FRAMES)
        self.assertLess(copied, frames)
        before = self.wal_size(store)
        yield store.write([append_op(2000)])
        self.assertLessEqual(self.wal_size(store), JOURNAL_SIZE_LIMIT)
        self.assertGreater(before, JOURNAL_SIZE_LIMIT)
        rows = yield store._pool.runQuery("SELECT COUNT(*) FROM messages")
        self.assertEqual(rows, [(2000,)])
