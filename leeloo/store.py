"""
Durable state behind one interface: L{IStore}, the records it keeps, the
in-memory L{MemoryStore}, and the L{Journal} that batches writes into group
commits.

The relay keeps its working state in memory and writes every change through
the journal; a store only persists and reads back.  L{leeloo.sqlitestore}
has the SQLite implementation; one contract test suite runs against both.
"""

from __future__ import annotations

import bisect
import functools
import json
from dataclasses import dataclass, field, replace
from typing import Any, Callable

from twisted.internet.defer import Deferred, fail, maybeDeferred, succeed
from twisted.logger import Logger
from zope.interface import Attribute, Interface, implementer

from leeloo.figures import Histogram, HistogramFigures

_log = Logger()


# ---------------------------------------------------------------- records


@dataclass(slots=True)
class CrewRecord:
    code: str
    created_at: float
    created_by: str | None
    # What create_crew named it, or None.
    name: str | None = None


@dataclass(slots=True)
class MemberRecord:
    crew_code: str
    device_id: str
    name: str
    last_seen: float
    delivered_seq: int = 0
    acked_seq: int | None = None
    online: bool = False


@dataclass(frozen=True, slots=True)
class MultiCrewRecord:
    """
    A multi-crew device (it sent C{crew_add}: entering a crew adds one
    instead of moving it there) and the crews it is in now: their codes in
    the order it joined them, and its primary crew's (C{None} while it is
    in none).  A device's member rows of other crews (those a legacy device
    moved out of) are history, not memberships; a device with no such
    record is a legacy one.
    """

    device_id: str
    crews: tuple[str, ...]
    primary: str | None


@dataclass(slots=True)
class BotUserRecord:
    crew_code: str
    user_id: str
    name: str


@dataclass(slots=True)
class TokenRecord:
    device_id: str
    tokens: dict
    expires_at: float


@dataclass(slots=True)
class GrantRecord:
    """
    The Spotify access the relay holds for a device with its owner's
    consent (issue 20): C{sealed} is ciphertext (L{leeloo.sealing}), opaque
    to the engine, which keeps it unchanged.
    """

    device_id: str
    sealed: str = field(repr=False)


@dataclass(slots=True)
class DeviceRecord:
    """
    A device id's key: only its hash is kept.  C{bound} once the device
    has presented it.
    """

    device_id: str
    key_hash: str
    bound: bool
    created_at: float
    # When it last registered outside any crew (a member is seen through
    # its memberships); None: when it was created.
    last_seen: float | None = None


@dataclass(frozen=True, slots=True)
class PairingRecord:
    """
    One Spotify pairing flow (see L{leeloo.core.pairing}): the device that
    asked and what its phone is shown, and once the phone's button was
    pressed, the hashes of the one-time C{state} and of the phone's cookie,
    and the PKCE verifier (C{None} without PKCE).
    """

    user_code: str
    device_id: str
    device_name: str
    crew_code: str | None
    scopes: str
    created_at: float
    expires_at: float
    state_hash: str | None = None
    cookie_hash: str | None = None
    verifier: str | None = field(default=None, repr=False)
    # The device offered to let the relay keep the access (issue 20), and
    # the phone's box said yes.
    keep_offered: bool = False
    keep: bool = False


@dataclass(slots=True)
class LogEntry:
    crew_code: str
    seq: int
    id: str
    sender: str
    client_msg_id: str | None
    digest: bytes | None
    created_at: float
    payload: bytes
    # A nudge or a reaction (see leeloo.messages.is_ephemeral).
    ephemeral: bool = False
    # For an engine that mints the number itself (Sequences.engine_mints):
    # called with the number it gave, when that is not C{seq}, before the
    # write's Deferred fires, so that the entry's sender stamps it again;
    # called with the number and id of the entry already stored for its
    # sender and client_msg_id (a resend through another node at the same
    # time), when the engine stored it not again.
    renumber: Callable[..., Any] | None = field(default=None, repr=False, compare=False)


