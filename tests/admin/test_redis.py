"""
C{leeloo-admin} and Redis, for real (C{python -m leeloo.admin} against a
C{redis-server} with AOF and a password): C{migrate-to-redis} moves a
single node's SQLite data directory into Redis, and the read-only commands
answer from Redis exactly as they answer from SQLite.
"""

import io
import json
import os
from dataclasses import replace

from twisted.internet import defer, reactor
from twisted.internet.threads import deferToThread

from leeloo import __version__
from leeloo.admin.cli import main
from leeloo.admin.datadir import CONFIG_FILE, config_document
from leeloo.sqlitestore import SQLiteStore
from leeloo.store import (
    APPEND, PUT_ALIAS, PUT_BOT_USER, PUT_CREW, PUT_DEVICE, PUT_GRANT, PUT_MEMBER, PUT_MULTI_CREW, PUT_TOKEN,
    BotUserRecord, CrewRecord, DeviceRecord, GrantRecord, LogEntry, MemberRecord, MultiCrewRecord, PairingRecord, TokenRecord,
)
from leeloo.tap import Options

from ..test_redisstore import RedisTestCase
from .test_cli import admin

T0 = 1_700_000_000.0
PASSWORD = "admin-test-pw"


def state():
    """
    A single node's state: two crews (one with a name, an alias and a bot
    user), members, a log with client_msg_ids, devices, tokens, a
    multi-crew device.
    """
    ops = [
        (PUT_CREW, CrewRecord("LEELOO-ALFA", T0, "leeloo_a", "The band")),
        (PUT_CREW, CrewRecord("LEELOO-BRVO", T0 + 1, None)),
        (PUT_MEMBER, MemberRecord("LEELOO-ALFA", "leeloo_a", "Ann", T0 + 5, 3, 2, True)),
        (PUT_MEMBER, MemberRecord("LEELOO-ALFA", "leeloo_b", "Bob", T0 + 6, 1)),
        (PUT_MEMBER, MemberRecord("LEELOO-BRVO", "leeloo_a", "Ann", T0 + 7)),
        (PUT_BOT_USER, BotUserRecord("LEELOO-ALFA", "42", "Tina")),
        (PUT_ALIAS, ("LEELOO-OLD1", "LEELOO-ALFA")),
        (PUT_DEVICE, DeviceRecord("leeloo_a", "a" * 64, True, T0, None)),
        (PUT_DEVICE, DeviceRecord("leeloo_b", "b" * 64, False, T0, T0 + 9)),
        (PUT_TOKEN, TokenRecord("leeloo_b", {"access_token": "opaque", "expires_in": 3600}, T0 + 3600)),
        (PUT_MULTI_CREW, MultiCrewRecord("leeloo_a", ("LEELOO-ALFA", "LEELOO-BRVO"), "LEELOO-ALFA")),
        (PUT_GRANT, GrantRecord("leeloo_a", "gAAAA-opaque-ciphertext")),
    ]
    for seq in range(1, 4):
        payload = json.dumps({"type": "message", "payload": {"text": f"m{seq} é"}, "seq": seq}).encode()
        ops.append((APPEND, LogEntry("LEELOO-ALFA", seq, f"id{seq}", "leeloo_a", f"c{seq}", bytes([seq]) * 32,
                                     T0 + 10 + seq, payload, seq == 2)))
    return ops


