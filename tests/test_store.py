"""
The IStore contract, one suite run against every store: what is written
comes back after a restart, deletes cascade, replay windows and pruning
select the right log entries, and one write() is one transaction.
"""

import os

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks, succeed
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface.verify import verifyObject

from leeloo.sqlitestore import SQLiteStore
from leeloo.store import (
    DELETE_GRANT,
    PUT_GRANT,
    GrantRecord,
    APPEND,
    DELETE_CREW,
    DELETE_DEVICE,
    DELETE_MEMBER,
    DELETE_MULTI_CREW,
    DELETE_TOKEN,
    PUT_ALIAS,
    PUT_BOT_USER,
    PUT_CREW,
    PUT_DEVICE,
    PUT_MEMBER,
    PUT_MULTI_CREW,
    PUT_TOKEN,
    RENAME_CREW,
    BotUserRecord,
    CrewRecord,
    DeviceRecord,
    ICrewStore,
    IDeviceStore,
    IMessageLog,
    IStore,
    ITokenStore,
    LogEntry,
    MemberRecord,
    MemoryStore,
    MultiCrewRecord,
    Replay,
    StoreError,
    TokenRecord,
)
from leeloo.testing import FailingMemoryStore

T0 = 1_700_000_000.0
ALPHA = "LEELOO-ALFA"
BRAVO = "LEELOO-BRVO"


def contract(test):
    """
    Turn a generator test into one that runs on both kinds of test case: it
    yields Deferreds, and the test case's C{finish} waits for the result
    (a L{TestCase} returns it to trial; a L{SynchronousTestCase} insists it
    has already succeeded).
    """
    run = inlineCallbacks(test)

    def wrapper(self):
        return self.finish(run(self))

    wrapper.__name__ = test.__name__
    wrapper.__qualname__ = test.__qualname__
    wrapper.__doc__ = test.__doc__
    return wrapper


def entry(seq, crew=ALPHA, sender="leeloo_a", at=None, client_msg_id=None, digest=None, payload=None,
          ephemeral=False):
    return LogEntry(
        crew, seq, f"m{seq}", sender, client_msg_id, digest,
        T0 + seq if at is None else at,
        payload if payload is not None else f'{{"seq":{seq}}}'.encode(),
        ephemeral,
    )


def appends(*entries):
    return [(APPEND, e) for e in entries]


def with_crew(*ops, code=ALPHA):
    return [(PUT_CREW, CrewRecord(code, T0, "leeloo_a")), *ops]


