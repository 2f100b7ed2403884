"""
The SQLite store: WAL mode, a versioned schema with migrations, and every
runtime read and write on one connection in a process of its own
(L{leeloo.sqlitewriter}), so the reactor never waits on the disk and never
shares its GIL with the database's work.

The schema is read and migrated, and the state loaded, synchronously at
start-up, before the relay serves anyone.
"""

from __future__ import annotations

import fcntl
import json
import os
import sqlite3
import time
from pickle import PickleBuffer
from itertools import groupby
from operator import itemgetter
from pathlib import Path
from typing import Any, Callable, Iterator

from twisted.enterprise import adbapi
from twisted.internet.task import LoopingCall
from twisted.internet.defer import Deferred, fail
from twisted.logger import Logger
from zope.interface import implementer

from leeloo.process import sd_notify
from leeloo.sealing import is_sealed
from leeloo.sqlitechild import (
    BUSY_TIMEOUT,
    CLIENT_MESSAGE_COLUMNS,
    CREW_COLUMNS,
    EXECUTE,
    EXECUTE_MANY,
    JOURNAL_SIZE_LIMIT,
    MEMBER_COLUMNS,
    RENAME,
    configure as _configure,
    crew_rows,
    execute_steps,
    trim,
)
from leeloo.sqlitewriter import WriterProcess

from leeloo.store import (
    APPEND,
    DELETE_CREW,
    DELETE_DEVICE,
    DELETE_MEMBER,
    DELETE_MULTI_CREW,
    DELETE_GRANT,
    DELETE_TOKEN,
    PUT_ALIAS,
    PUT_BOT_USER,
    PUT_CREW,
    PUT_DEVICE,
    PUT_MEMBER,
    PUT_MULTI_CREW,
    PUT_GRANT,
    PUT_TOKEN,
    RENAME_CREW,
    BotUserRecord,
    CrewRecord,
    DeviceRecord,
    IStore,
    IPairings,
    LogEntry,
    MemberRecord,
    MultiCrewRecord,
    PairingRecord,
    Replay,
    Sequences,
    Snapshot,
    StoreError,
    GrantRecord,
    TokenRecord,
    _replay_window,
    encode_tokens,
)

_log = Logger()

DATABASE_NAME = "leeloo.sqlite3"
CHECKPOINT_INTERVAL = 1.0
# A WAL of this many frames (pages of SQLite's default 4 KiB, which the
# store keeps) or more, checkpointed while writes came, is caught up on the
# writing connection so that it starts over.
CATCH_UP_FRAMES = JOURNAL_SIZE_LIMIT // 4096

