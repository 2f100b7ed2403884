"""
Several crews per device on the real SQLite store (issue 16): a database
made by the previous release (schema 6, at 2004e7d: tests/fixtures/) is
migrated and serves its crews, members and logs, its legacy devices still
in their one crew; and a multi-crew device's crews and primary survive the
store being reopened by a new relay.
"""

import os
import sqlite3

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase

from leeloo.limits import Rate, RelayLimits
from leeloo.relay import Relay
from leeloo.sqlitestore import DATABASE_NAME, SCHEMA_VERSION, SQLiteStore, schema_version
from leeloo.store import MultiCrewRecord
from leeloo.testing import Device

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "schema6-2004e7d.sql")
ANN, BOB, CAT = "leeloo_aaaaaaaaaaaa", "leeloo_bbbbbbbbbbbb", "leeloo_cccccccccccc"
LIMITS = RelayLimits(messages=Rate(1000, 1000), entries=Rate.per_window(1000, 600))


class SQLiteRelayTestCase(TestCase):
    """
    Relays on a SQLiteStore in a temporary directory (its queries in its
    database writer, answered on the real reactor), with a test clock for
    their time.
    """

    timeout = 20

    def setUp(self):
        self.directory = self.mktemp()
        os.mkdir(self.directory)
        self.clock = Clock()
        self.clock.advance(1_700_000_000.0)

    @inlineCallbacks
    def open_relay(self):
        """
        A relay on the directory's store (a restart: the last relay's store
        closed, its writer gone, and a new store opening the same file).
        """
        previous = getattr(self, "relay", None)
        if previous is not None:
            yield previous.store.close()
        store = SQLiteStore(self.directory, reactor)
        self.addCleanup(store.close)
        self.relay = Relay(self.clock, store=store, limits=LIMITS, presence_grace=0)
        return self.relay

    @inlineCallbacks
    def settle(self):
        """
        Wait until what the relay asked of its store (writes, replays) is
        done: everything is queued on the store's one database writer, so
        a query put after it comes back after it.
        """
        yield self.relay.journal.barrier()
        yield self.relay.store.replay("NO-SUCH-CREW", 0, 0, 0.0, "", 1)

    @inlineCallbacks
    def device(self, device_id, crew=None, **extra):
        d = Device(self.relay, "192.0.2.7")
        fields = dict(type="register", device_id=device_id, device_name=device_id[-4:].upper(), **extra)
        if crew is not None:
            fields["crew_code"] = crew
        d.send(**fields)
        yield self.settle()
        return d

    @inlineCallbacks
    def send(self, device, **fields):
        device.send(**fields)
        yield self.settle()

    @staticmethod
    def texts(device):
        return [(f.get("crew_code"), f["payload"].get("text")) for f in device.take() if f["type"] == "message"]


