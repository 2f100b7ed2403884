"""
What leeloo-admin's heavy commands cost on a database of CREWS crews of
SIZE members with MESSAGES messages of 200 bytes each in its log, written
by the SQLite store: the seconds of ``backup``, ``export`` and the reading
and checking of that export (what ``import`` does before its one store
transaction), the seconds of that transaction, and the sizes, as one JSON
line.

    PYTHONPATH=. python benchmarks/admin_bench.py [CREWS [SIZE [MESSAGES]]]
"""

from __future__ import annotations

import io
import json
import os
import sys
import tempfile
import time
from argparse import Namespace

from twisted.internet import reactor, task

from leeloo.admin import cli
from leeloo.admin.state import parse_export
from leeloo.core.operator import _import_ops
from leeloo.sqlitestore import SQLiteStore
from leeloo.store import APPEND, PUT_CREW, PUT_DEVICE, PUT_MEMBER, CrewRecord, DeviceRecord, LogEntry, MemberRecord

T0 = 1_700_000_000.0


def fill(directory: str, crews: int, size: int, messages: int):
    store = SQLiteStore(directory, reactor)
    ops: list = []
    for c in range(crews):
        code = f"LEELOO-{c:04d}"
        ops.append((PUT_CREW, CrewRecord(code, T0, None)))
        for m in range(size):
            device = f"leeloo_{c:06d}{m:06d}"
            ops.append((PUT_DEVICE, DeviceRecord(device, "a" * 64, False, T0)))
            ops.append((PUT_MEMBER, MemberRecord(code, device, f"Dev {m}", T0)))
        for seq in range(1, messages + 1):
            payload = json.dumps({"type": "message", "payload": {"text": "x" * 160}, "seq": seq}).encode()
            ops.append((APPEND, LogEntry(code, seq, f"{c}-{seq}", f"leeloo_{c:06d}{0:06d}", None, None,
                                         T0 + seq, payload)))
    return store, ops


def main(reactor, crews=100, size=5, messages=500) -> object:
    source, target = tempfile.mkdtemp(), tempfile.mkdtemp()
    store, ops = fill(source, int(crews), int(size), int(messages))

    def measure(_):
        started = time.perf_counter()
        backup = os.path.join(tempfile.mkdtemp(), "backup.sqlite3")
        cli.cmd_backup(Namespace(data_dir=source, file=backup), io.StringIO())
        backup_s = time.perf_counter() - started
        started = time.perf_counter()
        out = io.StringIO()
        cli.cmd_export(Namespace(data_dir=source), out)
        export_s = time.perf_counter() - started
        started = time.perf_counter()
        state = parse_export(out.getvalue())
        parse_s = time.perf_counter() - started
        fresh = SQLiteStore(target, reactor)
        started = time.perf_counter()
        d = fresh.write(_import_ops(state))

        def written(_):
            result = {"crews": int(crews), "members": int(crews) * int(size), "messages": int(crews) * int(messages),
                      "database_bytes": os.path.getsize(backup), "export_bytes": len(out.getvalue()),
                      "backup_s": round(backup_s, 3), "export_s": round(export_s, 3),
                      "read_export_s": round(parse_s, 3), "import_write_s": round(time.perf_counter() - started, 3)}
            print(json.dumps(result))
            return fresh.close()

        return d.addCallback(written)

    return store.write(ops).addCallback(measure).addCallback(lambda _: store.close())


if __name__ == "__main__":
    task.react(main, sys.argv[1:])