# Each entry takes the schema from version N to N + 1.
MIGRATIONS = [
    # 1: crews, their members and bot users, pending Spotify tokens.
    """
    CREATE TABLE crews (
        code TEXT PRIMARY KEY,
        created_at REAL NOT NULL,
        created_by TEXT
    );
    CREATE TABLE members (
        crew_code TEXT NOT NULL REFERENCES crews(code) ON DELETE CASCADE,
        device_id TEXT NOT NULL,
        display_name TEXT NOT NULL,
        last_seen REAL NOT NULL,
        PRIMARY KEY (crew_code, device_id)
    );
    CREATE TABLE bot_users (
        crew_code TEXT NOT NULL REFERENCES crews(code) ON DELETE CASCADE,
        user_id TEXT NOT NULL,
        display_name TEXT NOT NULL,
        PRIMARY KEY (crew_code, user_id)
    );
    CREATE TABLE pending_tokens (
        device_id TEXT PRIMARY KEY,
        tokens TEXT NOT NULL,
        expires_at REAL NOT NULL
    );
    """,
    # 2: each crew's message log, and how far each member got.
    """
    ALTER TABLE members ADD COLUMN delivered_seq INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE members ADD COLUMN acked_seq INTEGER;
    ALTER TABLE members ADD COLUMN online INTEGER NOT NULL DEFAULT 0;
    CREATE TABLE messages (
        crew_code TEXT NOT NULL REFERENCES crews(code) ON DELETE CASCADE,
        seq INTEGER NOT NULL,
        id TEXT NOT NULL,
        sender TEXT NOT NULL,
        client_msg_id TEXT,
        digest BLOB,
        created_at REAL NOT NULL,
        payload BLOB NOT NULL,
        PRIMARY KEY (crew_code, seq)
    ) WITHOUT ROWID;
    CREATE UNIQUE INDEX messages_client_msg_id
        ON messages (crew_code, sender, client_msg_id) WHERE client_msg_id IS NOT NULL;
    CREATE INDEX messages_created_at ON messages (created_at);
    """,
    # 3: device keys (only their hashes).
    """
    CREATE TABLE devices (
        device_id TEXT PRIMARY KEY,
        key_hash TEXT NOT NULL,
        bound INTEGER NOT NULL,
        created_at REAL NOT NULL
    );
    """,
    # 4: when a device in no crew was last seen (so that it can be pruned).
    """
    ALTER TABLE devices ADD COLUMN last_seen REAL;
    """,
    # 5: which log entries are nudges or reactions (replayed to legacy
    # devices only while fresh); the entries already logged are read.
    """
    ALTER TABLE messages ADD COLUMN ephemeral INTEGER NOT NULL DEFAULT 0;
    UPDATE messages SET ephemeral = 1
        WHERE json_valid(CAST(payload AS TEXT))
        AND (json_extract(CAST(payload AS TEXT), '$.type') = 'reaction'
             OR (json_extract(CAST(payload AS TEXT), '$.type') = 'message'
                 AND json_extract(CAST(payload AS TEXT), '$.msg_type') IN ('nudge', 'reaction')));
    """,
    # 6: Spotify pairing flows (leeloo.core.pairing).
    """
    CREATE TABLE pairings (
        user_code TEXT PRIMARY KEY,
        device_id TEXT NOT NULL,
        device_name TEXT NOT NULL,
        crew_code TEXT,
        scopes TEXT NOT NULL,
        created_at REAL NOT NULL,
        expires_at REAL NOT NULL,
        state_hash TEXT UNIQUE,
        cookie_hash TEXT,
        verifier TEXT
    );
    CREATE INDEX pairings_expires_at ON pairings (expires_at);
    """,
    # 7: several crews per device (issue 16): a crew's name, and each
    # multi-crew device's crews (a JSON list of codes, in the order joined)
    # and primary crew.  No device was multi-crew before: every member row
    # already kept (those a legacy device left behind when it moved
    # included) stays what it was, history and delivery position, never a
    # membership.
    """
    ALTER TABLE crews ADD COLUMN name TEXT;
    CREATE TABLE multi_crew_devices (
        device_id TEXT PRIMARY KEY,
        crews TEXT NOT NULL,
        primary_crew TEXT
    );
    """,
    # 8: the codes crews were renamed from (leeloo-admin rename-crew), so
    # that their members' devices, which keep the old one, find them.
    """
    CREATE TABLE crew_aliases (
        code TEXT PRIMARY KEY,
        crew_code TEXT NOT NULL REFERENCES crews(code) ON DELETE CASCADE
    );
    """,
    # 9: Spotify tokens encrypted at rest (issue 20): the grants the relay
    # holds with their owner's consent, whether a pairing offered and got
    # that consent, and every pending token row of an earlier release sealed
    # with the secrets key (see _seal_pending_tokens).
    """
    CREATE TABLE spotify_grants (
        device_id TEXT PRIMARY KEY,
        sealed TEXT NOT NULL
    );
    ALTER TABLE pairings ADD COLUMN keep INTEGER NOT NULL DEFAULT 0;
    """,
    # 10: the log kept in the order it is written (a rowid table), its key
    # an index.  Clustered by crew (WITHOUT ROWID), every message went into
    # its crew's page of whole rows: a batch of messages to many crews
    # dirtied (and wrote to the WAL) a page of rows for each, about twice
    # the database work per message of appending them to the last page and
    # the crew's key to a page of small index entries.  Each row is copied
    # as it was, oldest first; the other indexes are made again.
    """
    CREATE TABLE messages_in_order (
        crew_code TEXT NOT NULL REFERENCES crews(code) ON DELETE CASCADE,
        seq INTEGER NOT NULL,
        id TEXT NOT NULL,
        sender TEXT NOT NULL,
        client_msg_id TEXT,
        digest BLOB,
        created_at REAL NOT NULL,
        payload BLOB NOT NULL,
        ephemeral INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (crew_code, seq)
    );
    INSERT INTO messages_in_order
        (crew_code, seq, id, sender, client_msg_id, digest, created_at, payload, ephemeral)
        SELECT crew_code, seq, id, sender, client_msg_id, digest, created_at, payload, ephemeral
        FROM messages ORDER BY created_at, crew_code, seq;
    DROP TABLE messages;
    ALTER TABLE messages_in_order RENAME TO messages;
    CREATE UNIQUE INDEX messages_client_msg_id
        ON messages (crew_code, sender, client_msg_id) WHERE client_msg_id IS NOT NULL;
    CREATE INDEX messages_created_at ON messages (created_at);
    """,
]
SCHEMA_VERSION = len(MIGRATIONS)


class SchemaError(Exception):
    """
    The database cannot be used by this relay (too new, or unreadable).
    """


class DatabaseInUse(Exception):
    """
    Another store (another relay, or the database writer of one) holds the
    database's lock.
    """


# How long a store that starts waits for the lock: long enough for the
# writer of a relay killed a moment ago to finish its last commit.
LOCK_WAIT = 5.0
LOCK_POLL = 0.01


