"""
Crews, their members, and memberships.

A L{Member} is a device that belongs to a crew, online or not, and how far
it got (what the store keeps).  A L{Membership} is one connection in one
crew while it is there: it holds that connection's delivery position in the
crew, so a session can hold several.  The memberships online listen to
their crew through the fan-out (L{leeloo.fanout.IFanout}): who is online in
a crew is the fan-out's to say, wherever they are connected.
"""

from __future__ import annotations

import functools
import itertools
import secrets
from typing import TYPE_CHECKING, Any, Callable, Mapping

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from leeloo import messages
from leeloo.core.defaults import CODE_TRIES, MAX_GENERATED_CODE_LENGTH
from leeloo.messages import CrewLimit, InvalidCrewCode, InvalidLastSeq, NotInCrew, StoreUnavailable
from leeloo.store import (
    StoreError,
    DELETE_CREW,
    DELETE_MEMBER,
    DELETE_MULTI_CREW,
    PUT_BOT_USER,
    PUT_CREW,
    PUT_MEMBER,
    PUT_MULTI_CREW,
    RENAME_CREW,
    BotUserRecord,
    CrewRecord,
    Journal,
    MemberRecord,
    MultiCrewRecord,
    Snapshot,
)

if TYPE_CHECKING:
    from leeloo.core.peer import Outgoing
    from leeloo.fanout import IFanout
    from leeloo.core.delivery import ClientMessage
    from leeloo.core.presence import Presence
    from leeloo.core.sessions import Session

_log = Logger()


def generate_crew_code(length: int = 4, choice: Callable[[str], str] = secrets.choice) -> str:
    return messages.CREW_CODE_PREFIX + "".join(
        choice(messages.CREW_CODE_ALPHABET) for _ in range(length)
    )


class Member:
    """
    A device that belongs to a crew, online or not, and how far it got.
    """

    __slots__ = ("device_id", "name", "last_seen", "delivered_seq", "acked_seq")

    def __init__(self, device_id: str, name: str, last_seen: float, delivered_seq: int,
                 acked_seq: int | None = None) -> None:
        self.device_id = device_id
        self.name = name
        self.last_seen = last_seen
        self.delivered_seq = delivered_seq
        self.acked_seq = acked_seq


class Membership:
    """
    One session in one crew: the highest crew sequence it has been sent
    (C{last_sent_seq}) and how far its device is known to have received
    (C{proven_seq}: its transport proved it).  While C{held} is a list, it
    is catching up on what it missed and live fan-outs wait there.
    C{joined} orders a session's memberships by when they began.
    """

    __slots__ = ("session", "peer", "crew", "member", "last_sent_seq", "proven_seq", "held", "joined")
    _joined = itertools.count()

    def __init__(self, session: Session, crew: Crew, member: Member, start: int) -> None:
        self.session = session
        self.peer = session.peer
        self.crew = crew
        self.member = member
        self.last_sent_seq = self.proven_seq = start
        self.held: list[tuple[int, Outgoing | None]] | None = None
        self.joined = next(Membership._joined)

    def __repr__(self) -> str:
        return f"<Membership {self.member.device_id!r} in {self.crew.code!r} at {self.last_sent_seq}>"


class Crew:
    """
    A crew: its name (what C{create_crew} called it, or C{None}), its
    members (by device id), its bot users, and the last sequence number
    stored and delivered, C{fanned_seq} (the store mints them:
    L{leeloo.store.Sequences}).
    """

    __slots__ = ("code", "created_at", "created_by", "name", "members", "bot_users",
                 "fanned_seq", "last_message_at", "client_messages", "log_bytes", "trimming")

    def __init__(self, code: str, created_at: float, created_by: str | None, name: str | None = None) -> None:
        self.code = code
        self.created_at = created_at
        self.created_by = created_by
        self.name = name
        self.members: dict[str, Member] = {}
        self.bot_users: dict[str, str] = {}
        self.fanned_seq = 0
        self.last_message_at = 0.0
        self.client_messages: dict[tuple[str, str], ClientMessage] | None = None
        # The bytes in its stored log (an estimate, never too low), and
        # while the log is being trimmed, the bytes stored since.
        self.log_bytes = 0
        self.trimming: int | None = None


