"""
Public test doubles for the relay, like L{treq.testing}: a recording
L{FakePeer} for the core and a L{Device} driving the core through one, an
in-memory WebSocket client wired to the real Site, and a stand-in for
Spotify's accounts service (its consent redirect and token endpoint).
"""

from __future__ import annotations

import base64
import hashlib
import json
from typing import Any
from urllib.parse import parse_qs, urlencode

from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, fail
from twisted.test import iosim
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request
from zope.interface import implementer

from leeloo.core.peer import IPeer, Outgoing
from leeloo.store import MemoryStore, StoreError


@implementer(IPeer)
class FakePeer:
    """
    Records what the core sends it: C{sent} holds the decoded messages,
    C{closed} the C{(code, reason)} it was closed with.
    """

    def __init__(self) -> None:
        self.sent: list[dict] = []
        self.payloads: list[bytes] = []
        self.closed: tuple[int, str] | None = None
        self.paused = False

    def send(self, message: Outgoing) -> None:
        self.payloads.append(message.payload)
        self.sent.append(json.loads(message.payload))

    def close(self, code: int, reason: str) -> None:
        self.closed = (code, reason)

    def pause_reading(self) -> None:
        self.paused = True

    def resume_reading(self) -> None:
        self.paused = False

    def take(self) -> list[dict]:
        """
        Return and forget what was sent so far.
        """
        sent, self.sent = self.sent, []
        return sent


class Device:
    """
    One device connected to a relay core in memory: a L{FakePeer} and the
    session C{relay.connect} opened for it, driven by method calls.

    @ivar relay: the relay (a L{leeloo.relay.Relay}) it is connected to.
    @ivar peer: the L{FakePeer} recording what the relay sends it.
    @ivar session: its session on C{relay}.
    """

    def __init__(self, relay: Any, address: str | None = None) -> None:
        """
        Connect to C{relay} from C{address} (the client address the
        relay's per-address limits count; C{None} for none known).
        """
        self.relay = relay
        self.peer = FakePeer()
        self.session = relay.connect(self.peer, address)

    def send(self, **fields: Any) -> None:
        """
        Send the relay one text frame: C{fields} as a JSON object.
        """
        self.send_frame(json.dumps(fields).encode("utf-8"))

    def send_frame(self, data: bytes | str) -> None:
        """
        Send the relay one text frame of C{data} as it is (well-formed or
        not).
        """
        self.relay.receive(self.session, data)

    def take(self) -> list[dict]:
        """
        Return and forget the messages the relay sent it so far.
        """
        return self.peer.take()

    def last(self) -> dict:
        """
        The last message the relay sent it (forgetting all sent so far).
        """
        return self.take()[-1]

    def types(self) -> list[str]:
        """
        The C{type} of each message sent so far, forgetting them.
        """
        return [m["type"] for m in self.take()]

    def texts(self) -> list[str]:
        """
        The text of each crew C{message} sent so far, forgetting every
        message sent so far (whatever its type).
        """
        return [m["payload"]["text"] for m in self.take() if m["type"] == "message"]

    def prove(self) -> None:
        """
        The device proves it received everything sent so far (as its pong
        to a WebSocket ping sent now does).
        """
        self.relay.delivered(self.session, self.relay.delivery_mark(self.session))

    def close(self) -> None:
        """
        Its connection closes.
        """
        self.relay.disconnect(self.session)


class RecordingClientProtocol(WebSocketClientProtocol):
    """
    A real Autobahn client that records the messages it receives.  A
    refused handshake leaves C{opened} false and C{closed} true (its
    C{http_status_line} says why).
    """

    opened = False
    closed = False
    close_code: int | None = None

    def onConnect(self, response: Any) -> None:
        self.received: list[Any] = []
        self.binary: list[bytes] = []
        self.opened = False
        self.close_code: int | None = None
        self.closed = False

    def onOpen(self) -> None:
        self.opened = True

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        if isBinary:
            self.binary.append(payload)
        else:
            self.received.append(json.loads(payload))

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        self.closed = True
        self.close_code = code

    def send_json(self, message: Any) -> None:
        self.sendMessage(json.dumps(message).encode("utf-8"))

    def take(self) -> list[Any]:
        received, self.received = self.received, []
        return received


