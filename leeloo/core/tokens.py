"""
Spotify tokens parked for a device that was offline when its owner
finished the consent: handed over at its next register, create or join
within the token lifetime, then forgotten.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from leeloo import messages
from leeloo.store import DELETE_TOKEN, PUT_TOKEN, Journal, Snapshot, TokenRecord

if TYPE_CHECKING:
    from leeloo.core.sessions import Session
    from leeloo.fanout import IFanout


class PendingTokens:
    """
    C{pending}: device id -> (its tokens, when they expire).

    @param ttl: seconds parked tokens are kept.
    """

    def __init__(self, clock: Any, journal: Journal, fanout: IFanout, ttl: float) -> None:
        self.clock = clock
        self.journal = journal
        self.fanout = fanout
        self.ttl = ttl
        self.pending: dict[str, tuple[dict, float]] = {}

    def restore(self, snapshot: Snapshot) -> None:
        for t in snapshot.tokens:
            self.pending[t.device_id] = (t.tokens, t.expires_at)

    def deliver(self, device_id: str, tokens: dict) -> bool:
        """
        Hand Spotify tokens to C{device_id}: at once if it is online (return
        C{True}), else park them for its return.
        """
        if self.fanout.send_to_device(device_id, messages.SpotifyAuthComplete(tokens)):
            return True
        expires = self.clock.seconds() + self.ttl
        self.pending[device_id] = (tokens, expires)
        self.journal.put((PUT_TOKEN, TokenRecord(device_id, tokens, expires)), wait=False)
        return False

    def hand_over(self, session: Session) -> None:
        """
        C{session}'s device is back: give it the tokens parked for it.
        """
        pending = self.pending.pop(session.device_id, None)
        if pending is not None:
            self.journal.put((DELETE_TOKEN, session.device_id), wait=False)
            tokens, expires = pending
            if expires > self.clock.seconds():
                session.send(messages.SpotifyAuthComplete(tokens))

    def expire(self) -> int:
        """
        Forget parked tokens past their lifetime; return how many.
        """
        now = self.clock.seconds()
        stale = [d for d, (_, expires) in self.pending.items() if expires <= now]
        for device_id in stale:
            del self.pending[device_id]
            self.journal.put((DELETE_TOKEN, device_id), wait=False)
        return len(stale)
