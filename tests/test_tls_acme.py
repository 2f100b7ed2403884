"""
The relay's own ACME client (L{leeloo.tls_acme}): the C{acme:} endpoint
string and options, the renewal schedule and backoff on a fake clock, the
challenges on the plain-HTTP sites, and, against a real ACME server
(Debian's pebble on loopback, validating HTTP-01 for real against the
relay's plain listener), first issuance, renewal under a connected
WebSocket, a server that is down at start, a refused order and a restart.
"""

from __future__ import annotations

import datetime
import json
import os
import re
import shutil
import ssl
import sys
import time
import urllib.request
from pathlib import Path

from autobahn.twisted.websocket import WebSocketClientFactory
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from treq.testing import StubTreq
from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults, inlineCallbacks, succeed
from twisted.internet.endpoints import TCP4ClientEndpoint, wrapClientTLS
from twisted.internet.error import ConnectError
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.ssl import Certificate as TwistedCertificate, optionsForClientTLS
from twisted.internet.task import Clock, deferLater
from twisted.internet.testing import EventLoggingObserver
from twisted.internet.threads import deferToThread
from twisted.internet.utils import getProcessOutputAndValue
from twisted.logger import LogLevel, globalLogPublisher
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase, TestCase

from leeloo import tap, tls_acme
from leeloo.testca import LetsEncryptDirectory, ThrowawayCA
from leeloo.tls import CertificateStore, health_fields, load_certificate
from leeloo.tls_acme import (
    AcmeFailure,
    Backoff,
    Challenges,
    Issued,
    ManagedCertificate,
    RenewalState,
    parse_endpoint,
    placeholder_certificate,
    renewal_due,
)
from leeloo.web import make_redirect_site
from tests.support import RelayProcess, log_texts
from tests.test_acme import Server, free_port
from tests.test_tls import WORKTREE, WaitingClient, handshake, listening_port, temporary_directory

DOMAIN = "relay.leeloo.test"
OTHER = "www.leeloo.test"
DAY = 86400.0


# ------------------------------------------------------------ the endpoint

class EndpointStringTests(SynchronousTestCase):
    """
    L{tls_acme.parse_endpoint} reads C{acme:} listen strings.
    """

    def test_defaults(self):
        """
        Only domain= is needed: port 443, backlog 1024, an ECDSA P-256 key,
        the first domain names the certificate.
        """
        spec = parse_endpoint(f"acme:domain={DOMAIN.upper()},{OTHER}")
        self.assertEqual((spec.domains, spec.name, spec.port, spec.backlog, spec.key),
                         ((DOMAIN, OTHER), DOMAIN, 443, 1024, "ecdsa-p256"))

    def test_options(self):
        """
        port, interface (with Twisted's escaped colons), backlog, key and
        watch are read.
        """
        spec = parse_endpoint(rf"acme:domain={DOMAIN}:port=8443:interface=\:\:1:backlog=10:key=rsa2048:watch=0")
        self.assertEqual((spec.port, spec.interface, spec.backlog, spec.key, spec.watch),
                         (8443, "::1", 10, "rsa2048", 0.0))

    def test_wildcard_refused(self):
        """
        A wildcard is refused: HTTP-01 cannot prove it.
        """
        e = self.assertRaises(ValueError, parse_endpoint, "acme:domain=*.leeloo.test")
        self.assertIn("wildcard", str(e))

    def test_ip_address_refused(self):
        """
        An IP address is refused: HTTP-01 cannot prove it.
        """
        for address in ("127.0.0.1", r"\:\:1"):
            e = self.assertRaises(ValueError, parse_endpoint, f"acme:domain={address}")
            self.assertIn("IP address", str(e))

    def test_unknown_option_and_key_refused(self):
        """
        An unknown option, or key type, is refused naming the known ones.
        """
        e = self.assertRaises(ValueError, parse_endpoint, f"acme:domain={DOMAIN}:directory=/x")
        self.assertIn("known: domain, port", str(e))
        e = self.assertRaises(ValueError, parse_endpoint, f"acme:domain={DOMAIN}:key=dsa")
        self.assertIn("ecdsa-p256, rsa2048, rsa4096", str(e))

    def test_no_domain_refused(self):
        """
        Without domain= the string is refused with an example.
        """
        e = self.assertRaises(ValueError, parse_endpoint, "acme:port=443")
        self.assertIn("acme:domain=", str(e))


