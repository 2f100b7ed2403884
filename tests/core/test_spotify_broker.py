"""
Tests for L{leeloo.core.spotify_broker}: C{spotify_refresh} and
C{spotify_search} through a L{Relay} on a L{Clock}, devices played by
L{Device}s and Spotify (accounts and Web API) by L{FakeSpotifyAccounts}
behind a L{treq.testing.StubTreq}; and L{search_query}, row by row.
"""

from __future__ import annotations

from treq.testing import StubTreq
from twisted.internet.task import Clock
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from leeloo.core.spotify_broker import search_query
from leeloo.relay import Relay
from leeloo.spotify import SpotifyConfig, SpotifyOAuth
from leeloo.store import MemoryStore
from leeloo.testing import Device, FakeSpotifyAccounts, spotify_track

START = 1_700_000_000.0
CLIENT_ID = "test-client-id"
CLIENT_SECRET = "test-client-secret-xyz"
REDIRECT_URI = "https://relay.test/spotify/callback"
ACCOUNTS_URL = "http://accounts.test"
API_URL = "http://api.test"
DEVICE = "leeloo_00000000000a"
OTHER = "leeloo_00000000000b"
REFRESH = "test-refresh-old"
NEW_TOKENS = {"access_token": "test-access-new", "refresh_token": "test-refresh-new", "expires_in": 3600}
BRIGHTSIDE = spotify_track("spotify:track:brightside", "Mr. Brightside", ["The Killers"], "Hot Fuss",
                           "https://i.scdn.co/image/hotfuss")
TIMEOUT = 5.0


class BrokerMixin:
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(START)
        self.spotify = FakeSpotifyAccounts(CLIENT_ID, CLIENT_SECRET, REDIRECT_URI)
        self.spotify.refreshable[REFRESH] = dict(NEW_TOKENS)
        self.http = StubTreq(self.spotify)
        config = SpotifyConfig(CLIENT_ID, CLIENT_SECRET, REDIRECT_URI, accounts_url=ACCOUNTS_URL, api_url=API_URL)
        self.oauth = SpotifyOAuth(config, self.http, self.clock, timeout=TIMEOUT)
        self.relay = Relay(self.clock, MemoryStore(), spotify=self.oauth)

    def device(self, device_id: str = DEVICE) -> Device:
        device = Device(self.relay)
        device.send(type="register", device_id=device_id)
        device.take()
        return device

    def ask(self, device: Device, **fields) -> dict:
        device.send(**fields)
        self.http.flush()
        [answer] = device.take()
        return answer

    def refresh(self, device: Device, token: str = REFRESH) -> dict:
        return self.ask(device, type="spotify_refresh", refresh_token=token)

    def search(self, device: Device, query: str, **fields) -> dict:
        return self.ask(device, type="spotify_search", query=query, **fields)


