"""
Publishing to a crew: each message is stored in the crew's log before it is
fanned out, numbered when its store batch forms; a C{client_msg_id} is
answered C{sent} once the message is durable, and a resend with the same id
is answered without storing it twice.  The log is kept under its bound, and
a sender is read no more while the store is behind.
"""

from __future__ import annotations

import hashlib
import json
import secrets
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from leeloo import messages
from leeloo.core.peer import Outgoing
from leeloo.figures import Histogram, HistogramFigures
from leeloo.messages import DuplicateClientMessage, NotInCrew, StoreUnavailable
from leeloo.store import APPEND, IStore, Journal, LogEntry, Sequences, Snapshot

if TYPE_CHECKING:
    from leeloo.core.crews import Crew, Crews
    from leeloo.core.sessions import Session

_log = Logger()

# What a crew hears, as the relay sends it to every member.
Fanout = messages.RelayedMessage | messages.MusicShared | messages.RelayedReaction

# The kinds crew messages are counted by: a message's msg_type when it is
# one devices send, else "other"; a share_music is a song push and a
# top-level reaction a reaction.
MESSAGE_KINDS = (*messages.KNOWN_MSG_TYPES, "other")
_KNOWN_KINDS = frozenset(messages.KNOWN_MSG_TYPES)
_KIND_OF_TYPE = {messages.MusicShared: "song_push", messages.RelayedReaction: "reaction"}

# One crew message in this many has its fan-out timed (receipt to the last
# write): the others pay one decrement for it.
FANOUT_SAMPLE_EVERY = 16


def generate_message_id() -> str:
    return secrets.token_hex(8)


def client_digest(message: Any) -> bytes:
    """
    What identifies a crew message as its sender sent it (its type and
    fields but its C{client_msg_id}), whatever name it is sent under.
    """
    # Not its crew_code either: the crew's own log holds it, and digests
    # stored before crew_code existed must still match.
    fields = {name: getattr(message, name) for name in message.__slots__ if name not in ("client_msg_id", "crew_code")}
    canonical = json.dumps([type(message).__name__, fields], sort_keys=True, separators=(",", ":"),
                           ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).digest()


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


class Publication:
    """
    A crew message on its way to the log.  The journal calls it when its
    batch is formed, and it takes the crew's next sequence number from the
    store (which gives it back if the batch fails): C{seq} and C{out}, the
    stamped message, are set then.
    """

    __slots__ = ("sequences", "crew", "code", "message", "id", "sender", "client_msg_id", "digest", "created_at",
                 "remembered", "seq", "out", "answer", "stored_before")

    def __init__(self, sequences: Sequences, crew: Crew, message: Fanout, id: str, sender: str,
                 client_msg_id: str | None, digest: bytes | None, created_at: float,
                 remembered: ClientMessage | None) -> None:
        self.sequences = sequences
        self.crew = crew
        # The crew's code when it was sent: numbered and logged under it,
        # even should the crew be renamed before its batch forms.
        self.code = crew.code
        self.message = message
        self.id = id
        self.sender = sender
        self.client_msg_id = client_msg_id
        self.digest = digest
        self.created_at = created_at
        self.remembered = remembered
        # Answer the sender sent even without a client_msg_id.
        self.answer = False
        self.seq = 0
        self.out: Outgoing | None = None
        # The engine held it already (L{renumbered}): answer, do not fan out.
        self.stored_before = False

    def __call__(self) -> LogEntry:
        code = self.code
        seq = self.seq = self.sequences.next(code)
        fanout = self.message.to_dict()
        self.out = Outgoing(messages.stamped(fanout, int(self.created_at * 1000), seq, self.id, code))
        if self.remembered is not None:
            self.remembered.seq = seq
        return LogEntry(code, seq, self.id, self.sender, self.client_msg_id, self.digest,
                        self.created_at, self.out.payload, messages.is_ephemeral(fanout),
                        self.renumbered if self.sequences.engine_mints else None)

    def renumbered(self, seq: int, first_id: str | None = None) -> None:
        """
        The engine stored this message as C{seq} (another relay sharing it
        took the number proposed): stamp it so before it is fanned out and
        answered.  With C{first_id}, the engine held it already, as C{seq}
        and C{first_id} (a resend of its client_msg_id through another node
        while the first was being stored): it is answered as that one, and
        not fanned out again.
        """
        if first_id is not None:
            self.stored_before = True
            self.id = first_id
        self.seq = seq
        self.out = Outgoing(messages.stamped(self.message.to_dict(), int(self.created_at * 1000), seq, self.id,
                                             self.code))
        if self.remembered is not None:
            self.remembered.seq = seq
            self.remembered.id = self.id


