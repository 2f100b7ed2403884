"""
One timer wheel for every connection's timeouts.

Autobahn asks its factory's batched timer for each connection's auto-ping,
ping timeout and close handshake timeout.  txaio's batched timer keeps each
bucket's calls in a list, so cancelling one (every pong, every close) scans
its bucket: with thousands of connections in a bucket, a fleet's pings cost
quadratic time.  This wheel keeps each bucket in a dict (cancelling is O(1))
and runs a due bucket in chunks, one reactor turn each, so that a bucket of
ten thousand pings does not stall the relay.
"""

from __future__ import annotations

import math
from typing import Any, Callable

from twisted.logger import Logger

_log = Logger()


class WheelCall:
    """
    One scheduled call; L{cancel} it, as an IDelayedCall-like object.
    """

    __slots__ = ("_wheel", "_slot", "_func", "_args", "_kwargs")

    def __init__(self, wheel: "TimerWheel", slot: int, func: Callable, args: tuple, kwargs: dict) -> None:
        self._wheel = wheel
        self._slot = slot
        self._func = func
        self._args = args
        self._kwargs = kwargs

    def cancel(self) -> None:
        wheel, self._wheel = self._wheel, None
        if wheel is not None:
            wheel._cancel(self)

    def __call__(self) -> Any:
        self._wheel = None
        return self._func(*self._args, **self._kwargs)


class TimerWheel:
    """
    Calls scheduled to the next C{resolution} seconds after their delay,
    one reactor timer per bucket, on C{clock} (the reactor, or a Clock).  A
    bucket whose calls are all cancelled cancels its timer.
    """

    def __init__(self, clock: Any, resolution: float = 0.25, chunk: int = 500) -> None:
        self.clock = clock
        self.resolution = resolution
        self.chunk = chunk
        self._buckets: dict[int, tuple[Any, dict[WheelCall, None]]] = {}

    def call_later(self, delay: float, func: Callable, *args: Any, **kwargs: Any) -> WheelCall:
        now = self.clock.seconds()
        slot = math.ceil((now + delay) / self.resolution)
        entry = self._buckets.get(slot)
        if entry is None:
            timer = self.clock.callLater(max(0.0, slot * self.resolution - now), self._due, slot)
            entry = self._buckets[slot] = (timer, {})
        call = WheelCall(self, slot, func, args, kwargs)
        entry[1][call] = None
        return call

    def _cancel(self, call: WheelCall) -> None:
        entry = self._buckets.get(call._slot)
        if entry is None:
            return
        timer, calls = entry
        calls.pop(call, None)
        if not calls:
            del self._buckets[call._slot]
            timer.cancel()

    def _due(self, slot: int) -> None:
        _, calls = self._buckets.pop(slot)
        self._run(list(calls))

    def _run(self, calls: list) -> None:
        for call in calls[: self.chunk]:
            if call._wheel is not None:
                try:
                    call()
                except Exception:
                    _log.failure("a connection timer failed")
        if len(calls) > self.chunk:
            self.clock.callLater(0, self._run, calls[self.chunk:])

    def pending(self) -> int:
        return sum(len(calls) for _, calls in self._buckets.values())


def cancel_close_timer(proto: Any) -> None:
    """
    Cancel the close-handshake timer Autobahn leaves running when a
    connection drops before the peer answered our close (its connectionLost
    cancels the ping and opening timers, not this one), so that nothing
    holds the dead connection until the timeout.  For the relay's
    connections and the device's alike; pinned by test_websocket's
    LostBeforeCloseAnsweredTests and tests.device.test_loopback's
    stop-while-dropping test.
    """
    call = getattr(proto, "closeHandshakeTimeoutCall", None)
    if call is not None:
        try:
            call.cancel()
        except Exception:
            pass
        proto.closeHandshakeTimeoutCall = None
