"""
The SQLite store: WAL mode, a versioned schema with migrations, and every
runtime read and write on one database thread (L{twisted.enterprise.adbapi}
with a single connection), so the reactor never waits on the disk.

The schema is read and migrated, and the state loaded, synchronously at
start-up, before the relay serves anyone.
"""

from __future__ import annotations

import json
import os
import sqlite3
from itertools import groupby
from operator import itemgetter
from pathlib import Path
from typing import Any, Callable, Iterator

from twisted.enterprise import adbapi
from twisted.internet.task import LoopingCall
from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger
from zope.interface import implementer

from leeloo.process import sd_notify
from leeloo.sealing import is_sealed

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
# What the WAL is cut back to each time a checkpoint lets it start over
# (a flood can grow it far past this); when the store is idle it is
# truncated to nothing.
JOURNAL_SIZE_LIMIT = 4 * 1024 * 1024
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


BUSY_TIMEOUT = 2.0


def _configure(db: sqlite3.Connection, fsync: bool, busy_timeout: float = BUSY_TIMEOUT,
               checkpoints: bool = True) -> None:
    db.execute("PRAGMA journal_mode = WAL")
    db.execute(f"PRAGMA journal_size_limit = {JOURNAL_SIZE_LIMIT}")
    if not checkpoints:
        db.execute("PRAGMA wal_autocheckpoint = 0")
    db.execute(f"PRAGMA synchronous = {'FULL' if fsync else 'NORMAL'}")
    db.execute("PRAGMA foreign_keys = ON")
    db.execute(f"PRAGMA busy_timeout = {int(busy_timeout * 1000)}")


def _connect(path: Path, fsync: bool, busy_timeout: float = BUSY_TIMEOUT) -> sqlite3.Connection:
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    _configure(db, fsync, busy_timeout)
    return db


_INDEXED = frozenset({PUT_CREW, DELETE_CREW, PUT_DEVICE, DELETE_DEVICE, PUT_TOKEN, DELETE_TOKEN, RENAME_CREW,
                      PUT_GRANT, DELETE_GRANT})


def _find_crew(db: Any, code: str) -> Snapshot | None:
    """
    Crew C{code} alone, as L{_load} reads every crew; for the old code of
    a renamed crew, that crew and the alias; None if there is none.
    """
    crews = [CrewRecord(*row) for row in db.execute(
        "SELECT code, created_at, created_by, name FROM crews WHERE code = ?", (code,))]
    aliases = {}
    if not crews:
        for (target,) in db.execute("SELECT crew_code FROM crew_aliases WHERE code = ?", (code,)):
            crews = [CrewRecord(*row) for row in db.execute(
                "SELECT code, created_at, created_by, name FROM crews WHERE code = ?", (target,))]
            aliases = {code: target}
            code = target
        if not crews:
            return None
    snapshot = Snapshot(crews=crews, aliases=aliases)
    snapshot.members = [
        MemberRecord(c, device, name, seen, delivered, acked, bool(online))
        for c, device, name, seen, delivered, acked, online in db.execute(
            "SELECT crew_code, device_id, display_name, last_seen, delivered_seq, acked_seq, online "
            "FROM members WHERE crew_code = ?", (code,))
    ]
    snapshot.bot_users = [BotUserRecord(*row) for row in db.execute(
        "SELECT crew_code, user_id, display_name FROM bot_users WHERE crew_code = ?", (code,))]
    for c, seq, created, size in db.execute(
        "SELECT crew_code, MAX(seq), MAX(created_at), SUM(length(payload)) FROM messages WHERE crew_code = ?",
        (code,),
    ):
        if seq is not None:
            snapshot.last_seq[c] = seq
            snapshot.last_message_at[c] = created
            snapshot.log_bytes[c] = size
    snapshot.client_messages = [
        LogEntry(c, seq, id, sender, client_msg_id, digest, created, b"")
        for c, seq, id, sender, client_msg_id, digest, created in db.execute(
            "SELECT crew_code, seq, id, sender, client_msg_id, digest, created_at "
            "FROM messages WHERE crew_code = ? AND client_msg_id IS NOT NULL", (code,))
    ]
    return snapshot