class OptionsTests(SynchronousTestCase):
    """
    The C{--acme-*} options and C{acme:} listen strings in C{twistd leeloo}.
    """

    def parse(self, *argv: str) -> tap.Options:
        options = tap.Options(environ={})
        options.parseOptions(["--data-dir", temporary_directory(self), *argv])
        return options

    def test_acme_config(self):
        """
        The options become the config's AcmeConfig: Let's Encrypt's
        production directory and a 60 s retry by default.
        """
        config = self.parse("--listen", f"acme:domain={DOMAIN}", "--acme-agree-tos",
                            "--acme-email", "ops@leeloo.test").config
        self.assertEqual((config.acme.directory_url, config.acme.retry, config.acme.email),
                         (tls_acme.LETS_ENCRYPT, 60.0, "ops@leeloo.test"))
        self.assertEqual(config.acme.endpoints[0].domains, (DOMAIN,))
        self.assertIn(f"acme:domain={DOMAIN}", config.listen)

    def test_terms_of_service_needed(self):
        """
        Without --acme-agree-tos the relay does not start, with one line
        saying why.
        """
        e = self.assertRaises(SystemExit, self.parse, "--listen", f"acme:domain={DOMAIN}")
        line = str(e.code)
        self.assertNotIn("\n", line)
        self.assertIn("--acme-agree-tos", line)
        self.assertTrue(line.startswith("leeloo: cannot start:"))

    def test_same_domain_on_letsencrypt_refused(self):
        """
        A domain on both an acme: and a letsencrypt: endpoint is refused.
        """
        e = self.assertRaises(usage.UsageError, self.parse, "--acme-agree-tos",
                              "--listen", f"acme:domain={OTHER},{DOMAIN}",
                              "--listen", f"letsencrypt:domain={DOMAIN}:port=0")
        self.assertIn(f"{DOMAIN} is on both an acme: and a letsencrypt: endpoint", str(e))

    def test_overlapping_acme_endpoints_refused(self):
        """
        Two acme: endpoints sharing some but not all domains are refused.
        """
        e = self.assertRaises(usage.UsageError, self.parse, "--acme-agree-tos",
                              "--listen", f"acme:domain={DOMAIN}",
                              "--listen", f"acme:domain={DOMAIN},{OTHER}:port=8443")
        self.assertIn("two acme: endpoints", str(e))

    def test_wildcard_refused(self):
        """
        A wildcard acme: domain is a usage error.
        """
        e = self.assertRaises(usage.UsageError, self.parse, "--acme-agree-tos",
                              "--listen", "acme:domain=*.leeloo.test")
        self.assertIn("wildcard", str(e))

    def test_directory_must_be_a_url(self):
        """
        An --acme-directory that is not an http(s) URL is refused.
        """
        e = self.assertRaises(usage.UsageError, self.parse, "--acme-agree-tos", "--listen",
                              f"acme:domain={DOMAIN}", "--acme-directory", "letsencrypt")
        self.assertIn("--acme-directory 'letsencrypt' is not an http(s) URL", str(e))

    def test_warns_without_plain_listener(self):
        """
        acme: endpoints with no plain-HTTP listener for the challenge get a
        start-up warning naming --redirect-listen; with one, none.
        """
        config = self.parse("--acme-agree-tos", "--listen", f"acme:domain={DOMAIN}").config
        [warning] = config.warnings
        self.assertIn("add --redirect-listen tcp:80", warning)
        config = self.parse("--acme-agree-tos", "--listen", f"acme:domain={DOMAIN}",
                            "--redirect-listen", "tcp:0:interface=127.0.0.1").config
        self.assertEqual(config.warnings, ())

    def test_missing_ca_bundle_refused(self):
        """
        An --acme-ca-bundle that cannot be read is refused.
        """
        e = self.assertRaises(usage.UsageError, self.parse, "--acme-agree-tos", "--listen",
                              f"acme:domain={DOMAIN}", "--acme-ca-bundle", "/nonexistent/ca.pem")
        self.assertIn("--acme-ca-bundle /nonexistent/ca.pem", str(e))


class TwistdTests(TestCase):
    """
    C{twistd leeloo} with an acme: endpoint.
    """

    @inlineCallbacks
    def test_without_terms_prints_one_line(self):
        """
        Without --acme-agree-tos twistd exits 1 with one line, no traceback.
        """
        out, err, code = yield getProcessOutputAndValue(
            sys.executable,
            ["-c", "from twisted.scripts.twistd import run; run()", "--nodaemon", "--pidfile=", "leeloo",
             "--data-dir", temporary_directory(self), "--listen", f"acme:domain={DOMAIN}"],
            env={**os.environ, "PYTHONPATH": WORKTREE},
        )
        self.assertEqual(code, 1)
        lines = err.decode().strip().splitlines()
        self.assertEqual(len(lines), 1, err)
        self.assertIn("--acme-agree-tos", lines[0])
        self.assertNotIn(b"Traceback", out + err)


# ---------------------------------------------------------------- renewal

class BackoffTests(SynchronousTestCase):
    """
    L{Backoff}: exponential from --acme-retry, jittered, capped at a day.
    """

    def test_doubles_from_initial(self):
        """
        With no jitter the delays are 60, 120, 240, ... seconds.
        """
        backoff = Backoff(60, random=lambda: 0.0)
        self.assertEqual([backoff.delay(n) for n in (1, 2, 3, 4)], [60, 120, 240, 480])

    def test_jitter_adds_up_to_a_quarter(self):
        """
        The jitter adds up to a quarter of the delay.
        """
        self.assertEqual(Backoff(60, random=lambda: 1.0).delay(2), 150)
        self.assertEqual(Backoff(60, random=lambda: 0.5).delay(1), 67.5)

    def test_capped_at_a_day(self):
        """
        However many failures, no delay exceeds a day.
        """
        backoff = Backoff(60, random=lambda: 1.0)
        self.assertEqual(backoff.delay(30), DAY)
        self.assertEqual(backoff.delay(1000), DAY)


class FakeIssuer:
    """
    An issuer whose orders the test answers: C{orders} holds one Deferred
    per L{issue} call.
    """

    def __init__(self) -> None:
        self.orders: list[tuple[tuple[str, ...], Deferred]] = []
        self.offers_renewal_info = False
        self.ari: float | None = None

    def issue(self, name, domains, kind="ecdsa-p256"):
        d: Deferred = Deferred()
        self.orders.append((tuple(domains), d))
        return d

    def renewal_time(self, fullchain_pem):
        return succeed(self.ari)


