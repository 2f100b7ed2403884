"""
Issue 20: "share what I'm listening to", and Spotify tokens encrypted at
rest.  A relay on a L{Clock} with its site behind a L{StubTreq}, devices
played by L{Device}s, Spotify (accounts, player) by L{FakeSpotifyAccounts}:
the whole consent pairing through the phone's page, now-playing in each
case, forget, a device in two crews; and on SQLite, a database of the
previous release migrated to sealed tokens that are still delivered.
"""

from __future__ import annotations

import json
import os
import sqlite3
from typing import Any
from urllib.parse import parse_qs, urlsplit

from cryptography.fernet import Fernet
from treq.testing import StubTreq
from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.task import Clock
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase, TestCase

from leeloo.relay import Relay
from leeloo.sealing import Sealer
from leeloo.spotify import SpotifyConfig, SpotifyOAuth
from leeloo.sqlitestore import DATABASE_NAME, SQLiteStore, migrate
from leeloo.store import MemoryStore
from leeloo.testing import Device, FakeSpotifyAccounts, currently_playing, spotify_track
from leeloo.web import make_root
from leeloo.websocket import RelayServerFactory

BASE = "http://relay.test"
START = 1_700_000_000.0
CLIENT_ID = "test-client-id"
CLIENT_SECRET = "test-client-secret-np"
REDIRECT_URI = "https://relay.test/spotify/callback"
ACCOUNTS_URL = "http://accounts.test"
API_URL = "http://api.test"
SHARER = "leeloo_00000000000a"
FRIEND = "leeloo_00000000000b"
OTHER = "leeloo_00000000000c"
TOKENS = {"access_token": "np-access-first", "refresh_token": "np-refresh-first", "expires_in": 3600}
REFRESHED = {"access_token": "np-access-second", "refresh_token": "np-refresh-second", "expires_in": 3600}
KEY = Fernet.generate_key()
BRIGHTSIDE = spotify_track("spotify:track:brightside", "Mr. Brightside", ["The Killers"], "Hot Fuss",
                           "https://i.scdn.co/image/hotfuss")
SONG = {"track": "Mr. Brightside", "artist": "The Killers", "album": "Hot Fuss",
        "spotify_uri": "spotify:track:brightside", "album_art_url": "https://i.scdn.co/image/hotfuss"}


class NowPlayingMixin:
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(START)
        self.spotify = FakeSpotifyAccounts(CLIENT_ID, CLIENT_SECRET, REDIRECT_URI)
        self.spotify.tokens = dict(TOKENS)
        self.spotify.refreshable[TOKENS["refresh_token"]] = dict(REFRESHED)
        self.spotify.playing = currently_playing(BRIGHTSIDE)
        self.spotify_http = StubTreq(self.spotify)
        self.store = MemoryStore()
        self.sealer = Sealer(KEY)
        config = SpotifyConfig(CLIENT_ID, CLIENT_SECRET, REDIRECT_URI, accounts_url=ACCOUNTS_URL, api_url=API_URL)
        self.relay = Relay(self.clock, self.store, spotify=SpotifyOAuth(config, self.spotify_http, self.clock),
                           sealer=self.sealer)
        self.http = StubTreq(make_root(self.relay, RelayServerFactory(self.relay), None, None))

    # ------------------------------------------------------------ helpers

    def call(self, method: str, path: str, **kwargs: Any) -> tuple[Any, bytes]:
        kwargs.setdefault("allow_redirects", False)
        d = self.http.request(method, BASE + path, **kwargs)
        self.http.flush()
        self.spotify_http.flush()
        self.http.flush()
        response = self.successResultOf(d)
        body = response.content()
        self.http.flush()
        return response, self.successResultOf(body)

    def device(self, device_id: str = SHARER, crew_code: str | None = "ALPHA") -> Device:
        device = Device(self.relay)
        device.send(type="register", device_id=device_id, crew_code=crew_code, device_name=device_id[-1].upper())
        device.take()
        return device

    def flush(self) -> None:
        for _ in range(3):
            self.spotify_http.flush()

    def pair(self, device: Device, offer: bool = True, tick: bool = True) -> dict:
        """
        The whole pairing: the device asks (offering the relay keeping the
        access), the phone opens the page, presses the button with the box
        ticked or not, Spotify says yes, and its redirect comes back.
        Return what the device received.
        """
        fields = {"keep_access": True} if offer else {}
        device.send(type="spotify_pair", **fields)
        [started] = device.take()
        path = urlsplit(started["url"]).path
        response, page = self.call("GET", path)
        self.assertEqual(response.code, 200)
        self.page = page.decode()
        response, _ = self.call("POST", path, data={"keep": "yes"} if tick else {})
        self.assertEqual(response.code, 303)
        cookie = response.headers.getRawHeaders(b"set-cookie")[0].decode().split(";")[0]
        [location] = response.headers.getRawHeaders(b"location")
        d = self.spotify_http.get(location.decode(), allow_redirects=False)
        self.spotify_http.flush()
        [back] = self.successResultOf(d).headers.getRawHeaders(b"location")
        query = {k: v[0] for k, v in parse_qs(urlsplit(back.decode()).query).items()}
        response, _ = self.call("GET", "/spotify/callback", params=query, headers={b"cookie": [cookie.encode()]})
        self.assertEqual(response.code, 200)
        return device.take()

    def paired(self, device_id: str = SHARER, crew_code: str | None = "ALPHA") -> Device:
        device = self.device(device_id, crew_code)
        self.pair(device)
        return device

    def share(self, device: Device, **fields: Any) -> list[dict]:
        device.send(type="share_now_playing", **fields)
        self.flush()
        return device.take()

    def grant(self, device_id: str = SHARER) -> dict | None:
        record = self.store.find_grant(device_id)
        return None if record is None else self.sealer.open(record.sealed)