def _find_device(db: Any, device_id: str) -> DeviceRecord | None:
    for device, key_hash, bound, created, seen in db.execute(
        "SELECT device_id, key_hash, bound, created_at, last_seen FROM devices WHERE device_id = ?", (device_id,)
    ):
        return DeviceRecord(device, key_hash, bool(bound), created, seen)
    return None


def _find_token(db: Any, device_id: str) -> TokenRecord | None:
    for device, tokens, expires in db.execute(
        "SELECT device_id, tokens, expires_at FROM pending_tokens WHERE device_id = ?", (device_id,)
    ):
        return TokenRecord(device, json.loads(tokens), expires)
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


def _find_grant(db: Any, device_id: str) -> GrantRecord | None:
    for device, sealed in db.execute("SELECT device_id, sealed FROM spotify_grants WHERE device_id = ?",
                                     (device_id,)):
        return GrantRecord(device, sealed)
    return None


def _load(db: sqlite3.Connection) -> Snapshot:
    snapshot = Snapshot()
    snapshot.crews = [CrewRecord(*row) for row in db.execute(
        "SELECT code, created_at, created_by, name FROM crews")]
    snapshot.members = [
        MemberRecord(code, device, name, seen, delivered, acked, bool(online))
        for code, device, name, seen, delivered, acked, online in db.execute(
            "SELECT crew_code, device_id, display_name, last_seen, delivered_seq, acked_seq, online "
            "FROM members")
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
            "SELECT crew_code, seq, id, sender, client_msg_id, digest, created_at "
            "FROM messages WHERE client_msg_id IS NOT NULL")
    ]
    return snapshot


