"""
Who a connection is from and whether it may come in: the client address
behind trusted proxies, the browser origins the WebSocket accepts, and the
connection caps per client address and in total.

Plain objects with no I/O: the WebSocket adapter and the HTTP site ask them.
"""

from __future__ import annotations

import ipaddress
import socket
from typing import Any, Iterable
from urllib.parse import urlsplit

from leeloo.limits import Limiter, Rate

_IP = ipaddress.IPv4Address | ipaddress.IPv6Address
_DEFAULT_PORTS = {"http": 80, "https": 443}


def parse_network(value: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    """
    An IP address or a CIDR block, as C{--trusted-proxy} takes it.

    @raise ValueError: with a message naming C{value}.
    """
    try:
        return ipaddress.ip_network(value.strip(), strict=False)
    except ValueError:
        raise ValueError(f"{value!r} is not an IP address or a CIDR block (e.g. 10.0.0.0/8)") from None


def _ip(value: str) -> _IP | None:
    """
    An address as proxies write it in X-Forwarded-For (C{1.2.3.4},
    C{1.2.3.4:5678}, C{::1}, C{[::1]:80}), IPv4-mapped IPv6 unwrapped;
    C{None} if it is not one.
    """
    value = value.strip()
    if value.startswith("["):
        value = value[1:].partition("]")[0]
    elif value.count(":") == 1:
        value = value.partition(":")[0]
    try:
        ip = ipaddress.ip_address(value)
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def _is_ip(value: str) -> bool:
    """
    Whether L{_ip} reads C{value} as an address: a plain IPv4 or IPv6
    address, as a transport's peer host always is, is told by the C
    library (C{inet_pton} takes a subset of what L{ipaddress} does:
    test_access's IsIPTests), in a tenth of a microsecond where
    L{ipaddress} takes two; anything else is L{_ip}'s.
    """
    for family in (socket.AF_INET, socket.AF_INET6):
        try:
            socket.inet_pton(family, value)
        except (OSError, ValueError):
            continue
        return True
    return _ip(value) is not None


def is_loopback(host: str | None) -> bool:
    """
    Whether C{host} (a transport's peer address) is a loopback address.
    """
    ip = _ip(host) if host else None
    return ip is not None and ip.is_loopback


class TrustedProxies:
    """
    The reverse proxies whose C{X-Forwarded-For} the relay believes.

    A connection's client address is its TCP peer's, unless that peer is a
    trusted proxy: then it is the rightmost address in X-Forwarded-For that
    is not itself a trusted proxy (each proxy appends the address it got the
    request from, so everything left of that is the client's own say).
    X-Forwarded-For from anyone else is ignored.
    """

    __slots__ = ("networks",)

    def __init__(self, networks: Iterable[str] = ()) -> None:
        self.networks = tuple(parse_network(n) for n in networks)

    def __bool__(self) -> bool:
        return bool(self.networks)

    def trusts(self, ip: _IP) -> bool:
        return any(ip.version == n.version and ip in n for n in self.networks)

    def client_address(self, peer: str | None, forwarded_for: str | None) -> str | None:
        """
        The client address of a connection from C{peer} (the TCP peer's
        host) carrying C{forwarded_for} (the X-Forwarded-For header, all its
        occurrences joined with commas, or C{None}).
        """
        if not self.networks or not forwarded_for or peer is None:
            return peer
        hop = _ip(peer)
        if hop is None or not self.trusts(hop):
            return peer
        for entry in reversed(forwarded_for.split(",")):
            ip = _ip(entry)
            if ip is None:
                # Not an address: a trusted proxy passed on garbage.  The
                # last hop we could read is as far as we can see.
                break
            hop = ip
            if not self.trusts(ip):
                break
        return str(hop)

    def describe(self) -> str:
        return ", ".join(str(n) for n in self.networks) or "none (X-Forwarded-For ignored)"


def _origin(scheme: str, host: str | None, port: int | None) -> tuple[str, str, int | None] | None:
    if not host:
        return None
    scheme = scheme.lower()
    return scheme, host.lower().rstrip("."), port if port is not None else _DEFAULT_PORTS.get(scheme)


def origin_of(url: str) -> tuple[str, str, int | None] | None:
    """
    The C{(scheme, host, port)} of an Origin header or a URL, the default
    port filled in; C{None} if it has no host or a bad port.
    """
    try:
        parts = urlsplit(url.strip())
        return _origin(parts.scheme, parts.hostname, parts.port)
    except ValueError:
        return None


class OriginPolicy:
    """
    Which browser pages may open the WebSocket.  Devices send no C{Origin}
    and are always let in; a browser's C{Origin} must be the relay's
    C{public_url}, or without one, the same host and port the request was
    sent to (its C{Host} header).
    """

    __slots__ = ("public_url", "_allowed")

    def __init__(self, public_url: str | None = None) -> None:
        self.public_url = public_url
        self._allowed = None
        if public_url is not None:
            self._allowed = origin_of(public_url)
            if self._allowed is None or self._allowed[0] not in _DEFAULT_PORTS:
                raise ValueError(f"{public_url!r} is not an http:// or https:// URL with a host")

    def allows(self, origin: str | None, host: str | None) -> bool:
        """
        Whether a handshake with this C{Origin} header (C{None} or empty when
        there is none) sent to this C{Host} header may open a WebSocket.
        """
        if not origin:
            return True
        theirs = origin_of(origin)
        if theirs is None:
            return False
        if self._allowed is not None:
            return theirs == self._allowed
        if not host:
            return False
        ours = origin_of(f"{theirs[0]}://{host.strip()}")
        return ours is not None and theirs == ours

    def describe(self) -> str:
        if self._allowed is not None:
            return f"{self.public_url} or none"
        return "same host as the request or none (no --public-url)"


TOO_MANY_FROM_ADDRESS = "per_address"
TOO_MANY_CONNECTIONS = "total"
CONNECTING_TOO_FAST = "connect_rate"


class ConnectionCaps:
    """
    Counts open connections per client address and in total, and refuses
    those over either cap.
    """

    __slots__ = ("max_total", "max_per_address", "total", "by_address")

    def __init__(self, max_total: int, max_per_address: int) -> None:
        self.max_total = max_total
        self.max_per_address = max_per_address
        self.total = 0
        self.by_address: dict[str | None, int] = {}

    def admit(self, address: str | None) -> str | None:
        """
        Count a new connection from C{address}; or, if a cap is reached,
        count nothing and return which (L{TOO_MANY_CONNECTIONS} or
        L{TOO_MANY_FROM_ADDRESS}).
        """
        if self.total >= self.max_total:
            return TOO_MANY_CONNECTIONS
        count = self.by_address.get(address, 0)
        if count >= self.max_per_address:
            return TOO_MANY_FROM_ADDRESS
        self.by_address[address] = count + 1
        self.total += 1
        return None

    def release(self, address: str | None) -> None:
        """
        A connection L{admit}ted from C{address} closed.
        """
        count = self.by_address.get(address, 0)
        if count <= 1:
            self.by_address.pop(address, None)
        else:
            self.by_address[address] = count - 1
        self.total -= 1


class ConnectionGate:
    """
    Every TCP connection to the relay's sites, counted by the address it
    comes from before a byte of it is read: at most C{max_per_address} open
    at once from one address, and new ones at most at C{rate} (a token
    bucket per address), plain HTTP and WebSockets alike.

    A connection from a trusted proxy carries many clients, so it is not
    counted here (the WebSocket handshake counts the client it forwards);
    nor is one with no IP address (a Unix socket).
    """

    # Seconds between sweeps of the rate buckets that have refilled.
    SWEEP_EVERY = 60.0

    def __init__(self, clock: Any, max_per_address: int, rate: Rate,
                 proxies: TrustedProxies = TrustedProxies()) -> None:
        self.clock = clock
        self.max_per_address = max_per_address
        self.rate = rate
        self.proxies = proxies
        self.by_address: dict[str, int] = {}
        self.limiter = Limiter(clock, rate)
        self.refused: dict[str, int] = {TOO_MANY_FROM_ADDRESS: 0, CONNECTING_TOO_FAST: 0}
        self._swept = clock.seconds()
        # The cluster's counts, when the relay shares its limits (--redis).
        self.shared: Any = None

    def counted(self, host: str | None) -> bool:
        """
        Whether connections from C{host} (a transport's peer host) count.
        """
        if not host:
            return False
        if not self.proxies:
            # Every connection counts whose host is an address (the
            # common case: no proxy is trusted, and no address parsed).
            return _is_ip(host)
        ip = _ip(host)
        return ip is not None and not self.proxies.trusts(ip)

    def admit(self, host: str | None) -> tuple[str, float] | None:
        """
        Count a new connection from C{host}; or refuse it, counting nothing,
        and return why (L{TOO_MANY_FROM_ADDRESS} or L{CONNECTING_TOO_FAST})
        with the seconds to wait before trying again.  A refused attempt
        spends from the rate too: hammering does not get through.
        """
        if not self.counted(host):
            return None
        now = self.clock.seconds()
        if now - self._swept >= self.SWEEP_EVERY:
            self._swept = now
            self.limiter.sweep()
        wait = self.limiter.take(host)
        if wait:
            self.refused[CONNECTING_TOO_FAST] += 1
            return CONNECTING_TOO_FAST, wait
        count = self.by_address.get(host, 0)
        if count >= self.max_per_address:
            self.refused[TOO_MANY_FROM_ADDRESS] += 1
            return TOO_MANY_FROM_ADDRESS, 1.0 / self.rate.per_second
        self.by_address[host] = count + 1
        return None

    def release(self, host: str | None) -> None:
        """
        A connection L{admit}ted from C{host} closed (its L{share} ticket,
        if it has one, is released by its holder).
        """
        count = self.by_address.get(host, 0)
        if count <= 1:
            self.by_address.pop(host, None)
        else:
            self.by_address[host] = count - 1

    def share(self, host: str | None) -> tuple[Any, Any] | None:
        """
        After L{admit} let a connection from C{host} in: count it against
        the whole cluster too, when this node shares its limits
        (C{shared}, a L{leeloo.sharedlimits.SharedLimits}; C{--redis}).

        @return: C{None} (not shared), or the connection's ticket and
            C{None} (let in) or a Deferred of the cluster's verdict, as
            L{leeloo.sharedlimits.SharedLimits.admit} gives them.
        """
        if self.shared is None or not self.counted(host):
            return None
        return self.shared.admit(host, self.max_per_address, self.rate)

    def refused_by_cluster(self, host: str | None, reason: str) -> None:
        """
        The cluster refused a connection from C{host} that L{admit}
        counted: uncount it here, and count the refusal.
        """
        self.release(host)
        self.refused[reason] += 1

    def describe(self) -> str:
        shared = " (shared by every node on the Redis)" if self.shared is not None else ""
        return (f"{self.max_per_address} TCP connections per client address{shared}, "
                f"new ones at {self.rate.describe()} per address")
