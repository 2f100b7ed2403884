"""
What a connection or an address may ask for, and how often: the message
rate, the budget for entering crews, and the strikes that end a connection
that keeps being refused.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from twisted.logger import Logger

from leeloo.limits import Bucket, Limiter, RelayLimits
from leeloo.messages import CLOSE_ABUSE, DeviceAuthFailed, ProtocolError, RateLimited

if TYPE_CHECKING:
    from leeloo.core.crews import Crew
    from leeloo.core.sessions import Session

_log = Logger()


class Admission:
    """
    @param budget: makes the limiter of a budget by key (C{budget(clock,
        rate, name)}): a L{Limiter}, or one the nodes sharing a Redis
        share (L{leeloo.sharedlimits.SharedBudget}).
    """

    def __init__(self, clock: Any, limits: RelayLimits, budget: Any = Limiter) -> None:
        self.clock = clock
        self.limits = limits
        self._entries_by_address = budget(clock, limits.entries, "entries")
        self._bot_joins = budget(clock, limits.entries, "bot-joins")

    def message_bucket(self) -> Bucket:
        """
        A new connection's message budget, full.
        """
        return Bucket(self.limits.messages.burst, self.clock.seconds())

    def take_message(self, session: Session) -> None:
        """
        Count one frame (or WebSocket ping) from C{session}.

        @raise RateLimited: it is over its message rate.
        """
        wait = session.bucket.take(self.clock.seconds(), self.limits.messages)
        if wait:
            raise RateLimited("too many messages; slow down", wait)

    def check_entry(self, session: Session, device_id: str | None, crew: Crew | None) -> None:
        """
        Count an attempt to enter C{crew} (or a crew that does not exist,
        or to create one, or to register a new device id) against the
        connection's and the client address's budgets; a returning member
        is free.

        @raise RateLimited: over either budget.
        """
        device_id = device_id or session.device_id
        if crew is not None and device_id is not None and device_id in crew.members:
            return
        now = self.clock.seconds()
        if session.entries is None:
            session.entries = Bucket(self.limits.entries.burst, now)
        wait = session.entries.take(now, self.limits.entries)
        if session.address is not None:
            wait = max(wait, self._entries_by_address.take(session.address))
        if wait:
            raise RateLimited("too many attempts to enter crews; wait before trying again", wait)

    def check_bot_join(self, user_id: str) -> None:
        wait = self._bot_joins.take(user_id)
        if wait:
            raise RateLimited("too many join attempts; wait before trying again", wait)

    def refused(self, session: Session, error: ProtocolError) -> None:
        """
        C{session} was refused with C{error}: rate and key refusals are
        strikes, and enough in a row close it with L{CLOSE_ABUSE}.
        """
        if isinstance(error, (RateLimited, DeviceAuthFailed)):
            session.strikes += 1
            if session.strikes >= self.limits.abuse_strikes:
                _log.warn("closing a connection from {client_address} after {strikes} refusals ({error_code})",
                          client_address=session.address, strikes=session.strikes, error_code=error.code)
                session.close(CLOSE_ABUSE, "too many refused requests")

    def sweep(self) -> None:
        """
        Forget the budgets of addresses and bot users that are full again.
        """
        self._entries_by_address.sweep()
        self._bot_joins.sweep()
