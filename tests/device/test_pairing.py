"""
Spotify pairing from the device's side: L{LeelooDevice.pair_spotify} and
C{leeloo-device pair-spotify} against the real relay service on loopback
(with a Spotify app configured), and their fallback to the legacy flow
against a relay that predates pairing.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import re
from urllib.parse import parse_qs, urlsplit

from twisted.internet import defer, reactor
from twisted.trial.unittest import TestCase

from leeloo.device import PairingUnsupported, cli
from leeloo.messages import ProtocolError, SpotifyPair, UnknownType
from leeloo.spotify import SpotifyConfig

from .loopback import LoopbackRelay, start_device

SPOTIFY = SpotifyConfig("device-test-client", "device-test-secret", "https://relay.example/spotify/callback",
                        accounts_url="http://127.0.0.1:9")
TOKENS = {"access_token": "at", "refresh_token": "rt", "expires_in": 3600}
USER_CODE = re.compile(r"[A-Z2-9]{4}-[A-Z2-9]{4}")


def as_older_relay(relay) -> None:
    """
    Make C{relay} answer spotify_pair as a relay from before pairing did:
    unknown_type.
    """
    def unknown(session, message, size):
        raise UnknownType("unknown message type 'spotify_pair'")

    relay.handlers.by_type[SpotifyPair] = unknown


class PairSpotifyTests(TestCase):
    timeout = 30

    @defer.inlineCallbacks
    def setUp(self):
        self.relay = yield LoopbackRelay(self, store="memory", spotify=SPOTIFY).start()

    @defer.inlineCallbacks
    def test_url_and_code(self):
        """
        pair_spotify() fires with the relay's pairing URL (under the
        redirect URI's origin), the code to show, and its lifetime; the
        relay holds the flow for this device.
        """
        device, events = start_device(self, self.relay.url(), "Kitchen", auto_create=False)
        yield events.wait("connected", after=0)
        answer = yield device.pair_spotify()
        self.assertRegex(answer["user_code"], USER_CODE)
        self.assertEqual(answer["url"], "https://relay.example/pair/" + answer["user_code"].replace("-", ""))
        self.assertEqual(answer["expires_in"], 600)
        [record] = self.relay.relay.pairing.flows.values()
        self.assertEqual((record.device_id, record.device_name), (device.device_id, "Kitchen"))

    @defer.inlineCallbacks
    def test_asked_before_connected(self):
        """
        Asked before the device is connected, the pairing is sent once it
        is.
        """
        device, events = start_device(self, self.relay.url(), "Kitchen", auto_create=False)
        answer = yield device.pair_spotify("user-read-playback-state")
        [record] = self.relay.relay.pairing.flows.values()
        self.assertEqual(record.scopes, "user-read-playback-state")
        self.assertRegex(answer["user_code"], USER_CODE)

    @defer.inlineCallbacks
    def test_tokens_arrive_as_today(self):
        """
        After pairing, the tokens come as spotify_auth_complete and are
        saved to spotify_tokens.json.
        """
        device, events = start_device(self, self.relay.url(), "Kitchen", auto_create=False)
        yield device.pair_spotify()
        arrived = events.wait("spotify_auth_complete")
        self.assertTrue(self.relay.relay.deliver_tokens(device.device_id, TOKENS))
        yield arrived
        with open(device.state.path("spotify_tokens.json")) as f:
            self.assertEqual(json.load(f), TOKENS)

    @defer.inlineCallbacks
    def test_pairing_failed_event(self):
        """
        A second pairing cancels the first: observers see
        spotify_pair_failed cancelled naming the first code.
        """
        device, events = start_device(self, self.relay.url(), "Kitchen", auto_create=False)
        first = yield device.pair_spotify()
        failed = events.wait("spotify_pair_failed")
        second = yield device.pair_spotify()
        frame = yield failed
        self.assertEqual((frame["reason"], frame["user_code"]), ("cancelled", first["user_code"]))
        self.assertNotEqual(second["user_code"], first["user_code"])

    @defer.inlineCallbacks
    def test_older_relay(self):
        """
        Against a relay that answers spotify_pair unknown_type (one from
        before pairing), pair_spotify() fails with PairingUnsupported, and
        the device keeps working.
        """
        as_older_relay(self.relay.relay)
        device, events = start_device(self, self.relay.url(), "Kitchen")
        yield events.wait("connected", after=0)
        yield self.assertFailure(device.pair_spotify(), PairingUnsupported)
        sent = yield device.send_text("still here")
        self.assertEqual(sent["type"], "sent")


class NotConfiguredTests(TestCase):
    timeout = 30

    @defer.inlineCallbacks
    def setUp(self):
        self.relay = yield LoopbackRelay(self, store="memory").start()

    @defer.inlineCallbacks
    def test_not_configured(self):
        """
        A relay without a Spotify app fails pair_spotify() with its
        spotify_not_configured error.
        """
        device, events = start_device(self, self.relay.url(), "Kitchen", auto_create=False)
        e = yield self.assertFailure(device.pair_spotify(), ProtocolError)
        self.assertEqual(e.code, "spotify_not_configured")


class Output(io.StringIO):
    """
    Command output that calls C{on_line(line)} for every line written.
    """

    def __init__(self, on_line) -> None:
        super().__init__()
        self.on_line = on_line

    def write(self, text: str) -> int:
        for line in text.splitlines():
            self.on_line(line)
        return super().write(text)


class CommandTests(TestCase):
    timeout = 30

    @defer.inlineCallbacks
    def setUp(self):
        self.relay = yield LoopbackRelay(self, store="memory", spotify=SPOTIFY).start()
        self.state = os.path.abspath(self.mktemp())
        os.makedirs(self.state)
        with open(os.path.join(self.state, "crew_config.json"), "w") as f:
            json.dump({"device_id": "leeloo_cccccccccccc", "crew_code": "PAIR"}, f)

    def run_command(self, on_line, *argv):
        out = Output(on_line)
        return cli.run(reactor, cli.parse(["pair-spotify", self.relay.url(), "--state", self.state, *argv]), out), out

    @defer.inlineCallbacks
    def test_pairing(self):
        """
        pair-spotify prints the relay's pairing URL, its QR code and the
        code to check, waits for the tokens, saves them and exits 0.
        """
        def line(text):
            if "/pair/" in text and text.startswith("https://"):
                self.relay.relay.deliver_tokens("leeloo_cccccccccccc", TOKENS)

        d, out = self.run_command(line)
        self.assertEqual((yield d), 0)
        text = out.getvalue()
        [url] = [t for t in text.splitlines() if t.startswith("https://relay.example/pair/")]
        code = url.rsplit("/", 1)[1]
        self.assertIn(f"{code[:4]}-{code[4:]}", text)
        self.assertIn("\N{FULL BLOCK}", text)
        with open(os.path.join(self.state, "spotify_tokens.json")) as f:
            self.assertEqual(json.load(f), TOKENS)

    @defer.inlineCallbacks
    def test_pairing_ends_without_tokens(self):
        """
        A pairing that ends without tokens (it expired) ends the command
        with status 1, saying why.
        """
        pairing = self.relay.relay.pairing

        def line(text):
            if "/pair/" in text and text.startswith("https://"):
                [(code, record)] = pairing.flows.items()
                pairing.flows[code] = dataclasses.replace(record, expires_at=0)
                pairing.expire()

        d, out = self.run_command(line)
        self.assertEqual((yield d), 1)
        self.assertIn("the code expired", out.getvalue())

    @defer.inlineCallbacks
    def test_fallback_to_legacy(self):
        """
        Against a relay from before pairing, pair-spotify falls back to the
        legacy authorize URL (state = the device id), and still takes the
        tokens.
        """
        as_older_relay(self.relay.relay)

        def line(text):
            if text.startswith("https://accounts.spotify.com/"):
                self.relay.relay.deliver_tokens("leeloo_cccccccccccc", TOKENS)

        d, out = self.run_command(line, "--client-id", "cid", "--redirect-uri",
                                  "https://relay.example/spotify/callback")
        self.assertEqual((yield d), 0)
        [url] = [t for t in out.getvalue().splitlines() if t.startswith("https://accounts.spotify.com/")]
        query = parse_qs(urlsplit(url).query)
        self.assertEqual((query["state"], query["client_id"]), (["leeloo_cccccccccccc"], ["cid"]))
        self.assertIn("predates pairing", out.getvalue())

    @defer.inlineCallbacks
    def test_fallback_needs_the_app(self):
        """
        Against a relay from before pairing, without --client-id and
        --redirect-uri, pair-spotify says what it needs and exits 1.
        """
        as_older_relay(self.relay.relay)
        d, out = self.run_command(lambda line: None)
        self.assertEqual((yield d), 1)
        self.assertIn("--client-id and --redirect-uri", out.getvalue())