@dataclass
class Snapshot:
    """
    Everything a relay needs at start, read back from a store.  C{last_seq}
    and C{last_message_at} are per crew; C{client_messages} are the log
    entries that carry a C{client_msg_id} (without their payloads).
    """

    crews: list[CrewRecord] = field(default_factory=list)
    members: list[MemberRecord] = field(default_factory=list)
    bot_users: list[BotUserRecord] = field(default_factory=list)
    tokens: list[TokenRecord] = field(default_factory=list)
    # The Spotify grants the store holds (read at start to check the
    # secrets key opens them; the core looks each up, ITokenStore.find_grant).
    grants: list[GrantRecord] = field(default_factory=list)
    devices: list[DeviceRecord] = field(default_factory=list)
    last_seq: dict[str, int] = field(default_factory=dict)
    last_message_at: dict[str, float] = field(default_factory=dict)
    client_messages: list[LogEntry] = field(default_factory=list)
    # The bytes of payload in each crew's log.
    log_bytes: dict[str, int] = field(default_factory=dict)
    pairings: list[PairingRecord] = field(default_factory=list)
    multi_crew: list[MultiCrewRecord] = field(default_factory=list)
    # The codes crews were renamed from: old code -> the crew's code now.
    aliases: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Replay:
    """
    What a returning device missed: C{entries} as C{(seq, payload)} in
    order, and C{lost} as C{(from_seq, to_seq)} when the limit cut older
    ones off.
    """

    entries: list[tuple[int, bytes]]
    lost: tuple[int, int] | None = None


# Write operations: (kind, argument) pairs, applied in order in one
# transaction.
PUT_CREW = "crew"  # CrewRecord
DELETE_CREW = "delete_crew"  # crew code, with its members, bot users and log
PUT_MEMBER = "member"  # MemberRecord
DELETE_MEMBER = "delete_member"  # (crew code, device id)
PUT_BOT_USER = "bot_user"  # BotUserRecord
PUT_TOKEN = "token"  # TokenRecord
DELETE_TOKEN = "delete_token"  # device id
APPEND = "append"  # LogEntry
PUT_DEVICE = "device"  # DeviceRecord
DELETE_DEVICE = "delete_device"  # device id
PUT_MULTI_CREW = "multi_crew"  # MultiCrewRecord
PUT_GRANT = "grant"  # GrantRecord
DELETE_GRANT = "delete_grant"  # device id
DELETE_MULTI_CREW = "delete_multi_crew"  # device id
# (old code, new code): the crew moves with its members, bot users and log;
# the old code becomes an alias of the new one (see Snapshot.aliases).
RENAME_CREW = "rename_crew"
PUT_ALIAS = "alias"  # (old code, the crew's code now)


class StoreError(Exception):
    """
    The store could not do what was asked: for now (a full disk, a locked
    database: C{transient}) or for good (the operation itself is wrong).
    """

    def __init__(self, message: str, transient: bool = True) -> None:
        super().__init__(message)
        self.transient = transient


class Sequences:
    """
    Each crew's last sequence number, as the engine knows it: the message
    log mints them.  A number is minted when its entry's batch forms, and
    given back when the batch fails (no later batch is formed while one is
    being written), so no number is skipped; a crew deleted starts again at 1.
    """

    # Whether the engine mints the numbers itself, atomically as it stores
    # each entry (Redis: several relays share one log): then C{next} is a
    # proposal, and an entry numbered otherwise is renumbered
    # (L{LogEntry.renumber}).
    engine_mints = False

    def __init__(self, last: dict[str, int] | None = None) -> None:
        self._last: dict[str, int] = dict(last or {})

    def next(self, crew_code: str) -> int:
        seq = self._last[crew_code] = self._last.get(crew_code, 0) + 1
        return seq

    def last(self, crew_code: str) -> int:
        return self._last.get(crew_code, 0)

    def seen(self, crew_code: str, seq: int) -> None:
        """
        The log holds C{seq} for C{crew_code}: mint only later ones.
        """
        if seq > self._last.get(crew_code, 0):
            self._last[crew_code] = seq

    def failed(self, crew_code: str, seq: int) -> None:
        if self._last.get(crew_code, 0) >= seq:
            self._last[crew_code] = seq - 1

    def forget(self, crew_code: str) -> None:
        self._last.pop(crew_code, None)