class ManagedCertificateTests(SynchronousTestCase):
    """
    L{ManagedCertificate} on a fake clock: when it orders, what it does
    with the result, and how it backs off.
    """

    def setUp(self):
        self.clock = Clock()
        # Certificates count whole seconds.
        self.clock.advance(int(time.time()))
        self.directory = Path(temporary_directory(self))
        self.ca = ThrowawayCA()
        self.issuer = FakeIssuer()

    def manager(self, random=lambda: 0.0, retry=60.0, start=True) -> ManagedCertificate:
        store = CertificateStore(
            self.directory, (DOMAIN,), self.clock,
            placeholder=lambda n: placeholder_certificate(n, (DOMAIN, OTHER), self.clock.seconds()),
            renewer="acme",
        )
        manager = ManagedCertificate(DOMAIN, (DOMAIN, OTHER), "ecdsa-p256", store, self.issuer, self.clock,
                                     self.directory, Backoff(retry, random=random))
        if start:
            manager.start()
        return manager

    def issued(self, days: float = 90, names=(DOMAIN, OTHER)) -> Issued:
        now = datetime.datetime.fromtimestamp(self.clock.seconds(), datetime.timezone.utc)
        cert = self.ca.issue(list(names), not_before=now, not_after=now + datetime.timedelta(days=days))
        return Issued("https://ca.test/order/1", cert.fullchain_pem, cert.key_pem)

    def test_orders_at_once_without_certificate(self):
        """
        With no certificate it orders at start, for all its domains, and
        serves a self-signed placeholder meanwhile, pending with why.
        """
        manager = self.manager()
        self.clock.advance(0)
        self.assertEqual([d for d, _ in self.issuer.orders], [(DOMAIN, OTHER)])
        self.assertEqual(manager.store.pending, {DOMAIN: "no certificate yet"})
        placeholder = manager.store.certificate(DOMAIN)
        self.assertEqual(placeholder.leaf.issuer, placeholder.leaf.subject)
        self.assertEqual(set(placeholder.names), {DOMAIN, OTHER})

    def test_issued_certificate_is_stored_and_served(self):
        """
        The issued certificate is written to live/NAME/ (key 0600), served,
        no longer pending, and its renewal planned when a third of its
        lifetime is left.
        """
        manager = self.manager()
        self.clock.advance(0)
        issued = self.issued()
        self.issuer.orders[0][1].callback(issued)
        live = self.directory / "live" / DOMAIN
        self.assertEqual((live / "privkey.pem").read_bytes(), issued.key_pem)
        self.assertEqual(os.stat(live / "privkey.pem").st_mode & 0o777, 0o600)
        self.assertEqual((live / "fullchain.pem").read_bytes(), issued.fullchain_pem)
        self.assertEqual(manager.store.pending, {})
        served = manager.store.certificate(DOMAIN)
        self.assertEqual(served.fingerprint,
                         x509.load_pem_x509_certificates(issued.fullchain_pem)[0].fingerprint(hashes.SHA256()).hex())
        self.assertEqual(manager.next_attempt, self.clock.seconds() + 60 * DAY)

    def test_renews_when_a_third_is_left(self):
        """
        No order before a third of the lifetime is left; one then.
        """
        self.manager()
        self.clock.advance(0)
        self.issuer.orders[0][1].callback(self.issued(days=90))
        self.clock.advance(60 * DAY - 1)
        self.assertEqual(len(self.issuer.orders), 1)
        self.clock.advance(1)
        self.assertEqual(len(self.issuer.orders), 2)

    def test_renewal_due_is_two_thirds_into_lifetime(self):
        """
        L{renewal_due} is two thirds into the validity period.
        """
        now = int(self.clock.seconds())
        cert = self.ca.issue([DOMAIN], not_before=datetime.datetime.fromtimestamp(now, datetime.timezone.utc),
                             not_after=datetime.datetime.fromtimestamp(now + 9 * DAY, datetime.timezone.utc))
        LetsEncryptDirectory(self.directory).install(DOMAIN, cert)
        loaded = load_certificate(self.directory, DOMAIN, now)
        self.assertEqual(renewal_due(loaded), now + 6 * DAY)

    def test_failure_backs_off_exponentially(self):
        """
        A failed order is retried after --acme-retry, then twice as long,
        and so on; the store stays pending with the error.
        """
        manager = self.manager(retry=60)
        self.clock.advance(0)
        self.issuer.orders[0][1].errback(AcmeFailure("urn:ietf:params:acme:error:rejectedIdentifier: no"))
        self.assertEqual(manager.next_attempt, self.clock.seconds() + 60)
        self.assertIn("rejectedIdentifier", manager.store.pending[DOMAIN])
        self.clock.advance(59)
        self.assertEqual(len(self.issuer.orders), 1)
        self.clock.advance(1)
        self.assertEqual(len(self.issuer.orders), 2)
        self.issuer.orders[1][1].errback(AcmeFailure("again"))
        self.assertEqual(manager.next_attempt, self.clock.seconds() + 120)

    def test_failure_logged_with_order(self):
        """
        A failure is logged at error level with the order URL and the
        problem, and the relay keeps running (nothing raises).
        """
        logged = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        self.manager()
        self.clock.advance(0)
        self.issuer.orders[0][1].errback(AcmeFailure("challenge failed: boom", "https://ca.test/order/7"))
        [line] = log_texts(logged, LogLevel.error)
        self.assertIn("ACME order https://ca.test/order/7", line)
        self.assertIn("challenge failed: boom", line)

    def test_backoff_persists_across_restart(self):
        """
        After a restart the next attempt is the one saved, not at once.
        """
        manager = self.manager(retry=60)
        self.clock.advance(0)
        self.issuer.orders[0][1].errback(AcmeFailure("down"))
        self.issuer.orders[0][1].addErrback(lambda f: None)
        planned = manager.next_attempt
        manager.stop()
        self.clock.advance(30)
        again = self.manager(retry=60)
        self.assertEqual(again.next_attempt, planned)
        self.assertEqual(again.state.failures, 1)
        self.clock.advance(29)
        self.assertEqual(len(self.issuer.orders), 1)
        self.clock.advance(1)
        self.assertEqual(len(self.issuer.orders), 2)
        self.issuer.orders[1][1].errback(AcmeFailure("down"))
        self.assertEqual(again.next_attempt, self.clock.seconds() + 120)

    def test_at_most_five_failures_an_hour(self):
        """
        However short --acme-retry, a sixth failure within an hour waits
        until the first is an hour old (Let's Encrypt's failed-validation
        limit).
        """
        manager = self.manager(retry=1)
        start = self.clock.seconds()
        for n in range(5):
            self.clock.advance(manager.next_attempt - self.clock.seconds())
            self.issuer.orders[n][1].errback(AcmeFailure("invalid"))
        self.assertEqual(manager.next_attempt, start + 3600)

    def test_success_resets_backoff(self):
        """
        After a success the failures are forgotten, on disk too.
        """
        manager = self.manager()
        self.clock.advance(0)
        self.issuer.orders[0][1].errback(AcmeFailure("down"))
        self.clock.advance(60)
        self.issuer.orders[1][1].callback(self.issued())
        state = RenewalState.load(self.directory / "renewal" / f"{DOMAIN}.json")
        self.assertEqual((state.failures, state.next_attempt, state.last_order),
                         (0, None, "https://ca.test/order/1"))
        self.assertEqual(manager.state.failures, 0)

    def test_unservable_certificate_is_a_failure(self):
        """
        An issued certificate whose key does not match is not served: the
        placeholder stays and the order is retried.
        """
        manager = self.manager()
        self.clock.advance(0)
        good, other = self.issued(), self.issued()
        self.issuer.orders[0][1].callback(Issued(good.order, good.fullchain_pem, other.key_pem))
        self.assertIn(DOMAIN, manager.store.pending)
        self.assertIn("privkey.pem does not match", manager.state.last_error)
        self.assertEqual(manager.next_attempt, self.clock.seconds() + 60)

    def test_unservable_renewal_keeps_files(self):
        """
        A renewal that cannot be served leaves the certificate served, and
        its files, as they were.
        """
        manager = self.manager()
        self.clock.advance(0)
        self.issuer.orders[0][1].callback(self.issued())
        before = manager.store.certificate(DOMAIN).fingerprint
        files = (self.directory / "live" / DOMAIN / "privkey.pem").read_bytes()
        self.clock.advance(60 * DAY)
        good, other = self.issued(), self.issued()
        self.issuer.orders[1][1].callback(Issued(good.order, good.fullchain_pem, other.key_pem))
        self.assertEqual(manager.store.certificate(DOMAIN).fingerprint, before)
        self.assertEqual((self.directory / "live" / DOMAIN / "privkey.pem").read_bytes(), files)
        self.assertEqual(manager.state.failures, 1)

    def test_certificate_missing_a_domain_is_reordered(self):
        """
        A stored certificate that does not cover every configured domain
        (one was added) is ordered again at start.
        """
        manager = self.manager()
        self.clock.advance(0)
        self.issuer.orders[0][1].callback(self.issued(names=(DOMAIN,)))
        manager.stop()
        self.manager()
        self.clock.advance(0)
        self.assertEqual(len(self.issuer.orders), 2)

    def test_imported_certificate_served_while_ordering(self):
        """
        A certificate copied into live/NAME/ (certbot's, when switching
        over) is served at once, and the relay orders its own meanwhile.
        """
        copied = self.issued()
        LetsEncryptDirectory(self.directory).install(DOMAIN, fullchain=copied.fullchain_pem, privkey=copied.key_pem)
        manager = self.manager()
        self.clock.advance(0)
        self.assertEqual(manager.store.pending, {})
        leaf = x509.load_pem_x509_certificates(copied.fullchain_pem)[0]
        self.assertEqual(manager.store.certificate(DOMAIN).fingerprint, leaf.fingerprint(hashes.SHA256()).hex())
        self.assertEqual(len(self.issuer.orders), 1)

    def test_ari_window_renews_earlier(self):
        """
        Where the CA offers renewal info, a window earlier than the
        third-of-lifetime rule decides.
        """
        self.issuer.offers_renewal_info = True
        manager = self.manager()
        self.clock.advance(0)
        self.issuer.ari = self.clock.seconds() + 10 * DAY
        self.issuer.orders[0][1].callback(self.issued())
        self.assertEqual(manager.state.ari, True)
        self.clock.advance(10 * DAY)
        self.assertEqual(len(self.issuer.orders), 2)

    def test_stopped_manager_does_not_order(self):
        """
        Once stopped it orders no more, even when a failure comes in late.
        """
        manager = self.manager()
        self.clock.advance(0)
        manager.stop()
        self.issuer.orders[0][1].errback(AcmeFailure("late"))
        self.clock.advance(DAY)
        self.assertEqual((len(self.issuer.orders), manager.next_attempt), (1, None))