class RefreshTests(BrokerMixin, SynchronousTestCase):
    def test_new_refresh_token(self) -> None:
        """
        C{spotify_refresh} is answered C{spotify_tokens} with Spotify's new
        tokens, refreshed with the app's secret (Basic auth).
        """
        answer = self.refresh(self.device())
        self.assertEqual(answer, {"type": "spotify_tokens", "tokens": NEW_TOKENS})
        [request] = self.spotify.requests
        self.assertEqual(request, {"grant_type": "refresh_token", "refresh_token": REFRESH})
        self.assertTrue(self.spotify.received[0]["authorization"].startswith("Basic "))

    def test_no_new_refresh_token(self) -> None:
        """
        When Spotify sends no new refresh token, the answer carries the one
        the device sent.
        """
        self.spotify.refreshable[REFRESH] = {"access_token": "test-access-2", "expires_in": 1800}
        answer = self.refresh(self.device())
        self.assertEqual(answer["tokens"], {"access_token": "test-access-2", "expires_in": 1800,
                                            "refresh_token": REFRESH})

    def test_invalid_grant(self) -> None:
        """
        A refresh token Spotify refuses is C{spotify_refused} with
        C{spotify_error} C{invalid_grant}, whose message says to pair again.
        """
        answer = self.refresh(self.device(), "test-refresh-revoked")
        self.assertEqual((answer["type"], answer["error"], answer["spotify_error"]),
                         ("error", "spotify_refused", "invalid_grant"))
        self.assertIn("pair again", answer["message"])
        self.assertNotIn("test-refresh-revoked", answer["message"])

    def test_server_error(self) -> None:
        """
        Spotify failing (5xx) is C{spotify_unavailable} with C{retry: true}.
        """
        self.spotify.fail_with = 502
        answer = self.refresh(self.device())
        self.assertEqual((answer["error"], answer["retry"]), ("spotify_unavailable", True))

    def test_slow(self) -> None:
        """
        Spotify slower than the timeout is C{spotify_unavailable} with
        C{retry: true}, once the timeout has passed (not before).
        """
        self.spotify.slow = True
        device = self.device()
        device.send(type="spotify_refresh", refresh_token=REFRESH)
        self.http.flush()
        self.clock.advance(TIMEOUT - 0.1)
        self.assertEqual(device.take(), [])
        self.clock.advance(0.2)
        [answer] = device.take()
        self.assertEqual((answer["error"], answer["retry"]), ("spotify_unavailable", True))

    def test_closed_before_the_answer(self) -> None:
        """
        A device that leaves before Spotify answers is sent nothing, and
        nothing is logged as a bug.
        """
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        self.spotify.slow = True
        device = self.device()
        device.send(type="spotify_refresh", refresh_token=REFRESH)
        self.http.flush()
        device.close()
        device.take()
        self.clock.advance(TIMEOUT + 1)
        self.assertEqual(device.take(), [])
        self.assertFalse([e for e in events if e.get("log_failure") is not None])

    def test_unreachable(self) -> None:
        """
        Spotify unreachable is C{spotify_unavailable} with C{retry: true}.
        """
        class Refusing:
            def post(self, *args, **kwargs):
                from twisted.internet.defer import fail
                from twisted.internet.error import ConnectionRefusedError
                return fail(ConnectionRefusedError())
        self.oauth._http = Refusing()
        answer = self.refresh(self.device())
        self.assertEqual((answer["error"], answer["retry"]), ("spotify_unavailable", True))

    def test_burst_of_three(self) -> None:
        """
        Three refreshes back to back are all served; a long storm is
        refused C{rate_limited} before it reaches Spotify.
        """
        device = self.device()
        for _ in range(3):
            self.assertEqual(self.refresh(device)["type"], "spotify_tokens")
        answers = [self.refresh(device) for _ in range(10)]
        self.assertEqual(answers[-1]["error"], "rate_limited")
        self.assertGreaterEqual(answers[-1]["retry_after"], 1)
        self.assertLess(len(self.spotify.requests), 13)

    def test_limit_is_per_device(self) -> None:
        """
        One device's storm leaves another device's refresh served.
        """
        device = self.device()
        for _ in range(12):
            self.refresh(device)
        self.assertEqual(self.refresh(self.device(OTHER))["type"], "spotify_tokens")

    def test_buckets_swept(self) -> None:
        """
        The per-device budgets of devices that have not asked for a while
        are forgotten, so memory follows recent activity.
        """
        broker = self.relay.handlers.spotify_broker
        broker.sweep_at = 3
        for i in range(3):
            self.refresh(self.device(f"leeloo_00000000002{i}"))
        self.assertEqual(len(broker.limiter.buckets), 3)
        self.clock.advance(3600)
        self.refresh(self.device())
        self.assertEqual(set(broker.limiter.buckets), {DEVICE})

    def test_not_registered(self) -> None:
        """
        A connection without a device id is answered C{not_registered}.
        """
        device = Device(self.relay)
        self.assertEqual(self.refresh(device)["error"], "not_registered")
        self.assertEqual(self.spotify.requests, [])

    def test_not_configured(self) -> None:
        """
        A relay without a Spotify app answers C{spotify_not_configured}.
        """
        self.relay = Relay(self.clock, MemoryStore())
        self.assertEqual(self.refresh(self.device())["error"], "spotify_not_configured")

    def test_bad_frame(self) -> None:
        """
        A refresh token that is no string is C{invalid_message}.
        """
        answer = self.ask(self.device(), type="spotify_refresh", refresh_token=42)
        self.assertEqual(answer["error"], "invalid_message")

    def test_no_token_and_none_kept(self) -> None:
        """
        A refresh without a refresh token, from a device the relay keeps no
        access for, is C{not_paired}, and Spotify is not asked.
        """
        answer = self.ask(self.device(), type="spotify_refresh")
        self.assertEqual(answer["error"], "not_paired")
        self.assertEqual(self.spotify.requests, [])


