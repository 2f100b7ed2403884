"""
The relay's listening endpoints, and its readiness: every C{--listen},
C{--redirect-listen} and C{--admin-listen} endpoint listens before the relay
says it is ready, and one that cannot ends the process with one line naming
it, the reason and what to do.  Endpoint strings get the relay's default
backlog here (L{with_default_backlog}), and are shown as written
(L{as_written}).
"""

from __future__ import annotations

import errno
import re
from typing import Any, Callable, Sequence

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import Service
from twisted.internet.defer import CancelledError, Deferred, FirstError, gatherResults
from twisted.internet.error import CannotListenError
from twisted.logger import Logger
from twisted.python.failure import Failure

from leeloo import __version__

log = Logger()

DEFAULT_BACKLOG = 1024
# Endpoint types whose string takes a backlog= argument.
_BACKLOG_TYPES = {"tcp", "tcp6", "ssl", "unix", "letsencrypt"}


def as_written(description: str) -> str:
    """
    An endpoint string without the backlog L{with_default_backlog} added.
    """
    suffix = f":backlog={DEFAULT_BACKLOG}"
    return description[:-len(suffix)] if description.endswith(suffix) else description


def with_default_backlog(description: str) -> str:
    """
    Add C{backlog=1024} to an endpoint string that takes one and sets none
    (Twisted's default of 50 makes a reconnecting fleet wait on SYN retries).
    """
    kind = description.split(":", 1)[0].strip().lower()
    if kind in _BACKLOG_TYPES and not re.search(r"(^|:)backlog=", description):
        return f"{description}:backlog={DEFAULT_BACKLOG}"
    return description


def explain(reason: BaseException) -> str:
    """
    Why an endpoint cannot listen, and what to do about it.
    """
    if isinstance(reason, CannotListenError):
        error = reason.socketError
        code = getattr(error, "errno", None)
        port = reason.port
        if code == errno.EADDRINUSE:
            return (f"address already in use: another program listens on {port} (the old nginx or "
                    f"PM2 relay?); stop it (sudo ss -ltnp 'sport = :{port}' names it) or listen elsewhere")
        if code == errno.EACCES:
            return ("permission denied: ports below 1024 need the CAP_NET_BIND_SERVICE capability "
                    "(etc/leeloo.service grants it with AmbientCapabilities=) or socket activation "
                    "(--listen systemd:domain=INET:index=0)")
        if code == errno.EADDRNOTAVAIL:
            return (f"address {reason.interface or '?'} is not one of this machine's: "
                    f"check interface= in the endpoint")
        detail = getattr(error, "strerror", None) or str(error)
        return f"{detail} (interface {reason.interface or 'any'}, port {port})"
    return str(reason) or type(reason).__name__


class ListenError(Exception):
    """
    An endpoint that cannot listen.
    """

    def __init__(self, option: str, description: str, reason: BaseException) -> None:
        super().__init__(option, description, reason)
        self.option = option
        self.description = description
        self.reason = reason

    def line(self) -> str:
        return f"leeloo: cannot listen on {self.option} {self.description}: {explain(self.reason)}"

    def __str__(self) -> str:
        return self.line()


def _address(port: Any) -> str:
    host = port.getHost()
    if getattr(host, "port", None) is not None:
        name = getattr(host, "host", "")
        return f"[{name}]:{host.port}" if ":" in name else f"{name}:{host.port}"
    return str(getattr(host, "name", None) or host)


class Listener(StreamServerEndpointService):
    """
    One endpoint the relay serves on, named by its option and the string
    the operator wrote.  L{listening} fires with the port, or fails with a
    L{ListenError} (and nothing is logged here: L{Readiness} says it once).
    """

    def __init__(self, endpoint: Any, factory: Any, option: str, description: str) -> None:
        super().__init__(endpoint, factory)
        self.option = option
        self.description = description
        self.listening: Deferred = Deferred()

    def privilegedStartService(self) -> None:
        # StreamServerEndpointService's own logs a failure as an unhandled
        # error and carries on; this one hands it to Readiness.
        # (_waitingForPort is what its stopService stops: the end-to-end
        # tests that stop a relay fail if that changes.)
        Service.privilegedStartService(self)
        self.listening = Deferred()
        self._waitingForPort = self.endpoint.listen(self.factory).addCallbacks(self._listened, self._failed)

    def _listened(self, port: Any) -> Any:
        self.listening.callback(port)
        return port

    def _failed(self, failure: Failure) -> None:
        if not failure.check(CancelledError):
            self.listening.errback(ListenError(self.option, self.description, failure.value))
        return None


class Readiness(Service):
    """
    Says the relay is ready (a log line, and C{READY=1} to systemd) once
    every listener listens and the reactor runs (C{when_running}, e.g.
    C{reactor.callWhenRunning}); when one cannot listen, logs its one line
    and calls C{exit(1)}.
    """

    def __init__(self, listeners: Sequence[Listener], notify: Callable[[str], Any],
                 exit: Callable[[int], None], when_running: Callable[..., Any]) -> None:
        self.listeners = tuple(listeners)
        self.notify = notify
        self.exit = exit
        self.when_running = when_running
        self.ready = False
        # While startService waits on the listeners: what they gave at once.
        self._early: list | None = None

    def startService(self) -> None:
        super().startService()
        # Every listener usually knows at once (TCP, TLS, unix and systemd
        # endpoints do): then settle here, outside the Deferred, where an
        # exit is an exit and not a Deferred's error.
        self._early = []
        gatherResults([l.listening for l in self.listeners], consumeErrors=True).addBoth(self._arrived)
        early, self._early = self._early, None
        if early:
            self._settle(early[0])

    def _arrived(self, result: Any) -> None:
        if self._early is not None:
            self._early.append(result)
        else:
            self._settle(result)

    def _settle(self, result: Any) -> None:
        if isinstance(result, Failure):
            error = result.value.subFailure.value if isinstance(result.value, FirstError) else result.value
            line = error.line() if isinstance(error, ListenError) else f"leeloo: cannot listen: {error}"
            log.critical("{line}", line=line)
            self.notify(f"STATUS={line}")
            self.exit(1)
            return
        # Ready only once the reactor runs, and so handles SIGTERM.
        self.when_running(self._ready, result)

    def _ready(self, result: list) -> None:
        if not self.running:
            return
        self.ready = True
        where = "; ".join(f"{l.option} {l.description} on {_address(port)}"
                          for l, port in zip(self.listeners, result))
        log.info("LEELOO relay {version} ready: {where}", version=__version__, where=where)
        self.notify(f"READY=1\nSTATUS=ready: {where}")

    def stopService(self) -> None:
        super().stopService()
        if self.ready:
            self.notify("STOPPING=1")
