"""
The relay's side of the SQLite store's database writer: a process of its
own (L{leeloo.sqlitechild}) that holds the store's one writing connection.

A database thread in the relay's process shared the reactor's GIL: every
batch it committed was a wake-up on each side and the GIL handed back and
forth several times (SQLite lets go of it around every statement).  A
process of its own has its own interpreter: the reactor writes the batch
down a pipe, goes on, and reads the commit's answer when it comes; the
reactor still never waits on the disk.
"""

from __future__ import annotations

import fcntl
import os
import pickle
import sys
import struct
from collections import deque
from itertools import islice
from pathlib import Path
from typing import Any, Callable

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IWriteDescriptor
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from leeloo.sqlitechild import CONNECTION, HEAD, INTERACTION, QUERY, REQUEST
from leeloo.store import StoreError

_log = Logger()

# The child starts without site-packages (it needs only the standard
# library) and with the relay's own copy of this package first on its path,
# whatever the relay's working directory or PYTHONPATH.
_BOOT = "import sys; sys.path.insert(0, sys.argv[1]); from leeloo.sqlitechild import serve; serve(sys.argv[2:])"
_PACKAGE_ROOT = str(Path(__file__).resolve().parent.parent)


_F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)
_PIPE_BYTES = 1024 * 1024

# At most this many buffers a writev (Linux's IOV_MAX is 1,024).
_IOV = 512


@implementer(IWriteDescriptor)
class _Input:
    """
    The child's standard input, written as the relay's requests come: at
    once while the pipe has room (no reactor turn in between), the rest as
    it drains; every buffer written as it is, never joined into a copy (a
    flood's batch of large messages is megabytes).
    """

    def __init__(self, reactor: Any, fd: int) -> None:
        self._reactor = reactor
        self._fd = fd
        self._queue: deque[memoryview] = deque()
        self._writing = False
        self._closing = False

    def fileno(self) -> int:
        return self._fd

    def logPrefix(self) -> str:
        return "database writer input"

    def write(self, buffers: list) -> None:
        if self._fd < 0:
            return
        self._queue.extend(memoryview(b).cast("B") for b in buffers)
        if not self._writing:
            self.doWrite()

    def doWrite(self) -> None:
        queue = self._queue
        while queue:
            try:
                written = os.writev(self._fd, list(islice(queue, _IOV)))
            except BlockingIOError:
                break
            except OSError:
                # The child is gone: processEnded fails what waits.
                self._close()
                return None
            while written:
                first = queue[0]
                if len(first) <= written:
                    written -= len(first)
                    queue.popleft()
                else:
                    queue[0] = first[written:]
                    written = 0
        if queue and not self._writing:
            self._writing = True
            self._reactor.addWriter(self)
        elif not queue:
            if self._writing:
                self._writing = False
                self._reactor.removeWriter(self)
            if self._closing:
                self._close()
        return None

    def close(self) -> None:
        """
        Close once what was written has gone down the pipe.
        """
        self._closing = True
        if not self._queue:
            self._close()

    def _close(self) -> None:
        self._queue.clear()
        if self._writing:
            self._writing = False
            self._reactor.removeWriter(self)
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def connectionLost(self, reason: Any) -> None:
        self._close()


