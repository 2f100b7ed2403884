"""
The Spotify access the relay keeps for a device whose owner consented on
the pairing page ("let the relay keep access so this LEELOO can share what
you're playing"): the relay is then the only holder of the refresh token.

A grant is C{access_token}, C{refresh_token} and C{expires_at} (the relay's
clock), sealed (L{leeloo.sealing}) before it reaches the store as a
L{GrantRecord}: the engine holds ciphertext only.  The store is the
authority; C{held} caches what this relay wrote or read (C{None}: deleted
here).  The operations on one device's grant run one after another
(L{Grants.serially}), so that a refresh token Spotify rotates is never
spent twice.
"""

from __future__ import annotations

from typing import Any, Callable

from twisted.internet.defer import Deferred, maybeDeferred, succeed

from leeloo.sealing import Sealer
from leeloo.store import DELETE_GRANT, PUT_GRANT, GrantRecord, Journal


class Grants:
    def __init__(self, clock: Any, store: Any, journal: Journal, sealer: Sealer) -> None:
        self.clock = clock
        self.store = store
        self.journal = journal
        self.sealer = sealer
        self.held: dict[str, dict | None] = {}
        # device id -> the Deferred of its last operation
        self._busy: dict[str, Deferred] = {}

    def find(self, device_id: str) -> Deferred:
        """
        Fire with C{device_id}'s grant (a dict), or C{None}.
        """
        if device_id in self.held:
            return succeed(self.held[device_id])
        d = maybeDeferred(self.store.find_grant, device_id)

        def found(record: GrantRecord | None) -> dict | None:
            grant = None if record is None else self.sealer.open(record.sealed)
            self.held.setdefault(device_id, grant)
            return self.held[device_id]

        return d.addCallback(found)

    def keep(self, device_id: str, tokens: dict) -> Deferred:
        """
        Keep C{tokens} (Spotify's answer: C{access_token}, C{refresh_token},
        C{expires_in}) as C{device_id}'s grant; fire once durable.
        """
        grant = {"access_token": tokens["access_token"], "refresh_token": tokens["refresh_token"],
                 "expires_at": self.clock.seconds() + tokens["expires_in"]}
        self.held[device_id] = grant
        return self.journal.put((PUT_GRANT, GrantRecord(device_id, self.sealer.seal(grant))))

    def forget(self, device_id: str) -> Deferred:
        """
        Delete C{device_id}'s grant (nothing when it has none); fire once
        durable.
        """
        self.held[device_id] = None
        return self.journal.put((DELETE_GRANT, device_id))

    def serially(self, device_id: str, operation: Callable[[], Deferred]) -> Deferred:
        """
        Run C{operation} once every earlier one for C{device_id} has
        finished; fire with its result.
        """
        before = self._busy.get(device_id)
        d: Deferred = Deferred()
        mine = Deferred()
        self._busy[device_id] = mine

        def run(_: Any) -> Deferred:
            return maybeDeferred(operation)

        def done(result: Any) -> Any:
            if self._busy.get(device_id) is mine:
                del self._busy[device_id]
            mine.callback(None)
            return result

        d.addCallback(run).addBoth(done)
        if before is None:
            d.callback(None)
        else:
            before.addCallback(lambda _: d.callback(None))
        return d
