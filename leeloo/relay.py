"""
The relay's core, sans I/O: crews, sessions, fan-out, the crew message log
and pending Spotify tokens.

Nothing here imports a reactor, a transport or Autobahn.  A connection is a
L{Session} whose L{IPeer} the core sends through; the WebSocket adapter, the
bot API and the tests all drive the same L{Relay} with method calls.  Time
comes from an injected clock (anything with C{seconds()} and
C{callLater()}); state is written through a L{Journal} to an L{IStore}.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import json
import secrets
from typing import Any, Callable

from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.logger import Logger
from zope.interface import Interface

from leeloo import messages
from leeloo.limits import Bucket, Limiter, RelayLimits
from leeloo.messages import (
    Ack,
    BinaryNotSupported,
    CreateCrew,
    CrewLimit,
    CrewMessage,
    DeviceAuthFailed,
    DuplicateClientMessage,
    InvalidAck,
    InvalidCrewCode,
    InvalidLastSeq,
    JoinCrew,
    NotInCrew,
    Ping,
    ProtocolError,
    RateLimited,
    Reaction,
    Register,
    ShareMusic,
    StoreUnavailable,
)
from leeloo.store import (
    APPEND,
    DELETE_CREW,
    DELETE_DEVICE,
    DELETE_TOKEN,
    PUT_BOT_USER,
    PUT_CREW,
    PUT_DEVICE,
    PUT_MEMBER,
    PUT_TOKEN,
    BotUserRecord,
    CrewRecord,
    DeviceRecord,
    IStore,
    Journal,
    LogEntry,
    MemberRecord,
    MemoryStore,
    Replay,
    Snapshot,
    TokenRecord,
)

# Close codes the relay documents (application reasons live in 4000-4999).
CLOSE_GOING_AWAY = 1001
CLOSE_INTERNAL_ERROR = 1011
CLOSE_REPLACED = 4001
CLOSE_BIND_TIMEOUT = 4008
CLOSE_ABUSE = 4029

TELEGRAM_DEVICE_ID = "telegram"
# A device back in its crew within this many seconds was never away, as
# far as the crew hears.
PRESENCE_GRACE = 10.0
TOKEN_TTL = 3600.0
DAY = 86400.0
EPHEMERAL_AGE = 600.0
BIND_TIMEOUT = 60.0
MiB = 1024 * 1024
CREW_LOG_BYTES = 16 * MiB
STORE_QUEUE_BYTES = 8 * MiB
# Random codes tried at each length before a longer one; the longest.
CODE_TRIES = 8
MAX_GENERATED_CODE_LENGTH = 16

_log = Logger()


class IPeer(Interface):
    """
    The far end of one connection, as the core sees it.
    """

    def send(message: "Outgoing") -> None:
        """
        Send one message.  The same L{Outgoing} may go to many peers.
        """

    def close(code: int, reason: str) -> None:
        """
        Close the connection with a documented close code.
        """

    def pause_reading() -> None:
        """
        Read nothing more from the connection until L{resume_reading} (the
        store is behind: what is not read stays in the sender's socket,
        not in the relay's memory).
        """

    def resume_reading() -> None:
        """
        Read from the connection again.
        """


class Outgoing:
    """
    One outgoing message, encoded at most once however many peers it goes to.

    C{prepared} is a slot for a transport to cache its framed form in (the
    WebSocket adapter keeps Autobahn's prepared message there).
    """

    __slots__ = ("message", "_payload", "prepared")

    def __init__(self, message: dict | None, payload: bytes | None = None) -> None:
        self.message = message
        self._payload = payload
        self.prepared: Any = None

    @property
    def payload(self) -> bytes:
        if self._payload is None:
            self._payload = messages.encode(self.message)
        return self._payload


class Session:
    """
    One connection: who it says it is, which crew it is in, and the highest
    crew sequence it has been sent.  While C{held} is a list, the session is
    catching up on what it missed and live fan-outs wait there.

    C{proven_seq} is how far the device is known to have received (its
    transport proved it: see L{Relay.delivered}); C{epoch} counts the
    session's entries into crews, so that a proof taken in one crew is never
    applied in another.  C{bind_timer} closes it if it binds no device in
    time.
    """

    __slots__ = ("peer", "address", "device_id", "name", "crew", "last_sent_seq", "held", "acks",
                 "bucket", "entries", "strikes", "closing", "proven_seq", "epoch", "bind_timer")

    def __init__(self, peer: IPeer, address: str | None, bucket: Bucket) -> None:
        self.peer = peer
        self.address = address
        self.device_id: str | None = None
        self.name: str | None = None
        self.crew: Crew | None = None
        self.last_sent_seq = 0
        self.held: list[tuple[int, Outgoing]] | None = None
        self.acks = False
        self.bucket = bucket
        self.entries: Bucket | None = None
        self.strikes = 0
        self.closing = False
        self.proven_seq = 0
        self.epoch = 0
        self.bind_timer: Any = None

    def close(self, code: int, reason: str) -> None:
        """
        Close the connection; frames still arriving from it are ignored.
        """
        self.closing = True
        self.peer.close(code, reason)

    def send(self, message: dict) -> None:
        self.peer.send(Outgoing(message))

    def __repr__(self) -> str:
        return f"<Session {self.device_id!r} in {self.crew.code if self.crew else None!r}>"


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


class ClientMessage:
    """
    What the relay remembers of a message sent with a C{client_msg_id}:
    enough to answer a resend without storing it twice.  C{waiting} holds
    the sessions to answer once it is durable; C{None} once it is.
    """

    __slots__ = ("id", "seq", "digest", "created_at", "waiting")

    def __init__(self, id: str, seq: int, digest: bytes, created_at: float,
                 waiting: list | None = None) -> None:
        self.id = id
        self.seq = seq
        self.digest = digest
        self.created_at = created_at
        self.waiting = waiting


class Crew:
    """
    A crew: its members (by device id), the sessions online now, its bot
    users, and its message sequence: C{last_seq} is the last assigned,
    C{fanned_seq} the last stored and delivered.
    """

    __slots__ = ("code", "created_at", "created_by", "online", "members", "bot_users",
                 "last_seq", "fanned_seq", "last_message_at", "client_messages", "log_bytes", "trimming")

    def __init__(self, code: str, created_at: float, created_by: str | None) -> None:
        self.code = code
        self.created_at = created_at
        self.created_by = created_by
        self.online: dict[str, Session] = {}
        self.members: dict[str, Member] = {}
        self.bot_users: dict[str, str] = {}
        self.last_seq = 0
        self.fanned_seq = 0
        self.last_message_at = 0.0
        self.client_messages: dict[tuple[str, str], ClientMessage] | None = None
        # The bytes in its stored log (an estimate, never too low), and
        # while the log is being trimmed, the bytes stored since.
        self.log_bytes = 0
        self.trimming: int | None = None


class _Publication:
    """
    A crew message on its way to the log.  The journal numbers it when its
    batch is formed (calling it), so that a batch that fails spends no
    sequence number: C{seq} and C{out}, the stamped message, are set then.
    """

    __slots__ = ("crew", "message", "id", "sender", "client_msg_id", "digest", "created_at",
                 "remembered", "seq", "out")

    def __init__(self, crew: Crew, message: dict, id: str, sender: str, client_msg_id: str | None,
                 digest: bytes | None, created_at: float, remembered: ClientMessage | None) -> None:
        self.crew = crew
        self.message = message
        self.id = id
        self.sender = sender
        self.client_msg_id = client_msg_id
        self.digest = digest
        self.created_at = created_at
        self.remembered = remembered
        self.seq = 0
        self.out: Outgoing | None = None

    def __call__(self) -> LogEntry:
        crew = self.crew
        seq = self.seq = crew.last_seq = crew.last_seq + 1
        self.out = Outgoing(messages.stamped(self.message, int(self.created_at * 1000), seq, self.id))
        if self.remembered is not None:
            self.remembered.seq = seq
        return LogEntry(crew.code, seq, self.id, self.sender, self.client_msg_id, self.digest,
                        self.created_at, self.out.payload, messages.is_ephemeral(self.message))


def generate_crew_code(length: int = 4, choice: Callable[[str], str] = secrets.choice) -> str:
    return messages.CREW_CODE_PREFIX + "".join(
        choice(messages.CREW_CODE_ALPHABET) for _ in range(length)
    )


def generate_device_id(token_hex: Callable[[int], str] = secrets.token_hex) -> str:
    return messages.DEVICE_ID_PREFIX + token_hex(6)


def generate_message_id() -> str:
    return secrets.token_hex(8)


def generate_device_key() -> str:
    return secrets.token_urlsafe(24)


def client_digest(message: Any) -> bytes:
    """
    What identifies a crew message as its sender sent it (its type and
    fields but its C{client_msg_id}), whatever name it is sent under.
    """
    fields = {name: getattr(message, name) for name in message.__slots__ if name != "client_msg_id"}
    canonical = json.dumps([type(message).__name__, fields], sort_keys=True, separators=(",", ":"),
                           ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).digest()


def key_hash(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


class Relay:
    """
    Every crew and every connection of one relay.

    @param clock: an object with C{seconds()} and C{callLater()}, e.g. the
        reactor or a L{twisted.internet.task.Clock}.
    @param store: where state is kept (default: in memory).
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
    ) -> None:
        self.clock = clock
        self.store = store if store is not None else MemoryStore()
        self.journal = Journal(self.store, clock)
        self.journal.on_batch = self._store_progressed
        self.token_ttl = token_ttl
        self.replay_limit = replay_limit
        self.retention = retention
        self.crew_ttl = crew_ttl
        self.limits = limits
        self.legacy_replay_age = legacy_replay_age
        self.ephemeral_age = ephemeral_age
        self.bind_timeout = bind_timeout
        self.presence_grace = presence_grace
        self.crew_log_bytes = crew_log_bytes
        self.store_queue_bytes = store_queue_bytes
        # Sessions not read from until the store catches up.
        self.paused: set[Session] = set()
        self._frame_size = 0
        # (crew code, device id) -> (the timer announcing it offline, the
        # sessions online in the crew when it left)
        self._leaving: dict[tuple[str, str], tuple[Any, frozenset]] = {}
        self._new_crew_code = crew_code
        self._new_device_id = device_id
        self._new_message_id = message_id
        self._new_device_key = device_key
        self._entries_by_address = Limiter(clock, limits.entries)
        self._bot_joins = Limiter(clock, limits.entries)
        self.device_keys: dict[str, DeviceRecord] = {}
        self.started = clock.seconds()
        self.sessions: set[Session] = set()
        self.devices: dict[str, Session] = {}
        self.crews: dict[str, Crew] = {}
        # Crews with at least one member online (kept as members come and go).
        self.crews_online = 0
        self.pending_tokens: dict[str, tuple[dict, float]] = {}
        # Set by shutdown: the close code and reason of connections opening now.
        self._stopping: tuple[int, str] | None = None
        self._when_gone: list[Deferred] = []
        # telegram user id -> the codes of the crews it is in (in join order)
        self.bot_user_index: dict[str, dict[str, None]] = {}
        self._handlers = {
            Register: self._register,
            CreateCrew: self._create_crew,
            JoinCrew: self._join_crew,
            CrewMessage: self._crew_message,
            ShareMusic: self._share_music,
            Reaction: self._reaction,
            Ping: self._ping,
            Ack: self._ack,
        }
        self.restore(self.store.load())

    def restore(self, snapshot: Snapshot) -> None:
        """
        Take up the state a store kept.  Each member resumes from the
        position it was proven to have received (see L{delivered}), also
        when the relay last stopped without saying goodbye: what was sent to
        it but not proven is sent again.
        """
        for record in snapshot.crews:
            crew = self.crews[record.code] = Crew(record.code, record.created_at, record.created_by)
            crew.last_seq = crew.fanned_seq = snapshot.last_seq.get(record.code, 0)
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
        for t in snapshot.tokens:
            self.pending_tokens[t.device_id] = (t.tokens, t.expires_at)
        for d in snapshot.devices:
            self.device_keys[d.device_id] = d
        for e in snapshot.client_messages:
            crew = self.crews.get(e.crew_code)
            if crew is not None:
                if crew.client_messages is None:
                    crew.client_messages = {}
                crew.client_messages[(e.sender, e.client_msg_id)] = ClientMessage(
                    e.id, e.seq, e.digest, e.created_at)

    # ------------------------------------------------------------ sessions

    def connect(self, peer: IPeer, address: str | None = None) -> Session:
        """
        A new connection's session; registered all or nothing: if this
        raises, the relay keeps nothing of it.
        """
        session = Session(peer, address, Bucket(self.limits.messages.burst, self.clock.seconds()))
        if self.bind_timeout:
            session.bind_timer = self.clock.callLater(self.bind_timeout, self._bind_expired, session)
        self.sessions.add(session)
        if self._stopping is not None:
            try:
                session.close(*self._stopping)
            except BaseException:
                self.disconnect(session)
                raise
        return session

    def _bind_expired(self, session: Session) -> None:
        session.bind_timer = None
        if session.device_id is None and not session.closing and session in self.sessions:
            _log.info("closing a connection from {client_address} that bound no device in {timeout} seconds",
                      client_address=session.address, timeout=self.bind_timeout)
            session.close(CLOSE_BIND_TIMEOUT, "no device registered in time; reconnect and register")

    def delivery_mark(self, session: Session) -> tuple[int, int]:
        """
        What C{session} has been sent so far, to pass to L{delivered} once
        the device proves it received everything sent before now (its
        answer to a WebSocket ping sent now, say).
        """
        return (session.epoch, session.last_sent_seq)

    def delivered(self, session: Session, mark: tuple[int, int]) -> None:
        """
        The device of C{session} proved that it received everything sent up
        to C{mark} (from L{delivery_mark}).  For a legacy device, which
        never acknowledges, this proven position is the one the relay keeps
        and resumes it from: frames written into a link that died without a
        close are never counted as delivered.
        """
        epoch, seq = mark
        if epoch != session.epoch or seq <= session.proven_seq:
            return
        session.proven_seq = seq
        crew = session.crew
        if crew is None or session.acks or crew.online.get(session.device_id) is not session:
            return
        member = crew.members.get(session.device_id)
        if member is not None and seq > member.delivered_seq:
            member.delivered_seq = seq
            self._save_member(crew, member, online=True)

    def receive(self, session: Session, data: bytes | str) -> None:
        """
        One text frame from C{session}: decode it and act on it.  A peer's
        mistake is answered with an C{error} message; the connection stays,
        unless it keeps being refused.
        """
        if session.closing:
            return
        try:
            wait = session.bucket.take(self.clock.seconds(), self.limits.messages)
            if wait:
                raise RateLimited("too many messages; slow down", wait)
            self._frame_size = len(data)
            message = messages.decode(data)
            self._handlers[type(message)](session, message)
            session.strikes = 0
        except ProtocolError as e:
            self._refused(session, e)

    def receive_ping(self, session: Session) -> bool:
        """
        A WebSocket ping from C{session}: it counts against the message
        rate like any frame.  Whether to answer it with a pong (if not, the
        session was refused, as for a text frame over the rate).
        """
        if session.closing:
            return False
        wait = session.bucket.take(self.clock.seconds(), self.limits.messages)
        if wait:
            self._refused(session, RateLimited("too many messages; slow down", wait))
            return False
        return True

    def receive_binary(self, session: Session) -> None:
        if session.closing:
            return
        self._refused(session, BinaryNotSupported("binary frames are not supported; send JSON text"))

    def _refused(self, session: Session, error: ProtocolError) -> None:
        session.send(error.as_message())
        if isinstance(error, (RateLimited, DeviceAuthFailed)):
            session.strikes += 1
            if session.strikes >= self.limits.abuse_strikes:
                _log.warn("closing a connection from {client_address} after {strikes} refusals ({error_code})",
                          client_address=session.address, strikes=session.strikes, error_code=error.code)
                session.close(CLOSE_ABUSE, "too many refused requests")

    def disconnect(self, session: Session) -> None:
        """
        C{session}'s connection closed: the rest of its crew hears that the
        device went offline.
        """
        if session.bind_timer is not None:
            session.bind_timer.cancel()
            session.bind_timer = None
        self.paused.discard(session)
        self._unbind(session)
        self._discard(session)

    def _unbind(self, session: Session) -> None:
        if session.device_id is not None and self.devices.get(session.device_id) is session:
            del self.devices[session.device_id]
            self._leave(session, announce=True)
        session.crew = None

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
        self._stopping = (code, reason)
        sessions = list(self.sessions)
        per_step = max(1, -(-len(sessions) // steps))
        waits = []
        for i in range(0, len(sessions), per_step):
            chunk = sessions[i:i + per_step]
            delay = spread * i / max(1, len(sessions))
            d = Deferred()
            waits.append(d)
            if delay:
                self.clock.callLater(delay, self._close_chunk, chunk, code, reason, d)
            else:
                self._close_chunk(chunk, code, reason, d)
        done = DeferredList(waits) if waits else succeed(None)
        done.addCallback(lambda _: self._all_gone(grace))
        return done.addCallback(lambda _: self._goodbye())

    def _close_chunk(self, chunk: list, code: int, reason: str, d: Deferred) -> None:
        for session in chunk:
            session.close(code, reason)
        d.callback(None)

    def _all_gone(self, grace: float) -> Deferred:
        """
        Fires once no session is left, or after C{grace} seconds.
        """
        if not self.sessions:
            return succeed(None)
        gone: Deferred = Deferred()
        self._when_gone.append(gone)

        def give_up() -> None:
            if not gone.called:
                _log.warn("{count} connections did not close within {grace:g}s of being told to; "
                          "dropping them", count=len(self.sessions), grace=grace)
                self._when_gone.remove(gone)
                gone.callback(None)

        timer = self.clock.callLater(grace, give_up)
        return gone.addCallback(lambda _: timer.cancel() if timer.active() else None)

    def _discard(self, session: Session) -> None:
        self.sessions.discard(session)
        if self._when_gone and not self.sessions:
            waiting, self._when_gone = self._when_gone, []
            for d in waiting:
                d.callback(None)

    def _goodbye(self) -> Deferred:
        for session in list(self.sessions):
            self.disconnect(session)
        # Nobody is left to tell.
        for call, _ in self._leaving.values():
            call.cancel()
        self._leaving.clear()
        return self.journal.drain()

    # ------------------------------------------------------------ identity

    def _authenticate(self, session: Session, device_id: str, key: str | None, claimed: bool) -> str | None:
        """
        Check that C{session} may be C{device_id}; return a newly issued key
        when the id has none bound.  Trust on first use: a key binds the
        first time it is presented.
        """
        record = self.device_keys.get(device_id)
        if key is not None:
            digest = key_hash(key)
            if record is None or (not record.bound and hmac.compare_digest(record.key_hash, digest)):
                record = self.device_keys[device_id] = DeviceRecord(
                    device_id, digest, True, record.created_at if record else self.clock.seconds(),
                    self.clock.seconds())
                self.journal.put((PUT_DEVICE, record), wait=False)
                return None
            if hmac.compare_digest(record.key_hash, digest):
                return None
            self._auth_failed(session, device_id, "wrong key")
            raise DeviceAuthFailed("the device key does not match this device id")
        if record is not None and record.bound:
            self._auth_failed(session, device_id, "no key")
            raise DeviceAuthFailed("this device id is protected by its device key: present it as device_key")
        if claimed and self.limits.require_device_key:
            self._auth_failed(session, device_id, "legacy id")
            raise DeviceAuthFailed(
                "this relay requires device keys: register without device_id to get a new id and key")
        issued = self._new_device_key()
        record = self.device_keys[device_id] = DeviceRecord(
            device_id, key_hash(issued), False, self.clock.seconds())
        self.journal.put((PUT_DEVICE, record), wait=False)
        return issued

    def _seen_outside_crews(self, device_id: str) -> None:
        """
        Note that C{device_id} was here without entering a crew (a member
        is seen through its memberships), so that it is not pruned.
        """
        record = self.device_keys.get(device_id)
        if record is not None:
            record = self.device_keys[device_id] = dataclasses.replace(record, last_seen=self.clock.seconds())
            self.journal.put((PUT_DEVICE, record), key=(PUT_DEVICE, device_id))

    def _auth_failed(self, session: Session, device_id: str, why: str) -> None:
        _log.warn("refused device {device_id} from {client_address}: {why}",
                  device_id=device_id, client_address=session.address, why=why)

    def _unseen(self, session: Session, device_id: str | None) -> bool:
        """
        Whether C{session} would be a device id the relay has never seen.
        """
        device_id = device_id or session.device_id
        return device_id is None or device_id not in self.device_keys

    def _check_entry(self, session: Session, device_id: str | None, crew: Crew | None) -> None:
        """
        Count an attempt to enter C{crew} (or a crew that does not exist,
        or to create one, or to register a new device id) against the
        connection's and the client address's budgets; a returning member
        is free.
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

    def _identify(self, session: Session, device_id: str | None, name: str | None,
                  key: str | None = None) -> str | None:
        """
        Make C{session} the connection of C{device_id} (a new id when none
        is given); return a device key issued to it, if one was.
        """
        claimed = device_id is not None
        if device_id is None:
            device_id = session.device_id or self._new_device_id()
        issued = None
        if session.device_id != device_id or key is not None:
            issued = self._authenticate(session, device_id, key, claimed)
        if session.device_id != device_id:
            self._unbind(session)
            previous = self.devices.get(device_id)
            if previous is not None:
                self._replace(previous)
            session.device_id = device_id
            session.last_sent_seq = 0
            self.devices[device_id] = session
            if session.bind_timer is not None:
                session.bind_timer.cancel()
                session.bind_timer = None
        if name is not None:
            session.name = name
        elif session.name is None:
            session.name = device_id
        return issued

    def _replace(self, previous: Session) -> None:
        """
        A newer connection claims C{previous}'s device id (a reboot): the old
        one is detached without telling the crew, and closed.
        """
        self._leave(previous, announce=False)
        previous.crew = None
        del self.devices[previous.device_id]
        previous.device_id = None
        self._discard(previous)
        previous.close(CLOSE_REPLACED, "replaced by a newer connection for this device")

    def _deliver_pending(self, session: Session) -> None:
        pending = self.pending_tokens.pop(session.device_id, None)
        if pending is not None:
            self.journal.put((DELETE_TOKEN, session.device_id), wait=False)
            tokens, expires = pending
            if expires > self.clock.seconds():
                session.send(messages.spotify_auth_complete(tokens))

    # --------------------------------------------------------------- crews

    def _create(self, code: str, created_by: str | None) -> Crew:
        crew = self.crews[code] = Crew(code, self.clock.seconds(), created_by)
        self.journal.put((PUT_CREW, CrewRecord(code, crew.created_at, created_by)), wait=False)
        _log.info("crew {crew_code} created", crew_code=code)
        return crew

    def _unused_code(self) -> str:
        """
        A random code no crew has: a few tries at the configured length,
        then one character longer, and so on.

        @raise CrewLimit: not even the longest codes found a free one.
        """
        for length in range(self.limits.crew_code_length, MAX_GENERATED_CODE_LENGTH + 1):
            for _ in range(CODE_TRIES):
                code = self._new_crew_code(length)
                if code not in self.crews:
                    return code
        _log.error("no unused crew code found after {tries} tries up to {length} characters",
                   tries=CODE_TRIES, length=MAX_GENERATED_CODE_LENGTH)
        raise CrewLimit("the relay cannot create more crews now; try again later")

    def _check_last_seq(self, crew: Crew | None, last_seq: int | None) -> None:
        latest = crew.fanned_seq if crew is not None else 0
        if last_seq is not None and last_seq > latest:
            raise InvalidLastSeq(f"last_seq {last_seq} is from the future: the crew is at {latest}")

    def _save_member(self, crew: Crew, member: Member, online: bool) -> None:
        record = MemberRecord(crew.code, member.device_id, member.name, member.last_seen,
                              member.delivered_seq, member.acked_seq, online)
        self.journal.put((PUT_MEMBER, record), key=(crew.code, member.device_id))

    def _enter(self, session: Session, crew: Crew, announce: bool, last_seq: int | None = None) -> None:
        """
        Put C{session} in C{crew}; a returning member first gets what it
        missed, then live traffic.
        """
        if session.crew is crew:
            return
        self._leave(session, announce=True)
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
        session.crew = crew
        session.last_sent_seq = session.proven_seq = start
        session.epoch += 1
        if not crew.online:
            self.crews_online += 1
        crew.online[session.device_id] = session
        self._save_member(crew, member, online=True)
        witnesses = self._returned(crew, session)
        if witnesses is not None:
            # Back within the grace: only those who came since hear of it.
            joined = Outgoing(messages.member_joined(session.device_id, session.name))
            for other in tuple(crew.online.values()):
                if other is not session and other not in witnesses:
                    other.peer.send(joined)
        elif announce:
            self._fanout(crew, Outgoing(messages.member_joined(session.device_id, session.name)), session)
        if start < crew.fanned_seq:
            self._replay(session, crew, start)

    def _replay(self, session: Session, crew: Crew, start: int) -> None:
        """
        Send C{session} what it missed after C{start}.  A legacy device
        (C{session.acks} false), which takes every frame for a new one, gets
        only messages younger than C{legacy_replay_age}, and nudges and
        reactions younger than C{ephemeral_age}; then the replay limit cuts.
        """
        session.held = []
        up_to = crew.fanned_seq
        now = self.clock.seconds()
        since = ephemeral_since = now - self.retention
        if not session.acks:
            since = max(since, now - self.legacy_replay_age)
            ephemeral_since = max(since, now - self.ephemeral_age)
        d = self.store.replay(crew.code, start, up_to, since, session.device_id, self.replay_limit,
                              ephemeral_since)
        d.addCallbacks(self._replayed, self._replay_failed,
                       callbackArgs=(session, crew, up_to), errbackArgs=(session, crew, up_to))
        d.addErrback(self._replay_bug, session)

    def _replay_bug(self, failure: Any, session: Session) -> None:
        """
        A bug while sending C{session} its replay: it cannot know what it
        missed, so it stops holding live traffic and is closed with 1011
        (it reconnects, and is replayed from what it was proven to get).
        """
        _log.failure("bug while replaying a crew's log to {device_id}", failure, device_id=session.device_id)
        session.held = None
        self._close_for_bug(session)

    def _close_for_bug(self, session: Session) -> None:
        if not session.closing and session in self.sessions:
            try:
                session.close(CLOSE_INTERNAL_ERROR, "internal error")
            except Exception:
                _log.failure("bug while closing the connection of {device_id}", device_id=session.device_id)

    def _replayed(self, replay: Replay, session: Session, crew: Crew, up_to: int) -> None:
        if session.crew is not crew:
            session.held = None
            return
        if replay.lost is not None and session.acks:
            session.send(messages.replay_truncated(*replay.lost))
        for seq, payload in replay.entries:
            session.peer.send(Outgoing(None, messages.replayed(payload)))
        self._release(session, up_to)

    def _replay_failed(self, failure: Any, session: Session, crew: Crew, up_to: int) -> None:
        _log.error("could not read crew {crew_code}'s log for a returning device: {error}",
                   crew_code=crew.code, error=failure.getErrorMessage())
        if session.crew is crew:
            session.send(StoreUnavailable("missed messages could not be read; reconnect to try again").as_message())
            self._release(session, up_to)

    def _release(self, session: Session, up_to: int) -> None:
        held, session.held = session.held or [], None
        session.last_sent_seq = max(session.last_sent_seq, up_to)
        for seq, out in held:
            if out is not None:
                session.peer.send(out)
            session.last_sent_seq = max(session.last_sent_seq, seq)

    def _leave(self, session: Session, announce: bool) -> None:
        crew = session.crew
        if crew is None:
            return
        session.crew = None
        session.held = None
        if crew.online.get(session.device_id) is session:
            del crew.online[session.device_id]
            if not crew.online:
                self.crews_online -= 1
            member = crew.members.get(session.device_id)
            if member is not None:
                # A legacy device never acknowledges: only what its
                # transport proved it received counts as delivered.
                sent = session.last_sent_seq if session.acks else session.proven_seq
                member.delivered_seq = max(member.delivered_seq, sent)
                member.last_seen = self.clock.seconds()
                self._save_member(crew, member, online=False)
            if announce:
                self._announce_offline(crew, session)

    def _announce_offline(self, crew: Crew, session: Session) -> None:
        """
        Tell C{crew} that C{session}'s device went offline, unless it is
        back within the presence grace.
        """
        out = Outgoing(messages.member_offline(session.device_id, session.name))
        if self.presence_grace <= 0:
            self._fanout(crew, out)
            return
        key = (crew.code, session.device_id)
        earlier = self._leaving.pop(key, None)
        if earlier is not None:
            earlier[0].cancel()
        call = self.clock.callLater(self.presence_grace, self._gone, crew, key, out)
        self._leaving[key] = (call, frozenset(crew.online.values()))

    def _gone(self, crew: Crew, key: tuple[str, str], out: Outgoing) -> None:
        del self._leaving[key]
        if key[1] not in crew.online and self.crews.get(crew.code) is crew:
            self._fanout(crew, out)

    def _returned(self, crew: Crew, session: Session) -> frozenset | None:
        """
        If C{session}'s device left C{crew} within the presence grace, take
        back the announcement of its leaving: return who was online then.
        """
        leaving = self._leaving.pop((crew.code, session.device_id), None)
        if leaving is None:
            return None
        leaving[0].cancel()
        return leaving[1]

    def _fanout(self, crew: Crew, out: Outgoing, sender: Session | None = None, seq: int = 0) -> int:
        """
        Send C{out} to every online member of C{crew} but C{sender}, encoded
        once; return how many it went to.  A crew message (C{seq} > 0) waits
        behind the replay of a member still catching up.
        """
        reached = 0
        for member in tuple(crew.online.values()):
            if member is sender:
                continue
            reached += 1
            if seq:
                if member.held is not None:
                    member.held.append((seq, out))
                    continue
                member.last_sent_seq = seq
            member.peer.send(out)
        return reached

    def _crew_of(self, session: Session) -> Crew:
        if session.crew is None:
            raise NotInCrew("join or create a crew before sending crew messages")
        return session.crew

    # ----------------------------------------------------------- crew log

    def publish(self, crew: Crew, message: dict, sender_id: str, session: Session | None = None,
                client_msg_id: str | None = None, digest: bytes | None = None, size: int = 0) -> Deferred:
        """
        Store C{message} (about C{size} bytes) in C{crew}'s log, then fan it
        out to the crew (but C{session}, its sender).  Fires with the number
        of devices reached, or fails with L{StoreUnavailable}: then nothing
        was delivered, and no sequence number was spent on it.
        """
        now = self.clock.seconds()
        message_id = self._new_message_id()
        remembered = None
        if client_msg_id is not None:
            if crew.client_messages is None:
                crew.client_messages = {}
            remembered = crew.client_messages[(sender_id, client_msg_id)] = ClientMessage(
                message_id, 0, digest, now, [])
        entry = _Publication(crew, message, message_id, sender_id, client_msg_id, digest, now, remembered)
        d = self.journal.put((APPEND, entry), size=size)
        if session is not None and self.journal.backlog > self.store_queue_bytes and session not in self.paused:
            # The store is behind: read no more from this sender until it
            # catches up, rather than hold what it sends.
            self.paused.add(session)
            session.peer.pause_reading()
        return d.addCallbacks(
            self._stored, self._not_stored,
            callbackArgs=(entry, session),
            errbackArgs=(entry,),
        )

    def _stored(self, _: Any, entry: "_Publication", session: Session | None) -> int:
        crew, seq, out, remembered = entry.crew, entry.seq, entry.out, entry.remembered
        crew.fanned_seq = seq
        crew.last_message_at = self.clock.seconds()
        self._logged(crew, len(out.payload))
        if session is not None and session.crew is crew:
            # The sender never gets its own message: it counts as sent to
            # it, in its place (after what it is still catching up on).
            if session.held is not None:
                session.held.append((seq, None))
            else:
                session.last_sent_seq = max(session.last_sent_seq, seq)
        reached = self._fanout(crew, out, session, seq)
        if remembered is not None:
            waiting, remembered.waiting = remembered.waiting, None
            reply = messages.sent(entry.client_msg_id, remembered.id, remembered.seq)
            for s in [session, *waiting]:
                if s is not None:
                    s.send(reply)
        return reached

    def _store_progressed(self) -> None:
        if self.paused and self.journal.backlog <= self.store_queue_bytes // 2:
            paused, self.paused = self.paused, set()
            for session in paused:
                session.peer.resume_reading()

    def _logged(self, crew: Crew, size: int) -> None:
        """
        C{size} more bytes are in C{crew}'s log: past the bound, trim it.
        """
        crew.log_bytes += size
        if crew.trimming is not None:
            crew.trimming += size
        elif crew.log_bytes > self.crew_log_bytes:
            crew.trimming = 0
            d = self.store.trim(crew.code, self.crew_log_bytes * 3 // 4, self.replay_limit)
            d.addCallbacks(self._trimmed, self._not_trimmed, callbackArgs=(crew,), errbackArgs=(crew,))
            d.addErrback(self._trim_bug, crew)

    def _trim_bug(self, failure: Any, crew: Crew) -> None:
        # The next message past the bound tries again.
        crew.trimming = None
        _log.failure("bug while trimming crew {crew_code}'s log", failure, crew_code=crew.code)

    def _trimmed(self, result: tuple[int, int], crew: Crew) -> None:
        first_kept, left = result
        crew.log_bytes, crew.trimming = left + crew.trimming, None
        if crew.client_messages:
            # What the log no longer holds cannot be answered as a resend.
            for key in [k for k, v in crew.client_messages.items() if v.waiting is None and v.seq < first_kept]:
                del crew.client_messages[key]

    def _not_trimmed(self, failure: Any, crew: Crew) -> None:
        crew.trimming = None
        _log.warn("could not trim crew {crew_code}'s log: {error}",
                  crew_code=crew.code, error=failure.getErrorMessage())

    def _not_stored(self, failure: Any, entry: "_Publication") -> None:
        crew, client_msg_id, remembered = entry.crew, entry.client_msg_id, entry.remembered
        _log.error("a message to crew {crew_code} was not stored: {error}",
                   crew_code=crew.code, error=failure.getErrorMessage())
        if entry.seq:
            # Its whole batch failed, and no later batch has been numbered
            # yet: the next message takes the first sequence this one had.
            crew.last_seq = min(crew.last_seq, entry.seq - 1)
        extra = {} if client_msg_id is None else {"client_msg_id": client_msg_id}
        if remembered is not None:
            crew.client_messages.pop((entry.sender, client_msg_id), None)
            for s in remembered.waiting or ():
                s.send(StoreUnavailable("the message could not be stored; send it again", **extra).as_message())
        raise StoreUnavailable("the message could not be stored and was not delivered; send it again", **extra)

    def _send_crew_message(self, session: Session, message: dict, client_msg_id: str | None,
                           received: Any = None) -> None:
        crew = self._crew_of(session)
        digest = None
        if client_msg_id is not None:
            digest = client_digest(received)
            known = crew.client_messages.get((session.device_id, client_msg_id)) if crew.client_messages else None
            if known is not None:
                # Entries stored by earlier relays hashed the fan-out, sender's name
                # included: a resend of one of those matches that digest.
                if known.digest != digest and known.digest != hashlib.sha256(messages.encode(message)).digest():
                    raise DuplicateClientMessage(
                        f"client_msg_id {client_msg_id!r} was already used for a different message")
                if known.waiting is None:
                    session.send(messages.sent(client_msg_id, known.id, known.seq))
                else:
                    known.waiting.append(session)
                return
        d = self.publish(crew, message, session.device_id, session, client_msg_id, digest, self._frame_size)
        d.addErrback(self._refuse, session)

    def _refuse(self, failure: Any, session: Session) -> None:
        try:
            if failure.check(ProtocolError):
                session.send(failure.value.as_message())
                return
            # A bug, not the store refusing: the sender cannot know what
            # became of its message.  It reconnects, and a resend with its
            # client_msg_id is answered as the relay knows it.
            _log.failure("bug while publishing a message from {device_id}", failure,
                         device_id=session.device_id)
        except Exception:
            _log.failure("bug while answering {device_id}", device_id=session.device_id)
        self._close_for_bug(session)

    # ------------------------------------------------------------ handlers

    def _register(self, session: Session, message: Register) -> None:
        crew = self.crews.get(message.crew_code) if message.crew_code is not None else None
        self._check_last_seq(crew, message.last_seq)
        if message.crew_code is not None or self._unseen(session, message.device_id):
            self._check_entry(session, message.device_id, crew)
        key = self._identify(session, message.device_id, message.device_name, message.device_key)
        if message.crew_code is None:
            self._seen_outside_crews(session.device_id)
        session.send(messages.registered(session.device_id, key))
        self._deliver_pending(session)
        if message.crew_code is not None:
            if crew is None:
                crew = self._create(message.crew_code, session.device_id)
            self._enter(session, crew, announce=False, last_seq=message.last_seq)
        self._log_entry("register", session)

    def _create_crew(self, session: Session, message: CreateCrew) -> None:
        crew = self.crews.get(message.crew_code) if message.crew_code is not None else None
        self._check_last_seq(crew, message.last_seq)
        # Counted before a code is searched for: a refused flood costs no search.
        self._check_entry(session, message.device_id, crew)
        code = message.crew_code or self._unused_code()
        key = self._identify(session, message.device_id, message.display_name, message.device_key)
        if crew is None:
            # A new crew is answered once it is durable: a code handed out
            # and then lost in a crash could be handed to someone else.
            self._enter(session, self._create(code, session.device_id), announce=False)
            self.journal.barrier().addCallbacks(
                self._crew_stored, self._crew_not_stored,
                callbackArgs=(session, session.device_id, code, key), errbackArgs=(session, code),
            ).addErrback(self._crew_answer_bug, session, code)
            self._log_entry("create_crew", session)
            return
        session.send(messages.crew_created(session.device_id, code, key))
        self._deliver_pending(session)
        self._enter(session, crew, announce=True, last_seq=message.last_seq)
        self._log_entry("create_crew", session)

    def _crew_stored(self, _: Any, session: Session, device_id: str, code: str, key: str | None) -> None:
        if session.closing or session not in self.sessions or session.device_id != device_id:
            return
        session.send(messages.crew_created(device_id, code, key))
        self._deliver_pending(session)

    def _crew_answer_bug(self, failure: Any, session: Session, code: str) -> None:
        _log.failure("bug while answering the creation of crew {crew_code}", failure, crew_code=code)
        self._close_for_bug(session)

    def _crew_not_stored(self, failure: Any, session: Session, code: str) -> None:
        # The crew stays, and its record is retried with the relay's other
        # state; the device is told it was not created, and may ask again.
        _log.error("crew {crew_code} was not stored: {error}", crew_code=code, error=failure.getErrorMessage())
        if not session.closing and session in self.sessions:
            if session.crew is not None and session.crew.code == code:
                self._leave(session, announce=False)
            session.send(StoreUnavailable("the crew could not be stored; try again").as_message())

    def _join_crew(self, session: Session, message: JoinCrew) -> None:
        crew = self.crews.get(message.crew_code)
        self._check_entry(session, message.device_id, crew)
        if crew is None:
            raise InvalidCrewCode(f"Crew {message.crew_code} not found")
        self._check_last_seq(crew, message.last_seq)
        key = self._identify(session, message.device_id, message.display_name, message.device_key)
        others = [m.name for m in crew.online.values() if m is not session]
        online = len(crew.online) + (session.device_id not in crew.online)
        session.send(messages.crew_joined(session.device_id, crew.code, online, others, key))
        self._deliver_pending(session)
        self._enter(session, crew, announce=True, last_seq=message.last_seq)
        self._log_entry("join_crew", session)

    @staticmethod
    def _log_entry(action: str, session: Session) -> None:
        """
        The lifecycle line for a device that identified itself: who, from
        where, in which crew (never what it sent).
        """
        _log.info("{action}: device {device_id} from {client_address}, crew {crew_code}", action=action,
                  device_id=session.device_id, client_address=session.address,
                  crew_code=session.crew.code if session.crew is not None else None)

    def _crew_message(self, session: Session, message: CrewMessage) -> None:
        self._send_crew_message(
            session,
            messages.crew_message(session.device_id, session.name, message.msg_type, message.payload),
            message.client_msg_id, message,
        )

    def _share_music(self, session: Session, message: ShareMusic) -> None:
        self._send_crew_message(session, messages.music_shared(message, session.name), message.client_msg_id,
                                message)

    def _reaction(self, session: Session, message: Reaction) -> None:
        self._send_crew_message(
            session, messages.reaction(message.reaction_type, session.name), message.client_msg_id, message)

    def _ping(self, session: Session, message: Ping) -> None:
        session.send(messages.pong())

    def _ack(self, session: Session, message: Ack) -> None:
        crew = self._crew_of(session)
        if message.seq > session.last_sent_seq:
            raise InvalidAck(
                f"ack for seq {message.seq}, but the last message sent to you is {session.last_sent_seq}")
        session.acks = True
        member = crew.members[session.device_id]
        if member.acked_seq is None or message.seq > member.acked_seq:
            member.acked_seq = message.seq
            self._save_member(crew, member, online=True)

    # ------------------------------------------------------------- bot API

    def _known_crew(self, code: str) -> Crew:
        crew = self.crews.get(messages.normalize_crew_code(code))
        if crew is None:
            raise InvalidCrewCode(f"Crew {code.strip().upper()} not found")
        return crew

    def _add_bot_user(self, crew: Crew, user_id: str, name: str) -> None:
        crew.bot_users[user_id] = name
        self.bot_user_index.setdefault(user_id, {})[crew.code] = None
        self.journal.put((PUT_BOT_USER, BotUserRecord(crew.code, user_id, name)), wait=False)

    def bot_create_crew(self, user_id: str, name: str) -> Deferred:
        """
        A new crew with a bot user in it; fires with its code once it is
        durable, or fails with L{StoreUnavailable}.
        """
        crew = self._create(self._unused_code(), f"telegram:{user_id}")
        self._add_bot_user(crew, user_id, name)

        def failed(failure: Any) -> None:
            _log.error("crew {crew_code} was not stored: {error}",
                       crew_code=crew.code, error=failure.getErrorMessage())
            raise StoreUnavailable("the crew could not be stored; try again")

        return self.journal.barrier().addCallbacks(lambda _: crew.code, failed)

    def bot_join_crew(self, user_id: str, code: str, name: str) -> tuple[str, int]:
        """
        Put a bot user in a crew; return the crew's code and how many of
        its devices are online.
        """
        wait = self._bot_joins.take(user_id)
        if wait:
            raise RateLimited("too many join attempts; wait before trying again", wait)
        crew = self._known_crew(code)
        self._add_bot_user(crew, user_id, name)
        return crew.code, len(crew.online)

    def bot_message(
        self, user_id: str, code: str, sender_name: str, msg_type: str, payload: dict
    ) -> Deferred:
        """
        A bot user's message to a crew it joined.  Fires with the devices
        reached once it is stored and delivered.
        """
        crew = self._known_crew(code)
        if user_id not in crew.bot_users:
            raise NotInCrew(f"join crew {crew.code} before sending to it")
        message = messages.crew_message(TELEGRAM_DEVICE_ID, sender_name, msg_type, payload)
        return self.publish(crew, message, TELEGRAM_DEVICE_ID, size=len(messages.encode(message)))

    def bot_user_crews(self, user_id: str) -> list[dict]:
        """
        The crews bot user C{user_id} is in, with its name in each and how
        many devices of each are online.
        """
        crews = []
        for code in self.bot_user_index.get(user_id, ()):
            crew = self.crews.get(code)
            if crew is not None and user_id in crew.bot_users:
                crews.append({"crew_code": code, "display_name": crew.bot_users[user_id],
                              "devices_online": len(crew.online)})
        return crews

    def crew_status(self, code: str) -> dict:
        code = messages.normalize_crew_code(code)
        crew = self.crews.get(code)
        online = list(crew.online.values()) if crew else []
        bots = crew.bot_users if crew else {}
        return {
            "crew_code": code,
            "exists": crew is not None,
            "devices_online": len(online),
            "device_names": [s.name for s in online],
            "telegram_users": len(bots),
            "telegram_user_names": list(bots.values()),
        }

    # ------------------------------------------------------------- Spotify

    def deliver_tokens(self, device_id: str, tokens: dict) -> bool:
        """
        Hand Spotify tokens to C{device_id}: at once if it is online (return
        C{True}), else at its next register, create or join within the
        token lifetime.
        """
        session = self.devices.get(device_id)
        if session is not None:
            session.send(messages.spotify_auth_complete(tokens))
            return True
        expires = self.clock.seconds() + self.token_ttl
        self.pending_tokens[device_id] = (tokens, expires)
        self.journal.put((PUT_TOKEN, TokenRecord(device_id, tokens, expires)), wait=False)
        return False

    def expire(self) -> int:
        """
        Forget pending tokens past their lifetime; return how many.
        """
        now = self.clock.seconds()
        stale = [d for d, (_, expires) in self.pending_tokens.items() if expires <= now]
        for device_id in stale:
            del self.pending_tokens[device_id]
            self.journal.put((DELETE_TOKEN, device_id), wait=False)
        self._entries_by_address.sweep()
        self._bot_joins.sweep()
        return len(stale)

    # ----------------------------------------------------------- retention

    def prune(self) -> Deferred:
        """
        Drop log entries older than the retention window, crews with no
        message and no member seen within C{crew_ttl}, and the records of
        device ids in no crew not seen within C{crew_ttl}.  Fires with
        C{(messages, crews)} pruned.
        """
        now = self.clock.seconds()
        cutoff = now - self.retention
        idle_before = now - self.crew_ttl
        stale = [
            crew for crew in self.crews.values()
            if not crew.online
            and max(crew.created_at, crew.last_message_at,
                    max((m.last_seen for m in crew.members.values()), default=0.0)) < idle_before
        ]
        for crew in stale:
            del self.crews[crew.code]
            self.journal.put((DELETE_CREW, crew.code), wait=False)
            for user_id in crew.bot_users:
                codes = self.bot_user_index.get(user_id)
                if codes is not None:
                    codes.pop(crew.code, None)
                    if not codes:
                        del self.bot_user_index[user_id]
        members = {device_id for crew in self.crews.values() for device_id in crew.members}
        idle_devices = [
            device_id for device_id, record in self.device_keys.items()
            if device_id not in members and device_id not in self.devices
            and (record.last_seen if record.last_seen is not None else record.created_at) < idle_before
        ]
        for device_id in idle_devices:
            del self.device_keys[device_id]
            self.journal.put((DELETE_DEVICE, device_id), wait=False)
        if idle_devices:
            _log.info("retention: forgot {count} device ids in no crew and not seen for {days:g} days",
                      count=len(idle_devices), days=self.crew_ttl / DAY)
        for crew in self.crews.values():
            if crew.client_messages:
                # The store keeps each crew's newest entry, and with it its
                # client_msg_id: keep remembering that one.
                for key in [k for k, v in crew.client_messages.items()
                            if v.created_at < cutoff and v.waiting is None and v.seq != crew.last_seq]:
                    del crew.client_messages[key]
        d = self.journal.barrier().addCallback(lambda _: self.store.prune(cutoff))
        return d.addCallback(lambda deleted: (deleted, len(stale)))

    # -------------------------------------------------------------- health

    def health(self) -> dict:
        return {
            "status": "ok",
            "devices": len(self.devices),
            "crews": len(self.crews),
            "crews_online": self.crews_online,
            "uptime": int(self.clock.seconds() - self.started),
        }
