"""
Tests for the phone's side of Spotify pairing in L{leeloo.web}: the
C{/pair/CODE} pages and button, and C{/spotify/callback} for pairings and
for the legacy path, through the real resource tree behind a
L{treq.testing.StubTreq}, with Spotify played by L{FakeSpotifyAccounts}
and devices by L{Device}s on the same L{Relay}.
"""

from __future__ import annotations

from http.cookies import SimpleCookie
from typing import Any
from urllib.parse import parse_qs, urlsplit

from treq.testing import StubTreq
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from leeloo import pages
from leeloo.core.pairing import PairingSettings
from leeloo.relay import Relay
from leeloo.spotify import SpotifyConfig, SpotifyOAuth
from leeloo.store import MemoryStore
from leeloo.testing import Device, FakeSpotifyAccounts
from leeloo.web import make_root
from leeloo.websocket import RelayServerFactory

BASE = "http://relay.test"
START = 1_700_000_000.0
CLIENT_ID = "test-client-id"
CLIENT_SECRET = "test-client-secret"
REDIRECT_URI = "https://relay.test/spotify/callback"
ACCOUNTS_URL = "http://accounts.test"
DEVICE = "leeloo_00000000000a"
OTHER = "leeloo_00000000000b"
TOKENS = {"access_token": "test-access-1", "refresh_token": "test-refresh-1", "expires_in": 3600}
PAIR_CSP = ("default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self' http://accounts.test; "
            "frame-ancestors 'none'; base-uri 'none'")


class PairSiteMixin:
    settings = PairingSettings()

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(START)
        self.accounts = FakeSpotifyAccounts(CLIENT_ID, CLIENT_SECRET, REDIRECT_URI)
        self.accounts.tokens = dict(TOKENS)
        self.spotify_http = StubTreq(self.accounts)
        self.relay = self.make_relay()
        self.http = StubTreq(make_root(self.relay, RelayServerFactory(self.relay), None, None))

    def make_relay(self, store: Any = None) -> Relay:
        config = SpotifyConfig(CLIENT_ID, CLIENT_SECRET, REDIRECT_URI, accounts_url=ACCOUNTS_URL)
        oauth = SpotifyOAuth(config, self.spotify_http, self.clock)
        return Relay(self.clock, store if store is not None else MemoryStore(), spotify=oauth,
                     pairing=self.settings)

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

    def device(self, device_id: str = DEVICE, crew_code: str | None = None, name: str | None = None) -> Device:
        device = Device(self.relay)
        device.send(type="register", device_id=device_id, crew_code=crew_code, device_name=name)
        device.take()
        return device

    def pair(self, device: Device) -> dict:
        device.send(type="spotify_pair")
        [answer] = device.take()
        return answer

    def path_of(self, answer: dict) -> str:
        return urlsplit(answer["url"]).path

    def press(self, path: str, headers: dict | None = None) -> tuple[Any, bytes]:
        return self.call("POST", path, headers=headers or {})

    def cookie_of(self, response: Any) -> SimpleCookie:
        cookie = SimpleCookie()
        for header in response.headers.getRawHeaders(b"set-cookie", []):
            cookie.load(header.decode("latin-1"))
        return cookie

    def consent(self, answer: dict) -> tuple[str, dict]:
        """
        Press the button, then let Spotify say yes: return the cookie and
        the query Spotify sends the phone back with.
        """
        response, _ = self.press(self.path_of(answer))
        self.assertEqual(response.code, 303)
        cookie = self.cookie_of(response)["leeloo_pair"].value
        [location] = response.headers.getRawHeaders(b"location")
        d = self.spotify_http.get(location.decode(), allow_redirects=False)
        self.spotify_http.flush()
        [back] = self.successResultOf(d).headers.getRawHeaders(b"location")
        return cookie, {k: v[0] for k, v in parse_qs(urlsplit(back.decode()).query).items()}

    def callback(self, query: dict, cookie: str | None) -> tuple[int, bytes]:
        headers = {b"cookie": [f"leeloo_pair={cookie}".encode()]} if cookie is not None else {}
        response, body = self.call("GET", "/spotify/callback", params=query, headers=headers)
        return response.code, body

    def csp(self, response: Any) -> str:
        [value] = response.headers.getRawHeaders(b"content-security-policy")
        return value.decode()


