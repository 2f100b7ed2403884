"""
L{leeloo.admin.datadir}: what the relay leaves in its data directory for
C{leeloo-admin}, its secrets masked and its files the relay's user's alone.
"""

import json
import os
import stat
from pathlib import Path

from twisted.internet.defer import Deferred
from twisted.trial.unittest import SynchronousTestCase

from leeloo.admin.datadir import MASK, DataDirFiles, admin_token, config_document
from leeloo.spotify import SpotifyConfig
from leeloo.tap import Config, Options


def mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


class TokenTests(SynchronousTestCase):
    def setUp(self):
        self.dir = Path(self.mktemp())
        self.dir.mkdir()

    def test_created_private(self):
        """
        The token is made once, mode 0600, and kept across restarts.
        """
        token = admin_token(self.dir)
        self.assertGreaterEqual(len(token), 43)
        self.assertEqual(mode(self.dir / "admin.token"), 0o600)
        self.assertEqual(admin_token(self.dir), token)

    def test_tightened(self):
        """
        A token file others may read is made 0600.
        """
        (self.dir / "admin.token").write_text("x" * 43 + "\n")
        os.chmod(self.dir / "admin.token", 0o644)
        self.assertEqual(admin_token(self.dir), "x" * 43)
        self.assertEqual(mode(self.dir / "admin.token"), 0o600)

    def test_short_token_replaced(self):
        """
        An empty or short token file is replaced by a new token.
        """
        (self.dir / "admin.token").write_text("short\n")
        self.assertNotEqual(admin_token(self.dir), "short")


class ConfigTests(SynchronousTestCase):
    def test_secrets_masked(self):
        """
        config.json holds the effective configuration with every secret
        masked: the bot API's secret and Spotify's client secret.
        """
        options = Options(environ={"TELEGRAM_API_SECRET": "bot-s3cret", "SPOTIFY_CLIENT_ID": "cid",
                                   "SPOTIFY_CLIENT_SECRET": "spotify-s3cret",
                                   "SPOTIFY_REDIRECT_URI": "https://leeloo.example.net/spotify/callback"})
        options.parseOptions(["--data-dir", self.mktemp(), "--admin-listen", "tcp:8081:interface=127.0.0.1",
                              "--replay-limit", "7"])
        text = config_document(options.config, "1.2.3")
        self.assertNotIn("s3cret", text)
        document = json.loads(text)
        config = document["config"]
        self.assertEqual((config["telegram_api_secret"], config["spotify"]["client_secret"]), (MASK, MASK))
        self.assertEqual((config["spotify"]["client_id"], config["replay_limit"], document["version"]),
                         ("cid", 7, "1.2.3"))
        self.assertEqual(config["admin_listen"], ["tcp:8081:interface=127.0.0.1"])

    def test_unset_secret(self):
        """
        A secret that is not set reads null, not the mask.
        """
        config = json.loads(config_document(Config(), "1"))["config"]
        self.assertIsNone(config["telegram_api_secret"])
        spotify = json.loads(config_document(Config(spotify=SpotifyConfig("i", "s", "u")), "1"))["config"]["spotify"]
        self.assertEqual(spotify["client_secret"], MASK)


class FakeListener:
    description = "tcp:0:interface=127.0.0.1"

    def __init__(self):
        self.listening = Deferred()


class FakePort:
    def __init__(self, host, port):
        self.address = type("Address", (), {"host": host, "port": port})()

    def getHost(self):
        return self.address


class FilesServiceTests(SynchronousTestCase):
    def setUp(self):
        self.dir = Path(self.mktemp())
        self.dir.mkdir()

    def test_written_at_start(self):
        """
        config.json is written at start, 0600; admin.json once the admin
        listeners listen (a wildcard address reached on loopback), and
        removed at stop.
        """
        listeners = [FakeListener(), FakeListener(), FakeListener()]
        files = DataDirFiles(self.dir, Config(), "1", listeners)
        files.startService()
        self.assertEqual(mode(self.dir / "config.json"), 0o600)
        self.assertFalse((self.dir / "admin.json").exists())
        listeners[0].listening.callback(FakePort("192.0.2.1", 8080))
        listeners[1].listening.callback(FakePort("127.0.0.1", 8081))
        listeners[2].listening.callback(FakePort("0.0.0.0", 8082))
        endpoint = json.loads((self.dir / "admin.json").read_text())
        # Loopback first: the admin API answers no other address.
        self.assertEqual([a["url"] for a in endpoint["admin"]],
                         ["http://127.0.0.1:8081", "http://127.0.0.1:8082", "http://192.0.2.1:8080"])
        self.assertEqual(mode(self.dir / "admin.json"), 0o600)
        files.stopService()
        self.assertFalse((self.dir / "admin.json").exists())
