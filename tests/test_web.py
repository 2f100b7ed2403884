"""
Tests for L{leeloo.web}: the real resource tree from L{make_root}, driven
through L{treq.testing.StubTreq}, with time from a L{Clock}, Spotify played
by L{FakeSpotifyAccounts} and devices by L{Device}s on the same L{Relay}.
"""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path
from typing import Any

from treq.testing import StubTreq
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.server import NOT_DONE_YET
from twisted.web.test.requesthelper import DummyRequest

import leeloo
from leeloo import __version__, messages
from leeloo.relay import Relay
from leeloo.spotify import SpotifyConfig, SpotifyOAuth
from leeloo.testing import Device, FakeSpotifyAccounts, strip_keys
from leeloo.web import STATIC_FILES, BotAPI, make_root
from leeloo.websocket import RelayServerFactory

BASE = "http://relay.test"
SECRET = "test-secret"
START = 1_700_000_000.0

CLIENT_ID = "test-client-id"
CLIENT_SECRET = "test-client-secret"
REDIRECT_URI = "https://relay.test/spotify/callback"

DEVICE = "leeloo_00000000000a"
OTHER_DEVICE = "leeloo_00000000000b"
CODE = "test-oauth-code-4711"
ACCESS_TOKEN = "test-access-token-a1"
REFRESH_TOKEN = "test-refresh-token-r1"
TOKENS = {"access_token": ACCESS_TOKEN, "refresh_token": REFRESH_TOKEN, "expires_in": 3600}

GENERATED_CREW_CODE = re.compile(r"LEELOO-[ABCDEFGHJKLMNPQRSTUVWXYZ23456789]{4}")


class SiteTestMixin:
    """
    A relay on a L{Clock}, its root resource behind a L{StubTreq}, and
    helpers to make requests and connect devices.
    """

    secret: str | None = SECRET

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(START)
        self.relay = self.make_relay()
        self.spotify = self.make_spotify()
        self.http = StubTreq(
            make_root(self.relay, RelayServerFactory(self.relay), self.spotify, self.secret)
        )

    def make_relay(self) -> Relay:
        return Relay(self.clock)

    def make_spotify(self) -> SpotifyOAuth | None:
        return None

    def call(self, method: str, path: str, **kwargs: Any) -> tuple[Any, bytes]:
        """
        Make one request; return the response and its whole body.
        """
        d = self.http.request(method, BASE + path, **kwargs)
        self.http.flush()
        response = self.successResultOf(d)
        body = response.content()
        self.http.flush()
        return response, self.successResultOf(body)

    def content_type(self, response: Any) -> str:
        [value] = response.headers.getRawHeaders(b"content-type")
        return value.decode("latin-1")

    def device(self, device_id: str, crew_code: str | None = None, name: str | None = None) -> Device:
        """
        Connect a device and register it, optionally in a crew; forget
        what it was sent so far.
        """
        device = Device(self.relay)
        device.send(type="register", device_id=device_id, crew_code=crew_code, device_name=name)
        device.take()
        return device


# ---------------------------------------------------------------- landing


class LandingTests(SiteTestMixin, SynchronousTestCase):
    def test_html(self) -> None:
        """
        C{GET /} is a 200 HTML page.
        """
        response, body = self.call("GET", "/")
        self.assertEqual(response.code, 200)
        self.assertEqual(self.content_type(response), "text/html; charset=utf-8")
        self.assertTrue(body.startswith(b"<!DOCTYPE html>"))
        self.assertIn(b"LEELOO", body)

    def test_viewport(self) -> None:
        """
        The landing page sets a device-width viewport, so phones show it at
        their own width.
        """
        _, body = self.call("GET", "/")
        self.assertRegex(
            body.decode("utf-8"),
            r'<meta name="viewport" content="width=device-width[^"]*">',
        )

    def test_index_html(self) -> None:
        """
        C{/index.html} is the same landing page.
        """
        self.assertEqual(self.call("GET", "/index.html")[1], self.call("GET", "/")[1])

    def test_live_counts(self) -> None:
        """
        The landing page shows the devices online and the crews with a
        member online as they are when it is served (its text needs no
        script), and links to C{/crew}.
        """
        self.device(DEVICE, crew_code="ALPHA")
        self.device(OTHER_DEVICE, crew_code="ALPHA")
        gone = self.device("leeloo_cccccccccccc", crew_code="BETA")
        gone.close()
        response, body = self.call("GET", "/")
        page = body.decode("utf-8")
        self.assertRegex(page, r'id="devices-online"[^>]*>2<')
        self.assertRegex(page, r'id="crews-online"[^>]*>1<')
        self.assertIn('href="/crew"', page)
        self.assertEqual(response.headers.getRawHeaders(b"cache-control"), [b"no-store"])

    def test_shared_stylesheet_and_no_inline_code(self) -> None:
        """
        The pages use the relay's own stylesheet and scripts, with no inline
        style or script (the CSP allows neither).
        """
        for path in ("/", "/crew"):
            page = self.call("GET", path)[1].decode("utf-8")
            self.assertIn('<link rel="stylesheet" href="/static/leeloo.css">', page)
            self.assertNotIn("<style", page)
            self.assertNotIn(" style=", page)
            self.assertNotRegex(page, r"<script(?![^>]*\bsrc=)")
            self.assertNotRegex(page, r" on[a-z]+=")


class CrewPageTests(SiteTestMixin, SynchronousTestCase):
    def test_page(self) -> None:
        """
        C{/crew} and C{/crew?code=CODE} are the crew page, which runs
        C{/static/crew.js}.
        """
        response, body = self.call("GET", "/crew")
        self.assertEqual((response.code, self.content_type(response)), (200, "text/html; charset=utf-8"))
        self.assertIn(b'<script src="/static/crew.js" defer></script>', body)
        self.assertEqual(self.call("GET", "/crew", params={"code": "LEELOO-7X3K"})[1], body)
        self.assertEqual(self.call("GET", "/crew/")[1], body)

    def test_code_is_not_echoed(self) -> None:
        """
        The page is the same whatever the address carries: a crew code is
        read by the script, never written into the markup.
        """
        _, body = self.call("GET", "/crew", params={"code": "<script>alert(1)</script>"})
        self.assertNotIn(b"alert(1)", body)

    def test_below_is_not_found(self) -> None:
        """
        Paths below C{/crew} are the site's 404.
        """
        self.assertEqual(self.call("GET", "/crew/x")[0].code, 404)


