"""
The relay as a process: tuning CPython and the C library for it, its
open-file limit, telling systemd how it is doing (C{sd_notify}: C{READY},
C{STOPPING}, C{WATCHDOG}), and exiting with a status systemd's
C{Restart=on-failure} sees.
"""

from __future__ import annotations

import ctypes
import gc
import os
import resource
import socket
import sys
from typing import Any, Callable, Mapping

from twisted.application.service import Service
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

log = Logger()


# How long a thread that wants the GIL waits for the reactor thread to let
# go of it.  Python's default is 5 ms; a thread that takes the GIL a few
# times for each piece of work (the WAL checkpoints' thread; the database
# thread did, for every batch, before the store's writer was a process of
# its own) waits up to that each time behind a busy reactor.
GIL_SWITCH_INTERVAL = 0.0005


# The cyclic garbage collector's first threshold.  Python's 700 runs a young
# collection every few hundred allocations, so the objects of messages
# waiting a few milliseconds for their commit get promoted, and the old
# generation fills with them: then full collections, which walk every
# connection's objects (over 100 ms with 10,000 devices), come every few
# seconds and show as latency spikes.  Objects that live milliseconds should
# die young.  The second threshold keeps the middle generation small: it
# holds what survived the young collections since its last one, at most
# about that many times the first threshold, and a connection's objects
# pass through it once.  At 20, a collection of it walked 200,000 objects
# after 10,000 devices connected (80 ms, every delivery of the moment late);
# at 2 it walks at most 40,000, as often as needed to pass them all on.
GC_THRESHOLDS = (10_000, 2, 20)


