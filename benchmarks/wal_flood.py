"""
A steady flood of writes through the SQLite store: how large its WAL grows
and what the process spends a message.

    PYTHONPATH=. python benchmarks/wal_flood.py [BATCHES_PER_S [SECONDS]]

Defaults: 370 batches a second (about what the relay's writer commits
under load), 10 messages each (3,700 messages/s), for 8 seconds; the WAL's
size every half second is printed at the end.
"""
import os
import resource
import shutil
import sys
import tempfile
import time

from twisted.internet import reactor, task
from twisted.internet.defer import inlineCallbacks, gatherResults
from leeloo.sealing import Sealer
from leeloo.sqlitestore import SQLiteStore
from leeloo.store import APPEND, PUT_CREW, CrewRecord, LogEntry

RATE = int(sys.argv[1]) if len(sys.argv) > 1 else 370   # batches/s
PER = 10
SECONDS = float(sys.argv[2]) if len(sys.argv) > 2 else 8
d = tempfile.mkdtemp(prefix="leeloo-wal-flood-")
store = SQLiteStore(d, reactor, sealer=Sealer())
wal = os.path.join(d, "leeloo.sqlite3-wal")
seq = [0]
sizes = []
pending = []
payload = b'{"type":"song_push","data":{"track":"' + b"x" * 180 + b'"}}'


def batch():
    ops = []
    for _ in range(PER):
        seq[0] += 1
        s = seq[0]
        ops.append((APPEND, LogEntry("LEELOO-ALFA", s, f"m{s}", "leeloo_a", None, None, time.time(), payload)))
    pending.append(store.write(ops))


def sample():
    try:
        sizes.append(os.path.getsize(wal))
    except OSError:
        sizes.append(0)


@inlineCallbacks
def main():
    yield store.write([(PUT_CREW, CrewRecord("LEELOO-ALFA", time.time(), "leeloo_a"))])
    r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.time()
    writing, sampling = task.LoopingCall(batch), task.LoopingCall(sample)
    writing.start(1.0 / RATE)
    sampling.start(0.5)
    yield task.deferLater(reactor, SECONDS, lambda: None)
    writing.stop()
    sampling.stop()
    yield gatherResults(pending)
    r1, t1 = resource.getrusage(resource.RUSAGE_SELF), time.time()
    cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
    sysc = r1.ru_stime - r0.ru_stime
    print(f"messages {seq[0]} in {t1-t0:.1f}s; cpu {cpu:.2f}s (sys {sysc:.2f}); cpu/msg {cpu/seq[0]*1e6:.1f} us; "
          f"wal max {max(sizes)/2**20:.1f} MiB, last {sizes[-1]/2**20:.1f} MiB; sizes {[round(s/2**20,1) for s in sizes]}")
    yield store.close()
    shutil.rmtree(d)
    reactor.stop()


reactor.callWhenRunning(main)
reactor.run()