class StaticTests(SiteTestMixin, SynchronousTestCase):
    def test_files(self) -> None:
        """
        The stylesheet, scripts and icon are served from the package with
        their content types, revalidated by ETag.
        """
        root = Path(leeloo.__file__).parent / "static"
        for name, content_type in (("leeloo.css", "text/css; charset=utf-8"),
                                   ("crew.js", "text/javascript; charset=utf-8"),
                                   ("landing.js", "text/javascript; charset=utf-8"),
                                   ("icon.svg", "image/svg+xml")):
            response, body = self.call("GET", "/static/" + name)
            self.assertEqual((response.code, self.content_type(response)), (200, content_type))
            self.assertEqual(body, (root / name).read_bytes())
            self.assertEqual(response.headers.getRawHeaders(b"cache-control"), [b"no-cache"])

    def test_etag(self) -> None:
        """
        A request with the file's ETag is answered 304 without a body.
        """
        response, _ = self.call("GET", "/static/leeloo.css")
        [etag] = response.headers.getRawHeaders(b"etag")
        again, body = self.call("GET", "/static/leeloo.css", headers={b"if-none-match": [etag]})
        self.assertEqual((again.code, body), (304, b""))

    def test_nothing_else(self) -> None:
        """
        Only the named files are served: anything else under C{/static/},
        a listing, or a way out of the folder is a 404.
        """
        for path in ("/static/", "/static/nope.js", "/static/../web.py", "/static/%2e%2e/web.py",
                     "/static/leeloo.css/x", "/static/__init__.py"):
            self.assertEqual(self.call("GET", path)[0].code, 404, path)

    def test_every_file_is_package_data(self) -> None:
        """
        Every file in leeloo/static is served (so none is forgotten), and
        setup.cfg ships the folder as package data.
        """
        root = Path(leeloo.__file__).parent / "static"
        self.assertEqual(sorted(p.name for p in root.iterdir() if p.is_file()), sorted(STATIC_FILES))
        setup = (Path(leeloo.__file__).parent.parent / "setup.cfg").read_text()
        self.assertRegex(setup, r"\[options.package_data\]\nleeloo = static/\*")


# ----------------------------------------------------------------- health


class HealthTests(SiteTestMixin, SynchronousTestCase):
    def health(self) -> dict:
        response, body = self.call("GET", "/health")
        self.assertEqual(response.code, 200)
        self.assertEqual(self.content_type(response), "application/json")
        return json.loads(body)

    def test_fields(self) -> None:
        """
        C{/health} of a fresh relay is status ok, no devices, no crews, no
        uptime.
        """
        body = self.health()
        self.assertEqual(
            {k: body[k] for k in ("status", "devices", "crews", "crews_online", "uptime")},
            {"status": "ok", "devices": 0, "crews": 0, "crews_online": 0, "uptime": 0},
        )

    def test_crews_online(self) -> None:
        """
        C{crews_online} counts the crews with a member connected now.
        """
        self.device(DEVICE, crew_code="ALPHA")
        gone = self.device(OTHER_DEVICE, crew_code="BETA")
        self.relay.bot_create_crew("42", "Ann")
        gone.close()
        body = self.health()
        self.assertEqual((body["crews"], body["crews_online"]), (3, 1))

    def test_devices_connected_now(self) -> None:
        """
        C{devices} counts devices connected now: one that disconnected no
        longer counts.
        """
        self.device(DEVICE)
        leaving = self.device(OTHER_DEVICE)
        self.assertEqual(self.health()["devices"], 2)
        leaving.close()
        self.assertEqual(self.health()["devices"], 1)

    def test_crews_known(self) -> None:
        """
        C{crews} counts every crew the relay knows, from devices and from
        the bot, including crews with nobody online.
        """
        device = self.device(DEVICE, crew_code="ALPHA")
        self.relay.bot_create_crew("42", "Ann")
        device.close()
        self.assertEqual(self.health()["crews"], 2)

    def test_version(self) -> None:
        """
        C{version} is the relay's version, as C{twistd leeloo --version} says.
        """
        self.assertEqual(self.health()["version"], __version__)

    def test_uptime_follows_clock(self) -> None:
        """
        C{uptime} is the whole seconds since the relay started, by its clock.
        """
        self.clock.advance(90.7)
        self.assertEqual(self.health()["uptime"], 90)


# ---------------------------------------------------------------- bot API


class BotAPIMixin(SiteTestMixin):
    def api(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        raw: bytes | None = None,
        content_type: str | None = "application/json",
        secret: str | None = SECRET,
        params: dict | None = None,
    ) -> tuple[int, Any]:
        """
        Call the bot API; check the answer is JSON (never a traceback) and
        return its status and decoded body.
        """
        headers = {}
        if secret is not None:
            headers["X-Api-Secret"] = secret
        if content_type is not None:
            headers["Content-Type"] = content_type
        if raw is None and body is not None:
            raw = json.dumps(body).encode("utf-8")
        response, data = self.call(
            method, "/api/telegram/" + path, data=raw, headers=headers, params=params
        )
        self.assertEqual(self.content_type(response), "application/json", data)
        self.assertNotIn(b"Traceback", data)
        return response.code, json.loads(data)

    def create(self, user: Any = "42", name: str = "Ann") -> str:
        status, body = self.api(
            "POST", "crew/create", {"telegram_user_id": user, "display_name": name}
        )
        self.assertEqual(status, 200, body)
        return body["crew_code"]

    def join(self, code: str, user: Any = "42", name: str = "Ann") -> tuple[int, Any]:
        return self.api(
            "POST",
            "crew/join",
            {"telegram_user_id": user, "crew_code": code, "display_name": name},
        )

    def message(self, code: str, user: Any = "42", **fields: Any) -> tuple[int, Any]:
        body = {
            "telegram_user_id": user,
            "crew_code": code,
            "sender_name": "Ann",
            "msg_type": "text",
            "payload": {"text": "hi"},
        }
        body.update(fields)
        return self.api("POST", "message", body)

    def status(self, code: str) -> tuple[int, Any]:
        return self.api("GET", "crew/status", params={"crew_code": code}, content_type=None)