class PreviousReleaseTests(SQLiteRelayTestCase):
    """
    A database the previous release made (schema 6): HOME with Ann and Bob
    and a bot user, BAND made by Cat; Ann, a deployed device, moved from
    HOME to BAND with join_crew, leaving her HOME row behind.
    """

    def setUp(self):
        super().setUp()
        db = sqlite3.connect(os.path.join(self.directory, DATABASE_NAME))
        with open(FIXTURE) as f:
            db.executescript(f.read())
        [(self.made_at,)] = db.execute("SELECT MAX(created_at) FROM messages")
        db.close()
        # An hour after the old relay stopped.
        self.clock.advance(self.made_at + 3600 - self.clock.seconds())

    @inlineCallbacks
    def test_fixture_is_the_previous_schema(self):
        """
        The fixture is at schema version 6, the last before this one, with
        no multi-crew table; opening it migrates it to this relay's version.
        """
        db = sqlite3.connect(os.path.join(self.directory, DATABASE_NAME))
        self.addCleanup(db.close)
        self.assertEqual(schema_version(db), 6)
        self.assertGreater(SCHEMA_VERSION, 6)
        tables = {name for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        self.assertNotIn("multi_crew_devices", tables)
        yield self.open_relay()
        self.assertEqual(schema_version(db), SCHEMA_VERSION)

    @inlineCallbacks
    def test_crews_members_and_logs_load(self):
        """
        After the migration the crews (with no name), every member row, the
        bot user and each crew's sequence load; no device is multi-crew.
        """
        relay = yield self.open_relay()
        crews = relay.crews_part.crews
        self.assertEqual(sorted(crews), ["BAND", "HOME"])
        self.assertEqual((crews["HOME"].name, crews["BAND"].name), (None, None))
        self.assertEqual(sorted(crews["HOME"].members), [ANN, BOB])
        self.assertEqual(sorted(crews["BAND"].members), [ANN, CAT])
        self.assertEqual(crews["HOME"].bot_users, {"42": "Tina"})
        self.assertEqual((crews["HOME"].fanned_seq, crews["BAND"].fanned_seq), (3, 2))
        self.assertEqual(relay.crews_part.multi, {})

    @inlineCallbacks
    def test_serves_its_logs(self):
        """
        A member of a migrated crew coming back gets what it missed from
        the old log, tagged with its crew (entries the old relay stored),
        and new messages continue the crew's sequence.
        """
        yield self.open_relay()
        bob = yield self.device(BOB, "home")
        got = [(f["seq"], f.get("crew_code"), f["msg_type"]) for f in bob.take() if f["type"] == "message"]
        self.assertEqual(got, [(2, "HOME", "song_push")])
        cat = yield self.device(CAT, "BAND")
        cat.take()
        yield self.send(cat, type="message", payload={"text": "new"}, client_msg_id="c-2")
        [sent] = cat.take()
        self.assertEqual((sent["type"], sent["seq"], sent["crew_code"]), ("sent", 3, "BAND"))

    @inlineCallbacks
    def test_old_client_msg_id_remembered(self):
        """
        A resend of a message the old relay stored with a client_msg_id is
        answered from the migrated log, not stored again.
        """
        yield self.open_relay()
        cat = yield self.device(CAT, "BAND")
        cat.take()
        yield self.send(cat, type="message", payload={"text": "band one"}, client_msg_id="c-1")
        [sent] = cat.take()
        self.assertEqual((sent["seq"], self.relay.crews_part.crews["BAND"].fanned_seq), (1, 2))

    @inlineCallbacks
    def test_legacy_device_in_its_one_crew(self):
        """
        Ann, who moved from HOME to BAND before the upgrade, comes back to
        BAND only: HOME does not hear of her, and the bot API counts her in
        BAND alone; registered without a crew she is in none.
        """
        yield self.open_relay()
        bob = yield self.device(BOB, "HOME")
        bob.take()
        ann = yield self.device(ANN)
        self.assertEqual((ann.session.memberships(), ann.session.multi), ([], False))
        yield self.send(ann, type="join_crew", crew_code="BAND")
        self.assertEqual([m.crew.code for m in ann.session.memberships()], ["BAND"])
        self.assertEqual(bob.take(), [])
        self.assertEqual(self.relay.crew_status("HOME").device_names, ["BBBB"])
        self.assertEqual(self.relay.crew_status("BAND").device_names, ["AAAA"])

    @inlineCallbacks
    def test_old_rows_never_become_memberships(self):
        """
        Once the upgraded Ann turns multi-crew (crew_add), her crews are the
        one she is in and the one she adds, never HOME, which she left
        before the upgrade (her member row there stays); after a restart
        she comes back to those two, and HOME hears nothing of her.
        """
        yield self.open_relay()
        yield self.device(CAT, "BAND")
        yield self.device("leeloo_dddddddddddd", "NEW")
        ann = yield self.device(ANN, "BAND")
        yield self.send(ann, type="crew_add", crew_code="NEW")
        self.assertEqual(self.relay.crews_part.multi[ANN], MultiCrewRecord(ANN, ("BAND", "NEW"), "BAND"))
        ann.close()
        yield self.settle()
        yield self.open_relay()
        self.assertIn(ANN, self.relay.crews_part.crews["HOME"].members)
        bob = yield self.device(BOB, "HOME")
        bob.take()
        back = yield self.device(ANN)
        self.assertEqual([m.crew.code for m in back.session.memberships()], ["BAND", "NEW"])
        self.assertEqual(bob.take(), [])


class ReopenedTests(SQLiteRelayTestCase):
    """
    A multi-crew device across a restart: a new relay on a new
    SQLiteStore opening the same database.
    """

    @inlineCallbacks
    def three_crews(self):
        yield self.open_relay()
        for code in ("ALPHA", "BRAVO", "CHARLIE"):
            yield self.device(f"{code.lower()}_1", code)
        m = yield self.device("m", "ALPHA")
        yield self.send(m, type="crew_add", crew_code="BRAVO")
        yield self.send(m, type="crew_add", crew_code="CHARLIE")
        m.close()
        yield self.settle()

    @inlineCallbacks
    def test_reenters_all_three_after_restart(self):
        """
        After a relay restart the device re-enters all three crews and gets
        what it missed in each, in order per crew, tagged with its crew;
        live traffic follows.
        """
        yield self.three_crews()
        yield self.open_relay()
        members = {}
        for code in ("ALPHA", "BRAVO", "CHARLIE"):
            members[code] = yield self.device(f"{code.lower()}_1", code)
        for code, text in (("BRAVO", "b1"), ("ALPHA", "a1"), ("BRAVO", "b2"), ("CHARLIE", "c1")):
            yield self.send(members[code], type="message", payload={"text": text})
        back = yield self.device("m")
        got = self.texts(back)
        self.assertEqual(sorted(got), [("ALPHA", "a1"), ("BRAVO", "b1"), ("BRAVO", "b2"), ("CHARLIE", "c1")])
        self.assertEqual([t for c, t in got if c == "BRAVO"], ["b1", "b2"])
        yield self.send(members["CHARLIE"], type="message", payload={"text": "live"})
        self.assertEqual(self.texts(back), [("CHARLIE", "live")])

    @inlineCallbacks
    def test_primary_and_names_after_restart(self):
        """
        The primary set before a restart, and a crew's name, are what
        C{crews} says after it.
        """
        yield self.open_relay()
        namer = Device(self.relay, "192.0.2.9")
        namer.send(type="create_crew", device_id="n", crew_code="BAND", crew_name="The band")
        yield self.settle()
        m = yield self.device("m", "BAND")
        yield self.device("h", "HOME")
        yield self.send(m, type="crew_add", crew_code="HOME")
        yield self.send(m, type="crew_primary", crew_code="HOME")
        m.close()
        yield self.settle()
        yield self.open_relay()
        back = yield self.device("m")
        back.take()
        back.send(type="crews")
        self.assertEqual(back.last(), {"type": "crews", "primary": "HOME", "crews": [
            {"crew_code": "BAND", "crew_name": "The band", "members_online": 1, "member_names": []},
            {"crew_code": "HOME", "crew_name": None, "members_online": 1, "member_names": []},
        ]})