class FakeAcmeClient:
    """
    Stands in for C{acme.client.ClientV2}: a real C{Directory}, and a
    C{renewal_time} that answers C{window}.
    """

    def __init__(self, directory: dict, window) -> None:
        from acme import messages

        self.directory = messages.Directory(directory)
        self.window = window
        self.asked: list[bytes] = []

    def renewal_time(self, cert_pem: bytes):
        self.asked.append(cert_pem)
        return self.window, datetime.datetime.now() + datetime.timedelta(hours=6)


class RenewalInfoTests(TestCase):
    """
    L{tls_acme.AcmeIssuer.renewal_time}: the CA's ARI window, where its
    directory offers renewalInfo.
    """

    def issuer(self, client: FakeAcmeClient) -> tls_acme.AcmeIssuer:
        issuer = tls_acme.AcmeIssuer(reactor, tls_acme.AcmeConfig(endpoints=()), Path(temporary_directory(self)) / "k",
                                     Challenges())
        issuer._client = client
        return issuer

    @inlineCallbacks
    def test_window_where_offered(self):
        """
        With renewalInfo in the directory, the window's time is returned.
        """
        window = datetime.datetime(2030, 1, 2, 3, 4, 5, tzinfo=datetime.timezone.utc)
        client = FakeAcmeClient({"newAccount": "https://ca.test/acct", "renewalInfo": "https://ca.test/ari"}, window)
        when = yield self.issuer(client).renewal_time(b"PEM")
        self.assertEqual((when, client.asked), (window.timestamp(), [b"PEM"]))

    @inlineCallbacks
    def test_none_without_renewal_info(self):
        """
        Without renewalInfo (Debian's pebble) nothing is asked and the
        answer is None.
        """
        client = FakeAcmeClient({"newAccount": "https://ca.test/acct"}, None)
        when = yield self.issuer(client).renewal_time(b"PEM")
        self.assertEqual((when, client.asked), (None, []))