class BotCrewTests(BotAPIMixin, SynchronousTestCase):
    def test_create(self) -> None:
        """
        C{crew/create} answers only a new generated crew code.
        """
        status, body = self.api(
            "POST", "crew/create", {"telegram_user_id": "42", "display_name": "Ann"}
        )
        self.assertEqual(status, 200)
        self.assertEqual(list(body), ["crew_code"])
        self.assertRegex(body["crew_code"], GENERATED_CREW_CODE)
        self.assertIn(body["crew_code"], self.relay.crews)

    def test_create_puts_user_in_crew(self) -> None:
        """
        The bot user who created a crew is in it: its status lists the user
        and the user may message it without joining.
        """
        code = self.create("42", "Ann")
        _, status = self.status(code)
        self.assertEqual((status["telegram_users"], status["telegram_user_names"]), (1, ["Ann"]))
        self.assertEqual(self.message(code, "42")[0], 200)

    def test_create_distinct_codes(self) -> None:
        """
        Each C{crew/create} makes a different crew.
        """
        self.assertNotEqual(self.create("42"), self.create("42"))

    def test_join(self) -> None:
        """
        C{crew/join} of an existing crew answers success, the crew code and
        how many devices are online in it.
        """
        self.device(DEVICE, crew_code="ALPHA")
        self.device(OTHER_DEVICE, crew_code="ALPHA")
        self.assertEqual(
            self.join("ALPHA"),
            (200, {"success": True, "crew_code": "ALPHA", "devices_online": 2}),
        )

    def test_join_adds_user(self) -> None:
        """
        After C{crew/join} the crew's status lists the bot user.
        """
        self.device(DEVICE, crew_code="ALPHA")
        self.join("ALPHA", "77", "Bob")
        self.assertEqual(self.status("ALPHA")[1]["telegram_user_names"], ["Bob"])

    def test_join_unknown_crew(self) -> None:
        """
        Joining a crew that does not exist is 404 C{crew_not_found} with a
        message naming the crew, and creates nothing.
        """
        status, body = self.join("NOPE")
        self.assertEqual(status, 404)
        self.assertEqual(body["error"], "crew_not_found")
        self.assertIn("NOPE", body["message"])
        self.assertNotIn("NOPE", self.relay.crews)

    def test_join_lowercase_code(self) -> None:
        """
        A lower-case crew code joins the upper-case crew and is answered
        upper-cased.
        """
        self.device(DEVICE, crew_code="ALPHA")
        status, body = self.join("alpha")
        self.assertEqual((status, body["crew_code"]), (200, "ALPHA"))

    def test_status(self) -> None:
        """
        C{crew/status} answers exactly the crew code, that it exists, the
        online devices' count and names and the bot users' count and names.
        """
        self.device(DEVICE, crew_code="ALPHA", name="Kitchen")
        self.device(OTHER_DEVICE, crew_code="ALPHA", name="Desk")
        self.join("ALPHA", "42", "Ann")
        status, body = self.status("ALPHA")
        self.assertEqual(status, 200)
        self.assertEqual(
            body,
            {
                "crew_code": "ALPHA",
                "exists": True,
                "devices_online": 2,
                "device_names": ["Kitchen", "Desk"],
                "telegram_users": 1,
                "telegram_user_names": ["Ann"],
            },
        )

    def test_status_unknown_crew(self) -> None:
        """
        The status of a crew that does not exist says so, with zero counts
        and empty lists.
        """
        self.assertEqual(
            self.status("NOPE"),
            (
                200,
                {
                    "crew_code": "NOPE",
                    "exists": False,
                    "devices_online": 0,
                    "device_names": [],
                    "telegram_users": 0,
                    "telegram_user_names": [],
                },
            ),
        )

    def test_status_lowercase_code(self) -> None:
        """
        A lower-case crew code in C{crew/status} finds the upper-case crew.
        """
        self.device(DEVICE, crew_code="ALPHA")
        _, body = self.status("alpha")
        self.assertEqual((body["crew_code"], body["exists"]), ("ALPHA", True))

    def test_status_without_code(self) -> None:
        """
        C{crew/status} without C{crew_code} is 400 C{crew_code required}.
        """
        self.assertEqual(
            self.api("GET", "crew/status", content_type=None),
            (400, {"error": "crew_code required"}),
        )

    def test_integer_user_id(self) -> None:
        """
        An integer C{telegram_user_id} (as Telegram sends it) names the same
        user as its decimal string.
        """
        code = self.create(4242)
        self.assertEqual(self.message(code, "4242")[0], 200)
        self.device(DEVICE, crew_code="ALPHA")
        self.join("ALPHA", 77)
        self.assertEqual(self.message("ALPHA", "77")[0], 200)


class BotMessageTests(BotAPIMixin, SynchronousTestCase):
    def test_devices_receive(self) -> None:
        """
        A bot message reaches every online device of the crew as a
        C{message} from device C{telegram} with the sender's name, the
        msg_type and payload unchanged and the relay's time in ms.
        """
        first = self.device(DEVICE, crew_code="ALPHA")
        second = self.device(OTHER_DEVICE, crew_code="ALPHA")
        self.join("ALPHA")
        self.clock.advance(1.5)
        payload = {"artist": "A", "track": "T", "album": "L", "spotify_uri": "spotify:track:x",
                   "album_art_url": None, "note": "listen"}
        self.message("ALPHA", sender_name="Ann", msg_type="song_push", payload=payload)
        expected = {
            "type": "message",
            "from_device": "telegram",
            "from_name": "Ann",
            "msg_type": "song_push",
            "payload": payload,
            "timestamp": int((START + 1.5) * 1000),
            "seq": 1,
            "crew_code": "ALPHA",
        }
        received = first.take()
        self.assertEqual(second.take(), received)
        [message] = received
        self.assertIsInstance(message.pop("id"), str)
        self.assertEqual(message, expected)

    def test_devices_reached(self) -> None:
        """
        The answer is success with the number of devices the message
        reached.
        """
        self.device(DEVICE, crew_code="ALPHA")
        self.device(OTHER_DEVICE, crew_code="ALPHA")
        self.join("ALPHA")
        self.assertEqual(self.message("ALPHA"), (200, {"success": True, "devices_reached": 2}))

    def test_no_device_online(self) -> None:
        """
        A message to a crew with nobody online reaches no device.
        """
        code = self.create()
        self.assertEqual(self.message(code), (200, {"success": True, "devices_reached": 0}))

    def test_other_crews_untouched(self) -> None:
        """
        Devices of other crews do not receive the message.
        """
        self.device(DEVICE, crew_code="ALPHA")
        outsider = self.device(OTHER_DEVICE, crew_code="BRAVO")
        self.join("ALPHA")
        self.message("ALPHA")
        self.assertEqual(outsider.take(), [])

    def test_not_in_crew(self) -> None:
        """
        A user who has not joined the crew is refused 403 C{not_in_crew}
        and no device receives anything.
        """
        member = self.device(DEVICE, crew_code="ALPHA")
        status, body = self.message("ALPHA", "99")
        self.assertEqual((status, body["error"]), (403, "not_in_crew"))
        self.assertEqual(member.take(), [])

    def test_unknown_crew(self) -> None:
        """
        A message to a crew that does not exist is 404 C{crew_not_found}.
        """
        status, body = self.message("NOPE")
        self.assertEqual((status, body["error"]), (404, "crew_not_found"))

    def test_lowercase_code(self) -> None:
        """
        A lower-case crew code reaches the upper-case crew.
        """
        member = self.device(DEVICE, crew_code="ALPHA")
        self.join("ALPHA")
        self.assertEqual(self.message("alpha")[1]["devices_reached"], 1)
        self.assertEqual(len(member.take()), 1)


