"""
How a device reaches its relay: the URL, the endpoint (TLS verified by
default, against the system's CA store or a given CA), and a one-line
description of why a connection failed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from autobahn.websocket.util import parse_url
from twisted.internet import error as neterror
from twisted.internet.defer import CancelledError, TimeoutError as DeferredTimeout
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.ssl import Certificate, optionsForClientTLS, platformTrust
from twisted.python.failure import Failure


class BadURL(ValueError):
    """
    A relay URL that is not C{ws://} or C{wss://HOST[:PORT]/PATH}.
    """


@dataclass(frozen=True)
class RelayURL:
    url: str
    secure: bool
    host: str
    port: int
    path: str

    @classmethod
    def parse(cls, url: str) -> "RelayURL":
        try:
            secure, host, port, resource, path, params = parse_url(url)
        except Exception as e:
            raise BadURL(f"{url!r} is not a relay URL (ws://HOST:PORT/ws or wss://HOST/ws): {e}") from None
        if not host:
            raise BadURL(f"{url!r} has no host name")
        return cls(url, secure, host, port, resource)

    @property
    def where(self) -> str:
        return f"{self.host}:{self.port}"


def load_ca(path: str) -> Certificate:
    """
    The CA certificate in the PEM file C{path}; L{ValueError} saying why not.
    """
    try:
        with open(path, "rb") as f:
            pem = f.read()
    except OSError as e:
        raise ValueError(f"cannot read the CA file {path}: {e.strerror}") from None
    try:
        return Certificate.loadPEM(pem)
    except Exception:
        raise ValueError(f"{path} holds no PEM certificate") from None


def endpoint_for(reactor: Any, relay: RelayURL, trust_root: Any = None, timeout: float = 30.0) -> Any:
    """
    A client endpoint for C{relay}: TCP to its host (every address it
    resolves to, as L{HostnameEndpoint} does), wrapped in TLS for C{wss:}
    with the certificate verified against C{trust_root} (a
    L{Certificate}) or, by default, the platform's CA store.
    """
    endpoint = HostnameEndpoint(reactor, relay.host, relay.port, timeout=timeout)
    if relay.secure:
        trust = trust_root if trust_root is not None else platformTrust()
        endpoint = wrapClientTLS(optionsForClientTLS(relay.host, trustRoot=trust), endpoint)
    return endpoint


def _tls_error(value: BaseException) -> bool:
    try:
        from OpenSSL import SSL
        from service_identity import VerificationError
    except ImportError:  # pragma: no cover
        return False
    return isinstance(value, (SSL.Error, VerificationError))


def describe(reason: Failure | BaseException, relay: RelayURL, timeout: float | None = None) -> str:
    """
    One line, no traceback, saying why connecting to C{relay} failed, with
    C{refused}, C{unknown host}, C{certificate} or C{timed out} in it for
    those causes.
    """
    value = reason.value if isinstance(reason, Failure) else reason
    if isinstance(value, neterror.ConnectionRefusedError):
        return f"connection refused by {relay.where}: is the relay running and listening there?"
    if isinstance(value, neterror.DNSLookupError):
        return f"unknown host {relay.host}: the name does not resolve"
    if isinstance(value, (neterror.TimeoutError, DeferredTimeout, CancelledError)):
        after = f" after {timeout:g}s" if timeout is not None else ""
        return f"timed out{after} waiting for {relay.where}"
    if _tls_error(value):
        detail = _ssl_detail(value)
        return (f"TLS certificate of {relay.host} not accepted ({detail}): "
                "it is not signed by a trusted CA or not for this name; use --ca FILE for a private CA")
    if isinstance(value, neterror.ConnectError):
        text = value.osError if getattr(value, "osError", None) else value
        return f"cannot connect to {relay.where}: {text}"
    text = str(value).strip().splitlines()
    return f"{type(value).__name__} talking to {relay.where}: {text[0] if text else 'no detail'}"


def _ssl_detail(value: BaseException) -> str:
    args = getattr(value, "args", ())
    if args and isinstance(args[0], list):
        parts = [part[-1] for part in args[0] if isinstance(part, tuple) and part]
        if parts:
            return "; ".join(str(p) for p in parts)
    return str(value) or type(value).__name__