# Each write operation: its statement and its row.
_STATEMENTS: dict[str, tuple[str, Callable[[Any], tuple]]] = {
    APPEND: (
        "INSERT INTO messages (crew_code, seq, id, sender, client_msg_id, digest, created_at, payload, "
        "ephemeral) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        lambda e: (e.crew_code, e.seq, e.id, e.sender, e.client_msg_id, e.digest, e.created_at, e.payload,
                   int(e.ephemeral)),
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


def _rename(cursor: Any, old: str, new: str) -> None:
    """
    Move crew C{old} to C{new} with its members, bot users and log; C{old}
    becomes an alias of C{new} (and C{new} is no longer one).
    """
    cursor.execute("INSERT INTO crews (code, created_at, created_by, name) "
                   "SELECT ?, created_at, created_by, name FROM crews WHERE code = ?", (new, old))
    if cursor.rowcount != 1:
        raise sqlite3.IntegrityError(f"no crew {old}")
    for table in ("members", "bot_users", "messages", "crew_aliases"):
        cursor.execute(f"UPDATE {table} SET crew_code = ? WHERE crew_code = ?", (new, old))
    cursor.execute("DELETE FROM crew_aliases WHERE code = ?", (new,))
    cursor.execute("INSERT OR REPLACE INTO crew_aliases (code, crew_code) VALUES (?, ?)", (old, new))
    cursor.execute("DELETE FROM crews WHERE code = ?", (old,))


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


def _insert_many(cursor: Any, sql: str, rows: list[tuple]) -> None:
    """
    Insert C{rows} with C{sql} (one row's INSERT) as one multi-row INSERT
    per thousand rows.  SQLite lets go of the GIL around each statement it
    steps, and this thread then queues for it behind the reactor: one
    statement a batch, not one a row (a log entry, or in a reconnect storm
    a member and a device per device), is a tenth less of the relay's CPU
    in a storm (the rows go in the order given, so a row put twice ends as
    the second one says, as one row at a time would).
    """
    head, row, tail = _INSERTS[sql]
    for start in range(0, len(rows), _ROWS_PER_INSERT):
        chunk = rows[start:start + _ROWS_PER_INSERT]
        cursor.execute(head + ", ".join([row] * len(chunk)) + tail, [value for r in chunk for value in r])


# Every INSERT among the statements, cut for L{_insert_many}.
_INSERTS = {sql: _split_insert(sql) for sql, _ in _STATEMENTS.values() if sql.startswith("INSERT")}


# Without a crew deletion in a batch, its operations may run grouped by kind
# (each kind's in put order): crews before what refers to them, the puts and
# deletes of one kind of row (tokens, members, multi-crew devices) sharing a
# rank, so that a retried delete still comes before a later put.  A
# reconnect storm's batch is then a few statements, not three per device.
_RANK = {PUT_CREW: 0, PUT_DEVICE: 1, PUT_MEMBER: 2, DELETE_MEMBER: 2, PUT_BOT_USER: 3, APPEND: 4,
         PUT_TOKEN: 5, DELETE_TOKEN: 5, PUT_MULTI_CREW: 6, DELETE_MULTI_CREW: 6, PUT_GRANT: 7, DELETE_GRANT: 7}


def _write(cursor: Any, ops: list) -> None:
    """
    Apply C{ops}, each run of operations of one kind as one statement where
    it can (a batch of appends is one INSERT).
    """
    if all(kind in _RANK for kind, _ in ops):
        ops = sorted(ops, key=lambda op: _RANK[op[0]])
    for kind, run in groupby(ops, key=itemgetter(0)):
        if kind == RENAME_CREW:
            for _, (old, new) in run:
                _rename(cursor, old, new)
            continue
        statement = _STATEMENTS.get(kind)
        if statement is None:
            raise ValueError(f"unknown store operation {kind!r}")
        sql, row = statement
        rows = [row(arg) for _, arg in run]
        if len(rows) > 1 and sql in _INSERTS:
            _insert_many(cursor, sql, rows)
        else:
            cursor.executemany(sql, rows)


def _replay(cursor: Any, crew_code: str, after_seq: int, up_to_seq: int, since: float,
            exclude_sender: str, limit: int, ephemeral_since: float | None = None) -> Any:
    cursor.execute(
        "SELECT seq, payload FROM messages WHERE crew_code = ? AND seq > ? AND seq <= ? "
        "AND created_at >= ? AND sender != ? AND (ephemeral = 0 OR created_at >= ?) "
        "ORDER BY seq DESC LIMIT ?",
        (crew_code, after_seq, up_to_seq, since, exclude_sender,
         since if ephemeral_since is None else ephemeral_since, limit + 1),
    )
    rows = [(seq, bytes(payload)) for seq, payload in cursor.fetchall()]
    rows.reverse()
    return _replay_window(rows, after_seq, limit)


def _prune(cursor: Any, log_before: float) -> int:
    cursor.execute(
        "DELETE FROM messages WHERE created_at < ? AND seq < "
        "(SELECT MAX(seq) FROM messages AS newest WHERE newest.crew_code = messages.crew_code)",
        (log_before,),
    )
    return cursor.rowcount


def _trim(cursor: Any, crew_code: str, max_bytes: int, keep: int) -> tuple[int, int]:
    # Newest first, with the running total of the payloads: the first row
    # (past the kept ones) that takes the total over the bound, and every
    # older one, go.
    cursor.execute(
        "SELECT seq, total FROM (SELECT seq, SUM(length(payload)) OVER w AS total, "
        "ROW_NUMBER() OVER w AS n FROM messages WHERE crew_code = ? WINDOW w AS (ORDER BY seq DESC)) "
        "WHERE total > ? AND n > ? ORDER BY seq DESC LIMIT 1",
        (crew_code, max_bytes, max(1, keep)),
    )
    row = cursor.fetchone()
    if row is not None:
        cursor.execute("DELETE FROM messages WHERE crew_code = ? AND seq <= ?", (crew_code, row[0]))
    cursor.execute("SELECT MIN(seq), SUM(length(payload)) FROM messages WHERE crew_code = ?", (crew_code,))
    first, left = cursor.fetchone()
    return first or 0, left or 0


def _put_pairing(cursor: Any, r: PairingRecord) -> None:
    cursor.execute(
        f"INSERT OR REPLACE INTO pairings ({_PAIRING_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (r.user_code, r.device_id, r.device_name, r.crew_code, r.scopes, r.created_at, r.expires_at,
         r.state_hash, r.cookie_hash, r.verifier, 2 if r.keep else 1 if r.keep_offered else 0))


def _delete_pairing(cursor: Any, user_code: str) -> None:
    cursor.execute("DELETE FROM pairings WHERE user_code = ?", (user_code,))