class SearchTests(BrokerMixin, SynchronousTestCase):
    def test_results(self) -> None:
        """
        C{spotify_search} is answered with Spotify's tracks in the relay's
        shape, searched with an app token (Bearer) for type track and the
        device's limit.
        """
        self.spotify.catalog["track:mr brightside artist:the killers"] = [BRIGHTSIDE]
        answer = self.search(self.device(), "mr brightside by the killers", limit=3)
        self.assertEqual(answer, {
            "type": "spotify_search_results", "query": "mr brightside by the killers",
            "results": [{"spotify_uri": "spotify:track:brightside", "track": "Mr. Brightside",
                         "artist": "The Killers", "album": "Hot Fuss",
                         "album_art_url": "https://i.scdn.co/image/hotfuss"}]})
        [search] = self.spotify.searches
        self.assertEqual((search["q"], search["type"], search["limit"], search["authorization"]),
                         ("track:mr brightside artist:the killers", "track", "3", "Bearer fake-app-token-1"))
        # The URL carries the query alone: the token goes in the header.
        self.assertEqual(set(search), {"q", "type", "limit", "authorization"})
        self.assertEqual(self.spotify.requests, [{"grant_type": "client_credentials"}])

    def test_default_limit(self) -> None:
        """
        Without C{limit}, 5 are asked for.
        """
        self.search(self.device(), "anything")
        self.assertEqual(self.spotify.searches[0]["limit"], "5")

    def test_bad_limit(self) -> None:
        """
        A limit outside 1 to 10 (or not a whole number) is C{invalid_message}
        and nothing goes to Spotify.
        """
        device = self.device()
        for limit in (0, 11, "5", True, 2.5):
            self.assertEqual(self.search(device, "x", limit=limit)["error"], "invalid_message")
        self.assertEqual(self.spotify.searches, [])

    def test_empty_query(self) -> None:
        """
        An empty or missing query is C{invalid_message}.
        """
        device = self.device()
        self.assertEqual(self.search(device, "  ")["error"], "invalid_message")
        self.assertEqual(self.ask(device, type="spotify_search")["error"], "invalid_message")

    def test_no_hits(self) -> None:
        """
        Nothing matching is C{"results": []}.
        """
        answer = self.search(self.device(), "zzqx nothing")
        self.assertEqual(answer, {"type": "spotify_search_results", "query": "zzqx nothing", "results": []})

    def test_app_token_cached(self) -> None:
        """
        The app token is asked for once and used until it expires; then a
        new one is asked for.
        """
        device, other = self.device(), self.device(OTHER)
        self.search(device, "a")
        self.search(other, "b")
        self.assertEqual(len(self.spotify.app_tokens), 1)
        self.clock.advance(3600)
        self.search(device, "c")
        self.assertEqual(len(self.spotify.app_tokens), 2)
        self.assertEqual(self.spotify.searches[-1]["authorization"], "Bearer fake-app-token-2")

    def test_app_token_refused(self) -> None:
        """
        A search with an app token Spotify no longer takes (401) gets a new
        one and is answered.
        """
        device = self.device()
        self.search(device, "a")
        self.spotify.app_tokens.append("someone-elses")
        answer = self.search(device, "b")
        self.assertEqual(answer["type"], "spotify_search_results")
        self.assertEqual(self.spotify.searches[-1]["authorization"], "Bearer fake-app-token-3")

    def test_server_error(self) -> None:
        """
        Spotify's search failing is C{spotify_unavailable} with C{retry}.
        """
        device = self.device()
        self.search(device, "a")
        self.spotify.fail_with = 503
        answer = self.search(device, "b")
        self.assertEqual((answer["error"], answer["retry"]), ("spotify_unavailable", True))

    def test_slow(self) -> None:
        """
        A search slower than the timeout is C{spotify_unavailable}.
        """
        device = self.device()
        self.search(device, "a")
        self.spotify.slow = True
        device.send(type="spotify_search", query="b")
        self.http.flush()
        self.assertEqual(device.take(), [])
        self.clock.advance(TIMEOUT + 0.1)
        [answer] = device.take()
        self.assertEqual(answer["error"], "spotify_unavailable")


