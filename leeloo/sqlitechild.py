"""
The SQLite store's database writer: the process of its own that holds the
store's one writing connection (L{leeloo.sqlitewriter} starts it and talks
to it).  It imports only the standard library: it starts in a few tens of
milliseconds and a dozen megabytes, and what it is sent is plain data
(statements, rows, codes), never the relay's records.

The wire is the child's standard input and output.  A request is
C{(mode, function, arguments)}, the function one of this module's (pickled by
name), pickled with large payloads out of band (pickle protocol 5, so the
relay writes them down the pipe as they are, never copied): a L{REQUEST}
head (the pickle's length, how many buffers), each buffer's length
(4-byte big-endian), the pickle, the buffers.  An answer is a 4-byte
big-endian length and a pickle.  The requests run one after the other, in the order sent, each in a
transaction of its own as L{twisted.enterprise.adbapi} would run it
(committed when it returns, rolled back when it raises), and each is answered
with C{(True, result)} or C{(False, exception)}.

It holds, from the relay, the lock on the database's lock file (an inherited
descriptor), and ignores the signals that stop the relay (systemd sends them
to every process of the unit, a terminal's Ctrl-C to the process group): it
commits what the relay flushes while it stops, and exits when its input
closes, which is also how it learns that the relay is gone.
"""

from __future__ import annotations

import io
import os
import pickle
import signal
import sqlite3
import struct
import sys
from typing import Any

HEAD = struct.Struct("!I")
REQUEST = struct.Struct("!II")

# What a request asks for.
INTERACTION = "i"   # function(cursor, *args), in a transaction
CONNECTION = "c"    # function(connection, *args), committed after
QUERY = "q"         # cursor.execute(*args), its rows

# What the WAL is cut back to each time a checkpoint lets it start over
# (a flood can grow it far past this); when the store is idle it is
# truncated to nothing.
JOURNAL_SIZE_LIMIT = 4 * 1024 * 1024
BUSY_TIMEOUT = 2.0

# A step of execute_steps: a statement with its parameters, a statement
# with many rows of them, or a crew renamed.
EXECUTE = "x"
EXECUTE_MANY = "m"
RENAME = "r"


def configure(db: sqlite3.Connection, fsync: bool, busy_timeout: float = BUSY_TIMEOUT,
              checkpoints: bool = True) -> None:
    db.execute("PRAGMA journal_mode = WAL")
    db.execute(f"PRAGMA journal_size_limit = {JOURNAL_SIZE_LIMIT}")
    if not checkpoints:
        db.execute("PRAGMA wal_autocheckpoint = 0")
    db.execute(f"PRAGMA synchronous = {'FULL' if fsync else 'NORMAL'}")
    db.execute("PRAGMA foreign_keys = ON")
    db.execute(f"PRAGMA busy_timeout = {int(busy_timeout * 1000)}")


def query(cursor: Any, sql: str, params: Any = ()) -> list:
    cursor.execute(sql, params)
    return cursor.fetchall()


def execute_steps(cursor: Any, steps: list) -> int:
    """
    Run C{steps} in order; the rows the last one changed.
    """
    for step in steps:
        kind = step[0]
        if kind == EXECUTE:
            cursor.execute(step[1], step[2])
        elif kind == EXECUTE_MANY:
            cursor.executemany(step[1], step[2])
        elif kind == RENAME:
            rename(cursor, step[1], step[2])
        else:
            raise ValueError(f"unknown step {kind!r}")
    return cursor.rowcount


def rename(cursor: Any, old: str, new: str) -> None:
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


CREW_COLUMNS = "code, created_at, created_by, name"
MEMBER_COLUMNS = "crew_code, device_id, display_name, last_seen, delivered_seq, acked_seq, online"
CLIENT_MESSAGE_COLUMNS = "crew_code, seq, id, sender, client_msg_id, digest, created_at"


