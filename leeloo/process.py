"""
The relay as a process: telling systemd how it is doing (C{sd_notify}), and
exiting with a status systemd's C{Restart=on-failure} sees.
"""

from __future__ import annotations

import os
import socket
import sys
from typing import Any, Callable, Mapping

from twisted.logger import Logger

log = Logger()


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