def _delete_expired_pairings(cursor: Any, now: float) -> int:
    cursor.execute("DELETE FROM pairings WHERE expires_at <= ?", (now,))
    return cursor.rowcount


@implementer(IPairings)
class SQLitePairings:
    """
    The pairing flows of a L{SQLiteStore}, in its C{pairings} table, written
    on the store's database thread.
    """

    def __init__(self, store: "SQLiteStore") -> None:
        self._store = store

    def put(self, record: PairingRecord) -> Deferred:
        return self._store._write_with(_put_pairing, record)

    def delete(self, user_code: str) -> Deferred:
        return self._store._write_with(_delete_pairing, user_code)

    def delete_expired(self, now: float) -> Deferred:
        return self._store._write_with(_delete_expired_pairings, now)


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

    # Each commit is a round trip to the database thread (a wake-up on each
    # side and the GIL handed back and forth, about 100 us of CPU here):
    # at a thousand messages a second, one each.  Gathered for 2 ms, a few
    # share one, for 2 ms more before the crew sees them.
    gather_writes = 0.002

    def __init__(self, directory: Path | str, reactor: Any, fsync: bool = False,
                 busy_timeout: float = BUSY_TIMEOUT, sealer: Any = None) -> None:
        self.path = Path(directory) / DATABASE_NAME
        self.fsync = fsync
        # The database thread answers on this reactor: the gathering window
        # is timed there, whatever clock the relay's own timers run on.
        self.gather_clock = reactor
        for suffix in ("", "-wal", "-shm"):
            _private_file(Path(f"{self.path}{suffix}"))
        db = _connect(self.path, fsync, busy_timeout)
        try:
            start = migrate(db, sealer=sealer)
            if start != SCHEMA_VERSION:
                _log.info("database schema migrated from version {start} to {version}",
                          start=start, version=SCHEMA_VERSION)
            self._snapshot = _load(db)
        finally:
            db.close()
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
        self._pool = adbapi.ConnectionPool(
            # The default isolation level opens a transaction before the first
            # write of an interaction; adbapi commits it: one commit a batch.
            "sqlite3", str(self.path), check_same_thread=False,
            # A cached statement keeps a copy of what was last bound to it
            # until it runs again: a batch's multi-row INSERT (one statement
            # per row count) would keep that batch's payloads, megabytes a
            # statement, for good.  Compiling each batch's few statements
            # afresh costs microseconds.
            cached_statements=0,
            cp_min=1, cp_max=1, cp_noisy=False, cp_reactor=reactor,
            cp_openfun=lambda db: _configure(db, fsync, busy_timeout, checkpoints=False),
        )
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
        d = self._run(_write, ops)
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
        return self._run(_find_crew, code)

    def find_device(self, device_id: str) -> Deferred | None:
        if device_id not in self._device_ids:
            return None
        return self._run(_find_device, device_id)

    def find_sent(self, crew_code: str, sender: str, client_msg_id: str) -> None:
        # The relay holds every client_msg_id this store's log holds: it
        # read them at start, and every entry since was written through it.
        return None

    def find_token(self, device_id: str) -> Deferred | None:
        if device_id not in self._token_ids:
            return None
        return self._run(_find_token, device_id)

    def find_grant(self, device_id: str) -> Deferred | None:
        if device_id not in self._grant_ids:
            return None
        return self._run(_find_grant, device_id)

    def _write_with(self, interaction: Any, *args: Any) -> Deferred:
        self._written = True
        return self._run(interaction, *args)

    def replay(self, crew_code: str, after_seq: int, up_to_seq: int, since: float,
               exclude_sender: str, limit: int, ephemeral_since: float | None = None) -> Deferred:
        return self._run(_replay, crew_code, after_seq, up_to_seq, since, exclude_sender, limit,
                         ephemeral_since)

    def prune(self, log_before: float) -> Deferred:
        self._written = True
        return self._run(_prune, log_before)

    def trim(self, crew_code: str, max_bytes: int, keep: int) -> Deferred:
        self._written = True
        return self._run(_trim, crew_code, max_bytes, keep)

    def close(self) -> Deferred:
        if not self._closed:
            self._closed = True
            if self._checkpointing.running:
                self._checkpointing.stop()
            self._checkpoints.close()
            self._pool.close()
        return succeed(None)
