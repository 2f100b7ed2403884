"""
The HTTP site: the landing page, ``/health``, ``/ws``, the Spotify OAuth
callback and the Telegram bot API, with one JSON error mapping.

Resources only translate HTTP to L{leeloo.relay.Relay} calls and back.
"""

from __future__ import annotations

import hmac
import json
import re
from pathlib import Path
from typing import Any, Callable, Iterable
from urllib.parse import urlsplit

from autobahn.twisted.resource import WebSocketResource
from twisted.internet.defer import maybeDeferred
from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from leeloo import messages, pages
from leeloo.messages import InvalidCrewCode, NotInCrew, ProtocolError, RateLimited, StoreUnavailable
from leeloo.relay import Relay
from leeloo.spotify import SpotifyError, SpotifyOAuth
from leeloo.websocket import RelayServerFactory

MAX_BODY = 64 * 1024
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
    if isinstance(e, RateLimited):
        return APIError(429, e.code, e.message, retry_after=e.retry_after)
    if isinstance(e, StoreUnavailable):
        return APIError(503, e.code, e.message)
    if isinstance(e, InvalidCrewCode):
        return APIError(404, "crew_not_found", e.message)
    if isinstance(e, NotInCrew):
        return APIError(403, "not_in_crew", e.message)
    return APIError(400, e.code, e.message)


def write_json(request: Request, status: int, body: Any) -> bytes:
    request.setResponseCode(status)
    request.setHeader(b"content-type", b"application/json")
    request.setHeader(b"cache-control", b"no-store")
    return json.dumps(body).encode("utf-8")


def write_html(request: Request, status: int, page: bytes) -> bytes:
    request.setResponseCode(status)
    request.setHeader(b"content-type", b"text/html; charset=utf-8")
    return page


