"""
Tests for L{leeloo.core.pairing}: the relay as the device's Spotify pairing
broker, driven by method calls on a L{Relay} on a L{Clock}, devices played
by L{Device}s, and Spotify by L{FakeSpotifyAccounts} behind a
L{treq.testing.StubTreq} (its consent redirect and its token endpoint).
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import re
from urllib.parse import parse_qs, urlsplit

from treq.testing import StubTreq
from twisted.internet.task import Clock
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from leeloo import messages
from leeloo.core.pairing import (
    PairingProblem,
    PairingSettings,
    display_code,
    is_pairing_state,
    normalize_user_code,
)
from leeloo.relay import Relay
from leeloo.spotify import SpotifyConfig, SpotifyOAuth
from leeloo.store import MemoryStore
from leeloo.testing import Device, FailingMemoryStore, FakeSpotifyAccounts

START = 1_700_000_000.0
CLIENT_ID = "test-client-id"
CLIENT_SECRET = "test-client-secret"
REDIRECT_URI = "https://relay.test/spotify/callback"
ACCOUNTS_URL = "http://accounts.test"
DEVICE = "leeloo_00000000000a"
OTHER = "leeloo_00000000000b"
TOKENS = {"access_token": "test-access-1", "refresh_token": "test-refresh-1", "expires_in": 3600}
ALPHABET = messages.CREW_CODE_ALPHABET
USER_CODE = re.compile(f"[{ALPHABET}]{{4}}-[{ALPHABET}]{{4}}")


def s256(verifier: str) -> str:
    return base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()


class PairingMixin:
    """
    A relay with a Spotify app on a clock, and helpers to play the device,
    the phone's button and Spotify's consent.
    """

    settings = PairingSettings()

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(START)
        self.accounts = FakeSpotifyAccounts(CLIENT_ID, CLIENT_SECRET, REDIRECT_URI)
        self.accounts.tokens = dict(TOKENS)
        self.http = StubTreq(self.accounts)
        self.store = self.make_store()
        self.relay = self.make_relay()

    def make_store(self):
        return MemoryStore()

    def make_relay(self, store=None, spotify: bool = True) -> Relay:
        oauth = None
        if spotify:
            config = SpotifyConfig(CLIENT_ID, CLIENT_SECRET, REDIRECT_URI, accounts_url=ACCOUNTS_URL)
            oauth = SpotifyOAuth(config, self.http, self.clock)
        return Relay(self.clock, self.store if store is None else store, spotify=oauth, pairing=self.settings)

    def device(self, device_id: str = DEVICE, crew_code: str | None = None, name: str | None = None,
               relay: Relay | None = None) -> Device:
        device = Device(relay or self.relay)
        device.send(type="register", device_id=device_id, crew_code=crew_code, device_name=name)
        device.take()
        return device

    def pair(self, device: Device, **fields) -> dict:
        """
        The device asks for a pairing; return the relay's answer.
        """
        device.send(type="spotify_pair", **fields)
        [answer] = device.take()
        self.assertEqual(answer["type"], "spotify_pair", answer)
        return answer

    def press(self, user_code: str, relay: Relay | None = None):
        """
        The phone's button: return the L{Consent}.
        """
        return self.successResultOf((relay or self.relay).pairing.consent(user_code))

    def authorize(self, location: str) -> dict:
        """
        The phone at Spotify's consent screen: return the query Spotify
        sends it back with (code and state, or error and state).
        """
        d = self.http.get(location, allow_redirects=False)
        self.http.flush()
        response = self.successResultOf(d)
        self.assertEqual(response.code, 302)
        [back] = response.headers.getRawHeaders(b"location")
        back = back.decode()
        self.assertTrue(back.startswith(REDIRECT_URI + "?"), back)
        return {k: v[0] for k, v in parse_qs(urlsplit(back).query).items()}

    def complete(self, query: dict, cookie: str | None, relay: Relay | None = None):
        d = (relay or self.relay).pairing.complete(query["state"], cookie, query.get("code"), query.get("error"))
        self.http.flush()
        return d

    def problem(self, d) -> str:
        return self.failureResultOf(d, PairingProblem).value.reason

    def whole_pairing(self, device: Device) -> tuple:
        answer = self.pair(device)
        consent = self.press(answer["user_code"])
        return answer, consent, self.authorize(consent.location)


class StartTests(PairingMixin, SynchronousTestCase):
    def test_answer(self) -> None:
        """
        spotify_pair is answered with the pairing URL PUBLIC/pair/CODE, the
        code as XXXX-XXXX (the URL's without the dash, from the crew-code
        alphabet) and expires_in 600; PUBLIC defaults to the origin of the
        Spotify redirect URI.
        """
        answer = self.pair(self.device())
        self.assertEqual(sorted(answer), ["expires_in", "type", "url", "user_code"])
        self.assertRegex(answer["user_code"], USER_CODE)
        self.assertEqual(answer["url"], "https://relay.test/pair/" + answer["user_code"].replace("-", ""))
        self.assertEqual(answer["expires_in"], 600)

    def test_public_url(self) -> None:
        """
        With a public URL set, the pairing URL is under it.
        """
        self.settings = PairingSettings(public_url="https://leeloo.example.org/")
        self.relay = self.make_relay(MemoryStore())
        answer = self.pair(self.device())
        self.assertTrue(answer["url"].startswith("https://leeloo.example.org/pair/"), answer["url"])

    def test_no_crew_needed(self) -> None:
        """
        A device registered without a crew (the pairing screen) can pair,
        and the flow names no crew.
        """
        answer = self.pair(self.device())
        view = self.relay.pairing.lookup(answer["user_code"])
        self.assertIsNone(view.crew_code)

    def test_lookup_names_device_and_crew(self) -> None:
        """
        The flow shows the phone the device's name and crew and the code
        the device shows.
        """
        answer = self.pair(self.device(crew_code="alpha", name="Kitchen"))
        view = self.relay.pairing.lookup(answer["user_code"])
        self.assertEqual((view.user_code, view.device_name, view.crew_code, view.expires_in),
                         (answer["user_code"], "Kitchen", "ALPHA", 600))

    def test_not_registered(self) -> None:
        """
        spotify_pair from a connection with no device id is answered
        not_registered, and starts nothing.
        """
        device = Device(self.relay)
        device.send(type="spotify_pair")
        [answer] = device.take()
        self.assertEqual((answer["type"], answer["error"]), ("error", "not_registered"))
        self.assertEqual(self.relay.pairing.flows, {})

    def test_not_configured(self) -> None:
        """
        On a relay without a Spotify app, spotify_pair is answered
        spotify_not_configured.
        """
        self.relay = self.make_relay(MemoryStore(), spotify=False)
        device = self.device()
        device.send(type="spotify_pair")
        [answer] = device.take()
        self.assertEqual((answer["type"], answer["error"]), ("error", "spotify_not_configured"))

    def test_not_registered_comes_first(self) -> None:
        """
        Without a device id and without Spotify, the answer is
        not_registered: register first.
        """
        self.relay = self.make_relay(MemoryStore(), spotify=False)
        device = Device(self.relay)
        device.send(type="spotify_pair")
        self.assertEqual(device.last()["error"], "not_registered")

    def test_bad_scopes(self) -> None:
        """
        scopes that are not a string of scope names are invalid_message.
        """
        device = self.device()
        for scopes in (7, "user-read-playback-state <script>", ["user-read-playback-state"]):
            device.send(type="spotify_pair", scopes=scopes)
            answer = device.last()
            self.assertEqual((answer["type"], answer["error"]), ("error", "invalid_message"), scopes)
        self.assertEqual(self.relay.pairing.flows, {})

    def test_default_scopes(self) -> None:
        """
        Without scopes the flow asks Spotify for the currently-playing and
        playback-state scopes.
        """
        _, consent, _ = self.whole_pairing(self.device())
        self.assertEqual(self.accounts.authorizations[0]["scope"],
                         "user-read-currently-playing user-read-playback-state")

    def test_scopes(self) -> None:
        """
        The device's scopes go to Spotify's consent as given.
        """
        device = self.device()
        answer = self.pair(device, scopes="user-read-email  streaming")
        self.authorize(self.press(answer["user_code"]).location)
        self.assertEqual(self.accounts.authorizations[0]["scope"], "user-read-email streaming")

    def test_second_pairing_cancels_the_first(self) -> None:
        """
        A second spotify_pair from the device ends its first pairing: the
        device is told spotify_pair_failed cancelled (naming the first
        code), then gets the new one; the first code is no longer known.
        """
        device = self.device()
        first = self.pair(device)
        device.send(type="spotify_pair")
        failed, second = device.take()
        self.assertEqual(failed, {"type": "spotify_pair_failed", "reason": "cancelled",
                                  "user_code": first["user_code"]})
        self.assertEqual(second["type"], "spotify_pair")
        self.assertNotEqual(second["user_code"], first["user_code"])
        self.assertEqual(self.problem(self.relay.pairing.consent(first["user_code"])), "unknown")
        self.relay.pairing.lookup(second["user_code"])

    def test_other_devices_unaffected(self) -> None:
        """
        A pairing by one device leaves another device's pairing alone.
        """
        a, b = self.device(DEVICE), self.device(OTHER)
        first = self.pair(a)
        self.pair(b)
        self.assertEqual(a.take(), [])
        self.relay.pairing.lookup(first["user_code"])

    def test_stored_before_answered(self) -> None:
        """
        The flow is in the store when the device gets its code.
        """
        answer = self.pair(self.device())
        code = answer["user_code"].replace("-", "")
        record = self.store.pairings.flows[code]
        self.assertEqual((record.device_id, record.state_hash, record.verifier), (DEVICE, None, None))

    def test_store_failure(self) -> None:
        """
        A pairing the store refuses is answered store_unavailable, and is
        not kept.
        """
        self.store = FailingMemoryStore()
        self.relay = self.make_relay()
        device = self.device()
        self.store.fail_with = OSError("disk full")
        device.send(type="spotify_pair")
        answer = device.last()
        self.assertEqual((answer["type"], answer["error"]), ("error", "store_unavailable"))
        self.assertEqual(self.relay.pairing.flows, {})


class CodeTests(SynchronousTestCase):
    def test_either_form(self) -> None:
        """
        A user code is accepted with or without its dash, in any case,
        with surrounding spaces; anything else is no code.
        """
        for text in ("ABCD-EFGH", "abcdefgh", " abcd-efgh "):
            self.assertEqual(normalize_user_code(text), "ABCDEFGH", text)
        for text in ("ABCD-EFG", "ABCDEFGHJ", "ABC-DEFGH", "ABCD-EFG0", "ABCDEFGI", "", None, "ABCD--EFGH"):
            self.assertIsNone(normalize_user_code(text), text)
        self.assertEqual(display_code("ABCDEFGH"), "ABCD-EFGH")

    def test_state_is_no_device_id(self) -> None:
        """
        A pairing state's shape is one no device id can have: the relay
        refuses it as a device id.
        """
        self.assertTrue(is_pairing_state("pair~abc"))
        self.assertFalse(is_pairing_state("leeloo_00000000000a"))
        self.assertFalse(is_pairing_state(None))
        self.assertRaises(messages.ProtocolError, messages.device_id_of, {"device_id": "pair~abc"})


class ConsentTests(PairingMixin, SynchronousTestCase):
    def test_either_form_finds_the_flow(self) -> None:
        """
        The flow is found by its code with or without the dash.
        """
        answer = self.pair(self.device())
        self.relay.pairing.lookup(answer["user_code"].replace("-", "").lower())
        self.relay.pairing.lookup(answer["user_code"])

    def test_unknown_code(self) -> None:
        """
        A code never issued is unknown, pressed or looked up.
        """
        self.assertRaises(PairingProblem, self.relay.pairing.lookup, "ABCD-EFGH")
        self.assertEqual(self.problem(self.relay.pairing.consent("ABCD-EFGH")), "unknown")

    def test_authorize_url(self) -> None:
        """
        The button sends the phone to Spotify's authorize endpoint for this
        app, with the redirect URI, a one-time state that is no device id,
        and an S256 PKCE challenge.
        """
        answer = self.pair(self.device())
        consent = self.press(answer["user_code"])
        parts = urlsplit(consent.location)
        self.assertEqual(f"{parts.scheme}://{parts.netloc}{parts.path}", ACCOUNTS_URL + "/authorize")
        query = {k: v[0] for k, v in parse_qs(parts.query).items()}
        self.assertEqual((query["client_id"], query["response_type"], query["redirect_uri"],
                          query["code_challenge_method"]), (CLIENT_ID, "code", REDIRECT_URI, "S256"))
        self.assertTrue(is_pairing_state(query["state"]))
        self.assertGreaterEqual(len(query["state"]), 40)
        record = self.store.pairings.flows[answer["user_code"].replace("-", "")]
        self.assertEqual(query["code_challenge"], s256(record.verifier))

    def test_fresh_state_and_cookie(self) -> None:
        """
        Each pairing gets its own state and cookie; the store keeps only
        their hashes.
        """
        a, b = self.device(DEVICE), self.device(OTHER)
        first = self.press(self.pair(a)["user_code"])
        second = self.press(self.pair(b)["user_code"])
        self.assertNotEqual(first.cookie, second.cookie)
        self.assertNotEqual(first.location, second.location)
        for record in self.store.pairings.flows.values():
            self.assertNotIn(first.cookie, repr(record))
            self.assertEqual(len(record.cookie_hash), 64)

    def test_code_single_use(self) -> None:
        """
        Once its button was pressed, the code is spent: pressed again or
        looked up, it is "used".
        """
        answer = self.pair(self.device())
        self.press(answer["user_code"])
        self.assertEqual(self.problem(self.relay.pairing.consent(answer["user_code"])), "used")
        e = self.assertRaises(PairingProblem, self.relay.pairing.lookup, answer["user_code"])
        self.assertEqual(e.reason, "used")

    def test_code_expires(self) -> None:
        """
        A code not pressed within ten minutes is expired, and its device is
        told spotify_pair_failed expired.
        """
        device = self.device()
        answer = self.pair(device)
        self.clock.advance(600)
        self.assertEqual(self.problem(self.relay.pairing.consent(answer["user_code"])), "expired")
        self.assertEqual(device.take(), [{"type": "spotify_pair_failed", "reason": "expired",
                                          "user_code": answer["user_code"]}])
        self.assertEqual(self.store.pairings.flows, {})

    def test_code_valid_until_then(self) -> None:
        """
        Just before ten minutes the code still works.
        """
        answer = self.pair(self.device())
        self.clock.advance(599)
        self.press(answer["user_code"])

    def test_expiry_sweep(self) -> None:
        """
        The relay's periodic expire() ends flows past their time: the
        device is told expired and the store forgets them.
        """
        device = self.device()
        answer = self.pair(device)
        self.clock.advance(601)
        self.relay.expire()
        self.assertEqual(device.take(), [{"type": "spotify_pair_failed", "reason": "expired",
                                          "user_code": answer["user_code"]}])
        self.assertEqual((self.relay.pairing.flows, self.store.pairings.flows), ({}, {}))

    def test_store_failure_keeps_the_code(self) -> None:
        """
        A press the store cannot record fails as unavailable, and the code
        can be pressed again.
        """
        self.store = FailingMemoryStore()
        self.relay = self.make_relay()
        answer = self.pair(self.device())
        self.store.fail_with = OSError("disk full")
        self.assertEqual(self.problem(self.relay.pairing.consent(answer["user_code"])), "unavailable")
        self.store.fail_with = None
        self.press(answer["user_code"])


class CompleteTests(PairingMixin, SynchronousTestCase):
    def test_tokens_reach_the_device(self) -> None:
        """
        The whole pairing: the device that asked receives
        spotify_auth_complete with its tokens, in today's shape.
        """
        device = self.device()
        _, consent, back = self.whole_pairing(device)
        paired = self.successResultOf(self.complete(back, consent.cookie))
        self.assertEqual((paired.device_id, paired.online), (DEVICE, True))
        self.assertEqual(device.take(), [{"type": "spotify_auth_complete", "tokens": TOKENS}])

    def test_exchange_request(self) -> None:
        """
        The code is exchanged with the client secret (Basic auth), the
        redirect URI and the PKCE verifier.
        """
        device = self.device()
        answer, consent, back = self.whole_pairing(device)
        verifier = self.store.pairings.flows[answer["user_code"].replace("-", "")].verifier
        self.successResultOf(self.complete(back, consent.cookie))
        [received] = self.accounts.received
        self.assertEqual(received["authorization"],
                         "Basic " + base64.b64encode(f"{CLIENT_ID}:{CLIENT_SECRET}".encode()).decode())
        self.assertEqual(received["form"], {"grant_type": "authorization_code", "code": back["code"],
                                            "redirect_uri": REDIRECT_URI, "code_verifier": verifier})

    def test_other_devices_get_nothing(self) -> None:
        """
        Only the device that asked gets the tokens.
        """
        device, other = self.device(DEVICE), self.device(OTHER)
        _, consent, back = self.whole_pairing(device)
        self.successResultOf(self.complete(back, consent.cookie))
        self.assertEqual(other.take(), [])

    def test_state_single_use(self) -> None:
        """
        A replayed state is unknown: no second exchange, no second delivery.
        """
        device = self.device()
        _, consent, back = self.whole_pairing(device)
        self.successResultOf(self.complete(back, consent.cookie))
        device.take()
        self.assertEqual(self.problem(self.complete(back, consent.cookie)), "unknown")
        self.assertEqual((len(self.accounts.requests), device.take()), (1, []))

    def test_forged_state(self) -> None:
        """
        A state the relay never issued is unknown, and nothing is exchanged.
        """
        device = self.device()
        _, consent, back = self.whole_pairing(device)
        forged = dict(back, state="pair~" + "A" * 43)
        self.assertEqual(self.problem(self.complete(forged, consent.cookie)), "unknown")
        self.assertEqual((self.accounts.requests, device.take()), ([], []))

    def test_wrong_or_missing_cookie(self) -> None:
        """
        Without the cookie of the browser that pressed the button, or with
        another, the callback is refused as the wrong browser, nothing is
        exchanged, and the right browser can still finish.
        """
        device = self.device()
        _, consent, back = self.whole_pairing(device)
        for cookie in (None, "", "another-browsers-cookie"):
            self.assertEqual(self.problem(self.complete(back, cookie)), "wrong_browser", cookie)
        self.assertEqual((self.accounts.requests, device.take()), ([], []))
        self.successResultOf(self.complete(back, consent.cookie))
        self.assertEqual(device.take()[0]["type"], "spotify_auth_complete")

    def test_another_flows_cookie(self) -> None:
        """
        The cookie of one pairing does not finish another.
        """
        a, b = self.device(DEVICE), self.device(OTHER)
        _, consent_a, _ = self.whole_pairing(a)
        _, _, back_b = self.whole_pairing(b)
        self.assertEqual(self.problem(self.complete(back_b, consent_a.cookie)), "wrong_browser")

    def test_state_expires(self) -> None:
        """
        A state used ten minutes after its button is expired: nothing is
        exchanged, and the device is told spotify_pair_failed expired.
        """
        device = self.device()
        answer, consent, back = self.whole_pairing(device)
        self.clock.advance(600)
        self.assertEqual(self.problem(self.complete(back, consent.cookie)), "expired")
        self.assertEqual(device.take(), [{"type": "spotify_pair_failed", "reason": "expired",
                                          "user_code": answer["user_code"]}])
        self.assertEqual(self.accounts.requests, [])

    def test_denied(self) -> None:
        """
        A person who says no on Spotify's consent screen ends the pairing:
        the device is told spotify_pair_failed denied.
        """
        device = self.device()
        answer = self.pair(device)
        consent = self.press(answer["user_code"])
        self.accounts.consent = "deny"
        back = self.authorize(consent.location)
        self.assertEqual(back["error"], "access_denied")
        self.assertEqual(self.problem(self.complete(back, consent.cookie)), "denied")
        self.assertEqual(device.take(), [{"type": "spotify_pair_failed", "reason": "denied",
                                          "user_code": answer["user_code"]}])
        self.assertEqual(self.relay.pairing.flows, {})

    def test_refused(self) -> None:
        """
        A code Spotify refuses ends the pairing: the device is told
        spotify_pair_failed refused, the phone what Spotify said.
        """
        device = self.device()
        answer, consent, back = self.whole_pairing(device)
        self.accounts.codes.clear()
        problem = self.failureResultOf(self.complete(back, consent.cookie), PairingProblem).value
        self.assertEqual((problem.reason, problem.description, problem.upstream),
                         ("refused", "Invalid authorization code", False))
        self.assertEqual(device.take(), [{"type": "spotify_pair_failed", "reason": "refused",
                                          "user_code": answer["user_code"]}])

    def test_wrong_verifier_refused(self) -> None:
        """
        Spotify checks the verifier: a flow whose verifier does not match
        the challenge its consent carried is refused (what PKCE stops).
        """
        device = self.device()
        answer, consent, back = self.whole_pairing(device)
        code = answer["user_code"].replace("-", "")
        record = self.relay.pairing.flows[code]
        self.relay.pairing.flows[code] = dataclasses.replace(record, verifier="x" * 86)
        self.assertEqual(self.problem(self.complete(back, consent.cookie)), "refused")
        self.assertEqual(device.take()[0]["reason"], "refused")

    def test_device_offline(self) -> None:
        """
        A device offline when the callback arrives gets its tokens when it
        next registers.
        """
        device = self.device()
        _, consent, back = self.whole_pairing(device)
        device.close()
        paired = self.successResultOf(self.complete(back, consent.cookie))
        self.assertFalse(paired.online)
        again = Device(self.relay)
        again.send(type="register", device_id=DEVICE)
        self.assertEqual(again.types(), ["registered", "spotify_auth_complete"])

    def test_pairing_survives_a_restart(self) -> None:
        """
        A relay restarted on the same store knows its flows: the phone
        that pressed the button before the restart finishes after it.
        """
        device = self.device()
        _, consent, back = self.whole_pairing(device)
        device.close()
        restarted = self.make_relay(self.store)
        self.successResultOf(self.complete(back, consent.cookie, restarted))
        again = Device(restarted)
        again.send(type="register", device_id=DEVICE)
        self.assertEqual(again.types(), ["registered", "spotify_auth_complete"])

    def test_waiting_code_survives_a_restart(self) -> None:
        """
        A code shown before a restart can be pressed after it.
        """
        answer = self.pair(self.device())
        restarted = self.make_relay(self.store)
        restarted.pairing.lookup(answer["user_code"])
        self.successResultOf(restarted.pairing.consent(answer["user_code"]))

    def test_expired_flows_are_not_restored(self) -> None:
        """
        Flows that expired while the relay was down are not taken up, and
        the store forgets them at the next sweep.
        """
        self.pair(self.device())
        self.clock.advance(700)
        restarted = self.make_relay(self.store)
        self.assertEqual(restarted.pairing.flows, {})
        restarted.expire()
        self.assertEqual(self.store.pairings.flows, {})


class LogTests(PairingMixin, SynchronousTestCase):
    def test_logs_hold_no_secrets(self) -> None:
        """
        Nothing logged during pairings (one that works, one refused, one
        from the wrong browser) holds the user code, the state, the
        cookie, the verifier, Spotify's code, a token or the client
        secret; the device id is named.
        """
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        device = self.device()
        answer, consent, back = self.whole_pairing(device)
        verifier = self.store.pairings.flows[answer["user_code"].replace("-", "")].verifier
        self.problem(self.complete(back, None))
        self.successResultOf(self.complete(back, consent.cookie))
        device.take()
        answer2, consent2, back2 = self.whole_pairing(device)
        self.accounts.codes.clear()
        self.problem(self.complete(back2, consent2.cookie))
        texts = [formatEvent(e) + repr(e) for e in events]
        self.assertTrue(any(DEVICE in t for t in texts))
        for secret in (answer["user_code"], answer["user_code"].replace("-", ""), answer2["user_code"],
                       back["state"], back["code"], consent.cookie, verifier, back2["state"], consent2.cookie,
                       TOKENS["access_token"], TOKENS["refresh_token"], CLIENT_SECRET):
            for text in texts:
                self.assertNotIn(secret, text)


class PlainCodeFlowTests(PairingMixin, SynchronousTestCase):
    settings = PairingSettings(pkce=False)

    def test_no_pkce(self) -> None:
        """
        With PKCE off, the consent carries no challenge, the exchange no
        verifier, and the pairing still delivers the tokens.
        """
        device = self.device()
        _, consent, back = self.whole_pairing(device)
        query = parse_qs(urlsplit(consent.location).query)
        self.assertNotIn("code_challenge", query)
        self.assertNotIn("code_challenge_method", query)
        self.successResultOf(self.complete(back, consent.cookie))
        self.assertNotIn("code_verifier", self.accounts.requests[0])
        self.assertEqual(device.take()[0]["type"], "spotify_auth_complete")

    def test_spotify_refusing_a_verifier(self) -> None:
        """
        The stand-in that refuses a verifier from a client that also
        authenticates (why --spotify-pkce off exists) is not sent one.
        """
        self.accounts.refuse_verifier = True
        device = self.device()
        _, consent, back = self.whole_pairing(device)
        self.successResultOf(self.complete(back, consent.cookie))


class LegacyTests(PairingMixin, SynchronousTestCase):
    def test_legacy_on(self) -> None:
        """
        By default a device id as state (the deployed devices' own links)
        is exchanged and delivered to that device.
        """
        device = self.device()
        self.accounts.issue("legacy-code", "at", "rt")
        d = self.relay.pairing.legacy(DEVICE, "legacy-code")
        self.http.flush()
        self.assertTrue(self.successResultOf(d).online)
        self.assertEqual(device.take()[0]["type"], "spotify_auth_complete")

    def test_legacy_off(self) -> None:
        """
        With legacy state off, a device id as state is refused before
        anything is exchanged.
        """
        self.settings = PairingSettings(legacy_state=False)
        self.relay = self.make_relay(MemoryStore())
        device = self.device()
        self.accounts.issue("legacy-code", "at", "rt")
        self.assertEqual(self.problem(self.relay.pairing.legacy(DEVICE, "legacy-code")), "legacy_off")
        self.assertEqual((self.accounts.requests, device.take()), ([], []))