class ConsentPairingTests(NowPlayingMixin, SynchronousTestCase):
    def test_box_unchecked(self) -> None:
        """
        The page of a pairing whose device offered it holds the consent box,
        unchecked, with its words.
        """
        self.pair(self.device(), tick=False)
        self.assertIn('<input type="checkbox" name="keep" value="yes" id="keep">', self.page)
        self.assertIn("let the relay keep access so this LEELOO can share what you&#x27;re playing", self.page)
        self.assertNotIn("checked", self.page)

    def test_no_box_without_offer(self) -> None:
        """
        A device that did not offer it (every deployed one) gets a page
        without the box.
        """
        self.pair(self.device(), offer=False)
        self.assertNotIn('type="checkbox"', self.page)

    def test_consent_pairing(self) -> None:
        """
        With the box ticked, the device gets the access token and
        C{expires_in} without the refresh token, and the relay keeps the
        refresh token, sealed: the store's record holds none of the tokens
        in the clear.
        """
        received = self.pair(self.device())
        self.assertEqual(received, [{"type": "spotify_auth_complete",
                                     "tokens": {"access_token": "np-access-first", "expires_in": 3600}}])
        record = self.store.find_grant(SHARER)
        self.assertNotIn("np-refresh-first", record.sealed)
        self.assertNotIn("np-access-first", record.sealed)
        self.assertEqual(self.grant(), {"access_token": "np-access-first", "refresh_token": "np-refresh-first",
                                        "expires_at": START + 3600})

    def test_consent_then_refresh_without_token(self) -> None:
        """
        A consenting device refreshes with C{spotify_refresh} and no token:
        answered C{spotify_tokens} without a refresh token, and the relay
        keeps Spotify's new one.
        """
        device = self.paired()
        device.send(type="spotify_refresh")
        self.flush()
        self.assertEqual(device.take(), [{"type": "spotify_tokens",
                                          "tokens": {"access_token": "np-access-second", "expires_in": 3600}}])
        self.assertEqual(self.spotify.requests[-1],
                         {"grant_type": "refresh_token", "refresh_token": "np-refresh-first"})
        self.assertEqual(self.grant()["refresh_token"], "np-refresh-second")

    def test_without_consent_unchanged(self) -> None:
        """
        With the box left unticked, the device gets all its tokens as
        before, and the relay keeps nothing (so it cannot share).
        """
        device = self.device()
        received = self.pair(device, tick=False)
        self.assertEqual(received, [{"type": "spotify_auth_complete", "tokens": TOKENS}])
        self.assertIsNone(self.store.find_grant(SHARER))
        self.assertEqual(self.share(device)[0]["error"], "not_paired")

    def test_pairing_again_without_consent_forgets(self) -> None:
        """
        Pairing again with the box unticked leaves one holder: the device;
        the relay forgets what it kept.
        """
        device = self.paired()
        self.spotify.tokens = dict(REFRESHED)
        self.pair(device, tick=False)
        self.assertIsNone(self.store.find_grant(SHARER))

    def test_offline_device_gets_access_token_later(self) -> None:
        """
        The access token of a consent pairing finished while the device was
        away waits for it, sealed in the store, without the refresh token.
        """
        device = self.device()
        device.send(type="spotify_pair", keep_access=True)
        [started] = device.take()
        path = urlsplit(started["url"]).path
        response, _ = self.call("POST", path, data={"keep": "yes"})
        cookie = response.headers.getRawHeaders(b"set-cookie")[0].decode().split(";")[0]
        [location] = response.headers.getRawHeaders(b"location")
        device.close()
        d = self.spotify_http.get(location.decode(), allow_redirects=False)
        self.spotify_http.flush()
        [back] = self.successResultOf(d).headers.getRawHeaders(b"location")
        query = {k: v[0] for k, v in parse_qs(urlsplit(back.decode()).query).items()}
        self.call("GET", "/spotify/callback", params=query, headers={b"cookie": [cookie.encode()]})
        [parked] = self.store.tokens.values()
        self.assertEqual(list(parked.tokens), ["sealed"])
        self.assertNotIn("np-access-first", parked.tokens["sealed"])
        back_again = Device(self.relay)
        back_again.send(type="register", device_id=SHARER)
        self.assertIn({"type": "spotify_auth_complete",
                       "tokens": {"access_token": "np-access-first", "expires_in": 3600}}, back_again.take())


