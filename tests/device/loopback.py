"""
The relay service on loopback, in this process, and devices against it.
"""

from __future__ import annotations

from pathlib import Path

import txaio
from twisted.internet import defer, reactor
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.interfaces import IStreamClientEndpoint
from zope.interface import implementer

from leeloo import tap
from leeloo.device import FullJitter, LeelooDevice

from ..support import listening_port

# Fast reconnects for tests: full jitter up to 0.2 s.
FAST = dict(initial=0.05, cap=0.2)


class LoopbackRelay:
    """
    The whole relay service tree (SQLite in a temporary directory) on
    127.0.0.1; L{stop} and L{start} again keep its data and its port.
    """

    def __init__(self, testcase, listen: str = "tcp:{port}:interface=127.0.0.1", **config) -> None:
        self.testcase = testcase
        self.data_dir = Path(testcase.mktemp())
        self.data_dir.mkdir(mode=0o700)
        self.listen = listen
        self.config = config
        self.port = 0
        self.service = None
        previous = txaio.config.loop
        testcase.addCleanup(setattr, txaio.config, "loop", previous)
        testcase.addCleanup(self._cleanup)

    @defer.inlineCallbacks
    def start(self):
        config = tap.Config(listen=(self.listen.format(port=self.port),), data_dir=self.data_dir,
                            **self.config)
        self.service = tap.build_service(config, reactor)
        self.service.startService()
        port = yield listening_port(self.service)
        self.port = port.getHost().port
        return self

    def stop(self):
        service, self.service = self.service, None
        return service.stopService()

    def _cleanup(self):
        if self.service is not None:
            return self.stop()

    @property
    def relay(self):
        return self.service.relay

    def url(self, scheme: str = "ws", host: str = "127.0.0.1") -> str:
        return f"{scheme}://{host}:{self.port}/ws"


class Events:
    """
    Everything a device reports, and Deferreds for what is still to come.
    """

    def __init__(self, device: LeelooDevice) -> None:
        self.seen: list[tuple[str, dict]] = []
        self._waiters: list = []
        device.observe(self._got)

    def _got(self, event: str, frame: dict) -> None:
        self.seen.append((event, frame))
        for waiter in list(self._waiters):
            wanted, where, d = waiter
            if event == wanted and where(frame):
                self._waiters.remove(waiter)
                d.callback(frame)

    def wait(self, event: str, where=lambda frame: True, after: int | None = None) -> defer.Deferred:
        """
        Fire with the first C{event} matching C{where} seen from index
        C{after} on (only future ones when C{after} is None).
        """
        if after is not None:
            for e, frame in self.seen[after:]:
                if e == event and where(frame):
                    return defer.succeed(frame)
        d = defer.Deferred()
        self._waiters.append((event, where, d))
        return d

    def frames(self, event: str) -> list[dict]:
        return [f for e, f in self.seen if e == event]


def start_device(testcase, url: str, name: str, state: str | None = None, **kwargs) -> tuple[LeelooDevice, Events]:
    """
    A started device with fast reconnects, stopped when the test ends.
    """
    kwargs.setdefault("retry_policy", FullJitter(**FAST))
    kwargs.setdefault("fsync", False)
    device = LeelooDevice(url, state or testcase.mktemp(), name, **kwargs)
    events = Events(device)
    device.startService()
    testcase.addCleanup(device.stopService)
    return device, events


@implementer(IStreamClientEndpoint)
class GatedEndpoint:
    """
    Connects through C{endpoint}, but while closed holds every attempt
    until L{open}.
    """

    def __init__(self, endpoint) -> None:
        self.endpoint = endpoint
        self._gate: defer.Deferred | None = None

    def close(self) -> None:
        self._gate = defer.Deferred()

    def open(self) -> None:
        gate, self._gate = self._gate, None
        gate.callback(None)

    def connect(self, factory):
        if self._gate is None:
            return self.endpoint.connect(factory)
        d = defer.Deferred()

        def opened(_):
            self.endpoint.connect(factory).chainDeferred(d)

        self._gate.addCallback(opened)
        return d


@implementer(IStreamClientEndpoint)
class RefusingEndpoint:
    """
    Refuses every attempt, noting when it was made on C{clock}.
    """

    def __init__(self, clock) -> None:
        self.clock = clock
        self.attempts: list[float] = []

    def connect(self, factory):
        self.attempts.append(self.clock.seconds())
        return defer.fail(ConnectionRefusedError("refused"))
