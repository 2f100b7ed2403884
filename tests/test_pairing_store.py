"""
Where Spotify pairing flows are kept: the L{IPairings} contract, on the
in-memory store and on SQLite (with its migration), and a relay restarted
on a SQLite store taking up the flows it had.
"""

from __future__ import annotations

import os
import sqlite3

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks, succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface.verify import verifyObject

from leeloo.relay import Relay
from leeloo.spotify import SpotifyConfig, SpotifyOAuth
from leeloo.sqlitestore import DATABASE_NAME, MIGRATIONS, SCHEMA_VERSION, SQLiteStore, schema_version
from leeloo.store import IPairings, MemoryStore, PairingRecord
from leeloo.testing import Device

from .test_store import contract

T0 = 1_700_000_000.0


def record(code: str = "ABCDEFGH", device_id: str = "leeloo_a", expires_at: float = T0 + 600, **fields):
    values = dict(device_name="Kitchen", crew_code="ALPHA", scopes="user-read-playback-state",
                  created_at=T0)
    values.update(fields)
    return PairingRecord(code, device_id, expires_at=expires_at, **values)


class PairingsContract:
    """
    What every store's C{pairings} does.  The test case provides
    C{make_store()}, C{reopen(store)} and C{finish(d)} as in test_store.
    """

    def setUp(self):
        self.store = self.make_store()

    @inlineCallbacks
    def restart(self):
        self.store = yield self.reopen(self.store)
        return self.store.load()

    def test_provides(self):
        """
        A store's pairings provide IPairings.
        """
        self.assertTrue(verifyObject(IPairings, self.store.pairings))

    @contract
    def test_nothing(self):
        """
        A new store holds no flows.
        """
        snapshot = yield self.restart()
        self.assertEqual(snapshot.pairings, [])

    @contract
    def test_put(self):
        """
        A flow put is read back whole, every field, after a restart.
        """
        waiting = record()
        pressed = record("JKLMNPQR", "leeloo_b", crew_code=None, state_hash="s" * 64, cookie_hash="c" * 64,
                         verifier="v" * 86)
        yield self.store.pairings.put(waiting)
        yield self.store.pairings.put(pressed)
        snapshot = yield self.restart()
        self.assertEqual(sorted(snapshot.pairings, key=lambda r: r.user_code), [waiting, pressed])

    @contract
    def test_consent_kept(self):
        """
        Whether a flow offered to keep the access, and whether the phone
        said yes (issue 20), come back after a restart.
        """
        flows = [record("AAAAAAAA"), record("BBBBBBBB", keep_offered=True),
                 record("CCCCCCCC", keep_offered=True, keep=True)]
        for flow in flows:
            yield self.store.pairings.put(flow)
        snapshot = yield self.restart()
        self.assertEqual(sorted(snapshot.pairings, key=lambda r: r.user_code), flows)

    @contract
    def test_put_again(self):
        """
        A flow put again under its code replaces the first.
        """
        yield self.store.pairings.put(record())
        pressed = record(state_hash="s" * 64, cookie_hash="c" * 64, verifier="v" * 86, expires_at=T0 + 900)
        yield self.store.pairings.put(pressed)
        snapshot = yield self.restart()
        self.assertEqual(snapshot.pairings, [pressed])

    @contract
    def test_delete(self):
        """
        A deleted flow is gone; deleting one that is not there is nothing.
        """
        yield self.store.pairings.put(record())
        yield self.store.pairings.put(record("JKLMNPQR", "leeloo_b"))
        yield self.store.pairings.delete("ABCDEFGH")
        yield self.store.pairings.delete("NOTTHERE")
        snapshot = yield self.restart()
        self.assertEqual([r.user_code for r in snapshot.pairings], ["JKLMNPQR"])

    @contract
    def test_delete_expired(self):
        """
        delete_expired forgets the flows expired at or before the time,
        and says how many.
        """
        yield self.store.pairings.put(record("AAAAAAAA", expires_at=T0 + 10))
        yield self.store.pairings.put(record("BBBBBBBB", expires_at=T0 + 20))
        yield self.store.pairings.put(record("CCCCCCCC", expires_at=T0 + 30))
        count = yield self.store.pairings.delete_expired(T0 + 20)
        self.assertEqual(count, 2)
        snapshot = yield self.restart()
        self.assertEqual([r.user_code for r in snapshot.pairings], ["CCCCCCCC"])