class ShareNowPlayingTests(NowPlayingMixin, SynchronousTestCase):
    def test_playing(self) -> None:
        """
        C{share_now_playing} sends the crew an ordinary C{message} of
        C{msg_type} C{song_push} with the playing track and the note, asked
        of Spotify with the kept access token; the sender gets C{sent} with
        its C{client_msg_id}.
        """
        sharer, friend = self.paired(), self.device(FRIEND)
        answer = self.share(sharer, note="this one!", client_msg_id="c1")
        self.assertEqual(answer, [{"type": "sent", "client_msg_id": "c1", "id": answer[0]["id"], "seq": 1,
                                   "crew_code": "ALPHA"}])
        [pushed] = friend.take()
        self.assertEqual((pushed["type"], pushed["from_device"], pushed["msg_type"], pushed["payload"]),
                         ("message", SHARER, "song_push", {**SONG, "note": "this one!"}))
        self.assertEqual(self.spotify.player_requests, ["Bearer np-access-first"])

    def test_sent_without_client_msg_id(self) -> None:
        """
        Without a C{client_msg_id} the sender is answered C{sent} all the
        same (without one), and the note is null.
        """
        sharer, friend = self.paired(), self.device(FRIEND)
        [answer] = self.share(sharer)
        self.assertEqual((answer["type"], "client_msg_id" in answer, answer["seq"]), ("sent", False, 1))
        self.assertIsNone(friend.take()[0]["payload"]["note"])

    def test_nothing_playing(self) -> None:
        """
        Spotify's 204 is C{nothing_playing}, and the crew hears nothing.
        """
        sharer, friend = self.paired(), self.device(FRIEND)
        self.spotify.playing = None
        [answer] = self.share(sharer)
        self.assertEqual(answer["error"], "nothing_playing")
        self.assertEqual(friend.take(), [])

    def test_ad_playing(self) -> None:
        """
        An ad (C{item} null) is C{nothing_playing}.
        """
        sharer = self.paired()
        self.spotify.playing = currently_playing(None, "ad")
        self.assertEqual(self.share(sharer)[0]["error"], "nothing_playing")

    def test_not_paired(self) -> None:
        """
        A device never paired is C{not_paired}, and Spotify is not asked.
        """
        [answer] = self.share(self.device())
        self.assertEqual(answer["error"], "not_paired")
        self.assertEqual(self.spotify.player_requests, [])

    def test_expired_access_token(self) -> None:
        """
        An access token past its time is refreshed on the way: the player
        is asked with the new one, which the relay keeps.
        """
        sharer, friend = self.paired(), self.device(FRIEND)
        self.clock.advance(3600)
        self.assertEqual(self.share(sharer)[0]["type"], "sent")
        self.assertEqual(self.spotify.requests[-1]["grant_type"], "refresh_token")
        self.assertEqual(self.spotify.player_requests, ["Bearer np-access-second"])
        self.assertEqual(self.grant()["access_token"], "np-access-second")
        self.assertEqual(friend.take()[0]["payload"]["track"], "Mr. Brightside")

    def test_refused_access_token_refreshed(self) -> None:
        """
        An access token Spotify's player refuses (401) before its time is
        refreshed once and the request made again.
        """
        sharer = self.paired()
        self.spotify.user_tokens.discard("np-access-first")
        self.assertEqual(self.share(sharer)[0]["type"], "sent")
        self.assertEqual(self.spotify.player_requests, ["Bearer np-access-first", "Bearer np-access-second"])

    def test_rotated_refresh_token(self) -> None:
        """
        With Spotify rotating refresh tokens, each refresh spends the one
        kept and keeps the new one: three refreshes in a row all succeed.
        """
        sharer = self.paired()
        self.spotify.rotate = True
        for n in (1, 2, 3):
            self.clock.advance(3600)
            self.assertEqual(self.share(sharer)[0]["type"], "sent")
            self.assertEqual(self.grant()["refresh_token"], f"fake-refresh-rotated-{n}")
        self.assertEqual([r["refresh_token"] for r in self.spotify.requests if r.get("grant_type") == "refresh_token"],
                         ["np-refresh-first", "fake-refresh-rotated-1", "fake-refresh-rotated-2"])

    def test_rotation_serialized(self) -> None:
        """
        Two requests of one device at once spend the kept refresh token
        once: the second waits for the first and uses the rotated one.
        """
        sharer = self.paired()
        self.spotify.rotate = True
        self.clock.advance(3600)
        sharer.send(type="share_now_playing")
        sharer.send(type="spotify_refresh")
        self.flush()
        self.flush()
        answers = sharer.take()
        self.assertEqual([a["type"] for a in answers], ["sent", "spotify_tokens"])
        self.assertEqual([r["refresh_token"] for r in self.spotify.requests if r.get("grant_type") == "refresh_token"],
                         ["np-refresh-first", "fake-refresh-rotated-1"])

    def test_invalid_grant(self) -> None:
        """
        A kept refresh token Spotify refuses is C{spotify_refused} with
        C{invalid_grant} (pair again), and the relay forgets it.
        """
        sharer = self.paired()
        del self.spotify.refreshable["np-refresh-first"]
        self.clock.advance(3600)
        [answer] = self.share(sharer)
        self.assertEqual((answer["error"], answer["spotify_error"]), ("spotify_refused", "invalid_grant"))
        self.assertIsNone(self.store.find_grant(SHARER))

    def test_unavailable(self) -> None:
        """
        Spotify failing is C{spotify_unavailable}, with C{retry}.
        """
        sharer = self.paired()
        self.spotify.fail_with = 503
        [answer] = self.share(sharer)
        self.assertEqual((answer["error"], answer["retry"]), ("spotify_unavailable", True))

    def test_rate_limited(self) -> None:
        """
        A device asking too often is C{rate_limited}, past a burst of
        three at least.
        """
        sharer = self.paired()
        answers = [self.share(sharer)[0] for _ in range(8)]
        self.assertEqual([a["type"] for a in answers[:3]], ["sent"] * 3)
        self.assertEqual(answers[-1]["error"], "rate_limited")

    def test_not_in_crew(self) -> None:
        """
        A crew the device is not in is C{not_in_crew}, before Spotify is
        asked.
        """
        sharer = self.paired()
        [answer] = self.share(sharer, crew_code="NOWHERE")
        self.assertEqual(answer["error"], "not_in_crew")
        self.assertEqual(self.spotify.player_requests, [])

    def test_two_crews(self) -> None:
        """
        A device in two crews shares to each: the one it names, or its
        primary without a name; only that crew hears it, tagged.
        """
        sharer = self.paired()
        alpha = self.device(FRIEND, "ALPHA")
        beta = self.device(OTHER, "BETA")
        sharer.send(type="crew_add", crew_code="BETA")
        sharer.take()
        alpha.take()
        beta.take()
        self.assertEqual(self.share(sharer, crew_code="BETA")[0]["crew_code"], "BETA")
        self.assertEqual([(m["msg_type"], m["crew_code"]) for m in beta.take()], [("song_push", "BETA")])
        self.assertEqual(alpha.take(), [])
        self.assertEqual(self.share(sharer)[0]["crew_code"], "ALPHA")
        self.assertEqual([(m["msg_type"], m["crew_code"]) for m in alpha.take()], [("song_push", "ALPHA")])
        self.assertEqual(beta.take(), [])