class ICrewStore(Interface):
    """
    Crews, their members and bot users, and the crews of multi-crew
    devices (L{MultiCrewRecord}), as the engine holds them.
    """

    def find_crew(code: str) -> Deferred:
        """
        Everything of crew C{code} as L{load} gives it, for that crew alone
        (a L{Snapshot}), or C{None} when the engine has no such crew: how a
        relay learns of a crew it does not hold (another node made it).  For
        the old code of a renamed crew: that crew under its code now, with
        the alias (C{aliases}).

        Like every C{find_*}: a Deferred firing with the answer, or the
        answer itself when the store knows it without asking (an engine in
        memory, or one whose only writer is this relay).
        """


class IDeviceStore(Interface):
    """
    Device ids and their keys.
    """

    def find_device(device_id: str) -> Deferred:
        """
        C{device_id}'s L{DeviceRecord}, or C{None}.
        """


class ITokenStore(Interface):
    """
    Spotify tokens parked for devices that were offline.
    """

    def find_token(device_id: str) -> Deferred:
        """
        The L{TokenRecord} parked for C{device_id}, or C{None}.
        """

    def find_grant(device_id: str) -> Deferred:
        """
        The L{GrantRecord} the relay holds for C{device_id}, or C{None}
        (a value or a Deferred of one).
        """


class IMessageLog(Interface):
    """
    Each crew's message log: sequence numbers minted by the engine, what a
    returning device missed, and the log's bounds.
    """

    sequences = Attribute(
        "The crews' sequence numbers (a L{Sequences}): C{next(code)} mints the "
        "next for an entry of the crew's log as its batch forms (atomic per crew: "
        "one writer mints them all), C{failed(code, seq)} gives back what a failed "
        "batch took, C{forget(code)} starts a deleted crew's again.")

    def replay(
        crew_code: str, after_seq: int, up_to_seq: int, since: float, exclude_sender: str, limit: int,
        ephemeral_since: float | None = None,
    ) -> Deferred:
        """
        The newest C{limit} log entries of C{crew_code} with C{after_seq <
        seq <= up_to_seq}, created at or after C{since} (ephemeral ones at
        or after C{ephemeral_since} too, when given), not sent by
        C{exclude_sender}, as a L{Replay}.
        """

    def find_sent(crew_code: str, sender: str, client_msg_id: str) -> Deferred:
        """
        The entry (without its payload) that C{sender} sent to C{crew_code}
        with C{client_msg_id}, while the log holds it; or C{None}: how a
        resend through another node is known for one.
        """

    def prune(log_before: float) -> Deferred:
        """
        Delete log entries created before C{log_before}, keeping each crew's
        newest (so that its sequence survives a restart); fire with the
        number deleted.
        """

    def trim(crew_code: str, max_bytes: int, keep: int) -> Deferred:
        """
        Delete C{crew_code}'s oldest log entries until the payloads of the
        rest come to at most C{max_bytes}, but never the newest C{keep}
        (at least one); fire with C{(first_kept_seq, bytes_left)}
        (C{first_kept_seq} is 0 for an empty log).
        """


class IStore(ICrewStore, IDeviceStore, ITokenStore, IMessageLog):
    """
    The whole store: the narrow parts above, what is read at start, and the
    batched writes (L{Journal}) that change every part in one transaction.

    A store may also have C{gather_writes}: the seconds a write put while
    none is being committed waits for others to share its commit (none
    when it has no such attribute), timed on its C{gather_clock}.
    """

    pairings = Attribute("The store's L{IPairings}.")

    def load() -> Snapshot:
        """
        Read everything back (once, at start, before serving).
        """

    def write(ops: list) -> Deferred:
        """
        Apply C{ops} in one transaction; fail with L{StoreError}.
        """

    def close() -> Deferred:
        """
        Release the store.
        """


class IPairings(Interface):
    """
    Where Spotify pairing flows are kept (a store's C{pairings}): by their
    user code, each written as a whole.  They are read back with the rest
    of the state (L{Snapshot.pairings}).
    """

    def put(record: PairingRecord) -> Deferred:
        """
        Keep C{record}, replacing the flow with its user code; fire once it
        is durable, or fail with L{StoreError}.
        """

    def delete(user_code: str) -> Deferred:
        """
        Forget the flow with C{user_code} (nothing when there is none);
        fire once that is durable.
        """

    def delete_expired(now: float) -> Deferred:
        """
        Forget every flow that expired at or before C{now}; fire with how
        many.
        """