class StoreContract:
    """
    The behaviour every L{leeloo.store.IStore} shares.  A test case mixing
    this in provides C{make_store()}, C{reopen(store)} (a Deferred firing
    with the same store as a restarted relay sees it) and C{finish(d)}.
    """

    def make_store(self):
        raise NotImplementedError

    def reopen(self, store):
        raise NotImplementedError

    def finish(self, d):
        raise NotImplementedError

    def setUp(self):
        self.store = self.make_store()

    @inlineCallbacks
    def restart(self):
        """
        Reopen the store, as a relay does at start, and load it.
        """
        self.store = yield self.reopen(self.store)
        return self.store.load()

    def failure_of(self, d, *errors):
        """
        A Deferred firing with the exception C{d} fails with (one of
        C{errors}); failing the test if C{d} succeeds.
        """

        def succeeded(result):
            self.fail(f"expected {errors}, got the result {result!r}")

        def failed(failure):
            failure.trap(*errors)
            return failure.value

        return d.addCallbacks(succeeded, failed)

    # ------------------------------------------------------------- records

    @contract
    def test_empty(self):
        """
        A new store loads nothing.
        """
        snapshot = yield self.restart()
        self.assertEqual(
            (snapshot.crews, snapshot.members, snapshot.bot_users, snapshot.tokens,
             snapshot.last_seq, snapshot.last_message_at, snapshot.client_messages),
            ([], [], [], [], {}, {}, []),
        )

    @contract
    def test_crew(self):
        """
        A crew put comes back after a restart, with or without its creator.
        """
        yield self.store.write([
            (PUT_CREW, CrewRecord(ALPHA, T0, "leeloo_a")),
            (PUT_CREW, CrewRecord(BRAVO, T0 + 1, None)),
        ])
        snapshot = yield self.restart()
        self.assertEqual(
            sorted(snapshot.crews, key=lambda c: c.code),
            [CrewRecord(ALPHA, T0, "leeloo_a"), CrewRecord(BRAVO, T0 + 1, None)],
        )

    @contract
    def test_crew_name(self):
        """
        A crew's name comes back after a restart, and putting the crew again
        replaces it; a crew without one has None.
        """
        yield self.store.write([
            (PUT_CREW, CrewRecord(ALPHA, T0, "leeloo_a", "The band")),
            (PUT_CREW, CrewRecord(BRAVO, T0, "leeloo_a")),
        ])
        snapshot = yield self.restart()
        self.assertEqual(sorted((c.code, c.name) for c in snapshot.crews), [(ALPHA, "The band"), (BRAVO, None)])
        yield self.store.write([(PUT_CREW, CrewRecord(ALPHA, T0, "leeloo_a", "Family"))])
        snapshot = yield self.restart()
        self.assertEqual(sorted((c.code, c.name) for c in snapshot.crews), [(ALPHA, "Family"), (BRAVO, None)])
        found = yield self.store.find_crew(ALPHA)
        self.assertEqual(found.crews, [CrewRecord(ALPHA, T0, "leeloo_a", "Family")])

    @contract
    def test_crew_put_again(self):
        """
        Putting a crew that exists updates it and keeps its members, bot
        users and log.
        """
        yield self.store.write(with_crew(
            (PUT_MEMBER, MemberRecord(ALPHA, "leeloo_a", "A", T0)),
            (PUT_BOT_USER, BotUserRecord(ALPHA, "42", "Ann")),
            *appends(entry(1)),
        ))
        yield self.store.write([(PUT_CREW, CrewRecord(ALPHA, T0 + 5, "telegram:42"))])
        snapshot = yield self.restart()
        self.assertEqual(snapshot.crews, [CrewRecord(ALPHA, T0 + 5, "telegram:42")])
        self.assertEqual([m.device_id for m in snapshot.members], ["leeloo_a"])
        self.assertEqual(snapshot.bot_users, [BotUserRecord(ALPHA, "42", "Ann")])
        self.assertEqual(snapshot.last_seq, {ALPHA: 1})

    @contract
    def test_member(self):
        """
        A member comes back with its name, last seen time, delivered and
        acknowledged sequences and whether it was online.
        """
        yield self.store.write(with_crew(
            (PUT_MEMBER, MemberRecord(ALPHA, "leeloo_a", "Ann", T0 + 1, 7, 5, True)),
            (PUT_MEMBER, MemberRecord(ALPHA, "leeloo_b", "Bob", T0 + 2)),
        ))
        snapshot = yield self.restart()
        self.assertEqual(
            sorted(snapshot.members, key=lambda m: m.device_id),
            [MemberRecord(ALPHA, "leeloo_a", "Ann", T0 + 1, 7, 5, True),
             MemberRecord(ALPHA, "leeloo_b", "Bob", T0 + 2, 0, None, False)],
        )

    @contract
    def test_member_put_again(self):
        """
        Putting a member again replaces every field of the one stored.
        """
        yield self.store.write(with_crew(
            (PUT_MEMBER, MemberRecord(ALPHA, "leeloo_a", "Ann", T0, 3, None, True)),
        ))
        yield self.store.write([(PUT_MEMBER, MemberRecord(ALPHA, "leeloo_a", "Annie", T0 + 9, 8, 6, False))])
        snapshot = yield self.restart()
        self.assertEqual(snapshot.members, [MemberRecord(ALPHA, "leeloo_a", "Annie", T0 + 9, 8, 6, False)])

    @contract
    def test_delete_member(self):
        """
        A member deleted (a crew left with crew_leave) is gone after a
        restart; the device's other member rows and the crew stay.
        """
        yield self.store.write([
            *with_crew(code=ALPHA), *with_crew(code=BRAVO),
            (PUT_MEMBER, MemberRecord(ALPHA, "leeloo_a", "Ann", T0, 1)),
            (PUT_MEMBER, MemberRecord(BRAVO, "leeloo_a", "Ann", T0, 2)),
        ])
        yield self.store.write([(DELETE_MEMBER, (ALPHA, "leeloo_a")), (DELETE_MEMBER, (ALPHA, "leeloo_z"))])
        snapshot = yield self.restart()
        self.assertEqual([(m.crew_code, m.device_id) for m in snapshot.members], [(BRAVO, "leeloo_a")])
        self.assertEqual(sorted(c.code for c in snapshot.crews), [ALPHA, BRAVO])

    @contract
    def test_member_deleted_then_put(self):
        """
        A member deleted and put again in one write is there (operations
        apply in order).
        """
        yield self.store.write(with_crew(
            (PUT_MEMBER, MemberRecord(ALPHA, "leeloo_a", "Ann", T0, 1)),
        ))
        yield self.store.write([(DELETE_MEMBER, (ALPHA, "leeloo_a")),
                                (PUT_MEMBER, MemberRecord(ALPHA, "leeloo_a", "Ann", T0, 4))])
        snapshot = yield self.restart()
        self.assertEqual([m.delivered_seq for m in snapshot.members], [4])

    @contract
    def test_member_of_one_device_in_two_crews(self):
        """
        A device is a member of each crew separately.
        """
        yield self.store.write([
            *with_crew(code=ALPHA), *with_crew(code=BRAVO),
            (PUT_MEMBER, MemberRecord(ALPHA, "leeloo_a", "Ann", T0, 1)),
            (PUT_MEMBER, MemberRecord(BRAVO, "leeloo_a", "Ann", T0, 2)),
        ])
        snapshot = yield self.restart()
        self.assertEqual(sorted((m.crew_code, m.delivered_seq) for m in snapshot.members),
                         [(ALPHA, 1), (BRAVO, 2)])

    @contract
    def test_bot_user(self):
        """
        A bot user comes back with its crew and name; putting it again
        renames it.
        """
        yield self.store.write(with_crew(
            (PUT_BOT_USER, BotUserRecord(ALPHA, "42", "Ann")),
            (PUT_BOT_USER, BotUserRecord(ALPHA, "43", "Bob")),
        ))
        yield self.store.write([(PUT_BOT_USER, BotUserRecord(ALPHA, "43", "Bobby"))])
        snapshot = yield self.restart()
        self.assertEqual(sorted(snapshot.bot_users, key=lambda b: b.user_id),
                         [BotUserRecord(ALPHA, "42", "Ann"), BotUserRecord(ALPHA, "43", "Bobby")])

    @contract
    def test_token(self):
        """
        Pending tokens come back with their contents and expiry.
        """
        tokens = {"access_token": "at", "refresh_token": "rt", "expires_in": 3600, "scope": None}
        yield self.store.write([(PUT_TOKEN, TokenRecord("leeloo_a", tokens, T0 + 600.5))])
        snapshot = yield self.restart()
        self.assertEqual(snapshot.tokens, [TokenRecord("leeloo_a", tokens, T0 + 600.5)])

    @contract
    def test_token_put_again(self):
        """
        Putting tokens for a device again replaces the ones pending.
        """
        yield self.store.write([(PUT_TOKEN, TokenRecord("leeloo_a", {"access_token": "old"}, T0))])
        yield self.store.write([(PUT_TOKEN, TokenRecord("leeloo_a", {"access_token": "new"}, T0 + 1))])
        snapshot = yield self.restart()
        self.assertEqual(snapshot.tokens, [TokenRecord("leeloo_a", {"access_token": "new"}, T0 + 1)])

    @contract
    def test_delete_token(self):
        """
        DELETE_TOKEN removes that device's tokens only; deleting tokens that
        are not there is harmless.
        """
        yield self.store.write([
            (PUT_TOKEN, TokenRecord("leeloo_a", {"access_token": "a"}, T0)),
            (PUT_TOKEN, TokenRecord("leeloo_b", {"access_token": "b"}, T0)),
        ])
        yield self.store.write([(DELETE_TOKEN, "leeloo_a"), (DELETE_TOKEN, "leeloo_zz")])
        snapshot = yield self.restart()
        self.assertEqual([t.device_id for t in snapshot.tokens], ["leeloo_b"])

    @contract
    def test_log_sequence(self):
        """
        After appends, each crew's last sequence and the time of its last
        message come back; a crew with no log has neither.
        """
        yield self.store.write([
            *with_crew(code=ALPHA), *with_crew(code=BRAVO),
            *appends(entry(1, at=T0 + 10), entry(2, at=T0 + 20), entry(1, crew=BRAVO, at=T0 + 15)),
        ])
        yield self.store.write([*with_crew(code="LEELOO-EMTY"), *appends(entry(3, at=T0 + 30))])
        snapshot = yield self.restart()
        self.assertEqual(snapshot.last_seq, {ALPHA: 3, BRAVO: 1})
        self.assertEqual(snapshot.last_message_at, {ALPHA: T0 + 30, BRAVO: T0 + 15})

    @contract
    def test_client_messages(self):
        """
        The log entries that carry a client_msg_id come back, with their id,
        sequence, sender, digest and time but without payloads.
        """
        yield self.store.write(with_crew(*appends(
            entry(1, client_msg_id="c1", digest=b"\x01" * 32),
            entry(2),
            entry(3, sender="leeloo_b", client_msg_id="c1", digest=b"\x02" * 32),
        )))
        snapshot = yield self.restart()
        self.assertEqual(
            sorted(snapshot.client_messages, key=lambda e: e.seq),
            [LogEntry(ALPHA, 1, "m1", "leeloo_a", "c1", b"\x01" * 32, T0 + 1, b""),
             LogEntry(ALPHA, 3, "m3", "leeloo_b", "c1", b"\x02" * 32, T0 + 3, b"")],
        )

    @contract
    def test_log_payloads(self):
        """
        Appended payloads come back byte for byte after a restart.
        """
        payload = '{"text":"héllo \\u0000"}'.encode() + b"\xff\x00"
        yield self.store.write(with_crew(*appends(entry(1, payload=payload))))
        yield self.restart()
        replay = yield self.store.replay(ALPHA, 0, 1, 0.0, "nobody", 10)
        self.assertEqual(replay, Replay([(1, payload)]))

    @contract
    def test_delete_crew(self):
        """
        DELETE_CREW removes the crew with its members, bot users and log,
        and leaves other crews alone.
        """
        yield self.store.write([
            *with_crew(code=ALPHA), *with_crew(code=BRAVO),
            (PUT_MEMBER, MemberRecord(ALPHA, "leeloo_a", "Ann", T0)),
            (PUT_MEMBER, MemberRecord(BRAVO, "leeloo_a", "Ann", T0)),
            (PUT_BOT_USER, BotUserRecord(ALPHA, "42", "Ann")),
            (PUT_BOT_USER, BotUserRecord(BRAVO, "42", "Ann")),
            *appends(entry(1, client_msg_id="c1"), entry(1, crew=BRAVO, client_msg_id="c1")),
        ])
        yield self.store.write([(DELETE_CREW, ALPHA)])
        snapshot = yield self.restart()
        self.assertEqual([c.code for c in snapshot.crews], [BRAVO])
        self.assertEqual([m.crew_code for m in snapshot.members], [BRAVO])
        self.assertEqual([b.crew_code for b in snapshot.bot_users], [BRAVO])
        self.assertEqual(snapshot.last_seq, {BRAVO: 1})
        self.assertEqual([e.crew_code for e in snapshot.client_messages], [BRAVO])
        replay = yield self.store.replay(ALPHA, 0, 10, 0.0, "nobody", 10)
        self.assertEqual(replay, Replay([]))

    @contract
    def test_delete_crew_then_create_again(self):
        """
        A crew deleted and created again in one write starts with an empty
        log: its old entries do not come back.
        """
        yield self.store.write(with_crew(*appends(entry(1), entry(2))))
        yield self.store.write([(DELETE_CREW, ALPHA), *with_crew(*appends(entry(1, at=T0 + 50)))])
        snapshot = yield self.restart()
        self.assertEqual(snapshot.last_seq, {ALPHA: 1})
        replay = yield self.store.replay(ALPHA, 0, 10, 0.0, "nobody", 10)
        self.assertEqual([seq for seq, _ in replay.entries], [1])

    @contract
    def test_rename_crew(self):
        """
        RENAME_CREW moves the crew with its members, bot users and log to
        the new code, and keeps the old one as its alias.
        """
        yield self.store.write([
            *with_crew(code=ALPHA),
            (PUT_MEMBER, MemberRecord(ALPHA, "leeloo_a", "Ann", T0, 1)),
            (PUT_BOT_USER, BotUserRecord(ALPHA, "42", "Tina")),
            *appends(entry(1, client_msg_id="c1"), entry(2)),
        ])
        yield self.store.write([(RENAME_CREW, (ALPHA, BRAVO))])
        snapshot = yield self.restart()
        self.assertEqual([c.code for c in snapshot.crews], [BRAVO])
        self.assertEqual([(m.crew_code, m.device_id, m.delivered_seq) for m in snapshot.members],
                         [(BRAVO, "leeloo_a", 1)])
        self.assertEqual([b.crew_code for b in snapshot.bot_users], [BRAVO])
        self.assertEqual((snapshot.last_seq, snapshot.aliases), ({BRAVO: 2}, {ALPHA: BRAVO}))
        self.assertEqual([(e.crew_code, e.client_msg_id) for e in snapshot.client_messages], [(BRAVO, "c1")])
        replay = yield self.store.replay(BRAVO, 0, 10, 0.0, "nobody", 10)
        self.assertEqual([seq for seq, _ in replay.entries], [1, 2])

    @contract
    def test_rename_again(self):
        """
        Renamed twice, a crew's first code leads to its last; renamed back,
        its code is no longer an alias.
        """
        yield self.store.write(with_crew(code=ALPHA))
        yield self.store.write([(RENAME_CREW, (ALPHA, BRAVO)), (RENAME_CREW, (BRAVO, "LEELOO-CCCC"))])
        snapshot = yield self.restart()
        self.assertEqual(snapshot.aliases, {ALPHA: "LEELOO-CCCC", BRAVO: "LEELOO-CCCC"})
        yield self.store.write([(RENAME_CREW, ("LEELOO-CCCC", ALPHA))])
        snapshot = yield self.restart()
        self.assertEqual(snapshot.aliases, {BRAVO: ALPHA, "LEELOO-CCCC": ALPHA})

    @contract
    def test_rename_onto_a_crew(self):
        """
        RENAME_CREW to a code a crew has fails, and the write changes nothing.
        """
        yield self.store.write([*with_crew(code=ALPHA), *with_crew(code=BRAVO)])
        yield self.failure_of(self.store.write([(RENAME_CREW, (ALPHA, BRAVO))]), StoreError)
        snapshot = yield self.restart()
        self.assertEqual(sorted(c.code for c in snapshot.crews), [ALPHA, BRAVO])
        self.assertEqual(snapshot.aliases, {})

    @contract
    def test_aliases_go_with_their_crew(self):
        """
        PUT_ALIAS keeps an alias; DELETE_CREW drops the crew's aliases.
        """
        yield self.store.write([*with_crew(code=ALPHA), *with_crew(code=BRAVO),
                                (PUT_ALIAS, ("LEELOO-OLD1", ALPHA)), (PUT_ALIAS, ("LEELOO-OLD2", BRAVO))])
        yield self.store.write([(DELETE_CREW, ALPHA)])
        snapshot = yield self.restart()
        self.assertEqual(snapshot.aliases, {"LEELOO-OLD2": BRAVO})

    # -------------------------------------------------------- transactions

    @contract
    def test_unknown_operation(self):
        """
        A write with an unknown operation fails with ValueError and applies
        none of its operations, not even those before it.
        """
        d = self.store.write([
            *with_crew(*appends(entry(1))),
            (PUT_TOKEN, TokenRecord("leeloo_a", {}, T0)),
            ("frobnicate", None),
            (PUT_TOKEN, TokenRecord("leeloo_b", {}, T0)),
        ])
        yield self.failure_of(d, ValueError)
        snapshot = yield self.restart()
        self.assertEqual((snapshot.crews, snapshot.tokens, snapshot.last_seq), ([], [], {}))

    @contract
    def test_duplicate_append(self):
        """
        Appending a sequence a crew's log already holds fails with
        StoreError and applies none of the write's operations.
        """
        yield self.store.write(with_crew(*appends(entry(1))))
        d = self.store.write([
            (PUT_TOKEN, TokenRecord("leeloo_a", {}, T0)),
            (DELETE_CREW, BRAVO),
            *appends(entry(2), entry(1, payload=b"again")),
            (PUT_MEMBER, MemberRecord(ALPHA, "leeloo_a", "Ann", T0)),
        ])
        yield self.failure_of(d, StoreError)
        snapshot = yield self.restart()
        self.assertEqual((snapshot.tokens, snapshot.members, snapshot.last_seq), ([], [], {ALPHA: 1}))
        replay = yield self.store.replay(ALPHA, 0, 10, 0.0, "nobody", 10)
        self.assertEqual(replay, Replay([(1, b'{"seq":1}')]))

    @contract
    def test_duplicate_append_in_one_write(self):
        """
        Two appends of one sequence in one write fail with StoreError and
        apply nothing.
        """
        d = self.store.write(with_crew(*appends(entry(1), entry(1))))
        yield self.failure_of(d, StoreError)
        snapshot = yield self.restart()
        self.assertEqual((snapshot.crews, snapshot.last_seq), ([], {}))

    @contract
    def test_many_rows_of_each_kind_in_one_write(self):
        """
        One write with several rows of every kind, some of them put twice:
        each comes back as the last put of it in the write says, as if the
        operations were applied one at a time.
        """
        tokens = {"access_token": "at", "refresh_token": "rt", "expires_in": 3600, "scope": None}
        yield self.store.write([
            (PUT_CREW, CrewRecord(ALPHA, T0, "leeloo_a")),
            (PUT_CREW, CrewRecord(BRAVO, T0, "leeloo_b")),
            (PUT_CREW, CrewRecord(ALPHA, T0 + 1, "leeloo_a", "Alfa")),
            *[(PUT_MEMBER, MemberRecord(code, f"leeloo_{i}", f"D{i}", T0 + i)) for code in (ALPHA, BRAVO)
              for i in range(3)],
            (PUT_MEMBER, MemberRecord(ALPHA, "leeloo_1", "Again", T0 + 9, 4, 2, True)),
            *[(PUT_DEVICE, DeviceRecord(f"leeloo_{i}", f"h{i}", False, T0)) for i in range(3)],
            (PUT_DEVICE, DeviceRecord("leeloo_0", "bound", True, T0, T0 + 5)),
            (PUT_BOT_USER, BotUserRecord(ALPHA, "42", "Ann")),
            (PUT_BOT_USER, BotUserRecord(ALPHA, "43", "Bob")),
            (PUT_BOT_USER, BotUserRecord(ALPHA, "42", "Annie")),
            *appends(entry(1), entry(2), entry(1, crew=BRAVO)),
            (PUT_TOKEN, TokenRecord("leeloo_0", tokens, T0 + 1)),
            (PUT_TOKEN, TokenRecord("leeloo_1", tokens, T0 + 2)),
            (PUT_TOKEN, TokenRecord("leeloo_0", {**tokens, "access_token": "at2"}, T0 + 3)),
            (PUT_MULTI_CREW, MultiCrewRecord("leeloo_0", (ALPHA,), ALPHA)),
            (PUT_MULTI_CREW, MultiCrewRecord("leeloo_0", (ALPHA, BRAVO), BRAVO)),
            (PUT_GRANT, GrantRecord("leeloo_0", "sealed-old")),
            (PUT_GRANT, GrantRecord("leeloo_0", "sealed-new")),
        ])
        snapshot = yield self.restart()
        self.assertEqual(sorted((c.code, c.created_at, c.name) for c in snapshot.crews),
                         [(ALPHA, T0 + 1, "Alfa"), (BRAVO, T0, None)])
        members = {(m.crew_code, m.device_id): m for m in snapshot.members}
        self.assertEqual(len(members), 6)
        self.assertEqual(members[ALPHA, "leeloo_1"], MemberRecord(ALPHA, "leeloo_1", "Again", T0 + 9, 4, 2, True))
        self.assertEqual(members[BRAVO, "leeloo_1"], MemberRecord(BRAVO, "leeloo_1", "D1", T0 + 1))
        self.assertEqual(sorted((d.device_id, d.key_hash, d.bound) for d in snapshot.devices),
                         [("leeloo_0", "bound", True), ("leeloo_1", "h1", False), ("leeloo_2", "h2", False)])
        self.assertEqual(sorted(snapshot.bot_users, key=lambda b: b.user_id),
                         [BotUserRecord(ALPHA, "42", "Annie"), BotUserRecord(ALPHA, "43", "Bob")])
        self.assertEqual(snapshot.last_seq, {ALPHA: 2, BRAVO: 1})
        self.assertEqual(sorted(snapshot.tokens, key=lambda t: t.device_id),
                         [TokenRecord("leeloo_0", {**tokens, "access_token": "at2"}, T0 + 3),
                          TokenRecord("leeloo_1", tokens, T0 + 2)])
        self.assertEqual(snapshot.multi_crew, [MultiCrewRecord("leeloo_0", (ALPHA, BRAVO), BRAVO)])
        self.assertEqual(snapshot.grants, [GrantRecord("leeloo_0", "sealed-new")])

    @contract
    def test_failed_write_undoes_deletes(self):
        """
        A failed write puts back what its earlier operations deleted: the
        crew with its members, bot users and log, and tokens.
        """
        yield self.store.write([
            *with_crew((PUT_MEMBER, MemberRecord(ALPHA, "leeloo_a", "Ann", T0)),
                       (PUT_BOT_USER, BotUserRecord(ALPHA, "42", "Ann")),
                       *appends(entry(1))),
            (PUT_TOKEN, TokenRecord("leeloo_a", {}, T0)),
        ])
        d = self.store.write([(DELETE_CREW, ALPHA), (DELETE_TOKEN, "leeloo_a"), ("frobnicate", None)])
        yield self.failure_of(d, ValueError)
        snapshot = yield self.restart()
        self.assertEqual(
            ([c.code for c in snapshot.crews], len(snapshot.members), len(snapshot.bot_users),
             snapshot.last_seq, len(snapshot.tokens)),
            ([ALPHA], 1, 1, {ALPHA: 1}, 1),
        )

    @contract
    def test_write_after_failure(self):
        """
        A store that refused a write takes the next one.
        """
        yield self.failure_of(self.store.write(with_crew(("frobnicate", None))), ValueError)
        yield self.store.write(with_crew(*appends(entry(1))))
        snapshot = yield self.restart()
        self.assertEqual(snapshot.last_seq, {ALPHA: 1})

    @contract
    def test_member_of_unknown_crew(self):
        """
        A member, bot user or log entry of a crew the store does not hold is
        refused with StoreError.
        """
        for op in [(PUT_MEMBER, MemberRecord(BRAVO, "leeloo_a", "Ann", T0)),
                   (PUT_BOT_USER, BotUserRecord(BRAVO, "42", "Ann")),
                   (APPEND, entry(1, crew=BRAVO))]:
            yield self.failure_of(self.store.write(with_crew(op)), StoreError)
        snapshot = yield self.restart()
        self.assertEqual((snapshot.crews, snapshot.members, snapshot.bot_users), ([], [], []))

    @contract
    def test_empty_write(self):
        """
        A write of no operations succeeds.
        """
        result = yield self.store.write([])
        self.assertIsNone(result)

    # -------------------------------------------------------------- replay

    @inlineCallbacks
    def logged(self, *entries):
        yield self.store.write([*with_crew(code=ALPHA), *with_crew(code=BRAVO), *appends(*entries)])

    @contract
    def test_replay_bounds(self):
        """
        Replay returns the crew's entries with after_seq < seq <= up_to_seq,
        oldest first, as (seq, payload).
        """
        yield self.logged(*(entry(seq) for seq in range(1, 8)), entry(4, crew=BRAVO))
        replay = yield self.store.replay(ALPHA, 2, 5, 0.0, "nobody", 10)
        self.assertEqual(replay, Replay([(3, b'{"seq":3}'), (4, b'{"seq":4}'), (5, b'{"seq":5}')]))

    @contract
    def test_replay_since(self):
        """
        Replay leaves out entries created before C{since}; one created at
        C{since} is in.
        """
        yield self.logged(*(entry(seq, at=T0 + 10 * seq) for seq in range(1, 6)))
        replay = yield self.store.replay(ALPHA, 0, 5, T0 + 30, "nobody", 10)
        self.assertEqual([seq for seq, _ in replay.entries], [3, 4, 5])
        self.assertIsNone(replay.lost)

    @contract
    def test_replay_ephemeral_since(self):
        """
        With C{ephemeral_since}, replay also leaves out ephemeral entries
        (nudges, reactions) created before it, and keeps the others as old
        as C{since}.
        """
        yield self.logged(*(entry(seq, at=T0 + 10 * seq, ephemeral=seq % 2 == 0) for seq in range(1, 7)))
        replay = yield self.store.replay(ALPHA, 0, 6, T0 + 20, "nobody", 10, T0 + 50)
        self.assertEqual([seq for seq, _ in replay.entries], [3, 5, 6])

    @contract
    def test_replay_ephemeral_by_default(self):
        """
        Without C{ephemeral_since}, ephemeral entries are replayed like the
        others.
        """
        yield self.logged(entry(1, ephemeral=True), entry(2))
        replay = yield self.store.replay(ALPHA, 0, 2, 0.0, "nobody", 10)
        self.assertEqual([seq for seq, _ in replay.entries], [1, 2])

    @contract
    def test_replay_limit_after_ephemeral_filter(self):
        """
        Stale ephemeral entries do not use up the limit, even the newest.
        """
        yield self.logged(entry(1), entry(2), entry(3, ephemeral=True), entry(4, ephemeral=True))
        replay = yield self.store.replay(ALPHA, 0, 4, 0.0, "nobody", 2, T0 + 100)
        self.assertEqual(replay, Replay([(1, b'{"seq":1}'), (2, b'{"seq":2}')]))

    @contract
    def test_replay_exclude_sender(self):
        """
        Replay leaves out what the returning device sent itself.
        """
        yield self.logged(entry(1, sender="leeloo_a"), entry(2, sender="leeloo_b"),
                          entry(3, sender="leeloo_a"), entry(4, sender="telegram"))
        replay = yield self.store.replay(ALPHA, 0, 4, 0.0, "leeloo_a", 10)
        self.assertEqual([seq for seq, _ in replay.entries], [2, 4])

    @contract
    def test_replay_limit(self):
        """
        Beyond the limit replay keeps the newest entries and reports the
        older ones as lost, from after_seq + 1 to the first kept - 1.
        """
        yield self.logged(*(entry(seq) for seq in range(1, 11)))
        replay = yield self.store.replay(ALPHA, 2, 9, 0.0, "nobody", 3)
        self.assertEqual(replay, Replay([(7, b'{"seq":7}'), (8, b'{"seq":8}'), (9, b'{"seq":9}')], (3, 6)))

    @contract
    def test_replay_limit_after_filters(self):
        """
        The limit counts only the entries the device gets: its own and
        too-old ones do not use it up.
        """
        yield self.logged(entry(1, at=T0 - 100), entry(2), entry(3, sender="leeloo_me"),
                          entry(4), entry(5, sender="leeloo_me"))
        replay = yield self.store.replay(ALPHA, 0, 5, T0, "leeloo_me", 2)
        self.assertEqual(replay, Replay([(2, b'{"seq":2}'), (4, b'{"seq":4}')]))

    @contract
    def test_replay_exactly_limit(self):
        """
        As many entries as the limit are all replayed, none lost.
        """
        yield self.logged(*(entry(seq) for seq in range(1, 4)))
        replay = yield self.store.replay(ALPHA, 0, 3, 0.0, "nobody", 3)
        self.assertEqual(([seq for seq, _ in replay.entries], replay.lost), ([1, 2, 3], None))

    @contract
    def test_replay_limit_zero(self):
        """
        With a limit of 0 nothing is replayed and everything the device
        missed is lost, up to the newest entry it would have got.
        """
        yield self.logged(*(entry(seq) for seq in range(1, 6)))
        replay = yield self.store.replay(ALPHA, 1, 4, 0.0, "nobody", 0)
        self.assertEqual(replay, Replay([], (2, 4)))

    @contract
    def test_replay_empty(self):
        """
        Nothing to replay is an empty replay with nothing lost, whatever the
        limit; an unknown crew replays nothing.
        """
        yield self.logged(entry(1), entry(2))
        for args in [(ALPHA, 2, 2, 0.0, "nobody", 5), (ALPHA, 2, 2, 0.0, "nobody", 0),
                     (ALPHA, 0, 2, T0 + 100, "nobody", 0), ("LEELOO-NONE", 0, 9, 0.0, "nobody", 5)]:
            replay = yield self.store.replay(*args)
            self.assertEqual(replay, Replay([]), args)

    # --------------------------------------------------------------- prune

    @contract
    def test_prune(self):
        """
        Pruning deletes entries created before the cut-off, keeps younger
        ones, and fires with how many it deleted.
        """
        yield self.logged(*(entry(seq, at=T0 + seq) for seq in range(1, 6)),
                          *(entry(seq, crew=BRAVO, at=T0 + seq) for seq in range(1, 4)))
        deleted = yield self.store.prune(T0 + 3)
        self.assertEqual(deleted, 4)
        alpha = yield self.store.replay(ALPHA, 0, 9, 0.0, "nobody", 10)
        bravo = yield self.store.replay(BRAVO, 0, 9, 0.0, "nobody", 10)
        self.assertEqual(([s for s, _ in alpha.entries], [s for s, _ in bravo.entries]), ([3, 4, 5], [3]))

    @contract
    def test_prune_keeps_newest(self):
        """
        Pruning keeps each crew's newest entry however old, so its sequence
        and last message time survive a restart.
        """
        yield self.logged(*(entry(seq, at=T0 + seq) for seq in range(1, 4)), entry(7, crew=BRAVO, at=T0))
        deleted = yield self.store.prune(T0 + 1000)
        self.assertEqual(deleted, 2)
        snapshot = yield self.restart()
        self.assertEqual((snapshot.last_seq, snapshot.last_message_at),
                         ({ALPHA: 3, BRAVO: 7}, {ALPHA: T0 + 3, BRAVO: T0}))

    @contract
    def test_prune_nothing(self):
        """
        Pruning an empty log, or one with nothing old, deletes nothing.
        """
        deleted = yield self.store.prune(T0)
        self.assertEqual(deleted, 0)
        yield self.logged(entry(1), entry(2))
        deleted = yield self.store.prune(T0)
        self.assertEqual(deleted, 0)

    # ---------------------------------------------------------------- trim

    @contract
    def test_log_bytes(self):
        """
        A restarted relay learns how many payload bytes each crew's log
        holds.
        """
        yield self.logged(entry(1, payload=b"x" * 10), entry(2, payload=b"y" * 5),
                          entry(1, crew=BRAVO, payload=b"z"))
        snapshot = yield self.restart()
        self.assertEqual(snapshot.log_bytes, {ALPHA: 15, BRAVO: 1})

    @contract
    def test_trim_to_bytes(self):
        """
        Trimming deletes the oldest entries until the rest fit, and fires
        with the first sequence kept and the bytes left.
        """
        yield self.logged(*(entry(seq, payload=b"x" * 10) for seq in range(1, 11)),
                          entry(1, crew=BRAVO, payload=b"b" * 10))
        result = yield self.store.trim(ALPHA, 35, 1)
        self.assertEqual(result, (8, 30))
        alpha = yield self.store.replay(ALPHA, 0, 99, 0.0, "nobody", 99)
        bravo = yield self.store.replay(BRAVO, 0, 99, 0.0, "nobody", 99)
        self.assertEqual(([s for s, _ in alpha.entries], [s for s, _ in bravo.entries]), ([8, 9, 10], [1]))

    @contract
    def test_trim_keeps_newest(self):
        """
        Trimming never deletes the newest C{keep} entries (nor the newest
        one when C{keep} is 0).
        """
        yield self.logged(*(entry(seq, payload=b"x" * 10) for seq in range(1, 11)))
        result = yield self.store.trim(ALPHA, 5, 4)
        self.assertEqual(result, (7, 40))
        result = yield self.store.trim(ALPHA, 0, 0)
        self.assertEqual(result, (10, 10))
        snapshot = yield self.restart()
        self.assertEqual(snapshot.last_seq, {ALPHA: 10})

    @contract
    def test_trim_nothing(self):
        """
        A log within the bound, or an empty one, is left as it is.
        """
        result = yield self.store.trim(ALPHA, 100, 1)
        self.assertEqual(result, (0, 0))
        yield self.logged(entry(1, payload=b"x" * 10), entry(2, payload=b"x" * 10))
        result = yield self.store.trim(ALPHA, 100, 1)
        self.assertEqual(result, (1, 20))

    # ------------------------------------------------------------- devices

    @contract
    def test_device_last_seen(self):
        """
        A device record keeps when it was last seen, and can be deleted.
        """
        yield self.store.write([(PUT_DEVICE, DeviceRecord("leeloo_a", "h", False, T0, T0 + 5)),
                                (PUT_DEVICE, DeviceRecord("leeloo_b", "h", True, T0))])
        snapshot = yield self.restart()
        self.assertEqual(sorted((d.device_id, d.last_seen) for d in snapshot.devices),
                         [("leeloo_a", T0 + 5), ("leeloo_b", None)])
        yield self.store.write([(DELETE_DEVICE, "leeloo_a")])
        snapshot = yield self.restart()
        self.assertEqual([d.device_id for d in snapshot.devices], ["leeloo_b"])


    # --------------------------------------------------- multi-crew devices

    @contract
    def test_multi_crew(self):
        """
        A multi-crew device's crews (in the order joined) and primary come
        back after a restart; one with no crew (primary None) too.
        """
        yield self.store.write([
            (PUT_MULTI_CREW, MultiCrewRecord("leeloo_a", (BRAVO, ALPHA, "LEELOO-CHRL"), ALPHA)),
            (PUT_MULTI_CREW, MultiCrewRecord("leeloo_b", (), None)),
        ])
        snapshot = yield self.restart()
        self.assertEqual(sorted(snapshot.multi_crew, key=lambda r: r.device_id), [
            MultiCrewRecord("leeloo_a", (BRAVO, ALPHA, "LEELOO-CHRL"), ALPHA),
            MultiCrewRecord("leeloo_b", (), None),
        ])

    @contract
    def test_multi_crew_put_again_and_deleted(self):
        """
        Putting a multi-crew device again replaces its crews and primary;
        deleting it forgets it (and deleting one never put is harmless).
        """
        yield self.store.write([(PUT_MULTI_CREW, MultiCrewRecord("leeloo_a", (ALPHA, BRAVO), ALPHA)),
                                (PUT_MULTI_CREW, MultiCrewRecord("leeloo_b", (ALPHA,), ALPHA))])
        yield self.store.write([(PUT_MULTI_CREW, MultiCrewRecord("leeloo_a", (BRAVO,), BRAVO))])
        snapshot = yield self.restart()
        self.assertEqual(sorted(snapshot.multi_crew, key=lambda r: r.device_id), [
            MultiCrewRecord("leeloo_a", (BRAVO,), BRAVO), MultiCrewRecord("leeloo_b", (ALPHA,), ALPHA)])
        yield self.store.write([(DELETE_MULTI_CREW, "leeloo_b"), (DELETE_MULTI_CREW, "leeloo_z")])
        snapshot = yield self.restart()
        self.assertEqual(snapshot.multi_crew, [MultiCrewRecord("leeloo_a", (BRAVO,), BRAVO)])

    @contract
    def test_multi_crew_undone_with_its_write(self):
        """
        A multi-crew device put in a write that fails is not kept.
        """
        error = yield self.failure_of(self.store.write([
            (PUT_MULTI_CREW, MultiCrewRecord("leeloo_a", (ALPHA,), ALPHA)),
            (PUT_MEMBER, MemberRecord("NO-SUCH-CREW", "leeloo_a", "Ann", T0)),
        ]), StoreError)
        self.assertIsInstance(error, StoreError)
        snapshot = yield self.restart()
        self.assertEqual(snapshot.multi_crew, [])

    # ------------------------------------------------- the engine's answers

    def test_provides_the_interfaces(self):
        """
        The store provides IStore and each narrow part of it.
        """
        for interface in (IStore, ICrewStore, IDeviceStore, ITokenStore, IMessageLog):
            self.assertTrue(verifyObject(interface, self.store), interface)

    @contract
    def test_find_crew(self):
        """
        find_crew gives one crew as load() gives it, members, bot users,
        its last sequence, bytes and client_msg_ids included, and None for
        a code the store does not hold (also after the crew is deleted).
        """
        yield self.store.write([
            (PUT_CREW, CrewRecord(ALPHA, T0, "leeloo_a")),
            (PUT_CREW, CrewRecord(BRAVO, T0, None)),
            (PUT_MEMBER, MemberRecord(ALPHA, "leeloo_a", "Ann", T0, 1)),
            (PUT_MEMBER, MemberRecord(BRAVO, "leeloo_b", "Bob", T0)),
            (PUT_BOT_USER, BotUserRecord(ALPHA, "7", "Tina")),
            (APPEND, entry(1, client_msg_id="c1")),
            (APPEND, entry(2)),
        ])
        found = yield self.store.find_crew(ALPHA)
        self.assertEqual(found.crews, [CrewRecord(ALPHA, T0, "leeloo_a")])
        self.assertEqual([(m.device_id, m.name, m.delivered_seq) for m in found.members], [("leeloo_a", "Ann", 1)])
        self.assertEqual([(b.user_id, b.name) for b in found.bot_users], [("7", "Tina")])
        self.assertEqual(found.last_seq, {ALPHA: 2})
        self.assertEqual([(e.seq, e.client_msg_id) for e in found.client_messages], [(1, "c1")])
        self.assertEqual(found.log_bytes, {ALPHA: len(entry(1).payload) + len(entry(2).payload)})
        self.assertIsNone((yield self.store.find_crew("NONE")))
        yield self.store.write([(DELETE_CREW, ALPHA)])
        self.assertIsNone((yield self.store.find_crew(ALPHA)))
        bravo = yield self.store.find_crew(BRAVO)
        self.assertEqual((bravo.last_seq, bravo.client_messages), ({}, []))

    @contract
    def test_find_crew_by_its_old_code(self):
        """
        find_crew of a renamed crew's old code gives the crew under its
        code now, with the alias (a node that missed the rename learns it).
        """
        yield self.store.write([*with_crew(code=ALPHA), (PUT_MEMBER, MemberRecord(ALPHA, "leeloo_a", "Ann", T0, 1))])
        yield self.store.write([(RENAME_CREW, (ALPHA, BRAVO))])
        found = yield self.store.find_crew(ALPHA)
        self.assertEqual(([c.code for c in found.crews], found.aliases), ([BRAVO], {ALPHA: BRAVO}))
        self.assertEqual([(m.crew_code, m.device_id) for m in found.members], [(BRAVO, "leeloo_a")])
        self.assertEqual((yield self.store.find_crew(BRAVO)).aliases, {})
        yield self.store.write([(DELETE_CREW, BRAVO)])
        self.assertIsNone((yield self.store.find_crew(ALPHA)))

    @contract
    def test_find_crew_after_restart(self):
        """
        A crew written before a restart is found after it.
        """
        yield self.store.write(with_crew())
        yield self.restart()
        found = yield self.store.find_crew(ALPHA)
        self.assertEqual([c.code for c in found.crews], [ALPHA])

    @contract
    def test_find_device(self):
        """
        find_device gives a device id's record, and None for one the store
        does not hold or has deleted.
        """
        record = DeviceRecord("leeloo_a", "h" * 64, True, T0, T0 + 1)
        yield self.store.write([(PUT_DEVICE, record)])
        self.assertEqual((yield self.store.find_device("leeloo_a")), record)
        self.assertIsNone((yield self.store.find_device("leeloo_b")))
        yield self.store.write([(DELETE_DEVICE, "leeloo_a")])
        self.assertIsNone((yield self.store.find_device("leeloo_a")))

    @contract
    def test_find_token(self):
        """
        find_token gives the tokens parked for a device id, and None once
        they are deleted or for an id with none.
        """
        record = TokenRecord("leeloo_a", {"access_token": "t"}, T0 + 3600)
        yield self.store.write([(PUT_TOKEN, record)])
        self.assertEqual((yield self.store.find_token("leeloo_a")), record)
        self.assertIsNone((yield self.store.find_token("leeloo_b")))
        yield self.store.write([(DELETE_TOKEN, "leeloo_a")])
        self.assertIsNone((yield self.store.find_token("leeloo_a")))

    @contract
    def test_find_grant(self):
        """
        find_grant gives the sealed grant held for a device id, unchanged (a
        put again replaces it), and None once it is deleted or for an id
        with none.
        """
        yield self.store.write([(PUT_GRANT, GrantRecord("leeloo_a", "gAAAA-old-ciphertext"))])
        yield self.store.write([(PUT_GRANT, GrantRecord("leeloo_a", "gAAAA-new-ciphertext"))])
        self.assertEqual((yield self.store.find_grant("leeloo_a")), GrantRecord("leeloo_a", "gAAAA-new-ciphertext"))
        self.assertIsNone((yield self.store.find_grant("leeloo_b")))
        yield self.store.write([(DELETE_GRANT, "leeloo_a"), (DELETE_GRANT, "leeloo_zz")])
        self.assertIsNone((yield self.store.find_grant("leeloo_a")))

    @contract
    def test_grants_after_restart(self):
        """
        Grants survive a restart: the snapshot lists them, and find_grant
        still gives each.
        """
        yield self.store.write([(PUT_GRANT, GrantRecord("leeloo_a", "sealed-a")),
                                (PUT_GRANT, GrantRecord("leeloo_b", "sealed-b")),
                                (DELETE_GRANT, "leeloo_b")])
        snapshot = yield self.restart()
        self.assertEqual(snapshot.grants, [GrantRecord("leeloo_a", "sealed-a")])
        self.assertEqual((yield self.store.find_grant("leeloo_a")), GrantRecord("leeloo_a", "sealed-a"))

    @contract
    def test_find_sent(self):
        """
        find_sent gives the entry a sender sent with a client_msg_id while
        the log holds it, without its payload, and None for another sender
        or id, or once the entry is trimmed away.  (The SQLite store answers
        None at once: its relay holds every id its log holds, see
        SQLiteStoreTests.)
        """
        yield self.store.write(with_crew(*appends(entry(1, client_msg_id="c1", digest=b"d"), entry(2), entry(3))))
        found = yield self.store.find_sent(ALPHA, "leeloo_a", "c1")
        if found is None:
            self.assertIsInstance(self.store, SQLiteStore)
            return
        self.assertEqual((found.seq, found.id, found.digest, found.payload), (1, "m1", b"d", b""))
        self.assertIsNone((yield self.store.find_sent(ALPHA, "leeloo_b", "c1")))
        self.assertIsNone((yield self.store.find_sent(ALPHA, "leeloo_a", "c2")))
        yield self.store.trim(ALPHA, 0, 1)
        self.assertIsNone((yield self.store.find_sent(ALPHA, "leeloo_a", "c1")))

    @contract
    def test_sequences_minted_after_the_log(self):
        """
        The store mints each crew's sequence numbers: after a restart, from
        the last one its log holds; a number given back by a failed batch
        is minted again; a forgotten crew starts at 1.
        """
        yield self.store.write(with_crew(*appends(entry(1), entry(2))))
        yield self.restart()
        sequences = self.store.sequences
        self.assertEqual((sequences.next(ALPHA), sequences.next(ALPHA), sequences.next(BRAVO)), (3, 4, 1))
        sequences.failed(ALPHA, 4)
        self.assertEqual(sequences.next(ALPHA), 4)
        sequences.forget(ALPHA)
        self.assertEqual(sequences.next(ALPHA), 1)