class PairPageTests(PairSiteMixin, SynchronousTestCase):
    def test_page(self) -> None:
        """
        GET /pair/CODE shows the device's name, its crew and the code the
        device shows, with one button that posts to /pair/CODE.
        """
        answer = self.pair(self.device(crew_code="alpha", name="Kitchen"))
        response, body = self.call("GET", self.path_of(answer))
        page = body.decode()
        self.assertEqual(response.code, 200)
        self.assertIn("Kitchen", page)
        self.assertIn("ALPHA", page)
        self.assertIn(f'<p class="pair-code" id="user-code">{answer["user_code"]}</p>', page)
        self.assertIn(f'<form method="post" action="{self.path_of(answer)}">', page)
        self.assertEqual(page.count("<button"), 1)
        self.assertEqual(page.count("<form"), 1)

    def test_code_with_dash(self) -> None:
        """
        The page is found with the code as the device shows it, dash and
        all, in any case.
        """
        answer = self.pair(self.device())
        response, _ = self.call("GET", "/pair/" + answer["user_code"].lower())
        self.assertEqual(response.code, 200)

    def test_names_escaped(self) -> None:
        """
        The device's name goes into the page escaped.
        """
        answer = self.pair(self.device(name="<b>Bad</b>"))
        _, body = self.call("GET", self.path_of(answer))
        self.assertNotIn(b"<b>Bad</b>", body)
        self.assertIn(b"&lt;b&gt;Bad&lt;/b&gt;", body)

    def test_content_security_policy(self) -> None:
        """
        The pairing pages' CSP allows exactly the relay's stylesheet and
        icon, forms to the relay and to Spotify's accounts service, and
        nothing else; the problem pages have it too.
        """
        answer = self.pair(self.device())
        response, _ = self.call("GET", self.path_of(answer))
        self.assertEqual(self.csp(response), PAIR_CSP)
        response, _ = self.call("GET", "/pair/ABCDEFGH")
        self.assertEqual(self.csp(response), PAIR_CSP)

    def test_policy_for_spotify(self) -> None:
        """
        With Spotify's own accounts service, form-action names exactly
        https://accounts.spotify.com.
        """
        config = SpotifyConfig(CLIENT_ID, CLIENT_SECRET, REDIRECT_URI)
        self.assertEqual(pages.pairing_policy(config.accounts_origin).decode(),
                         "default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self' "
                         "https://accounts.spotify.com; frame-ancestors 'none'; base-uri 'none'")

    def test_no_inline_code(self) -> None:
        """
        The page has no script and no inline style (its CSP allows none).
        """
        answer = self.pair(self.device())
        _, body = self.call("GET", self.path_of(answer))
        self.assertNotIn(b"<script", body)
        self.assertNotIn(b"style=", body)
        self.assertNotIn(b"<style", body)

    def test_unknown_code(self) -> None:
        """
        A code never issued, or no code, is a 404 page that says to start
        again on the device.
        """
        for path in ("/pair/ABCDEFGH", "/pair/", "/pair/not-a-code", "/pair/ABCDEFGH/more"):
            response, body = self.call("GET", path)
            self.assertEqual(response.code, 404, path)
            self.assertIn(b"Start again on your LEELOO", body, path)

    def test_expired_code(self) -> None:
        """
        A code past its ten minutes is a 410 page saying it expired and to
        start again on the device.
        """
        answer = self.pair(self.device())
        self.clock.advance(600)
        response, body = self.call("GET", self.path_of(answer))
        self.assertEqual(response.code, 410)
        self.assertIn(b"expired", body)
        self.assertIn(b"Start again on your LEELOO", body)

    def test_head_spends_nothing(self) -> None:
        """
        HEAD (a link preview) shows the page's headers and spends nothing.
        """
        answer = self.pair(self.device())
        response, _ = self.call("HEAD", self.path_of(answer))
        self.assertEqual(response.code, 200)
        response, _ = self.call("GET", self.path_of(answer))
        self.assertEqual(response.code, 200)