class ForgetTests(NowPlayingMixin, SynchronousTestCase):
    def test_forget(self) -> None:
        """
        C{spotify_forget} deletes what the relay keeps for the device:
        answered C{spotify_forgotten}, and sharing is then C{not_paired}.
        """
        sharer = self.paired()
        sharer.send(type="spotify_forget")
        self.assertEqual(sharer.take(), [{"type": "spotify_forgotten"}])
        self.assertIsNone(self.store.find_grant(SHARER))
        self.assertEqual(self.share(sharer)[0]["error"], "not_paired")

    def test_forget_nothing(self) -> None:
        """
        Forgetting when nothing is kept is answered C{spotify_forgotten}
        too.
        """
        device = self.device()
        device.send(type="spotify_forget")
        self.assertEqual(device.take(), [{"type": "spotify_forgotten"}])

    def test_forget_before_registering(self) -> None:
        """
        C{spotify_forget} before a device is bound is C{not_registered}.
        """
        device = Device(self.relay)
        device.send(type="spotify_forget")
        self.assertEqual(device.take()[0]["error"], "not_registered")


class SecretsInLogsTests(NowPlayingMixin, SynchronousTestCase):
    def test_no_token_in_logs(self) -> None:
        """
        No log line of a consent pairing, refreshes with rotation, shares,
        a parked token and a forget holds a token, the code, the client
        secret or the secrets key.
        """
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        sharer = self.paired()
        self.device(FRIEND)
        self.spotify.rotate = True
        self.clock.advance(3600)
        self.share(sharer, note="hi")
        sharer.send(type="spotify_refresh")
        self.flush()
        sharer.take()
        away = self.device(OTHER)
        away.close()
        self.relay.deliver_tokens(OTHER, {"access_token": "np-parked-access", "refresh_token": "np-parked-refresh",
                                          "expires_in": 3600}, True)
        sharer.send(type="spotify_forget")
        secrets = ["np-access-first", "np-refresh-first", "fake-refresh-rotated-1", "fake-access-refreshed-1",
                   "np-parked-access", "np-parked-refresh", "fake-code-1", CLIENT_SECRET, KEY.decode()]
        self.assertGreater(len(events), 5)
        for event in events:
            text = formatEvent(event) + repr(event)
            for secret in secrets:
                self.assertNotIn(secret, text)