class MemoryWebSocketClients:
    """
    Connects real Autobahn clients to a real twisted.web C{site} entirely in
    memory (L{twisted.test.iosim}); C{flush()} moves every pending byte.
    """

    def __init__(self, site: Any, path: str = "/ws") -> None:
        self.site = site
        self.path = path
        self.pumps: list[iosim.IOPump] = []
        self._port = 40000

    def connect(self, protocol: type = RecordingClientProtocol, headers: dict | None = None,
                host: str = "127.0.0.1", options: dict | None = None) -> Any:
        """
        Connect a client from address C{host}, sending C{headers} with its
        handshake and with Autobahn C{options} set on its factory; return
        the client protocol once every byte has moved.
        """
        self._port += 1
        factory = WebSocketClientFactory(f"ws://127.0.0.1:8080{self.path}", headers=headers)
        factory.protocol = protocol
        if options:
            factory.setProtocolOptions(**options)
        server_address = IPv4Address("TCP", "127.0.0.1", 8080)
        client_address = IPv4Address("TCP", host, self._port)
        server = self.site.buildProtocol(client_address)
        client = factory.buildProtocol(server_address)
        pump = iosim.connect(
            server,
            iosim.FakeTransport(server, isServer=True, hostAddress=server_address, peerAddress=client_address),
            client,
            iosim.FakeTransport(client, isServer=False, hostAddress=client_address, peerAddress=server_address),
            greet=False,
        )
        self.pumps.append(pump)
        self.flush()
        return client

    def flush(self) -> None:
        for _ in range(20):
            if not any([pump.pump() for pump in self.pumps]):
                return


