"""
L{leeloo.admin.state}: the state read from a relay's database, and the
export document, which reads back as the same records and refuses what is
not one.
"""

import configparser
import copy
import json
import os
import sqlite3

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.trial.unittest import SynchronousTestCase, TestCase

from leeloo.admin import cli
from leeloo.admin.state import Reader, StateError, open_database, parse_export
from leeloo.sqlitestore import DATABASE_NAME, MIGRATIONS, SQLiteStore
from leeloo.store import (
    APPEND, PUT_BOT_USER, PUT_CREW, PUT_DEVICE, PUT_MEMBER, PUT_TOKEN, RENAME_CREW, BotUserRecord, CrewRecord,
    DeviceRecord, LogEntry, MemberRecord, MultiCrewRecord, TokenRecord,
)
from tests.support import CHECKOUT

T0 = 1_700_000_000.0
HASH = "a" * 64


def document(**changes):
    doc = {
        "format": "leeloo-export", "version": 1,
        "crews": [{"code": "LEELOO-ALFA", "created_at": T0, "created_by": "leeloo_a",
                   "members": [{"device_id": "leeloo_a", "name": "Ann", "last_seen": T0, "delivered_seq": 1,
                                "acked_seq": None, "online": True}],
                   "bot_users": [{"user_id": "7", "name": "Tina"}], "aliases": ["LEELOO-OLD1"],
                   "log": [{"seq": 1, "id": "m1", "sender": "leeloo_a", "client_msg_id": "c1", "digest": "00ff",
                            "created_at": T0, "ephemeral": False, "payload": '{"type":"message"}'}]}],
        "devices": [{"device_id": "leeloo_a", "key_hash": HASH, "bound": True, "created_at": T0,
                     "last_seen": None}],
        "pending_tokens": [{"device_id": "leeloo_a", "tokens": {"access_token": "x"}, "expires_at": T0}],
        "multi_crew": [{"device_id": "leeloo_a", "crews": ["LEELOO-ALFA"], "primary": "LEELOO-ALFA"}],
    }
    for path, value in changes.items():
        target = doc
        *parents, last = path.split(".")
        for part in parents:
            target = target[int(part)] if isinstance(target, list) else target[part]
        target[last] = value
    return json.dumps(doc)


class ParseTests(SynchronousTestCase):
    def test_records(self):
        """
        A document reads back as the records it holds; members come in
        offline.
        """
        state = parse_export(document())
        s = state.snapshot
        self.assertEqual(s.crews, [CrewRecord("LEELOO-ALFA", T0, "leeloo_a")])
        self.assertEqual(s.members, [MemberRecord("LEELOO-ALFA", "leeloo_a", "Ann", T0, 1, None, False)])
        self.assertEqual(s.bot_users, [BotUserRecord("LEELOO-ALFA", "7", "Tina")])
        self.assertEqual(s.devices, [DeviceRecord("leeloo_a", HASH, True, T0, None)])
        self.assertEqual(s.tokens, [TokenRecord("leeloo_a", {"access_token": "x"}, T0)])
        self.assertEqual(s.aliases, {"LEELOO-OLD1": "LEELOO-ALFA"})
        self.assertEqual(s.multi_crew, [MultiCrewRecord("leeloo_a", ("LEELOO-ALFA",), "LEELOO-ALFA")])
        self.assertEqual(state.entries, [LogEntry("LEELOO-ALFA", 1, "m1", "leeloo_a", "c1", b"\x00\xff", T0,
                                                  b'{"type":"message"}', False)])

    def test_refused(self):
        """
        What is not an export, or an export with a wrong field, is refused
        with a line naming the problem.
        """
        two = json.loads(document())
        two["crews"].append(copy.deepcopy(two["crews"][0]))
        cases = [
            ("[]", "not a leeloo-admin export"),
            ("{", "not JSON"),
            (document(version=2), "export version 2"),
            (document(**{"crews.0.code": "leeloo-alfa"}), "not as the relay writes it"),
            (document(**{"crews.0.created_at": "yesterday"}), "created_at is missing"),
            (document(**{"crews.0.log.0.seq": True}), "seq is missing or not int"),
            (document(**{"crews.0.log.0.digest": "zz"}), "digest is not hex"),
            (document(**{"devices.0.key_hash": "the-key-itself"}), "not a SHA-256"),
            (document(**{"crews.0.aliases": ["LEELOO-ALFA"]}), "is a crew's code too"),
            (document(**{"crews.0.created_at": float("nan")}), "must be finite"),
            (json.dumps(two), "appears twice"),
            (document(**{"multi_crew.0.crews": ["LEELOO-ZZZZ"]}), "crew LEELOO-ZZZZ is not in the export"),
            (document(**{"multi_crew.0.primary": "LEELOO-ZZZZ"}), "is not one of its crews"),
        ]
        for text, problem in cases:
            with self.assertRaises(StateError, msg=problem) as raised:
                parse_export(text)
            self.assertIn(problem, str(raised.exception))


