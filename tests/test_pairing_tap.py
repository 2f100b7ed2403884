"""
The options of Spotify pairing, from argv to the relay they configure:
C{--no-legacy-spotify-state}, C{--spotify-pkce}, and C{--public-url} as
where pairing URLs point.
"""

from __future__ import annotations

import os

import txaio
from twisted.internet.testing import MemoryReactorClock
from twisted.python.usage import UsageError
from twisted.trial.unittest import SynchronousTestCase

from leeloo.tap import Options, build_service

SPOTIFY = {"SPOTIFY_CLIENT_ID": "id", "SPOTIFY_CLIENT_SECRET": "secret",
           "SPOTIFY_REDIRECT_URI": "https://leeloo.example.com/spotify/callback"}


class PairingOptionTests(SynchronousTestCase):
    def setUp(self):
        self.tmp = self.mktemp()
        os.makedirs(self.tmp)

    def parse(self, *argv):
        options = Options(environ=dict(SPOTIFY))
        options.parseOptions(["--data-dir", os.path.join(self.tmp, "data"), "--store", "memory", *argv])
        return options.config

    def relay(self, *argv):
        previous = txaio.config.loop
        self.addCleanup(setattr, txaio.config, "loop", previous)
        service = build_service(self.parse(*argv), MemoryReactorClock())
        return service.relay

    def test_defaults(self):
        """
        By default the legacy state is accepted and PKCE is on, and the
        relay is built so.
        """
        config = self.parse()
        self.assertEqual((config.legacy_spotify_state, config.spotify_pkce), (True, True))
        settings = self.relay().pairing.settings
        self.assertEqual((settings.legacy_state, settings.pkce), (True, True))

    def test_no_legacy_state(self):
        """
        --no-legacy-spotify-state turns the legacy path off in the relay.
        """
        self.assertFalse(self.relay("--no-legacy-spotify-state").pairing.legacy_state)

    def test_pkce_off(self):
        """
        --spotify-pkce off turns PKCE off in the relay; on keeps it.
        """
        self.assertFalse(self.relay("--spotify-pkce", "off").pairing.settings.pkce)
        self.assertTrue(self.parse("--spotify-pkce", "on").spotify_pkce)

    def test_pkce_bad_value(self):
        """
        Anything but on or off is one line naming the option and the value.
        """
        e = self.assertRaises(UsageError, self.parse, "--spotify-pkce", "maybe")
        self.assertEqual(str(e), "--spotify-pkce maybe: must be on or off")

    def test_spotify_client(self):
        """
        The relay gets the Spotify client, and its pairing URLs are under
        the redirect URI's origin, or --public-url when given.
        """
        relay = self.relay()
        self.assertEqual(relay.spotify.config.client_id, "id")
        self.assertEqual(relay.pairing.public_url, "https://leeloo.example.com")
        relay = self.relay("--public-url", "https://leeloo.example.net")
        self.assertEqual(relay.pairing.public_url, "https://leeloo.example.net")

    def test_without_spotify(self):
        """
        Without a Spotify app the relay has no client and pairs nothing.
        """
        previous = txaio.config.loop
        self.addCleanup(setattr, txaio.config, "loop", previous)
        options = Options(environ={})
        options.parseOptions(["--data-dir", os.path.join(self.tmp, "data"), "--store", "memory"])
        relay = build_service(options.config, MemoryReactorClock()).relay
        self.assertIsNone(relay.spotify)
        self.assertFalse(relay.pairing.configured)
