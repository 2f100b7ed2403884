"""
What the relay's operator changes (``leeloo-admin``, through the admin
API): a device's key reset, a member removed, a crew renamed or deleted,
a whole state imported into an empty relay.  Each changes the cache and
the store together, through the journal, and tells the connections it
concerns, so that the running relay, the store and the devices agree.

What a connected device sees:

  - C{reset_key}: its connection is closed with 4004; whatever key it
    presents next binds (none: it is issued a new one).
  - C{remove}: its connection leaves the crew (C{crew_left}; the crew hears
    C{member_offline}) and stays open; it is no longer a member (nothing of
    the crew is replayed to it).  It may join again with the code.
  - C{rename_crew}: its members online move with it (C{crew_renamed}); a
    member whose device still has the old code (every deployed one: it
    saves the code only from a C{crew_joined} or C{crew_created}) is taken
    to the crew when it names the old code, and told the new one in that
    reply; anyone else naming the old code finds no crew there.
  - C{delete_crew}: its members online are told (C{crew_deleted}) and
    leave it; a connection left in no crew is closed with 4004.  A
    deployed device then does what it does after any restart of the
    original relay: joins its saved code, finds no crew, and creates it
    again under that code, empty.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from leeloo import messages
from leeloo.messages import CLOSE_OPERATOR
from leeloo.sealing import SealError, is_sealed
from leeloo.store import (
    APPEND, DELETE_DEVICE, PUT_ALIAS, PUT_BOT_USER, PUT_CREW, PUT_DEVICE, PUT_MEMBER, PUT_MULTI_CREW, PUT_TOKEN,
    LogEntry, Snapshot, StoreError, TokenRecord,
)

if TYPE_CHECKING:
    from leeloo.core.crews import Crews
    from leeloo.core.identity import Identity
    from leeloo.core.tokens import PendingTokens
    from leeloo.store import IStore, Journal

_log = Logger()


class Refused(Exception):
    """
    The operator asked for something the relay will not do as things are
    (no such crew, a code taken, a relay that is not empty); the message
    says why.
    """


@dataclass
class Imported:
    """
    A whole state to take up: the records of a L{Snapshot} (its crews,
    members, bot users, devices, tokens, aliases and multi-crew devices)
    and every crew's log entries.
    """

    snapshot: Snapshot
    entries: list[LogEntry] = field(default_factory=list)


class Operator:
    """
    @param restore: takes up a L{Snapshot} in every part of the relay
        (L{leeloo.relay.Relay.restore}).
    """

    def __init__(self, store: IStore, journal: Journal, crews: Crews, identity: Identity,
                 tokens: PendingTokens, restore: Callable[[Snapshot], None]) -> None:
        self.store = store
        self.journal = journal
        self.crews = crews
        self.identity = identity
        self.tokens = tokens
        self._restore = restore

    def _crew(self, code: str):
        crew = self.crews.crews.get(messages.normalize_crew_code(code))
        if crew is None:
            raise Refused(f"no crew {code.strip().upper()}")
        return crew

    def reset_key(self, device_id: str) -> Deferred:
        """
        Forget C{device_id}'s key.  Fires with C{{"device_id", "closed"}}
        (whether its connection was closed) once that is durable.  With
        other nodes, a device this one does not hold is looked up first.
        """
        if device_id not in self.identity.keys and self.crews.fanout.shared:
            d = self.store.find_device(device_id)
            d.addCallback(self.identity.adopt)
            return d.addCallback(lambda _: self._reset_key(device_id))
        return self._reset_key(device_id)

    def _reset_key(self, device_id: str) -> Deferred:
        if device_id not in self.identity.keys:
            raise Refused(f"no device {device_id}")
        del self.identity.keys[device_id]
        d = self.journal.put((DELETE_DEVICE, device_id))
        self.crews.fanout.key_reset(device_id)
        session = self.crews.fanout.connection(device_id)
        if session is not None and not session.closing:
            session.close(CLOSE_OPERATOR, "device key reset by the relay's operator; reconnect")
        _log.info("operator: device {device_id}'s key reset", device_id=device_id)
        return d.addCallback(lambda _: {"device_id": device_id, "closed": session is not None})

    def _looked_up(self, code: str, then: Callable[[], Deferred]) -> Deferred:
        """
        C{then()}, once the crew of C{code} is held here as the store holds
        it: with other nodes, it is read from the store first (they change
        its members).
        """
        normal = messages.normalize_crew_code(code)
        if not self.crews.fanout.shared:
            return then()

        def found(snapshot: Snapshot | None) -> Deferred:
            if snapshot is not None:
                if normal in self.crews.crews:
                    self.crews.refresh(snapshot)
                else:
                    self._restore(snapshot)
            return then()

        return self.store.find_crew(normal).addCallback(found)

    def remove(self, device_id: str, code: str) -> Deferred:
        return self._looked_up(code, lambda: self._remove(device_id, code))

    def _remove(self, device_id: str, code: str) -> Deferred:
        """
        Take C{device_id} out of crew C{code}.  Fires with C{{"device_id",
        "crew_code", "online"}} (whether it was online there).
        """
        crew = self._crew(code)
        member = crew.members.get(device_id)
        if member is None:
            raise Refused(f"{device_id} is not a member of crew {crew.code}")
        membership = self.crews.online(crew).get(device_id)
        if membership is not None:
            # As if it had sent crew_leave.
            self.crews.end(membership)
            membership.session.send(messages.CrewLeft(crew.code))
        else:
            self.crews.remove_member(crew, device_id)
            # Online on another node, it is taken out there.
            self.crews.fanout.member_removed(crew.code, device_id)
        d = self.journal.barrier()
        _log.info("operator: device {device_id} removed from crew {crew_code}", device_id=device_id,
                  crew_code=crew.code)
        return d.addCallback(lambda _: {"device_id": device_id, "crew_code": crew.code,
                                        "online": membership is not None})

    def rename_crew(self, old: str, new: str) -> Deferred:
        return self._looked_up(old, lambda: self._rename_crew(old, new))

    def _rename_crew(self, old: str, new: str) -> Deferred:
        """
        Give crew C{old} the code C{new}.  Fires with C{{"old_crew_code",
        "crew_code", "online"}} (its members online, told) once durable.
        """
        crew = self._crew(old)
        code = messages.normalize_crew_code(new)
        if code == crew.code:
            raise Refused(f"crew {code} has that code already")
        if code in self.crews.crews:
            raise Refused(f"crew {code} exists already: choose another code")
        renamed = self.crews.aliases.get(code)
        if renamed is not None and renamed != crew.code:
            raise Refused(f"{code} is the old code of crew {renamed}, whose members' devices may still use it: "
                          "choose another code")
        old_code = crew.code
        self.crews.rename(crew, code)
        told = messages.CrewRenamed(code, old_code)
        online = list(self.crews.online(crew).values())
        for membership in online:
            membership.session.send(told)
        d = self.journal.barrier()
        return d.addCallback(lambda _: {"old_crew_code": old_code, "crew_code": code, "online": len(online)})

    def delete_crew(self, code: str) -> Deferred:
        return self._looked_up(code, lambda: self._delete_crew(code))

    def _delete_crew(self, code: str) -> Deferred:
        """
        Delete crew C{code} with its members, bot users and log.  Fires
        with C{{"crew_code", "online", "closed"}} (members online, and the
        connections closed as they were left in no crew) once durable.
        """
        crew = self._crew(code)
        online = list(self.crews.online(crew).values())
        told = messages.CrewDeleted(crew.code)
        closed = 0
        for membership in online:
            session = membership.session
            self.crews.leave_crew(membership, announce=False)
            session.send(told)
            if not session.memberships() and not session.closing:
                closed += 1
                session.close(CLOSE_OPERATOR, "crew deleted by the relay's operator; reconnect")
        self.crews.forget(crew)
        _log.info("operator: crew {crew_code} deleted", crew_code=crew.code)
        return self.journal.barrier().addCallback(
            lambda _: {"crew_code": crew.code, "online": len(online), "closed": closed})

    @property
    def empty(self) -> bool:
        """
        Whether the relay holds no crew, no device and no parked token.
        """
        return not (self.crews.crews or self.identity.keys or self.tokens.pending)

    def import_state(self, state: Imported) -> Deferred:
        """
        Take up C{state} in an empty relay, in one store transaction.
        Fires with the counts imported.
        """
        if not self.empty:
            raise Refused("the relay is not empty: import only into a relay that holds no crew, "
                          "device or token (a new data directory)")
        # Behind what the journal is committing, so that the store and the
        # cache take the state up at the same point.
        return self.journal.barrier().addCallback(lambda _: self._import_now(state))

    def _import_now(self, state: Imported) -> Deferred:
        if not self.empty:
            raise Refused("the relay is no longer empty: a device came meanwhile; import into a relay "
                          "no device reaches yet")
        snapshot = state.snapshot
        sealer = self.tokens.sealer
        sealed = []
        for t in snapshot.tokens:
            if is_sealed(t.tokens):
                try:
                    sealer.open_tokens(t.tokens)
                except SealError:
                    raise Refused("the state's Spotify tokens were encrypted with another secrets key: copy that "
                                  "secrets.key here (or pass --secrets-key-file) and import again") from None
                sealed.append(t)
            else:
                # An export of a release before encryption: sealed now, never kept in the clear.
                sealed.append(TokenRecord(t.device_id, sealer.seal_tokens(t.tokens), t.expires_at))
        snapshot.tokens = sealed
        ops = _import_ops(state)
        for e in state.entries:
            snapshot.last_seq[e.crew_code] = max(snapshot.last_seq.get(e.crew_code, 0), e.seq)
            snapshot.last_message_at[e.crew_code] = max(snapshot.last_message_at.get(e.crew_code, 0.0),
                                                         e.created_at)
            snapshot.log_bytes[e.crew_code] = snapshot.log_bytes.get(e.crew_code, 0) + len(e.payload)
            if e.client_msg_id is not None:
                snapshot.client_messages.append(LogEntry(e.crew_code, e.seq, e.id, e.sender, e.client_msg_id,
                                                         e.digest, e.created_at, b"", e.ephemeral))
        for code, seq in snapshot.last_seq.items():
            self.store.sequences.seen(code, seq)
        self._restore(snapshot)
        d = self.store.write(ops)
        counts = {"crews": len(snapshot.crews), "members": len(snapshot.members),
                  "bot_users": len(snapshot.bot_users), "devices": len(snapshot.devices),
                  "tokens": len(snapshot.tokens), "messages": len(state.entries)}
        d.addCallbacks(lambda _: counts, self._not_imported, errbackArgs=(snapshot,))
        _log.info("operator: importing {crews} crews, {devices} devices, {messages} messages", **counts)
        return d

    def _not_imported(self, failure: Any, snapshot: Snapshot) -> None:
        # Forget what the store did not take, so that cache and store agree.
        for crew in snapshot.crews:
            self.crews.crews.pop(crew.code, None)
            self.store.sequences.forget(crew.code)
        for device in snapshot.devices:
            self.identity.keys.pop(device.device_id, None)
        for token in snapshot.tokens:
            self.tokens.pending.pop(token.device_id, None)
        for alias in snapshot.aliases:
            self.crews.aliases.pop(alias, None)
        for b in snapshot.bot_users:
            self.crews.bot_user_index.pop(b.user_id, None)
        for r in snapshot.multi_crew:
            self.crews.multi.pop(r.device_id, None)
        failure.trap(StoreError)
        _log.error("operator: the import was not stored: {error}", error=failure.getErrorMessage())
        raise Refused(f"the store did not take the import ({failure.getErrorMessage()}); nothing was imported")


def _import_ops(state: Imported) -> list:
    s = state.snapshot
    ops: list = [(PUT_CREW, c) for c in s.crews]
    ops += [(PUT_DEVICE, d) for d in s.devices]
    ops += [(PUT_MEMBER, m) for m in s.members]
    ops += [(PUT_BOT_USER, b) for b in s.bot_users]
    ops += [(APPEND, e) for e in state.entries]
    ops += [(PUT_TOKEN, t) for t in s.tokens]
    ops += [(PUT_ALIAS, alias) for alias in s.aliases.items()]
    ops += [(PUT_MULTI_CREW, r) for r in s.multi_crew]
    return ops