def _lock(path: Path) -> int:
    """
    A descriptor holding the exclusive lock on C{path} (created readable
    by its owner only), taken within LOCK_WAIT seconds or L{DatabaseInUse}.
    """
    fd = os.open(path, os.O_CREAT | os.O_RDWR | os.O_CLOEXEC, 0o600)
    deadline = time.monotonic() + LOCK_WAIT
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except BlockingIOError:
            if time.monotonic() >= deadline:
                os.close(fd)
                raise DatabaseInUse(
                    f"another relay is using this database (it holds {path.name}): stop it first") from None
            # The writer of a relay that went holds it until its last
            # commit is done: milliseconds.
            time.sleep(LOCK_POLL)


def schema_version(db: sqlite3.Connection) -> int:
    return db.execute("PRAGMA user_version").fetchone()[0]


def _seal_pending_tokens(db: sqlite3.Connection, sealer: Any) -> None:
    """
    Migration 9's rows: seal each pending token an earlier release kept in
    the clear.

    @raise SchemaError: there are some, and no key to seal them with.
    """
    rows = [(device, json.loads(tokens)) for device, tokens in
            db.execute("SELECT device_id, tokens FROM pending_tokens")]
    plain = [(device, tokens) for device, tokens in rows if not is_sealed(tokens)]
    # The rows' old bytes are overwritten, not left in free pages.
    db.execute("PRAGMA secure_delete = ON")
    if plain and sealer is None:
        raise SchemaError(f"{len(plain)} pending Spotify token(s) must be encrypted, and no secrets key was given")
    for device, tokens in plain:
        db.execute("UPDATE pending_tokens SET tokens = ? WHERE device_id = ?",
                   (encode_tokens(sealer.seal_tokens(tokens)), device))


# The messages a second migration 10 is reckoned to copy, for what systemd
# is asked to wait: a sixth of what a 2-core machine copied (30,000).
LOG_COPY_RATE = 5_000


def _announce_log_copy(db: sqlite3.Connection, sealer: Any) -> None:
    """
    Before migration 10 copies the log: say how long it is, and ask
    systemd (a Type=notify unit times a start out after 90 s by default,
    and a killed migration is rolled back, to start again) to wait for it.
    """
    [(count,)] = db.execute("SELECT COUNT(*) FROM messages")
    if count:
        _log.info("copying the message log ({count} entries) into schema version 10", count=count)
        sd_notify(f"EXTEND_TIMEOUT_USEC={int((60 + count / LOG_COPY_RATE) * 1_000_000)}")


# What runs before and after a migration's script, in its transaction.
_BEFORE = {10: _announce_log_copy}
_AFTER = {9: _seal_pending_tokens}


def migrate(db: sqlite3.Connection, target: int = SCHEMA_VERSION, sealer: Any = None) -> int:
    """
    Bring C{db}'s schema up to C{target}, one version per transaction;
    return the version it started at.  C{sealer} (L{leeloo.sealing.Sealer})
    encrypts the rows migration 9 finds in the clear.
    """
    start = current = schema_version(db)
    if current > SCHEMA_VERSION:
        raise SchemaError(
            f"the database is at schema version {current}, newer than this relay's {SCHEMA_VERSION}; "
            "upgrade the relay"
        )
    while current < target:
        script = MIGRATIONS[current]
        db.execute("BEGIN")
        try:
            before = _BEFORE.get(current + 1)
            if before is not None:
                before(db, sealer)
            for statement in filter(str.strip, script.split(";")):
                db.execute(statement)
            after = _AFTER.get(current + 1)
            if after is not None:
                after(db, sealer)
            db.execute(f"PRAGMA user_version = {current + 1}")
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        current += 1
    return start


def _private_file(path: Path) -> None:
    """
    Create C{path} (and tighten an existing one) readable by its owner only.
    """
    os.close(os.open(path, os.O_CREAT | os.O_RDWR, 0o600))
    os.chmod(path, 0o600)


def _connect(path: Path, fsync: bool, busy_timeout: float = BUSY_TIMEOUT) -> sqlite3.Connection:
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    _configure(db, fsync, busy_timeout)
    return db


_INDEXED = frozenset({PUT_CREW, DELETE_CREW, PUT_DEVICE, DELETE_DEVICE, PUT_TOKEN, DELETE_TOKEN, RENAME_CREW,
                      PUT_GRANT, DELETE_GRANT})


def _crew_snapshot(rows: tuple | None) -> Snapshot | None:
    """
    Crew C{code} alone, as L{_load} reads every crew, from its rows
    (L{leeloo.sqlitechild.crew_rows}); for the old code of a renamed crew,
    that crew and the alias; None if there is none.
    """
    if rows is None:
        return None
    crews, alias, members, bot_users, summary, client_messages = rows
    snapshot = Snapshot(crews=[CrewRecord(*row) for row in crews], aliases=dict([alias]) if alias else {})
    snapshot.members = [
        MemberRecord(c, device, name, seen, delivered, acked, bool(online))
        for c, device, name, seen, delivered, acked, online in members
    ]
    snapshot.bot_users = [BotUserRecord(*row) for row in bot_users]
    for c, seq, created, size in summary:
        if seq is not None:
            snapshot.last_seq[c] = seq
            snapshot.last_message_at[c] = created
            snapshot.log_bytes[c] = size
    snapshot.client_messages = [
        LogEntry(c, seq, id, sender, client_msg_id, digest, created, b"")
        for c, seq, id, sender, client_msg_id, digest, created in client_messages
    ]
    return snapshot