class ButtonTests(PairSiteMixin, SynchronousTestCase):
    def test_redirect_to_spotify(self) -> None:
        """
        The button is answered 303 to Spotify's authorize URL, with a
        one-time state and PKCE S256.
        """
        answer = self.pair(self.device())
        response, _ = self.press(self.path_of(answer))
        self.assertEqual(response.code, 303)
        [location] = response.headers.getRawHeaders(b"location")
        parts = urlsplit(location.decode())
        self.assertEqual(f"{parts.scheme}://{parts.netloc}{parts.path}", ACCOUNTS_URL + "/authorize")
        query = parse_qs(parts.query)
        self.assertTrue(query["state"][0].startswith("pair~"))
        self.assertEqual(query["code_challenge_method"], ["S256"])
        self.assertEqual(query["redirect_uri"], [REDIRECT_URI])

    def test_cookie(self) -> None:
        """
        The button sets the cookie leeloo_pair: httpOnly, Secure,
        SameSite=Lax, sent back only to the callback, for ten minutes.
        """
        answer = self.pair(self.device())
        response, _ = self.press(self.path_of(answer))
        [header] = response.headers.getRawHeaders(b"set-cookie")
        morsel = self.cookie_of(response)["leeloo_pair"]
        self.assertGreaterEqual(len(morsel.value), 40)
        self.assertTrue(morsel["httponly"])
        self.assertTrue(morsel["secure"])
        self.assertEqual(morsel["samesite"].lower(), "lax")
        self.assertEqual(morsel["path"], "/spotify/callback")
        self.assertEqual(morsel["max-age"], "600")
        self.assertIn(b"HttpOnly", header)

    def test_button_once(self) -> None:
        """
        The code is single use: after its button, the page and the button
        say it was already used (409).
        """
        answer = self.pair(self.device())
        self.press(self.path_of(answer))
        for method in ("GET", "POST"):
            response, body = self.call(method, self.path_of(answer))
            self.assertEqual(response.code, 409, method)
            self.assertIn(b"already used", body)

    def test_cross_site_post_refused(self) -> None:
        """
        A button press posted from another site (a browser's Origin or
        Sec-Fetch-Site says so) is refused, and the code stays unspent.
        """
        answer = self.pair(self.device())
        for headers in ({b"origin": [b"https://evil.example"]}, {b"sec-fetch-site": [b"cross-site"]},
                        {b"sec-fetch-site": [b"same-site"], b"origin": [b"https://relay.test"]},
                        {b"origin": [b"null"]}):
            response, _ = self.press(self.path_of(answer), headers)
            self.assertEqual(response.code, 403, headers)
            self.assertIsNone(response.headers.getRawHeaders(b"set-cookie"))
        response, _ = self.call("GET", self.path_of(answer))
        self.assertEqual(response.code, 200)

    def test_same_site_post(self) -> None:
        """
        A press from the relay's own page goes on: Sec-Fetch-Site
        same-origin (whatever the Origin), or without it an Origin that is
        the relay's public one or the host asked.
        """
        for i, headers in enumerate(({b"origin": [b"https://relay.test"], b"sec-fetch-site": [b"same-origin"]},
                                     {b"origin": [b"null"], b"sec-fetch-site": [b"same-origin"]},
                                     {b"origin": [b"https://relay.test"]}, {b"origin": [b"http://relay.test"]},
                                     {})):
            answer = self.pair(self.device(f"leeloo_{i:012d}"))
            response, _ = self.press(self.path_of(answer), headers)
            self.assertEqual(response.code, 303, headers)

    def test_referrer_policy(self) -> None:
        """
        The pairing pages send the Referer to the relay alone
        (same-origin), so that the button's post carries a real Origin and
        nothing of the page's address reaches Spotify.
        """
        answer = self.pair(self.device())
        for method in ("GET", "POST"):
            response, _ = self.call(method, self.path_of(answer))
            self.assertEqual(response.headers.getRawHeaders(b"referrer-policy"), [b"same-origin"], method)