class FakeSpotifyAccounts(Resource):
    """
    Spotify's accounts service as its published contract describes it.

    ``GET /authorize`` (the consent screen, which says yes at once unless
    C{consent} is C{"deny"}): checks C{client_id}, C{response_type=code},
    the registered C{redirect_uri} and, when given, an S256
    C{code_challenge}; redirects (302) to the redirect URI with a new
    C{code} and the C{state} it was given (or C{error=access_denied}).  The
    code is bound to its challenge and redirect URI, and answers with
    C{tokens}.  C{authorizations} holds the query of each authorize
    request.

    ``POST /api/token`` with HTTP Basic auth (the app's client id and
    secret) and a form body (``grant_type=authorization_code``, ``code``,
    ``redirect_uri`` and, for a code with a challenge, ``code_verifier``);
    errors are JSON C{{"error", "error_description"}}.  C{refuse_verifier}
    makes it refuse a verifier from a client that also authenticates with
    its secret (what C{--spotify-pkce off} is for).

    C{codes} maps the codes it accepts (each once) to the tokens it answers
    with.  C{requests} holds the form fields of every token request (read
    from the body alone, as Spotify does), C{received} the same with the
    C{authorization} and C{content_type} headers.  C{fail_with} makes it
    answer every token request with that status: an HTML page, or
    C{fail_body} as JSON when set.

    Also the grants the relay uses for its devices: C{refresh_token}
    (C{refreshable} maps the refresh tokens it accepts to the answer, which
    holds a new C{refresh_token} or none; unknown ones are C{invalid_grant})
    and C{client_credentials} (a new app token C{fake-app-token-N} each
    time, valid C{app_expires_in} seconds, counted in C{app_tokens}).  And
    the Web API's ``GET /v1/search`` with C{Authorization: Bearer} of a
    live app token (else 401), answering Spotify's JSON shape
    C{{"tracks": {"items": [...]}}} with C{catalog[q]} (C{[]} for any other
    C{q}), cut to C{limit}; C{searches} holds each search's query
    parameters.  C{rate_limit} (seconds) answers every request 429 with
    that C{Retry-After}; C{slow} leaves every request unanswered (kept in
    C{held}); C{fail_with} fails searches too.

    And the player: ``GET /v1/me/player/currently-playing`` with
    C{Authorization: Bearer} of a user's live access token (one that a code
    exchange or a refresh answered, or the test put in C{user_tokens}; else
    401), answering C{playing}: C{None} is Spotify's 204 (nothing plays),
    else that JSON (L{currently_playing} builds Spotify's shape, with an
    C{item} of null for an ad).  C{player_requests} holds each request's
    C{authorization}.  With C{rotate}, each refresh answers a new refresh
    token (C{fake-refresh-rotated-N}, with access token
    C{fake-access-refreshed-N}) and the one spent is refused from then on
    (C{invalid_grant}), as Spotify's rotation does.
    """

    isLeaf = True

    def __init__(self, client_id: str, client_secret: str, redirect_uri: str) -> None:
        super().__init__()
        self.client_id = client_id
        self.client_secret = client_secret
        self.redirect_uri = redirect_uri
        self.codes: dict[str, dict] = {}
        # code -> (its S256 challenge or None, the redirect URI it was issued for)
        self.challenges: dict[str, tuple[str | None, str]] = {}
        self.requests: list[dict] = []
        self.received: list[dict] = []
        self.authorizations: list[dict] = []
        self.fail_with: int | None = None
        self.fail_body: dict | None = None
        self.consent = "allow"
        self.refuse_verifier = False
        self.tokens = {"access_token": "fake-access-token", "refresh_token": "fake-refresh-token",
                       "expires_in": 3600}
        self._issued = 0
        self.refreshable: dict[str, dict] = {}
        self.app_tokens: list[str] = []
        self.app_expires_in = 3600
        self.catalog: dict[str, list] = {}
        self.searches: list[dict] = []
        self.rate_limit: int | None = None
        self.slow = False
        self.held: list[Request] = []
        self.user_tokens: set[str] = set()
        self.playing: dict | None = None
        self.player_requests: list[str] = []
        self.rotate = False
        self._rotated = 0

    def _json(self, request: Request, status: int, body: dict) -> bytes:
        request.setResponseCode(status)
        request.setHeader(b"content-type", b"application/json")
        return json.dumps(body).encode()

    def _error(self, request: Request, status: int, error: str, description: str) -> bytes:
        return self._json(request, status, {"error": error, "error_description": description})

    def _hold_or_limit(self, request: Request) -> bytes | None:
        if self.slow:
            self.held.append(request)
            return NOT_DONE_YET
        if self.rate_limit is not None:
            request.setHeader(b"retry-after", str(self.rate_limit).encode())
            return self._json(request, 429, {"error": {"status": 429, "message": "API rate limit exceeded"}})
        return None

    def _held_or_failing(self, request: Request) -> bytes | None:
        """
        What the Web API answers instead, while held, rate limited or told
        to fail (C{fail_with}); otherwise C{None}.
        """
        held = self._hold_or_limit(request)
        if held is not None:
            return held
        if self.fail_with is not None:
            request.setResponseCode(self.fail_with)
            return b"<html>upstream trouble</html>"
        return None

    def _search(self, request: Request) -> bytes:
        query = {k.decode(): v[0].decode() for k, v in request.args.items()}
        authorization = (request.getHeader(b"authorization") or b"").decode("latin-1")
        self.searches.append({**query, "authorization": authorization})
        refused = self._held_or_failing(request)
        if refused is not None:
            return refused
        if not authorization.startswith("Bearer ") or authorization[7:] not in self.app_tokens[-1:]:
            return self._json(request, 401, {"error": {"status": 401, "message": "Invalid access token"}})
        if query.get("type") != "track" or not query.get("q"):
            return self._json(request, 400, {"error": {"status": 400, "message": "Bad search"}})
        limit = int(query.get("limit", "20"))
        items = self.catalog.get(query["q"], [])[:limit]
        return self._json(request, 200, {"tracks": {"href": "x", "items": items, "limit": limit, "total": len(items)}})

    def _player(self, request: Request) -> bytes:
        authorization = (request.getHeader(b"authorization") or b"").decode("latin-1")
        self.player_requests.append(authorization)
        refused = self._held_or_failing(request)
        if refused is not None:
            return refused
        if not authorization.startswith("Bearer ") or authorization[7:] not in self.user_tokens:
            return self._json(request, 401, {"error": {"status": 401, "message": "The access token expired"}})
        if self.playing is None:
            request.setResponseCode(204)
            return b""
        return self._json(request, 200, self.playing)

    def _refresh_answer(self, refresh_token: str) -> dict | None:
        answer = self.refreshable.get(refresh_token)
        if answer is None:
            return None
        if self.rotate:
            self._rotated += 1
            del self.refreshable[refresh_token]
            answer = {"access_token": f"fake-access-refreshed-{self._rotated}",
                      "refresh_token": f"fake-refresh-rotated-{self._rotated}",
                      "expires_in": answer.get("expires_in", 3600)}
            self.refreshable[answer["refresh_token"]] = dict(answer)
        if isinstance(answer.get("access_token"), str):
            self.user_tokens.add(answer["access_token"])
        return answer

    def render_GET(self, request: Request) -> bytes:
        if request.postpath == [b"v1", b"search"]:
            return self._search(request)
        if request.postpath == [b"v1", b"me", b"player", b"currently-playing"]:
            return self._player(request)
        if request.postpath == [b"api", b"token"]:
            request.setResponseCode(405)
            request.setHeader(b"allow", b"POST")
            return b"method not allowed"
        if request.postpath != [b"authorize"]:
            request.setResponseCode(404)
            return b"not found"
        query = {k.decode(): v[0].decode() for k, v in request.args.items()}
        self.authorizations.append(query)
        request.setHeader(b"content-type", b"text/plain")
        if query.get("client_id") != self.client_id:
            request.setResponseCode(400)
            return b"INVALID_CLIENT: Invalid client"
        if query.get("redirect_uri") != self.redirect_uri:
            request.setResponseCode(400)
            return b"INVALID_CLIENT: Invalid redirect URI"
        if query.get("response_type") != "code":
            request.setResponseCode(400)
            return b"unsupported_response_type"
        challenge = query.get("code_challenge")
        if challenge is not None and query.get("code_challenge_method") != "S256":
            request.setResponseCode(400)
            return b"invalid code_challenge_method"
        answer: dict = {}
        if self.consent == "deny":
            answer["error"] = "access_denied"
        else:
            self._issued += 1
            code = f"fake-code-{self._issued}"
            self.codes[code] = dict(self.tokens)
            self.challenges[code] = (challenge, query["redirect_uri"])
            answer["code"] = code
        if "state" in query:
            answer["state"] = query["state"]
        request.setResponseCode(302)
        request.setHeader(b"location", (self.redirect_uri + "?" + urlencode(answer)).encode("ascii"))
        return b""

    def render_POST(self, request: Request) -> bytes:
        if request.postpath != [b"api", b"token"]:
            request.setResponseCode(404)
            return b"not found"
        request.content.seek(0)
        form = {
            k.decode(): v[0].decode()
            for k, v in parse_qs(request.content.read(), keep_blank_values=True).items()
        }
        authorization = request.getHeader(b"authorization")
        content_type = request.getHeader(b"content-type")
        self.requests.append(form)
        self.received.append(
            {
                "authorization": authorization.decode("latin-1") if authorization else None,
                "content_type": content_type.decode("latin-1") if content_type else None,
                "form": form,
            }
        )
        held = self._hold_or_limit(request)
        if held is not None:
            return held
        if self.fail_with is not None:
            if self.fail_body is not None:
                return self._json(request, self.fail_with, self.fail_body)
            request.setResponseCode(self.fail_with)
            request.setHeader(b"content-type", b"text/html")
            return b"<html>upstream trouble</html>"
        expected = b"Basic " + base64.b64encode(f"{self.client_id}:{self.client_secret}".encode())
        if authorization != expected:
            return self._error(request, 400, "invalid_client", "Invalid client")
        if (content_type or b"").split(b";")[0].strip() != b"application/x-www-form-urlencoded":
            return self._error(request, 400, "invalid_request", "form body expected")
        if form.get("grant_type") == "refresh_token":
            answer = self._refresh_answer(form.get("refresh_token", ""))
            if answer is None:
                return self._error(request, 400, "invalid_grant", "Invalid refresh token")
            return self._json(request, 200, {"token_type": "Bearer", **answer})
        if form.get("grant_type") == "client_credentials":
            token = f"fake-app-token-{len(self.app_tokens) + 1}"
            self.app_tokens.append(token)
            return self._json(request, 200, {"access_token": token, "token_type": "Bearer",
                                             "expires_in": self.app_expires_in})
        if form.get("grant_type") != "authorization_code":
            return self._error(request, 400, "unsupported_grant_type", "grant_type must be authorization_code")
        if not form.get("code"):
            return self._error(request, 400, "invalid_request", "code must be supplied")
        if form.get("redirect_uri") != self.redirect_uri:
            return self._error(request, 400, "invalid_grant", "Invalid redirect URI")
        verifier = form.get("code_verifier")
        if verifier is not None and self.refuse_verifier:
            return self._error(request, 400, "invalid_request", "code_verifier with a client secret")
        challenge, issued_for = self.challenges.get(form["code"], (None, self.redirect_uri))
        if issued_for != form["redirect_uri"]:
            return self._error(request, 400, "invalid_grant", "Invalid redirect URI")
        if challenge is not None and (verifier is None or _s256(verifier) != challenge):
            self.codes.pop(form["code"], None)
            return self._error(request, 400, "invalid_grant", "code_verifier was incorrect")
        tokens = self.codes.pop(form["code"], None)
        self.challenges.pop(form["code"], None)
        if tokens is None:
            return self._error(request, 400, "invalid_grant", "Invalid authorization code")
        if isinstance(tokens.get("access_token"), str):
            self.user_tokens.add(tokens["access_token"])
        return self._json(
            request, 200, {"token_type": "Bearer", "scope": "user-read-playback-state", **tokens}
        )

    def issue(self, code: str, access_token: str, refresh_token: str, expires_in: int = 3600,
              code_challenge: str | None = None) -> None:
        """
        Accept C{code} once (bound to C{code_challenge}, when given), for
        these tokens.
        """
        self.codes[code] = {
            "access_token": access_token,
            "refresh_token": refresh_token,
            "expires_in": expires_in,
        }
        if code_challenge is not None:
            self.challenges[code] = (code_challenge, self.redirect_uri)


