"""
A returning member's way back: what it missed, read from the crew's log,
then live traffic (held meanwhile); and how far each device got, from its
acks or, for a legacy device that never acknowledges, from proofs of
receipt its transport gives.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from leeloo import messages
from leeloo.core.peer import Outgoing
from leeloo.messages import InvalidAck, NotInCrew, StoreUnavailable
from leeloo.store import IStore, Replay

if TYPE_CHECKING:
    from leeloo.core.crews import Crews, Membership
    from leeloo.core.sessions import Session, Sessions

_log = Logger()


class Replayer:
    """
    @param replay_limit: the most missed messages replayed to a device.
    @param retention: seconds a logged message is kept and replayed.
    @param legacy_replay_age: seconds within which a missed message is
        replayed to a legacy device (one that has never sent C{ack} or
        C{last_seq}, and takes every frame for a new one).
    @param ephemeral_age: the same for nudges and reactions.
    """

    def __init__(self, clock: Any, store: IStore, crews: Crews, sessions: Sessions, replay_limit: int,
                 retention: float, legacy_replay_age: float, ephemeral_age: float) -> None:
        self.clock = clock
        self.store = store
        self.crews = crews
        self.sessions = sessions
        self.replay_limit = replay_limit
        self.retention = retention
        self.legacy_replay_age = legacy_replay_age
        self.ephemeral_age = ephemeral_age
        # Messages sent from crews' logs to returning devices.
        self.replayed = 0

    def catch_up(self, membership: Membership) -> None:
        """
        Send C{membership} what it missed since its start, if anything; live
        traffic waits until then.  A legacy device (C{session.acks} false)
        gets only messages younger than C{legacy_replay_age}, and nudges and
        reactions younger than C{ephemeral_age}; then the replay limit cuts.
        """
        crew, session = membership.crew, membership.session
        start = membership.last_sent_seq
        if start >= crew.fanned_seq:
            return
        membership.held = []
        up_to = crew.fanned_seq
        now = self.clock.seconds()
        since = ephemeral_since = now - self.retention
        if not session.acks:
            since = max(since, now - self.legacy_replay_age)
            ephemeral_since = max(since, now - self.ephemeral_age)
        args = (crew.code, start, up_to, since, session.device_id, self.replay_limit, ephemeral_since)
        moving = self.crews.moving.get(crew.code)
        if moving is None:
            d = self.store.replay(*args)
        else:
            # The crew was just renamed: its log is read once it has moved.
            d = Deferred()
            moving.append(d)
            d.addCallback(lambda _: self.store.replay(*args))
        d.addCallbacks(self._replayed, self._replay_failed,
                       callbackArgs=(membership, up_to), errbackArgs=(membership, up_to))
        d.addErrback(self._replay_bug, membership)

    def _replayed(self, replay: Replay, membership: Membership, up_to: int) -> None:
        session = membership.session
        if session.membership(membership.crew.code) is not membership:
            membership.held = None
            return
        if replay.lost is not None and session.acks:
            session.send(messages.ReplayTruncated(*replay.lost, crew_code=membership.crew.code))
        code = membership.crew.code
        for seq, payload in replay.entries:
            membership.peer.send(Outgoing(None, messages.replayed(payload, code)))
        self.replayed += len(replay.entries)
        self._release(membership, up_to)

    def _replay_failed(self, failure: Any, membership: Membership, up_to: int) -> None:
        session, crew = membership.session, membership.crew
        _log.error("could not read crew {crew_code}'s log for a returning device: {error}",
                   crew_code=crew.code, error=failure.getErrorMessage())
        if session.membership(crew.code) is membership:
            session.send(StoreUnavailable("missed messages could not be read; reconnect to try again").as_frame())
            self._release(membership, up_to)

    def _replay_bug(self, failure: Any, membership: Membership) -> None:
        """
        A bug while sending a replay: the device cannot know what it
        missed, so live traffic is no longer held for it and it is closed
        with 1011 (it reconnects, and is replayed from what it was proven
        to get).
        """
        session = membership.session
        _log.failure("bug while replaying a crew's log to {device_id}", failure, device_id=session.device_id)
        membership.held = None
        self.sessions.close_for_bug(session)

    @staticmethod
    def _release(membership: Membership, up_to: int) -> None:
        held, membership.held = membership.held or [], None
        membership.last_sent_seq = max(membership.last_sent_seq, up_to)
        for seq, out in held:
            if out is not None:
                membership.peer.send(out)
            membership.last_sent_seq = max(membership.last_sent_seq, seq)

    @staticmethod
    def delivery_mark(session: Session) -> tuple:
        """
        What C{session} has been sent so far, to pass to L{delivered} once
        the device proves it received everything sent before now (its
        answer to a WebSocket ping sent now, say).
        """
        return tuple((m, m.last_sent_seq) for m in session.memberships())

    def delivered(self, session: Session, mark: tuple) -> None:
        """
        The device of C{session} proved that it received everything sent up
        to C{mark} (from L{delivery_mark}).  For a legacy device, which
        never acknowledges, this proven position is the one the relay keeps
        and resumes it from: frames written into a link that died without a
        close are never counted as delivered.
        """
        for membership, seq in mark:
            if seq <= membership.proven_seq:
                continue
            membership.proven_seq = seq
            if session.acks or not self.crews.is_current(membership):
                continue
            member = membership.member
            if seq > member.delivered_seq:
                member.delivered_seq = seq
                self.crews.save_member(membership.crew, member, online=True)

    def ack(self, session: Session, seq: int, code: str | None = None) -> None:
        """
        C{session}'s device acknowledged everything up to C{seq} in the
        crew of C{code}, or else its primary crew.
        """
        if code is not None:
            membership = self.crews.held(session, code)
        else:
            membership = session.primary
        if membership is None:
            raise NotInCrew("join or create a crew before sending crew messages")
        if seq > membership.last_sent_seq:
            raise InvalidAck(
                f"ack for seq {seq}, but the last message sent to you is {membership.last_sent_seq}")
        session.acks = True
        crew = membership.crew
        member = crew.members[session.device_id]
        if member.acked_seq is None or seq > member.acked_seq:
            member.acked_seq = seq
            self.crews.save_member(crew, member, online=True)
