"""
Tests for L{leeloo.access}: the client address behind trusted proxies, the
browser origins the WebSocket accepts, and the connection caps.
"""

import random

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from leeloo.access import (
    CONNECTING_TOO_FAST,
    TOO_MANY_CONNECTIONS,
    TOO_MANY_FROM_ADDRESS,
    ConnectionCaps,
    ConnectionGate,
    OriginPolicy,
    TrustedProxies,
    _ip,
    _is_ip,
    is_loopback,
    parse_network,
)
from leeloo.limits import Rate


class TrustedProxiesTests(SynchronousTestCase):
    def setUp(self):
        self.proxies = TrustedProxies(["10.0.0.0/8", "192.0.2.7", "2001:db8::/32"])

    def test_no_proxies_peer_address(self):
        """
        With no trusted proxy, X-Forwarded-For is ignored: the client is the
        TCP peer.
        """
        self.assertEqual(TrustedProxies().client_address("198.51.100.1", "203.0.113.9"), "198.51.100.1")

    def test_untrusted_peer_header_ignored(self):
        """
        X-Forwarded-For from a peer that is not a trusted proxy is ignored.
        """
        self.assertEqual(self.proxies.client_address("198.51.100.1", "203.0.113.9"), "198.51.100.1")

    def test_trusted_peer_rightmost_untrusted(self):
        """
        Behind a trusted proxy the client is the rightmost address that is
        not a trusted proxy; what the client wrote further left is ignored.
        """
        self.assertEqual(
            self.proxies.client_address("10.1.2.3", "1.1.1.1, 203.0.113.9, 10.9.9.9"), "203.0.113.9")

    def test_single_hop(self):
        """
        One trusted proxy appending the client's address: that address.
        """
        self.assertEqual(self.proxies.client_address("192.0.2.7", "203.0.113.9"), "203.0.113.9")

    def test_trusted_peer_without_header(self):
        """
        A trusted proxy's own request without X-Forwarded-For is the proxy's.
        """
        self.assertEqual(self.proxies.client_address("10.1.2.3", None), "10.1.2.3")

    def test_all_hops_trusted(self):
        """
        When every hop is a trusted proxy, the leftmost is the client.
        """
        self.assertEqual(self.proxies.client_address("10.1.2.3", "10.0.0.5, 10.0.0.6"), "10.0.0.5")

    def test_garbage_stops_the_walk(self):
        """
        A hop that is not an address ends the walk at the last hop read.
        """
        self.assertEqual(self.proxies.client_address("10.1.2.3", "203.0.113.9, nonsense, 10.0.0.6"),
                         "10.0.0.6")

    def test_ports_and_brackets(self):
        """
        Addresses with ports, bracketed IPv6 and IPv4-mapped IPv6 are read
        as the address alone.
        """
        self.assertEqual(self.proxies.client_address("10.1.2.3", "203.0.113.9:4711"), "203.0.113.9")
        self.assertEqual(self.proxies.client_address("10.1.2.3", "[2001:db9::1]:443"), "2001:db9::1")
        self.assertEqual(self.proxies.client_address("::ffff:10.1.2.3", "203.0.113.9"), "203.0.113.9")

    def test_ipv6_proxy(self):
        """
        A trusted IPv6 block works like an IPv4 one.
        """
        self.assertEqual(self.proxies.client_address("2001:db8::1", "203.0.113.9"), "203.0.113.9")

    def test_parse_network_error_names_value(self):
        """
        A value that is neither an address nor a CIDR block is a ValueError
        naming it.
        """
        with self.assertRaises(ValueError) as e:
            parse_network("proxy.example.org")
        self.assertIn("proxy.example.org", str(e.exception))

    def test_is_loopback(self):
        """
        127.0.0.0/8, ::1 and IPv4-mapped loopback are loopback; others and
        None are not.
        """
        for host in ("127.0.0.1", "127.5.5.5", "::1", "::ffff:127.0.0.1"):
            self.assertTrue(is_loopback(host), host)
        for host in ("10.0.0.1", "203.0.113.9", None, "", "localhost"):
            self.assertFalse(is_loopback(host), host)