class RateLimitTests(BrokerMixin, SynchronousTestCase):
    def test_retry_after(self) -> None:
        """
        Spotify's 429 is answered C{rate_limited} with its C{Retry-After}.
        """
        self.spotify.rate_limit = 30
        answer = self.search(self.device(), "a")
        self.assertEqual((answer["error"], answer["retry_after"]), ("rate_limited", 30))

    def test_shared_across_devices(self) -> None:
        """
        After a 429 to one device, nothing goes to Spotify for any device
        until Retry-After has passed: they are answered C{rate_limited}
        with the time left; then requests go again.
        """
        device, other = self.device(), self.device(OTHER)
        self.search(device, "a")
        self.spotify.rate_limit = 30
        self.search(device, "b")
        sent = len(self.spotify.searches) + len(self.spotify.requests)
        self.spotify.rate_limit = None
        self.clock.advance(10)
        answer = self.search(other, "c")
        self.assertEqual((answer["error"], answer["retry_after"]), ("rate_limited", 20))
        self.assertEqual(self.refresh(other)["error"], "rate_limited")
        self.assertEqual(len(self.spotify.searches) + len(self.spotify.requests), sent)
        self.clock.advance(20)
        self.assertEqual(self.search(other, "c")["type"], "spotify_search_results")

    def test_refresh_429(self) -> None:
        """
        A 429 on the token endpoint holds searches back too.
        """
        device = self.device()
        self.spotify.rate_limit = 7
        self.assertEqual(self.refresh(device)["retry_after"], 7)
        self.spotify.rate_limit = None
        self.assertEqual(self.search(self.device(OTHER), "a")["error"], "rate_limited")
        self.assertEqual(self.spotify.searches, [])

    def test_no_strike(self) -> None:
        """
        Spotify's 429 answers, and the wait after one, do not close the
        devices' connections (they are no abuse of the relay).
        """
        self.spotify.rate_limit = 1
        device = self.device()
        for _ in range(6):
            self.search(device, "a")
            self.clock.advance(10)
        self.spotify.rate_limit = 3600
        self.search(device, "a")
        waiting = [self.device(f"leeloo_00000000001{i}") for i in range(3)]
        for other in waiting:
            # More than the relay's 10 strikes, within the device's own budget.
            for _ in range(12):
                self.clock.advance(10)
                self.assertEqual(self.search(other, "a")["error"], "rate_limited")
        for d in [device] + waiting:
            self.assertIsNone(d.peer.closed)


class LogTests(BrokerMixin, SynchronousTestCase):
    def test_no_secrets(self) -> None:
        """
        Nothing logged during refreshes and searches (served, refused,
        unavailable, rate limited) holds a token, a refresh token or the
        client secret, nor an error sent to the device; the device is named.
        """
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        device = self.device()
        answers = [self.refresh(device), self.refresh(device, "test-refresh-revoked"), self.search(device, "a")]
        self.spotify.fail_with = 500
        answers += [self.refresh(device), self.search(device, "b")]
        self.spotify.fail_with = None
        self.spotify.rate_limit = 5
        answers.append(self.refresh(device))
        texts = [formatEvent(e) + repr(e) for e in events]
        self.assertTrue(any(DEVICE in t for t in texts))
        errors = [repr(a) for a in answers if a["type"] == "error"]
        for secret in (REFRESH, "test-refresh-revoked", NEW_TOKENS["access_token"], NEW_TOKENS["refresh_token"],
                       CLIENT_SECRET, "fake-app-token"):
            for text in texts + errors:
                self.assertNotIn(secret, text)
        for search in self.spotify.searches:
            self.assertNotIn("token", search["q"])