class MemoryPairingsTests(PairingsContract, SynchronousTestCase):
    def make_store(self):
        return MemoryStore()

    def reopen(self, store):
        return succeed(store)

    def finish(self, d):
        self.successResultOf(d)


class SQLitePairingsTests(PairingsContract, TestCase):
    timeout = 10

    def make_store(self):
        self.directory = self.mktemp()
        os.mkdir(self.directory)
        return self.open()

    def open(self):
        store = SQLiteStore(self.directory, reactor)
        self.addCleanup(store.close)
        return store

    @inlineCallbacks
    def reopen(self, store):
        yield store.close()
        return self.open()

    def finish(self, d):
        return d

    def test_migration(self):
        """
        A database of the schema before pairings (version 5) migrates to
        this relay's version, with an empty pairings table, keeping what it
        had.
        """
        directory = self.mktemp()
        os.mkdir(directory)
        db = sqlite3.connect(os.path.join(directory, DATABASE_NAME), isolation_level=None)
        for version, script in enumerate(MIGRATIONS[:5]):
            db.executescript(script)
        db.execute("PRAGMA user_version = 5")
        db.execute("INSERT INTO crews VALUES ('ALPHA', ?, 'leeloo_a')", (T0,))
        db.close()
        self.assertGreaterEqual(SCHEMA_VERSION, 6)
        store = SQLiteStore(directory, reactor)
        self.addCleanup(store.close)
        snapshot = store.load()
        self.assertEqual(([c.code for c in snapshot.crews], snapshot.pairings), (["ALPHA"], []))
        db = sqlite3.connect(os.path.join(directory, DATABASE_NAME))
        self.addCleanup(db.close)
        self.assertEqual(schema_version(db), SCHEMA_VERSION)
        columns = [row[1] for row in db.execute("PRAGMA table_info(pairings)")]
        self.assertEqual(columns, ["user_code", "device_id", "device_name", "crew_code", "scopes", "created_at",
                                   "expires_at", "state_hash", "cookie_hash", "verifier", "keep"])


class RestartTests(TestCase):
    """
    A relay on SQLite, stopped and started again, keeps its pairings.
    """

    timeout = 10

    @inlineCallbacks
    def test_code_survives_a_restart(self):
        """
        A code a device was shown before the relay restarted opens its page
        and presses its button after.
        """
        directory = self.mktemp()
        os.mkdir(directory)
        clock = Clock()
        clock.advance(T0)
        spotify = SpotifyOAuth(SpotifyConfig("id", "secret", "https://relay.test/spotify/callback"), None, clock)
        store = SQLiteStore(directory, reactor)
        relay = Relay(clock, store, spotify=spotify)
        device = Device(relay)
        device.send(type="register", device_id="leeloo_00000000000a", device_name="Kitchen")
        device.send(type="spotify_pair")
        # The store's one database writer runs its operations in order: once
        # this one is done, the flow's put was, and its answer went out.
        yield store.pairings.delete("ZZZZZZZZ")
        answer = device.take()[-1]
        self.assertEqual(answer["type"], "spotify_pair")
        yield relay.journal.drain()
        yield store.close()

        store = SQLiteStore(directory, reactor)
        self.addCleanup(store.close)
        restarted = Relay(clock, store, spotify=spotify)
        view = restarted.pairing.lookup(answer["user_code"])
        self.assertEqual(view.device_name, "Kitchen")
        consent = yield restarted.pairing.consent(answer["user_code"])
        self.assertIn("code_challenge=", consent.location)
