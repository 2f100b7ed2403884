"""
Reconnection delays: exponential backoff with full jitter.

Twisted's stock L{twisted.application.internet.backoffPolicy} adds at most
one second of jitter to a deterministic exponential delay, so a fleet that
loses the relay at the same moment comes back in lockstep, every device
retrying within the same second.  With I{full} jitter each delay is drawn
uniformly from zero to the exponential ceiling, so the fleet's retries
spread over the whole window ("Exponential Backoff And Jitter", AWS
Architecture Blog, 2015).
"""

from __future__ import annotations

import random as _random
from typing import Callable

DEFAULT_INITIAL = 1.0
DEFAULT_FACTOR = 2.0
DEFAULT_CAP = 60.0


class FullJitter:
    """
    A C{retryPolicy} for L{twisted.application.internet.ClientService}:
    called with the number of failed attempts in a row (1 for the first
    retry), it returns a delay drawn uniformly from
    C{[0, min(cap, initial * factor ** (attempt - 1))]}.

    @param random: a callable returning a float in C{[0, 1)}; inject a
        seeded one in tests.
    """

    def __init__(self, initial: float = DEFAULT_INITIAL, factor: float = DEFAULT_FACTOR,
                 cap: float = DEFAULT_CAP, random: Callable[[], float] = _random.random) -> None:
        if not initial > 0 or not factor >= 1 or not cap >= initial:
            raise ValueError("need initial > 0, factor >= 1 and cap >= initial")
        self.initial = initial
        self.factor = factor
        self.cap = cap
        self.random = random

    def ceiling(self, attempt: int) -> float:
        """
        The longest delay for C{attempt}: the exponential, capped.
        """
        try:
            grown = self.initial * self.factor ** max(0, attempt - 1)
        except OverflowError:
            return self.cap
        return min(self.cap, grown)

    def __call__(self, attempt: int) -> float:
        return self.random() * self.ceiling(attempt)

    def after_abuse(self) -> float:
        """
        The delay after the relay closed the connection for repeated
        refusals (4029): the cap, plus up to a tenth of it so that devices
        refused together do not return together.
        """
        return self.cap * (1 + 0.1 * self.random())

    def __repr__(self) -> str:
        return f"FullJitter(initial={self.initial:g}, factor={self.factor:g}, cap={self.cap:g})"