class BotCrewCodeTests(BotAPIMixin, SynchronousTestCase):
    def test_codes_devices_use(self) -> None:
        """
        The bot API reads crew codes as the devices' rule does: a code with
        spaces, dots or non-ASCII letters, in any case, finds the crew a
        device made, on join, message and status.
        """
        self.device(DEVICE, crew_code=" café.b8 27 ")
        status, body = self.join("Café.B8 27")
        self.assertEqual((status, body["crew_code"]), (200, "CAFÉ.B8 27"))
        status, body = self.api("POST", "message", {"telegram_user_id": "42", "crew_code": "café.b8 27",
                                                    "sender_name": "Ann", "payload": {"text": "hi"}})
        self.assertEqual((status, body["devices_reached"]), (200, 1))
        status, body = self.api("GET", "crew/status", params={"crew_code": " café.b8 27"})
        self.assertEqual((status, body["crew_code"], body["exists"]), (200, "CAFÉ.B8 27", True))

    def test_codes_refused(self) -> None:
        """
        A code over 64 code points, with a control character or of
        whitespace only is 400 C{invalid_crew_code} with a message naming
        the rule, on join, message and status.
        """
        for code, rule in (("x" * 65, "64"), ("a\x1bb", "control"), (" \t ", "whitespace")):
            answers = [
                self.join(code),
                self.api("POST", "message", {"telegram_user_id": "42", "crew_code": code,
                                             "sender_name": "Ann"}),
                self.api("GET", "crew/status", params={"crew_code": code}),
            ]
            for status, body in answers:
                self.assertEqual((status, body["error"]), (400, "invalid_crew_code"), code)
                self.assertIn(rule, body["message"])
        self.assertEqual(self.relay.crews, {})


class BotUserCrewsTests(BotAPIMixin, SynchronousTestCase):
    def crews(self, user: str, **kwargs: Any) -> tuple[int, Any]:
        return self.api("GET", "user/crews", params={"telegram_user_id": user}, **kwargs)

    def test_lists_crews(self) -> None:
        """
        C{GET user/crews} lists the user's crews with its name in each and
        the devices online, and echoes the id as the string it was given.
        """
        self.device(DEVICE, crew_code="HOME")
        self.join("home", user=42, name="Tina")
        code = self.create(user="42", name="T.")
        self.assertEqual(self.crews("42"), (200, {"telegram_user_id": "42", "crews": [
            {"crew_code": "HOME", "display_name": "Tina", "devices_online": 1},
            {"crew_code": code, "display_name": "T.", "devices_online": 0},
        ]}))

    def test_unknown_user(self) -> None:
        """
        An unknown user has an empty list.
        """
        self.assertEqual(self.crews("0042"), (200, {"telegram_user_id": "0042", "crews": []}))

    def test_required(self) -> None:
        """
        Without C{telegram_user_id} it is 400.
        """
        for params in ({}, {"telegram_user_id": ""}, {"telegram_user_id": "  "}):
            status, body = self.api("GET", "user/crews", params=params)
            self.assertEqual((status, body), (400, {"error": "telegram_user_id required"}))

    def test_needs_secret(self) -> None:
        """
        It takes the same secret as the other calls.
        """
        self.create(user="42")
        self.assertEqual(self.crews("42", secret="wrong"), (401, {"error": "unauthorized"}))

    def test_get_only(self) -> None:
        """
        It is a GET.
        """
        status, body = self.api("POST", "user/crews", {"telegram_user_id": "42"})
        self.assertEqual((status, body["error"]), (405, "method_not_allowed"))


class BotAuthTests(BotAPIMixin, SynchronousTestCase):
    def test_wrong_secret(self) -> None:
        """
        A wrong secret (even a prefix of the right one) is 401
        C{{"error": "unauthorized"}} and does nothing.
        """
        for wrong in ("other-secret", SECRET[:-1], SECRET + "x", SECRET.upper()):
            status, body = self.api(
                "POST", "crew/create", {"telegram_user_id": "42", "display_name": "Ann"},
                secret=wrong,
            )
            self.assertEqual((status, body), (401, {"error": "unauthorized"}), wrong)
        self.assertEqual(self.relay.crews, {})

    def test_missing_secret(self) -> None:
        """
        A call without C{X-Api-Secret} is 401 C{unauthorized}.
        """
        status, body = self.api(
            "POST", "crew/create", {"telegram_user_id": "42", "display_name": "Ann"}, secret=None
        )
        self.assertEqual((status, body), (401, {"error": "unauthorized"}))
        self.assertEqual(self.relay.crews, {})

    def test_status_needs_secret(self) -> None:
        """
        C{crew/status} is behind the secret too.
        """
        self.device(DEVICE, crew_code="ALPHA")
        status, body = self.api(
            "GET", "crew/status", params={"crew_code": "ALPHA"}, content_type=None, secret="nope"
        )
        self.assertEqual((status, body), (401, {"error": "unauthorized"}))

    def test_secret_before_body(self) -> None:
        """
        The secret is checked before the body is read: a wrong secret with a
        malformed body is 401, not 400.
        """
        status, _ = self.api("POST", "crew/create", raw=b"{not json", secret="nope")
        self.assertEqual(status, 401)


class BotDisabledTests(BotAPIMixin, SynchronousTestCase):
    secret = None

    def test_disabled(self) -> None:
        """
        Without a configured secret the bot API is 503 C{bot_api_disabled},
        whatever secret the caller sends.
        """
        for given in (None, "", SECRET):
            status, body = self.api(
                "POST", "crew/create", {"telegram_user_id": "42", "display_name": "Ann"},
                secret=given,
            )
            self.assertEqual((status, body["error"]), (503, "bot_api_disabled"), given)
        self.assertEqual(self.relay.crews, {})


class BotEmptySecretTests(BotAPIMixin, SynchronousTestCase):
    secret = ""

    def test_empty_secret_disables(self) -> None:
        """
        An empty configured secret disables the bot API rather than letting
        an empty header in.
        """
        status, body = self.api(
            "POST", "crew/create", {"telegram_user_id": "42", "display_name": "Ann"}, secret=""
        )
        self.assertEqual((status, body["error"]), (503, "bot_api_disabled"))