class CallbackTests(PairSiteMixin, SynchronousTestCase):
    def test_tokens_reach_the_device(self) -> None:
        """
        The callback with the state and the cookie delivers
        spotify_auth_complete to the device that asked, shows the phone a
        page saying it worked, and clears the cookie.
        """
        device = self.device()
        cookie, back = self.consent(self.pair(device))
        response, body = self.call("GET", "/spotify/callback", params=back,
                                   headers={b"cookie": [f"leeloo_pair={cookie}".encode()]})
        self.assertEqual(response.code, 200)
        self.assertIn(b"Spotify is connected", body)
        self.assertEqual(device.take(), [{"type": "spotify_auth_complete", "tokens": TOKENS}])
        self.assertEqual(self.cookie_of(response)["leeloo_pair"]["max-age"], "0")

    def test_missing_cookie(self) -> None:
        """
        Without the cookie, the phone is told to open the link on the
        phone that pressed the button (403); nothing is delivered or
        exchanged.
        """
        device = self.device()
        _, back = self.consent(self.pair(device))
        status, body = self.callback(back, None)
        self.assertEqual(status, 403)
        self.assertIn(b"phone that pressed the button", body)
        self.assertEqual((device.take(), self.accounts.requests), ([], []))

    def test_wrong_cookie(self) -> None:
        """
        Another cookie is the wrong browser too; the right one still works
        after it.
        """
        device = self.device()
        cookie, back = self.consent(self.pair(device))
        self.assertEqual(self.callback(back, "someone-elses")[0], 403)
        self.assertEqual(device.take(), [])
        self.assertEqual(self.callback(back, cookie)[0], 200)
        self.assertEqual(device.take()[0]["type"], "spotify_auth_complete")

    def test_replayed_state(self) -> None:
        """
        A state used once is unknown the second time (404, start again),
        with no second exchange and no second delivery.
        """
        device = self.device()
        cookie, back = self.consent(self.pair(device))
        self.callback(back, cookie)
        device.take()
        status, body = self.callback(back, cookie)
        self.assertEqual(status, 404)
        self.assertIn(b"Start again on your LEELOO", body)
        self.assertEqual((device.take(), len(self.accounts.requests)), ([], 1))

    def test_forged_state(self) -> None:
        """
        A pairing-shaped state the relay never issued is refused (404),
        and never taken for a device id.
        """
        self.device()
        for state in ("pair~forged", "pair~" + DEVICE):
            status, _ = self.callback({"code": "some-code", "state": state}, "any")
            self.assertEqual(status, 404, state)
        self.assertEqual(self.accounts.requests, [])

    def test_expired_state(self) -> None:
        """
        A state used after its ten minutes is expired (410, start again on
        the device); the device is told expired; nothing is exchanged, and
        it does not fall through to the legacy path.
        """
        device = self.device()
        cookie, back = self.consent(self.pair(device))
        self.clock.advance(600)
        status, body = self.callback(back, cookie)
        self.assertEqual(status, 410)
        self.assertIn(b"Start again on your LEELOO", body)
        self.assertEqual(device.take()[0]["reason"], "expired")
        self.assertEqual(self.accounts.requests, [])

    def test_denied(self) -> None:
        """
        A person who says no sees a page saying so; the device is told
        denied.
        """
        device = self.device()
        answer = self.pair(device)
        self.accounts.consent = "deny"
        cookie, back = self.consent(answer)
        status, body = self.callback(back, cookie)
        self.assertEqual(status, 200)
        self.assertIn(b"You chose not to connect Spotify", body)
        self.assertEqual(device.take()[0]["reason"], "denied")

    def test_refused(self) -> None:
        """
        A code Spotify refuses shows what it said; the device is told
        refused.
        """
        device = self.device()
        cookie, back = self.consent(self.pair(device))
        self.accounts.codes.clear()
        status, body = self.callback(back, cookie)
        self.assertEqual(status, 400)
        self.assertIn(b"Invalid authorization code", body)
        self.assertEqual(device.take()[0]["reason"], "refused")

    def test_device_offline(self) -> None:
        """
        A device offline when the callback arrives gets the tokens when it
        registers again; the phone still sees it worked.
        """
        device = self.device()
        cookie, back = self.consent(self.pair(device))
        device.close()
        self.assertEqual(self.callback(back, cookie)[0], 200)
        again = Device(self.relay)
        again.send(type="register", device_id=DEVICE)
        self.assertEqual(again.take()[1], {"type": "spotify_auth_complete", "tokens": TOKENS})

    def test_second_pairing_cancels_the_first(self) -> None:
        """
        After a second spotify_pair, the first code's page is unknown and
        a callback for its state too.
        """
        device = self.device()
        first = self.pair(device)
        cookie, back = self.consent(first)
        device.send(type="spotify_pair")
        self.assertEqual(device.types(), ["spotify_pair_failed", "spotify_pair"])
        self.assertEqual(self.callback(back, cookie)[0], 404)
        self.assertEqual(self.accounts.requests, [])

    def test_pages_hold_no_secrets(self) -> None:
        """
        No page shows the code, the tokens, the cookie or the client
        secret.
        """
        device = self.device()
        cookie, back = self.consent(self.pair(device))
        _, body = self.call("GET", "/spotify/callback", params=back,
                            headers={b"cookie": [f"leeloo_pair={cookie}".encode()]})
        for secret in (back["code"], TOKENS["access_token"], TOKENS["refresh_token"], cookie, CLIENT_SECRET):
            self.assertNotIn(secret.encode(), body)


