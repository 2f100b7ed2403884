"""
TLS by Twisted itself: the C{letsencrypt:} endpoint, certificate checks,
SNI, hot renewal and the relay's wiring, over real TLS on loopback against
a throwaway CA laid out like C{/etc/letsencrypt}.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import shutil
import signal
import socket
import ssl
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any

from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import rsa
from OpenSSL import SSL
from twisted.internet import reactor
from twisted.internet.defer import Deferred, DeferredList, inlineCallbacks
from twisted.internet.endpoints import TCP4ClientEndpoint, serverFromString, wrapClientTLS
from twisted.internet.ssl import Certificate as TwistedCertificate, optionsForClientTLS
from twisted.internet.testing import EventLoggingObserver
from twisted.internet.threads import deferToThread
from twisted.internet.utils import getProcessOutputAndValue
from twisted.logger import LogLevel, globalLogPublisher
from twisted.protocols.tls import _representsEOF
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.resource import Resource
from twisted.web.server import Site

from leeloo import tap, tls
from leeloo.testca import LetsEncryptDirectory, ThrowawayCA, key_pem
from leeloo.tls import CertificateError, CertificateStore, LetsEncryptServerEndpoint

from tests.support import log_texts, next_logged

DOMAIN = "relay.leeloo.test"
OTHER = "other.leeloo.test"
WORKTREE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class FixedClock:
    def __init__(self, now: float | None = None) -> None:
        self.now = datetime.datetime.now(datetime.timezone.utc).timestamp() if now is None else now

    def seconds(self) -> float:
        return self.now


def temporary_directory(testcase: SynchronousTestCase) -> str:
    """
    A fresh directory removed after the test (trial's mktemp() would leave
    one in the working directory under pytest).
    """
    path = tempfile.mkdtemp(prefix="leeloo-tls-")
    testcase.addCleanup(shutil.rmtree, path, True)
    return path


def fingerprint(der: bytes) -> str:
    return x509.load_der_x509_certificate(der).fingerprint(hashes.SHA256()).hex()


class Letsencrypt:
    """
    A throwaway CA and a /etc/letsencrypt-like directory with C{domains}
    issued.
    """

    def __init__(self, testcase: SynchronousTestCase, *domains: str) -> None:
        self.ca = ThrowawayCA()
        self.path = temporary_directory(testcase)
        self.tree = LetsEncryptDirectory(self.path)
        self.issued = {}
        for domain in domains or (DOMAIN,):
            self.renew(domain)

    def renew(self, domain: str = DOMAIN, names: list[str] | None = None, **validity):
        issued = self.ca.issue(names or [domain], **validity)
        self.tree.install(domain, issued)
        self.issued[domain] = issued
        return issued

    def fingerprint(self, domain: str = DOMAIN) -> str:
        return self.issued[domain].cert.fingerprint(hashes.SHA256()).hex()

    def endpoint_string(self, domains: str = DOMAIN, **options: str) -> str:
        extra = "".join(f":{k}={v}" for k, v in options.items())
        return f"letsencrypt:domain={domains}:port=0:interface=127.0.0.1:directory={self.path}{extra}"


def listening_port(service) -> Deferred:
    """
    The port a started StreamServerEndpointService listens on, without
    taking it from the service (which needs it to stop listening).
    """
    port: Deferred = Deferred()

    def got(listening):
        port.callback(listening)
        return listening

    service._waitingForPort.addCallback(got)
    return port


def handshake(port: int, server_name: str | None, ca_pem: bytes, alpn: list[str] | None = None,
              max_version: ssl.TLSVersion | None = None, resume: dict | None = None,
              ciphers: str | None = None) -> dict:
    """
    A blocking TLS client (run it in a thread) that verifies the server
    against C{ca_pem} and reports what it saw; C{resume} is what an earlier
    call returned, whose session it offers.
    """
    if resume is not None:
        context, session = resume["context"], resume["session"]
    else:
        session = None
        context = ssl.create_default_context(cadata=ca_pem.decode("ascii"))
        if server_name is None:
            context.check_hostname = False
        if alpn:
            context.set_alpn_protocols(alpn)
        if ciphers:
            context.set_ciphers(ciphers)
        if max_version is not None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                context.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
                context.maximum_version = max_version
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with context.wrap_socket(raw, server_hostname=server_name, session=session) as s:
            s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            response = b""
            while chunk := s.recv(65536):
                response += chunk
            return {
                "fingerprint": fingerprint(s.getpeercert(binary_form=True)),
                "version": s.version(),
                "alpn": s.selected_alpn_protocol(),
                "session": s.session,
                "context": context,
                "reused": s.session_reused,
                "response": response,
                "chain": len(s.get_unverified_chain()) if hasattr(s, "get_unverified_chain") else None,
            }


class CertificateLoadingTests(SynchronousTestCase):
    """
    L{tls.load_certificate} and L{CertificateStore}: what is served and what
    is refused, driven with an explicit clock.
    """

    def test_loads_whole_chain(self):
        """
        The leaf and every certificate after it in fullchain.pem are loaded.
        """
        le = Letsencrypt(self)
        certificate = tls.load_certificate(le.path, DOMAIN, FixedClock().seconds())
        self.assertEqual(certificate.fingerprint, le.fingerprint())
        self.assertEqual(certificate.chain, (le.ca.intermediate,))

    def test_missing_names_file_and_certbot(self):
        """
        A missing certificate is one line naming the file and the certbot
        command that gets it.
        """
        le = Letsencrypt(self)
        e = self.assertRaises(CertificateError, tls.load_certificate, le.path, OTHER, FixedClock().seconds())
        line = str(e)
        self.assertNotIn("\n", line)
        self.assertIn(os.path.join(le.path, "live", OTHER, "fullchain.pem"), line)
        self.assertIn(f"certbot certonly --webroot -w ACME_WEBROOT -d {OTHER}", line)

    def test_key_not_matching_refused(self):
        """
        A private key that is not the certificate's is refused.
        """
        le = Letsencrypt(self)
        other = le.ca.issue([DOMAIN])
        le.tree.install(DOMAIN, fullchain=le.issued[DOMAIN].fullchain_pem, privkey=other.key_pem)
        e = self.assertRaises(CertificateError, tls.load_certificate, le.path, DOMAIN, FixedClock().seconds())
        self.assertIn("does not match", str(e))

    def test_garbage_key_refused(self):
        """
        A key file that holds no PEM key is refused.
        """
        le = Letsencrypt(self)
        le.tree.install(DOMAIN, fullchain=le.issued[DOMAIN].fullchain_pem, privkey=b"not a key\n")
        e = self.assertRaises(CertificateError, tls.load_certificate, le.path, DOMAIN, FixedClock().seconds())
        self.assertIn("privkey.pem holds no readable", str(e))

    def test_expired_refused(self):
        """
        A certificate past its notAfter is refused.
        """
        le = Letsencrypt(self)
        clock = FixedClock(le.issued[DOMAIN].cert.not_valid_after_utc.timestamp() + 1)
        e = self.assertRaises(CertificateError, tls.load_certificate, le.path, DOMAIN, clock.seconds())
        self.assertIn("expired on", str(e))

    def test_not_yet_valid_refused(self):
        """
        A certificate before its notBefore is refused.
        """
        le = Letsencrypt(self)
        clock = FixedClock(le.issued[DOMAIN].cert.not_valid_before_utc.timestamp() - 1)
        e = self.assertRaises(CertificateError, tls.load_certificate, le.path, DOMAIN, clock.seconds())
        self.assertIn("is not valid before", str(e))

    def test_context_options(self):
        """
        The context allows TLS 1.2 and 1.3 only, sends session tickets,
        lets the client's cipher preference decide (Mozilla's intermediate
        profile), and sets release-buffers unless told not to.
        """
        le = Letsencrypt(self)
        certificate = tls.load_certificate(le.path, DOMAIN, FixedClock().seconds())
        on = tls.make_context(certificate)
        off = tls.make_context(certificate, release_buffers=False)
        self.assertTrue(tls.releases_buffers(on))
        self.assertFalse(tls.releases_buffers(off))
        self.assertEqual((on.minimum_version, on.maximum_version), (ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3))
        self.assertTrue(on.options & ssl.OP_NO_COMPRESSION)
        self.assertFalse(on.options & ssl.OP_IGNORE_UNEXPECTED_EOF)
        self.assertFalse(on.options & (ssl.OP_NO_TICKET | ssl.OP_CIPHER_SERVER_PREFERENCE))
        self.assertGreater(on.num_tickets, 0)
        offered = {c["name"] for c in on.get_ciphers() if c["protocol"] == "TLSv1.2"}
        self.assertEqual(offered, set(tls.INTERMEDIATE_CIPHERS.split(":")[:-1]))

    def test_weak_key_refused_by_openssl(self):
        """
        A pair cryptography reads but OpenSSL refuses (an RSA key of 1024
        bits, under security level 2) fails start-up with one line, and as
        a renewal keeps the old certificate.
        """
        le = Letsencrypt(self)
        store = CertificateStore(le.path, [DOMAIN], FixedClock())
        old = le.fingerprint()
        logged = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        weak = le.ca.issue([DOMAIN], key=rsa.generate_private_key(public_exponent=65537, key_size=1024))
        le.tree.install(DOMAIN, weak)
        store.check()
        self.assertEqual(store.certificate(DOMAIN).fingerprint, old)
        [error] = log_texts(logged, LogLevel.error)
        self.assertIn("fullchain.pem is refused by OpenSSL", error)
        e = self.assertRaises(CertificateError, CertificateStore, le.path, [DOMAIN], FixedClock())
        self.assertIn("is refused by OpenSSL", e.line())
        self.assertIn("certbot renew --cert-name relay.leeloo.test", e.line())
        self.assertNotIn("\n", e.line())

    def test_sni_lookup(self):
        """
        A name picks the certificate that names it (wildcards included),
        and an unknown name or none gets the first domain's.
        """
        le = Letsencrypt(self, DOMAIN)
        le.renew(OTHER, names=[OTHER, "*.pics.leeloo.test"])
        store = CertificateStore(le.path, [DOMAIN, OTHER], FixedClock())
        first, second = store.default_context(), store.context_for(OTHER)
        self.assertIsNot(first, second)
        self.assertIs(store.context_for("a.pics.leeloo.test"), second)
        self.assertIs(store.context_for("RELAY.leeloo.test."), first)
        self.assertIs(store.context_for("unknown.example"), first)
        self.assertIs(store.context_for(None), first)

    def test_check_picks_up_renewal(self):
        """
        L{CertificateStore.check} replaces a certificate whose live/ links
        moved, and fires L{CertificateStore.when_reloaded}.
        """
        le = Letsencrypt(self)
        store = CertificateStore(le.path, [DOMAIN], FixedClock())
        reloaded = store.when_reloaded()
        le.renew()
        store.check()
        self.assertEqual(self.successResultOf(reloaded), DOMAIN)
        self.assertEqual(store.certificate(DOMAIN).fingerprint, le.fingerprint())

    def test_check_without_change_keeps_context(self):
        """
        When the files did not change, check() keeps the very same context.
        """
        le = Letsencrypt(self)
        store = CertificateStore(le.path, [DOMAIN], FixedClock())
        before = store.default_context()
        store.check()
        self.assertIs(store.default_context(), before)

    def test_broken_renewal_keeps_old_and_logs_error(self):
        """
        A renewal whose key does not match is refused with an error in the
        log, and the old certificate stays.
        """
        le = Letsencrypt(self)
        store = CertificateStore(le.path, [DOMAIN], FixedClock())
        old = le.fingerprint()
        logged = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        broken = le.ca.issue([DOMAIN])
        le.tree.install(DOMAIN, fullchain=broken.fullchain_pem, privkey=key_pem(le.ca.issue([DOMAIN]).key))
        store.check()
        self.assertEqual(store.certificate(DOMAIN).fingerprint, old)
        [error] = log_texts(logged, LogLevel.error)
        self.assertIn("refused the new TLS certificate", error)
        self.assertIn("does not match", error)

    def test_expired_renewal_keeps_old(self):
        """
        A renewal to a certificate that already expired is refused.
        """
        le = Letsencrypt(self)
        store = CertificateStore(le.path, [DOMAIN], FixedClock())
        old = le.fingerprint()
        logged = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        now = datetime.datetime.now(datetime.timezone.utc)
        le.renew(not_before=now - datetime.timedelta(days=10), not_after=now - datetime.timedelta(days=1))
        store.check()
        self.assertEqual(store.certificate(DOMAIN).fingerprint, old)
        self.assertEqual(len(log_texts(logged, LogLevel.error)), 1)

    def test_broken_renewal_logged_once(self):
        """
        A refused renewal is logged once, not at every check.
        """
        le = Letsencrypt(self)
        store = CertificateStore(le.path, [DOMAIN], FixedClock())
        logged = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        le.tree.install(DOMAIN, fullchain=le.issued[DOMAIN].fullchain_pem, privkey=b"garbage")
        store.check()
        store.check()
        self.assertEqual(len(log_texts(logged, LogLevel.error)), 1)

    def test_expiry_warning_daily(self):
        """
        Under 14 days from expiry a warning is logged, again a day later,
        not more often.
        """
        le = Letsencrypt(self)
        clock = FixedClock()
        store = CertificateStore(le.path, [DOMAIN], clock)
        logged = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        store.check()
        self.assertEqual(log_texts(logged, LogLevel.warn), [])
        clock.now = le.issued[DOMAIN].cert.not_valid_after_utc.timestamp() - 10 * 86400
        store.check()
        clock.now += 3600
        store.check()
        self.assertEqual(len(log_texts(logged, LogLevel.warn)), 1)
        self.assertIn("expires on", log_texts(logged, LogLevel.warn)[0])
        clock.now += 86400
        store.check()
        self.assertEqual(len(log_texts(logged, LogLevel.warn)), 2)

    def test_check_never_raises(self):
        """
        check() logs a failure and returns when something unexpected breaks.
        """
        le = Letsencrypt(self)
        store = CertificateStore(le.path, [DOMAIN], FixedClock())
        store.clock = None  # seconds() now raises AttributeError
        store.check()
        self.assertEqual(len(self.flushLoggedErrors(AttributeError)), 1)

    def test_health_fields(self):
        """
        The health provider gives each domain's notAfter in ISO 8601 UTC.
        """
        le = Letsencrypt(self, DOMAIN, OTHER)
        store = CertificateStore(le.path, [DOMAIN, OTHER], FixedClock())
        fields = tls.health_fields([store])()
        self.assertEqual(
            fields["tls_not_after"][OTHER],
            le.issued[OTHER].cert.not_valid_after_utc.strftime("%Y-%m-%dT%H:%M:%SZ"),
        )
        self.assertEqual(sorted(fields["tls_not_after"]), sorted([DOMAIN, OTHER]))


def server_context(le: Letsencrypt) -> ssl.SSLContext:
    certificate = tls.load_certificate(le.path, DOMAIN, FixedClock().seconds())
    return tls.make_context(certificate)


_new_context = ssl.SSLContext.__new__


def new_context_ignoring_unexpected_eof(cls, *args, **kwargs):
    """
    C{ssl.SSLContext.__new__} as on Debian 12's Python 3.11.2 (3.10.0 to
    3.11.2 made it the default): every context starts with
    OP_IGNORE_UNEXPECTED_EOF on.
    """
    context = _new_context(cls, *args, **kwargs)
    context.options |= ssl.OP_IGNORE_UNEXPECTED_EOF
    return context


class MemoryPair:
    """
    A L{tls.TLSConnection} and a standard library client, wired by hand
    through memory BIOs.
    """

    def __init__(self, le: Letsencrypt, alpn: list[str] | None = None,
                 context: ssl.SSLContext | None = None) -> None:
        if context is None:
            context = server_context(le)
        self.server = tls.TLSConnection(context)
        context = ssl.create_default_context(cadata=le.ca.root_pem.decode("ascii"))
        context.set_alpn_protocols(alpn or ["http/1.1"])
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.client = context.wrap_bio(self.incoming, self.outgoing, server_hostname=DOMAIN)

    def to_server(self) -> None:
        if data := self.outgoing.read():
            self.server.bio_write(data)

    def to_client(self) -> None:
        while True:
            try:
                self.incoming.write(self.server.bio_read(2 ** 15))
            except SSL.WantReadError:
                return

    def handshake(self) -> None:
        for _ in range(5):
            for step in (self.client.do_handshake, self.server.do_handshake):
                try:
                    step()
                except (ssl.SSLWantReadError, SSL.WantReadError):
                    pass
                self.to_server()
                self.to_client()
        # The server's session tickets come after its Finished.
        with contextlib.suppress(ssl.SSLWantReadError):
            self.client.read(1)


class TLSConnectionTests(SynchronousTestCase):
    """
    L{tls.TLSConnection} behaves as the pyOpenSSL C{Connection} that
    Twisted's C{TLSMemoryBIOProtocol} and Autobahn use.
    """

    def test_is_a_connection_with_only_its_own_methods(self):
        """
        It passes for a pyOpenSSL Connection (Twisted and Autobahn check),
        and a method it does not have fails plainly.
        """
        pair = MemoryPair(Letsencrypt(self))
        self.assertIsInstance(pair.server, SSL.Connection)
        self.assertRaises(AttributeError, pair.server.get_cipher_name)

    def test_handshake_data_and_alpn(self):
        """
        The handshake needs the client's bytes (WantReadError until then),
        after which data goes both ways, ALPN is http/1.1 and the channel
        binding is the client's.
        """
        pair = MemoryPair(Letsencrypt(self), alpn=["h2", "http/1.1"])
        self.assertRaises(SSL.WantReadError, pair.server.do_handshake)
        self.assertRaises(SSL.WantReadError, pair.server.bio_read, 100)
        self.assertIsNone(pair.server.get_peer_finished())
        pair.handshake()
        self.assertEqual(pair.server.get_alpn_proto_negotiated(), b"http/1.1")
        self.assertEqual(pair.server.get_peer_finished(), pair.client.get_channel_binding("tls-unique"))
        self.assertIsNone(pair.server.get_peer_certificate())
        self.assertRaises(SSL.WantReadError, pair.server.recv, 100)
        pair.client.write(b"GET /ws HTTP/1.1\r\n")
        pair.to_server()
        self.assertEqual(pair.server.recv(100), b"GET /ws HTTP/1.1\r\n")
        self.assertEqual(pair.server.send(b"HTTP/1.1 101 Switching Protocols\r\n"), 34)
        pair.to_client()
        self.assertEqual(pair.client.read(100), b"HTTP/1.1 101 Switching Protocols\r\n")

    def test_no_alpn_overlap(self):
        """
        A client offering only h2 gets no protocol.
        """
        pair = MemoryPair(Letsencrypt(self), alpn=["h2"])
        pair.handshake()
        self.assertEqual(pair.server.get_alpn_proto_negotiated(), b"")

    def test_peer_closes_first(self):
        """
        The client's close_notify is a ZeroReturnError; replying to it
        completes the shutdown.
        """
        pair = MemoryPair(Letsencrypt(self))
        pair.handshake()
        with contextlib.suppress(ssl.SSLWantReadError):
            pair.client.unwrap()
        pair.to_server()
        self.assertRaises(SSL.ZeroReturnError, pair.server.recv, 100)
        self.assertTrue(pair.server.shutdown())
        pair.to_client()
        pair.client.unwrap()

    def test_server_closes_first(self):
        """
        The server's shutdown is incomplete (False) until the client's
        close_notify comes back.
        """
        pair = MemoryPair(Letsencrypt(self))
        pair.handshake()
        self.assertFalse(pair.server.shutdown())
        pair.to_client()
        pair.client.unwrap()
        pair.to_server()
        self.assertTrue(pair.server.shutdown())

    def test_eof_without_close_notify_is_a_lost_connection(self):
        """
        The stream ending without close_notify is the SysCallError that
        Twisted reports as a lost connection.
        """
        pair = MemoryPair(Letsencrypt(self))
        pair.handshake()
        pair.server.bio_shutdown()
        e = self.assertRaises(SSL.SysCallError, pair.server.recv, 100)
        self.assertTrue(_representsEOF(e))

    def test_eof_is_a_lost_connection_where_ssl_ignores_it_by_default(self):
        """
        Where the ssl module turns OP_IGNORE_UNEXPECTED_EOF on for every
        context (Debian 12's Python), the relay's context has it off, and
        the stream ending without close_notify is still a lost connection,
        not the clean close that option would make of it.
        """
        le = Letsencrypt(self)
        self.patch(ssl.SSLContext, "__new__", new_context_ignoring_unexpected_eof)
        self.assertTrue(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).options & ssl.OP_IGNORE_UNEXPECTED_EOF)
        careless = server_context(le)
        careless.options |= ssl.OP_IGNORE_UNEXPECTED_EOF
        contexts = {"careless": careless, "relay": server_context(le)}
        self.assertFalse(contexts["relay"].options & ssl.OP_IGNORE_UNEXPECTED_EOF)
        seen = {}
        for name, context in contexts.items():
            pair = MemoryPair(le, context=context)
            pair.handshake()
            pair.server.bio_shutdown()
            try:
                pair.server.recv(100)
            except SSL.Error as e:
                seen[name] = e
        self.assertIsInstance(seen["careless"], SSL.ZeroReturnError)
        self.assertIsInstance(seen["relay"], SSL.SysCallError)
        self.assertTrue(_representsEOF(seen["relay"]))

    def test_eof_as_older_pythons_raise_it_is_a_lost_connection(self):
        """
        The end of the stream as Python before 3.11.3 (Debian 12's 3.11.2)
        reports it, a plain SSLError with OpenSSL's UNEXPECTED_EOF_WHILE_READING
        rather than SSLEOFError, is a lost connection too.
        """
        old = ssl.SSLError(1, "[SSL: UNEXPECTED_EOF_WHILE_READING] unexpected eof while reading")
        old.library, old.reason = "SSL", "UNEXPECTED_EOF_WHILE_READING"
        self.assertNotIsInstance(old, ssl.SSLEOFError)
        error = tls._error(old)
        self.assertIsInstance(error, SSL.SysCallError)
        self.assertTrue(_representsEOF(error))

    def test_close_notify_after_own_is_a_clean_close(self):
        """
        The client's close_notify answering the relay's is the
        ZeroReturnError of a clean close (the ssl module raises its
        SSLZeroReturnError for it), not an SSL error.
        """
        pair = MemoryPair(Letsencrypt(self))
        pair.handshake()
        self.assertFalse(pair.server.shutdown())
        pair.to_client()
        pair.client.unwrap()
        pair.to_server()
        self.assertRaises(SSL.ZeroReturnError, pair.server.recv, 100)

    def test_garbage_is_an_error(self):
        """
        Plain HTTP to the TLS port fails the handshake with pyOpenSSL's
        Error, carrying OpenSSL's reason.
        """
        pair = MemoryPair(Letsencrypt(self))
        pair.server.bio_write(b"GET / HTTP/1.1\r\nHost: relay\r\n\r\n")
        e = self.assertRaises(SSL.Error, pair.server.do_handshake)
        self.assertNotIsInstance(e, SSL.WantReadError)
        self.assertFalse(_representsEOF(e))
        [(library, _, reason)] = e.args[0]
        self.assertEqual(reason.upper(), "HTTP_REQUEST")


class EndpointStringTests(SynchronousTestCase):
    """
    The C{letsencrypt:} endpoint string, found as a Twisted plugin.
    """

    def test_parsed_by_server_from_string(self):
        """
        serverFromString builds a L{LetsEncryptServerEndpoint} with the
        options given, backlog 1024 unless set.
        """
        le = Letsencrypt(self)
        endpoint = serverFromString(FixedClock(), le.endpoint_string(watch="5", releasebuffers="0"))
        self.assertIsInstance(endpoint, LetsEncryptServerEndpoint)
        self.assertEqual((endpoint.port, endpoint.interface, endpoint.backlog, endpoint.watch_interval),
                         (0, "127.0.0.1", 1024, 5.0))
        self.assertFalse(endpoint.certificates.release_buffers)

    def test_several_domains(self):
        """
        domain= takes a comma-separated list.
        """
        le = Letsencrypt(self, DOMAIN, OTHER)
        endpoint = serverFromString(FixedClock(), le.endpoint_string(f"{DOMAIN},{OTHER}"))
        self.assertEqual(endpoint.certificates.domains, (DOMAIN, OTHER))

    def test_bad_options(self):
        """
        A missing domain, an unknown option or a path-like domain is a
        ValueError naming it.
        """
        for description, words in [
            ("letsencrypt:port=443", "needs domain="),
            ("letsencrypt:domain=a.example:colour=blue", "unknown option 'colour'"),
            ("letsencrypt:domain=../../etc", "not a domain name"),
            ("letsencrypt:domain=a.example:releasebuffers=2", "must be 0 or 1"),
        ]:
            e = self.assertRaises(ValueError, serverFromString, FixedClock(), description)
            self.assertIn(words, str(e))

    def test_default_backlog_in_tap(self):
        """
        The tap adds backlog=1024 to a letsencrypt: string that has none.
        """
        self.assertEqual(tap.with_default_backlog("letsencrypt:domain=a.example"),
                         "letsencrypt:domain=a.example:backlog=1024")


class StartupTests(TestCase):
    """
    Start-up with a certificate that cannot be served.
    """

    def test_options_fail_with_one_line(self):
        """
        The options fail with one line naming the file and the certbot
        command, with the relay's own --acme-webroot in it.
        """
        le = Letsencrypt(self)
        webroot = temporary_directory(self)
        options = tap.Options(environ={})
        e = self.assertRaises(SystemExit, options.parseOptions, [
            "--data-dir", temporary_directory(self), "--acme-webroot", webroot,
            "--listen", le.endpoint_string(OTHER),
        ])
        line = str(e.code)
        self.assertNotIn("\n", line)
        self.assertIn(os.path.join(le.path, "live", OTHER, "fullchain.pem"), line)
        self.assertIn(f"certbot certonly --webroot -w {os.path.abspath(webroot)} -d {OTHER}", line)

    def test_taken_port_stops_with_one_line(self):
        """
        A letsencrypt: endpoint whose port is taken stops the relay (exit 1)
        with one line naming it as written and the reason.
        """
        import txaio
        from twisted.logger import formatEvent

        le = Letsencrypt(self)
        taken = socket.socket()
        self.addCleanup(taken.close)
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        endpoint = (f"letsencrypt:domain={DOMAIN}:port={taken.getsockname()[1]}:interface=127.0.0.1:"
                    f"directory={le.path}")
        options = tap.Options(environ={})
        options.parseOptions(["--data-dir", temporary_directory(self), "--store", "memory", "--listen", endpoint])
        previous = txaio.config.loop
        self.addCleanup(setattr, txaio.config, "loop", previous)
        exits = []
        service = tap.build_service(options.config, reactor, exit=exits.append, notify=lambda state: None)
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        service.privilegedStartService()
        service.startService()
        self.addCleanup(service.stopService)
        self.assertEqual(exits, [1])
        [line] = [formatEvent(e) for e in events if e["log_level"] == LogLevel.critical]
        self.assertIn(f"cannot listen on --listen {endpoint}: address already in use", line)

    @inlineCallbacks
    def test_twistd_prints_one_line(self):
        """
        twistd leeloo with a missing certificate exits 1 printing that one
        line and no traceback.
        """
        le = Letsencrypt(self)
        out, err, code = yield getProcessOutputAndValue(
            sys.executable,
            ["-c", "from twisted.scripts.twistd import run; run()", "--nodaemon", "--pidfile=",
             "leeloo", "--data-dir", temporary_directory(self), "--listen", le.endpoint_string(OTHER)],
            env={**os.environ, "PYTHONPATH": WORKTREE},
        )
        self.assertEqual(code, 1)
        lines = err.decode().strip().splitlines()
        self.assertEqual(len(lines), 1, err)
        self.assertIn("fullchain.pem does not exist", lines[0])
        self.assertNotIn(b"Traceback", out + err)


class WaitingClient(WebSocketClientProtocol):
    """
    An Autobahn client whose events are Deferreds.
    """

    def __init__(self) -> None:
        super().__init__()
        self.opened: Deferred = Deferred()
        self.closed: Deferred = Deferred()
        self._inbox: list = []
        self._waiting: list[Deferred] = []

    def onOpen(self) -> None:
        self.opened.callback(self)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        self._inbox.append(json.loads(payload))
        while self._waiting and self._inbox:
            self._waiting.pop(0).callback(self._inbox.pop(0))

    def onClose(self, wasClean, code, reason) -> None:
        if not self.closed.called:
            self.closed.callback(code)

    def send_json(self, message: dict) -> None:
        self.sendMessage(json.dumps(message).encode())

    def next_message(self) -> Deferred:
        d: Deferred = Deferred()
        if self._inbox:
            d.callback(self._inbox.pop(0))
        else:
            self._waiting.append(d)
        return d


with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    TLS1_1 = ssl.TLSVersion.TLSv1_1


class RelayOverTLSTests(TestCase):
    """
    The whole relay service on a C{letsencrypt:} endpoint on loopback, with
    WSS devices that verify it against the throwaway CA.
    """

    @inlineCallbacks
    def start_relay(self, le: Letsencrypt, domains: str = DOMAIN, http_limits: Any = None, **options: str):
        config = tap.Config(listen=(tap.with_default_backlog(le.endpoint_string(domains, **options)),),
                            data_dir=Path(temporary_directory(self)), store="memory",
                            http_limits=http_limits or tap.HTTPLimits())
        self.service = tap.build_service(config, reactor)
        self.service.startService()
        self.addCleanup(self.service.stopService)
        [listening] = self.service.listeners
        port = yield listening_port(listening)
        self.port = port.getHost().port
        self.certificates = listening.endpoint.certificates
        return self.port

    @inlineCallbacks
    def device(self, le: Letsencrypt, register: dict, server_name: str = DOMAIN):
        factory = WebSocketClientFactory(f"wss://{server_name}/ws")
        factory.protocol = WaitingClient
        options = optionsForClientTLS(server_name, trustRoot=TwistedCertificate.loadPEM(le.ca.root_pem))
        endpoint = wrapClientTLS(options, TCP4ClientEndpoint(reactor, "127.0.0.1", self.port))
        client = yield endpoint.connect(factory)
        self.addCleanup(self._close, client)
        yield client.opened
        client.send_json({"type": "register", **register})
        reply = yield client.next_message()
        self.assertEqual(reply["type"], "registered")
        return client

    def _close(self, client):
        if client.state != client.STATE_CLOSED:
            client.sendClose()
            return client.closed

    def probe(self, le: Letsencrypt, server_name: str | None = DOMAIN, **kwargs) -> Deferred:
        return deferToThread(handshake, self.port, server_name, le.ca.root_pem, **kwargs)

    @inlineCallbacks
    def test_wss_device_registers_and_shares(self):
        """
        Two WSS devices register in one crew and one's share reaches the
        other.
        """
        le = Letsencrypt(self)
        yield self.start_relay(le)
        a = yield self.device(le, {"device_id": "leeloo_aaaaaaaaaaaa", "crew_code": "TLS"})
        b = yield self.device(le, {"device_id": "leeloo_bbbbbbbbbbbb", "crew_code": "TLS"})
        a.send_json({"type": "share_music", "spotify_uri": "spotify:track:1", "artist": "A",
                     "track": "T", "album": "L"})
        shared = yield b.next_message()
        self.assertEqual((shared["type"], shared["spotify_uri"]), ("music_shared", "spotify:track:1"))

    @inlineCallbacks
    def test_clean_disconnects_log_no_error(self):
        """
        WSS devices that go away cleanly (a WebSocket close, a bare
        close_notify, a TCP close after the closing handshake) are logged as
        disconnected at info level, with nothing at error level.
        """
        le = Letsencrypt(self)
        yield self.start_relay(le)
        logged = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)

        def websocket_close(client):
            client.sendClose(1000)

        def close_notify(client):
            client.transport.loseConnection()

        def eof_after_closing_handshake(client):
            # The relay's close frame is answered, then the socket is
            # closed without waiting for the relay's close_notify.
            client.onCloseFrame = lambda *a, **k: None
            client.sendClose(1000)
            client.transport.transport.loseConnection()

        for n, leave in enumerate((websocket_close, close_notify, eof_after_closing_handshake)):
            device_id = f"leeloo_{n:012d}"
            client = yield self.device(le, {"device_id": device_id, "crew_code": "BYE"})
            gone = next_logged(self, f"device {device_id} at 127.0.0.1 disconnected")
            # No closing-handshake timer left behind on the reactor.
            client.closeHandshakeTimeout = 0
            leave(client)
            event = yield gone
            self.assertEqual(event["log_level"].name, "info", leave.__name__)
        self.assertEqual(log_texts(logged, LogLevel.error) + log_texts(logged, LogLevel.critical), [])

    @inlineCallbacks
    def test_closed_wss_frees_its_gate_place(self):
        """
        A WSS device counts under its address's connection cap until its
        WebSocket closes; then its place is free (the WebSocket behind TLS,
        not the HTTP channel, sees the connection end).
        """
        le = Letsencrypt(self)
        yield self.start_relay(le)
        gate = self.service.site.gate
        released = Deferred()
        release = gate.release

        def releasing(host):
            release(host)
            if not released.called:
                released.callback(host)

        self.patch(gate, "release", releasing)
        client = yield self.device(le, {"device_id": "leeloo_9a7e9a7e9a7e"})
        self.assertEqual(gate.by_address, {"127.0.0.1": 1})
        client.sendClose()
        host = yield released
        self.assertEqual((host, gate.by_address), ("127.0.0.1", {}))

    @inlineCallbacks
    def test_over_the_cap_aborted_before_the_handshake(self):
        """
        Over TLS, a connection over its address's cap is aborted at once:
        the relay sends nothing, not even its half of a TLS handshake.
        """
        le = Letsencrypt(self)
        yield self.start_relay(le, http_limits=tap.HTTPLimits(max_connections_per_address=1))
        yield self.device(le, {"device_id": "leeloo_ca9ca9ca9ca9"})

        def refused():
            context = ssl.create_default_context(cadata=le.ca.root_pem.decode())
            try:
                sock = socket.create_connection(("127.0.0.1", self.port), timeout=10)
                with context.wrap_socket(sock, server_hostname=DOMAIN):
                    return "handshake done"
            except (ssl.SSLError, OSError) as e:
                return type(e).__name__

        outcome = yield deferToThread(refused)
        self.assertNotEqual(outcome, "handshake done")
        self.assertEqual(self.service.site.gate.refused["per_address"], 1)

    @inlineCallbacks
    def test_chain_alpn_and_hsts(self):
        """
        The server sends the whole chain (the client trusts only the root),
        picks ALPN http/1.1 even when h2 is offered first, and its HTTPS
        answers carry HSTS; /health has the certificate's expiry.
        """
        le = Letsencrypt(self)
        yield self.start_relay(le)
        seen = yield self.probe(le, alpn=["h2", "http/1.1"])
        self.assertEqual(seen["fingerprint"], le.fingerprint())
        self.assertEqual(seen["alpn"], "http/1.1")
        head, _, body = seen["response"].partition(b"\r\n\r\n")
        self.assertIn(b"strict-transport-security: max-age=63072000", head.lower())
        self.assertEqual(json.loads(body)["tls_not_after"],
                         {DOMAIN: le.issued[DOMAIN].cert.not_valid_after_utc.strftime("%Y-%m-%dT%H:%M:%SZ")})

    @inlineCallbacks
    def test_h2_only_gets_no_alpn(self):
        """
        A client offering only h2 gets no ALPN protocol (and can still speak
        HTTP/1.1).
        """
        le = Letsencrypt(self)
        yield self.start_relay(le)
        seen = yield self.probe(le, alpn=["h2"])
        self.assertIsNone(seen["alpn"])

    @inlineCallbacks
    def test_tls13_and_session_resumption(self):
        """
        A modern client gets TLS 1.3 and resumes its session with a ticket.
        """
        le = Letsencrypt(self)
        yield self.start_relay(le)
        first = yield self.probe(le)
        self.assertEqual(first["version"], "TLSv1.3")
        again = yield self.probe(le, resume=first)
        self.assertTrue(again["reused"])

    @inlineCallbacks
    def test_tls12_allowed(self):
        """
        TLS 1.2 is accepted.
        """
        le = Letsencrypt(self)
        yield self.start_relay(le)
        seen = yield self.probe(le, max_version=ssl.TLSVersion.TLSv1_2)
        self.assertEqual(seen["version"], "TLSv1.2")

    @inlineCallbacks
    def test_tls11_refused(self):
        """
        A client that speaks at most TLS 1.1 is refused.
        """
        le = Letsencrypt(self)
        yield self.start_relay(le)
        try:
            yield self.probe(le, max_version=TLS1_1, ciphers="DEFAULT:@SECLEVEL=0")
        except ssl.SSLError as e:
            self.assertIn("VERSION", e.reason.upper())
        else:
            self.fail("a TLS 1.1 handshake succeeded")

    @inlineCallbacks
    def test_sni_picks_certificate(self):
        """
        Each name asked for by SNI gets its own certificate; no SNI gets the
        first domain's.
        """
        le = Letsencrypt(self, DOMAIN, OTHER)
        yield self.start_relay(le, f"{DOMAIN},{OTHER}")
        one = yield self.probe(le, DOMAIN)
        two = yield self.probe(le, OTHER)
        none = yield self.probe(le, None)
        self.assertEqual(one["fingerprint"], le.fingerprint(DOMAIN))
        self.assertEqual(two["fingerprint"], le.fingerprint(OTHER))
        self.assertEqual(none["fingerprint"], le.fingerprint(DOMAIN))

    @inlineCallbacks
    def test_renewal_under_connected_websocket(self):
        """
        Renewed files are picked up by the watcher on its own: a new
        connection sees the new certificate while devices connected before
        keep sharing, with each other and with a device on the new one.
        """
        le = Letsencrypt(self)
        yield self.start_relay(le, watch="0.05")
        a = yield self.device(le, {"device_id": "leeloo_aaaaaaaaaaaa", "crew_code": "RENEW"})
        b = yield self.device(le, {"device_id": "leeloo_bbbbbbbbbbbb", "crew_code": "RENEW"})
        old = le.fingerprint()
        reloaded = self.certificates.when_reloaded()
        le.renew()
        yield reloaded
        seen = yield self.probe(le)
        self.assertNotEqual(seen["fingerprint"], old)
        self.assertEqual(seen["fingerprint"], le.fingerprint())
        c = yield self.device(le, {"device_id": "leeloo_cccccccccccc", "crew_code": "RENEW"})
        a.send_json({"type": "reaction", "reaction_type": "fire"})
        to_b = yield b.next_message()
        to_c = yield c.next_message()
        self.assertEqual((to_b["type"], to_c["type"]), ("reaction", "reaction"))
        self.assertEqual(a.transport.getPeerCertificate().to_cryptography().fingerprint(hashes.SHA256()).hex(), old)

    @inlineCallbacks
    def test_broken_renewal_keeps_serving_old(self):
        """
        After a renewal to a mismatched pair, new connections still get the
        old certificate.
        """
        le = Letsencrypt(self)
        yield self.start_relay(le, watch="0")
        old = le.fingerprint()
        logged = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        le.tree.install(DOMAIN, fullchain=le.ca.issue([DOMAIN]).fullchain_pem, privkey=le.issued[DOMAIN].key_pem)
        self.certificates.check()
        seen = yield self.probe(le)
        self.assertEqual(seen["fingerprint"], old)
        self.assertEqual(len(log_texts(logged, LogLevel.error)), 1)

    @inlineCallbacks
    def test_sighup_reloads_at_once(self):
        """
        SIGHUP makes the relay read the certificates at once.
        """
        le = Letsencrypt(self)
        yield self.start_relay(le, watch="0")
        reloaded = self.certificates.when_reloaded()
        le.renew()
        os.kill(os.getpid(), signal.SIGHUP)
        yield reloaded
        seen = yield self.probe(le)
        self.assertEqual(seen["fingerprint"], le.fingerprint())


class StopOverTLSTests(TestCase):
    """
    ``twistd leeloo`` on a C{letsencrypt:} endpoint, stopped with SIGTERM.
    """

    timeout = 60

    @inlineCallbacks
    def test_sigterm_closes_every_wss_device_with_1001(self):
        """
        On SIGTERM every one of 50 registered WSS devices receives its 1001
        close frame (through TLS) before the relay exits.
        """
        from collections import Counter

        from .support import RelayProcess, closing_clients

        le = Letsencrypt(self)
        relay = RelayProcess(self, "--listen", le.endpoint_string(), "--store", "memory",
                             "--join-attempts", "1000", "--connect-rate", "1000", cwd=temporary_directory(self))
        # Its Site logs no plain "Site starting on PORT" line.
        relay.proto.port.addErrback(lambda f: None)
        [port] = yield relay.proto.ready()
        options = optionsForClientTLS(DOMAIN, trustRoot=TwistedCertificate.loadPEM(le.ca.root_pem))
        endpoint = wrapClientTLS(options, TCP4ClientEndpoint(reactor, "127.0.0.1", port))
        clients = yield closing_clients(50, endpoint.connect, f"wss://{DOMAIN}/ws")
        ended = yield relay.stop()
        codes = yield DeferredList([c.closed for c in clients], consumeErrors=True)
        self.assertEqual(Counter(code for _, code in codes), {1001: 50})
        self.assertIn((ended.exitCode, ended.signal), [(0, None), (None, signal.SIGTERM)])
        self.assertNotIn(b"SSL error", relay.proto.output)


class ReloadOnHangupTests(SynchronousTestCase):
    """
    L{tls.ReloadOnHangup} installs and restores the SIGHUP handler.
    """

    def test_restores_previous_handler(self):
        """
        Stopping the service puts back the handler it replaced.
        """
        previous = signal.getsignal(signal.SIGHUP)
        service = tls.ReloadOnHangup(reactor, [])
        service.startService()
        self.assertEqual(signal.getsignal(signal.SIGHUP), service._on_hangup)
        service.stopService()
        self.assertEqual(signal.getsignal(signal.SIGHUP), previous)


class PlainEndpointTests(TestCase):
    """
    The endpoint serves any factory, wherever an endpoint string is used.
    """

    @inlineCallbacks
    def test_serves_a_plain_site(self):
        """
        A twisted.web Site listens on a letsencrypt: endpoint and answers
        over verified TLS.
        """
        le = Letsencrypt(self)
        root = Resource()
        hello = Resource()
        hello.render_GET = lambda request: b'{"hello": true}'
        root.putChild(b"health", hello)
        endpoint = serverFromString(reactor, le.endpoint_string())
        port = yield endpoint.listen(Site(root))
        self.addCleanup(port.stopListening)
        seen = yield deferToThread(handshake, port.getHost().port, DOMAIN, le.ca.root_pem)
        self.assertTrue(seen["response"].endswith(b'{"hello": true}'))