def _s256(verifier: str) -> str:
    digest = hashlib.sha256(verifier.encode("ascii")).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def currently_playing(item: dict | None, kind: str = "track") -> dict:
    """
    Spotify's C{/v1/me/player/currently-playing} answer: C{item} (a track
    as L{spotify_track} gives it, or C{None}: an ad, C{kind} C{"ad"}).
    """
    return {"timestamp": 1700000000000, "progress_ms": 42000, "is_playing": True,
            "currently_playing_type": kind, "item": item, "context": None,
            "actions": {"disallows": {"resuming": True}}}


def strip_keys(received: list) -> list:
    """
    C{received} with the C{device_key} the relay issues left out of each
    message, for tests about something else.
    """
    return [{k: v for k, v in m.items() if k != "device_key"} for m in received]


class FailingMemoryStore(MemoryStore):
    """
    A L{MemoryStore} the test can make fail: while C{fail_with} is an
    exception, every write (its pairings' too) fails with a L{StoreError}
    carrying its message and applies nothing.
    """

    def __init__(self) -> None:
        super().__init__()
        self.fail_with: Exception | None = None

    def _pairings_fail(self) -> Exception | None:
        return self.fail_with

    def write(self, ops: list) -> Deferred:
        if self.fail_with is not None:
            return fail(StoreError(str(self.fail_with)))
        return super().write(ops)


def spotify_track(uri: str, name: str, artists: list[str], album: str, art: str | None = None) -> dict:
    """
    A track as Spotify's C{/v1/search} lists it (the fields the relay reads,
    and a few it does not).
    """
    return {
        "uri": uri, "name": name, "id": uri.rsplit(":", 1)[-1], "type": "track", "popularity": 50,
        "artists": [{"name": a, "type": "artist"} for a in artists],
        "album": {"name": album, "images": [{"url": art, "height": 640, "width": 640}] if art else []},
    }
