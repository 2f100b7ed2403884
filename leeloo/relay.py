"""
The relay: every crew and every connection of one relay process, put
together from the parts in L{leeloo.core}.

L{Relay} is what the WebSocket adapter, the web layer and the tests drive
with method calls.  It only dispatches: a frame is counted against its
sender's rate, decoded and handed to its handler, and a refusal becomes an
C{error} frame; everything else is done by the part named for it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from leeloo import messages
from leeloo.core.admission import Admission
from leeloo.core.bot import BotCrew, BotUsers, CrewStatus
from leeloo.core.crews import Crew, Crews, Member, Membership, generate_crew_code
from leeloo.core.defaults import (
    BIND_TIMEOUT,
    CODE_TRIES,
    CREW_LOG_BYTES,
    DAY,
    EPHEMERAL_AGE,
    MAX_GENERATED_CODE_LENGTH,
    PRESENCE_GRACE,
    STORE_QUEUE_BYTES,
    TELEGRAM_DEVICE_ID,
    TOKEN_TTL,
    MiB,
)
from leeloo.core.delivery import ClientMessage, Delivery, client_digest, generate_message_id
from leeloo.core.grants import Grants
from leeloo.core.handlers import Handlers
from leeloo.core.identity import Identity, generate_device_id, generate_device_key, key_hash
from leeloo.core.operator import Operator
from leeloo.core.pairing import Pairings, PairingSettings
from leeloo.core.peer import IPeer, Outgoing
from leeloo.core.presence import Presence
from leeloo.core.replay import Replayer
from leeloo.core.retention import Retention
from leeloo.core.sessions import Session, Sessions
from leeloo.core.tokens import PendingTokens
from leeloo.fanout import IFanout
from leeloo.fanout.local import LocalFanout
from leeloo.limits import Limiter, RelayLimits
from leeloo.messages import (
    CLOSE_ABUSE,
    CLOSE_BIND_TIMEOUT,
    CLOSE_GOING_AWAY,
    CLOSE_INTERNAL_ERROR,
    CLOSE_REPLACED,
    BinaryNotSupported,
    ProtocolError,
    RateLimited,
)
from leeloo.figures import HistogramFigures
from leeloo.sealing import Sealer
from leeloo.store import IStore, Journal, JournalStats, MemoryStore, Snapshot

__all__ = [
    "BIND_TIMEOUT", "CLOSE_ABUSE", "CLOSE_BIND_TIMEOUT", "CLOSE_GOING_AWAY", "CLOSE_INTERNAL_ERROR",
    "CLOSE_REPLACED", "CODE_TRIES", "CREW_LOG_BYTES", "DAY", "EPHEMERAL_AGE", "MAX_GENERATED_CODE_LENGTH",
    "PRESENCE_GRACE", "STORE_QUEUE_BYTES", "TELEGRAM_DEVICE_ID", "TOKEN_TTL", "MiB",
    "BotCrew", "ClientMessage", "Crew", "CrewStatus", "IPeer", "Member", "Membership", "Outgoing",
    "Relay", "Session", "Stats", "client_digest", "generate_crew_code", "generate_device_id",
    "generate_device_key", "generate_message_id", "key_hash",
]

_log = Logger()


@dataclass(frozen=True, slots=True)
class Stats:
    """
    The relay's figures now: devices connected, crews known, crews with a
    member connected, connections open, Spotify tokens parked, and seconds
    since it started; and since it started, crew messages received by
    kind, deliveries, the sampled fan-out times (L{DeliveryStats}),
    messages replayed from crews' logs, and the store journal's figures
    (L{JournalStats}).
    """

    devices: int
    crews: int
    crews_online: int
    sessions: int
    pending_tokens: int
    uptime: float
    messages_received: dict[str, int]
    deliveries: int
    fanout_seconds: HistogramFigures
    replayed: int
    store: JournalStats


class Relay:
    """
    Every crew and every connection of one relay.

    @param clock: an object with C{seconds()} and C{callLater()}, e.g. the
        reactor or a L{twisted.internet.task.Clock}.
    @param store: where state is kept (default: in memory).
    @param token_ttl: seconds Spotify tokens wait for an offline device.
    @param replay_limit: the most missed messages replayed to a device.
    @param retention: seconds a logged message is kept and replayed.
    @param crew_ttl: seconds after which a crew with no message and no
        member seen is forgotten.
    @param legacy_replay_age: seconds within which a missed message is
        replayed to a legacy device (one that has never sent C{ack} or
        C{last_seq}, and takes every frame for a new one).
    @param ephemeral_age: the same for nudges and reactions.
    @param bind_timeout: seconds a connection may stay without binding a
        device (no successful register, create_crew or join_crew) before
        it is closed with L{CLOSE_BIND_TIMEOUT}; 0 never.
    @param crew_log_bytes: the most bytes of messages kept in one crew's
        log; past it, the oldest go (down to three quarters of it), but
        never the newest C{replay_limit}.
    @param store_queue_bytes: the most bytes of messages waiting for the
        store before the relay stops reading from their senders (it reads
        again once half of it is written).
    @param presence_grace: seconds a device's crew hears nothing of it
        leaving; back within them, it hears neither that nor its return.
    @param crew_code: makes a random crew code with the given number of
        characters after the prefix.
    @param fanout: how crews reach their members (default: a
        L{LocalFanout}, this process's).
    @param spotify: the relay's Spotify client (L{leeloo.spotify.SpotifyOAuth}),
        or C{None} without a Spotify app.
    @param pairing: how Spotify pairings work (L{PairingSettings}).
    @param sealer: seals the Spotify tokens the relay keeps
        (L{leeloo.sealing.Sealer}; default: a fresh key, for tests).

    @raise SealError: the store holds sealed tokens this key does not open.
    """

    def __init__(
        self,
        clock: Any,
        store: IStore | None = None,
        token_ttl: float = TOKEN_TTL,
        replay_limit: int = 50,
        retention: float = 7 * DAY,
        crew_ttl: float = 90 * DAY,
        limits: RelayLimits = RelayLimits(),
        legacy_replay_age: float = DAY,
        ephemeral_age: float = EPHEMERAL_AGE,
        bind_timeout: float = BIND_TIMEOUT,
        presence_grace: float = PRESENCE_GRACE,
        crew_log_bytes: int = CREW_LOG_BYTES,
        store_queue_bytes: int = STORE_QUEUE_BYTES,
        crew_code: Callable[[int], str] = generate_crew_code,
        device_id: Callable[[], str] = generate_device_id,
        message_id: Callable[[], str] = generate_message_id,
        device_key: Callable[[], str] = generate_device_key,
        fanout: IFanout | None = None,
        spotify: Any = None,
        pairing: PairingSettings = PairingSettings(),
        sealer: Sealer | None = None,
        budget: Callable[..., Limiter] = Limiter,
    ) -> None:
        self.clock = clock
        # Makes the limiter of a budget by key: budget(clock, rate, name).
        self.budget = budget
        self.store = store if store is not None else MemoryStore()
        self.journal = journal = Journal(self.store, clock, gather=getattr(self.store, "gather_writes", 0.0),
                                         gather_clock=getattr(self.store, "gather_clock", None))
        self.limits = limits
        self.started = clock.seconds()
        self.fanout = fanout = LocalFanout() if fanout is None else fanout
        self.sessions_part = sessions = Sessions(clock, fanout, bind_timeout)
        self.identity = Identity(clock, journal, limits.require_device_key, device_id, device_key)
        self.admission = Admission(clock, limits, budget)
        self.crews_part = crews = Crews(clock, journal, fanout, limits.crew_code_length, crew_code)
        crews.presence = self.presence = Presence(clock, crews, presence_grace)
        self.delivery = Delivery(clock, self.store, journal, crews, replay_limit, crew_log_bytes,
                                 store_queue_bytes, message_id)
        self.replayer = Replayer(clock, self.store, crews, sessions, replay_limit, retention,
                                 legacy_replay_age, ephemeral_age)
        self.sealer = sealer if sealer is not None else Sealer()
        self.tokens = PendingTokens(clock, journal, fanout, token_ttl, self.sealer)
        self.grants = Grants(clock, self.store, journal, self.sealer)
        self.pairing = Pairings(clock, sessions, self.deliver_tokens, self.store.pairings, spotify, pairing)
        self.handlers = Handlers(self.store, journal, sessions, self.identity, self.admission, crews, self.delivery,
                                 self.replayer, self.tokens, self.pairing, self.grants)
        self.bot = BotUsers(journal, crews, self.delivery, self.admission)
        self.retention_part = Retention(clock, self.store, journal, crews, self.identity, sessions, retention,
                                   crew_ttl)
        self.operator = Operator(self.store, journal, crews, self.identity, self.tokens, self.restore)
        self.restore(self.store.load())
        attach = getattr(fanout, "attach", None)
        if attach is not None:
            # A fan-out shared with other nodes acts on the relay's parts
            # (a device another node took, crews changed elsewhere).
            attach(self)

    def restore(self, snapshot: Snapshot) -> None:
        """
        Take up the state a store kept.  Each member resumes from the
        position it was proven to have received (see L{delivered}), also
        when the relay last stopped without saying goodbye: what was sent to
        it but not proven is sent again.
        """
        for grant in snapshot.grants[:1]:
            # One is enough to tell a wrong (or new) key from the right one.
            self.sealer.open(grant.sealed)
        self.crews_part.restore(snapshot)
        self.tokens.restore(snapshot)
        self.pairing.restore(snapshot)
        self.identity.restore(snapshot)
        self.delivery.restore(snapshot)

    # The relay's settings and state, as the adapters and tests read them.

    bind_timeout = property(lambda self: self.sessions_part.bind_timeout)
    presence_grace = property(lambda self: self.presence.grace)
    legacy_replay_age = property(lambda self: self.replayer.legacy_replay_age)
    ephemeral_age = property(lambda self: self.replayer.ephemeral_age)
    replay_limit = property(lambda self: self.replayer.replay_limit)
    crew_log_bytes = property(lambda self: self.delivery.crew_log_bytes)
    store_queue_bytes = property(lambda self: self.delivery.store_queue_bytes)
    token_ttl = property(lambda self: self.tokens.ttl)
    retention = property(lambda self: self.retention_part.retention)
    crew_ttl = property(lambda self: self.retention_part.crew_ttl)
    sessions = property(lambda self: self.sessions_part.sessions, doc="Every open connection's session.")
    devices = property(lambda self: self.fanout.devices, doc="Device id -> its connection's session.")
    crews = property(lambda self: self.crews_part.crews, doc="Crew code -> crew.")
    crews_online = property(lambda self: self.fanout.crews_online, doc="Crews with a member online.")
    bot_user_index = property(lambda self: self.crews_part.bot_user_index)
    device_keys = property(lambda self: self.identity.keys)
    pending_tokens = property(lambda self: self.tokens.pending)
    spotify = property(lambda self: self.pairing.spotify, doc="The relay's Spotify client, or None.")
    paused = property(lambda self: self.delivery.paused)

    def stats(self) -> Stats:
        delivery = self.delivery.stats()
        return Stats(len(self.devices), len(self.crews), self.crews_online, len(self.sessions),
                     len(self.pending_tokens), self.clock.seconds() - self.started,
                     delivery.received, delivery.deliveries, delivery.fanout_seconds,
                     self.replayer.replayed, self.journal.stats())

    # --------------------------------------------------------- connections

    def connect(self, peer: IPeer, address: str | None = None) -> Session:
        """
        A new connection's session; registered all or nothing: if this
        raises, the relay keeps nothing of it.
        """
        return self.sessions_part.connect(peer, address, self.admission.message_bucket())

    def receive(self, session: Session, data: bytes | str) -> None:
        """
        One text frame from C{session}: decode it and act on it.  A peer's
        mistake is answered with an C{error} message; the connection stays,
        unless it keeps being refused.
        """
        if session.closing:
            return
        try:
            self.admission.take_message(session)
        except RateLimited as e:
            self._refused(session, e)
            return
        if session.waiting is not None:
            # An earlier frame waits on a lookup: this one comes after it.
            session.waiting.append(data)
            return
        self._handle(session, data)

    def _handle(self, session: Session, data: bytes | str) -> None:
        try:
            message = messages.decode(data)
            wait = self.handlers.by_type[type(message)](session, message, len(data))
        except ProtocolError as e:
            self._refused(session, e)
            return
        if wait is None:
            session.strikes = 0
            return
        session.waiting = []
        wait.addCallbacks(self._handled, self._not_handled, callbackArgs=(session,), errbackArgs=(session,))
        wait.addCallback(self._next, session)
        wait.addErrback(self._not_handled, session)

    @staticmethod
    def _handled(_: Any, session: Session) -> None:
        session.strikes = 0

    def _not_handled(self, failure: Any, session: Session) -> None:
        if failure.check(ProtocolError):
            self._refused(session, failure.value)
            return
        _log.failure("bug while handling a frame from {client_address}", failure,
                     client_address=session.address)
        self.sessions_part.close_for_bug(session)

    def _next(self, _: Any, session: Session) -> None:
        """
        The frame that waited is done: handle those that came after it, in
        order, until one waits in its turn.
        """
        waiting, session.waiting = session.waiting, None
        for i, data in enumerate(waiting or ()):
            if session.closing:
                return
            self._handle(session, data)
            if session.waiting is not None:
                session.waiting.extend(waiting[i + 1:])
                return

    def receive_ping(self, session: Session) -> bool:
        """
        A WebSocket ping from C{session}: it counts against the message
        rate like any frame.  Whether to answer it with a pong (if not, the
        session was refused, as for a text frame over the rate).
        """
        if session.closing:
            return False
        try:
            self.admission.take_message(session)
        except RateLimited as e:
            self._refused(session, e)
            return False
        return True

    def receive_binary(self, session: Session) -> None:
        if session.closing:
            return
        self._refused(session, BinaryNotSupported("binary frames are not supported; send JSON text"))

    def _refused(self, session: Session, error: ProtocolError) -> None:
        session.send(error.as_frame())
        self.admission.refused(session, error)

    def delivery_mark(self, session: Session) -> tuple:
        """
        What C{session} has been sent so far, to pass to L{delivered} once
        the device proves it received everything sent before now (its
        answer to a WebSocket ping sent now, say).
        """
        return self.replayer.delivery_mark(session)

    def delivered(self, session: Session, mark: tuple) -> None:
        """
        The device of C{session} proved that it received everything sent up
        to C{mark} (from L{delivery_mark}).
        """
        self.replayer.delivered(session, mark)

    def disconnect(self, session: Session) -> None:
        """
        C{session}'s connection closed: the rest of its crew hears that the
        device went offline.
        """
        self.sessions_part.stop_bind_timer(session)
        self.delivery.paused.discard(session)
        self.handlers.unbind(session)
        self.sessions_part.discard(session)

    def shutdown(self, code: int = CLOSE_GOING_AWAY, reason: str = "relay restarting, come back soon",
                 spread: float = 2.0, steps: int = 20, grace: float = 10.0) -> Deferred:
        """
        Close every connection, telling devices to come back, spread over
        C{spread} seconds so the fleet does not reconnect in one burst, and
        wait until every one has gone (L{disconnect}): its close is on the
        wire once its transport says so, not when C{close()} returns.  One
        still open C{grace} seconds after the last close is given up on.
        Connections opening meanwhile are closed at once.  Then make
        everything durable.  Fires when the store is flushed.
        """
        d = self.sessions_part.close_all(code, reason, spread, steps, grace)
        return d.addCallback(lambda _: self._goodbye())

    def _goodbye(self) -> Deferred:
        for session in list(self.sessions):
            self.disconnect(session)
        # Nobody is left to tell.
        self.presence.cancel_all()
        return self.journal.drain()

    # ------------------------------------------------------------- bot API

    def bot_create_crew(self, user_id: str, name: str) -> Deferred:
        return self.bot.create_crew(user_id, name)

    def bot_join_crew(self, user_id: str, code: str, name: str) -> tuple[str, int]:
        return self.bot.join_crew(user_id, code, name)

    def bot_message(self, user_id: str, code: str, sender_name: str, msg_type: str, payload: dict) -> Deferred:
        return self.bot.message(user_id, code, sender_name, msg_type, payload)

    def bot_user_crews(self, user_id: str) -> list[BotCrew]:
        return self.bot.user_crews(user_id)

    def crew_status(self, code: str) -> CrewStatus:
        return self.bot.crew_status(code)

    # ---------------------------------------------------- Spotify, retention

    def deliver_tokens(self, device_id: str, tokens: dict, keep: bool | None = None) -> bool:
        """
        Hand Spotify tokens to C{device_id}: at once if it is online (return
        C{True}), else at its next register, create or join within the
        token lifetime.  With C{keep} (its owner consented), the relay keeps
        the refresh token (sealed) and the device gets C{access_token} and
        C{expires_in} only; C{keep} false forgets any it kept (the device
        holds its own now); C{None} (the legacy callback) leaves that be.
        """
        if keep:
            self.grants.keep(device_id, tokens).addErrback(
                lambda f: _log.error("the Spotify access kept for {device_id} was not stored: {error}",
                                     device_id=device_id, error=f.getErrorMessage()))
            tokens = {"access_token": tokens["access_token"], "expires_in": tokens["expires_in"]}
        elif keep is not None:
            self.grants.forget(device_id).addErrback(lambda f: None)
        return self.tokens.deliver(device_id, tokens)

    def expire(self) -> int:
        """
        Forget Spotify tokens past their lifetime (return how many), end
        the Spotify pairings past theirs, and forget the budgets of
        addresses that are full again.
        """
        expired = self.tokens.expire()
        self.pairing.expire()
        self.admission.sweep()
        return expired

    def prune(self) -> Deferred:
        """
        Drop log entries older than the retention window, crews with no
        message and no member seen within C{crew_ttl}, and the records of
        device ids in no crew not seen within C{crew_ttl}.  Fires with
        C{(messages, crews)} pruned.
        """
        return self.retention_part.prune()
