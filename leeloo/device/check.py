"""
C{leeloo-device check}: a real round trip through a relay, one shot.

Two connections register in the check crew (C{CHECK-} and a hash of the
host name; their device ids derive from it the same way, so repeated checks
reuse the same records), one pings, and one shares a song the other must
receive.  Every step prints a tick or a cross with one line saying why.
"""

from __future__ import annotations

import hashlib
import secrets
from typing import Any, Callable

from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from twisted.internet.defer import CancelledError, Deferred, DeferredList, TimeoutError, inlineCallbacks
from twisted.python.failure import Failure

from leeloo import __version__, messages
from leeloo.timers import cancel_close_timer
from leeloo.device.connection import RelayURL, describe, endpoint_for
from leeloo.messages import ErrorFrame, MusicShared, Pong, ProtocolError, Registered, RelayMessage

TICK = "\N{CHECK MARK}"
CROSS = "\N{BALLOT X}"


def check_identity(host: str) -> tuple[str, str, str]:
    """
    The check crew's code and its two device ids for C{host}.
    """
    digest = hashlib.sha256(host.lower().encode("utf-8")).hexdigest()
    return f"CHECK-{digest[:8].upper()}", f"check_{digest[:12]}_a", f"check_{digest[:12]}_b"


class ConnectionClosed(Exception):
    def __init__(self, reason: Any) -> None:
        super().__init__(str(reason))
        self.reason = reason


class CheckProtocol(WebSocketClientProtocol):
    """
    A connection that hands the relay's messages (typed, as
    L{messages.decode_from_relay} reads them) to whoever waits for one; an
    C{error} fails every wait with its L{ProtocolError}.
    """

    def __init__(self) -> None:
        super().__init__()
        self.opened: Deferred = Deferred()
        self.closed: Deferred = Deferred()
        self._waiting: list[tuple[Callable[[RelayMessage], bool], Deferred]] = []
        self.lost_reason: Failure | None = None

    def connectionLost(self, reason: Failure) -> None:
        self.lost_reason = reason
        super().connectionLost(reason)
        cancel_close_timer(self)

    def onOpen(self) -> None:
        self.opened.callback(self)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        if isBinary:
            return
        try:
            message = messages.decode_from_relay(payload)
        except ProtocolError:
            return
        for entry in list(self._waiting):
            wanted, d = entry
            if isinstance(message, ErrorFrame):
                self._waiting.remove(entry)
                d.errback(message.to_exception())
            elif wanted(message):
                self._waiting.remove(entry)
                d.callback(message)

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        why = self.lost_reason if (self.lost_reason is not None and not wasClean) else None
        failure = why if why is not None and not why.check(ConnectionClosed) else None
        error = ConnectionClosed(reason or f"closed with {code}")
        if not self.opened.called:
            self.opened.errback(failure if _informative(failure) else error)
        for _, d in self._waiting:
            d.errback(error)
        self._waiting = []
        self.closed.callback(code)

    def wait_for(self, wanted: Callable[[RelayMessage], bool]) -> Deferred:
        d = Deferred()
        self._waiting.append((wanted, d))
        return d

    def send_frame(self, message: dict) -> None:
        self.sendMessage(messages.encode(message))


def _informative(failure: Failure | None) -> bool:
    from twisted.internet.error import ConnectionDone, ConnectionLost
    return failure is not None and not failure.check(ConnectionDone, ConnectionLost)


class Check:
    """
    One run of the check against C{url}; L{run} fires with the exit status.
    """

    def __init__(self, reactor: Any, url: str, out: Any, timeout: float = 15.0, trust_root: Any = None) -> None:
        self.reactor = reactor
        self.relay = RelayURL.parse(url)
        self.out = out
        self.timeout = timeout
        self.trust_root = trust_root
        self.step = "connecting"
        self.connections: list[CheckProtocol] = []

    def say(self, mark: str, text: str) -> None:
        self.out.write(f"{mark} {text}\n")
        self.out.flush()

    def run(self) -> Deferred:
        d = self._steps()
        d.addTimeout(self.timeout, self.reactor)
        d.addCallbacks(self._passed, self._failed)
        d.addBoth(self._close)
        return d

    def _passed(self, _: Any) -> int:
        self.say(TICK, f"relay {self.relay.url} works")
        return 0

    def _failed(self, failure: Failure) -> int:
        if failure.check(CancelledError, TimeoutError):
            why = f"timed out after {self.timeout:g}s"
        elif failure.check(ProtocolError):
            why = f"the relay answered {failure.value.code}: {failure.value.message}"
        elif failure.check(ConnectionClosed):
            why = f"the relay closed the connection: {failure.value}"
        else:
            why = describe(failure, self.relay, self.timeout)
        self.say(CROSS, f"{self.step}: {why}")
        return 1

    def _close(self, result: Any) -> Deferred:
        """
        Close every connection (cleanly if it is open), then fire with
        C{result}.
        """
        waits = []
        for c in self.connections:
            if c.closed.called:
                continue
            if c.state == c.STATE_OPEN:
                c.sendClose(1000)
            else:
                c.transport.abortConnection()
            waits.append(c.closed)
        d = DeferredList(waits)
        d.addTimeout(2.0, self.reactor)
        d.addBoth(lambda _: result)
        return d

    @inlineCallbacks
    def _connect(self, which: str):
        self.step = f"connect {which} to {self.relay.where}"
        factory = WebSocketClientFactory(self.relay.url, reactor=self.reactor,
                                         useragent=f"leeloo-device/{__version__} check")
        factory.protocol = CheckProtocol
        # The check's own timeout names the step; Autobahn's is a backstop.
        factory.setProtocolOptions(openHandshakeTimeout=self.timeout + 5, closeHandshakeTimeout=2.0)
        endpoint = endpoint_for(self.reactor, self.relay, self.trust_root, timeout=self.timeout)
        proto = yield endpoint.connect(factory)
        self.connections.append(proto)
        yield proto.opened
        tls = ", TLS certificate verified" if self.relay.secure else ""
        self.say(TICK, f"connected {which} to {self.relay.url}{tls}")
        return proto

    @inlineCallbacks
    def _register(self, proto: CheckProtocol, which: str, device_id: str, crew: str):
        self.step = f"register {which} in crew {crew}"
        reply = proto.wait_for(lambda m: isinstance(m, Registered))
        proto.send_frame({"type": "register", "device_id": device_id, "crew_code": crew,
                          "device_name": f"leeloo-device check {which}"})
        yield reply
        self.say(TICK, f"registered {which} as {device_id} in crew {crew}")

    @inlineCallbacks
    def _steps(self):
        crew, id_a, id_b = check_identity(self.relay.host)
        a = yield self._connect("A")
        b = yield self._connect("B")
        yield self._register(a, "A", id_a, crew)
        yield self._register(b, "B", id_b, crew)
        self.step = "ping"
        pong = a.wait_for(lambda m: isinstance(m, Pong))
        a.send_frame({"type": "ping"})
        yield pong
        self.say(TICK, "ping answered")
        self.step = "share a song from A to B"
        track = f"check {secrets.token_hex(4)}"
        received = b.wait_for(lambda m: isinstance(m, MusicShared) and m.track == track)
        a.send_frame({"type": "share_music", "spotify_uri": "spotify:track:0", "artist": "leeloo-device",
                      "track": track, "album": "check"})
        yield received
        self.say(TICK, "song shared from A reached B")