class MemoryStoreTests(StoreContract, SynchronousTestCase):
    """
    The contract, on L{MemoryStore}.
    """

    def make_store(self):
        return MemoryStore()

    def reopen(self, store):
        return succeed(store)

    def finish(self, d):
        self.successResultOf(d)

    def test_fail_with(self):
        """
        A FailingMemoryStore (the test double of leeloo.testing) told to
        fail refuses writes with StoreError and applies nothing; told to
        stop, it writes again.
        """
        store = FailingMemoryStore()
        store.fail_with = OSError("disk full")
        failure = self.failureResultOf(store.write(with_crew()), StoreError)
        self.assertEqual(str(failure.value), "disk full")
        self.assertEqual(store.load().crews, [])
        store.fail_with = None
        self.successResultOf(store.write(with_crew()))
        self.assertEqual(len(store.load().crews), 1)


class SQLiteStoreTests(StoreContract, TestCase):
    """
    The contract, on L{SQLiteStore} in a temporary directory with the real
    reactor (its queries run in its database writer, a process of its own).
    """

    timeout = 10

    def make_store(self):
        directory = self.mktemp()
        os.mkdir(directory)
        return self.open(directory)

    def open(self, directory):
        store = SQLiteStore(directory, reactor)
        self.addCleanup(self.close, store)
        return store

    def close(self, store):
        return store.close()  # closing twice is harmless

    @inlineCallbacks
    def reopen(self, store):
        yield self.close(store)
        return self.open(store.path.parent)

    def finish(self, d):
        return d