# glibc's malloc serves blocks under its mmap threshold from the heap, and
# raises that threshold each time a larger block is freed: after a flood of
# 64 KiB messages every message buffer lives in the heap, and what the flood
# left there stays resident long after.  A fixed threshold (glibc's own
# starting value) and trim threshold give the memory back once freed.
MALLOC_THRESHOLD = 128 * 1024
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def tune_malloc(threshold: int = MALLOC_THRESHOLD) -> bool:
    """
    Fix glibc's mmap and trim thresholds at C{threshold}; return whether
    the C library took them (other C libraries have no C{mallopt}).
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    return all(mallopt(option, threshold) == 1 for option in (_M_MMAP_THRESHOLD, _M_TRIM_THRESHOLD))


def tune_process(reactor: Any) -> None:
    """
    Tune CPython and the C library for the relay: the GIL switch interval,
    malloc's thresholds, the collector's thresholds, and a collector freeze
    once C{reactor} runs (pinned by ProcessTuningTests).
    """
    sys.setswitchinterval(GIL_SWITCH_INTERVAL)
    tune_malloc()
    gc.set_threshold(*GC_THRESHOLDS)
    # What exists once the relay has started (modules, the service tree,
    # the state it loaded) lives as long as the process: keep it out of
    # every later full collection.
    reactor.callWhenRunning(gc.freeze)


# Descriptors the relay needs besides one per WebSocket: listening sockets,
# the database and its WAL, the log, the reactor's own, HTTP connections
# not upgraded (yet), the ACME client's.
FILES_BESIDES_CONNECTIONS = 100


def files_needed(max_connections: int) -> int:
    """
    About how many open files C{--max-connections} connections need.
    """
    return max_connections + FILES_BESIDES_CONNECTIONS


def raise_open_file_limit(needed: int, getrlimit: Callable[[int], tuple[int, int]] = resource.getrlimit,
                          setrlimit: Callable[[int, tuple[int, int]], None] = resource.setrlimit) -> tuple[int, int]:
    """
    Raise the soft open-file limit towards C{needed}, as far as the hard
    limit allows (systemd's default soft limit, 1024, exists for programs
    that use C{select()}; the relay's reactor uses epoll); return the soft
    and hard limits in force.  Never raises.
    """
    soft, hard = getrlimit(resource.RLIMIT_NOFILE)
    infinite = resource.RLIM_INFINITY
    if soft != infinite and soft < needed and (hard == infinite or hard > soft):
        target = needed if hard == infinite else min(hard, needed)
        try:
            setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (OSError, ValueError):
            pass
    return soft, hard


def open_file_limit_lines(max_connections: int, soft: int, hard: int) -> tuple[str, str | None]:
    """
    What to log of the open-file limit at start: an info line, and a
    warning when it is below what C{max_connections} needs (or C{None}).
    """
    needed = files_needed(max_connections)
    shown = lambda limit: "unlimited" if limit == resource.RLIM_INFINITY else str(limit)  # noqa: E731
    info = (f"open-file limit {shown(soft)} (hard {shown(hard)}); --max-connections {max_connections} "
            f"needs about {needed}")
    if soft == resource.RLIM_INFINITY or soft >= needed:
        return info, None
    return info, (
        f"open-file limit {soft} is below the {needed} that --max-connections {max_connections} needs: "
        f"connections past about {max(0, soft - FILES_BESIDES_CONNECTIONS)} fail; raise it (LimitNOFILE= "
        f"in the systemd unit, ulimit -n in a shell) or lower --max-connections")


def watchdog_interval(environ: Mapping[str, str] | None = None, pid: int | None = None) -> float | None:
    """
    How often to send C{WATCHDOG=1}, in seconds (half of C{WatchdogSec=}),
    when systemd asks this process for it through C{WATCHDOG_USEC} (and
    C{WATCHDOG_PID}, when set, names it); otherwise C{None}.
    """
    environ = os.environ if environ is None else environ
    try:
        usec = int(environ.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    if usec <= 0:
        return None
    owner = environ.get("WATCHDOG_PID")
    if owner and owner.strip() != str(os.getpid() if pid is None else pid):
        return None
    return usec / 2_000_000


class Watchdog(Service):
    """
    Sends C{WATCHDOG=1} every C{interval} seconds on C{clock} while it
    runs, the first at once: a reactor that stops turning stops it, and
    systemd restarts the relay.
    """

    name = "watchdog"

    def __init__(self, interval: float, notify: Callable[[str], Any], clock: Any) -> None:
        self.interval = interval
        self.notify = notify
        self.clock = clock
        self._loop: LoopingCall | None = None

    def startService(self) -> None:
        super().startService()
        self._loop = LoopingCall(self._ping)
        self._loop.clock = self.clock
        self._loop.start(self.interval, now=True)

    def _ping(self) -> None:
        try:
            self.notify("WATCHDOG=1")
        except Exception:
            log.failure("could not send the watchdog ping")

    def stopService(self) -> None:
        super().stopService()
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None


def sd_notify(state: str, environ: Mapping[str, str] | None = None) -> bool:
    """
    Send C{state} (e.g. C{"READY=1"}) to the service manager's notification
    socket, as C{sd_notify(3)} does; return whether there was one.  Never
    raises: a relay not run by systemd has no C{NOTIFY_SOCKET}.
    """
    address = (os.environ if environ is None else environ).get("NOTIFY_SOCKET")
    if not address or address[0] not in "/@":
        return False
    if address[0] == "@":
        # An abstract socket.
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(state.encode("utf-8"), address)
    except OSError as e:
        log.warn("could not tell the service manager {state!r}: {error}", state=state, error=e.strerror or e)
        return False
    return True


def exit_process(reactor: Any, hard_exit: Callable[[int], None] = os._exit) -> Callable[[int], None]:
    """
    A function that ends the process with a status: before the reactor
    runs (twistd starts the services first) by raising C{SystemExit}, which
    twistd lets through; once it runs, by stopping it (the services stop,
    the store is flushed) and then exiting with the status, since twistd
    itself would exit 0.
    """

    def exit(status: int) -> None:
        if not reactor.running:
            raise SystemExit(status)

        def after_shutdown() -> None:
            for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
                try:
                    stream.flush()
                except Exception:
                    pass
            hard_exit(status)

        reactor.addSystemEventTrigger("after", "shutdown", after_shutdown)
        reactor.stop()

    return exit