class StoreTests(SynchronousTestCase):
    """
    The certificate store's part: placeholders, /health, and the expiry
    warning for a certificate the relay renews itself.
    """

    def test_health_says_pending(self):
        """
        /health's fields carry tls_pending with why while a domain waits.
        """
        store = CertificateStore(temporary_directory(self), (DOMAIN,), Clock(),
                                 placeholder=lambda n: placeholder_certificate(n, (n,), time.time()))
        store.set_pending(DOMAIN, "ordering")
        self.assertEqual(health_fields([store])(), {"tls_not_after": {}, "tls_pending": {DOMAIN: "ordering"}})

    def test_expiry_warning_does_not_blame_certbot(self):
        """
        The expiry warning of an acme: certificate points at the relay's
        ACME log lines, not at certbot.
        """
        path = temporary_directory(self)
        now = datetime.datetime.now(datetime.timezone.utc)
        LetsEncryptDirectory(path).install(DOMAIN, ThrowawayCA().issue([DOMAIN], not_after=now + datetime.timedelta(days=3)))
        clock = Clock()
        clock.advance(time.time())
        store = CertificateStore(path, (DOMAIN,), clock, renewer="acme")
        logged = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        store.check()
        [line] = log_texts(logged, LogLevel.warn)
        self.assertIn("ACME", line)
        self.assertNotIn("certbot", line)


class ChallengeSiteTests(SynchronousTestCase):
    """
    HTTP-01 tokens from memory on the plain-HTTP sites.
    """

    def get(self, root, path: str):
        client = StubTreq(root)
        response = self.successResultOf(client.get("http://relay.leeloo.test" + path))
        return response.code, self.successResultOf(response.content())

    def test_redirect_site_answers_from_memory(self):
        """
        The --redirect-listen site answers a token held in memory, with no
        webroot, and 404s one it does not hold.
        """
        challenges = Challenges()
        challenges.add("tok-1", "tok-1.thumbprint")
        root = make_redirect_site(None, challenges=challenges.lookup).resource
        self.assertEqual(self.get(root, "/.well-known/acme-challenge/tok-1"), (200, b"tok-1.thumbprint"))
        self.assertEqual(self.get(root, "/.well-known/acme-challenge/tok-2")[0], 404)
        challenges.remove("tok-1")
        self.assertEqual(self.get(root, "/.well-known/acme-challenge/tok-1")[0], 404)

    def test_main_site_answers_from_memory(self):
        """
        The main site (plain --listen) answers the tokens too.
        """
        config = tap.Config(listen=("tcp:0:interface=127.0.0.1",), data_dir=Path(temporary_directory(self)),
                            store="memory", acme=tls_acme.AcmeConfig(endpoints=(parse_endpoint(
                                f"acme:domain={DOMAIN}:port=0:interface=127.0.0.1"),)))
        config = tap.Config(**{**config.__dict__, "listen": config.listen + (config.acme.endpoints[0].description,)})
        service = tap.build_service(config, reactor)
        service.acme.challenges.add("abc_DEF-1", "abc_DEF-1.key")
        self.assertEqual(self.get(service.site.resource, "/.well-known/acme-challenge/abc_DEF-1"),
                         (200, b"abc_DEF-1.key"))
        self.assertEqual(self.get(service.site.resource, "/.well-known/acme-challenge/other")[0], 404)


# --------------------------------------------------------- against pebble

TOOLS = ("pebble", "pebble-challtestsrv")


@inlineCallbacks
def until_listening(port: int, attempts: int = 200, every: float = 0.05):
    """
    Fire once something accepts connections on loopback C{port}: a server
    that says so only before it listens gives no other event to wait for.
    """
    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port)
    for _ in range(attempts):
        try:
            connected = yield endpoint.connect(Factory.forProtocol(Protocol))
        except ConnectError:
            yield deferLater(reactor, every, lambda: None)
        else:
            connected.transport.abortConnection()
            return
    raise AssertionError(f"nothing listens on 127.0.0.1:{port}")