class BruteForceTests(PairSiteMixin, SynchronousTestCase):
    def test_lookups_limited(self) -> None:
        """
        /pair/ answers 30 lookups a minute from one client address; the
        31st is 429 with Retry-After, even for a real code.
        """
        answer = self.pair(self.device())
        for i in range(30):
            response, _ = self.call("GET", f"/pair/AAAA{ALPHA[i % 32]}{ALPHA[i // 32]}AA")
            self.assertEqual(response.code, 404, i)
        response, body = self.call("GET", self.path_of(answer))
        self.assertEqual(response.code, 429)
        self.assertTrue(int(response.headers.getRawHeaders(b"retry-after")[0]) >= 1)
        self.assertIn(b"Too many tries", body)

    def test_posts_count_too(self) -> None:
        """
        Button presses count against the same budget.
        """
        for _ in range(30):
            self.call("POST", "/pair/ABCDEFGH")
        response, _ = self.call("GET", "/pair/ABCDEFGH")
        self.assertEqual(response.code, 429)

    def test_budget_refills(self) -> None:
        """
        A minute later the address may look up again.
        """
        for _ in range(31):
            self.call("GET", "/pair/ABCDEFGH")
        self.clock.advance(60)
        response, _ = self.call("GET", "/pair/ABCDEFGH")
        self.assertEqual(response.code, 404)


ALPHA = "ABCDEFGHJKLMNPQRSTUVWXYZ23456789"


class LegacyOnTests(PairSiteMixin, SynchronousTestCase):
    def test_device_id_state(self) -> None:
        """
        By default the deployed devices' state (their device id) still
        delivers the tokens.
        """
        device = self.device()
        self.accounts.issue("legacy-code", "at", "rt")
        status, body = self.callback({"code": "legacy-code", "state": DEVICE}, None)
        self.assertEqual(status, 200)
        self.assertEqual(device.take()[0]["type"], "spotify_auth_complete")


class LegacyOffTests(PairSiteMixin, SynchronousTestCase):
    settings = PairingSettings(legacy_state=False)

    def test_device_id_state_refused(self) -> None:
        """
        With --no-legacy-spotify-state, a device id as state is refused
        (410, a page saying to update and pair from the device), before
        any exchange.
        """
        device = self.device()
        self.accounts.issue("legacy-code", "at", "rt")
        status, body = self.callback({"code": "legacy-code", "state": DEVICE}, None)
        self.assertEqual(status, 410)
        self.assertIn(b"Update your LEELOO", body)
        self.assertEqual((device.take(), self.accounts.requests), ([], []))

    def test_pairing_still_works(self) -> None:
        """
        Pairings work with the legacy path off.
        """
        device = self.device()
        cookie, back = self.consent(self.pair(device))
        self.assertEqual(self.callback(back, cookie)[0], 200)
        self.assertEqual(device.take()[0]["type"], "spotify_auth_complete")
