"""
Plain HTTP on --redirect-listen: ACME HTTP-01 challenge files from the
webroot, and a permanent redirect to https for everything else.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from treq.testing import StubTreq
from twisted.internet import defer, reactor, threads
from twisted.trial.unittest import SynchronousTestCase, TestCase

from leeloo.web import HTTPSRedirect, make_redirect_site

from .test_limits_loopback import raw_answer

TOKEN = "aBcD-123_xyz"


class RedirectTests(SynchronousTestCase):
    def setUp(self):
        self.webroot = Path(tempfile.mkdtemp(prefix="leeloo-acme-"))
        self.addCleanup(shutil.rmtree, self.webroot, True)
        challenges = self.webroot / ".well-known" / "acme-challenge"
        challenges.mkdir(parents=True)
        (challenges / TOKEN).write_bytes(b"aBcD-123_xyz.thumbprint")
        (self.webroot / "secret.txt").write_bytes(b"not for the world")
        self.http = StubTreq(HTTPSRedirect(self.webroot))

    def request(self, method, url, **kwargs):
        response = self.successResultOf(self.http.request(method, url, allow_redirects=False, **kwargs))
        body = self.successResultOf(response.content())
        return response, body

    def test_get_redirects_permanently_with_path_and_query(self):
        """
        GET anything else answers 301 to the same path and query on https.
        """
        response, _ = self.request("GET", "http://relay.example/spotify/callback?code=a&state=b")
        self.assertEqual(response.code, 301)
        self.assertEqual(response.headers.getRawHeaders("location"),
                         ["https://relay.example/spotify/callback?code=a&state=b"])

    def test_head_is_301_and_post_is_308(self):
        """
        HEAD gets 301; other methods get 308, which keeps method and body.
        """
        head, _ = self.request("HEAD", "http://relay.example/")
        post, _ = self.request("POST", "http://relay.example/api/telegram/message", data=b"{}")
        self.assertEqual((head.code, post.code), (301, 308))
        self.assertEqual(post.headers.getRawHeaders("location"), ["https://relay.example/api/telegram/message"])

    def test_port_dropped_from_host(self):
        """
        The Host header's port is not carried to the https URL.
        """
        response, _ = self.request("GET", "http://relay.example:8080/ws")
        self.assertEqual(response.headers.getRawHeaders("location"), ["https://relay.example/ws"])

    def test_bad_host_refused(self):
        """
        A Host that is not a plain name is answered 400, not redirected.
        """
        response, _ = self.request("GET", "http://relay.example/", headers={"Host": ["evil.example/@x"]})
        self.assertEqual(response.code, 400)

    def test_challenge_served(self):
        """
        A challenge file certbot wrote is served as it is.
        """
        response, body = self.request("GET", f"http://relay.example/.well-known/acme-challenge/{TOKEN}")
        self.assertEqual((response.code, body), (200, b"aBcD-123_xyz.thumbprint"))

    def test_no_directory_listing(self):
        """
        The challenge directory itself is not listed.
        """
        response, body = self.request("GET", "http://relay.example/.well-known/acme-challenge/")
        self.assertEqual(response.code, 404)
        self.assertNotIn(TOKEN.encode(), body)

    def test_nothing_outside_challenges(self):
        """
        Names that are not tokens (paths, dots) find nothing.
        """
        for path in ["../../secret.txt", "..%2F..%2Fsecret.txt", "missing-token"]:
            response, body = self.request("GET", f"http://relay.example/.well-known/acme-challenge/{path}")
            self.assertEqual(response.code, 404, path)
            self.assertNotIn(b"not for the world", body)

    def test_without_webroot_everything_redirects(self):
        """
        Without --acme-webroot, challenge paths are redirected too.
        """
        self.http = StubTreq(HTTPSRedirect(None))
        response, _ = self.request("GET", f"http://relay.example/.well-known/acme-challenge/{TOKEN}")
        self.assertEqual(response.code, 301)


class WebrootFilesTests(TestCase):
    """
    The redirect site on a loopback port serves regular files from the
    challenge directory, and nothing a link or a special file there
    points at.
    """

    def setUp(self):
        self.webroot = Path(tempfile.mkdtemp(prefix="leeloo-acme-"))
        self.addCleanup(shutil.rmtree, self.webroot, True)
        self.challenges = self.webroot / ".well-known" / "acme-challenge"
        self.challenges.mkdir(parents=True)
        (self.challenges / TOKEN).write_bytes(b"aBcD-123_xyz.thumbprint")
        (self.webroot / "secret.txt").write_bytes(b"not for the world")
        port = reactor.listenTCP(0, make_redirect_site(self.webroot, reactor=reactor), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        self.port = port.getHost().port

    def get(self, token):
        return threads.deferToThread(
            raw_answer, self.port,
            f"GET /.well-known/acme-challenge/{token} HTTP/1.1\r\nHost: relay.example\r\n"
            "Connection: close\r\n\r\n".encode())

    @defer.inlineCallbacks
    def test_regular_file_served(self):
        """
        A challenge file certbot wrote is served.
        """
        status, _, body = yield self.get(TOKEN)
        self.assertEqual((status, body), (200, b"aBcD-123_xyz.thumbprint"))

    @defer.inlineCallbacks
    def test_symlink_not_followed(self):
        """
        A symlink named like a token (to a file anywhere on the disk) is
        not followed: 404.
        """
        (self.challenges / "linked-token").symlink_to(self.webroot / "secret.txt")
        status, _, body = yield self.get("linked-token")
        self.assertEqual(status, 404)
        self.assertNotIn(b"not for the world", body)

    @defer.inlineCallbacks
    def test_fifo_not_opened(self):
        """
        A FIFO named like a token is not read (it would block the relay):
        404, at once.
        """
        os.mkfifo(self.challenges / "fifo-token")
        status, _, _ = yield self.get("fifo-token")
        self.assertEqual(status, 404)