_FIND_DEVICE = "SELECT device_id, key_hash, bound, created_at, last_seen FROM devices WHERE device_id = ?"
_FIND_TOKEN = "SELECT device_id, tokens, expires_at FROM pending_tokens WHERE device_id = ?"
_FIND_GRANT = "SELECT device_id, sealed FROM spotify_grants WHERE device_id = ?"


def _device(rows: list) -> DeviceRecord | None:
    for device, key_hash, bound, created, seen in rows:
        return DeviceRecord(device, key_hash, bool(bound), created, seen)
    return None


def _token(rows: list) -> TokenRecord | None:
    for device, tokens, expires in rows:
        return TokenRecord(device, json.loads(tokens), expires)
    return None


def _grant(rows: list) -> GrantRecord | None:
    for device, sealed in rows:
        return GrantRecord(device, sealed)
    return None


def load_database(db: sqlite3.Connection) -> Snapshot:
    """
    Everything a database at this relay's schema holds, as a relay reads
    it at start (for C{leeloo-admin migrate-to-redis}).
    """
    return _load(db)


def read_log(db: sqlite3.Connection, code: str) -> Iterator[LogEntry]:
    """
    Crew C{code}'s log, oldest first, payloads included.
    """
    for seq, id, sender, cmid, digest, created, payload, ephemeral in db.execute(
        "SELECT seq, id, sender, client_msg_id, digest, created_at, payload, ephemeral "
        "FROM messages WHERE crew_code = ? ORDER BY seq", (code,)
    ):
        yield LogEntry(code, seq, id, sender, cmid, bytes(digest) if digest is not None else None, created,
                       bytes(payload), bool(ephemeral))


_PAIRING_COLUMNS = ("user_code, device_id, device_name, crew_code, scopes, created_at, expires_at, "
                    "state_hash, cookie_hash, verifier, keep")
# The pairings' keep column: 0 not offered, 1 offered, 2 offered and consented.


def _pairing(row: tuple) -> PairingRecord:
    *fields, keep = row
    return PairingRecord(*fields, keep_offered=keep >= 1, keep=keep >= 2)


def _load(db: sqlite3.Connection) -> Snapshot:
    snapshot = Snapshot()
    snapshot.crews = [CrewRecord(*row) for row in db.execute(f"SELECT {CREW_COLUMNS} FROM crews")]
    snapshot.members = [
        MemberRecord(code, device, name, seen, delivered, acked, bool(online))
        for code, device, name, seen, delivered, acked, online in db.execute(
            f"SELECT {MEMBER_COLUMNS} FROM members")
    ]
    snapshot.bot_users = [BotUserRecord(*row) for row in db.execute(
        "SELECT crew_code, user_id, display_name FROM bot_users")]
    snapshot.tokens = [
        TokenRecord(device, json.loads(tokens), expires)
        for device, tokens, expires in db.execute(
            "SELECT device_id, tokens, expires_at FROM pending_tokens")
    ]
    snapshot.devices = [
        DeviceRecord(device, key_hash, bool(bound), created, seen)
        for device, key_hash, bound, created, seen in db.execute(
            "SELECT device_id, key_hash, bound, created_at, last_seen FROM devices")
    ]
    snapshot.pairings = [_pairing(row) for row in db.execute(
        f"SELECT {_PAIRING_COLUMNS} FROM pairings")]
    snapshot.grants = [GrantRecord(*row) for row in db.execute("SELECT device_id, sealed FROM spotify_grants")]
    snapshot.multi_crew = [
        MultiCrewRecord(device, tuple(json.loads(crews)), primary)
        for device, crews, primary in db.execute(
            "SELECT device_id, crews, primary_crew FROM multi_crew_devices")
    ]
    snapshot.aliases = dict(db.execute("SELECT code, crew_code FROM crew_aliases"))
    for code, seq, created, size in db.execute(
        "SELECT crew_code, MAX(seq), MAX(created_at), SUM(length(payload)) FROM messages GROUP BY crew_code"
    ):
        snapshot.last_seq[code] = seq
        snapshot.last_message_at[code] = created
        snapshot.log_bytes[code] = size
    snapshot.client_messages = [
        LogEntry(code, seq, id, sender, client_msg_id, digest, created, b"")
        for code, seq, id, sender, client_msg_id, digest, created in db.execute(
            f"SELECT {CLIENT_MESSAGE_COLUMNS} FROM messages WHERE client_msg_id IS NOT NULL")
    ]
    return snapshot