class OriginPolicyTests(SynchronousTestCase):
    def test_no_origin_allowed(self):
        """
        A handshake without Origin (a device) is always allowed.
        """
        self.assertTrue(OriginPolicy("https://relay.example.org").allows(None, "relay.example.org"))
        self.assertTrue(OriginPolicy().allows("", "relay.example.org"))

    def test_public_url_matches(self):
        """
        With a public URL, its origin is allowed, whatever the case and an
        explicit default port.
        """
        policy = OriginPolicy("https://relay.example.org/")
        self.assertTrue(policy.allows("https://relay.example.org", "internal:8080"))
        self.assertTrue(policy.allows("https://RELAY.example.org:443", "internal:8080"))

    def test_public_url_others_refused(self):
        """
        With a public URL, another scheme, host or port is refused, even
        when it matches the Host header.
        """
        policy = OriginPolicy("https://relay.example.org")
        for origin in ("http://relay.example.org", "https://evil.example.org",
                       "https://relay.example.org:8443", "https://relay.example.org.evil.net"):
            self.assertFalse(policy.allows(origin, "relay.example.org"), origin)
        self.assertFalse(policy.allows("https://evil.example.org", "evil.example.org"))

    def test_same_origin_without_public_url(self):
        """
        Without a public URL an Origin naming the host and port the request
        was sent to is allowed.
        """
        policy = OriginPolicy()
        self.assertTrue(policy.allows("http://127.0.0.1:8080", "127.0.0.1:8080"))
        self.assertTrue(policy.allows("https://relay.example.org", "relay.example.org"))
        self.assertTrue(policy.allows("https://relay.example.org", "relay.example.org:443"))

    def test_cross_origin_without_public_url(self):
        """
        Without a public URL another host or port is refused, as is an
        Origin when the Host header is missing.
        """
        policy = OriginPolicy()
        self.assertFalse(policy.allows("http://evil.example.org", "127.0.0.1:8080"))
        self.assertFalse(policy.allows("http://127.0.0.1:9999", "127.0.0.1:8080"))
        self.assertFalse(policy.allows("http://127.0.0.1:8080", None))

    def test_unparsable_origin_refused(self):
        """
        An Origin that is not a URL with a host is refused.
        """
        self.assertFalse(OriginPolicy().allows("not a url", "127.0.0.1:8080"))
        self.assertFalse(OriginPolicy().allows("http://h:notaport", "h:80"))

    def test_bad_public_url(self):
        """
        A public URL that is not http(s) with a host is a ValueError.
        """
        for url in ("relay.example.org", "ftp://relay.example.org", "https://"):
            self.assertRaises(ValueError, OriginPolicy, url)


class ConnectionCapsTests(SynchronousTestCase):
    def test_per_address(self):
        """
        An address at its cap is refused; others are not.
        """
        caps = ConnectionCaps(max_total=10, max_per_address=2)
        self.assertIsNone(caps.admit("a"))
        self.assertIsNone(caps.admit("a"))
        self.assertEqual(caps.admit("a"), TOO_MANY_FROM_ADDRESS)
        self.assertIsNone(caps.admit("b"))
        self.assertEqual((caps.total, caps.by_address), (3, {"a": 2, "b": 1}))

    def test_total(self):
        """
        At the total cap everyone is refused.
        """
        caps = ConnectionCaps(max_total=2, max_per_address=5)
        caps.admit("a")
        caps.admit("b")
        self.assertEqual(caps.admit("c"), TOO_MANY_CONNECTIONS)

    def test_release_frees_slot(self):
        """
        Releasing a connection frees its slot, and an address with none
        left is forgotten.
        """
        caps = ConnectionCaps(max_total=1, max_per_address=1)
        caps.admit("a")
        caps.release("a")
        self.assertEqual((caps.total, caps.by_address), (0, {}))
        self.assertIsNone(caps.admit("b"))