@implementer(IPairings)
class MemoryPairings:
    """
    Pairing flows in a dict (C{flows}: user code -> record).  C{fail} is
    called before each write; what it returns, if anything, is the
    exception the write fails with (L{leeloo.testing.FailingMemoryStore}).
    """

    def __init__(self, fail: Callable[[], Exception | None] = lambda: None) -> None:
        self.flows: dict[str, PairingRecord] = {}
        self._fail = fail

    def _refused(self) -> Deferred | None:
        error = self._fail()
        return fail(StoreError(str(error))) if error is not None else None

    def put(self, record: PairingRecord) -> Deferred:
        refused = self._refused()
        if refused is not None:
            return refused
        self.flows[record.user_code] = record
        return succeed(None)

    def delete(self, user_code: str) -> Deferred:
        refused = self._refused()
        if refused is not None:
            return refused
        self.flows.pop(user_code, None)
        return succeed(None)

    def delete_expired(self, now: float) -> Deferred:
        refused = self._refused()
        if refused is not None:
            return refused
        stale = [code for code, record in self.flows.items() if record.expires_at <= now]
        for code in stale:
            del self.flows[code]
        return succeed(len(stale))


def _replay_window(
    entries: list[tuple[int, bytes]], after_seq: int, limit: int
) -> Replay:
    """
    Cut C{entries} (eligible, oldest first) to the newest C{limit}.
    """
    if len(entries) <= limit:
        return Replay(entries)
    kept = entries[len(entries) - limit:] if limit else []
    first_kept = kept[0][0] if kept else entries[-1][0] + 1
    return Replay(kept, (after_seq + 1, first_kept - 1))