class BotInputTests(BotAPIMixin, SynchronousTestCase):
    def test_malformed_json(self) -> None:
        """
        A body that is not JSON is 400 C{invalid_json}.
        """
        status, body = self.api("POST", "crew/create", raw=b'{"telegram_user_id": ')
        self.assertEqual((status, body["error"]), (400, "invalid_json"))

    def test_not_utf8(self) -> None:
        """
        A body that is not UTF-8 is 400 C{invalid_json}.
        """
        status, body = self.api("POST", "crew/create", raw=b'{"display_name": "\xff"}')
        self.assertEqual((status, body["error"]), (400, "invalid_json"))

    def test_wrong_content_type(self) -> None:
        """
        A body that is not sent as C{application/json} is 400
        C{invalid_content_type}, even when it is JSON, and does nothing.
        """
        status, body = self.api(
            "POST", "crew/create", {"telegram_user_id": "42", "display_name": "Ann"},
            content_type="text/plain",
        )
        self.assertEqual((status, body["error"]), (400, "invalid_content_type"))
        self.assertEqual(self.relay.crews, {})

    def test_missing_content_type(self) -> None:
        """
        A body without a content type is 400 C{invalid_content_type}.
        """
        status, body = self.api(
            "POST", "crew/create", {"telegram_user_id": "42", "display_name": "Ann"},
            content_type=None,
        )
        self.assertEqual((status, body["error"]), (400, "invalid_content_type"))

    def test_content_type_parameters(self) -> None:
        """
        C{application/json} with a charset parameter, in any case, is JSON.
        """
        status, _ = self.api(
            "POST", "crew/create", {"telegram_user_id": "42", "display_name": "Ann"},
            content_type="Application/JSON; charset=utf-8",
        )
        self.assertEqual(status, 200)

    def test_not_an_object(self) -> None:
        """
        A JSON body that is not an object is 400 C{invalid_body}.
        """
        for body in ([], ["42", "Ann"], "42", 42, None):
            status, answer = self.api("POST", "crew/create", raw=json.dumps(body).encode())
            self.assertEqual((status, answer["error"]), (400, "invalid_body"), body)

    def test_too_large(self) -> None:
        """
        A body over 64 KiB is 413 C{body_too_large}.
        """
        raw = json.dumps({"telegram_user_id": "42", "display_name": "x" * 70_000}).encode()
        status, body = self.api("POST", "crew/create", raw=raw)
        self.assertEqual((status, body["error"]), (413, "body_too_large"))

    def assertRequired(self, path: str, complete: dict) -> None:
        for name in complete:
            # A whitespace-only crew code is a refused code, not a missing one.
            blanks = ({name: "   "},) if name != "crew_code" else ()
            for missing in ({}, {name: None}, {name: ""}, *blanks):
                body = {k: v for k, v in complete.items() if k != name}
                body.update(missing)
                self.assertEqual(
                    self.api("POST", path, body), (400, {"error": f"{name} required"}), body
                )

    def test_create_required(self) -> None:
        """
        C{crew/create} without (or with an empty) C{telegram_user_id} or
        C{display_name} is 400 C{"<field> required"}.
        """
        self.assertRequired("crew/create", {"telegram_user_id": "42", "display_name": "Ann"})
        self.assertEqual(self.relay.crews, {})

    def test_join_required(self) -> None:
        """
        C{crew/join} without C{telegram_user_id}, C{crew_code} or
        C{display_name} is 400 C{"<field> required"}.
        """
        self.device(DEVICE, crew_code="ALPHA")
        self.assertRequired(
            "crew/join", {"telegram_user_id": "42", "crew_code": "ALPHA", "display_name": "Ann"}
        )
        self.assertEqual(self.relay.crews["ALPHA"].bot_users, {})

    def test_message_required(self) -> None:
        """
        C{message} without C{telegram_user_id}, C{crew_code} or
        C{sender_name} is 400 C{"<field> required"} and reaches nobody.
        """
        member = self.device(DEVICE, crew_code="ALPHA")
        self.join("ALPHA", "42")
        self.assertRequired(
            "message", {"telegram_user_id": "42", "crew_code": "ALPHA", "sender_name": "Ann"}
        )
        self.assertEqual(member.take(), [])

    def test_wrong_types(self) -> None:
        """
        A field of the wrong type is 400 with an error naming the field.
        """
        self.device(DEVICE, crew_code="ALPHA")
        self.join("ALPHA", "42")
        cases = [
            ("crew/create", {"telegram_user_id": "42", "display_name": 7}, "display_name"),
            ("crew/create", {"telegram_user_id": True, "display_name": "Ann"}, "telegram_user_id"),
            ("crew/create", {"telegram_user_id": ["42"], "display_name": "Ann"}, "telegram_user_id"),
            ("crew/create", {"telegram_user_id": 4.2, "display_name": "Ann"}, "telegram_user_id"),
            ("crew/join", {"telegram_user_id": "42", "crew_code": ["ALPHA"], "display_name": "Ann"},
             "crew_code"),
            ("message", {"telegram_user_id": "42", "crew_code": "ALPHA", "sender_name": {}},
             "sender_name"),
            ("message", {"telegram_user_id": "42", "crew_code": "ALPHA", "sender_name": "Ann",
                         "msg_type": 3}, "msg_type"),
            ("message", {"telegram_user_id": "42", "crew_code": "ALPHA", "sender_name": "Ann",
                         "payload": "hi"}, "payload"),
            ("message", {"telegram_user_id": "42", "crew_code": "ALPHA", "sender_name": "Ann",
                         "payload": ["hi"]}, "payload"),
        ]
        for path, body, field in cases:
            status, answer = self.api("POST", path, body)
            self.assertEqual(status, 400, body)
            self.assertTrue(answer["error"].startswith(field + " "), answer)
        self.assertEqual(list(self.relay.crews), ["ALPHA"])

    def test_invalid_crew_code(self) -> None:
        """
        A crew code the devices' rule refuses (a control character) is 400
        C{invalid_crew_code}, not a lookup.
        """
        status, body = self.join("bad\x07code")
        self.assertEqual((status, body["error"]), (400, "invalid_crew_code"))
        self.assertIn("control", body["message"])

    def test_unknown_path(self) -> None:
        """
        An unknown bot API path is 404 JSON C{not_found}.
        """
        status, body = self.api("POST", "crew/delete", {})
        self.assertEqual((status, body["error"]), (404, "not_found"))

    def test_wrong_method(self) -> None:
        """
        A known path with the wrong method is 405 JSON naming the allowed
        method in C{Allow}.
        """
        for method, path, allowed in (
            ("GET", "crew/create", b"POST"),
            ("GET", "message", b"POST"),
            ("POST", "crew/status", b"GET"),
        ):
            response, body = self.call(
                method, "/api/telegram/" + path, headers={"X-Api-Secret": SECRET}
            )
            self.assertEqual(response.code, 405, path)
            self.assertEqual(self.content_type(response), "application/json")
            self.assertEqual(json.loads(body)["error"], "method_not_allowed")
            self.assertEqual(response.headers.getRawHeaders(b"allow"), [allowed])


