"""
Spotify through the relay from the device's side: L{LeelooDevice.refresh_spotify}
and L{LeelooDevice.search} against the real relay service on loopback, whose
Spotify is L{FakeSpotifyAccounts} served over real HTTP on loopback too.
"""

from __future__ import annotations

import json
import os

from twisted.internet import defer, reactor
from twisted.trial.unittest import TestCase
from twisted.web.server import Site

from leeloo.device import SpotifyUnsupported
from leeloo.messages import ProtocolError, SpotifySearch, UnknownType
from leeloo.spotify import SpotifyConfig
from leeloo.testing import FakeSpotifyAccounts, currently_playing, spotify_track

from .loopback import LoopbackRelay, start_device

CLIENT_ID = "device-test-client"
CLIENT_SECRET = "device-test-secret"
REDIRECT_URI = "https://relay.example/spotify/callback"
TOKENS = {"access_token": "at-new", "refresh_token": "rt-new", "expires_in": 3600}
HURT = spotify_track("spotify:track:hurt", "Hurt", ["Johnny Cash"], "American IV", "https://i.test/a4")


class SpotifyTests(TestCase):
    timeout = 30

    @defer.inlineCallbacks
    def setUp(self):
        self.spotify = FakeSpotifyAccounts(CLIENT_ID, CLIENT_SECRET, REDIRECT_URI)
        self.spotify.refreshable["rt-old"] = dict(TOKENS)
        self.spotify.catalog["track:hurt artist:johnny cash"] = [HURT]
        site = Site(self.spotify)
        site.noisy = False
        port = reactor.listenTCP(0, site, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        base = f"http://127.0.0.1:{port.getHost().port}"
        config = SpotifyConfig(CLIENT_ID, CLIENT_SECRET, REDIRECT_URI, accounts_url=base, api_url=base)
        self.relay = yield LoopbackRelay(self, store="memory", spotify=config).start()

    @defer.inlineCallbacks
    def test_refresh(self):
        """
        refresh_spotify() fires with the new tokens and saves them to
        spotify_tokens.json; by default it sends the saved refresh token.
        """
        device, events = start_device(self, self.relay.url(), "Kitchen", auto_create=False)
        device.state.save_tokens({"access_token": "at-old", "refresh_token": "rt-old", "expires_in": 3600})
        tokens = yield device.refresh_spotify()
        self.assertEqual(tokens, TOKENS)
        with open(device.state.path("spotify_tokens.json")) as f:
            self.assertEqual(json.load(f), TOKENS)
        self.assertEqual(self.spotify.requests[-1], {"grant_type": "refresh_token", "refresh_token": "rt-old"})

    @defer.inlineCallbacks
    def test_refresh_refused(self):
        """
        A refresh token Spotify refuses fails with the relay's
        spotify_refused, invalid_grant.
        """
        device, events = start_device(self, self.relay.url(), "Kitchen", auto_create=False)
        e = yield self.assertFailure(device.refresh_spotify("rt-revoked"), ProtocolError)
        self.assertEqual((e.code, e.extra["spotify_error"]), ("spotify_refused", "invalid_grant"))

    @defer.inlineCallbacks
    def test_search(self):
        """
        search() fires with the results; two searches asked at once each
        get their own answer.
        """
        device, events = start_device(self, self.relay.url(), "Kitchen", auto_create=False)
        first = device.search("play hurt by johnny cash", limit=2)
        second = device.search("nothing like this")
        results = yield first
        self.assertEqual(results, [{"spotify_uri": "spotify:track:hurt", "track": "Hurt",
                                    "artist": "Johnny Cash", "album": "American IV",
                                    "album_art_url": "https://i.test/a4"}])
        self.assertEqual((yield second), [])
        self.assertEqual([s["q"] for s in self.spotify.searches], ["track:hurt artist:johnny cash",
                                                                    "nothing like this"])

    @defer.inlineCallbacks
    def test_unavailable(self):
        """
        Spotify failing: search() fails with spotify_unavailable, retry
        true; the device keeps working.
        """
        self.spotify.fail_with = 503
        device, events = start_device(self, self.relay.url(), "Kitchen")
        e = yield self.assertFailure(device.search("x"), ProtocolError)
        self.assertEqual((e.code, e.extra["retry"]), ("spotify_unavailable", True))
        sent = yield device.send_text("still here")
        self.assertEqual(sent["type"], "sent")

    @defer.inlineCallbacks
    def test_older_relay(self):
        """
        Against a relay that does not know spotify_search, search() fails
        with SpotifyUnsupported.
        """
        def unknown(session, message, size):
            raise UnknownType("unknown message type 'spotify_search'")

        self.relay.relay.handlers.by_type[SpotifySearch] = unknown
        device, events = start_device(self, self.relay.url(), "Kitchen", auto_create=False)
        yield self.assertFailure(device.search("x"), SpotifyUnsupported)

    def test_refresh_without_tokens(self):
        """
        refresh_spotify() with no token given and none saved fails at once
        with a DeviceError saying to pair first.
        """
        from leeloo.device import DeviceError
        device, events = start_device(self, self.relay.url(), "Kitchen", auto_create=False)
        d = self.assertFailure(device.refresh_spotify(), DeviceError)
        d.addCallback(lambda e: self.assertIn("pair", e.message))
        return d

    def test_bad_limit(self):
        """
        A limit the relay would refuse fails at once, nothing sent.
        """
        device, events = start_device(self, self.relay.url(), "Kitchen", auto_create=False)
        return self.assertFailure(device.search("x", limit=50), ProtocolError)


class KeptAccessTests(TestCase):
    """
    The device's side of the access the relay keeps (issue 20):
    share_now_playing(), forget_spotify(), a tokenless refresh_spotify(),
    and pair_spotify()'s keep_access.
    """

    timeout = 30

    @defer.inlineCallbacks
    def setUp(self):
        self.spotify = FakeSpotifyAccounts(CLIENT_ID, CLIENT_SECRET, REDIRECT_URI)
        self.spotify.refreshable["rt-kept"] = dict(TOKENS)
        self.spotify.user_tokens.add("at-kept")
        self.spotify.playing = currently_playing(HURT)
        site = Site(self.spotify)
        site.noisy = False
        port = reactor.listenTCP(0, site, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        base = f"http://127.0.0.1:{port.getHost().port}"
        config = SpotifyConfig(CLIENT_ID, CLIENT_SECRET, REDIRECT_URI, accounts_url=base, api_url=base)
        self.relay = yield LoopbackRelay(self, store="memory", spotify=config).start()

    @defer.inlineCallbacks
    def kept(self):
        device, events = start_device(self, self.relay.url(), "Kitchen")
        yield events.wait("connected", after=0)
        yield self.relay.relay.grants.keep(device.device_id, {"access_token": "at-kept", "refresh_token": "rt-kept",
                                                              "expires_in": 3600})
        return device, events

    @defer.inlineCallbacks
    def test_share_now_playing(self):
        """
        share_now_playing() fires with the relay's sent; the crew's other
        device receives the song_push with the note.
        """
        device, events = yield self.kept()
        [(_, created)] = [(e, f) for e, f in events.seen if e == "connected"][:1]
        state = self.mktemp()
        os.makedirs(state)
        with open(os.path.join(state, "crew_config.json"), "w") as f:
            json.dump({"crew_code": created["crew_code"]}, f)
        friend, friend_events = start_device(self, self.relay.url(), "Den", state)
        yield friend_events.wait("connected", after=0)
        pushed = friend_events.wait("message")
        sent = yield device.share_now_playing(note="listen")
        self.assertEqual(sent["type"], "sent")
        message = yield pushed
        self.assertEqual((message["msg_type"], message["payload"]["track"], message["payload"]["note"]),
                         ("song_push", "Hurt", "listen"))

    @defer.inlineCallbacks
    def test_nothing_playing(self):
        """
        With nothing playing, share_now_playing() fails with nothing_playing.
        """
        device, _ = yield self.kept()
        self.spotify.playing = None
        e = yield self.assertFailure(device.share_now_playing(), ProtocolError)
        self.assertEqual(e.code, "nothing_playing")

    @defer.inlineCallbacks
    def test_tokenless_refresh(self):
        """
        With saved tokens that hold no refresh token (a consent pairing),
        refresh_spotify() asks the relay to refresh the one it keeps.
        """
        device, _ = yield self.kept()
        device.state.save_tokens({"access_token": "at-kept", "expires_in": 3600})
        tokens = yield device.refresh_spotify()
        self.assertEqual(sorted(tokens), ["access_token", "expires_in"])
        self.assertEqual(tokens["access_token"], "at-new")
        self.assertAlmostEqual(tokens["expires_in"], 3600, delta=5)
        self.assertEqual(self.spotify.requests[-1], {"grant_type": "refresh_token", "refresh_token": "rt-kept"})

    @defer.inlineCallbacks
    def test_forget(self):
        """
        forget_spotify() fires with spotify_forgotten; sharing is then
        not_paired.
        """
        device, _ = yield self.kept()
        answer = yield device.forget_spotify()
        self.assertEqual(answer, {"type": "spotify_forgotten"})
        e = yield self.assertFailure(device.share_now_playing(), ProtocolError)
        self.assertEqual(e.code, "not_paired")

    @defer.inlineCallbacks
    def test_pair_keep_access(self):
        """
        pair_spotify(keep_access=True) asks for a pairing whose page offers
        the consent box.
        """
        device, _ = yield self.kept()
        answer = yield device.pair_spotify(keep_access=True)
        code = answer["user_code"].replace("-", "")
        self.assertTrue(self.relay.relay.pairing.lookup(code).keep_offered)