# A payload this large or larger goes to the database writer out of band,
# written down the pipe as it is (pickle protocol 5); a smaller one is
# cheaper copied into the pickle.
OUT_OF_BAND_BYTES = 4096


def _blob(payload: bytes) -> Any:
    return PickleBuffer(payload) if len(payload) >= OUT_OF_BAND_BYTES else payload


# Each write operation: its statement and its row.
_STATEMENTS: dict[str, tuple[str, Callable[[Any], tuple]]] = {
    APPEND: (
        "INSERT INTO messages (crew_code, seq, id, sender, client_msg_id, digest, created_at, payload, "
        "ephemeral) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        lambda e: (e.crew_code, e.seq, e.id, e.sender, e.client_msg_id, e.digest, e.created_at,
                   _blob(e.payload), int(e.ephemeral)),
    ),
    PUT_MEMBER: (
        "INSERT INTO members (crew_code, device_id, display_name, last_seen, delivered_seq, acked_seq, online) "
        "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (crew_code, device_id) DO UPDATE SET "
        "display_name = excluded.display_name, last_seen = excluded.last_seen, "
        "delivered_seq = excluded.delivered_seq, acked_seq = excluded.acked_seq, online = excluded.online",
        lambda m: (m.crew_code, m.device_id, m.name, m.last_seen, m.delivered_seq, m.acked_seq, int(m.online)),
    ),
    PUT_CREW: (
        # Not INSERT OR REPLACE: replacing deletes the row, and the delete
        # cascades to the crew's members, bot users and log.
        "INSERT INTO crews (code, created_at, created_by, name) VALUES (?, ?, ?, ?) "
        "ON CONFLICT (code) DO UPDATE SET created_at = excluded.created_at, "
        "created_by = excluded.created_by, name = excluded.name",
        lambda c: (c.code, c.created_at, c.created_by, c.name),
    ),
    DELETE_CREW: ("DELETE FROM crews WHERE code = ?", lambda code: (code,)),
    DELETE_MEMBER: ("DELETE FROM members WHERE crew_code = ? AND device_id = ?", tuple),
    PUT_MULTI_CREW: (
        "INSERT OR REPLACE INTO multi_crew_devices (device_id, crews, primary_crew) VALUES (?, ?, ?)",
        lambda r: (r.device_id, json.dumps(list(r.crews), separators=(",", ":")), r.primary),
    ),
    DELETE_MULTI_CREW: ("DELETE FROM multi_crew_devices WHERE device_id = ?", lambda device_id: (device_id,)),
    PUT_BOT_USER: (
        "INSERT OR REPLACE INTO bot_users (crew_code, user_id, display_name) VALUES (?, ?, ?)",
        lambda b: (b.crew_code, b.user_id, b.name),
    ),
    PUT_TOKEN: (
        "INSERT OR REPLACE INTO pending_tokens (device_id, tokens, expires_at) VALUES (?, ?, ?)",
        lambda t: (t.device_id, encode_tokens(t.tokens), t.expires_at),
    ),
    DELETE_TOKEN: ("DELETE FROM pending_tokens WHERE device_id = ?", lambda device_id: (device_id,)),
    PUT_GRANT: ("INSERT OR REPLACE INTO spotify_grants (device_id, sealed) VALUES (?, ?)",
                lambda g: (g.device_id, g.sealed)),
    DELETE_GRANT: ("DELETE FROM spotify_grants WHERE device_id = ?", lambda device_id: (device_id,)),
    PUT_DEVICE: (
        "INSERT OR REPLACE INTO devices (device_id, key_hash, bound, created_at, last_seen) "
        "VALUES (?, ?, ?, ?, ?)",
        lambda d: (d.device_id, d.key_hash, int(d.bound), d.created_at, d.last_seen),
    ),
    DELETE_DEVICE: ("DELETE FROM devices WHERE device_id = ?", lambda device_id: (device_id,)),
    PUT_ALIAS: ("INSERT OR REPLACE INTO crew_aliases (code, crew_code) VALUES (?, ?)", tuple),
}


# Rows per multi-row INSERT: at most nine columns, so 9,000 parameters, well
# under SQLite's limit.
_ROWS_PER_INSERT = 1000


def _split_insert(sql: str) -> tuple[str, str, str]:
    """
    A one-row C{INSERT ... VALUES (?, ...) [ON CONFLICT ...]} cut where a
    multi-row one repeats its row: what comes before the row, the row, and
    what comes after it.
    """
    start = sql.index("VALUES (") + len("VALUES ")
    end = sql.index(")", start) + 1
    return sql[:start], sql[start:end], sql[end:]