class Landing(Resource):
    isLeaf = True

    def render_GET(self, request: Request) -> bytes:
        return write_html(request, 200, pages.LANDING)

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
        body = self.relay.health()
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
    ``GET /spotify/callback?code=..&state=DEVICE_ID``: exchange the code and
    hand the tokens to the device.
    """

    isLeaf = True
    log = Logger()

    def __init__(self, relay: Relay, spotify: SpotifyOAuth | None) -> None:
        super().__init__()
        self.relay = relay
        self.spotify = spotify

    def render_GET(self, request: Request) -> Any:
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
        if self.spotify is None:
            return write_html(request, 503, pages.unavailable("Spotify is not set up on this relay."))

        finished = request.notifyFinish()
        finished.addErrback(lambda _: None)

        def exchanged(tokens: dict) -> None:
            online = self.relay.deliver_tokens(device_id, tokens)
            self.log.info(
                "Spotify tokens for {device_id} {how}",
                device_id=device_id,
                how="delivered" if online else "kept until it comes back",
            )
            respond(200, pages.spotify_connected())

        def failed(failure: Any) -> None:
            e = failure.check(SpotifyError) and failure.value
            if not e:
                self.log.failure("Spotify exchange failed", failure)
                respond(502, pages.spotify_failed("something went wrong"))
                return
            self.log.warn("Spotify refused a code exchange: {error}", error=e.error)
            # Only a refused code is the phone's request gone bad; anything
            # else (Spotify down, our credentials, an odd answer) is upstream.
            respond(400 if e.error == "invalid_grant" else 502,
                    pages.spotify_failed(e.description))

        def respond(status: int, page: bytes) -> None:
            if finished.called:
                return
            request.write(write_html(request, status, page))
            request.finish()

        self.spotify.exchange_code(code).addCallback(exchanged).addErrback(failed)
        return NOT_DONE_YET


# --------------------------------------------------------------- bot API


def _field(body: dict, name: str, default: Any = None) -> str:
    value = body.get(name, default)
    if value is None or value == "":
        raise APIError(400, f"{name} required")
    if not isinstance(value, str):
        raise APIError(400, f"{name} must be a string")
    value = value.strip()
    if not value:
        raise APIError(400, f"{name} required")
    if len(value) > messages.MAX_FIELD_LENGTH:
        raise APIError(400, f"{name} too long")
    return value


def _user_id(body: dict) -> str:
    value = body.get("telegram_user_id")
    if isinstance(value, bool):
        raise APIError(400, "telegram_user_id must be a string or an integer")
    if isinstance(value, int):
        return str(value)
    return _field(body, "telegram_user_id")[: messages.MAX_DEVICE_ID_LENGTH]


def _name(body: dict, name: str) -> str:
    return _field(body, name)[: messages.MAX_NAME_LENGTH]


def _crew_code(value: str) -> str:
    try:
        return messages.normalize_crew_code(value)
    except ProtocolError as e:
        raise APIError(400, e.message) from None


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
        }

    def render(self, request: Request) -> Any:
        path = b"/".join(request.postpath).rstrip(b"/")
        d = maybeDeferred(self._dispatch, request, path)
        d.addCallbacks(lambda answer: (200, answer), self._error, errbackArgs=(path,))
        d.addCallback(self._answer, request)
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

    def _answer(self, answer: tuple[int, dict], request: Request) -> None:
        if request._disconnected or request.finished:
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
            self.log.warn("bot API call with a wrong or missing secret from {peer}",
                          peer=getattr(request.getClientAddress(), "host", None))
            raise APIError(401, "unauthorized")

    def _body(self, request: Request) -> dict:
        content_type = (request.getHeader(b"content-type") or b"").split(b";")[0].strip().lower()
        if content_type != b"application/json":
            raise APIError(400, "invalid_content_type", "send a JSON body (Content-Type: application/json)")
        raw = request.content.read(MAX_BODY + 1)
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
        return {"crew_code": self.relay.bot_create_crew(user, name)}

    def join(self, request: Request) -> dict:
        body = self._body(request)
        user, code, name = _user_id(body), _crew_code(_field(body, "crew_code")), _name(body, "display_name")
        code, online = self.relay.bot_join_crew(user, code, name)
        return {"success": True, "crew_code": code, "devices_online": online}

    def message(self, request: Request) -> dict:
        body = self._body(request)
        user = _user_id(body)
        code = _crew_code(_field(body, "crew_code"))
        sender = _name(body, "sender_name")
        msg_type = _field(body, "msg_type", "text")[: messages.MAX_TYPE_LENGTH]
        payload = body.get("payload")
        if payload is None:
            payload = {}
        if not isinstance(payload, dict):
            raise APIError(400, "payload must be an object")
        d = self.relay.bot_message(user, code, sender, msg_type, payload)
        return d.addCallback(lambda reached: {"success": True, "devices_reached": reached})

    def status(self, request: Request) -> dict:
        code = _arg(request, b"crew_code")
        if code is None:
            raise APIError(400, "crew_code required")
        return self.relay.crew_status(_crew_code(code))


def make_root(
    relay: Relay,
    ws_factory: RelayServerFactory,
    spotify: SpotifyOAuth | None,
    bot_secret: str | None,
    health_fields: Iterable[Callable[[], dict]] = (),
) -> Resource:
    root = Resource()
    root.putChild(b"", Landing())
    root.putChild(b"index.html", Landing())
    root.putChild(b"health", Health(relay, health_fields))
    root.putChild(b"ws", WebSocketResource(ws_factory))
    spotify_root = Resource()
    spotify_root.putChild(b"callback", SpotifyCallback(relay, spotify))
    root.putChild(b"spotify", spotify_root)
    api = Resource()
    api.putChild(b"telegram", BotAPI(relay, bot_secret))
    root.putChild(b"api", api)
    return root


def make_site(
    relay: Relay,
    ws_factory: RelayServerFactory,
    spotify: SpotifyOAuth | None,
    bot_secret: str | None,
    reactor: Any = None,
    health_fields: Iterable[Callable[[], dict]] = (),
) -> Site:
    site = RelaySite(make_root(relay, ws_factory, spotify, bot_secret, health_fields), reactor=reactor)
    site.displayTracebacks = False
    return site


class RelaySite(Site):
    """
    The relay's Site: responses over TLS carry HSTS.
    """

    def getResourceFor(self, request: Request) -> Resource:
        if request.isSecure():
            request.setHeader(b"strict-transport-security", HSTS)
        return super().getResourceFor(request)


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

    def __init__(self, webroot: Path | None) -> None:
        super().__init__()
        self.challenges = None if webroot is None else Path(webroot) / ".well-known" / "acme-challenge"

    def render(self, request: Request) -> bytes:
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
            if path.is_file():
                with open(path, "rb") as f:
                    body = f.read(MAX_CHALLENGE + 1)
        except OSError:
            pass
        if body is None or len(body) > MAX_CHALLENGE:
            return _text(request, 404, b"No such challenge.\n")
        return _text(request, 200, body)


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


def make_redirect_site(webroot: Path | None, reactor: Any = None) -> Site:
    """
    The Site of C{--redirect-listen}: ACME challenges from C{webroot}, and
    a permanent redirect to https for everything else.
    """
    site = Site(HTTPSRedirect(webroot), reactor=reactor)
    site.displayTracebacks = False
    return site