class FailingRelay(Relay):
    """
    A relay with a bug in every bot call and in token delivery.
    """

    def bot_create_crew(self, user_id: str, name: str) -> str:
        raise RuntimeError("a bug with a secret detail")

    def deliver_tokens(self, device_id: str, tokens: dict) -> bool:
        raise RuntimeError("a bug with a secret detail")


class BotInternalErrorTests(BotAPIMixin, SynchronousTestCase):
    def make_relay(self) -> Relay:
        return FailingRelay(self.clock)

    def test_bug_is_json_500(self) -> None:
        """
        A bug behind the bot API is answered 500 JSON C{internal_error}
        that tells nothing about it, and is logged.
        """
        status, body = self.api(
            "POST", "crew/create", {"telegram_user_id": "42", "display_name": "Ann"}
        )
        self.assertEqual((status, body), (500, {"error": "internal_error"}))
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)


class BotFieldAnswerTests(BotAPIMixin, SynchronousTestCase):
    """
    The exact answers to refused fields (the devices' validators, in the
    bot API's words), and what the bot API cuts rather than refuses.
    """

    def test_refused_fields_exactly(self) -> None:
        """
        A wrong type or an overlong field is 400 C{{"error": "<field>
        <problem>"}} with no message.
        """
        self.device(DEVICE, crew_code="ALPHA")
        self.join("ALPHA", "42")
        cases = [
            ({"display_name": 7}, "display_name must be a string"),
            ({"display_name": "x" * 1025}, "display_name too long"),
            ({"telegram_user_id": True}, "telegram_user_id must be a string or an integer"),
            ({"telegram_user_id": 4.2}, "telegram_user_id must be a string"),
            ({"crew_code": ["ALPHA"]}, "crew_code must be a string"),
        ]
        for fields, error in cases:
            body = {"telegram_user_id": "42", "crew_code": "ALPHA", "display_name": "Ann", **fields}
            self.assertEqual(self.api("POST", "crew/join", body), (400, {"error": error}), fields)
        for fields, error in [({"payload": "hi"}, "payload must be an object"),
                              ({"msg_type": None}, "msg_type required"),
                              ({"msg_type": 3}, "msg_type must be a string")]:
            self.assertEqual(self.message("ALPHA", **fields), (400, {"error": error}), fields)

    def test_long_names_are_cut(self) -> None:
        """
        A name or user id over the frame limit (64) but within 1024 is cut
        to 64, not refused (a device frame would be refused).
        """
        self.device(DEVICE, crew_code="ALPHA")
        status, body = self.join("ALPHA", "4" * 100, "N" * 100)
        self.assertEqual((status, body["success"]), (200, True))
        self.assertEqual(self.relay.crews["ALPHA"].bot_users, {"4" * 64: "N" * 64})


class ErrorRelay(Relay):
    """
    A relay whose bot calls raise the error the test sets.
    """

    error: Exception | None = None

    def bot_join_crew(self, user_id: str, code: str, name: str) -> Any:
        raise self.error


class BotProtocolErrorTests(BotAPIMixin, SynchronousTestCase):
    """
    An error from the core is answered by its own HTTP attributes.
    """

    def make_relay(self) -> Relay:
        return ErrorRelay(self.clock)

    def answer(self, error: Exception) -> tuple[int, Any, Any]:
        self.relay.error = error
        response, data = self.call("POST", "/api/telegram/crew/join", headers={
            "X-Api-Secret": SECRET, "Content-Type": "application/json"},
            data=json.dumps({"telegram_user_id": "42", "crew_code": "ALPHA", "display_name": "Ann"}).encode())
        return response.code, json.loads(data), response.headers.getRawHeaders(b"retry-after")

    def test_each_error(self) -> None:
        """
        429 with retry_after (body and header), 503 for store_unavailable
        and crew_limit, 404 crew_not_found, 403 not_in_crew, 400 and the
        code otherwise; the error's other fields stay out.
        """
        rows = [
            (messages.RateLimited("slow down", 2.5), 429,
             {"error": "rate_limited", "message": "slow down", "retry_after": 3}, [b"3"]),
            (messages.StoreUnavailable("not stored", client_msg_id="c1"), 503,
             {"error": "store_unavailable", "message": "not stored"}, None),
            (messages.CrewLimit("full"), 503, {"error": "crew_limit", "message": "full"}, None),
            (messages.InvalidCrewCode("Crew ALPHA not found"), 404,
             {"error": "crew_not_found", "message": "Crew ALPHA not found"}, None),
            (messages.NotInCrew("join first"), 403, {"error": "not_in_crew", "message": "join first"}, None),
            (messages.DeviceAuthFailed("no"), 400, {"error": "device_auth_failed", "message": "no"}, None),
        ]
        for error, status, body, retry in rows:
            self.assertEqual(self.answer(error), (status, body, retry), error)


# ---------------------------------------------------------------- Spotify


class SpotifyCallbackMixin(SiteTestMixin):
    def make_spotify(self) -> SpotifyOAuth | None:
        self.accounts = FakeSpotifyAccounts(CLIENT_ID, CLIENT_SECRET, REDIRECT_URI)
        self.accounts.issue(CODE, ACCESS_TOKEN, REFRESH_TOKEN, expires_in=3600)
        config = SpotifyConfig(
            CLIENT_ID, CLIENT_SECRET, REDIRECT_URI, accounts_url="http://accounts.test"
        )
        return SpotifyOAuth(config, http=StubTreq(self.accounts), clock=self.clock)

    def callback(self, **params: str) -> tuple[int, bytes]:
        """
        The phone's request to the callback; return the status and page,
        checking it is HTML.
        """
        response, body = self.call("GET", "/spotify/callback", params=params)
        self.assertEqual(self.content_type(response), "text/html; charset=utf-8")
        self.assertTrue(body.startswith(b"<!DOCTYPE html>"))
        return response.code, body

    def assertNoSecrets(self, page: bytes) -> None:
        for value in (CODE, ACCESS_TOKEN, REFRESH_TOKEN, CLIENT_SECRET):
            self.assertNotIn(value.encode(), page)