class ReaderTests(TestCase):
    timeout = 10

    def setUp(self):
        self.directory = self.mktemp()
        os.mkdir(self.directory)

    @inlineCallbacks
    def test_export_of_a_store(self):
        """
        The export of a database holds what the store wrote, and reads back
        as the same records.
        """
        store = SQLiteStore(self.directory, reactor)
        self.addCleanup(store.close)
        entry = LogEntry("LEELOO-ALFA", 1, "m1", "leeloo_a", None, None, T0, b'{"t":1}')
        yield store.write([
            (PUT_CREW, CrewRecord("LEELOO-ALFA", T0, "leeloo_a")),
            (PUT_MEMBER, MemberRecord("LEELOO-ALFA", "leeloo_a", "Ann", T0, 1)),
            (PUT_BOT_USER, BotUserRecord("LEELOO-ALFA", "7", "Tina")),
            (PUT_DEVICE, DeviceRecord("leeloo_a", HASH, False, T0)),
            (PUT_TOKEN, TokenRecord("leeloo_a", {"access_token": "x"}, T0 + 60)),
            (APPEND, entry),
        ])
        yield store.write([(RENAME_CREW, ("LEELOO-ALFA", "LEELOO-BRVO"))])
        with Reader(open_database(self.directory)) as r:
            exported = r.export()
            crews = r.crews()
        self.assertEqual([(c["code"], c["members"], c["messages"], c["last_seq"]) for c in crews],
                         [("LEELOO-BRVO", 1, 1, 1)])
        state = parse_export(json.dumps(exported))
        self.assertEqual([c.code for c in state.snapshot.crews], ["LEELOO-BRVO"])
        self.assertEqual(state.snapshot.aliases, {"LEELOO-ALFA": "LEELOO-BRVO"})
        self.assertEqual(state.entries[0].payload, b'{"t":1}')
        self.assertEqual(state.snapshot.tokens[0].tokens, {"access_token": "x"})

    def test_schema_6(self):
        """
        A database of schema 6 (before crew aliases) is read, with none.
        """
        db = sqlite3.connect(os.path.join(self.directory, DATABASE_NAME), isolation_level=None)
        for script in MIGRATIONS[:6]:
            db.executescript(script)
        db.execute("PRAGMA user_version = 6")
        db.execute("INSERT INTO crews VALUES ('LEELOO-ALFA', ?, NULL)", (T0,))
        db.close()
        with Reader(open_database(self.directory)) as r:
            self.assertEqual((r.aliases(), [c["code"] for c in r.crews()]), ({}, ["LEELOO-ALFA"]))

    def test_no_database(self):
        """
        A directory without a database is refused, and none is created.
        """
        self.assertRaises(StateError, open_database, self.directory)
        self.assertEqual(os.listdir(self.directory), [])


class EntryPointTests(SynchronousTestCase):
    def test_console_script(self):
        """
        setup.cfg declares the leeloo-admin console script, and it names the
        CLI's main.
        """
        config = configparser.ConfigParser()
        config.read(os.path.join(CHECKOUT, "setup.cfg"))
        scripts = dict(line.split(" = ") for line in
                       config["options.entry_points"]["console_scripts"].strip().splitlines())
        self.assertEqual(scripts["leeloo-admin"], "leeloo.admin.cli:main")
        self.assertTrue(callable(cli.main))