class Pebble:
    """
    Debian's pebble on free loopback ports with its DNS stub answering
    127.0.0.1 for every name; it validates HTTP-01 on C{http_port}.
    """

    def __init__(self, testcase: TestCase, http_port: int, **config) -> None:
        self.testcase = testcase
        self.tmp = Path(temporary_directory(testcase))
        self.http_port = http_port
        ca = ThrowawayCA("pebble front")
        served = ca.issue(["127.0.0.1", "localhost"])
        (self.tmp / "pebble-cert.pem").write_bytes(served.fullchain_pem)
        (self.tmp / "pebble-key.pem").write_bytes(served.key_pem)
        self.ca_bundle = self.tmp / "ca.pem"
        self.ca_bundle.write_bytes(ca.root_pem)
        self.port, self.management = free_port(), free_port()
        self.directory_url = f"https://127.0.0.1:{self.port}/dir"
        self.config = {
            "listenAddress": f"127.0.0.1:{self.port}",
            "managementListenAddress": f"127.0.0.1:{self.management}",
            "certificate": str(self.tmp / "pebble-cert.pem"),
            "privateKey": str(self.tmp / "pebble-key.pem"),
            "httpPort": http_port,
            "tlsPort": free_port(),
            "ocspResponderURL": "",
            "externalAccountBindingRequired": False,
            **config,
        }
        self.dns_port = free_port()

    @inlineCallbacks
    def spawn(self, marker: bytes, argv: list[str], env: dict | None = None):
        server = Server(marker)
        reactor.spawnProcess(server, shutil.which(argv[0]), argv, env={**os.environ, **(env or {})})
        self.testcase.addCleanup(server.stop)
        yield server.ready
        return server

    @inlineCallbacks
    def start(self):
        (self.tmp / "pebble.json").write_text(json.dumps({"pebble": self.config}))
        yield self.spawn(b"Starting management server", [
            "pebble-challtestsrv", "-defaultIPv4", "127.0.0.1", "-defaultIPv6", "",
            "-dns01", f"127.0.0.1:{self.dns_port}", "-http01", "", "-https01", "", "-tlsalpn01", "",
            "-management", f"127.0.0.1:{free_port()}",
        ])
        # No nonce rejections, no sleeps before validating, no reused
        # authorizations (every order validates for real).
        self.server = yield self.spawn(b"ACME directory available at", [
            "pebble", "-config", str(self.tmp / "pebble.json"), "-dnsserver", f"127.0.0.1:{self.dns_port}",
        ], env={"PEBBLE_VA_NOSLEEP": "1", "PEBBLE_WFE_NONCEREJECT": "0", "PEBBLE_AUTHZREUSE": "0"})
        # Pebble logs each address before its goroutine listens there.
        yield until_listening(self.port)
        yield until_listening(self.management)
        context = ssl.create_default_context(cafile=str(self.ca_bundle))
        self.root_pem = yield deferToThread(
            lambda: urllib.request.urlopen(f"https://127.0.0.1:{self.management}/roots/0", context=context).read())
        return self