@implementer(IStore)
class MemoryStore:
    """
    Keeps everything in dicts: for tests, benchmarks and relays that need no
    durability.
    """

    def __init__(self) -> None:
        self.crews: dict[str, CrewRecord] = {}
        self.members: dict[tuple[str, str], MemberRecord] = {}
        self.bot_users: dict[tuple[str, str], BotUserRecord] = {}
        self.tokens: dict[str, TokenRecord] = {}
        self.grants: dict[str, GrantRecord] = {}
        self.devices: dict[str, DeviceRecord] = {}
        self.multi_crew: dict[str, MultiCrewRecord] = {}
        self.log: dict[str, list[LogEntry]] = {}
        self.sequences = Sequences()
        # (crew code, sender, client_msg_id) -> its entry in the log
        self._sent: dict[tuple[str, str, str], LogEntry] = {}
        self.pairings = MemoryPairings(self._pairings_fail)
        self.aliases: dict[str, str] = {}

    def _pairings_fail(self) -> Exception | None:
        return None

    def load(self) -> Snapshot:
        snapshot = Snapshot(
            crews=list(self.crews.values()),
            members=[MemberRecord(**_fields(m)) for m in self.members.values()],
            bot_users=list(self.bot_users.values()),
            tokens=list(self.tokens.values()),
            grants=list(self.grants.values()),
            devices=list(self.devices.values()),
            pairings=list(self.pairings.flows.values()),
            multi_crew=list(self.multi_crew.values()),
            aliases=dict(self.aliases),
        )
        for code, entries in self.log.items():
            if entries:
                snapshot.last_seq[code] = entries[-1].seq
                snapshot.last_message_at[code] = entries[-1].created_at
                snapshot.log_bytes[code] = sum(len(e.payload) for e in entries)
            snapshot.client_messages.extend(
                replace(e, payload=b"") for e in entries if e.client_msg_id is not None)
        # Relays sharing this store (nodes of one engine, in tests) share its
        # sequences: loading again only catches up with the log.
        for code, seq in snapshot.last_seq.items():
            self.sequences.seen(code, seq)
        return snapshot

    def write(self, ops: list) -> Deferred:
        """
        Apply C{ops} all or none, like one SQL transaction: an operation that
        fails undoes the ones before it.  The constraints of the SQLite
        schema hold here too: one entry per crew and sequence, and no
        member, bot user or log entry without its crew.
        """
        undo: list[Callable[[], Any]] = []
        try:
            for kind, arg in ops:
                self._apply(kind, arg, undo)
        except Exception:
            for action in reversed(undo):
                action()
            return fail()
        return succeed(None)

    def find_crew(self, code: str) -> Snapshot | None:
        aliases = {}
        if code not in self.crews:
            target = self.aliases.get(code)
            if target not in self.crews:
                return None
            aliases, code = {code: target}, target
        snapshot = Snapshot(
            crews=[self.crews[code]],
            aliases=aliases,
            members=[MemberRecord(**_fields(m)) for (c, _), m in self.members.items() if c == code],
            bot_users=[b for (c, _), b in self.bot_users.items() if c == code],
        )
        entries = self.log.get(code)
        if entries:
            snapshot.last_seq[code] = entries[-1].seq
            snapshot.last_message_at[code] = entries[-1].created_at
            snapshot.log_bytes[code] = sum(len(e.payload) for e in entries)
            snapshot.client_messages = [replace(e, payload=b"") for e in entries if e.client_msg_id is not None]
        return snapshot

    def find_device(self, device_id: str) -> DeviceRecord | None:
        return self.devices.get(device_id)

    def find_token(self, device_id: str) -> TokenRecord | None:
        return self.tokens.get(device_id)

    def find_grant(self, device_id: str) -> GrantRecord | None:
        return self.grants.get(device_id)

    def find_sent(self, crew_code: str, sender: str, client_msg_id: str) -> LogEntry | None:
        entry = self._sent.get((crew_code, sender, client_msg_id))
        return None if entry is None else replace(entry, payload=b"")

    def _index_sent(self, crew_code: str) -> None:
        """
        Index again what crew C{crew_code}'s log holds (entries went).
        """
        for key in [k for k in self._sent if k[0] == crew_code]:
            del self._sent[key]
        for e in self.log.get(crew_code, ()):
            if e.client_msg_id is not None:
                self._sent[(crew_code, e.sender, e.client_msg_id)] = e

    def _apply(self, kind: str, arg: Any, undo: list) -> None:
        if kind == PUT_CREW:
            undo.append(_restorer(self.crews, arg.code))
            self.crews[arg.code] = arg
        elif kind == DELETE_CREW:
            undo.append(_restorer(self.crews, arg))
            undo.append(_restorer(self.log, arg))
            self.crews.pop(arg, None)
            if self.log.pop(arg, None):
                undo.append(functools.partial(self._index_sent, arg))
                self._index_sent(arg)
            for table in (self.members, self.bot_users):
                for key in [k for k in table if k[0] == arg]:
                    undo.append(_restorer(table, key))
                    del table[key]
            for alias in [a for a, code in self.aliases.items() if code == arg]:
                undo.append(_restorer(self.aliases, alias))
                del self.aliases[alias]
        elif kind == RENAME_CREW:
            self._rename(*arg, undo)
        elif kind == PUT_ALIAS:
            self._check_crew(arg[1])
            undo.append(_restorer(self.aliases, arg[0]))
            self.aliases[arg[0]] = arg[1]
        elif kind == PUT_MEMBER:
            self._check_crew(arg.crew_code)
            key = (arg.crew_code, arg.device_id)
            undo.append(_restorer(self.members, key))
            self.members[key] = MemberRecord(**_fields(arg))
        elif kind == DELETE_MEMBER:
            undo.append(_restorer(self.members, arg))
            self.members.pop(arg, None)
        elif kind == PUT_MULTI_CREW:
            undo.append(_restorer(self.multi_crew, arg.device_id))
            self.multi_crew[arg.device_id] = arg
        elif kind == DELETE_MULTI_CREW:
            undo.append(_restorer(self.multi_crew, arg))
            self.multi_crew.pop(arg, None)
        elif kind == PUT_BOT_USER:
            self._check_crew(arg.crew_code)
            key = (arg.crew_code, arg.user_id)
            undo.append(_restorer(self.bot_users, key))
            self.bot_users[key] = arg
        elif kind == PUT_TOKEN:
            undo.append(_restorer(self.tokens, arg.device_id))
            self.tokens[arg.device_id] = arg
        elif kind == PUT_DEVICE:
            undo.append(_restorer(self.devices, arg.device_id))
            self.devices[arg.device_id] = arg
        elif kind == DELETE_DEVICE:
            undo.append(_restorer(self.devices, arg))
            self.devices.pop(arg, None)
        elif kind == DELETE_TOKEN:
            undo.append(_restorer(self.tokens, arg))
            self.tokens.pop(arg, None)
        elif kind == PUT_GRANT:
            undo.append(_restorer(self.grants, arg.device_id))
            self.grants[arg.device_id] = arg
        elif kind == DELETE_GRANT:
            undo.append(_restorer(self.grants, arg))
            self.grants.pop(arg, None)
        elif kind == APPEND:
            self._check_crew(arg.crew_code)
            entries = self.log.get(arg.crew_code)
            if entries is None:
                undo.append(_restorer(self.log, arg.crew_code))
                entries = self.log[arg.crew_code] = []
            # Kept in sequence order; the relay appends in that order.
            i = len(entries)
            if entries and entries[-1].seq >= arg.seq:
                i = bisect.bisect_left(entries, arg.seq, key=_seq)
                if entries[i].seq == arg.seq:
                    raise StoreError(f"crew {arg.crew_code}'s log already holds sequence {arg.seq}")
            entries.insert(i, arg)
            undo.append(functools.partial(entries.pop, i))
            if arg.client_msg_id is not None:
                key = (arg.crew_code, arg.sender, arg.client_msg_id)
                undo.append(_restorer(self._sent, key))
                self._sent[key] = arg
        else:
            raise ValueError(f"unknown store operation {kind!r}")

    def _check_crew(self, code: str) -> None:
        if code not in self.crews:
            raise StoreError(f"no crew {code}")

    def _rename(self, old: str, new: str, undo: list) -> None:
        self._check_crew(old)
        if new in self.crews:
            raise StoreError(f"crew {new} exists already", transient=False)
        tables = ("crews", "members", "bot_users", "log", "_sent", "aliases")
        saved = {name: dict(getattr(self, name)) for name in tables}
        undo.append(lambda: [setattr(self, name, table) for name, table in saved.items()])
        self.crews[new] = replace(self.crews.pop(old), code=new)
        for table in (self.members, self.bot_users):
            for key in [k for k in table if k[0] == old]:
                table[(new, key[1])] = replace(table.pop(key), crew_code=new)
        entries = self.log.pop(old, None)
        if entries is not None:
            self.log[new] = [replace(e, crew_code=new) for e in entries]
        self._index_sent(old)
        self._index_sent(new)
        for alias, code in list(self.aliases.items()):
            if code == old:
                self.aliases[alias] = new
        self.aliases.pop(new, None)
        self.aliases[old] = new

    def replay(
        self, crew_code: str, after_seq: int, up_to_seq: int, since: float, exclude_sender: str, limit: int,
        ephemeral_since: float | None = None,
    ) -> Deferred:
        if ephemeral_since is None:
            ephemeral_since = since
        entries = [
            (e.seq, e.payload)
            for e in self.log.get(crew_code, ())
            if after_seq < e.seq <= up_to_seq and e.created_at >= since and e.sender != exclude_sender
            and (not e.ephemeral or e.created_at >= ephemeral_since)
        ]
        return succeed(_replay_window(entries, after_seq, limit))

    def prune(self, log_before: float) -> Deferred:
        deleted = 0
        for code, entries in self.log.items():
            keep = [e for e in entries[:-1] if e.created_at >= log_before] + entries[-1:]
            if len(keep) != len(entries):
                deleted += len(entries) - len(keep)
                self.log[code] = keep
                self._index_sent(code)
        return succeed(deleted)

    def trim(self, crew_code: str, max_bytes: int, keep: int) -> Deferred:
        entries = self.log.get(crew_code, [])
        first, left = _trim_point([len(e.payload) for e in entries], max_bytes, keep)
        if first:
            del entries[:first]
            self._index_sent(crew_code)
        return succeed((entries[0].seq if entries else 0, left))

    def close(self) -> Deferred:
        return succeed(None)


