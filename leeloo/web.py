"""
The HTTP site: the landing page, ``/health``, ``/ws``, the Spotify OAuth
callback and the Telegram bot API, with one JSON error mapping.

Resources only translate HTTP to L{leeloo.relay.Relay} calls and back.
"""

from __future__ import annotations

import hmac
import json
from typing import Any, Callable

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
    isLeaf = True

    def __init__(self, relay: Relay) -> None:
        super().__init__()
        self.relay = relay

    def render_GET(self, request: Request) -> bytes:
        return write_json(request, 200, self.relay.health())


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
) -> Resource:
    root = Resource()
    root.putChild(b"", Landing())
    root.putChild(b"index.html", Landing())
    root.putChild(b"health", Health(relay))
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
) -> Site:
    site = Site(make_root(relay, ws_factory, spotify, bot_secret), reactor=reactor)
    site.displayTracebacks = False
    return site
