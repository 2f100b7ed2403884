"""
Spotify tokens parked for a device that was offline when its owner
finished the consent: handed over at its next register, create or join
within the token lifetime, then forgotten.  They reach the store sealed
(L{leeloo.sealing}: C{{"sealed": ciphertext}}), opaque to the engine.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from leeloo import messages
from leeloo.sealing import Sealer
from leeloo.store import DELETE_TOKEN, PUT_TOKEN, Journal, Snapshot, TokenRecord

if TYPE_CHECKING:
    from leeloo.core.sessions import Session
    from leeloo.fanout import IFanout


class PendingTokens:
    """
    C{pending}: device id -> (its tokens, when they expire).

    @param ttl: seconds parked tokens are kept.
    """

    def __init__(self, clock: Any, journal: Journal, fanout: IFanout, ttl: float,
                 sealer: Sealer | None = None) -> None:
        self.clock = clock
        self.sealer = sealer if sealer is not None else Sealer()
        self.journal = journal
        self.fanout = fanout
        self.ttl = ttl
        self.pending: dict[str, tuple[dict, float]] = {}
        # Device ids whose tokens were taken but whose deletion the store
        # has not committed yet: the store's copy is not to be adopted.
        self._taken: set[str] = set()

    def restore(self, snapshot: Snapshot) -> None:
        for t in snapshot.tokens:
            self.pending[t.device_id] = (self.sealer.open_tokens(t.tokens), t.expires_at)

    def adopt(self, record: TokenRecord | None) -> None:
        """
        Hold C{record}, as the store gave it (another node parked it),
        unless tokens are held for that device already.
        """
        if record is not None and record.device_id not in self.pending and record.device_id not in self._taken:
            self.pending[record.device_id] = (self.sealer.open_tokens(record.tokens), record.expires_at)

    def deliver(self, device_id: str, tokens: dict) -> bool:
        """
        Hand Spotify tokens to C{device_id}: at once if it is online (return
        C{True}), else park them for its return.
        """
        if self.fanout.send_to_device(device_id, messages.SpotifyAuthComplete(tokens)):
            return True
        self.park(device_id, tokens)
        return False

    def park(self, device_id: str, tokens: dict) -> None:
        """
        Keep C{device_id}'s tokens for its return.
        """
        expires = self.clock.seconds() + self.ttl
        self.pending[device_id] = (tokens, expires)
        self.journal.put((PUT_TOKEN, TokenRecord(device_id, self.sealer.seal_tokens(tokens), expires)), wait=False)

    def hand_over(self, session: Session) -> None:
        """
        C{session}'s device is back: give it the tokens parked for it.
        """
        pending = self.pending.pop(session.device_id, None)
        if pending is not None:
            self._delete(session.device_id)
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
            self._delete(device_id)
        return len(stale)

    def _delete(self, device_id: str) -> None:
        self._taken.add(device_id)
        self.journal.put((DELETE_TOKEN, device_id)).addBoth(self._deleted, device_id)

    def _deleted(self, result: Any, device_id: str) -> None:
        self._taken.discard(device_id)
