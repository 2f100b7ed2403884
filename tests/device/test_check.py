"""
C{leeloo-device check} (L{leeloo.device.check.Check}) against the real relay
on loopback, plain and TLS, and against everything that can go wrong.
"""

import io
import os

from twisted.internet import defer, protocol, reactor
from twisted.internet.ssl import Certificate
from twisted.trial.unittest import SynchronousTestCase, TestCase

from leeloo.device.check import CROSS, TICK, Check, check_identity
from leeloo.testca import ThrowawayCA, cert_pem

from .loopback import LoopbackRelay


def tls_listen(testcase, names=("localhost", "127.0.0.1")):
    """
    An ssl: listen string with a certificate for C{names} from a new
    throwaway CA; return it and the CA.
    """
    ca = ThrowawayCA()
    issued = ca.issue(list(names))
    directory = testcase.mktemp()
    os.makedirs(directory)
    files = {"key.pem": issued.key_pem, "cert.pem": cert_pem(issued.cert),
             "chain.pem": b"".join(cert_pem(c) for c in issued.chain)}
    for name, data in files.items():
        with open(os.path.join(directory, name), "wb") as f:
            f.write(data)
    listen = (f"ssl:{{port}}:interface=127.0.0.1:privateKey={directory}/key.pem:"
              f"certKey={directory}/cert.pem:extraCertChain={directory}/chain.pem")
    return listen, ca


class CheckTestCase(TestCase):

    timeout = 30

    def check(self, url, **kwargs):
        out = io.StringIO()
        d = Check(reactor, url, out, **kwargs).run()
        return d.addCallback(lambda status: (status, out.getvalue().splitlines()))


class PassingTests(CheckTestCase):

    @defer.inlineCallbacks
    def setUp(self):
        self.relay = yield LoopbackRelay(self, store="memory").start()

    @defer.inlineCallbacks
    def test_passes_against_a_running_relay(self):
        """
        Against a running relay every step gets a tick: both connections,
        both registrations, the ping and the song from one to the other;
        the status is 0.
        """
        status, lines = yield self.check(self.relay.url())
        self.assertEqual(status, 0)
        self.assertEqual([line.split(" ")[0] for line in lines], [TICK] * 7)
        self.assertIn("ping answered", lines[4])
        self.assertIn("song shared from A reached B", lines[5])

    @defer.inlineCallbacks
    def test_repeated_checks_reuse_the_same_records(self):
        """
        Two checks use the same crew and device ids (derived from the host
        name), so the relay keeps one check crew, not one per run.
        """
        yield self.check(self.relay.url())
        crews = set(self.relay.relay.crews)
        status, _ = yield self.check(self.relay.url())
        self.assertEqual(status, 0)
        self.assertEqual(set(self.relay.relay.crews), crews)
        crew, a, b = check_identity("127.0.0.1")
        self.assertIn(crew, crews)
        self.assertEqual(set(self.relay.relay.crews[crew].members), {a, b})


class FailingTests(CheckTestCase):

    @defer.inlineCallbacks
    def test_closed_port_is_refused(self):
        """
        Against a closed port the check fails (status 1) with one line
        saying the connection was refused.
        """
        port = reactor.listenTCP(0, protocol.Factory(), interface="127.0.0.1")
        number = port.getHost().port
        yield port.stopListening()
        status, lines = yield self.check(f"ws://127.0.0.1:{number}/ws")
        self.assertEqual(status, 1)
        [line] = lines
        self.assertTrue(line.startswith(CROSS))
        self.assertIn("refused", line)

    @defer.inlineCallbacks
    def test_unknown_host(self):
        """
        A host name that does not resolve fails with one line saying
        unknown host.
        """
        status, lines = yield self.check("ws://relay.leeloo.invalid:8080/ws")
        self.assertEqual(status, 1)
        [line] = lines
        self.assertIn("unknown host relay.leeloo.invalid", line)

    @defer.inlineCallbacks
    def test_silent_server_times_out(self):
        """
        A server that accepts the connection and never answers fails the
        check when the timeout runs out, with one line saying timed out.
        """
        port = reactor.listenTCP(0, protocol.Factory.forProtocol(protocol.Protocol), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        status, lines = yield self.check(f"ws://127.0.0.1:{port.getHost().port}/ws", timeout=0.5)
        self.assertEqual(status, 1)
        [line] = lines
        self.assertIn("timed out after 0.5s", line)

    @defer.inlineCallbacks
    def test_not_a_websocket(self):
        """
        A path where the relay serves no WebSocket fails with one line that
        names what the server said.
        """
        relay = yield LoopbackRelay(self, store="memory").start()
        status, lines = yield self.check(f"ws://127.0.0.1:{relay.port}/nothing-here")
        self.assertEqual(status, 1)
        [line] = lines
        self.assertIn("connect A", line)
        self.assertIn("404", line)


class TLSTests(CheckTestCase):

    @defer.inlineCallbacks
    def setUp(self):
        listen, self.ca = tls_listen(self)
        self.relay = yield LoopbackRelay(self, listen=listen, store="memory").start()

    @defer.inlineCallbacks
    def test_untrusted_certificate(self):
        """
        A relay whose certificate no trusted CA signed fails with one line
        about its certificate.
        """
        status, lines = yield self.check(self.relay.url("wss", "localhost"))
        self.assertEqual(status, 1)
        [line] = lines
        self.assertIn("certificate", line)
        self.assertIn("--ca", line)

    @defer.inlineCallbacks
    def test_private_ca_is_trusted_when_given(self):
        """
        With the CA that signed the relay's certificate (--ca), the check
        passes over TLS and says the certificate was verified.
        """
        status, lines = yield self.check(self.relay.url("wss", "localhost"),
                                         trust_root=Certificate.loadPEM(self.ca.root_pem))
        self.assertEqual(status, 0)
        self.assertIn("TLS certificate verified", lines[0])

    @defer.inlineCallbacks
    def test_certificate_for_another_name(self):
        """
        A certificate from the trusted CA but for another name fails with
        one line about the certificate.
        """
        listen, ca = tls_listen(self, names=("relay.example",))
        relay = yield LoopbackRelay(self, listen=listen, store="memory").start()
        status, lines = yield self.check(relay.url("wss", "localhost"),
                                         trust_root=Certificate.loadPEM(ca.root_pem))
        self.assertEqual(status, 1)
        [line] = lines
        self.assertIn("certificate", line)


class IdentityTests(SynchronousTestCase):

    def test_check_identity_derives_from_the_host(self):
        """
        The check crew is CHECK- and a hash of the host name (any case);
        the device ids derive from the same hash.
        """
        crew, a, b = check_identity("LeelooBot.xyz")
        self.assertEqual((crew, a, b), check_identity("leeloobot.xyz"))
        self.assertRegex(crew, r"^CHECK-[0-9A-F]{8}$")
        self.assertRegex(a, r"^check_[0-9a-f]{12}_a$")
        self.assertEqual(a[:-1], b[:-1])
        self.assertNotEqual(check_identity("other.example")[0], crew)