class ConnectionGateTests(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.gate = ConnectionGate(self.clock, 3, Rate(2, 4), TrustedProxies(["10.0.0.0/8"]))

    def test_cap_per_address(self):
        """
        An address with C{max_per_address} open is refused; another is not.
        """
        for _ in range(3):
            self.assertIsNone(self.gate.admit("192.0.2.1"))
        self.assertEqual(self.gate.admit("192.0.2.1")[0], TOO_MANY_FROM_ADDRESS)
        self.assertIsNone(self.gate.admit("192.0.2.2"))
        self.assertEqual(self.gate.by_address, {"192.0.2.1": 3, "192.0.2.2": 1})

    def test_release(self):
        """
        A released connection frees its place; an address with none open is
        forgotten.
        """
        self.gate.admit("192.0.2.1")
        self.gate.release("192.0.2.1")
        self.assertEqual(self.gate.by_address, {})

    def test_rate(self):
        """
        An address opening and closing connections gets its burst, then one
        per 1/rate seconds; the wait is said.
        """
        for _ in range(4):
            self.assertIsNone(self.gate.admit("192.0.2.1"))
            self.gate.release("192.0.2.1")
        self.assertEqual(self.gate.admit("192.0.2.1"), (CONNECTING_TOO_FAST, 0.5))
        self.clock.advance(0.5)
        self.assertIsNone(self.gate.admit("192.0.2.1"))
        self.assertEqual(self.gate.refused, {TOO_MANY_FROM_ADDRESS: 0, CONNECTING_TOO_FAST: 1})

    def test_not_counted(self):
        """
        Trusted proxies and peers without an IP address (Unix sockets) are
        not counted.
        """
        for _ in range(10):
            self.assertIsNone(self.gate.admit("10.1.2.3"))
            self.assertIsNone(self.gate.admit(None))
        self.assertEqual(self.gate.by_address, {})

    def test_buckets_swept(self):
        """
        Rate buckets that have refilled are forgotten, so memory follows
        recent addresses only.
        """
        for n in range(100):
            self.gate.admit(f"192.0.2.{n}")
            self.gate.release(f"192.0.2.{n}")
        self.clock.advance(ConnectionGate.SWEEP_EVERY)
        self.gate.admit("198.51.100.1")
        self.assertEqual(list(self.gate.limiter.buckets), ["198.51.100.1"])

    def test_counted_without_proxies(self):
        """
        With no trusted proxy, every peer with an IP address is counted, in
        any form a transport or a proxy writes it, and nothing else is.
        """
        gate = ConnectionGate(self.clock, 3, Rate(100, 100))
        for host in ["192.0.2.1", "2001:db8::1", "::ffff:192.0.2.1", "[2001:db8::1]:443", " 192.0.2.1",
                     "fe80::1%eth0"]:
            self.assertTrue(gate.counted(host), host)
        for host in [None, "", "relay.example.org", "/run/leeloo.sock", "192.0.2", "300.1.2.3", "01.2.3.4",
                     "192.0.2.1\x00"]:
            self.assertFalse(gate.counted(host), host)


class IsIPTests(SynchronousTestCase):
    """
    L{_is_ip} asks the C library first: it must answer as L{_ip} does for
    any string, or the gate would count (or not) what it did not before.
    """

    EDGES = ["1.2.3.4", "0.0.0.0", "255.255.255.255", "256.1.1.1", "1.2.3", "1.2.3.4.5", "01.2.3.4", "1.2.3.04",
             "1.2.3.4 ", " 1.2.3.4", "1.2.3.4:80", "::", "::1", "1::", "1:2:3:4:5:6:7:8", "1:2:3:4:5:6:7:8:9",
             "::ffff:1.2.3.4", "::1.2.3.4", "::ffff:01.2.3.4", "12345::", "fe80::1%eth0", "[::1]", "[::1]:80",
             "::g", "", ":", "1.2.3.4\x00", "\u0661.2.3.4", "1.2.3.\u0664"]

    def test_edges(self):
        for value in self.EDGES:
            self.assertEqual(_is_ip(value), _ip(value) is not None, repr(value))

    def test_random(self):
        """
        Strings of address characters, at random (seeded): the same answer.
        """
        rng = random.Random(17)
        alphabet = "0123456789abcdefg:.[]% "
        for _ in range(20000):
            value = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 16)))
            self.assertEqual(_is_ip(value), _ip(value) is not None, repr(value))
        for _ in range(5000):
            value = ".".join(str(rng.randint(0, 300)) for _ in range(rng.choice([3, 4, 4, 5])))
            self.assertEqual(_is_ip(value), _ip(value) is not None, repr(value))
        for _ in range(5000):
            groups = ["".join(rng.choice("0123456789abcdef") for _ in range(rng.randint(0, 5)))
                      for _ in range(rng.randint(1, 9))]
            value = ":".join(groups)
            self.assertEqual(_is_ip(value), _ip(value) is not None, repr(value))
