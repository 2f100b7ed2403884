"""
A real certbot (Debian's) against a real ACME server (Debian's pebble) on
loopback: the relay serves the HTTP-01 challenge on its redirect listener,
then serves the certificate certbot got, and picks up a forced renewal when
our deploy hook sends it SIGHUP.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import ssl
import urllib.request
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.testing import EventLoggingObserver
from twisted.internet.threads import deferToThread
from twisted.internet.utils import getProcessOutputAndValue
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import TestCase

from leeloo import tap
from leeloo.testca import ThrowawayCA
from tests.support import log_texts
from tests.test_tls import handshake, listening_port, temporary_directory

DOMAIN = "relay.leeloo.test"
WORKTREE = Path(__file__).resolve().parent.parent
HOOK = WORKTREE / "etc" / "certbot-deploy-hook.sh"
TOOLS = ("pebble", "pebble-challtestsrv", "certbot")
NOGROUP = 65534


def free_port() -> int:
    # pebble cannot listen on port 0 and tell us the port: take a free one.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server(ProcessProtocol):
    """
    A server process: C{ready} fires when its output shows C{marker},
    C{ended} when it exits.
    """

    def __init__(self, marker: bytes) -> None:
        self.marker = marker
        self.output = b""
        self.ready: Deferred = Deferred()
        self.ended: Deferred = Deferred()

    def outReceived(self, data: bytes) -> None:
        self.output += data
        if not self.ready.called and self.marker in self.output:
            self.ready.callback(self)

    errReceived = outReceived

    def processEnded(self, reason) -> None:
        if not self.ready.called:
            self.ready.errback(RuntimeError(f"exited before it was ready:\n{self.output.decode(errors='replace')}"))
        self.ended.callback(None)

    def stop(self) -> Deferred:
        if not self.ended.called:
            self.transport.signalProcess("TERM")
        return self.ended


class CertbotAgainstPebbleTests(TestCase):
    timeout = 60

    if not all(shutil.which(tool) for tool in TOOLS):
        skip = "needs Debian's pebble and certbot (scripts/test.sh installs them)"

    @inlineCallbacks
    def start(self, config: tap.Config):
        service = tap.build_service(config, reactor)
        service.startService()
        self.addCleanup(service.stopService)
        ports = []
        for listener in service.listeners:
            port = yield listening_port(listener)
            ports.append(port.getHost().port)
        return service, ports

    @inlineCallbacks
    def spawn(self, marker: bytes, argv: list[str], env: dict | None = None):
        server = Server(marker)
        reactor.spawnProcess(server, shutil.which(argv[0]), argv, env={**os.environ, **(env or {})})
        self.addCleanup(server.stop)
        yield server.ready
        return server

    @inlineCallbacks
    def test_certbot_webroot_gets_and_renews_certificate(self):
        """
        certbot certonly --webroot gets a certificate while the relay serves
        the challenge on its redirect listener; the relay then serves that
        certificate over TLS, and after certbot renew with our deploy hook
        (SIGHUP) new connections get the renewed one; the renewed key
        keeps the group and mode given to the first.
        """
        tmp = Path(temporary_directory(self))
        webroot = tmp / "webroot"
        webroot.mkdir()
        logged = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)

        # The relay's plain side: the whole site, and the port-80 stand-in.
        plain = tap.Config(listen=("tcp:0:interface=127.0.0.1",), redirect_listen=("tcp:0:interface=127.0.0.1",),
                           acme_webroot=webroot, data_dir=tmp / "data-plain", store="memory")
        _, (_, http_port) = yield self.start(plain)

        # pebble, with a DNS stub that answers 127.0.0.1 for every name.
        ca = ThrowawayCA("pebble front")
        served = ca.issue(["127.0.0.1", "localhost"])
        (tmp / "pebble-cert.pem").write_bytes(served.fullchain_pem)
        (tmp / "pebble-key.pem").write_bytes(served.key_pem)
        (tmp / "ca.pem").write_bytes(ca.root_pem)
        acme_port, management_port, dns_port, dns_management = (free_port() for _ in range(4))
        (tmp / "pebble.json").write_text(json.dumps({"pebble": {
            "listenAddress": f"127.0.0.1:{acme_port}",
            "managementListenAddress": f"127.0.0.1:{management_port}",
            "certificate": str(tmp / "pebble-cert.pem"),
            "privateKey": str(tmp / "pebble-key.pem"),
            "httpPort": http_port,
            "tlsPort": free_port(),
            "ocspResponderURL": "",
            "externalAccountBindingRequired": False,
        }}))
        yield self.spawn(b"Starting management server", [
            "pebble-challtestsrv", "-defaultIPv4", "127.0.0.1", "-defaultIPv6", "",
            "-dns01", f"127.0.0.1:{dns_port}", "-http01", "", "-https01", "", "-tlsalpn01", "",
            "-management", f"127.0.0.1:{dns_management}",
        ])
        yield self.spawn(b"ACME directory available at", [
            "pebble", "-config", str(tmp / "pebble.json"), "-dnsserver", f"127.0.0.1:{dns_port}",
        ], env={"PEBBLE_VA_NOSLEEP": "1", "PEBBLE_WFE_NONCEREJECT": "0"})

        letsencrypt = tmp / "letsencrypt"
        certbot = [
            "--non-interactive", "--agree-tos", "--register-unsafely-without-email",
            "--server", f"https://127.0.0.1:{acme_port}/dir",
            "--config-dir", str(letsencrypt), "--work-dir", str(tmp / "work"), "--logs-dir", str(tmp / "logs"),
        ]
        env = {**os.environ, "REQUESTS_CA_BUNDLE": str(tmp / "ca.pem")}
        out, err, code = yield getProcessOutputAndValue(
            shutil.which("certbot"), ["certonly", "--webroot", "-w", str(webroot), "-d", DOMAIN, *certbot], env=env)
        self.assertEqual(code, 0, (out + err).decode(errors="replace"))
        self.assertTrue(any("GET /.well-known/acme-challenge/" in t and '" 200 ' in t for t in log_texts(logged)),
                        "pebble's validation did not reach the relay")

        # The relay serves what certbot wrote, verified against pebble's root.
        context = ssl.create_default_context(cafile=str(tmp / "ca.pem"))
        roots = yield deferToThread(
            lambda: urllib.request.urlopen(f"https://127.0.0.1:{management_port}/roots/0", context=context).read())
        pidfile = tmp / "relay.pid"
        pidfile.write_text(str(os.getpid()))
        tls = tap.Config(
            listen=(f"letsencrypt:domain={DOMAIN}:port=0:interface=127.0.0.1:directory={letsencrypt}:watch=0",),
            data_dir=tmp / "data-tls", store="memory")
        service, (tls_port,) = yield self.start(tls)
        [certificates] = [s.endpoint.certificates for s in service.listeners]
        first = yield deferToThread(handshake, tls_port, DOMAIN, roots)
        self.assertEqual(first["fingerprint"], certificates.certificate(DOMAIN).fingerprint)

        # README.rst's key permissions: a group that may read privkey*.pem.
        archive = letsencrypt / "archive" / DOMAIN
        os.chown(archive / "privkey1.pem", -1, NOGROUP)
        os.chmod(archive / "privkey1.pem", 0o640)

        # certbot renew, with our deploy hook sending SIGHUP to "the relay".
        reloaded = certificates.when_reloaded()
        out, err, code = yield getProcessOutputAndValue(
            shutil.which("certbot"),
            ["renew", "--force-renewal", "--no-random-sleep-on-renew", "--cert-name", DOMAIN, "--deploy-hook", f"sh {HOOK}", *certbot],
            env={**env, "LEELOO_PIDFILE": str(pidfile)})
        self.assertEqual(code, 0, (out + err).decode(errors="replace"))
        yield reloaded
        second = yield deferToThread(handshake, tls_port, DOMAIN, roots)
        self.assertNotEqual(second["fingerprint"], first["fingerprint"])
        renewed = (letsencrypt / "live" / DOMAIN / "cert.pem").read_bytes()
        # ... which certbot carries over to the renewed key.
        key = os.stat(archive / "privkey2.pem")
        self.assertEqual((key.st_gid, key.st_mode & 0o777), (NOGROUP, 0o640))
        self.assertEqual(second["fingerprint"], x509.load_pem_x509_certificate(renewed).fingerprint(hashes.SHA256()).hex())