class Crews:
    """
    Every crew (C{crews}: code -> L{Crew}), and which crews each bot user
    is in (C{bot_user_index}); their members online are C{fanout}'s
    listeners.

    @param code_length: the characters after the prefix of a generated code.
    @param crew_code: makes a random crew code of a given length.
    """

    def __init__(self, clock: Any, journal: Journal, fanout: IFanout, code_length: int,
                 crew_code: Callable[[int], str] = generate_crew_code) -> None:
        self.clock = clock
        self.journal = journal
        self.fanout = fanout
        self.code_length = code_length
        self._new_crew_code = crew_code
        self.crews: dict[str, Crew] = {}
        # telegram user id -> the codes of the crews it is in (in join order)
        self.bot_user_index: dict[str, dict[str, None]] = {}
        self.presence: Presence | None = None
        # Multi-crew devices (they sent crew_add): device id -> its crews
        # and primary, as the store keeps them.  A device not here is a
        # legacy one (every deployed device).
        self.multi: dict[str, MultiCrewRecord] = {}
        # The codes crews were renamed from: old code -> the crew's code now.
        self.aliases: dict[str, str] = {}
        # Crews renamed whose rename is not yet durable: code -> what waits
        # for their log to have moved (replays).
        self.moving: dict[str, list[Deferred]] = {}

    def restore(self, snapshot: Snapshot) -> None:
        self.aliases.update(snapshot.aliases)
        for multi in snapshot.multi_crew:
            self.multi[multi.device_id] = multi
        for record in snapshot.crews:
            crew = self.crews[record.code] = Crew(record.code, record.created_at, record.created_by, record.name)
            crew.fanned_seq = snapshot.last_seq.get(record.code, 0)
            crew.last_message_at = snapshot.last_message_at.get(record.code, 0.0)
            crew.log_bytes = snapshot.log_bytes.get(record.code, 0)
        for m in snapshot.members:
            crew = self.crews.get(m.crew_code)
            if crew is not None:
                crew.members[m.device_id] = Member(m.device_id, m.name, m.last_seen, m.delivered_seq,
                                                   m.acked_seq)
        for b in snapshot.bot_users:
            if b.crew_code in self.crews:
                self.crews[b.crew_code].bot_users[b.user_id] = b.name
                self.bot_user_index.setdefault(b.user_id, {})[b.crew_code] = None

    def online(self, crew: Crew) -> Mapping[str, Membership]:
        """
        C{crew}'s members online: device id -> membership.
        """
        return self.fanout.listeners(crew.code)

    def online_count(self, crew: Crew) -> int:
        """
        How many of C{crew}'s members are online, on any node.
        """
        listeners = self.fanout.listeners(crew.code)
        elsewhere = self.fanout.elsewhere(crew.code)
        if not elsewhere:
            return len(listeners)
        return len(listeners) + sum(1 for device_id in elsewhere if device_id not in listeners)

    def online_names(self, crew: Crew, but: Session | None = None) -> list[str]:
        """
        The names of C{crew}'s members online on any node (but session
        C{but}'s).
        """
        listeners = self.fanout.listeners(crew.code)
        names = [m.session.name for m in listeners.values() if m.session is not but]
        skip = but.device_id if but is not None else None
        for device_id, (_, name) in self.fanout.elsewhere(crew.code).items():
            if device_id not in listeners and device_id != skip:
                names.append(name)
        return names

    def online_anywhere(self, crew: Crew, device_id: str) -> bool:
        return device_id in self.fanout.listeners(crew.code) or device_id in self.fanout.elsewhere(crew.code)

    def refresh(self, snapshot: Snapshot) -> None:
        """
        Take up what the store holds of crews held here (another node
        changed them): their names, members (how far each got, never
        backwards), bot users and last sequences.
        """
        for record in snapshot.crews:
            crew = self.crews.get(record.code)
            if crew is None:
                continue
            crew.name = record.name
            last = snapshot.last_seq.get(record.code, 0)
            if last > crew.fanned_seq:
                crew.fanned_seq = last
            crew.last_message_at = max(crew.last_message_at, snapshot.last_message_at.get(record.code, 0.0))
        for m in snapshot.members:
            crew = self.crews.get(m.crew_code)
            if crew is None:
                continue
            member = crew.members.get(m.device_id)
            if member is None:
                crew.members[m.device_id] = Member(m.device_id, m.name, m.last_seen, m.delivered_seq, m.acked_seq)
            elif m.device_id not in self.fanout.listeners(crew.code):
                member.delivered_seq = max(member.delivered_seq, m.delivered_seq)
                if m.acked_seq is not None and (member.acked_seq is None or m.acked_seq > member.acked_seq):
                    member.acked_seq = m.acked_seq
                member.last_seen = max(member.last_seen, m.last_seen)
        for b in snapshot.bot_users:
            crew = self.crews.get(b.crew_code)
            if crew is not None:
                crew.bot_users[b.user_id] = b.name
                self.bot_user_index.setdefault(b.user_id, {})[b.crew_code] = None

    def is_current(self, membership: Membership) -> bool:
        """
        Whether C{membership} is still its device's connection in its crew.
        """
        return self.fanout.listeners(membership.crew.code).get(membership.member.device_id) is membership

    def resolve(self, code: str, device_id: str | None, bot_user: str | None = None) -> str:
        """
        The code C{device_id} (or bot user C{bot_user}) means by C{code}:
        for a member of a crew that was renamed from C{code}, the crew's
        code now (its device keeps the old one until a reply tells it the
        new); else C{code} itself.
        """
        target = self.aliases.get(code)
        if target is not None:
            crew = self.crews.get(target)
            if crew is not None and ((device_id is not None and device_id in crew.members)
                                     or (bot_user is not None and bot_user in crew.bot_users)):
                return target
        return code

    def rename(self, crew: Crew, new: str) -> None:
        """
        Give C{crew} the code C{new} (no crew has it), its members online
        with it; the old code becomes an alias (see L{resolve}).  The
        store's sequences move when the rename's batch forms, after every
        message numbered under the old code before it.
        """
        old = crew.code
        self._renamed(crew, new)
        self.journal.put((RENAME_CREW, functools.partial(self._move_sequences, old, new)), wait=False)
        self.moving.setdefault(new, [])
        self.journal.barrier().addBoth(self._moved, new)
        self.fanout.renamed(old, new)
        _log.info("crew {crew_code} renamed {new_code}", crew_code=old, new_code=new)

    def renamed_elsewhere(self, crew: Crew, new: str) -> None:
        """
        Another node renamed C{crew} to C{new} (the store has it so): the
        same here, without storing it again.
        """
        old = crew.code
        self._renamed(crew, new)
        self._move_sequences(old, new)
        _log.info("crew {crew_code} renamed {new_code} on another node", crew_code=old, new_code=new)

    def _renamed(self, crew: Crew, new: str) -> None:
        old = crew.code
        online = list(self.fanout.listeners(old).items())
        for device_id, membership in online:
            self.fanout.unsubscribe(old, device_id, membership)
        del self.crews[old]
        crew.code = new
        self.crews[new] = crew
        for device_id, membership in online:
            self.fanout.subscribe(new, device_id, membership)
            others = membership.session.others
            if others is not None and others.get(old) is membership:
                others[new] = others.pop(old)
        for record in [r for r in self.multi.values() if old in r.crews or r.primary == old]:
            self._keep(MultiCrewRecord(record.device_id, tuple(new if c == old else c for c in record.crews),
                                       new if record.primary == old else record.primary))
        for table in self.bot_user_index.values():
            if old in table:
                # Keep the order they joined in.
                items = [new if code == old else code for code in table]
                table.clear()
                table.update(dict.fromkeys(items))
        for alias, code in list(self.aliases.items()):
            if code == old:
                self.aliases[alias] = new
        self.aliases.pop(new, None)
        self.aliases[old] = new
        self.presence.renamed(old, new)

    def _moved(self, result: Any, code: str) -> None:
        """
        Crew C{code}'s rename is durable (or failed, and is retried with the
        relay's other state): what waited reads its log now.
        """
        for d in self.moving.pop(code, ()):
            d.callback(None)

    def _move_sequences(self, old: str, new: str) -> tuple[str, str]:
        sequences = self.journal.store.sequences
        last = sequences.last(old)
        if last:
            sequences.seen(new, last)
            sequences.forget(old)
        return old, new

    def get(self, code: str | None) -> Crew | None:
        return self.crews.get(code) if code is not None else None

    def known(self, code: str) -> Crew:
        """
        The crew of C{code} as a person typed it.

        @raise InvalidCrewCode: there is none.
        """
        crew = self.crews.get(messages.normalize_crew_code(code))
        if crew is None:
            raise InvalidCrewCode(f"Crew {code.strip().upper()} not found")
        return crew

    def create(self, code: str, created_by: str | None, name: str | None = None) -> Crew:
        crew = self.crews[code] = Crew(code, self.clock.seconds(), created_by, name)
        self.journal.put((PUT_CREW, CrewRecord(code, crew.created_at, created_by, name)), wait=False)
        self.fanout.changed(code)
        _log.info("crew {crew_code} created", crew_code=code)
        return crew

    def unused_code(self) -> str:
        """
        A random code no crew has: a few tries at the configured length,
        then one character longer, and so on.

        @raise CrewLimit: not even the longest codes found a free one.
        """
        for length in range(self.code_length, MAX_GENERATED_CODE_LENGTH + 1):
            for _ in range(CODE_TRIES):
                code = self._new_crew_code(length)
                if code not in self.crews:
                    return code
        _log.error("no unused crew code found after {tries} tries up to {length} characters",
                   tries=CODE_TRIES, length=MAX_GENERATED_CODE_LENGTH)
        raise CrewLimit("the relay cannot create more crews now; try again later")

    def reserve_code(self) -> Deferred:
        """
        Fires with a random code no crew has on any node, reserved in the
        shared store for this node to create (L{unused_code} knows only
        the crews held here).
        """
        tries = [0]

        def attempt() -> Deferred:
            code = self.unused_code()
            return self.fanout.reserve(code).addCallback(reserved, code)

        def reserved(ok: bool, code: str) -> Any:
            if ok:
                return code
            tries[0] += 1
            if tries[0] >= CODE_TRIES:
                raise CrewLimit("the relay cannot create more crews now; try again later")
            return attempt()

        def failed(failure: Any) -> None:
            failure.trap(StoreError)
            _log.error("could not reserve a crew code: {error}", error=failure.getErrorMessage())
            raise StoreUnavailable("the crew could not be stored; try again")

        return attempt().addErrback(failed)

    @staticmethod
    def check_last_seq(crew: Crew | None, last_seq: int | None) -> None:
        latest = crew.fanned_seq if crew is not None else 0
        if last_seq is not None and last_seq > latest:
            raise InvalidLastSeq(f"last_seq {last_seq} is from the future: the crew is at {latest}")

    def save_member(self, crew: Crew, member: Member, online: bool) -> None:
        record = MemberRecord(crew.code, member.device_id, member.name, member.last_seen,
                              member.delivered_seq, member.acked_seq, online)
        self.journal.put((PUT_MEMBER, record), key=(crew.code, member.device_id))

    def enter(self, session: Session, crew: Crew, announce: bool, last_seq: int | None = None) -> Membership | None:
        """
        Make C{session} a member of C{crew} online; return its new
        membership, or C{None} if it is already there.  A single-crew
        session (every deployed device: C{session.multi} false) moves: it
        leaves the crew it was in, and this one is its primary; a
        multi-crew one keeps its crews, and this one is its primary only if
        it had none.  Where it starts: C{last_seq} if given, else its
        acknowledged position, else what it was proven to receive (a new
        member starts at the crew's latest).  Its crew hears it joined when
        C{announce}, or when it comes back within the presence grace, those
        who came since.
        """
        if session.membership(crew.code) is not None:
            return None
        if not session.multi:
            self.leave(session, announce=True)
        now = self.clock.seconds()
        member = crew.members.get(session.device_id)
        if member is None:
            start = crew.fanned_seq if last_seq is None else last_seq
            member = crew.members[session.device_id] = Member(session.device_id, session.name, now, start)
        elif last_seq is not None:
            start = last_seq
        elif member.acked_seq is not None:
            start = member.acked_seq
        else:
            start = member.delivered_seq
        member.name = session.name
        member.last_seen = now
        if last_seq is not None or member.acked_seq is not None:
            session.acks = True
        membership = Membership(session, crew, member, start)
        if session.primary is None:
            session.primary = membership
        else:
            if session.others is None:
                session.others = {}
            session.others[crew.code] = membership
        if session.multi:
            self._joined(session.device_id, crew.code)
        self.fanout.subscribe(crew.code, session.device_id, membership)
        self.save_member(crew, member, online=True)
        self.presence.entered(membership, announce)
        return membership

    def leave(self, session: Session, announce: bool) -> None:
        """
        Take C{session} out of every crew it is in, keeping how far it got;
        each crew hears it went offline when C{announce}.
        """
        for membership in session.memberships():
            self.leave_crew(membership, announce)

    def end(self, membership: Membership) -> None:
        """
        End C{membership} for good (C{crew_leave}): its crew hears the
        device went offline, and the device is no longer a member there
        (its member row is deleted), so nothing of the crew is replayed to
        it again, also after a restart: added again, it starts at the
        crew's latest.
        """
        session, crew, member = membership.session, membership.crew, membership.member
        self.leave_crew(membership, announce=True)
        if crew.members.get(member.device_id) is member:
            del crew.members[member.device_id]
        self.journal.put((DELETE_MEMBER, (crew.code, member.device_id)), key=(crew.code, member.device_id))
        record = self.multi.get(session.device_id)
        if record is not None and crew.code in record.crews:
            crews = tuple(c for c in record.crews if c != crew.code)
            primary = record.primary
            if primary == crew.code:
                primary = session.primary.crew.code if session.primary is not None else next(iter(crews), None)
            self._keep(MultiCrewRecord(session.device_id, crews, primary))

    def make_primary(self, session: Session, membership: Membership) -> None:
        """
        Make C{membership} C{session}'s primary crew (the others keep the
        order they were joined in).
        """
        if session.primary is not membership:
            held = sorted(session.memberships(), key=lambda m: m.joined)
            session.primary = membership
            session.others = {m.crew.code: m for m in held if m is not membership} or None
        record = self.multi.get(session.device_id)
        if session.multi and record is not None:
            self._keep(MultiCrewRecord(session.device_id, record.crews, membership.crew.code))

    def become_multi(self, session: Session) -> None:
        """
        C{session}'s device is multi-crew from now on (it sent
        C{crew_add}), and stored so: entering a crew adds one, and entering
        on a new connection (L{held_crews}) it re-enters every crew it is
        in, also after a restart.  Its crews start as those it holds now.
        """
        session.multi = True
        if session.device_id not in self.multi:
            held = sorted(session.memberships(), key=lambda m: m.joined)
            primary = session.primary.crew.code if session.primary is not None else None
            self._keep(MultiCrewRecord(session.device_id, tuple(m.crew.code for m in held), primary))

    def _joined(self, device_id: str, code: str) -> None:
        """
        Multi-crew device C{device_id} is in crew C{code}: the last joined
        (nothing changes when it is back in a crew it was in), its primary
        if it had none.
        """
        record = self.multi.get(device_id)
        if record is None:
            record = MultiCrewRecord(device_id, (), None)
        elif code in record.crews and record.primary is not None:
            return
        crews = record.crews if code in record.crews else record.crews + (code,)
        self._keep(MultiCrewRecord(device_id, crews, record.primary or code))

    def remove_member(self, crew: Crew, device_id: str) -> None:
        """
        C{device_id}, offline, is a member of C{crew} no more (its member
        row is deleted, as L{end} does for one online).
        """
        del crew.members[device_id]
        self.journal.put((DELETE_MEMBER, (crew.code, device_id)), key=(crew.code, device_id))
        record = self.multi.get(device_id)
        if record is not None and crew.code in record.crews:
            crews = tuple(c for c in record.crews if c != crew.code)
            primary = record.primary if record.primary != crew.code else next(iter(crews), None)
            self._keep(MultiCrewRecord(device_id, crews, primary))

    def _keep(self, record: MultiCrewRecord) -> None:
        """
        Hold and store C{record}, if it changed anything.
        """
        if self.multi.get(record.device_id) != record:
            self.multi[record.device_id] = record
            self.journal.put((PUT_MULTI_CREW, record), key=(PUT_MULTI_CREW, record.device_id))

    def held_crews(self, device_id: str) -> list[Crew] | None:
        """
        The crews a multi-crew device is in, in the order it joined them;
        C{None} for a legacy device (it never sent C{crew_add}).
        """
        record = self.multi.get(device_id)
        if record is None:
            return None
        crews = self.crews
        return [crews[code] for code in record.crews if code in crews]

    def restore_primary(self, session: Session) -> None:
        """
        Make the primary crew of C{session}'s multi-crew device its
        session's primary again (it came back to its crews).
        """
        record = self.multi.get(session.device_id)
        if record is None:
            return
        membership = session.membership(record.primary) if record.primary is not None else None
        if membership is not None:
            if session.primary is not membership:
                self.make_primary(session, membership)
        elif session.primary is not None:
            # Its primary crew is gone: the earliest joined of the rest is.
            self._keep(MultiCrewRecord(record.device_id, record.crews, session.primary.crew.code))

    def forget_device(self, device_id: str) -> None:
        """
        Forget that C{device_id} is multi-crew (its id is forgotten).
        """
        if self.multi.pop(device_id, None) is not None:
            self.journal.put((DELETE_MULTI_CREW, device_id), key=(PUT_MULTI_CREW, device_id))

    def membership_of(self, session: Session, code: str) -> Membership | None:
        """
        C{session}'s membership of the crew of C{code}, also when C{code} is
        a code its crew was renamed from (a client that has not yet taken
        the new one up); C{None} if it is not in it.
        """
        membership = session.membership(code)
        if membership is None and self.aliases:
            resolved = self.resolve(code, session.device_id)
            if resolved != code:
                membership = session.membership(resolved)
        return membership

    def held(self, session: Session, code: str) -> Membership:
        """
        C{session}'s membership of the crew of C{code}.

        @raise NotInCrew: it is not in it.
        """
        membership = self.membership_of(session, code)
        if membership is None:
            raise NotInCrew(f"this device is not in crew {code}")
        return membership

    def leave_crew(self, membership: Membership, announce: bool, save: bool = True) -> None:
        """
        Take C{membership}'s session out of its crew, keeping how far it
        got; the crew hears it went offline when C{announce}.  Leaving the
        primary crew makes the earliest-joined remaining one primary.
        """
        session, crew = membership.session, membership.crew
        if session.primary is membership:
            others = session.others
            if others:
                first = min(others.values(), key=lambda m: m.joined)
                del others[first.crew.code]
                session.primary = first
                if not others:
                    session.others = None
            else:
                session.primary = None
        elif session.others and session.others.get(crew.code) is membership:
            del session.others[crew.code]
            if not session.others:
                session.others = None
        else:
            return
        membership.held = None
        if self.fanout.unsubscribe(crew.code, session.device_id, membership):
            member = membership.member
            # A legacy device never acknowledges: only what its transport
            # proved it received counts as delivered.
            sent = membership.last_sent_seq if session.acks else membership.proven_seq
            member.delivered_seq = max(member.delivered_seq, sent)
            member.last_seen = self.clock.seconds()
            if save:
                self.save_member(crew, member, online=False)
            if announce:
                self.presence.left(membership)

    def add_bot_user(self, crew: Crew, user_id: str, name: str) -> None:
        crew.bot_users[user_id] = name
        self.bot_user_index.setdefault(user_id, {})[crew.code] = None
        self.journal.put((PUT_BOT_USER, BotUserRecord(crew.code, user_id, name)), wait=False)
        self.fanout.changed(crew.code)

    def forget(self, crew: Crew, stored: bool = False) -> None:
        """
        Forget C{crew} (it has no one online); C{stored}: the store has
        forgotten it already (another node deleted it).
        """
        del self.crews[crew.code]
        if stored:
            self._forget_sequence(crew.code)
        else:
            # A crew made again under this code starts its log afresh: its
            # sequence is forgotten when the deletion's batch forms, after the
            # messages numbered before it.
            self.journal.put((DELETE_CREW, functools.partial(self._forget_sequence, crew.code)), wait=False)
            self.fanout.changed(crew.code)
        for alias in [a for a, code in self.aliases.items() if code == crew.code]:
            del self.aliases[alias]
        # No multi-crew device comes back to another crew made under its code.
        for record in [r for r in self.multi.values() if crew.code in r.crews]:
            crews = tuple(c for c in record.crews if c != crew.code)
            primary = record.primary if record.primary != crew.code else next(iter(crews), None)
            self._keep(MultiCrewRecord(record.device_id, crews, primary))
        for user_id in crew.bot_users:
            codes = self.bot_user_index.get(user_id)
            if codes is not None:
                codes.pop(crew.code, None)
                if not codes:
                    del self.bot_user_index[user_id]

    def _forget_sequence(self, code: str) -> str:
        self.journal.store.sequences.forget(code)
        return code