def crew_rows(cursor: Any, code: str) -> tuple | None:
    """
    The rows of crew C{code} (following an alias, for the old code of a
    renamed crew): its row, the alias followed (or None), its members, bot
    users, its log's summary and its entries with a client message id; None
    if there is no such crew.
    """
    crews = query(cursor, f"SELECT {CREW_COLUMNS} FROM crews WHERE code = ?", (code,))
    alias = None
    if not crews:
        for (target,) in query(cursor, "SELECT crew_code FROM crew_aliases WHERE code = ?", (code,)):
            crews = query(cursor, f"SELECT {CREW_COLUMNS} FROM crews WHERE code = ?", (target,))
            alias, code = (code, target), target
        if not crews:
            return None
    return (
        crews,
        alias,
        query(cursor, f"SELECT {MEMBER_COLUMNS} FROM members WHERE crew_code = ?", (code,)),
        query(cursor, "SELECT crew_code, user_id, display_name FROM bot_users WHERE crew_code = ?", (code,)),
        query(cursor, "SELECT crew_code, MAX(seq), MAX(created_at), SUM(length(payload)) FROM messages "
                      "WHERE crew_code = ?", (code,)),
        query(cursor, f"SELECT {CLIENT_MESSAGE_COLUMNS} FROM messages "
                      "WHERE crew_code = ? AND client_msg_id IS NOT NULL", (code,)),
    )


def trim(cursor: Any, crew_code: str, max_bytes: int, keep: int) -> tuple[int, int]:
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


_traced: list[str] = []


def trace_statements(connection: sqlite3.Connection, on: bool) -> tuple[int, list[str]]:
    """
    For tests: record every statement this connection runs from now on
    (C{on}), or stop and give them back, with this process's id.
    """
    connection.set_trace_callback(_traced.append if on else None)
    traced = list(_traced)
    _traced.clear()
    return os.getpid(), traced


def _answer(out: int, reply: tuple) -> None:
    try:
        data = pickle.dumps(reply, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception as e:
        # A result or an exception the wire cannot carry is an error the
        # relay can read.
        what = "result" if reply[0] else "error"
        data = pickle.dumps((False, RuntimeError(f"the database writer cannot send its {what}: {e}")),
                            protocol=pickle.HIGHEST_PROTOCOL)
    view = memoryview(HEAD.pack(len(data)) + data)
    while view:
        view = view[os.write(out, view):]


def serve(argv: list[str]) -> None:
    """
    Open the database at C{argv[0]} (synchronous=FULL when C{argv[1]} is
    C{"1"}, C{argv[2]} seconds of busy timeout) and answer requests on
    standard input until it closes.
    """
    for number in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(number, signal.SIG_IGN)
    path, fsync, busy_timeout = argv[0], argv[1] == "1", float(argv[2])
    # As adbapi's thread connection was: a transaction opened before the
    # first write (the default isolation level), no statement cache (a
    # cached multi-row INSERT would keep its batch's payloads for good),
    # no automatic checkpoints (the relay runs them on a connection of
    # its own).
    db = sqlite3.connect(path, check_same_thread=False, cached_statements=0)
    configure(db, fsync, busy_timeout, checkpoints=False)
    requests = io.open(0, "rb", buffering=1 << 16, closefd=False)
    try:
        while True:
            head = requests.read(REQUEST.size)
            if len(head) < REQUEST.size:
                break
            size, count = REQUEST.unpack(head)
            sizes = struct.unpack(f"!{count}I", requests.read(4 * count)) if count else ()
            body = requests.read(size)
            buffers = [requests.read(n) for n in sizes]
            if len(body) < size or any(len(b) < n for b, n in zip(buffers, sizes)):
                # The relay went mid-request: none of it is applied.
                break
            try:
                mode, function, args = pickle.loads(body, buffers=buffers)
                if mode == QUERY:
                    function = query
                target = db if mode == CONNECTION else db.cursor()
                try:
                    result = function(target, *args)
                    db.commit()
                except BaseException:
                    db.rollback()
                    raise
            except Exception as e:
                _answer(1, (False, e))
            else:
                _answer(1, (True, result))
    finally:
        db.close()


if __name__ == "__main__":
    serve(sys.argv[1:])