class SpotifyCallbackTests(SpotifyCallbackMixin, SynchronousTestCase):
    def test_online_device_receives_tokens(self) -> None:
        """
        A device online when the callback arrives receives the tokens at
        once in C{spotify_auth_complete}.
        """
        device = self.device(DEVICE)
        self.callback(code=CODE, state=DEVICE)
        self.assertEqual(device.take(), [{"type": "spotify_auth_complete", "tokens": TOKENS}])

    def test_phone_page(self) -> None:
        """
        The phone sees a 200 HTML page saying Spotify is connected.
        """
        self.device(DEVICE)
        status, page = self.callback(code=CODE, state=DEVICE)
        self.assertEqual(status, 200)
        self.assertIn(b"Spotify is connected", page)

    def test_token_request(self) -> None:
        """
        The callback exchanges the code at the token endpoint with exactly
        the contract's form fields and the app's Basic auth.
        """
        self.callback(code=CODE, state=DEVICE)
        self.assertEqual(
            self.accounts.received,
            [
                {
                    "authorization": "Basic "
                    + base64.b64encode(f"{CLIENT_ID}:{CLIENT_SECRET}".encode()).decode(),
                    "content_type": "application/x-www-form-urlencoded",
                    "form": {
                        "grant_type": "authorization_code",
                        "code": CODE,
                        "redirect_uri": REDIRECT_URI,
                    },
                }
            ],
        )

    def test_head_does_not_spend_the_code(self) -> None:
        """
        A HEAD request (a link checker, a preview) is answered 405 with
        Allow: GET and leaves the code unspent for the phone's GET.
        """
        device = self.device(DEVICE)
        response, body = self.call("HEAD", "/spotify/callback", params={"code": CODE, "state": DEVICE})
        self.assertEqual(response.code, 405)
        self.assertEqual(response.headers.getRawHeaders(b"allow"), [b"GET"])
        self.assertEqual(body, b"")
        self.assertEqual(self.accounts.received, [])
        self.assertEqual(device.take(), [])
        status, _ = self.callback(code=CODE, state=DEVICE)
        self.assertEqual(status, 200)
        self.assertEqual(device.take(), [{"type": "spotify_auth_complete", "tokens": TOKENS}])

    def test_other_devices_get_nothing(self) -> None:
        """
        Only the device named by C{state} receives the tokens, even in the
        same crew.
        """
        self.device(DEVICE, crew_code="ALPHA")
        other = self.device(OTHER_DEVICE, crew_code="ALPHA")
        self.callback(code=CODE, state=DEVICE)
        self.assertEqual(other.take(), [])

    def test_offline_then_register(self) -> None:
        """
        A device offline at the callback receives the tokens right after
        its C{registered} when it registers later.
        """
        status, _ = self.callback(code=CODE, state=DEVICE)
        self.assertEqual(status, 200)
        device = Device(self.relay)
        device.send(type="register", device_id=DEVICE)
        self.assertEqual(
            strip_keys(device.take()),
            [
                {"type": "registered", "device_id": DEVICE},
                {"type": "spotify_auth_complete", "tokens": TOKENS},
            ],
        )

    def test_offline_then_create_crew(self) -> None:
        """
        A device offline at the callback receives the tokens when it next
        creates a crew.
        """
        self.callback(code=CODE, state=DEVICE)
        device = Device(self.relay)
        device.send(type="create_crew", device_id=DEVICE)
        self.assertIn({"type": "spotify_auth_complete", "tokens": TOKENS}, device.take())

    def test_offline_then_join_crew(self) -> None:
        """
        A device offline at the callback receives the tokens when it next
        joins a crew.
        """
        self.device(OTHER_DEVICE, crew_code="ALPHA")
        self.callback(code=CODE, state=DEVICE)
        device = Device(self.relay)
        device.send(type="join_crew", device_id=DEVICE, crew_code="ALPHA")
        self.assertIn({"type": "spotify_auth_complete", "tokens": TOKENS}, device.take())

    def test_delivered_once(self) -> None:
        """
        Kept tokens are delivered once: the device's next connection gets
        none.
        """
        self.callback(code=CODE, state=DEVICE)
        first = Device(self.relay)
        first.send(type="register", device_id=DEVICE)
        self.assertIn("spotify_auth_complete", [m["type"] for m in first.take()])
        first.close()
        again = Device(self.relay)
        again.send(type="register", device_id=DEVICE)
        self.assertEqual(strip_keys(again.take()), [{"type": "registered", "device_id": DEVICE}])

    def test_kept_within_the_hour(self) -> None:
        """
        Tokens are still delivered to a device that comes back just within
        the hour.
        """
        self.callback(code=CODE, state=DEVICE)
        self.clock.advance(3599)
        device = Device(self.relay)
        device.send(type="register", device_id=DEVICE)
        self.assertIn({"type": "spotify_auth_complete", "tokens": TOKENS}, device.take())

    def test_forgotten_after_the_hour(self) -> None:
        """
        A device that comes back after the hour receives no tokens.
        """
        self.callback(code=CODE, state=DEVICE)
        self.clock.advance(3601)
        device = Device(self.relay)
        device.send(type="register", device_id=DEVICE)
        self.assertEqual(strip_keys(device.take()), [{"type": "registered", "device_id": DEVICE}])

    def test_invalid_grant(self) -> None:
        """
        A code Spotify refuses shows the phone a 400 page with Spotify's
        description in words, and the device receives nothing.
        """
        device = self.device(DEVICE)
        status, page = self.callback(code="test-unknown-code", state=DEVICE)
        self.assertEqual(status, 400)
        self.assertIn(b"Invalid authorization code", page)
        self.assertNotIn(b"test-unknown-code", page)
        self.assertEqual(device.take(), [])

    def test_spotify_server_error(self) -> None:
        """
        Spotify answering 500 shows the phone a 502 error page, and no token
        is delivered or kept.
        """
        self.accounts.fail_with = 500
        device = self.device(DEVICE)
        status, page = self.callback(code=CODE, state=DEVICE)
        self.assertEqual(status, 502)
        self.assertIn(b"That did not work", page)
        self.assertEqual(device.take(), [])
        self.assertEqual(self.relay.pending_tokens, {})

    def test_spotify_unavailable_json(self) -> None:
        """
        Spotify answering 503 with an OAuth JSON error is a 502 too: the
        failure is upstream, not the phone's.
        """
        self.accounts.fail_with = 503
        self.accounts.fail_body = {
            "error": "temporarily_unavailable",
            "error_description": "Try again later",
        }
        status, page = self.callback(code=CODE, state=DEVICE)
        self.assertEqual(status, 502)
        self.assertIn(b"Try again later", page)

    def test_spotify_refuses_relay_credentials(self) -> None:
        """
        Spotify refusing the relay's own client credentials is a 502: the
        phone did nothing wrong.
        """
        self.accounts.client_secret = "rotated-test-secret"
        status, page = self.callback(code=CODE, state=DEVICE)
        self.assertEqual(status, 502)
        self.assertNoSecrets(page)

    def test_spotify_unusable_answer(self) -> None:
        """
        Spotify accepting the code but answering no usable token is a 502.
        """
        self.accounts.codes[CODE] = {"refresh_token": REFRESH_TOKEN}
        status, _ = self.callback(code=CODE, state=DEVICE)
        self.assertEqual(status, 502)

    def test_access_denied(self) -> None:
        """
        The user declining at Spotify (C{error=access_denied}) gets a
        friendly 200 page, and Spotify is not called.
        """
        status, page = self.callback(error="access_denied", state=DEVICE)
        self.assertEqual(status, 200)
        self.assertIn(b"You chose not to connect Spotify", page)
        self.assertEqual(self.accounts.requests, [])

    def test_other_error(self) -> None:
        """
        Another C{error} from Spotify is a 400 page naming it in words, and
        Spotify is not called.
        """
        status, page = self.callback(error="server_error", state=DEVICE)
        self.assertEqual(status, 400)
        self.assertIn(b"server error", page)
        self.assertEqual(self.accounts.requests, [])

    def test_no_code(self) -> None:
        """
        A callback without C{code} is 400, and Spotify is not called.
        """
        status, _ = self.callback(state=DEVICE)
        self.assertEqual(status, 400)
        self.assertEqual(self.accounts.requests, [])

    def test_no_state(self) -> None:
        """
        A callback without C{state} is 400 and does not spend the code.
        """
        status, _ = self.callback(code=CODE)
        self.assertEqual(status, 400)
        self.assertEqual(self.accounts.requests, [])

    def test_invalid_state(self) -> None:
        """
        A C{state} that cannot be a device id is 400 and does not spend the
        code.
        """
        for state in ("not a device!", "<script>", "x" * 65):
            status, _ = self.callback(code=CODE, state=state)
            self.assertEqual(status, 400, state)
        self.assertEqual(self.accounts.requests, [])

    def test_pages_never_hold_secrets(self) -> None:
        """
        No page the phone sees, on success or failure, holds the code, a
        token or the client secret.
        """
        self.device(DEVICE)
        pages = [self.callback(code=CODE, state=DEVICE)[1]]
        pages.append(self.callback(code=CODE, state=DEVICE)[1])  # spent: invalid_grant
        self.accounts.fail_with = 500
        pages.append(self.callback(code=CODE, state=DEVICE)[1])
        pages.append(self.callback(code=CODE)[1])
        for page in pages:
            self.assertNoSecrets(page)

    def test_logs_never_hold_secrets(self) -> None:
        """
        Nothing the relay logs around a callback holds the code or a token.
        """
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        self.callback(code=CODE, state=DEVICE)
        self.callback(code=CODE, state=DEVICE)
        self.accounts.fail_with = 500
        self.callback(code=CODE, state=DEVICE)
        self.assertTrue(events)
        for event in events:
            text = formatEvent(event) + repr(event)
            for value in (CODE, ACCESS_TOKEN, REFRESH_TOKEN, CLIENT_SECRET):
                self.assertNotIn(value, text)

    def test_error_description_escaped(self) -> None:
        """
        HTML in Spotify's error description is shown escaped, not as markup.
        """
        self.accounts.fail_with = 400
        self.accounts.fail_body = {
            "error": "invalid_grant",
            "error_description": '<script>alert("x")</script>',
        }
        _, page = self.callback(code=CODE, state=DEVICE)
        self.assertNotIn(b"<script>", page)
        self.assertIn(b"&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;", page)

    def test_error_parameter_escaped(self) -> None:
        """
        HTML in the C{error} parameter is shown escaped, not as markup.
        """
        _, page = self.callback(error="<b>bad</b>", state=DEVICE)
        self.assertNotIn(b"<b>bad", page)
        self.assertIn(b"&lt;b&gt;bad&lt;/b&gt;", page)