def _trim_point(sizes: list[int], max_bytes: int, keep: int) -> tuple[int, int]:
    """
    For log entries of C{sizes} (oldest first): how many of the oldest to
    delete so the rest fit C{max_bytes}, keeping at least the newest
    C{keep} (and one); and the bytes left.
    """
    keep = max(1, keep)
    total = 0
    first = len(sizes)
    for i in range(len(sizes) - 1, -1, -1):
        if total + sizes[i] > max_bytes and len(sizes) - i > keep:
            break
        total += sizes[i]
        first = i
    return first, total


def _restorer(table: dict, key: Any) -> Callable[[], Any]:
    """
    An undo action that puts C{table[key]} back as it is now.
    """
    if key in table:
        return functools.partial(table.__setitem__, key, table[key])
    return functools.partial(table.pop, key, None)


def _seq(entry: LogEntry) -> int:
    return entry.seq


def _fields(record: Any) -> dict:
    return {name: getattr(record, name) for name in record.__slots__}


def encode_tokens(tokens: dict) -> str:
    return json.dumps(tokens, separators=(",", ":"))


@dataclass(frozen=True, slots=True)
class JournalStats:
    """
    The journal's figures: operations waiting for the store (queued, or
    in the batch being committed), their bytes as the putters counted
    them, and how long batches took to commit.
    """

    queue_depth: int
    queue_bytes: int
    batch_seconds: HistogramFigures