def _insert_many(steps: list, sql: str, rows: list[tuple]) -> None:
    """
    Add to C{steps} the insertion of C{rows} with C{sql} (one row's INSERT)
    as one multi-row INSERT per thousand rows: one statement a batch, not
    one a row (a log entry, or in a reconnect storm a member and a device
    per device), is less of the writer's work (and was a tenth of the
    relay's CPU in a storm while the database ran on a thread of the
    relay's, queueing for the GIL at every statement).  The rows go in the
    order given, so a row put twice ends as the second one says, as one
    row at a time would.
    """
    head, row, tail = _INSERTS[sql]
    for start in range(0, len(rows), _ROWS_PER_INSERT):
        chunk = rows[start:start + _ROWS_PER_INSERT]
        steps.append((EXECUTE, head + ", ".join([row] * len(chunk)) + tail, [value for r in chunk for value in r]))


# Every INSERT among the statements, cut for L{_insert_many}.
_INSERTS = {sql: _split_insert(sql) for sql, _ in _STATEMENTS.values() if sql.startswith("INSERT")}


# Without a crew deletion in a batch, its operations may run grouped by kind
# (each kind's in put order): crews before what refers to them, the puts and
# deletes of one kind of row (tokens, members, multi-crew devices) sharing a
# rank, so that a retried delete still comes before a later put.  A
# reconnect storm's batch is then a few statements, not three per device.
_RANK = {PUT_CREW: 0, PUT_DEVICE: 1, PUT_MEMBER: 2, DELETE_MEMBER: 2, PUT_BOT_USER: 3, APPEND: 4,
         PUT_TOKEN: 5, DELETE_TOKEN: 5, PUT_MULTI_CREW: 6, DELETE_MULTI_CREW: 6, PUT_GRANT: 7, DELETE_GRANT: 7}


def _steps(ops: list) -> list:
    """
    What applying C{ops} takes, as the writer's steps
    (L{leeloo.sqlitechild.execute_steps}): each run of operations of one
    kind as one statement where it can (a batch of appends is one INSERT).
    """
    if all(kind in _RANK for kind, _ in ops):
        ops = sorted(ops, key=lambda op: _RANK[op[0]])
    steps: list = []
    for kind, run in groupby(ops, key=itemgetter(0)):
        if kind == RENAME_CREW:
            steps.extend((RENAME, old, new) for _, (old, new) in run)
            continue
        statement = _STATEMENTS.get(kind)
        if statement is None:
            raise ValueError(f"unknown store operation {kind!r}")
        sql, row = statement
        rows = [row(arg) for _, arg in run]
        if len(rows) > 1 and sql in _INSERTS:
            _insert_many(steps, sql, rows)
        elif len(rows) == 1:
            steps.append((EXECUTE, sql, rows[0]))
        else:
            steps.append((EXECUTE_MANY, sql, rows))
    return steps


_REPLAY = ("SELECT seq, payload FROM messages WHERE crew_code = ? AND seq > ? AND seq <= ? "
           "AND created_at >= ? AND sender != ? AND (ephemeral = 0 OR created_at >= ?) "
           "ORDER BY seq DESC LIMIT ?")


def _replayed(rows: list, after_seq: int, limit: int) -> Replay:
    rows = [(seq, bytes(payload)) for seq, payload in rows]
    rows.reverse()
    return _replay_window(rows, after_seq, limit)


_PRUNE = ("DELETE FROM messages WHERE created_at < ? AND seq < "
          "(SELECT MAX(seq) FROM messages AS newest WHERE newest.crew_code = messages.crew_code)")
_PUT_PAIRING = f"INSERT OR REPLACE INTO pairings ({_PAIRING_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"


def _pairing_row(r: PairingRecord) -> tuple:
    return (r.user_code, r.device_id, r.device_name, r.crew_code, r.scopes, r.created_at, r.expires_at,
            r.state_hash, r.cookie_hash, r.verifier, 2 if r.keep else 1 if r.keep_offered else 0)


@implementer(IPairings)
class SQLitePairings:
    """
    The pairing flows of a L{SQLiteStore}, in its C{pairings} table, written
    by the store's database writer.
    """

    def __init__(self, store: "SQLiteStore") -> None:
        self._store = store

    def put(self, record: PairingRecord) -> Deferred:
        return self._store._execute(_PUT_PAIRING, _pairing_row(record)).addCallback(lambda _: None)

    def delete(self, user_code: str) -> Deferred:
        return self._store._execute("DELETE FROM pairings WHERE user_code = ?", (user_code,)).addCallback(
            lambda _: None)

    def delete_expired(self, now: float) -> Deferred:
        return self._store._execute("DELETE FROM pairings WHERE expires_at <= ?", (now,))