@dataclass(frozen=True, slots=True)
class DeliveryStats:
    """
    What L{Delivery} has done since the relay started: crew messages
    received, by kind (L{MESSAGE_KINDS}); deliveries (one per device a
    message was fanned out to live); the sampled fan-out times, from
    receipt until the last member's write.
    """

    received: dict[str, int]
    deliveries: int
    fanout_seconds: HistogramFigures


class Delivery:
    """
    @param crew_log_bytes: the most bytes of messages kept in one crew's
        log; past it, the oldest go (down to three quarters of it), but
        never the newest C{replay_limit}.
    @param store_queue_bytes: the most bytes of messages waiting for the
        store before the relay stops reading from their senders (it reads
        again once half of it is written).
    """

    def __init__(self, clock: Any, store: IStore, journal: Journal, crews: Crews, replay_limit: int,
                 crew_log_bytes: int, store_queue_bytes: int,
                 message_id: Callable[[], str] = generate_message_id) -> None:
        self.clock = clock
        self.store = store
        self.journal = journal
        self.crews = crews
        self.replay_limit = replay_limit
        self.crew_log_bytes = crew_log_bytes
        self.store_queue_bytes = store_queue_bytes
        self._new_message_id = message_id
        # Sessions not read from until the store catches up.
        self.paused: set[Session] = set()
        journal.on_batch = self._store_progressed
        # The figures (see L{stats}).
        self.received = dict.fromkeys(MESSAGE_KINDS, 0)
        self.deliveries = 0
        self.fanout_seconds = Histogram()
        self.sample_every = FANOUT_SAMPLE_EVERY
        self._until_sample = 1

    def stats(self) -> DeliveryStats:
        return DeliveryStats(dict(self.received), self.deliveries, self.fanout_seconds.figures())

    def restore(self, snapshot: Snapshot) -> None:
        for e in snapshot.client_messages:
            crew = self.crews.crews.get(e.crew_code)
            if crew is not None:
                if crew.client_messages is None:
                    crew.client_messages = {}
                crew.client_messages[(e.sender, e.client_msg_id)] = ClientMessage(
                    e.id, e.seq, e.digest, e.created_at)

    def crew_of(self, session: Session, code: str | None = None) -> Crew:
        """
        The crew of C{code} if C{session} is in it, else its primary crew.

        @raise NotInCrew: it is in no crew, or not in that one.
        """
        if code is not None:
            return self.crews.held(session, code).crew
        if session.primary is None:
            raise NotInCrew("join or create a crew before sending crew messages")
        return session.primary.crew

    def look_up_sent(self, session: Session, client_msg_id: str | None,
                     code: str | None = None) -> Deferred | None:
        """
        Ask the store whether C{client_msg_id} from C{session}'s device is
        already in its crew's log when the relay does not hold it (it was
        sent through another node); return the wait, or C{None} when there
        is none (held already, or answered at once).
        """
        if client_msg_id is None:
            return None
        crew = self.crew_of(session, code)
        key = (session.device_id, client_msg_id)
        if crew.client_messages is not None and key in crew.client_messages:
            return None
        answer = self.store.find_sent(crew.code, session.device_id, client_msg_id)
        if answer is None:
            return None
        if isinstance(answer, Deferred):
            return answer.addCallback(self._adopt_sent, crew, key)
        self._adopt_sent(answer, crew, key)
        return None

    @staticmethod
    def _adopt_sent(entry: LogEntry | None, crew: Crew, key: tuple[str, str]) -> None:
        if entry is not None and (crew.client_messages is None or key not in crew.client_messages):
            if crew.client_messages is None:
                crew.client_messages = {}
            crew.client_messages[key] = ClientMessage(entry.id, entry.seq, entry.digest, entry.created_at)

    def send(self, session: Session, message: Fanout, client_msg_id: str | None, received: Any,
             size: int, answer: bool = False) -> Deferred | None:
        """
        C{session}'s crew message (C{received}, as decoded, about C{size}
        bytes) to the crew it names (its C{crew_code}) or else its primary
        crew, as C{message}; a resend of a C{client_msg_id} already stored
        is answered C{sent} again (C{None} is returned).  With C{answer}, the
        sender is answered C{sent} also without a C{client_msg_id}.
        """
        crew = self.crew_of(session, getattr(received, "crew_code", None))
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
                    session.send(messages.Sent(client_msg_id, known.id, known.seq, crew.code))
                else:
                    known.waiting.append(session)
                return None
        return self.publish(crew, message, session.device_id, session, client_msg_id, digest, size, answer)

    def publish(self, crew: Crew, message: Fanout, sender_id: str, session: Session | None = None,
                client_msg_id: str | None = None, digest: bytes | None = None, size: int = 0,
                answer: bool = False) -> Deferred:
        """
        Store C{message} (about C{size} bytes) in C{crew}'s log, then fan it
        out to the crew (but C{session}, its sender).  Fires with the number
        of devices reached, or fails with L{StoreUnavailable}: then nothing
        was delivered, and no sequence number was spent on it.
        """
        now = self.clock.seconds()
        kind = _KIND_OF_TYPE.get(type(message))
        if kind is None:
            kind = message.msg_type if message.msg_type in _KNOWN_KINDS else "other"
        self.received[kind] += 1
        message_id = self._new_message_id()
        remembered = None
        if client_msg_id is not None:
            if crew.client_messages is None:
                crew.client_messages = {}
            remembered = crew.client_messages[(sender_id, client_msg_id)] = ClientMessage(
                message_id, 0, digest, now, [])
        entry = Publication(self.store.sequences, crew, message, message_id, sender_id, client_msg_id, digest, now, remembered)
        entry.answer = answer
        d = self.journal.put((APPEND, entry), size=size)
        if session is not None and self.journal.backlog > self.store_queue_bytes and session not in self.paused:
            # The store is behind: read no more from this sender until it
            # catches up, rather than hold what it sends.
            self.paused.add(session)
            session.peer.pause_reading()
        return d.addCallbacks(self._stored, self._not_stored, callbackArgs=(entry, session),
                              errbackArgs=(entry,))

    def _stored(self, _: Any, entry: Publication, session: Session | None) -> int:
        if entry.stored_before:
            self._answer(entry, session)
            return 0
        crew, seq, out = entry.crew, entry.seq, entry.out
        crew.fanned_seq = seq
        crew.last_message_at = self.clock.seconds()
        self._logged(crew, len(out.payload))
        if session is not None:
            membership = session.membership(crew.code)
            if membership is not None and membership.crew is crew:
                # The sender never gets its own message: it counts as sent
                # to it, in its place (after what it is still catching up on).
                if membership.held is not None:
                    membership.held.append((seq, None))
                else:
                    membership.last_sent_seq = max(membership.last_sent_seq, seq)
        reached = self.crews.fanout.publish(crew.code, out, session, seq)
        self.deliveries += reached
        self._until_sample -= 1
        if not self._until_sample:
            self._until_sample = self.sample_every
            self.fanout_seconds.observe(max(0.0, self.clock.seconds() - entry.created_at))
        self._answer(entry, session)
        return reached

    @staticmethod
    def _answer(entry: Publication, session: Session | None) -> None:
        code, remembered = entry.crew.code, entry.remembered
        if remembered is not None:
            waiting, remembered.waiting = remembered.waiting, None
            reply = messages.Sent(entry.client_msg_id, remembered.id, remembered.seq, code)
            for s in [session, *waiting]:
                if s is not None:
                    s.send(reply)
        elif entry.answer and session is not None and not session.closing:
            session.send(messages.Sent(None, entry.id, entry.seq, code))

    def _not_stored(self, failure: Any, entry: Publication) -> None:
        crew, client_msg_id, remembered = entry.crew, entry.client_msg_id, entry.remembered
        _log.error("a message to crew {crew_code} was not stored: {error}",
                   crew_code=crew.code, error=failure.getErrorMessage())
        if entry.seq:
            # Its whole batch failed, and no later batch has been numbered
            # yet: the next message takes the first sequence this one had.
            self.store.sequences.failed(entry.code, entry.seq)
        extra = {} if client_msg_id is None else {"client_msg_id": client_msg_id}
        if remembered is not None:
            crew.client_messages.pop((entry.sender, client_msg_id), None)
            for s in remembered.waiting or ():
                s.send(StoreUnavailable("the message could not be stored; send it again", **extra).as_frame())
        raise StoreUnavailable("the message could not be stored and was not delivered; send it again", **extra)

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

    @staticmethod
    def _trim_bug(failure: Any, crew: Crew) -> None:
        # The next message past the bound tries again.
        crew.trimming = None
        _log.failure("bug while trimming crew {crew_code}'s log", failure, crew_code=crew.code)

    @staticmethod
    def _trimmed(result: tuple[int, int], crew: Crew) -> None:
        first_kept, left = result
        crew.log_bytes, crew.trimming = left + crew.trimming, None
        if crew.client_messages:
            # What the log no longer holds cannot be answered as a resend.
            for key in [k for k, v in crew.client_messages.items() if v.waiting is None and v.seq < first_kept]:
                del crew.client_messages[key]

    @staticmethod
    def _not_trimmed(failure: Any, crew: Crew) -> None:
        crew.trimming = None
        _log.warn("could not trim crew {crew_code}'s log: {error}",
                  crew_code=crew.code, error=failure.getErrorMessage())