class Journal:
    """
    Batches writes into group commits: while one batch is being committed,
    new operations queue up and go together in the next.  Each operation's
    Deferred fires, in order, once its batch is durable.

    Operations put with a C{key} replace a still-queued operation with the
    same key (a member's acknowledged sequence, say, is written once per
    batch however often it moved), and take its place in the queue at their
    own put: a batch applies as if every operation were applied in the order
    it was put.  A batch that fails fails the Deferreds of its operations;
    the state operations among them (everything but appends to the log)
    are queued again and retried after C{retry_delay}.
    """

    def __init__(self, store: IStore, clock: Any, retry_delay: float = 1.0, gather: float = 0.0,
                 gather_clock: Any = None) -> None:
        self.store = store
        self.clock = clock
        self.retry_delay = retry_delay
        # Seconds an operation put while nothing is being committed waits
        # for others to share its batch (what is put during a commit goes
        # at once after it): a store whose every commit costs a round trip
        # to its thread says how long (L{IStore}'s C{gather_writes}), timed
        # on the clock that thread answers on.
        self.gather = gather
        self.gather_clock = clock if gather_clock is None else gather_clock
        self._gathering: Any = None
        # (operation, Deferred); (None, d) is a barrier, (None, None) the
        # place of a keyed operation put again since.
        self._queue: list[tuple[tuple[str, Any] | None, Deferred | None]] = []
        # key -> where in the queue that key's operation is
        self._keyed: dict[Any, int] = {}
        self._committing = False
        self._retry: Any = None
        self._failing = False
        # Bytes (as the putters count them) queued, and in the batch being
        # committed; called with nothing after each batch.
        self._queued_bytes = 0
        self._batch_bytes = 0
        self.on_batch: Callable[[], Any] | None = None
        # For the metrics: how long each batch took to commit, and the
        # operations of the batch being committed.
        self.batch_seconds = Histogram()
        self._batch_ops = 0
        self._batch_started = 0.0

    @property
    def backlog(self) -> int:
        """
        The bytes of the operations queued or being committed.
        """
        return self._queued_bytes + self._batch_bytes

    def put(self, op: tuple[str, Any], key: Any = None, wait: bool = True, size: int = 0) -> Deferred | None:
        """
        Queue C{op} (of about C{size} bytes); return a Deferred that fires
        once it is durable (or C{None} when C{wait} is false).
        """
        self._queued_bytes += size
        if key is not None:
            queued = self._keyed.get(key)
            if queued is not None:
                self._queue[queued] = (None, None)
            self._keyed[key] = len(self._queue)
            self._queue.append((op, None))
            d = None
        else:
            d = Deferred() if wait else None
            self._queue.append((op, d))
        self._flush()
        return d

    def barrier(self) -> Deferred:
        """
        A Deferred that fires once everything queued so far is durable.
        """
        if not self._committing and not self._queue:
            return succeed(None)
        d = Deferred()
        self._queue.append((None, d))
        self._flush()
        return d

    @property
    def idle(self) -> bool:
        return not (self._committing or self._queue)

    def stats(self) -> JournalStats:
        """
        The journal's figures now (the queue is counted here, at scrape
        time, not as it changes).
        """
        queued = sum(op is not None for op, _ in self._queue)
        return JournalStats(queued + self._batch_ops, self.backlog, self.batch_seconds.figures())

    def _flush(self, now: bool = False) -> None:
        if self._committing or self._retry is not None or not self._queue:
            return
        if not now and self.gather > 0:
            if self._gathering is None:
                self._gathering = self.gather_clock.callLater(self.gather, self._gathered)
            return
        if self._gathering is not None:
            self._gathering.cancel()
            self._gathering = None
        batch, self._queue, self._keyed = self._queue, [], {}
        self._batch_bytes, self._queued_bytes = self._queued_bytes, 0
        self._committing = True
        # An argument may be a callable that makes it (a log entry gets its
        # sequence number when its batch is formed).
        ops = [(kind, arg() if callable(arg) else arg) for (kind, arg), _ in
               ((op, d) for op, d in batch if op is not None)]
        self._batch_ops, self._batch_started = len(ops), self.clock.seconds()
        d = maybeDeferred(self.store.write, ops) if ops else succeed(None)
        d.addCallbacks(self._committed, self._failed, callbackArgs=(batch,), errbackArgs=(batch,))
        d.addErrback(self._bug)

    def _gathered(self) -> None:
        self._gathering = None
        self._flush(now=True)

    def _bug(self, failure: Any) -> None:
        """
        A bug after a batch was settled (in C{on_batch}, the last step, so
        the journal's own state is whole): log it, and keep committing.
        """
        _log.failure("bug after a store batch was settled", failure)
        if not self._committing and self._queue and self._retry is None:
            self._retry = self.clock.callLater(self.retry_delay, self._retry_now)

    def _batch_done(self) -> None:
        if self._batch_ops:
            self.batch_seconds.observe(max(0.0, self.clock.seconds() - self._batch_started))
            self._batch_ops = 0

    def _committed(self, _: Any, batch: list) -> None:
        self._batch_done()
        if self._failing:
            self._failing = False
            _log.info("the store is writable again")
        for _, d in batch:
            if d is not None:
                d.callback(None)
        self._committing = False
        self._batch_bytes = 0
        # What queued meanwhile has waited a commit already.
        self._flush(now=True)
        if self.on_batch is not None:
            self.on_batch()

    def _failed(self, failure: Any, batch: list) -> None:
        self._batch_done()
        if not self._failing:
            self._failing = True
            _log.error("the store failed to commit {count} operations: {error}",
                       count=sum(op is not None for op, _ in batch), error=failure.getErrorMessage())
        transient = not failure.check(StoreError) or failure.value.transient
        if transient:
            retry = [(op, None) for op, _ in batch if op is not None and op[0] != APPEND]
        else:
            # Retrying an operation the store refuses for good would fail
            # every batch after it: drop the batch's state operations.
            _log.error("dropped {count} state operations the store refused for good",
                       count=sum(op is not None and op[0] != APPEND for op, _ in batch))
            retry = []
        self._queue[:0] = retry
        self._keyed = {key: i + len(retry) for key, i in self._keyed.items()}
        error = StoreError(failure.getErrorMessage())
        for _, d in batch:
            if d is not None:
                d.errback(error)
        self._committing = False
        self._batch_bytes = 0
        if self._queue:
            self._retry = self.clock.callLater(self.retry_delay, self._retry_now)
        if self.on_batch is not None:
            self.on_batch()

    def _retry_now(self) -> None:
        self._retry = None
        self._flush(now=True)

    def drain(self) -> Deferred:
        """
        Fire once nothing is queued or being committed (retries included).
        """
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None
        d = self.barrier()
        self._flush(now=True)
        return d