class SpotifyNotConfiguredTests(SpotifyCallbackMixin, SynchronousTestCase):
    def make_spotify(self) -> SpotifyOAuth | None:
        return None

    def test_not_configured(self) -> None:
        """
        Without Spotify configured the callback is a 503 page.
        """
        status, page = self.callback(code=CODE, state=DEVICE)
        self.assertEqual(status, 503)
        self.assertIn(b"Spotify is not set up", page)


class SpotifyDeliveryBugTests(SpotifyCallbackMixin, SynchronousTestCase):
    def make_relay(self) -> Relay:
        return FailingRelay(self.clock)

    def test_bug_after_exchange_finishes_the_page(self) -> None:
        """
        A bug while handing over the tokens still answers the phone, with a
        502 page, and is logged.
        """
        status, page = self.callback(code=CODE, state=DEVICE)
        self.assertEqual(status, 502)
        self.assertNoSecrets(page)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)


class BotAPIAnswerTests(SynchronousTestCase):
    """
    The bot API's answer once its Deferred fires, on a DummyRequest whose
    client the test makes go away.
    """

    def setUp(self) -> None:
        self.api = BotAPI(Relay(Clock()), SECRET)
        self.waiting: Deferred = Deferred()
        self.patch(self.api, "_routes", {(b"GET", b"crew/status"): lambda request: self.waiting})
        self.request = DummyRequest([b"crew", b"status"])
        self.request.method = b"GET"
        self.request.requestHeaders.setRawHeaders(b"x-api-secret", [SECRET.encode()])

    def test_answer_after_the_client_left_is_dropped(self):
        """
        An answer ready after the client went away (notifyFinish failed) is
        not written, and nothing is raised.
        """
        self.assertEqual(self.api.render(self.request), NOT_DONE_YET)
        self.request.processingFailed(Failure(ConnectionDone()))
        self.waiting.callback({"crew_code": "ALPHA"})
        self.assertEqual((self.request.written, self.request.finished), ([], 0))

    def test_answer_written_while_the_client_waits(self):
        """
        An answer ready while the client waits is written as JSON.
        """
        self.api.render(self.request)
        self.waiting.callback({"crew_code": "ALPHA"})
        self.assertEqual(json.loads(b"".join(self.request.written)), {"crew_code": "ALPHA"})
        self.assertEqual(self.request.finished, 1)

    def test_bug_while_answering_logged(self):
        """
        A bug while writing the answer is logged as a failure and the
        connection dropped, not left unhandled.
        """
        lost = []
        self.request.loseConnection = lambda: lost.append(True)
        self.api.render(self.request)
        self.waiting.callback({"crew_code": object()})  # not JSON
        self.assertEqual(len(self.flushLoggedErrors(TypeError)), 1)
        self.assertEqual(lost, [True])