class AgainstPebbleTests(TestCase):
    """
    The relay orders, serves and renews its certificates from a real ACME
    server, which validates the HTTP-01 challenge against the relay's own
    plain listener (no PEBBLE_VA_ALWAYS_VALID).
    """

    timeout = 60

    if not all(shutil.which(tool) for tool in TOOLS):
        skip = "needs Debian's pebble (scripts/test.sh installs it)"

    def config(self, pebble: Pebble, data_dir: Path, plain: str = "listen", retry: float = 60.0,
               domains: str = DOMAIN) -> tap.Config:
        plain_listener = f"tcp:{pebble.http_port}:interface=127.0.0.1"
        spec = parse_endpoint(f"acme:domain={domains}:port=0:interface=127.0.0.1:watch=0")
        return tap.Config(
            listen=(spec.description,) + ((plain_listener,) if plain == "listen" else ()),
            redirect_listen=(plain_listener,) if plain == "redirect" else (),
            data_dir=data_dir, store="memory",
            acme=tls_acme.AcmeConfig(endpoints=(spec,), directory_url=pebble.directory_url,
                                     ca_bundle=pebble.ca_bundle, retry=retry, email="ops@leeloo.test"),
        )

    @inlineCallbacks
    def start(self, config: tap.Config):
        service = tap.build_service(config, reactor)
        service.startService()
        self.addCleanup(service.stopService)
        [https] = [s for s in service.listeners if getattr(s, "endpoint", None) is not None
                   and isinstance(getattr(s.endpoint, "certificates", None), CertificateStore)]
        port = yield listening_port(https)
        [managed] = service.acme.certificates.values()
        return service, port.getHost().port, managed

    @inlineCallbacks
    def device(self, port: int, root_pem: bytes, server_name: str, device_id: str):
        factory = WebSocketClientFactory(f"wss://{server_name}/ws")
        factory.protocol = WaitingClient
        options = optionsForClientTLS(server_name, trustRoot=TwistedCertificate.loadPEM(root_pem))
        endpoint = wrapClientTLS(options, TCP4ClientEndpoint(reactor, "127.0.0.1", port))
        client = yield endpoint.connect(factory)
        self.addCleanup(lambda: client.state != client.STATE_CLOSED and (client.sendClose(), client.closed)[1])
        yield client.opened
        client.send_json({"type": "register", "device_id": device_id, "crew_code": "ACME"})
        reply = yield client.next_message()
        self.assertEqual(reply["type"], "registered")
        return client

    def health(self, port: int) -> Deferred:
        def get():
            return json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=10).read())

        return deferToThread(get)

    @inlineCallbacks
    def test_first_issuance_then_wss(self):
        """
        On first start the relay registers, orders one certificate for both
        domains, answers the challenge on its --redirect-listen, stores it
        in the documented layout (keys 0600) and serves it: a WSS client
        verifying against pebble's root connects by either name.
        """
        logged = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        pebble = yield Pebble(self, free_port()).start()
        data = Path(temporary_directory(self))
        service, port, managed = yield self.start(self.config(pebble, data, plain="redirect",
                                                               domains=f"{DOMAIN},{OTHER}"))
        yield managed.when_done()
        certificates = data / "certificates"
        for key in (certificates / "account.key", certificates / "live" / DOMAIN / "privkey.pem"):
            self.assertEqual(os.stat(key).st_mode & 0o777, 0o600)
        leaf = x509.load_pem_x509_certificates((certificates / "live" / DOMAIN / "fullchain.pem").read_bytes())[0]
        self.assertEqual(set(leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName)
                             .value.get_values_for_type(x509.DNSName)), {DOMAIN, OTHER})
        self.assertTrue(any("GET /.well-known/acme-challenge/" in t and '" 200 ' in t for t in log_texts(logged)),
                        "pebble's validation did not reach the relay's redirect listener")
        client = yield self.device(port, pebble.root_pem, OTHER, "leeloo_aaaaaaaaaaaa")
        seen = client.transport.getPeerCertificate().to_cryptography()
        self.assertEqual(seen.fingerprint(hashes.SHA256()), leaf.fingerprint(hashes.SHA256()))
        self.assertTrue(any("ACME order https://127.0.0.1" in t and "issued" in t
                            for t in log_texts(logged, LogLevel.info)))

    @inlineCallbacks
    def test_two_certificates_one_account(self):
        """
        Two acme: endpoints with different domains get a certificate each,
        through one account registered once; key=rsa2048 gets an RSA key.
        """
        logged = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        pebble = yield Pebble(self, free_port()).start()
        config = self.config(pebble, Path(temporary_directory(self)))
        second = parse_endpoint(f"acme:domain={OTHER}:port=0:interface=127.0.0.1:watch=0:key=rsa2048")
        config = tap.Config(**{**config.__dict__, "listen": config.listen + (second.description,),
                               "acme": tls_acme.AcmeConfig(**{**config.acme.__dict__,
                                                              "endpoints": config.acme.endpoints + (second,)})})
        service = tap.build_service(config, reactor)
        managed = list(service.acme.certificates.values())
        done = [m.when_done() for m in managed]
        service.startService()
        self.addCleanup(service.stopService)
        outcomes = yield gatherResults(done)
        self.assertEqual([type(o) for o in outcomes], [Issued, Issued])
        self.assertEqual([m.store.certificate(m.name).names for m in managed], [(DOMAIN,), (OTHER,)])
        self.assertEqual(len([t for t in log_texts(logged) if "ACME account" in t]), 1)
        keys = [m.store.certificate(m.name).key for m in managed]
        self.assertIsInstance(keys[0], ec.EllipticCurvePrivateKey)
        self.assertEqual(keys[0].curve.name, "secp256r1")
        self.assertIsInstance(keys[1], rsa.RSAPrivateKey)
        self.assertEqual(keys[1].key_size, 2048)

    @inlineCallbacks
    def test_renewal_while_websocket_connected(self):
        """
        With pebble issuing 12-second certificates, the relay renews when a
        third is left (challenge on its plain --listen): new connections get
        the new certificate and a WebSocket opened before keeps working.
        """
        logged = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        pebble = yield Pebble(self, free_port(), certificateValidityPeriod=12).start()
        service, port, managed = yield self.start(self.config(pebble, Path(temporary_directory(self))))
        issued = yield managed.when_done()
        self.assertIsInstance(issued, Issued)
        self.assertTrue(any("GET /.well-known/acme-challenge/" in t and '" 200 ' in t for t in log_texts(logged)),
                        "pebble's validation did not reach the relay's plain --listen")
        first = managed.store.certificate(DOMAIN)
        lifetime = (first.leaf.not_valid_after_utc - first.leaf.not_valid_before_utc).total_seconds()
        self.assertLessEqual(lifetime, 13)
        self.assertLess(abs(managed.next_attempt - renewal_due(first)), 0.01)
        a = yield self.device(port, pebble.root_pem, DOMAIN, "leeloo_aaaaaaaaaaaa")
        renewed = yield managed.when_done()
        self.assertIsInstance(renewed, Issued)
        second = managed.store.certificate(DOMAIN)
        self.assertNotEqual(second.fingerprint, first.fingerprint)
        seen = yield deferToThread(handshake, port, DOMAIN, pebble.root_pem)
        self.assertEqual(seen["fingerprint"], second.fingerprint)
        b = yield self.device(port, pebble.root_pem, DOMAIN, "leeloo_bbbbbbbbbbbb")
        a.send_json({"type": "reaction", "reaction_type": "fire"})
        got = yield b.next_message()
        self.assertEqual(got["type"], "reaction")
        self.assertEqual(a.transport.getPeerCertificate().to_cryptography().fingerprint(hashes.SHA256()).hex(),
                         first.fingerprint)

    @inlineCallbacks
    def test_pebble_down_at_start(self):
        """
        With the ACME server down, the relay starts, serves a placeholder
        (a verifying client fails) and says so in /health; it retries after
        --acme-retry and gets its certificate once the server is up.
        """
        logged = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        http_port = free_port()
        pebble = Pebble(self, http_port)
        service, port, managed = yield self.start(self.config(pebble, Path(temporary_directory(self)), retry=0.5))
        yield managed.when_done()
        self.assertGreaterEqual(managed.next_attempt - reactor.seconds(), 0.4)
        self.assertIn("cannot connect to the ACME server", managed.store.pending[DOMAIN])
        health = yield self.health(http_port)
        self.assertIn("cannot connect", health["tls_pending"][DOMAIN])
        self.assertTrue(any("failed: account at" in t for t in log_texts(logged, LogLevel.error)))
        yield pebble.start()
        try:
            yield deferToThread(handshake, port, DOMAIN, pebble.root_pem)
        except ssl.SSLCertVerificationError:
            pass
        else:
            # The order may already have finished: then the placeholder is gone.
            self.assertNotIn(DOMAIN, managed.store.pending)
        if DOMAIN in managed.store.pending:
            yield managed.store.when_reloaded()
        seen = yield deferToThread(handshake, port, DOMAIN, pebble.root_pem)
        self.assertEqual(seen["fingerprint"], managed.store.certificate(DOMAIN).fingerprint)
        self.assertGreaterEqual(managed.attempts, 2)
        health = yield self.health(http_port)
        self.assertNotIn("tls_pending", health)

    @inlineCallbacks
    def test_placeholder_fails_verification(self):
        """
        Until the certificate arrives a verifying client fails on the
        self-signed placeholder, which names itself as such.
        """
        pebble = Pebble(self, free_port())
        service, port, managed = yield self.start(self.config(pebble, Path(temporary_directory(self)), retry=30))
        yield managed.when_done()
        e = yield self.assertFailure(deferToThread(handshake, port, DOMAIN, pebble.ca_bundle.read_bytes()),
                                     ssl.SSLCertVerificationError)
        self.assertIn("self-signed", str(e))
        self.assertIn("placeholder", managed.store.certificate(DOMAIN).leaf.subject.rfc4514_string())

    @inlineCallbacks
    def test_refused_order(self):
        """
        An order the CA refuses is logged with the problem, backed off
        (--acme-retry, persisted), and not retried at once.
        """
        logged = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        pebble = yield Pebble(self, free_port(), domainBlocklist=[DOMAIN]).start()
        data = Path(temporary_directory(self))
        service, port, managed = yield self.start(self.config(pebble, data, retry=30))
        yield managed.when_done()
        [line] = [t for t in log_texts(logged, LogLevel.error) if "ACME order" in t]
        self.assertIn("rejectedIdentifier", line)
        self.assertGreaterEqual(managed.next_attempt - reactor.seconds(), 29)
        state = json.loads((data / "certificates" / "renewal" / f"{DOMAIN}.json").read_text())
        self.assertEqual(state["failures"], 1)
        self.assertGreaterEqual(state["next_attempt"], managed.next_attempt - 0.01)
        # A reactor turn later, still one attempt.
        yield deferToThread(lambda: None)
        self.assertEqual(managed.attempts, 1)
        self.assertIn(DOMAIN, managed.store.pending)

    @inlineCallbacks
    def test_failed_challenge(self):
        """
        A challenge the CA cannot validate (nothing answers on its HTTP
        port) fails the order, logged with the order's URL and the CA's
        problem, and is retried later, not at once.
        """
        logged = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        pebble = yield Pebble(self, free_port()).start()
        config = self.config(pebble, Path(temporary_directory(self)), retry=30)
        # The plain listener is not where pebble connects.
        config = tap.Config(**{**config.__dict__, "listen": (config.listen[0], "tcp:0:interface=127.0.0.1")})
        service, port, managed = yield self.start(config)
        failure = yield managed.when_done()
        self.assertIsInstance(failure, AcmeFailure)
        self.assertTrue(failure.order.startswith(f"https://127.0.0.1:{pebble.port}/"), failure.order)
        [line] = [t for t in log_texts(logged, LogLevel.error) if "ACME order" in t]
        self.assertIn(f"ACME order {failure.order} for {DOMAIN} failed: challenge failed: {DOMAIN}: "
                      "urn:ietf:params:acme:error:connection", line)
        self.assertGreaterEqual(managed.next_attempt - reactor.seconds(), 29)
        # Its token is no longer answered.
        self.assertEqual(len(service.acme.challenges), 0)

    @inlineCallbacks
    def test_twistd_gets_certificate(self):
        """
        twistd leeloo with --listen acme:... and the --acme-* options gets
        its certificate from pebble and serves it.
        """
        pebble = yield Pebble(self, free_port()).start()
        relay = RelayProcess(
            self, "--data-dir", temporary_directory(self), "--store", "memory",
            "--listen", f"acme:domain={DOMAIN}:port=0:interface=127.0.0.1",
            "--redirect-listen", f"tcp:{pebble.http_port}:interface=127.0.0.1",
            "--acme-directory", pebble.directory_url, "--acme-ca-bundle", str(pebble.ca_bundle),
            "--acme-agree-tos", "--acme-retry", "30")
        yield relay.proto.port
        output = yield self.wait_for(relay, re.compile(rb"ACME order \S+: certificate for \S+ issued"))
        port = int(re.search(rb"HTTPS on IPv4Address\(type='TCP', host='127.0.0.1', port=(\d+)\)", output).group(1))
        seen = yield deferToThread(handshake, port, DOMAIN, pebble.root_pem)
        self.assertEqual(seen["version"], "TLSv1.3")
        yield relay.stop()
        self.assertNotIn(b"Traceback", relay.proto.output)

    def wait_for(self, relay: RelayProcess, pattern) -> Deferred:
        """
        Fires with the process's output once C{pattern} is in it.
        """
        found: Deferred = Deferred()
        received = relay.proto.outReceived

        def watch(data: bytes) -> None:
            received(data)
            if not found.called and pattern.search(relay.proto.output):
                found.callback(relay.proto.output)

        relay.proto.outReceived = relay.proto.errReceived = watch
        watch(b"")
        return found

    @inlineCallbacks
    def test_restart_reuses_account_and_certificate(self):
        """
        A restart serves the stored certificate with the stored account key
        and places no new order: the next one is the planned renewal.
        """
        pebble = yield Pebble(self, free_port()).start()
        data = Path(temporary_directory(self))
        config = self.config(pebble, data)
        service, port, managed = yield self.start(config)
        yield managed.when_done()
        fingerprint = managed.store.certificate(DOMAIN).fingerprint
        account = (data / "certificates" / "account.key").read_bytes()
        yield service.stopService()
        logged = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        service, port, managed = yield self.start(config)
        seen = yield deferToThread(handshake, port, DOMAIN, pebble.root_pem)
        self.assertEqual(seen["fingerprint"], fingerprint)
        self.assertEqual(managed.attempts, 0)
        self.assertLess(abs(managed.next_attempt - renewal_due(managed.store.certificate(DOMAIN))), 0.01)
        self.assertEqual((data / "certificates" / "account.key").read_bytes(), account)
        self.assertFalse([t for t in log_texts(logged) if "ACME order" in t or "ACME account" in t])
        # A renewal now (as when one is due) logs in to the same account.
        renewed = yield managed.attempt().addCallback(lambda _: managed.store.certificate(DOMAIN))
        self.assertNotEqual(renewed.fingerprint, fingerprint)
        [account_line] = [t for t in log_texts(logged) if "ACME account" in t]
        self.assertTrue(account_line.endswith(": existing"), account_line)
        self.assertEqual((data / "certificates" / "account.key").read_bytes(), account)
