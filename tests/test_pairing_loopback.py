"""
The whole Spotify pairing on real loopback sockets: the relay's service
tree serving TLS with a certificate from a throwaway CA, a stand-in for
Spotify's accounts service (its consent redirect and token endpoint, as
published) on its own port, the device client library as the LEELOO, and
a real HTTP client with a cookie jar that follows redirects as the phone
(over TLS, so that the Secure cookie is sent).
"""

from __future__ import annotations

import json
import socket
from http.cookiejar import CookieJar
from pathlib import Path

from treq.client import HTTPClient
from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.endpoints import serverFromString
from twisted.internet.ssl import Certificate
from twisted.trial.unittest import TestCase
from twisted.web.client import Agent, BrowserLikePolicyForHTTPS, HTTPConnectionPool
from twisted.web.server import Site

from leeloo import tap
from leeloo.spotify import SpotifyConfig
from leeloo.testca import ThrowawayCA, cert_pem
from leeloo.testing import FakeSpotifyAccounts

from .device.loopback import start_device
from .support import listening_port

CLIENT_ID = "loopback-client-id"
CLIENT_SECRET = "loopback-client-secret"
TOKENS = {"access_token": "loopback-access", "refresh_token": "loopback-refresh", "expires_in": 3600}


def free_port() -> int:
    """
    A loopback port free now (the relay's redirect URI must name its port
    before it listens).
    """
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class WholePairingTests(TestCase):
    timeout = 30

    @inlineCallbacks
    def setUp(self):
        self.accounts = FakeSpotifyAccounts(CLIENT_ID, CLIENT_SECRET, "")
        self.accounts.tokens = dict(TOKENS)
        accounts_port = yield serverFromString(reactor, "tcp:0:interface=127.0.0.1").listen(Site(self.accounts))
        self.addCleanup(accounts_port.stopListening)
        self.accounts_url = accounts_url = f"http://127.0.0.1:{accounts_port.getHost().port}"

        self.ca = ThrowawayCA()
        issued = self.ca.issue(["127.0.0.1"])
        directory = Path(self.mktemp())
        directory.mkdir()
        (directory / "key.pem").write_bytes(issued.key_pem)
        (directory / "cert.pem").write_bytes(cert_pem(issued.cert))
        (directory / "chain.pem").write_bytes(cert_pem(self.ca.intermediate))
        port = free_port()
        redirect_uri = f"https://127.0.0.1:{port}/spotify/callback"
        self.accounts.redirect_uri = redirect_uri
        listen = (f"ssl:{port}:interface=127.0.0.1:privateKey={directory / 'key.pem'}:"
                  f"certKey={directory / 'cert.pem'}:extraCertChain={directory / 'chain.pem'}")
        data = directory / "data"
        data.mkdir(mode=0o700)
        config = tap.Config(listen=(listen,), data_dir=data, store="memory",
                            spotify=SpotifyConfig(CLIENT_ID, CLIENT_SECRET, redirect_uri, accounts_url=accounts_url))
        self.service = tap.build_service(config, reactor)
        self.service.startService()
        self.addCleanup(self.service.stopService)
        bound = yield listening_port(self.service)
        self.assertEqual(bound.getHost().port, port)
        self.port = port
        self.relay_url = f"wss://127.0.0.1:{port}/ws"

        pool = HTTPConnectionPool(reactor, persistent=False)
        self.addCleanup(pool.closeCachedConnections)
        self.agent = agent = Agent(reactor, contextFactory=BrowserLikePolicyForHTTPS(Certificate.loadPEM(self.ca.root_pem)),
                      pool=pool)
        self.cookies = CookieJar()
        self.phone = HTTPClient(agent, cookiejar=self.cookies)

    @inlineCallbacks
    def test_device_to_tokens(self):
        """
        The device asks for a pairing and shows its URL and code; the phone
        opens the URL over TLS and sees the device and the code; its button
        takes it (303, with the Secure cookie) to the stand-in's consent,
        which sends it back to the callback with a code and the state; the
        relay exchanges the code with the client secret and the PKCE
        verifier; the device receives spotify_auth_complete and saves the
        tokens; the phone sees that it worked.
        """
        device, events = start_device(self, self.relay_url, "Kitchen", trust_root=Certificate.loadPEM(self.ca.root_pem))
        connected = yield events.wait("connected", after=0)
        answer = yield device.pair_spotify()
        self.assertTrue(answer["url"].startswith(f"https://127.0.0.1:{self.port}/pair/"), answer["url"])

        page = yield self.phone.get(answer["url"])
        text = yield page.text()
        self.assertEqual(page.code, 200)
        self.assertIn(answer["user_code"], text)
        self.assertIn("Kitchen", text)
        self.assertIn(connected["crew_code"], text)

        arrived = events.wait("spotify_auth_complete")
        response = yield self.phone.post(answer["url"], data={})
        body = yield response.text()
        self.assertEqual(response.code, 200, body)
        self.assertIn("Spotify is connected", body)
        hops = [(r.code, r.request.absoluteURI.decode()) for r in response.history()]
        self.assertEqual([code for code, _ in hops], [303, 302])
        self.assertEqual(hops[0][1], answer["url"])
        self.assertTrue(hops[1][1].startswith(self.accounts_url + "/authorize?"), hops)

        frame = yield arrived
        self.assertEqual(frame["tokens"], TOKENS)
        with open(device.state.path("spotify_tokens.json")) as f:
            self.assertEqual(json.load(f), TOKENS)
        [exchange] = self.accounts.received
        self.assertTrue(exchange["authorization"].startswith("Basic "))
        self.assertEqual(set(exchange["form"]), {"grant_type", "code", "redirect_uri", "code_verifier"})
        self.assertEqual(self.accounts.authorizations[0]["code_challenge_method"], "S256")

    @inlineCallbacks
    def test_secure_cookie_sent_back_over_tls(self):
        """
        The button's cookie is kept by the phone as Secure and httpOnly,
        for the callback path only; a phone without it (another browser)
        gets the wrong-browser page and the device nothing.
        """
        device, events = start_device(self, self.relay_url, "Kitchen", trust_root=Certificate.loadPEM(self.ca.root_pem))
        yield events.wait("connected", after=0)
        answer = yield device.pair_spotify()
        pressed = yield self.phone.post(answer["url"], data={}, allow_redirects=False)
        self.assertEqual(pressed.code, 303)
        yield pressed.text()
        [cookie] = [c for c in self.cookies if c.name == "leeloo_pair"]
        self.assertTrue(cookie.secure)
        self.assertTrue(cookie.has_nonstandard_attr("HttpOnly"))
        self.assertEqual(cookie.path, "/spotify/callback")
        [location] = pressed.headers.getRawHeaders(b"location")
        consent = yield self.phone.get(location.decode(), allow_redirects=False)
        [back] = consent.headers.getRawHeaders(b"location")
        yield consent.text()
        other_browser = HTTPClient(self.agent, cookiejar=CookieJar())
        refused = yield other_browser.get(back.decode())
        text = yield refused.text()
        self.assertEqual(refused.code, 403)
        self.assertIn("phone that pressed the button", text)
        self.assertEqual(events.frames("spotify_auth_complete"), [])
        self.assertEqual(self.accounts.received, [])