class SearchQueryTests(SynchronousTestCase):
    ROWS = [
        # (what the person says, the q sent)
        ("mr brightside by the killers", "track:mr brightside artist:the killers"),
        ("Mr Brightside by The Killers", "track:Mr Brightside artist:The Killers"),
        ("something by the killers", "artist:the killers"),
        ("anything by Radiohead", "artist:Radiohead"),
        ("songs by Radiohead", "artist:Radiohead"),
        ("some songs by Radiohead", "artist:Radiohead"),
        ("radiohead songs", "artist:radiohead"),
        ("play something by the killers", "artist:the killers"),
        ("play mr brightside by the killers", "track:mr brightside artist:the killers"),
        ("please play the song mr brightside by the killers please",
         "track:mr brightside artist:the killers"),
        ("the song hey jude", "hey jude"),
        ('"stand by me"', '"stand by me"'),
        ('"stand by me" by ben e king', 'track:"stand by me" artist:ben e king'),
        ("stand by me by ben e king", "track:stand by me artist:ben e king"),
        ('play "the song remains the same"', '"the song remains the same"'),
        ('"hey   jude"  by "the beatles"', 'track:"hey jude" artist:"the beatles"'),
        ("bohemian rhapsody", "bohemian rhapsody"),
        ("  daft   punk  ", "daft punk"),
        ("play", "play"),
        ("by", "by"),
        ("hurt by", "hurt by"),
        ("by the way", "by the way"),
        ("“stand by me”", '"stand by me"'),
    ]

    def test_rows(self) -> None:
        """
        Each phrasing is turned into the pinned Spotify query.
        """
        for said, q in self.ROWS:
            self.assertEqual((said, search_query(said)), (said, q))

    def test_each_row_sent(self) -> None:
        """
        Through the relay, each row's query is the C{q} sent to Spotify.
        """
        case = _Relayed()
        case.setUp()
        device = case.device()
        for said, q in self.ROWS:
            case.clock.advance(60)
            answer = case.search(device, said)
            self.assertEqual(answer["type"], "spotify_search_results", answer)
            self.assertEqual(case.spotify.searches[-1]["q"], q)


class _Relayed(BrokerMixin, SynchronousTestCase):
    def runTest(self) -> None:  # pragma: no cover
        pass


class MessageTests(SynchronousTestCase):
    def test_refresh_token_not_in_repr(self) -> None:
        """
        The typed C{spotify_refresh} and C{spotify_tokens} keep their tokens
        out of their repr (so out of any log line that shows one).
        """
        from leeloo import messages
        request = messages.decode(b'{"type":"spotify_refresh","refresh_token":"rt-secret-1"}')
        self.assertEqual(request.refresh_token, "rt-secret-1")
        self.assertNotIn("rt-secret-1", repr(request))
        self.assertNotIn("at-secret-2", repr(messages.SpotifyTokens({"access_token": "at-secret-2"})))

    def test_errors_round_trip(self) -> None:
        """
        C{spotify_refused} and C{spotify_unavailable} frames turn back into
        their typed errors, with C{spotify_error} and C{retry}.
        """
        from leeloo import messages
        refused = messages.error_from({"type": "error", "error": "spotify_refused", "message": "no",
                                       "spotify_error": "invalid_grant"})
        self.assertIsInstance(refused, messages.SpotifyRefused)
        self.assertEqual(refused.spotify_error, "invalid_grant")
        unavailable = messages.error_from({"type": "error", "error": "spotify_unavailable", "message": "later",
                                           "retry": True})
        self.assertIsInstance(unavailable, messages.SpotifyUnavailable)
        self.assertEqual(unavailable.as_message()["retry"], True)