@implementer(IStore)
class SQLiteStore:
    """
    State in C{directory}/leeloo.sqlite3.

    @param fsync: make every commit survive a power cut (synchronous=FULL);
        by default commits survive a crash of the process (WAL with
        synchronous=NORMAL).
    @param sealer: a L{leeloo.sealing.Sealer}, with which migration 9 seals
        the pending tokens an earlier release kept in the clear (only then
        is it used: the rows are opaque to this store).
    @param busy_timeout: seconds a statement waits for another connection's
        lock before the operation fails with L{StoreError}.
    """

    # Each commit is a round trip to the database writer (a pipe written
    # and read on each side, and the writer's commit): at a thousand
    # messages a second, one each.  Gathered for 2 ms, a few share one, for
    # 2 ms more before the crew sees them.
    gather_writes = 0.002

    def __init__(self, directory: Path | str, reactor: Any, fsync: bool = False,
                 busy_timeout: float = BUSY_TIMEOUT, sealer: Any = None) -> None:
        self.path = Path(directory) / DATABASE_NAME
        self.fsync = fsync
        # The database writer answers on this reactor: the gathering window
        # is timed there, whatever clock the relay's own timers run on.
        self.gather_clock = reactor
        for suffix in ("", "-wal", "-shm"):
            _private_file(Path(f"{self.path}{suffix}"))
        # Held from before the state is read until this store's writer has
        # exited (the writer inherits it): this store is the database's one
        # writer, and mints its sequence numbers from what it read.
        self._lock = _lock(Path(f"{self.path}.lock"))
        try:
            db = _connect(self.path, fsync, busy_timeout)
            try:
                start = migrate(db, sealer=sealer)
                if start != SCHEMA_VERSION:
                    _log.info("database schema migrated from version {start} to {version}",
                              start=start, version=SCHEMA_VERSION)
                self._snapshot = _load(db)
            finally:
                db.close()
        except BaseException:
            os.close(self._lock)
            raise
        # This store is the database's one writer: it mints the sequences.
        self.sequences = Sequences(self._snapshot.last_seq)
        self._crew_codes = {c.code for c in self._snapshot.crews}
        # Old codes of renamed crews (find_crew follows them); may hold a
        # few the database no longer has (their crew deleted): asked, not
        # found.
        self._alias_codes = set(self._snapshot.aliases)
        self._device_ids = {d.device_id for d in self._snapshot.devices}
        self._token_ids = {t.device_id for t in self._snapshot.tokens}
        self._grant_ids = {g.device_id for g in self._snapshot.grants}
        self._closed = False
        self._written = False
        self._truncated = False
        self.pairings = SQLitePairings(self)
        # Every write and runtime read, on one connection in a process of
        # its own (leeloo.sqlitewriter), in the order asked.
        self._pool = WriterProcess(reactor, self.path, fsync, busy_timeout, self._lock)
        # WAL checkpoints (which copy the log into the database and fsync
        # it) run on a connection and thread of their own, every second, so
        # that no commit waits behind one: commits only append to the WAL.
        self._checkpoints = adbapi.ConnectionPool(
            "sqlite3", str(self.path), check_same_thread=False,
            cp_min=1, cp_max=1, cp_noisy=False, cp_reactor=reactor,
            cp_openfun=lambda db: _configure(db, fsync, busy_timeout),
        )
        self._checkpointing = LoopingCall(self._checkpoint)
        self._checkpointing.clock = reactor
        self._checkpointing.start(CHECKPOINT_INTERVAL, now=False).addErrback(
            lambda f: _log.failure("WAL checkpoints stopped", f))

    def _checkpoint(self) -> Deferred | None:
        # While writes come, a passive checkpoint (it never makes a commit
        # wait); once a whole interval passed without one, a TRUNCATE
        # checkpoint gives the WAL's disk space back.
        if self._written:
            self._written = False
            self._truncated = False
            mode = "PASSIVE"
        elif not self._truncated:
            self._truncated = True
            mode = "TRUNCATE"
        else:
            return None
        d = self._checkpoints.runQuery(f"PRAGMA wal_checkpoint({mode})")
        if mode == "TRUNCATE":
            d.addCallback(self._idle_checkpointed)
        else:
            d.addCallback(self._catch_up)
        return d.addErrback(lambda f: _log.warn("WAL checkpoint failed: {error}", error=f.getErrorMessage()))

    def _catch_up(self, rows: list) -> Deferred | None:
        # The WAL starts over from its beginning (and is cut back to
        # JOURNAL_SIZE_LIMIT) only when a commit finds every frame in it
        # copied, which a checkpoint on another connection never leaves
        # while commits keep coming: under a steady flood the WAL grew by
        # every byte written, each new page a fresh page of the kernel's
        # cache to zero.  Once it is past its limit, the frames appended
        # while that checkpoint ran (milliseconds' worth) are copied on the
        # writing connection, between two batches: the next commit starts
        # the WAL over.
        [(busy, frames, copied)] = rows
        if busy or frames < CATCH_UP_FRAMES or self._closed:
            return None
        return self._pool.runQuery("PRAGMA wal_checkpoint(PASSIVE)")

    def _idle_checkpointed(self, rows: list) -> None:
        [(busy, _, _)] = rows
        if busy:
            # Someone was reading or writing: try again next time.
            self._truncated = False
        else:
            _log.debug("store idle: WAL checkpointed and truncated")

    def load(self) -> Snapshot:
        snapshot, self._snapshot = self._snapshot, None
        if snapshot is None:
            raise RuntimeError("load() is read once, at start")
        return snapshot

    def _run(self, interaction: Any, *args: Any) -> Deferred:
        d = self._pool.runInteraction(interaction, *args)
        return d.addErrback(self._store_error)

    @staticmethod
    def _store_error(failure: Any) -> None:
        failure.trap(sqlite3.Error)
        # Locked, full or failing disks are operational errors, worth a retry;
        # a constraint or programming error will fail the same way again.
        transient = bool(failure.check(sqlite3.OperationalError))
        raise StoreError(f"SQLite: {failure.getErrorMessage()}", transient=transient)

    def write(self, ops: list) -> Deferred:
        self._written = True
        try:
            steps = _steps(ops)
        except Exception as e:
            return fail(e)
        d = self._run(execute_steps, steps).addCallback(lambda _: None)
        if any(kind in _INDEXED for kind, _ in ops):
            d.addCallback(self._index, ops)
        return d

    def _index(self, result: Any, ops: list) -> Any:
        """
        Keep the codes and ids the database holds, for find_crew and
        find_device, as a committed transaction changed them.
        """
        for kind, arg in ops:
            if kind == PUT_CREW:
                self._crew_codes.add(arg.code)
            elif kind == DELETE_CREW:
                self._crew_codes.discard(arg)
            elif kind == RENAME_CREW:
                self._crew_codes.discard(arg[0])
                self._crew_codes.add(arg[1])
                self._alias_codes.add(arg[0])
                self._alias_codes.discard(arg[1])
            elif kind == PUT_ALIAS:
                self._alias_codes.add(arg[0])
            elif kind == PUT_DEVICE:
                self._device_ids.add(arg.device_id)
            elif kind == DELETE_DEVICE:
                self._device_ids.discard(arg)
            elif kind == PUT_TOKEN:
                self._token_ids.add(arg.device_id)
            elif kind == DELETE_TOKEN:
                self._token_ids.discard(arg)
            elif kind == PUT_GRANT:
                self._grant_ids.add(arg.device_id)
            elif kind == DELETE_GRANT:
                self._grant_ids.discard(arg)
        return result

    def find_crew(self, code: str) -> Deferred | None:
        # This store is the database's one writer, and knows every code it
        # holds: an unknown one is answered at once, not by a query.
        if code not in self._crew_codes and code not in self._alias_codes:
            return None
        return self._run(crew_rows, code).addCallback(_crew_snapshot)

    def find_device(self, device_id: str) -> Deferred | None:
        if device_id not in self._device_ids:
            return None
        return self._query(_FIND_DEVICE, (device_id,)).addCallback(_device)

    def find_sent(self, crew_code: str, sender: str, client_msg_id: str) -> None:
        # The relay holds every client_msg_id this store's log holds: it
        # read them at start, and every entry since was written through it.
        return None

    def find_token(self, device_id: str) -> Deferred | None:
        if device_id not in self._token_ids:
            return None
        return self._query(_FIND_TOKEN, (device_id,)).addCallback(_token)

    def find_grant(self, device_id: str) -> Deferred | None:
        if device_id not in self._grant_ids:
            return None
        return self._query(_FIND_GRANT, (device_id,)).addCallback(_grant)

    def _query(self, sql: str, params: tuple) -> Deferred:
        return self._pool.runQuery(sql, params).addErrback(self._store_error)

    def _execute(self, sql: str, params: tuple) -> Deferred:
        """
        Run one statement in a transaction of its own; fires with the rows
        it changed.
        """
        self._written = True
        return self._run(execute_steps, [(EXECUTE, sql, params)])

    def replay(self, crew_code: str, after_seq: int, up_to_seq: int, since: float,
               exclude_sender: str, limit: int, ephemeral_since: float | None = None) -> Deferred:
        d = self._query(_REPLAY, (crew_code, after_seq, up_to_seq, since, exclude_sender,
                                  since if ephemeral_since is None else ephemeral_since, limit + 1))
        return d.addCallback(_replayed, after_seq, limit)

    def prune(self, log_before: float) -> Deferred:
        return self._execute(_PRUNE, (log_before,))

    def trim(self, crew_code: str, max_bytes: int, keep: int) -> Deferred:
        self._written = True
        return self._run(trim, crew_code, max_bytes, keep)

    def close(self) -> Deferred:
        """
        Stop checkpointing and let the writer answer what it was sent;
        fires once it has exited (and let go of the database's lock).
        """
        if not self._closed:
            self._closed = True
            if self._checkpointing.running:
                self._checkpointing.stop()
            self._checkpoints.close()
            os.close(self._lock)
        return self._pool.close()