class MigrationTests(RedisTestCase):
    """
    migrate-to-redis, then reading Redis.
    """

    redis_options = {"password": PASSWORD}
    timeout = 60

    @defer.inlineCallbacks
    def setUp(self):
        yield RedisTestCase.setUp(self)
        self.patch(os, "environ", {**os.environ, "LEELOO_REDIS_PASSWORD": PASSWORD})
        self.data_dir = os.path.abspath(self.mktemp())
        os.makedirs(self.data_dir)
        store = SQLiteStore(self.data_dir, reactor)
        yield store.write(state())
        yield store.pairings.put(PairingRecord("ABCDEFGH", "leeloo_b", "Bob", None, "streaming", T0, T0 + 600,
                                               "s" * 64, "c" * 64, "v" * 43))
        yield store.close()

    def admin(self, *args, data_dir=None):
        """
        C{leeloo-admin} as its own process (C{python -m leeloo.admin}).
        """
        return deferToThread(admin, data_dir or self.data_dir, *args)

    def main(self, *args, data_dir=None):
        """
        C{leeloo-admin}'s main() in this process (faster); the same answer.
        """
        out, err = io.StringIO(), io.StringIO()
        umask = os.umask(0o022)
        os.umask(umask)
        try:
            status = main(["--data-dir", data_dir or self.data_dir, *args], out, err)
        finally:
            os.umask(umask)
        return defer.succeed((status, out.getvalue(), err.getvalue()))

    @defer.inlineCallbacks
    def test_migrate_sqlite_data_dir(self):
        """
        migrate-to-redis copies everything a relay loads at start (crews,
        members, bot users, aliases, devices, tokens, multi-crew devices,
        pairing flows, Spotify grants, each crew's log with its client_msg_ids)
        into Redis,
        with the password from LEELOO_REDIS_PASSWORD; a relay on that Redis
        replays the log byte for byte and numbers on after it.  A second
        migration into the same Redis is refused and changes nothing.
        """
        status, out, err = yield self.admin("migrate-to-redis", self.redis.url)
        self.assertEqual((status, err), (0, ""))
        self.assertIn("copied 2 crews, 3 messages, 2 devices, 1 pending tokens, 1 Spotify grants and 1 pairing flows", out)
        sqlite = SQLiteStore(self.data_dir, reactor)
        before = sqlite.load()
        yield sqlite.close()
        store = self.open(password=PASSWORD)
        after = store.load()
        # SQLite's start-up read leaves the ephemeral flag of these at its
        # default (the export compares it, see below).
        after.client_messages = [replace(e, ephemeral=False) for e in after.client_messages]
        for name in ("crews", "members", "bot_users", "tokens", "devices", "client_messages", "pairings",
                     "multi_crew", "grants"):
            self.assertEqual(sorted(map(repr, getattr(after, name))), sorted(map(repr, getattr(before, name))),
                             name)
        for name in ("last_seq", "last_message_at", "log_bytes", "aliases"):
            self.assertEqual(getattr(after, name), getattr(before, name), name)
        replay = yield store.replay("LEELOO-ALFA", 0, 3, 0.0, "nobody", 10)
        self.assertEqual([payload for _, payload in replay.entries], [e.payload for _, e in state()[-3:]])
        self.assertEqual(store.sequences.next("LEELOO-ALFA"), 4)
        status, out, err = yield self.admin("migrate-to-redis", self.redis.url)
        self.assertEqual((status, out), (1, ""))
        self.assertIn("already holds a relay's state", err)

    @defer.inlineCallbacks
    def test_read_only_commands_against_redis(self):
        """
        After the migration, crews, crew CODE, devices and export answer
        the same from Redis (given with --redis, or found in the
        config.json of a relay started with --redis) as from the SQLite
        data directory; backup is refused with what to do instead.
        """
        commands = ["crews", "crew LEELOO-ALFA", "crew LEELOO-OLD1", "devices", "export"]
        from_sqlite = {}
        for command in commands:
            from_sqlite[command] = yield self.main(*command.split())
        status, _, err = yield self.main("migrate-to-redis", self.redis.url)
        self.assertEqual((status, err), (0, ""))
        # A relay's data directory that says where its Redis is.
        redis_dir = os.path.abspath(self.mktemp())
        options = Options(environ={"LEELOO_REDIS_PASSWORD": PASSWORD})
        options.parseOptions(["--data-dir", redis_dir, "--redis", self.redis.url])
        with open(os.path.join(redis_dir, CONFIG_FILE), "w") as f:
            f.write(config_document(options.config, __version__))
        empty_dir = os.path.abspath(self.mktemp())
        os.makedirs(empty_dir)
        for command in commands:
            for where in (("--redis", self.redis.url), ()):
                status, out, err = yield self.main(*where, *command.split(),
                                                   data_dir=empty_dir if where else redis_dir)
                expected = from_sqlite[command]
                if command == "export":
                    self.assertEqual((status, err), (0, ""))
                    drop = lambda d: {k: v for k, v in json.loads(d).items() if k != "exported_at"}  # noqa: E731
                    self.assertEqual(drop(out), drop(expected[1]))
                else:
                    self.assertEqual((status, out, err), expected, (command, where))
        self.assertEqual(from_sqlite["crews"][1].splitlines()[-1], "2 crews")
        status, out, err = yield self.main("backup", os.path.join(empty_dir, "copy"), data_dir=redis_dir)
        self.assertEqual(status, 1)
        self.assertIn("Redis's own persistence", err)
        with open(os.path.join(redis_dir, CONFIG_FILE)) as f:
            self.assertNotIn(PASSWORD, f.read())

    @defer.inlineCallbacks
    def test_wrong_password_refused(self):
        """
        Without the right password the commands are refused in one line that
        does not show it.
        """
        self.patch(os, "environ", {**os.environ, "LEELOO_REDIS_PASSWORD": "not-it"})
        status, out, err = yield self.admin("--redis", self.redis.url, "crews")
        self.assertEqual((status, out, len(err.splitlines())), (1, "", 1))
        self.assertIn("refused", err)
        self.assertNotIn("not-it", err)