class WriterProcess(ProcessProtocol):
    """
    The relay's side of the database writer: requests go down the child's
    input, and their Deferreds fire, in order, as its answers come.  A child
    that exits while requests wait fails them (L{StoreError}, transient: the
    journal retries its batch) and is started again at the next request.

    The child starts at the first request, not before: on the reactor the
    relay runs (twistd makes the store before it daemonises), and never
    for a relay built and not run.

    @param lock: a descriptor holding the database's lock, inherited by
        every child this starts.
    """

    def __init__(self, reactor: Any, path: Path | str, fsync: bool, busy_timeout: float, lock: int) -> None:
        self._reactor = reactor
        self._argv = [sys.executable, "-S", "-c", _BOOT, _PACKAGE_ROOT, str(path), "1" if fsync else "0",
                      repr(float(busy_timeout))]
        self._lock = lock
        self._pending: deque[Deferred] = deque()
        self._buffer = bytearray()
        self._process: Any = None
        # Requests sent before the child started (it starts once the
        # reactor runs, as adbapi's threads do).
        self._outbox: list | None = None
        self._input: _Input | None = None
        self._closing = False
        self._closed: list[Deferred] = []
        self.pid: int | None = None

    def _start(self) -> None:
        outbox, self._outbox = self._outbox, None
        self._buffer.clear()
        try:
            child, ours = os.pipe2(os.O_CLOEXEC)
            try:
                self._process = self._reactor.spawnProcess(
                    self, sys.executable, self._argv, env=os.environ,
                    childFDs={0: child, 1: "r", 2: "r", 3: self._lock})
            except BaseException:
                os.close(ours)
                raise
            finally:
                os.close(child)
        except Exception as e:
            _log.error("cannot start the database writer: {error}", error=str(e))
            pending, self._pending = self._pending, deque()
            for d in pending:
                d.errback(Failure(StoreError(f"cannot start the database writer: {e}", transient=True)))
            closed, self._closed = self._closed, []
            for d in closed:
                d.callback(None)
            return
        self.pid = self._process.pid
        os.set_blocking(ours, False)
        try:
            # A batch in a few writes, not one per 64 KiB (Linux's default);
            # the most an unprivileged process may ask for, by default.
            fcntl.fcntl(ours, _F_SETPIPE_SZ, _PIPE_BYTES)
        except OSError:
            pass
        self._input = _Input(self._reactor, ours)
        if outbox:
            self._input.write(outbox)
        if self._closing:
            self._input.close()

    def _send(self, mode: str, function: Any, args: tuple) -> Deferred:
        if self._closing:
            return fail(StoreError("the store is closed"))
        buffers: list = []
        try:
            data = pickle.dumps((mode, function, args), protocol=5, buffer_callback=buffers.append)
        except Exception as e:
            return fail(StoreError(f"cannot send this to the database writer: {e}"))
        sizes = [b.raw().nbytes for b in buffers]
        request = [REQUEST.pack(len(data), len(sizes)), struct.pack(f"!{len(sizes)}I", *sizes), data,
                   *(b.raw() for b in buffers)]
        d = Deferred()
        self._pending.append(d)
        if self._input is not None:
            self._input.write(request)
        elif self._outbox is not None:
            self._outbox += request
        else:
            self._outbox = request
            self._reactor.callWhenRunning(self._start)
        return d

    # The parts of adbapi.ConnectionPool's interface the store uses.

    def runInteraction(self, interaction: Callable, *args: Any) -> Deferred:
        return self._send(INTERACTION, interaction, args)

    def runWithConnection(self, function: Callable, *args: Any) -> Deferred:
        return self._send(CONNECTION, function, args)

    def runQuery(self, *args: Any) -> Deferred:
        return self._send(QUERY, None, args)

    def close(self) -> Deferred:
        """
        Let the child answer what was sent, then exit; fires once it has.
        """
        self._closing = True
        if self._process is None and self._outbox is None:
            # Never asked anything, or exited: nothing to wait for.
            return succeed(None)
        d = Deferred()
        self._closed.append(d)
        if len(self._closed) == 1 and self._input is not None:
            # (One still to start is closed as it starts.)
            self._input.close()
        return d

    # ProcessProtocol

    def childDataReceived(self, fd: int, data: bytes) -> None:
        if fd != 1:
            for line in data.decode("utf-8", "replace").splitlines():
                _log.warn("database writer: {line}", line=line)
            return
        buffer = self._buffer
        buffer += data
        start, end = 0, len(buffer)
        while end - start >= HEAD.size:
            (size,) = HEAD.unpack_from(buffer, start)
            if end - start - HEAD.size < size:
                break
            body = bytes(buffer[start + HEAD.size:start + HEAD.size + size])
            start += HEAD.size + size
            ok, value = pickle.loads(body)
            d = self._pending.popleft()
            if ok:
                d.callback(value)
            else:
                d.errback(Failure(value))
        del buffer[:start]

    def processEnded(self, reason: Failure) -> None:
        self._process = None
        if self._input is not None:
            self._input.connectionLost(reason)
            self._input = None
        pending, self._pending = self._pending, deque()
        if pending or not self._closing:
            _log.error("the database writer (pid {pid}) exited: {reason}; {count} requests failed, "
                       "another starts at the next one", pid=self.pid, reason=reason.getErrorMessage(),
                       count=len(pending))
        for d in pending:
            d.errback(Failure(StoreError("the database writer exited before it answered", transient=True)))
        closed, self._closed = self._closed, []
        for d in closed:
            d.callback(None)
