"""
Public test doubles for the relay, like L{treq.testing}: a recording
L{FakePeer} for the core, an in-memory WebSocket client wired to the real
Site, and a stand-in for Spotify's token endpoint.
"""

from __future__ import annotations

import base64
import json
from typing import Any, Callable

from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from twisted.internet.address import IPv4Address
from twisted.test import iosim
from twisted.web.resource import Resource
from twisted.web.server import Request
from zope.interface import implementer

from leeloo.relay import IPeer, Outgoing


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

    def send(self, message: Outgoing) -> None:
        self.payloads.append(message.payload)
        self.sent.append(json.loads(message.payload))

    def close(self, code: int, reason: str) -> None:
        self.closed = (code, reason)

    def take(self) -> list[dict]:
        """
        Return and forget what was sent so far.
        """
        sent, self.sent = self.sent, []
        return sent


class RecordingClientProtocol(WebSocketClientProtocol):
    """
    A real Autobahn client that records the messages it receives.
    """

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

    def connect(self, protocol: type = RecordingClientProtocol, headers: dict | None = None) -> Any:
        self._port += 1
        factory = WebSocketClientFactory(f"ws://127.0.0.1:8080{self.path}", headers=headers)
        factory.protocol = protocol
        server_address = IPv4Address("TCP", "127.0.0.1", 8080)
        client_address = IPv4Address("TCP", "127.0.0.1", self._port)
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
    Spotify's accounts service as its published contract describes it:
    ``POST /api/token`` with HTTP Basic auth and a form body.  C{codes} maps
    the codes it accepts to the tokens it answers with; C{fail_with} makes
    it answer every request with that status.
    """

    isLeaf = True

    def __init__(self, client_id: str, client_secret: str, redirect_uri: str) -> None:
        super().__init__()
        self.client_id = client_id
        self.client_secret = client_secret
        self.redirect_uri = redirect_uri
        self.codes: dict[str, dict] = {}
        self.requests: list[dict] = []
        self.fail_with: int | None = None

    def _error(self, request: Request, status: int, error: str, description: str) -> bytes:
        request.setResponseCode(status)
        request.setHeader(b"content-type", b"application/json")
        return json.dumps({"error": error, "error_description": description}).encode()

    def render_POST(self, request: Request) -> bytes:
        if request.postpath != [b"api", b"token"]:
            request.setResponseCode(404)
            return b"not found"
        form = {k.decode(): v[0].decode() for k, v in request.args.items()}
        self.requests.append(form)
        if self.fail_with is not None:
            request.setResponseCode(self.fail_with)
            request.setHeader(b"content-type", b"text/html")
            return b"<html>upstream trouble</html>"
        expected = base64.b64encode(f"{self.client_id}:{self.client_secret}".encode())
        if request.getHeader(b"authorization") != "Basic " + expected.decode():
            return self._error(request, 400, "invalid_client", "Invalid client")
        if request.getHeader(b"content-type") != "application/x-www-form-urlencoded":
            return self._error(request, 400, "invalid_request", "form body expected")
        if form.get("grant_type") != "authorization_code":
            return self._error(request, 400, "unsupported_grant_type", "grant_type must be authorization_code")
        if form.get("redirect_uri") != self.redirect_uri:
            return self._error(request, 400, "invalid_grant", "Invalid redirect URI")
        tokens = self.codes.pop(form.get("code", ""), None)
        if tokens is None:
            return self._error(request, 400, "invalid_grant", "Invalid authorization code")
        request.setHeader(b"content-type", b"application/json")
        return json.dumps(
            {"token_type": "Bearer", "scope": "user-read-playback-state", **tokens}
        ).encode()

    def issue(self, code: str, access_token: str, refresh_token: str, expires_in: int = 3600) -> None:
        self.codes[code] = {
            "access_token": access_token,
            "refresh_token": refresh_token,
            "expires_in": expires_in,
        }
