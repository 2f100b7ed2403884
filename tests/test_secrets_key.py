"""
The secrets key that seals the Spotify tokens the relay keeps: created 0600
in DATA_DIR on first start (or at C{--secrets-key-file}), and a database
holding sealed tokens opened without its key (missing, or another) says so
in one line and does not start.  And L{leeloo.sealing} itself.
"""

from __future__ import annotations

import json
import os
import sqlite3
import stat
from pathlib import Path

import txaio
from cryptography.fernet import Fernet
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase, TestCase

from leeloo.redisstore import BlockingRedis
from leeloo.redisurl import parse_redis_url
from leeloo.sealing import KEY_FILE_NAME, SealError, Sealer, create_key, read_key
from leeloo.service import StartupError, build_service
from leeloo.sqlitestore import DATABASE_NAME
from leeloo.tap import Options

from .redis_support import SKIP as REDIS_SKIP
from .redis_support import RedisServer

T0 = 1_700_000_000.0


class SealerTests(SynchronousTestCase):
    def test_round_trip(self) -> None:
        """
        A sealed value opens to what was sealed, and its text holds none of
        it.
        """
        sealer = Sealer()
        sealed = sealer.seal({"refresh_token": "rt-secret"})
        self.assertNotIn("rt-secret", sealed)
        self.assertEqual(sealer.open(sealed), {"refresh_token": "rt-secret"})

    def test_other_key(self) -> None:
        """
        A value sealed with another key, or damaged, does not open.
        """
        sealed = Sealer().seal({"a": 1})
        self.assertRaises(SealError, Sealer().open, sealed)
        self.assertRaises(SealError, Sealer().open, "not-a-token")

    def test_repr_holds_no_key(self) -> None:
        """
        A sealer's repr never shows its key.
        """
        key = Fernet.generate_key()
        self.assertNotIn(key.decode(), repr(Sealer(key)))

    def test_created_0600_never_over_a_file(self) -> None:
        """
        A key file is created readable by its owner only, read back, and
        never written over one that exists.
        """
        path = self.mktemp()
        key = create_key(Path(path))
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)
        self.assertEqual(read_key(Path(path)), key)
        self.assertRaises(Exception, create_key, Path(path))


class KeyFileTests(SynchronousTestCase):
    def setUp(self) -> None:
        previous = txaio.config.loop
        self.addCleanup(setattr, txaio.config, "loop", previous)
        self.tmp = self.mktemp()
        os.makedirs(self.tmp)
        self.data = os.path.join(self.tmp, "data")

    def build(self, *argv: str):
        # A start after a stop: the last tree's store closed first (never
        # run, it has no writer to wait for), as one relay holds a database.
        previous = getattr(self, "store", None)
        if previous is not None:
            self.successResultOf(previous.close())
        options = Options(environ={})
        options.parseOptions(["--data-dir", self.data, *argv])
        tree = build_service(options.config, MemoryReactorClock(), exit=self.fail, notify=lambda s: None,
                             environ={})
        self.store = tree.getServiceNamed("store").store
        self.addCleanup(self.store.close)
        return tree

    def park_sealed_token(self) -> None:
        """
        Start once, and leave a token sealed with the key in the database.
        """
        tree = self.build()
        relay = tree.getServiceNamed("relay").relay
        sealed = relay.sealer.seal_tokens({"access_token": "at-secret"})
        db = sqlite3.connect(os.path.join(self.data, DATABASE_NAME))
        db.execute("INSERT INTO pending_tokens VALUES (?, ?, ?)", ("leeloo_00000000000a", json.dumps(sealed), T0))
        db.commit()
        db.close()

    def test_created_on_first_start(self) -> None:
        """
        The first start creates DATA_DIR/secrets.key, 0600; the next one
        uses the same key.
        """
        self.build()
        path = os.path.join(self.data, KEY_FILE_NAME)
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)
        with open(path, "rb") as f:
            key = f.read()
        Fernet(key.strip())
        self.build()
        with open(path, "rb") as f:
            self.assertEqual(f.read(), key)

    def test_option(self) -> None:
        """
        C{--secrets-key-file} names the key file (created there, not in
        DATA_DIR).
        """
        path = os.path.join(self.tmp, "shared.key")
        self.build("--secrets-key-file", path)
        self.assertTrue(os.path.exists(path))
        self.assertFalse(os.path.exists(os.path.join(self.data, KEY_FILE_NAME)))

    def test_missing_key_file(self) -> None:
        """
        A database holding sealed tokens, started without its key file, is
        refused in one line naming the file, and no new key is made.
        """
        self.park_sealed_token()
        path = os.path.join(self.data, KEY_FILE_NAME)
        os.remove(path)
        error = self.assertRaises(StartupError, self.build)
        self.assertIn(f"the secrets key file {path} is missing", str(error))
        self.assertIn("encrypted Spotify tokens", str(error))
        self.assertNotIn("\n", str(error))
        self.assertFalse(os.path.exists(path))

    def test_wrong_key(self) -> None:
        """
        A database holding sealed tokens, started with another key, is
        refused in one line.
        """
        self.park_sealed_token()
        path = os.path.join(self.data, KEY_FILE_NAME)
        with open(path, "wb") as f:
            f.write(Fernet.generate_key())
        error = self.assertRaises(StartupError, self.build)
        self.assertIn("does not open the Spotify tokens", str(error))
        self.assertNotIn("\n", str(error))

    def test_unreadable_key_file(self) -> None:
        """
        A key file holding no key is refused in one line, without its
        contents.
        """
        self.build()
        path = os.path.join(self.data, KEY_FILE_NAME)
        with open(path, "w") as f:
            f.write("not-a-key-at-all")
        error = self.assertRaises(StartupError, self.build)
        self.assertIn("holds no key", str(error))
        self.assertNotIn("not-a-key-at-all", str(error))


class SharedKeyTests(TestCase):
    """
    Nodes sharing one Redis seal with one secrets key: a node whose key is
    another (started without the key file, it made a new one) is refused,
    before it seals anything the others could not open.
    """

    skip = REDIS_SKIP
    timeout = 20

    def setUp(self):
        previous = txaio.config.loop
        self.addCleanup(setattr, txaio.config, "loop", previous)
        self.redis = RedisServer(self)
        return self.redis.start()

    def build(self, data: str, *argv: str):
        options = Options(environ={})
        options.parseOptions(["--data-dir", os.path.join(self.tmp, data), "--redis", self.redis.url, *argv])
        tree = build_service(options.config, MemoryReactorClock(), exit=self.fail, notify=lambda s: None,
                             environ={})
        self.addCleanup(tree.getServiceNamed("store").store.close)
        return tree

    def test_one_key_for_every_node(self) -> None:
        self.tmp = self.mktemp()
        os.makedirs(self.tmp)
        self.build("one")
        first_key = os.path.join(self.tmp, "one", KEY_FILE_NAME)
        error = self.assertRaises(StartupError, self.build, "two")
        self.assertIn("is not the key the other nodes on this Redis use", str(error))
        self.assertNotIn("\n", str(error))
        # With the first node's key it starts.
        self.build("three", "--secrets-key-file", first_key)
        with open(first_key, "rb") as f:
            key = f.read().strip()
        redis = BlockingRedis(parse_redis_url(self.redis.url))
        self.addCleanup(redis.close)
        recorded = redis.command("GET", "leeloo:secrets-key")
        self.assertEqual(len(recorded), 32)
        self.assertNotIn(key[:8], recorded)
