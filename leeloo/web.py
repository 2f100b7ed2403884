"""
The HTTP site: the landing page, ``/health``, ``/ws``, the Spotify OAuth
callback and the Telegram bot API, with one JSON error mapping; and the
admin site with ``/metrics``.

Resources only translate HTTP to L{leeloo.relay.Relay} calls and back.  The
site's channel and request guard the connection below them: a deadline to
finish each request (the WebSocket upgrade included), bodies capped, the
security headers on every response, and no query strings in the access log.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import os
import re
import stat
from collections import Counter, OrderedDict
from dataclasses import dataclass
from importlib.resources import files
from io import BytesIO
from pathlib import Path
from typing import Any, Callable, Iterable
from urllib.parse import urlsplit

from autobahn.twisted.resource import WebSocketResource
from twisted.internet.defer import maybeDeferred
from twisted.internet.interfaces import ISSLTransport
from twisted.logger import Logger
from twisted.web import http
from twisted.protocols.policies import ProtocolWrapper
from twisted.web import pages as twisted_pages
from twisted.web.error import UnsupportedMethod
from twisted.web.http import HTTPChannel
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site, supportedMethods

from leeloo import __version__, messages, pages
from leeloo.access import CONNECTING_TOO_FAST, ConnectionGate, TrustedProxies, is_loopback
from leeloo.core.pairing import COOKIE_NAME, PairingProblem, is_pairing_state
from leeloo.limits import Rate
from leeloo.messages import ProtocolError
from leeloo.relay import BotCrew, CrewStatus, Relay, Stats
from leeloo.spotify import SpotifyError, SpotifyOAuth, origin
from leeloo.websocket import RelayServerFactory

_log = Logger()

MAX_BODY = 64 * 1024
# Seconds a connection turned away by the gate has to read its answer and
# close, and how many may do so at once (past that they are closed at once).
LINGER = 2.0
MAX_LINGERING = 1024
_FORWARDING_HEADERS = (b"x-forwarded-for", b"forwarded", b"x-real-ip")
# Sent over TLS by the public site (two years).
HSTS = b"max-age=63072000"


class APIError(Exception):
    """
    An HTTP error answered as C{{"error": error, "message": message}}.
    """

    def __init__(self, status: int, error: str, message: str | None = None, **extra: Any) -> None:
        super().__init__(status, error, message)
        self.status = status
        self.error = error
        self.message = message
        self.extra = extra

    def body(self) -> dict:
        body = {"error": self.error}
        if self.message is not None:
            body["message"] = self.message
        return {**body, **self.extra}


def _api_error(e: ProtocolError) -> APIError:
    """
    How the bot API answers C{e}: the status, error code, message and
    fields the error itself names (L{ProtocolError}'s C{http_*}).
    """
    return APIError(e.http_status, e.http_code, e.http_message, **e.http_extra)


def write_json(request: Request, status: int, body: Any) -> bytes:
    request.setResponseCode(status)
    request.setHeader(b"content-type", b"application/json")
    request.setHeader(b"cache-control", b"no-store")
    return json.dumps(body).encode("utf-8")


def write_html(request: Request, status: int, page: bytes) -> bytes:
    request.setResponseCode(status)
    request.setHeader(b"content-type", b"text/html; charset=utf-8")
    return page


def client_address(request: Request) -> str | None:
    """
    The address C{request} came from: its TCP peer's, or behind one of the
    site's trusted proxies, the one X-Forwarded-For names.
    """
    peer = getattr(request.getClientAddress(), "host", None)
    proxies = getattr(getattr(request, "site", None), "proxies", None)
    if not proxies:
        return peer
    forwarded = request.requestHeaders.getRawHeaders(b"x-forwarded-for")
    return proxies.client_address(
        peer, b",".join(forwarded).decode("latin-1") if forwarded else None)


def from_this_host(request: Request) -> bool:
    """
    Whether C{request} came from a loopback address and not through a
    proxy (a reverse proxy on this host connects from loopback too, and
    says so with a forwarding header).
    """
    if any(request.requestHeaders.hasHeader(h) for h in _FORWARDING_HEADERS):
        return False
    return is_loopback(getattr(request.getClientAddress(), "host", None))


NOT_FOUND = twisted_pages.notFound()


class Directory(Resource):
    """
    A resource with fixed children; any other path is the site's one 404.
    """

    def getChild(self, path: bytes, request: Request) -> Resource:
        return NOT_FOUND


def health(stats: Stats) -> dict:
    """
    The body of ``GET /health`` for the relay's figures C{stats}.
    """
    return {
        "status": "ok",
        "devices": stats.devices,
        "crews": stats.crews,
        "crews_online": stats.crews_online,
        "uptime": int(stats.uptime),
    }


def crew_status(status: CrewStatus) -> dict:
    """
    The bot API's answer to ``GET /api/telegram/crew/status``.
    """
    return {
        "crew_code": status.crew_code,
        "exists": status.exists,
        "devices_online": len(status.device_names),
        "device_names": status.device_names,
        "telegram_users": len(status.telegram_user_names),
        "telegram_user_names": status.telegram_user_names,
    }


def bot_crew(crew: BotCrew) -> dict:
    """
    One crew in the bot API's answer to ``GET /api/telegram/user/crews``.
    """
    return {"crew_code": crew.crew_code, "display_name": crew.display_name,
            "devices_online": crew.devices_online}


class Landing(Resource):
    """
    ``GET /``: what LEELOO is, and the relay's live counts.
    """

    isLeaf = True

    def __init__(self, relay: Relay) -> None:
        super().__init__()
        self.relay = relay

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"cache-control", b"no-store")
        return write_html(request, 200, pages.landing(health(self.relay.stats())))

    render_HEAD = render_GET


class CrewPage(Resource):
    """
    ``GET /crew`` (``/crew?code=CODE`` from a device's QR code): the
    browser client for a crew.  The page is fixed; its script reads the
    code from the address.
    """

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.page = pages.crew()

    def render_GET(self, request: Request) -> bytes:
        if request.postpath not in ([], [b""]):
            return NOT_FOUND.render(request)
        return write_html(request, 200, self.page)

    render_HEAD = render_GET


# The files under /static/: package data read once, by name (nothing else
# under that path is served).
STATIC_TYPES = {
    ".css": b"text/css; charset=utf-8",
    ".js": b"text/javascript; charset=utf-8",
    ".svg": b"image/svg+xml",
}
STATIC_FILES = ("leeloo.css", "landing.js", "crew.js", "icon.svg")


class Static(Resource):
    """
    ``/static/NAME``: the pages' stylesheet, scripts and icon, from the
    package, with an ETag so browsers revalidate cheaply.
    """

    isLeaf = True

    def __init__(self, names: Iterable[str] = STATIC_FILES) -> None:
        super().__init__()
        folder = files("leeloo") / "static"
        self.files: dict[bytes, tuple[bytes, bytes, bytes]] = {}
        for name in names:
            body = (folder / name).read_bytes()
            etag = hashlib.sha256(body).hexdigest()[:20].encode("ascii")
            self.files[name.encode("ascii")] = (STATIC_TYPES[Path(name).suffix], body, etag)

    def render_GET(self, request: Request) -> bytes:
        found = self.files.get(b"/".join(request.postpath))
        if found is None:
            return NOT_FOUND.render(request)
        content_type, body, etag = found
        request.setHeader(b"content-type", content_type)
        request.setHeader(b"cache-control", b"no-cache")
        if request.setETag(etag) == http.CACHED:
            return b""
        return body

    render_HEAD = render_GET


class Health(Resource):
    """
    ``GET /health``: the relay's figures, then the fields each of
    C{extra_fields} (callables returning a dict) adds, such as the TLS
    certificates' expiry.
    """

    isLeaf = True

    def __init__(self, relay: Relay, extra_fields: Iterable[Callable[[], dict]] = ()) -> None:
        super().__init__()
        self.relay = relay
        self.extra_fields = tuple(extra_fields)

    def render_GET(self, request: Request) -> bytes:
        body = health(self.relay.stats())
        body["version"] = __version__
        for fields in self.extra_fields:
            body.update(fields())
        return write_json(request, 200, body)


def _arg(request: Request, name: bytes) -> str | None:
    values = request.args.get(name)
    if not values:
        return None
    try:
        return values[0].decode("utf-8").strip() or None
    except UnicodeDecodeError:
        return None


class SpotifyCallback(Resource):
    """
    ``GET /spotify/callback?code=..&state=..``: where Spotify's consent
    sends the phone back.  A pairing's C{state} (L{is_pairing_state}) is
    accepted only with its browser's cookie (L{Pairings.complete}); any
    other C{state} is a deployed device's id (the legacy path,
    L{Pairings.legacy}), unless the relay refuses those.  Either way the
    tokens go to the device, and the phone sees a page saying how it went.
    """

    isLeaf = True
    log = Logger()

    def __init__(self, relay: Relay) -> None:
        super().__init__()
        self.relay = relay

    def render_HEAD(self, request: Request) -> bytes:
        # Not GET's headers: twisted.web would run GET for a HEAD, and spend
        # the one-time code for a link checker or a preview fetcher.
        request.setHeader(b"allow", b"GET")
        return write_html(request, 405, pages.bad_request("Open this link in a browser."))

    def render_GET(self, request: Request) -> Any:
        request.setHeader(b"cache-control", b"no-store")
        state = _raw_arg(request, b"state")
        if is_pairing_state(state):
            return self._pairing(request, state)
        error = _arg(request, b"error")
        if error == "access_denied":
            return write_html(request, 200, pages.spotify_cancelled())
        if error is not None:
            return write_html(request, 400, pages.spotify_failed(error.replace("_", " ")[:100]))
        code = _arg(request, b"code")
        if code is None:
            return write_html(request, 400, pages.bad_request("The code from Spotify is missing."))
        try:
            device_id = messages.device_id_of({"device_id": _arg(request, b"state")})
        except ProtocolError:
            device_id = None
        if device_id is None:
            return write_html(request, 400, pages.bad_request("The device this is for is missing."))
        if self.relay.spotify is None:
            return write_html(request, 503, pages.unavailable("Spotify is not set up on this relay."))
        respond = _responder(request)

        def failed(failure: Any) -> None:
            if failure.check(PairingProblem):
                respond(*_problem_page(failure.value))
                return
            e = failure.check(SpotifyError) and failure.value
            if not e:
                self.log.failure("Spotify exchange failed", failure)
                respond(502, pages.spotify_failed("something went wrong"))
                return
            self.log.warn("Spotify refused a code exchange: {error}", error=e.error)
            # Only a refused code is the phone's request gone bad; anything
            # else (Spotify down, our credentials, an odd answer) is upstream.
            respond(400 if e.error == "invalid_grant" else 502, pages.spotify_failed(e.description))

        d = self.relay.pairing.legacy(device_id, code)
        d.addCallbacks(lambda _: respond(200, pages.spotify_connected()), failed)
        d.addErrback(lambda f: self.log.failure("bug while answering the Spotify callback", f))
        return NOT_DONE_YET

    def _pairing(self, request: Request, state: str) -> Any:
        cookie = request.getCookie(COOKIE_NAME.encode("ascii"))
        try:
            cookie_value = cookie.decode("ascii") if cookie else None
        except UnicodeDecodeError:
            cookie_value = None
        respond = _responder(request)

        def paired(_: Any) -> None:
            # The flow is over: its cookie has nothing left to do.
            _expire_cookie(request)
            respond(200, pages.spotify_paired())

        def failed(failure: Any) -> None:
            failure.trap(PairingProblem)
            problem = failure.value
            if problem.reason in ("denied", "refused"):
                _expire_cookie(request)
            respond(*_problem_page(problem))

        d = self.relay.pairing.complete(state, cookie_value, _arg(request, b"code"), _arg(request, b"error"))
        d.addCallbacks(paired, failed)
        d.addErrback(self._bug, respond)
        return NOT_DONE_YET

    def _bug(self, failure: Any, respond: Callable[[int, bytes], None]) -> None:
        self.log.failure("bug while answering a Spotify pairing callback", failure)
        respond(500, pages.spotify_failed("something went wrong"))


def _responder(request: Request) -> Callable[[int, bytes], None]:
    """
    Answer C{request} later with a status and a page, unless its client
    has gone (or it was answered already).
    """
    finished = request.notifyFinish()
    finished.addErrback(lambda _: None)

    def respond(status: int, page: bytes) -> None:
        if finished.called or request.finished:
            return
        request.write(write_html(request, status, page))
        request.finish()

    return respond


def _expire_cookie(request: Request) -> None:
    request.addCookie(COOKIE_NAME.encode("ascii"), b"", path=PAIR_COOKIE_PATH, max_age=b"0",
                      secure=True, httpOnly=True, sameSite="lax")


# How each pairing problem is answered: status, and the page.
_PROBLEM_STATUS = {
    "unknown": 404, "expired": 410, "used": 409, "wrong_browser": 403, "cross_site": 403,
    "unavailable": 503, "not_configured": 503, "legacy_off": 410, "denied": 200,
}


def _problem_page(problem: PairingProblem) -> tuple[int, bytes]:
    if problem.reason == "denied":
        return 200, pages.spotify_pair_cancelled()
    if problem.reason == "refused":
        return (502 if problem.upstream else 400), pages.spotify_refused(problem.description or "no")
    return _PROBLEM_STATUS.get(problem.reason, 400), pages.pair_problem(problem.reason)


# The cookie is sent back only to the callback.
PAIR_COOKIE_PATH = b"/spotify/callback"
# Lookups of /pair/ per client address, then 429.
PAIR_LOOKUPS = Rate.per_window(30, 60)


class PairPage(Resource):
    """
    ``/pair/CODE``: the phone's side of a Spotify pairing.  C{GET} shows
    which device asks (L{Pairings.lookup}); the button C{POST}s here, which
    spends the code, sets the httpOnly, Secure, SameSite=Lax cookie
    C{leeloo_pair} bound to the flow, and redirects (303) to Spotify's
    consent (L{Pairings.consent}).  Every request counts against its
    client address: 30 a minute, then 429.  The pages' CSP allows exactly
    the stylesheet, the icon, the form and the redirect to Spotify.
    """

    isLeaf = True
    log = Logger()

    def __init__(self, relay: Relay, rate: Rate = PAIR_LOOKUPS) -> None:
        super().__init__()
        self.relay = relay
        self.limiter = relay.budget(relay.clock, rate, "pair")
        self._swept = relay.clock.seconds()

    def render(self, request: Request) -> Any:
        request.setHeader(b"cache-control", b"no-store")
        spotify = self.relay.spotify
        if spotify is not None:
            request.setHeader(b"content-security-policy",
                              pages.pairing_policy(spotify.config.accounts_origin))
        # The button's post must carry its Origin (no-referrer would make it
        # "null"); nothing goes to another site, Spotify included.
        request.setHeader(b"referrer-policy", b"same-origin")
        wait = self._take(client_address(request))
        if wait:
            retry = max(1, math.ceil(wait))
            request.setHeader(b"retry-after", str(retry).encode("ascii"))
            return write_html(request, 429, pages.pair_problem("too_many"))
        return super().render(request)

    def _take(self, address: str | None) -> float:
        now = self.relay.clock.seconds()
        if now - self._swept >= 60:
            self._swept = now
            self.limiter.sweep()
        return self.limiter.take(address)

    def _code(self, request: Request) -> str | None:
        if len(request.postpath) != 1:
            return None
        try:
            return request.postpath[0].decode("ascii")
        except UnicodeDecodeError:
            return None

    def render_GET(self, request: Request) -> bytes:
        try:
            view = self.relay.pairing.lookup(self._code(request))
        except PairingProblem as e:
            return write_html(request, *_problem_page(e))
        action = "/pair/" + view.user_code.replace("-", "")
        return write_html(request, 200, pages.pair(view.user_code, view.device_name, view.crew_code, action,
                                                   view.keep_offered))

    render_HEAD = render_GET

    def render_POST(self, request: Request) -> Any:
        if not self._same_site(request):
            self.log.warn("a pairing button pressed from another site, from {client_address}",
                          client_address=client_address(request))
            return write_html(request, *_problem_page(PairingProblem("cross_site")))
        respond = _responder(request)

        def consented(consent: Any) -> None:
            if request.finished:
                return
            request.addCookie(COOKIE_NAME.encode("ascii"), consent.cookie.encode("ascii"),
                              path=PAIR_COOKIE_PATH, max_age=str(int(self.relay.pairing.settings.ttl)).encode(),
                              secure=True, httpOnly=True, sameSite="lax")
            request.setResponseCode(303)
            request.setHeader(b"location", consent.location.encode("ascii"))
            respond(303, pages.to_spotify(consent.location))

        def failed(failure: Any) -> None:
            failure.trap(PairingProblem)
            respond(*_problem_page(failure.value))

        # The consent box: ticked, a browser sends keep=yes; unticked, nothing.
        keep = (request.args.get(b"keep") or [b""])[0] == b"yes"
        d = self.relay.pairing.consent(self._code(request), keep)
        d.addCallbacks(consented, failed)
        d.addErrback(lambda f: (self.log.failure("bug while pressing a pairing button", f),
                                respond(500, pages.pair_problem("unavailable"))))
        return NOT_DONE_YET

    def _same_site(self, request: Request) -> bool:
        """
        Whether a button press comes from the relay's own page: the
        browser's C{Sec-Fetch-Site} says C{same-origin}; or, from a browser
        that sends none, its C{Origin} is the relay's public origin or the
        host the request was sent to (C{null}, what a page with no referrer
        sends, is neither).  A client that sends neither header is no
        browser a hostile page could drive.
        """
        fetch_site = request.getHeader(b"sec-fetch-site")
        if fetch_site is not None:
            return fetch_site.strip().lower() in (b"same-origin", b"none")
        given = request.getHeader(b"origin")
        if given is None:
            return True
        given_origin = given.decode("latin-1").strip().lower()
        allowed = set()
        public = self.relay.pairing.public_url
        if public:
            allowed.add(origin(public))
        host = request.getHeader(b"host")
        if host:
            scheme = "https" if request.isSecure() else "http"
            allowed.add(f"{scheme}://{host.decode('latin-1').strip().lower()}")
        return given_origin in allowed


# --------------------------------------------------------------- bot API


# The bot's fields are read by the devices' validators (messages.py), so a
# refusal is the same FieldError, answered 400 {"error": "<field> <problem>"}.
# Where the bot API differs from a frame, on purpose and as it always has:
# names, user ids and msg_type over their frame limits are cut (a frame is
# refused), only over MAX_FIELD_LENGTH refused ("too long"); a null msg_type
# is "msg_type required" (a frame's is "text"); telegram_user_id may be an
# integer.


def _required(body: dict, name: str, cut: int, default: Any = None) -> str:
    return messages.string_field(body, name, messages.MAX_FIELD_LENGTH, required=True, default=default)[:cut]


def _user_id(body: dict) -> str:
    value = body.get("telegram_user_id")
    if isinstance(value, bool):
        raise messages.FieldError("telegram_user_id", "must be a string or an integer",
                                  "telegram_user_id must be a string or an integer")
    if isinstance(value, int):
        return str(value)
    return _required(body, "telegram_user_id", messages.MAX_DEVICE_ID_LENGTH)


def _name(body: dict, name: str) -> str:
    return _required(body, name, messages.MAX_NAME_LENGTH)


def _crew_code(obj: dict) -> str:
    return messages.crew_code_field(obj, required=True)


def _raw_arg(request: Request, name: bytes) -> str | None:
    """
    The query argument C{name} as it was sent (not stripped); C{None} when
    absent, empty or not UTF-8.
    """
    values = request.args.get(name)
    if not values:
        return None
    try:
        return values[0].decode("utf-8") or None
    except UnicodeDecodeError:
        return None


class BotAPI(Resource):
    """
    ``/api/telegram/...``: the Telegram bot's calls, behind
    ``X-Api-Secret``.  Without a configured secret it is disabled.
    """

    isLeaf = True
    log = Logger()

    def __init__(self, relay: Relay, secret: str | None) -> None:
        super().__init__()
        self.relay = relay
        self._secret = secret.encode("utf-8") if secret else None
        self._routes: dict[tuple[bytes, bytes], Callable[[Request], dict]] = {
            (b"POST", b"crew/create"): self.create,
            (b"POST", b"crew/join"): self.join,
            (b"POST", b"message"): self.message,
            (b"GET", b"crew/status"): self.status,
            (b"GET", b"user/crews"): self.user_crews,
        }

    def render(self, request: Request) -> Any:
        path = b"/".join(request.postpath).rstrip(b"/")
        # notifyFinish fails once the client has gone (twisted.web's public
        # word for it, in place of the request's private _disconnected).
        gone: list = []
        request.notifyFinish().addErrback(gone.append)
        d = maybeDeferred(self._dispatch, request, path)
        d.addCallbacks(lambda answer: (200, answer), self._error, errbackArgs=(path,))
        d.addCallback(self._answer, request, gone)
        d.addErrback(self._answer_failed, request, path)
        return NOT_DONE_YET

    def _dispatch(self, request: Request, path: bytes) -> Any:
        methods = [m for (m, p) in self._routes if p == path]
        if not methods:
            raise APIError(404, "not_found", "no such bot API call")
        if request.method not in methods:
            request.setHeader(b"allow", b", ".join(methods))
            raise APIError(405, "method_not_allowed", f"use {methods[0].decode()}")
        self._authorize(request)
        return self._routes[(request.method, path)](request)

    def _error(self, failure: Any, path: bytes) -> tuple[int, dict]:
        if failure.check(APIError):
            return failure.value.status, failure.value.body()
        if failure.check(ProtocolError):
            e = _api_error(failure.value)
            return e.status, e.body()
        self.log.failure("bug in bot API call {path}", failure, path=path.decode("ascii", "replace"))
        return 500, {"error": "internal_error"}

    def _answer_failed(self, failure: Any, request: Request, path: bytes) -> None:
        self.log.failure("bug while answering bot API call {path}", failure, path=path.decode("ascii", "replace"))
        if not request.finished:
            request.loseConnection()

    def _answer(self, answer: tuple[int, dict], request: Request, gone: list) -> None:
        if gone or request.finished:
            return
        status, body = answer
        if "retry_after" in body:
            request.setHeader(b"retry-after", str(body["retry_after"]).encode("ascii"))
        request.write(write_json(request, status, body))
        request.finish()

    def _authorize(self, request: Request) -> None:
        if self._secret is None:
            raise APIError(
                503, "bot_api_disabled", "the bot API is disabled: TELEGRAM_API_SECRET is not set"
            )
        given = request.getHeader(b"x-api-secret")
        if given is None or not hmac.compare_digest(given, self._secret):
            self.log.warn("bot API call with a wrong or missing secret from {client_address}",
                          client_address=client_address(request))
            raise APIError(401, "unauthorized")

    def _body(self, request: Request) -> dict:
        content_type = (request.getHeader(b"content-type") or b"").split(b";")[0].strip().lower()
        if content_type != b"application/json":
            raise APIError(400, "invalid_content_type", "send a JSON body (Content-Type: application/json)")
        raw = request.content.read(MAX_BODY + 1)
        # The site refuses larger bodies before they are read; this is for
        # resources served by another site.
        if len(raw) > MAX_BODY:
            raise APIError(413, "body_too_large", f"the body is over {MAX_BODY} bytes")
        try:
            body = messages.parse_json(raw)
        except ProtocolError:
            raise APIError(400, "invalid_json", "the body is not valid JSON") from None
        if not isinstance(body, dict):
            raise APIError(400, "invalid_body", "the body must be a JSON object")
        return body

    def create(self, request: Request) -> dict:
        body = self._body(request)
        user, name = _user_id(body), _name(body, "display_name")
        return self.relay.bot_create_crew(user, name).addCallback(lambda code: {"crew_code": code})

    def join(self, request: Request) -> dict:
        body = self._body(request)
        user, code, name = _user_id(body), _crew_code(body), _name(body, "display_name")
        code, online = self.relay.bot_join_crew(user, code, name)
        return {"success": True, "crew_code": code, "devices_online": online}

    def message(self, request: Request) -> dict:
        body = self._body(request)
        user = _user_id(body)
        code = _crew_code(body)
        sender = _name(body, "sender_name")
        msg_type = _required(body, "msg_type", messages.MAX_TYPE_LENGTH, default="text")
        payload = messages.object_field(body, "payload")
        d = self.relay.bot_message(user, code, sender, msg_type, payload)
        return d.addCallback(lambda reached: {"success": True, "devices_reached": reached})

    def status(self, request: Request) -> dict:
        return crew_status(self.relay.crew_status(_crew_code({"crew_code": _raw_arg(request, b"crew_code")})))

    def user_crews(self, request: Request) -> dict:
        """
        The crews a bot user is in, so that a restarted bot can rebuild
        its own map: C{telegram_user_id} echoed as given.
        """
        given = _raw_arg(request, b"telegram_user_id")
        # Looked up as the other calls store it: stripped, at most 64.
        user = (given or "").strip()[: messages.MAX_DEVICE_ID_LENGTH]
        if not user:
            raise APIError(400, "telegram_user_id required")
        return {"telegram_user_id": given, "crews": [bot_crew(c) for c in self.relay.bot_user_crews(user)]}


class MetricsResource(Resource):
    """
    ``GET /metrics``: the relay's figures for Prometheus.  With
    C{local_only} (the public site) anyone but this host gets the site's
    404, as if it were not there.
    """

    isLeaf = True

    def __init__(self, metrics: Any, local_only: bool) -> None:
        super().__init__()
        self.metrics = metrics
        self.local_only = local_only

    def render_GET(self, request: Request) -> bytes:
        if self.local_only and not from_this_host(request):
            return NOT_FOUND.render(request)
        from leeloo.metrics import CONTENT_TYPE

        request.setHeader(b"content-type", CONTENT_TYPE)
        request.setHeader(b"cache-control", b"no-store")
        return self.metrics.exposition()


def make_root(
    relay: Relay,
    ws_factory: RelayServerFactory,
    spotify: SpotifyOAuth | None,
    bot_secret: str | None,
    metrics: Any = None,
    health_fields: Iterable[Callable[[], dict]] = (),
    challenges: Callable[[str], str | None] | None = None,
) -> Resource:
    root = Directory()
    if challenges is not None:
        well_known = Directory()
        well_known.putChild(b"acme-challenge", ChallengeResponder(challenges))
        root.putChild(b".well-known", well_known)
    root.putChild(b"", Landing(relay))
    root.putChild(b"index.html", Landing(relay))
    root.putChild(b"crew", CrewPage())
    root.putChild(b"static", Static())
    root.putChild(b"health", Health(relay, health_fields))
    root.putChild(b"ws", WebSocketResource(ws_factory))
    if spotify is not None and relay.pairing.spotify is None:
        # A relay built without its Spotify client (the web tests') gets
        # the site's.
        relay.pairing.spotify = spotify
    spotify_root = Directory()
    spotify_root.putChild(b"callback", SpotifyCallback(relay))
    root.putChild(b"spotify", spotify_root)
    root.putChild(b"pair", PairPage(relay))
    api = Directory()
    api.putChild(b"telegram", BotAPI(relay, bot_secret))
    root.putChild(b"api", api)
    if metrics is not None:
        root.putChild(b"metrics", MetricsResource(metrics, local_only=True))
    return root


# ------------------------------------------------------------- the site


@dataclass(frozen=True)
class HTTPLimits:
    """
    What the HTTP site allows a connection.

    @ivar request_timeout: seconds a connection has to finish sending a
        request (headers and body; the WebSocket upgrade is one), from when
        it connects or its previous response was sent.
    @ivar max_body: the largest request body, in bytes.
    @ivar max_connections_per_address: the most TCP connections open at once
        from one client address (plain HTTP and WebSockets).
    @ivar connect_rate: new TCP connections a second from one client
        address, in bursts of twice as many.
    """

    request_timeout: float = 10.0
    max_body: int = MAX_BODY
    max_connections_per_address: int = 256
    connect_rate: float = 10.0

    def describe(self) -> str:
        return (f"a request must arrive within {self.request_timeout:g}s, "
                f"bodies up to {self.max_body} bytes, "
                f"{self.max_connections_per_address} connections per client address, "
                f"{self.connect_rate:g} new ones a second per address (bursts of {2 * self.connect_rate:g})")

    def gate(self, clock: Any, proxies: TrustedProxies = TrustedProxies()) -> ConnectionGate:
        """
        The L{ConnectionGate} these limits describe, for every site that
        shares it.
        """
        return ConnectionGate(clock, self.max_connections_per_address,
                              Rate(self.connect_rate, 2 * self.connect_rate), proxies)


def canned_response(status: int, body: dict | None = None, headers: Iterable[tuple[bytes, bytes]] = ()) -> bytes:
    """
    A whole HTTP response the channel writes itself (no request object),
    with the security headers, JSON C{body} if any, and C{Connection: close}.
    """
    data = b"" if body is None else json.dumps(body).encode("utf-8")
    lines = [b"HTTP/1.1 %d %s" % (status, pages.reason_phrase(status))]
    if body is not None:
        lines += [b"Content-Type: application/json", b"Cache-Control: no-store"]
    lines += [name + b": " + value for name, value in (*headers, *pages.SECURITY_HEADERS)]
    lines += [b"Content-Length: %d" % len(data), b"Connection: close", b"", data]
    return b"\r\n".join(lines)


BAD_REQUEST = canned_response(400, {"error": "bad_request", "message": "the request is not valid HTTP/1.1"})
URI_TOO_LONG = canned_response(414, {"error": "uri_too_long", "message": "the request line is too long"})
HEADERS_TOO_LARGE = canned_response(
    431, {"error": "headers_too_large", "message": "the request's headers are too large"})
TOO_MANY_FROM_ADDRESS = canned_response(
    503, {"error": "too_many_connections", "message": "too many connections from your address"})


class Deadlines:
    """
    HTTP connections that must finish a request by a deadline, and one timer
    for all of them: the connections are kept in deadline order (the
    timeout is the same for all), so expiring them looks only at those due.
    """

    log = Logger()

    def __init__(self, clock: Any, timeout: float,
                 aborted: str = "aborted {count} HTTP connections that did not send a request "
                                "within {timeout}s") -> None:
        self.clock = clock
        self.timeout = timeout
        self.aborted = aborted
        self.expired = 0
        self._due: OrderedDict[Any, float] = OrderedDict()
        self._call: Any = None

    def __len__(self) -> int:
        return len(self._due)

    def watch(self, channel: Any) -> None:
        """
        Give C{channel} C{timeout} seconds from now, unless it already has a
        deadline.
        """
        if channel in self._due:
            return
        self._due[channel] = self.clock.seconds() + self.timeout
        if self._call is None:
            self._call = self.clock.callLater(self.timeout, self._expire)

    def done(self, channel: Any) -> None:
        """
        C{channel} finished its request, or is gone.
        """
        if self._due.pop(channel, None) is not None and not self._due and self._call is not None:
            self._call.cancel()
            self._call = None

    def _expire(self) -> None:
        self._call = None
        now = self.clock.seconds()
        count = 0
        while self._due:
            channel, deadline = next(iter(self._due.items()))
            if deadline > now:
                break
            del self._due[channel]
            count += 1
            transport = channel.transport
            if transport is not None:
                transport.abortConnection()
        if count:
            self.expired += count
            self.log.info(self.aborted, count=count, timeout=self.timeout)
        if self._due:
            # Wake at the next deadline, but at most twice a second.
            wait = max(next(iter(self._due.values())) - now, 0.5)
            self._call = self.clock.callLater(wait, self._expire)

    def stop(self) -> None:
        if self._call is not None:
            self._call.cancel()
            self._call = None


# The longest request line looked at for a WebSocket upgrade; a longer
# one is twisted.web's to parse (and refuse).
MAX_ROUTED_LINE = 2048
UPGRADE_PATH = b"/ws"


def is_upgrade_line(line: bytes, path: bytes = UPGRADE_PATH) -> bool:
    """
    Whether C{line} is the request line of a WebSocket upgrade at C{path}:
    C{GET /ws HTTP/1.1}, maybe with a query.
    """
    n = len(path) + 4
    return (line.startswith(b"GET " + path) and line[n:n + 1] in (b" ", b"?")
            and line.endswith(b" HTTP/1.1") and line.count(b" ") == 2)


@dataclass(frozen=True, slots=True)
class HandshakeGuard:
    """
    What an upgrade routed past twisted.web keeps of its HTTP channel's
    limits until the handshake is done: the request deadline (C{deadlines}
    watching C{channel}), and the most bytes and lines its head may have,
    past which it is answered C{refusal}.
    """

    deadlines: Any
    channel: Any
    max_size: int
    max_lines: int
    refusal: bytes

    def done(self) -> None:
        self.deadlines.done(self.channel)


class RelayChannel(HTTPChannel):
    """
    An HTTP/1.1 connection that must finish each request within the site's
    deadline, with bodies capped, and that lets go of its request once
    WebSocketResource has taken the connection over.

    twisted.web's own idle timeout restarts on every byte (a client sending
    one byte a second never meets it) and Autobahn's opening handshake
    timeout starts only once twisted.web has parsed the request, so neither
    stops a slow sender; this deadline does.

    Before it reads a byte, the site's L{ConnectionGate} counts it against
    its client address's connections and connection rate; one over either
    is answered 503 or 429 and closed.  A client that pipelines requests
    without reading the responses is not read from while they wait (past
    the transport's buffer), and the responses waiting do not put its
    deadline off.  Requests twisted.web cannot parse are answered, with the
    security headers: 400, a request line over the limit 414, headers over
    it 431.
    """

    _refused = False
    # The answer of a connection the gate turned away, until it is sent.
    _answer: bytes | None = None
    # The peer host the site's gate counted this connection against.
    _gated: str | None = None
    # Its ticket in the cluster's counts (L{ConnectionGate.share}), if any.
    _ticket: Any = None
    # Bytes of the request head so far, and its lines (the request line
    # included); 0 between requests.
    _head_size = 0
    _head_lines = 0
    # The connection's first bytes while its request line is not yet
    # whole (see L{dataReceived}); None once routed.
    _routing: bytes | None = b""
    # The client's address (the transport's getPeer()), once connected.
    _peer: Any = None

    def connectionMade(self) -> None:
        super().connectionMade()
        # The client's address, asked for once (a transport makes a new one
        # each time it is asked), for the gate and the WebSocket.
        self._peer = self.transport.getPeer()
        gate = self.site.gate
        if gate is not None:
            host = getattr(self._peer, "host", None)
            refused = gate.admit(host)
            if refused is not None:
                self.turn_away(*refused)
                return
            self._gated = host
            if gate.shared is not None:
                shared = gate.share(host)
                if shared is not None:
                    self._ticket, verdict = shared
                    if verdict is not None:
                        # Nothing is read until the cluster has counted it.
                        self.transport.pauseProducing()
                        verdict.addCallback(self._cluster_verdict, gate)
        self.site.deadlines.watch(self)

    def _cluster_verdict(self, refused: tuple[str, float] | None, gate: ConnectionGate) -> None:
        """
        The cluster's answer for this connection (L{ConnectionGate.share}):
        read on, or turn it away as the node's own limits would.
        """
        if self._gated is None:
            # Closed meanwhile (its ticket was released with it).
            return
        if refused is not None:
            host, self._gated, self._ticket = self._gated, None, None
            gate.refused_by_cluster(host, refused[0])
            self.transport.resumeProducing()
            self.turn_away(*refused)
            return
        self.transport.resumeProducing()

    def turn_away(self, reason: str, wait: float) -> None:
        """
        Answer a connection over its address's limits (503 for too many
        open, 429 for too many new) and close it.  The answer waits for the
        first bytes of its request (a client must have sent its request to
        read an answer, and closing with it unread would reset the
        connection), for LINGER seconds at most; the rest is discarded
        unparsed.  While too many wait, the answer goes at once.  Over TLS
        the connection is aborted unanswered: an answer would cost a
        handshake, the work the limits are there to spare.
        """
        self._refused = True
        self.site.gate_warn(reason, self.transport.getPeer())
        if ISSLTransport.providedBy(self.transport):
            self.transport.abortConnection()
            return
        if reason == CONNECTING_TOO_FAST:
            response = canned_response(
                429, {"error": "connecting_too_fast", "message": "too many new connections from your address",
                      "retry_after": math.ceil(wait)},
                [(b"Retry-After", b"%d" % math.ceil(wait))])
        else:
            response = TOO_MANY_FROM_ADDRESS
        lingering = self.site.lingering
        if len(lingering) < MAX_LINGERING and hasattr(self.transport, "loseWriteConnection"):
            self._answer = response
            lingering.watch(self)
        else:
            # Refused connections flood in: answer each as best we can,
            # and hold no descriptor for them.
            self.site.responses[int(response[9:12])] += 1
            self.transport.write(response)
            self.transport.loseConnection()

    def dataReceived(self, data: bytes) -> None:
        if not self._refused:
            if self._routing is not None:
                data = self._route(data)
                if data is None:
                    return
            super().dataReceived(data)
        elif self._answer is not None:
            # A turned-away connection's request: answer it, close our
            # side, and discard the rest until the client closes.
            response, self._answer = self._answer, None
            self.site.responses[int(response[9:12])] += 1
            self.transport.write(response)
            self.transport.loseWriteConnection()

    def _route(self, data: bytes) -> bytes | None:
        """
        Look at the connection's request line before twisted.web does: a
        WebSocket upgrade (C{GET /ws HTTP/1.1}, the connection's first
        request) goes straight to Autobahn, which parses the handshake
        itself, without a twisted.web request built for it (a third of the
        CPU a reconnect storm costs).  Return what twisted.web is to read,
        or None when there is nothing for it (yet).
        """
        if self._routing:
            data = self._routing + data
        end = data.find(b"\r\n", 0, MAX_ROUTED_LINE)
        if end < 0 and len(data) < MAX_ROUTED_LINE:
            # The request line is not whole yet: wait for it (within the
            # deadline, which runs from the connection's start).
            self._routing = data
            return None
        self._routing = None
        upgrade = self.site.upgrade
        if end >= 0 and upgrade is not None and is_upgrade_line(data[:end]):
            self._upgrade(upgrade, data)
            return None
        return data

    def _upgrade(self, factory: Any, data: bytes) -> None:
        """
        Give the connection to a WebSocket protocol of C{factory}, as
        Autobahn's WebSocketResource does once twisted.web has parsed the
        request (pinned by test_site's UpgradeRoutingTests), with C{data},
        everything read so far.
        """
        transport = self.transport
        protocol = factory.buildProtocol(self._peer)
        protocol.peer_address = self._peer
        if isinstance(transport, ProtocolWrapper):
            # TLS: the channel is the TLS layer's wrapped protocol.
            transport.wrappedProtocol = protocol
        elif isinstance(transport.protocol, ProtocolWrapper):
            transport.protocol.wrappedProtocol = protocol
        else:
            transport.protocol = protocol
        if self._gated is not None:
            # The WebSocket now gets the connection's end, not this
            # channel: it frees the connection's place under the gate.
            protocol.gate_slot = (self.site.gate, self._gated, self._ticket)
            self._gated = self._ticket = None
        # The request deadline keeps running until the handshake is done
        # (this channel keeps its transport for the deadline to abort), and
        # the handshake's head has the limits twisted.web gives a request's.
        protocol.handshake_guard = HandshakeGuard(
            self.site.deadlines, self, self.totalHeadersSize, self.maxHeaders, HEADERS_TOO_LARGE)
        protocol.take_over(transport, data)

    def lineReceived(self, line: bytes) -> None:
        if self._refused:
            return
        if not line:
            # The end of a head (or the stray blank line twisted.web eats
            # between requests).
            self._head_size = self._head_lines = 0
        else:
            # Checked here, before twisted.web's own check answers 400.
            size = self._head_size + len(line)
            if size > self.totalHeadersSize or self._head_lines > self.maxHeaders:
                self.refuse(HEADERS_TOO_LARGE if self._head_size else URI_TOO_LONG)
                return
            self._head_size = size
            self._head_lines += 1
        super().lineReceived(line)

    def lineLengthExceeded(self, line: bytes) -> None:
        self.refuse(HEADERS_TOO_LARGE if self._head_size else URI_TOO_LONG)

    def _respondToBadRequestAndDisconnect(self) -> None:
        # twisted.web's own 400 (a bad request line, header or chunk) is a
        # bare status line; this one has the security headers and a body.
        # The override is pinned by test_site's BadRequestTests.
        self.refuse(BAD_REQUEST)

    def allHeadersReceived(self) -> None:
        if self.length is not None and self.length > self.site.limits.max_body:
            # Content-Length says it all: refuse before reading a byte of it
            # (and before twisted.web answers Expect: 100-continue).
            self.refuse_body()
            return
        super().allHeadersReceived()

    def rawDataReceived(self, data: bytes) -> None:
        if not self._refused:
            super().rawDataReceived(data)

    def allContentReceived(self) -> None:
        if self._refused:
            return
        # A request parsed while earlier responses wait unsent does not put
        # the deadline off (twisted.web's _waitingForTransport: the
        # transport holds more than its buffer; pinned by PipeliningTests).
        if not self._waitingForTransport:
            self.site.deadlines.done(self)
        transport = self.transport
        super().allContentReceived()
        if self.transport is None:
            # WebSocketResource took the transport (and made the WebSocket
            # its producer): this channel and the upgrade request are done
            # for.  Drop the request so neither outlives the handshake.
            self.site.deadlines.done(self)
            del self.requests[:]
            if self._gated is not None:
                # The WebSocket now gets the connection's end, not this
                # channel: it frees the connection's place under the gate.
                _protocol_of(transport).gate_slot = (self.site.gate, self._gated, self._ticket)
                self._gated = self._ticket = None

    def requestDone(self, request: Request) -> None:
        # The next request (or the close, if this one was the last) is due
        # within the deadline too; a pipelined request already buffered is
        # parsed right here and clears it again.
        self.site.deadlines.watch(self)
        if self._waitingForTransport and self.persistent:
            # The client is not reading its responses: parse no pipelined
            # request more (LineReceiver's own pause flag keeps them in its
            # buffer), and read nothing, until the transport has sent what
            # it holds and resumes us.  twisted.web pauses reading only
            # between requests, so a client whose responses fill the
            # buffer while they are written would be read from forever.
            self.paused = True
        super().requestDone(request)
        if self.paused and self.transport is not None:
            self._networkProducer.pauseProducing()

    def resumeProducing(self) -> None:
        super().resumeProducing()
        if self.paused and self.transport is not None:
            # Everything sent: the deadline for the next request runs from
            # now; parse what the client pipelined meanwhile.
            self.paused = False
            self.site.deadlines.done(self)
            self.site.deadlines.watch(self)
            self.dataReceived(b"")

    def connectionLost(self, reason: Any) -> None:
        self.site.deadlines.done(self)
        self.site.lingering.done(self)
        if self._gated is not None:
            self.site.gate.release(self._gated)
            if self._ticket is not None:
                self._ticket.release()
            self._gated = self._ticket = None
        super().connectionLost(reason)

    def refuse_body(self) -> None:
        """
        Answer 413 and read no more of the request.
        """
        if not self._refused:
            self.site.bodies_refused += 1
            self.refuse(self.site.body_too_large)

    def refuse(self, response: bytes) -> None:
        """
        Answer C{response} and read no more: close our side once the answer
        is out and discard what the client still sends until it closes its
        side too, or the deadline aborts it (were we to close with unread
        data the client would get a reset, and maybe not the answer).
        """
        if self._refused:
            return
        self._refused = True
        self.site.deadlines.watch(self)
        self.site.responses[int(response[9:12])] += 1
        self.transport.write(response)
        half_close = getattr(self.transport, "loseWriteConnection", None)
        if half_close is not None:
            half_close()
        else:
            self.loseConnection()


def _protocol_of(transport: Any) -> Any:
    """
    The protocol C{transport} delivers to (behind TLS, the wrapped one), as
    WebSocketResource installed it.
    """
    if isinstance(transport, ProtocolWrapper):
        return transport.wrappedProtocol
    protocol = transport.protocol
    if isinstance(protocol, ProtocolWrapper):
        return protocol.wrappedProtocol
    return protocol


class RelayRequest(Request):
    """
    A request whose responses all carry the security headers (and HSTS over
    TLS when the site has it), and whose body is counted as it arrives.
    """

    _body_size = 0

    def gotLength(self, length: int | None) -> None:
        # Bodies are capped well below the size twisted.web would spool to
        # a temporary file for (and a chunked body would always be).
        self.content = BytesIO()

    def handleContentChunk(self, data: bytes) -> None:
        self._body_size += len(data)
        channel = self.channel
        if self._body_size > channel.site.limits.max_body:
            channel.refuse_body()
            return
        self.content.write(data)

    def render(self, resrc: Resource) -> None:
        super().render(_KnownMethods(resrc))

    def process(self) -> None:
        headers = self.responseHeaders
        for name, value in pages.SECURITY_HEADERS:
            headers.setRawHeaders(name, [value])
        hsts = self.channel.site.hsts
        if hsts is not None and self.isSecure():
            headers.setRawHeaders(b"strict-transport-security", [hsts])
        super().process()


class _KnownMethods:
    """
    A resource as L{Request.render} sees it, answering a method it does
    not implement with 405 and C{Allow}: twisted.web answers 405 only for
    GET, HEAD and POST, and 501 for every other method.
    """

    __slots__ = ("resource",)

    def __init__(self, resource: Resource) -> None:
        self.resource = resource

    def render(self, request: Request) -> Any:
        try:
            return self.resource.render(request)
        except UnsupportedMethod as e:
            if request.method in supportedMethods:
                raise
            request.setHeader(b"allow", b", ".join(e.allowedMethods or ()))
            return twisted_pages.errorPage(
                405, "Method Not Allowed", "This resource does not allow that method.").render(request)


def _quoted(value: bytes | str | None) -> str:
    if value is None:
        return "-"
    if isinstance(value, bytes):
        value = value.decode("latin-1")
    return value.encode("ascii", "backslashreplace").decode("ascii").replace('"', '\\"')


@dataclass(frozen=True, slots=True)
class SiteStats:
    """
    One site's figures: its name, connections that have not finished a
    request now, and since the start: connections aborted for that,
    bodies refused with 413, responses by status, and (for the gate it
    shares with the other sites, C{None} without one) connections refused
    before a byte was read, by reason.
    """

    name: str
    waiting: int
    timeouts: int
    bodies_refused: int
    responses: dict[int, int]
    gate_refused: dict[str, int] | None


class RelaySite(Site):
    """
    The relay's twisted.web site, hardened: L{RelayChannel}s and
    L{RelayRequest}s, no tracebacks to clients, no idle timer per
    connection (the request deadline replaces it), and an access log
    without query strings (the Spotify callback's carries an OAuth code).

    @param hsts: the C{Strict-Transport-Security} value to send over TLS,
        or C{None} for none.
    @param name: how the metrics label this site.
    @param upgrade: the WebSocket factory (the one at C{/ws} in
        C{resource}) that takes C{GET /ws} upgrades straight from the
        channel, or C{None} to leave them to twisted.web.
    """

    protocol = RelayChannel
    requestFactory = RelayRequest
    displayTracebacks = False

    def __init__(
        self,
        resource: Resource,
        limits: HTTPLimits = HTTPLimits(),
        proxies: TrustedProxies = TrustedProxies(),
        hsts: bytes | None = None,
        name: str = "public",
        reactor: Any = None,
        gate: ConnectionGate | None = None,
        upgrade: Any = None,
    ) -> None:
        self.proxies = proxies
        # The WebSocket factory that upgrades at /ws skip twisted.web for.
        self.upgrade = upgrade
        super().__init__(resource, reactor=reactor, timeout=None, logFormatter=self.access_log_line)
        self.limits = limits
        self.hsts = hsts
        self.name = name
        self.gate = gate
        self.deadlines = Deadlines(self.reactor, limits.request_timeout)
        # Connections the gate turned away, until their clients close or
        # LINGER seconds pass.
        self.lingering = Deadlines(
            self.reactor, min(LINGER, limits.request_timeout),
            "aborted {count} refused connections that did not close within {timeout}s")
        self.bodies_refused = 0
        # Responses by status (the bot API's 429s among them).
        self.responses: Counter[int] = Counter()
        # Addresses whose refusal by the gate was logged, forgotten each
        # minute: a warning per address and minute however many it tries.
        self._gate_warned: set = set()
        self._gate_warned_at = self.reactor.seconds()
        self.body_too_large = canned_response(
            413, {"error": "body_too_large", "message": f"the body is over {limits.max_body} bytes"})

    def stats(self) -> SiteStats:
        return SiteStats(self.name, len(self.deadlines), self.deadlines.expired, self.bodies_refused,
                         dict(self.responses), None if self.gate is None else dict(self.gate.refused))

    def gate_warn(self, reason: str, peer: Any) -> None:
        now = self.reactor.seconds()
        if now - self._gate_warned_at >= 60:
            self._gate_warned.clear()
            self._gate_warned_at = now
        host = getattr(peer, "host", None)
        if (host, reason) in self._gate_warned:
            return
        self._gate_warned.add((host, reason))
        if reason == CONNECTING_TOO_FAST:
            _log.warn("refusing connections from {client_address}: more than {rate} new ones a second",
                      client_address=host, rate=self.gate.rate.per_second)
        else:
            _log.warn("refusing connections from {client_address}: it has {count} open, the most allowed",
                      client_address=host, count=self.gate.max_per_address)

    def stopFactory(self) -> None:
        super().stopFactory()
        self.deadlines.stop()
        self.lingering.stop()

    def log(self, request: Request) -> None:
        self.responses[request.code] += 1
        super().log(request)

    def access_log_line(self, timestamp: str, request: Request) -> str:
        """
        One access log line: the client address (behind trusted proxies,
        the forwarded one), the method and path without the query string,
        status, size and user agent.  No referrer, no query.
        """
        path = request.path + (b"?..." if b"?" in request.uri else b"")
        return '"{}" - - {} "{} {} {}" {} {} "{}"'.format(
            _quoted(client_address(request)), timestamp,
            _quoted(request.method), _quoted(path), _quoted(request.clientproto),
            request.code, request.sentLength or "-",
            _quoted(request.getHeader(b"user-agent")),
        )


def make_site(
    relay: Relay,
    ws_factory: RelayServerFactory,
    spotify: SpotifyOAuth | None,
    bot_secret: str | None,
    reactor: Any = None,
    limits: HTTPLimits = HTTPLimits(),
    proxies: TrustedProxies | None = None,
    metrics: Any = None,
    hsts: bytes | None = HSTS,
    health_fields: Iterable[Callable[[], dict]] = (),
    challenges: Callable[[str], str | None] | None = None,
    gate: ConnectionGate | None = None,
) -> RelaySite:
    """
    The public site.  C{proxies} defaults to the WebSocket factory's;
    C{metrics} adds ``/metrics`` for loopback clients (and this site's
    figures to it); responses over TLS carry C{hsts}; C{health_fields} add
    to ``/health``; C{challenges} (token -> key authorization) answers
    ``/.well-known/acme-challenge/TOKEN`` for the relay's own ACME client;
    C{gate} counts its connections (with those of the other sites sharing
    it).
    """
    site = RelaySite(
        make_root(relay, ws_factory, spotify, bot_secret, metrics=metrics, health_fields=health_fields,
                  challenges=challenges),
        limits=limits,
        proxies=ws_factory.proxies if proxies is None else proxies,
        hsts=hsts,
        reactor=reactor,
        gate=gate,
        upgrade=ws_factory,
    )
    if metrics is not None:
        metrics.add_site(site)
    return site


def make_admin_site(
    relay: Relay,
    metrics: Any,
    reactor: Any = None,
    limits: HTTPLimits = HTTPLimits(),
    admin: Resource | None = None,
) -> RelaySite:
    """
    The site for C{--admin-listen} endpoints: C{/metrics} for anyone who can
    reach it, C{/health}, and C{admin} (L{leeloo.admin.api.AdminAPI}) at
    C{/admin/}.
    """
    root = Directory()
    root.putChild(b"metrics", MetricsResource(metrics, local_only=False))
    root.putChild(b"health", Health(relay))
    if admin is not None:
        root.putChild(b"admin", admin)
    site = RelaySite(root, limits=limits, name="admin", reactor=reactor)
    metrics.add_site(site)
    return site


# ------------------------------------------- port 80: ACME and redirects

ACME_CHALLENGE = b"/.well-known/acme-challenge/"
_TOKEN = re.compile(rb"[A-Za-z0-9_-]{1,256}")
_HOST = re.compile(r"([A-Za-z0-9-]{1,63}\.)*[A-Za-z0-9-]{1,63}|\[[0-9A-Fa-f:.]+\]")
MAX_CHALLENGE = 4096


class HTTPSRedirect(Resource):
    """
    Plain HTTP's only jobs: serve the ACME HTTP-01 challenge files certbot
    writes under C{webroot/.well-known/acme-challenge/} (no listings, no
    other files), and send everything else to the same path and query on
    https, permanently (301 for GET and HEAD, 308 otherwise, which keeps
    the method and body).
    """

    isLeaf = True

    def __init__(self, webroot: Path | None, tokens: Callable[[str], str | None] | None = None) -> None:
        super().__init__()
        self.challenges = None if webroot is None else Path(webroot) / ".well-known" / "acme-challenge"
        self.tokens = tokens

    def render(self, request: Request) -> bytes:
        if self.tokens is not None and request.path.startswith(ACME_CHALLENGE):
            answer = _from_memory(self.tokens, request, request.path[len(ACME_CHALLENGE):])
            if answer is not None or self.challenges is None:
                return answer if answer is not None else _text(request, 404, b"No such challenge.\n")
        if self.challenges is not None and request.path.startswith(ACME_CHALLENGE):
            return self._challenge(request, request.path[len(ACME_CHALLENGE):])
        host = _host_without_port((request.getHeader(b"host") or b"").decode("ascii", "replace"))
        if host is None:
            return _text(request, 400, b"A Host header naming this server is needed.\n")
        target = request.uri
        if not target.startswith(b"/"):
            parts = urlsplit(target)
            if not parts.scheme:
                return _text(request, 400, b"Bad request target.\n")
            target = (parts.path or b"/") + (b"?" + parts.query if parts.query else b"")
        location = b"https://" + host.encode("ascii") + target
        request.setResponseCode(301 if request.method in (b"GET", b"HEAD") else 308)
        request.setHeader(b"location", location)
        return _text(request, None, b"Moved to " + location + b"\n")

    def _challenge(self, request: Request, token: bytes) -> bytes:
        if request.method not in (b"GET", b"HEAD"):
            request.setHeader(b"allow", b"GET, HEAD")
            return _text(request, 405, b"Method not allowed.\n")
        if not _TOKEN.fullmatch(token):
            return _text(request, 404, b"No such challenge.\n")
        path = self.challenges / token.decode("ascii")
        body = None
        try:
            # A regular file only: not a symlink (to anywhere on the disk),
            # and not a FIFO or device that would block or never end.
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError:
            fd = None
        if fd is not None:
            with open(fd, "rb") as f:
                try:
                    if stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                        body = f.read(MAX_CHALLENGE + 1)
                except OSError:
                    pass
        if body is None or len(body) > MAX_CHALLENGE:
            return _text(request, 404, b"No such challenge.\n")
        return _text(request, 200, body)


def _from_memory(tokens: Callable[[str], str | None], request: Request, token: bytes) -> bytes | None:
    """
    The answer to an HTTP-01 challenge the relay's own ACME client holds in
    memory, or None when it holds no such token.
    """
    if request.method not in (b"GET", b"HEAD"):
        request.setHeader(b"allow", b"GET, HEAD")
        return _text(request, 405, b"Method not allowed.\n")
    if not _TOKEN.fullmatch(token):
        return None
    answer = tokens(token.decode("ascii"))
    if answer is None:
        return None
    return _text(request, 200, answer.encode("ascii"))


class ChallengeResponder(Resource):
    """
    C{/.well-known/acme-challenge/TOKEN} on the main site: the key
    authorizations of the relay's own ACME orders, from memory.
    """

    isLeaf = True

    def __init__(self, tokens: Callable[[str], str | None]) -> None:
        super().__init__()
        self.tokens = tokens

    def render(self, request: Request) -> bytes:
        token = b"/".join(request.postpath)
        answer = _from_memory(self.tokens, request, token)
        return answer if answer is not None else _text(request, 404, b"No such challenge.\n")


def _host_without_port(header: str) -> str | None:
    """
    The host of a Host header, lower case, without its port; None when it
    is not a plain name or address.
    """
    header = header.strip().lower()
    if header.startswith("["):
        end = header.find("]")
        host, rest = header[: end + 1], header[end + 1:]
        if end < 0 or rest and not (rest.startswith(":") and rest[1:].isdigit()):
            return None
    else:
        host, colon, port = header.partition(":")
        if colon and not port.isdigit():
            return None
    return host if _HOST.fullmatch(host) else None


def _text(request: Request, status: int | None, body: bytes) -> bytes:
    if status is not None:
        request.setResponseCode(status)
    request.setHeader(b"content-type", b"text/plain; charset=utf-8")
    request.setHeader(b"cache-control", b"no-store")
    return body


def make_redirect_site(webroot: Path | None, reactor: Any = None,
                       limits: HTTPLimits = HTTPLimits(),
                       challenges: Callable[[str], str | None] | None = None,
                       gate: ConnectionGate | None = None) -> RelaySite:
    """
    The Site of C{--redirect-listen}: ACME challenges from C{challenges}
    (the relay's own orders, in memory) and C{webroot} (certbot's), and a
    permanent redirect to https for everything else; hardened like the
    others (port 80 is as open to slow senders as 443).
    """
    return RelaySite(HTTPSRedirect(webroot, challenges), limits=limits, name="redirect", reactor=reactor,
                     gate=gate)