def previous_release(directory: str, tokens: str, expires_at: float) -> None:
    """
    A database as the previous release (schema 8) left it, holding a
    pending token in the clear.
    """
    db = sqlite3.connect(os.path.join(directory, DATABASE_NAME), isolation_level=None)
    migrate(db, 8)
    db.execute("INSERT INTO pending_tokens VALUES (?, ?, ?)", ("leeloo_00000000000d", tokens, expires_at))
    db.close()


class MigrationTests(TestCase):
    timeout = 10

    @inlineCallbacks
    def test_previous_release_migrated_and_delivered(self) -> None:
        """
        A database of the previous release is migrated (schema 9): its
        pending token is sealed, the database files no longer hold it in
        the clear, and the device it waits for still gets it.
        """
        directory = self.mktemp()
        os.mkdir(directory)
        previous_release(directory, '{"access_token":"old-release-access","refresh_token":"old-release-refresh",'
                                    '"expires_in":3600}', START + 600)
        sealer = Sealer(KEY)
        store = SQLiteStore(directory, reactor, sealer=sealer)
        self.addCleanup(store.close)
        db = sqlite3.connect(os.path.join(directory, DATABASE_NAME))
        [(stored,)] = db.execute("SELECT tokens FROM pending_tokens").fetchall()
        db.close()
        self.assertEqual(list(json.loads(stored)), ["sealed"])
        names = os.listdir(directory)
        self.assertIn(DATABASE_NAME, names)
        for name in names:
            with open(os.path.join(directory, name), "rb") as f:
                self.assertNotIn(b"old-release-refresh", f.read(), name)
        clock = Clock()
        clock.advance(START)
        relay = Relay(clock, store, sealer=sealer)
        device = Device(relay)
        device.send(type="register", device_id="leeloo_00000000000d")
        self.assertIn({"type": "spotify_auth_complete",
                       "tokens": {"access_token": "old-release-access", "refresh_token": "old-release-refresh",
                                  "expires_in": 3600}}, device.take())
        yield relay.journal.drain()

    def test_previous_release_without_key(self) -> None:
        """
        Pending tokens of the previous release cannot be migrated without a
        key: the store says so and does not open.
        """
        directory = self.mktemp()
        os.mkdir(directory)
        previous_release(directory, '{"access_token":"a"}', START)
        from leeloo.sqlitestore import SchemaError
        error = self.assertRaises(SchemaError, SQLiteStore, directory, reactor)
        self.assertIn("must be encrypted", str(error))
