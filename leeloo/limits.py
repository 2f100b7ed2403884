"""
Token buckets, sans I/O: how often a connection, a client address or a bot
user may do something.  Time is passed in, so a L{Clock} drives the tests.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Hashable


@dataclass(frozen=True)
class Rate:
    """
    C{burst} actions at once, refilled at C{per_second}.
    """

    per_second: float
    burst: float

    @classmethod
    def per_window(cls, count: float, seconds: float) -> "Rate":
        return cls(count / seconds, count)

    def describe(self) -> str:
        if self.per_second >= 1:
            return f"{self.per_second:g}/s (bursts of {self.burst:g})"
        return f"{self.burst:g} per {self.burst / self.per_second:g}s"


class Bucket:
    """
    One token bucket.  C{take} spends a token and returns 0, or returns the
    seconds until one is available.
    """

    __slots__ = ("tokens", "stamp")

    def __init__(self, tokens: float, stamp: float) -> None:
        self.tokens = tokens
        self.stamp = stamp

    def take(self, now: float, rate: Rate) -> float:
        tokens = self.tokens + (now - self.stamp) * rate.per_second
        if tokens > rate.burst:
            tokens = rate.burst
        self.stamp = now
        if tokens >= 1.0:
            self.tokens = tokens - 1.0
            return 0.0
        self.tokens = tokens
        return (1.0 - tokens) / rate.per_second

    def full(self, now: float, rate: Rate) -> bool:
        return self.tokens + (now - self.stamp) * rate.per_second >= rate.burst


class Limiter:
    """
    Token buckets by key (a client address, a bot user).  Buckets that have
    refilled are forgotten by L{sweep}, so memory follows recent activity.
    """

    def __init__(self, clock: Any, rate: Rate, name: str = "") -> None:
        self.clock = clock
        self.rate = rate
        self.buckets: dict[Hashable, Bucket] = {}

    def take(self, key: Hashable) -> float:
        now = self.clock.seconds()
        bucket = self.buckets.get(key)
        if bucket is None:
            bucket = self.buckets[key] = Bucket(self.rate.burst, now)
        return bucket.take(now, self.rate)

    def sweep(self) -> int:
        now = self.clock.seconds()
        full = [key for key, bucket in self.buckets.items() if bucket.full(now, self.rate)]
        for key in full:
            del self.buckets[key]
        return len(full)


@dataclass(frozen=True)
class RelayLimits:
    """
    The core's limits, all options with safe defaults.

    @ivar messages: frames a connection may send.
    @ivar entries: attempts to enter crews the device is not a member of
        (failed joins included), per connection and per client address;
        also the bot API's joins per Telegram user.
    @ivar abuse_strikes: refusals in a row after which a connection is
        closed (4029).
    """

    messages: Rate = Rate(20.0, 40.0)
    entries: Rate = Rate.per_window(10, 600)
    abuse_strikes: int = 10
    require_device_key: bool = False
    crew_code_length: int = 4
    #: crews one device may be in at once (C{crew_add} past it: C{crew_limit}).
    max_crews_per_device: int = 8

    def describe(self) -> str:
        return (
            f"messages {self.messages.describe()} per connection, "
            f"crew entries {self.entries.describe()} per connection and per address, "
            f"close after {self.abuse_strikes} refusals in a row, "
            f"device keys {'required' if self.require_device_key else 'optional (legacy ids allowed)'}, "
            f"new crew codes of {self.crew_code_length} characters, "
            f"at most {self.max_crews_per_device} crews per device"
        )
