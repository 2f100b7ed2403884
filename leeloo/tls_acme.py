"""
Automatic HTTPS: the relay gets and renews its own certificates from an
ACME server (Let's Encrypt), as Caddy does, with no certbot, no cron job and
no restart.

The pieces:

  - L{parse_endpoint} reads an C{acme:domain=D[,D2...][:port=443]...}
    listen string into an L{AcmeEndpoint}; the relay builds the endpoint
    itself (L{AcmeService.endpoint}), with its own options.
  - L{Challenges}: the HTTP-01 key authorizations of orders in flight, in
    memory, answered by every plain-HTTP listener (L{leeloo.web}).
  - L{AcmeIssuer}: one order, start to finish, through the C{acme} package
    (JWS, nonces, polling); its blocking calls run in a thread of its own,
    and every step is logged from the reactor thread with the order's URL.
  - L{ManagedCertificate}: when to order (now, when there is no usable
    certificate; when a third of the lifetime is left, or earlier inside the
    CA's ARI window) and what to do with the outcome: write
    C{certificates/live/NAME/} and swap it in through the
    L{leeloo.tls.CertificateStore}, or back off (exponential, with jitter,
    capped at a day, at most L{FAILURES_PER_HOUR} failures an hour) with the
    state kept in C{certificates/renewal/NAME.json} across restarts.  An
    ACME failure is logged and retried; it never stops the relay.
  - L{AcmeService}: the thread, the certificates, started and stopped with
    the relay.

State, under C{--data-dir}::

    certificates/account.key              the ACME account key (0600)
    certificates/live/NAME/fullchain.pem  the certificate and its chain
    certificates/live/NAME/privkey.pem    its key (0600)
    certificates/staging/live/NAME/       a new pair, checked before it replaces them
    certificates/renewal/NAME.json        failures, next attempt, last order
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID
from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredLock, inlineCallbacks
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from leeloo import __version__
from leeloo.tls import (
    DEFAULT_BACKLOG,
    DEFAULT_PORT,
    DEFAULT_WATCH_INTERVAL,
    Certificate,
    CertificateError,
    CertificateStore,
    LetsEncryptServerEndpoint,
    check_domain,
    endpoint_number,
    iso,
    load_certificate,
)

log = Logger()

LETS_ENCRYPT = "https://acme-v02.api.letsencrypt.org/directory"
LETS_ENCRYPT_STAGING = "https://acme-staging-v02.api.letsencrypt.org/directory"
KEY_TYPES = ("ecdsa-p256", "rsa2048", "rsa4096")
DEFAULT_RETRY = 60.0
MAX_RETRY = 24 * 3600.0
# Let's Encrypt allows 5 failed validations per domain, account and hour.
FAILURES_PER_HOUR = 5
HOUR = 3600.0
JITTER = 0.25
# Seconds one HTTP request to the ACME server may take, and one order.
NETWORK_TIMEOUT = 30
ORDER_DEADLINE = 90.0
# How often to ask the CA's renewal info (ARI) again, where it offers it.
ARI_RECHECK = 6 * HOUR


# ---------------------------------------------------------------- options

@dataclass(frozen=True)
class AcmeEndpoint:
    """
    One C{acme:} listen string, checked: the domains its one certificate
    covers (the first names it), and where to listen.
    """

    description: str
    domains: tuple[str, ...]
    port: int = DEFAULT_PORT
    interface: str = ""
    backlog: int = DEFAULT_BACKLOG
    key: str = KEY_TYPES[0]
    watch: float = DEFAULT_WATCH_INTERVAL

    @property
    def name(self) -> str:
        return self.domains[0]


@dataclass(frozen=True)
class AcmeConfig:
    """
    The relay's ACME settings (C{--acme-*}) and its C{acme:} endpoints.
    """

    endpoints: tuple[AcmeEndpoint, ...]
    directory_url: str = LETS_ENCRYPT
    email: str | None = None
    ca_bundle: Path | None = None
    retry: float = DEFAULT_RETRY
    timeout: int = NETWORK_TIMEOUT


_OPTIONS = ("domain", "port", "interface", "backlog", "key", "watch")


def is_acme(description: str) -> bool:
    return description.split(":", 1)[0].strip().lower() == "acme"


def _split(description: str) -> list[str]:
    """
    The colon-separated parts of an endpoint string, with Twisted's
    backslash escapes undone (C{interface=\\:\\:1}).
    """
    parts, current, escaped = [], "", False
    for ch in description:
        if escaped:
            current += ch
            escaped = False
        elif ch == "\\":
            escaped = True
        elif ch == ":":
            parts.append(current)
            current = ""
        else:
            current += ch
    parts.append(current)
    return parts


def acme_domain(domain: str) -> str:
    """
    C{domain}, checked for an HTTP-01 certificate: a DNS name, neither an
    IP address nor a wildcard (HTTP-01 can prove neither).

    @raise ValueError: it is not.
    """
    raw = domain.strip()
    try:
        ipaddress.ip_address(raw.strip("[]"))
    except ValueError:
        pass
    else:
        raise ValueError(f"acme: domain={raw} is an IP address, which an HTTP-01 challenge cannot prove; "
                         "give a DNS name")
    if "*" in raw:
        raise ValueError(f"acme: domain={raw} is a wildcard, which an HTTP-01 challenge cannot prove; "
                         "list each name, or use letsencrypt: with a certbot DNS-01 certificate")
    try:
        return check_domain(raw)
    except ValueError:
        raise ValueError(f"acme: domain={raw!r} is not a domain name") from None


def parse_endpoint(description: str) -> AcmeEndpoint:
    """
    Read C{acme:domain=D[,D2...][:port=443][:interface=ADDR][:backlog=1024]
    [:key=ecdsa-p256|rsa2048|rsa4096][:watch=60]}.

    @raise ValueError: it is wrong; the message says how.
    """
    example = "e.g. acme:domain=relay.example.org:port=443"
    kind, *parts = _split(description)
    if kind.strip().lower() != "acme":
        raise ValueError(f"not an acme: endpoint ({example})")
    options: dict[str, str] = {}
    for part in parts:
        name, sep, value = part.partition("=")
        if not sep:
            raise ValueError(f"acme: takes only name=value options, {example}")
        if name not in _OPTIONS:
            raise ValueError(f"acme: unknown option {name!r}; known: {', '.join(_OPTIONS)}")
        options[name] = value
    domains = tuple(dict.fromkeys(acme_domain(d) for d in options.get("domain", "").split(",") if d.strip()))
    if not domains:
        raise ValueError(f"acme: needs domain=, {example}")
    key = options.get("key", KEY_TYPES[0])
    if key not in KEY_TYPES:
        raise ValueError(f"acme: key={key!r} must be one of {', '.join(KEY_TYPES)}")

    def number(name: str, default: float, kind: type, minimum: float) -> Any:
        return endpoint_number("acme", name, options.get(name, str(default)), kind, minimum)

    return AcmeEndpoint(
        description=description,
        domains=domains,
        port=number("port", DEFAULT_PORT, int, 0),
        interface=options.get("interface", ""),
        backlog=number("backlog", DEFAULT_BACKLOG, int, 1),
        key=key,
        watch=number("watch", DEFAULT_WATCH_INTERVAL, float, 0),
    )


def certificate_groups(endpoints: Sequence[AcmeEndpoint]) -> dict[tuple[str, ...], list[AcmeEndpoint]]:
    """
    The certificates C{endpoints} need, by their domains: endpoints naming
    the same domains share one; two that share only some are an error.

    @raise ValueError: two endpoints' domains overlap without being equal.
    """
    groups: dict[tuple[str, ...], list[AcmeEndpoint]] = {}
    owner: dict[str, tuple[str, ...]] = {}
    for endpoint in endpoints:
        key = endpoint.domains
        for domain in key:
            other = owner.setdefault(domain, key)
            if other != key:
                raise ValueError(
                    f"acme: domain {domain} is on two acme: endpoints with different domains "
                    f"({','.join(other)} and {','.join(key)}); give both the same domain= list")
        groups.setdefault(key, []).append(endpoint)
    return groups


# ------------------------------------------------------------- challenges

class Challenges:
    """
    The HTTP-01 key authorizations of the orders in flight, by token.  Used
    from the reactor thread only; L{lookup} is what the web sites call.
    """

    def __init__(self) -> None:
        self._tokens: dict[str, str] = {}

    def add(self, token: str, key_authorization: str) -> None:
        self._tokens[token] = key_authorization

    def remove(self, token: str) -> None:
        self._tokens.pop(token, None)

    def lookup(self, token: str) -> str | None:
        return self._tokens.get(token)

    def __len__(self) -> int:
        return len(self._tokens)


# ------------------------------------------------------------------ keys

def new_key(kind: str) -> Any:
    if kind == "ecdsa-p256":
        return ec.generate_private_key(ec.SECP256R1())
    if kind == "rsa2048":
        return rsa.generate_private_key(65537, 2048)
    if kind == "rsa4096":
        return rsa.generate_private_key(65537, 4096)
    raise ValueError(f"unknown key type {kind!r}")


def _private_pem(key: Any) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def write_private(path: Path, data: bytes, mode: int = 0o600) -> None:
    """
    Replace C{path} with C{data} at once, created with C{mode} (never
    readable by others, not even for a moment).
    """
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.new")
    try:
        temporary.unlink()
    except FileNotFoundError:
        pass
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(temporary, path)


def placeholder_certificate(name: str, domains: Sequence[str], now: float) -> Certificate:
    """
    A self-signed stand-in for C{domains} while their certificate is being
    ordered: a client that verifies fails on it, and its issuer says why.
    """
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([
        x509.NameAttribute(NameOID.COMMON_NAME, name),
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "LEELOO relay: placeholder, ACME certificate pending"),
    ])
    moment = datetime.datetime.fromtimestamp(now, datetime.timezone.utc)
    leaf = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(moment - datetime.timedelta(hours=1))
        .not_valid_after(moment + datetime.timedelta(days=30))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(d) for d in domains]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    return Certificate(domain=name, leaf=leaf, chain=(), key=key, fingerprint=leaf.fingerprint(hashes.SHA256()).hex())


# ----------------------------------------------------------------- orders

@dataclass(frozen=True)
class Issued:
    """
    What an order brought: the chain (leaf first) and its key, in PEM.
    """

    order: str
    fullchain_pem: bytes
    key_pem: bytes


class AcmeFailure(Exception):
    """
    An order (or the steps before it) failed; C{order} is its URL when it
    got that far, C{str()} one line saying what went wrong.
    """

    def __init__(self, message: str, order: str | None = None) -> None:
        super().__init__(message)
        self.order = order


def describe(error: BaseException) -> str:
    """
    One line for an exception from C{acme} or C{requests}: the ACME problem
    (type and detail) where there is one.
    """
    from acme import errors, messages

    if isinstance(error, messages.Error):
        return f"{error.typ}: {error.detail or error.title or 'no detail'}"
    if isinstance(error, errors.ValidationError):
        problems = []
        for authzr in error.failed_authzrs:
            for challenge in authzr.body.challenges:
                if challenge.error is not None:
                    problems.append(f"{authzr.body.identifier.value}: {describe(challenge.error)}")
        return "challenge failed: " + "; ".join(problems or ["no detail"])
    if isinstance(error, errors.TimeoutError):
        return "the ACME server did not finish the order in time"
    import requests

    if isinstance(error, requests.exceptions.ConnectionError):
        return "cannot connect to the ACME server"
    if isinstance(error, requests.exceptions.Timeout):
        return "the ACME server did not answer in time"
    if isinstance(error, requests.exceptions.RequestException):
        return f"HTTP request to the ACME server failed ({type(error).__name__})"
    return f"{type(error).__name__}: {error}" if str(error) else type(error).__name__


class AcmeIssuer:
    """
    Orders certificates from the ACME server at C{config.directory_url}
    with the account whose key is C{account_key} (made on first use), and
    answers HTTP-01 challenges through C{challenges}.  The C{acme} package's
    blocking calls run in C{pool}; everything else, and the logging, in the
    reactor thread.
    """

    def __init__(self, reactor: Any, config: AcmeConfig, account_key: Path, challenges: Challenges,
                 pool: ThreadPool | None = None) -> None:
        self.reactor = reactor
        self.config = config
        self.account_key = account_key
        self.challenges = challenges
        self.pool = pool
        self._client: Any = None
        # One log-in at a time, shared by the certificates that wait for it.
        self._login = DeferredLock()
        # Whether the directory offers ARI (renewalInfo), once known.
        self.offers_renewal_info: bool | None = None

    def _run(self, call: Callable[..., Any], *args: Any) -> Deferred:
        pool = self.reactor.getThreadPool() if self.pool is None else self.pool
        return deferToThreadPool(self.reactor, pool, call, *args)

    # -- blocking, in the thread

    def _load_account_key(self) -> tuple[Any, bool]:
        try:
            pem = self.account_key.read_bytes()
        except FileNotFoundError:
            key = ec.generate_private_key(ec.SECP256R1())
            write_private(self.account_key, _private_pem(key))
            return key, True
        return serialization.load_pem_private_key(pem, password=None), False

    def _connect(self) -> tuple[Any, str, bool]:
        """
        A client logged in to the account: registered now, or found by its
        key.
        """
        import josepy
        from acme import client, errors, messages

        key, created = self._load_account_key()
        if isinstance(key, ec.EllipticCurvePrivateKey):
            jwk, alg = josepy.JWKEC(key=key), josepy.ES256
        else:
            jwk, alg = josepy.JWKRSA(key=key), josepy.RS256
        verify: Any = str(self.config.ca_bundle) if self.config.ca_bundle else True
        net = client.ClientNetwork(jwk, alg=alg, verify_ssl=verify, user_agent=f"leeloo-relay/{__version__}",
                                   timeout=self.config.timeout)
        directory = client.ClientV2.get_directory(self.config.directory_url, net)
        acme = client.ClientV2(directory, net)
        registration = messages.NewRegistration.from_data(email=self.config.email, terms_of_service_agreed=True)
        try:
            account = acme.new_account(registration)
            uri, status = account.uri, "registered"
        except errors.ConflictError as e:
            net.account = messages.RegistrationResource(uri=e.location, body=messages.Registration())
            uri, status = e.location, "existing"
        return acme, uri, status if not created else "registered with a new key"

    def _new_order(self, acme: Any, domains: Sequence[str], kind: str) -> tuple[Any, bytes, list]:
        from acme import challenges, crypto_util, messages

        key_pem = _private_pem(new_key(kind))
        order = acme.new_order(crypto_util.make_csr(key_pem, list(domains)))
        answers = []
        for authzr in order.authorizations:
            if authzr.body.status == messages.STATUS_VALID:
                continue
            http = [c for c in authzr.body.challenges if isinstance(c.chall, challenges.HTTP01)]
            if not http:
                raise AcmeFailure(f"the ACME server offers no HTTP-01 challenge for "
                                  f"{authzr.body.identifier.value}", order.uri)
            response, validation = http[0].response_and_validation(acme.net.key)
            answers.append((authzr.body.identifier.value, http[0], response, http[0].chall.encode("token"),
                            validation))
        return order, key_pem, answers

    def _answer(self, acme: Any, challenge: Any, response: Any) -> None:
        acme.answer_challenge(challenge, response)

    def _finalize(self, acme: Any, order: Any) -> bytes:
        deadline = datetime.datetime.now() + datetime.timedelta(seconds=ORDER_DEADLINE)
        return acme.poll_and_finalize(order, deadline).fullchain_pem.encode("ascii")

    def _renewal_time(self, acme: Any, fullchain_pem: bytes) -> float | None:
        if not _offers_renewal_info(acme.directory):
            return None
        when, _ = acme.renewal_time(fullchain_pem)
        return None if when is None else when.timestamp()

    # -- the reactor thread

    def _account(self) -> Deferred:
        return self._login.run(self._log_in)

    @inlineCallbacks
    def _log_in(self):
        if self._client is None:
            try:
                acme, uri, status = yield self._run(self._connect)
            except Exception as e:
                raise AcmeFailure(f"account at {self.config.directory_url}: {describe(e)}") from None
            log.info("ACME account {account} at {directory}: {status}", account=uri,
                     directory=self.config.directory_url, status=status)
            self._client = acme
            self.offers_renewal_info = _offers_renewal_info(acme.directory)
        return self._client

    @inlineCallbacks
    def issue(self, name: str, domains: Sequence[str], kind: str = KEY_TYPES[0]):
        """
        Order a certificate for C{domains} with a fresh C{kind} key; fires
        with an L{Issued}, or fails with an L{AcmeFailure}.
        """
        acme = yield self._account()
        try:
            order, key_pem, answers = yield self._run(self._new_order, acme, domains, kind)
        except AcmeFailure:
            raise
        except Exception as e:
            self._forget(e)
            raise AcmeFailure(f"new order for {','.join(domains)}: {describe(e)}") from None
        log.info("ACME order {order} for {domains}: created, {count} challenges to answer",
                 order=order.uri, domains=",".join(domains), count=len(answers))
        tokens = []
        try:
            for domain, challenge, response, token, validation in answers:
                self.challenges.add(token, validation)
                tokens.append(token)
                log.info("ACME order {order}: answering the HTTP-01 challenge for {domain}",
                         order=order.uri, domain=domain)
                yield self._run(self._answer, acme, challenge, response)
            log.info("ACME order {order}: waiting for validation, then finalizing", order=order.uri)
            fullchain = yield self._run(self._finalize, acme, order)
        except Exception as e:
            self._forget(e)
            raise AcmeFailure(describe(e), order.uri) from None
        finally:
            for token in tokens:
                self.challenges.remove(token)
        return Issued(order.uri, fullchain, key_pem)

    def _forget(self, error: BaseException) -> None:
        # Log in again next time, unless the server merely refused the order.
        from acme import messages

        if not isinstance(error, messages.Error) or error.code in ("accountDoesNotExist", "unauthorized"):
            self._client = None

    @inlineCallbacks
    def renewal_time(self, fullchain_pem: bytes):
        """
        When the CA's ARI window says to renew (seconds since the epoch), or
        None where the server offers no C{renewalInfo} (or cannot say now).
        """
        try:
            acme = yield self._account()
            when = yield self._run(self._renewal_time, acme, fullchain_pem)
        except Exception as e:
            log.info("ACME renewal info unavailable ({problem}); renewing when a third of the lifetime is left",
                     problem=str(e) if isinstance(e, AcmeFailure) else describe(e))
            return None
        return when


def _offers_renewal_info(directory: Any) -> bool:
    # acme's Directory has no __contains__: its [] raises KeyError.
    try:
        directory["renewalInfo"]
    except KeyError:
        return False
    return True


# ---------------------------------------------------------------- renewal

def renewal_due(certificate: Certificate) -> float:
    """
    When C{certificate} should be renewed: a third of its lifetime before
    it expires (day 60 of Let's Encrypt's 90).
    """
    start = certificate.leaf.not_valid_before_utc.timestamp()
    end = certificate.leaf.not_valid_after_utc.timestamp()
    return end - (end - start) / 3


class Backoff:
    """
    How long to wait after the C{n}th failure in a row: C{initial} doubled
    each time, plus up to a quarter of it at random, capped at C{cap}.
    """

    def __init__(self, initial: float = DEFAULT_RETRY, cap: float = MAX_RETRY,
                 random: Callable[[], float] = random.random) -> None:
        self.initial = initial
        self.cap = cap
        self.random = random

    def delay(self, failures: int) -> float:
        base = min(self.cap, self.initial * 2 ** max(0, failures - 1))
        return min(self.cap, base * (1 + JITTER * self.random()))


@dataclass
class RenewalState:
    """
    What survives a restart: failures in a row, when to try next, the
    recent failures (for the hourly limit), the last order and error.
    """

    failures: int = 0
    next_attempt: float | None = None
    recent_failures: tuple[float, ...] = ()
    last_order: str | None = None
    last_error: str | None = None
    # Whether the CA offered renewal info (ARI) when it last issued.
    ari: bool = False

    @classmethod
    def load(cls, path: Path) -> RenewalState:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            return cls(
                failures=int(data.get("failures", 0)),
                next_attempt=None if data.get("next_attempt") is None else float(data["next_attempt"]),
                recent_failures=tuple(float(t) for t in data.get("recent_failures", ())),
                last_order=data.get("last_order"),
                last_error=data.get("last_error"),
                ari=bool(data.get("ari", False)),
            )
        except FileNotFoundError:
            return cls()
        except (OSError, ValueError, TypeError, AttributeError) as e:
            log.warn("ACME renewal state {path} unreadable ({problem}); starting afresh",
                     path=str(path), problem=type(e).__name__)
            return cls()

    def save(self, path: Path) -> None:
        data = {
            "failures": self.failures,
            "next_attempt": self.next_attempt,
            "recent_failures": list(self.recent_failures),
            "last_order": self.last_order,
            "last_error": self.last_error,
            "ari": self.ari,
        }
        write_private(path, json.dumps(data, indent=1).encode("utf-8"), 0o644)


class ManagedCertificate:
    """
    One C{acme:} certificate, C{name} for all of C{domains}: ordered when
    there is none (or it no longer covers C{domains}), renewed when due,
    retried with backoff after a failure.  C{store} serves it.

    @param issuer: has C{issue(name, domains, kind)} and
        C{renewal_time(fullchain_pem)}, both returning Deferreds.
    @param clock: C{seconds()} and C{callLater()}.
    """

    def __init__(self, name: str, domains: Sequence[str], kind: str, store: CertificateStore, issuer: Any,
                 clock: Any, directory: Path, backoff: Backoff) -> None:
        self.name = name
        self.domains = tuple(domains)
        self.kind = kind
        self.store = store
        self.issuer = issuer
        self.clock = clock
        self.live = directory / "live" / name
        # Where an issued pair is checked before it replaces live/NAME/'s.
        self.staging = directory / "staging"
        self.state_path = directory / "renewal" / f"{name}.json"
        self.backoff = backoff
        self.state = RenewalState.load(self.state_path)
        self.attempts = 0
        self._call: Any = None
        self._renew_at: float | None = None
        self._wake_at: float | None = None
        self._running = False
        self._busy: Deferred | None = None
        self._waiting: list[Deferred] = []

    # -- schedule

    def start(self) -> None:
        self._running = True
        now = self.clock.seconds()
        if self.state.failures and self.state.next_attempt is not None and self.state.next_attempt > now:
            log.info("ACME certificate {name}: {failures} failures so far (last: {error}); next attempt at {when}",
                     name=self.name, failures=self.state.failures, error=self.state.last_error or "unknown",
                     when=iso(_utc(self.state.next_attempt)))
            self._schedule(self.state.next_attempt)
            return
        reason = self._needs_order()
        if reason is not None:
            log.info("ACME certificate {name} for {domains}: {reason}; ordering one now",
                     name=self.name, domains=",".join(self.domains), reason=reason)
            self._schedule(now)
            return
        self._plan_renewal()

    def stop(self) -> Deferred | None:
        self._running = False
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None
        return self._busy

    @property
    def next_attempt(self) -> float | None:
        """
        When the next order is planned (seconds since the epoch; with ARI,
        when the renewal window is asked again first), or None.
        """
        if self._call is None or not self._call.active():
            return None
        return self._wake_at

    def when_done(self) -> Deferred:
        """
        Fires with the outcome (an L{Issued}, or the exception) of the
        next attempt to finish, once the next step is scheduled.
        """
        d: Deferred = Deferred()
        self._waiting.append(d)
        return d

    def _needs_order(self) -> str | None:
        if self.name in self.store.pending:
            return self.store.pending[self.name]
        names = set(self.store.certificate(self.name).names)
        missing = [d for d in self.domains if d not in names]
        if missing:
            return f"the certificate does not cover {','.join(missing)}"
        if self.state.last_order is None:
            # Copied in (from certbot, when switching over): serve it
            # while the relay orders its own.
            return "the certificate in live/ was not ordered by this relay; serving it meanwhile"
        return None

    def _schedule(self, when: float, wake: float | None = None) -> None:
        """
        Order at C{when}; wake at C{wake} (earlier) to plan again first.
        """
        if not self._running:
            return
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._renew_at = when
        at = when if wake is None else min(when, wake)
        self._wake_at = at
        self._call = self.clock.callLater(max(0.0, at - self.clock.seconds()), self._due)

    @inlineCallbacks
    def _plan_renewal(self):
        """
        Schedule the renewal: when a third of the lifetime is left, or
        earlier where the CA's renewal info (ARI) says so, asked again
        every L{ARI_RECHECK} seconds.  Never fails.
        """
        try:
            certificate = self.store.certificate(self.name)
            due = renewal_due(certificate)
            ari = None
            if self.state.ari:
                ari = yield self.issuer.renewal_time(_fullchain(certificate))
            if not self._running:
                return
            early = ari is not None and ari < due
            if early:
                due = ari
            log.info("ACME certificate {name} valid until {not_after}; renewal planned at {when}{why}",
                     name=self.name, not_after=iso(certificate.not_after), when=iso(_utc(due)),
                     why=" (inside the CA's renewal window)" if early else " (a third of its lifetime left)")
            self._schedule(due, self.clock.seconds() + ARI_RECHECK if self.state.ari else None)
        except Exception:
            log.failure("ACME certificate {name}: planning the renewal failed; retrying in {delay}s",
                        name=self.name, delay=self.backoff.initial)
            self._schedule(self.clock.seconds() + self.backoff.initial)

    def _due(self) -> None:
        self._call = None
        if self._renew_at is not None and self.clock.seconds() < self._renew_at:
            self._plan_renewal()
            return
        self.attempt()

    # -- one attempt

    def attempt(self) -> Deferred:
        """
        Order now (unless an order is under way): fires with None when it
        is over.
        """
        if self._busy is not None:
            return self._busy
        self.attempts += 1
        d = self.issuer.issue(self.name, self.domains, self.kind)
        d.addCallback(self._issued)
        d.addErrback(self._failed)
        d.addErrback(self._bug)
        d.addBoth(self._finished)
        self._busy = d
        return d

    def _issued(self, issued: Issued) -> Issued:
        staged = self.staging / "live" / self.name
        write_private(staged / "privkey.pem", issued.key_pem)
        write_private(staged / "fullchain.pem", issued.fullchain_pem, 0o644)
        try:
            load_certificate(self.staging, self.name, self.clock.seconds())
        except CertificateError as e:
            # The files served now stay as they are.
            raise AcmeFailure(f"the issued certificate cannot be served: {e.path.name} {e.problem}",
                              issued.order) from None
        self.live.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.replace(staged / "privkey.pem", self.live / "privkey.pem")
        os.replace(staged / "fullchain.pem", self.live / "fullchain.pem")
        if not self.store.reload_domain(self.name, "ACME order " + issued.order):
            raise AcmeFailure("the issued certificate cannot be served (see the refusal above)", issued.order)
        certificate = self.store.certificate(self.name)
        log.info("ACME order {order}: certificate for {domains} issued, valid until {not_after}, "
                 "sha256 {fingerprint}; serving it",
                 order=issued.order, domains=",".join(self.domains), not_after=iso(certificate.not_after),
                 fingerprint=certificate.fingerprint)
        self.state = RenewalState(last_order=issued.order, ari=bool(getattr(self.issuer, "offers_renewal_info", False)))
        self.state.save(self.state_path)
        self._plan_renewal()
        return issued

    def _failed(self, failure: Failure) -> Failure:
        failure.trap(AcmeFailure)
        error = failure.value
        now = self.clock.seconds()
        recent = tuple(t for t in self.state.recent_failures if now - t < HOUR) + (now,)
        failures = self.state.failures + 1
        when = now + self.backoff.delay(failures)
        if len(recent) >= FAILURES_PER_HOUR:
            # Let's Encrypt's failed-validation limit: wait for the oldest
            # of this hour's failures to age out.
            when = max(when, recent[-FAILURES_PER_HOUR] + HOUR)
        self.state = RenewalState(failures=failures, next_attempt=when, recent_failures=recent,
                                  last_order=error.order or self.state.last_order, last_error=str(error),
                                  ari=self.state.ari)
        try:
            self.state.save(self.state_path)
        except OSError as e:
            log.error("cannot save the ACME renewal state {path}: {problem}", path=str(self.state_path),
                      problem=e.strerror or str(e))
        log.error("ACME order {order} for {domains} failed: {problem}; attempt {failures}, next at {when}",
                  order=error.order or "(none)", domains=",".join(self.domains), problem=str(error),
                  failures=failures, when=iso(_utc(when)))
        self.store.set_pending(self.name, f"ACME order failed ({error}); next attempt at {iso(_utc(when))}")
        self._schedule(when)
        return failure

    def _bug(self, failure: Failure) -> Failure | None:
        if failure.check(AcmeFailure):
            return failure
        delay = self.backoff.delay(max(1, self.state.failures))
        log.failure("ACME certificate {name}: unexpected error; retrying in {delay}s", failure,
                    name=self.name, delay=round(delay))
        self._schedule(self.clock.seconds() + delay)
        return failure

    def _finished(self, outcome: Any) -> None:
        self._busy = None
        if isinstance(outcome, Failure):
            outcome = outcome.value
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            d.callback(outcome)
        return None


def _utc(seconds: float) -> datetime.datetime:
    return datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc)


def _fullchain(certificate: Certificate) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in (certificate.leaf, *certificate.chain))


# ---------------------------------------------------------------- service

class AcmeService(Service):
    """
    The relay's C{acme:} certificates: one L{ManagedCertificate} per set of
    domains, their thread, and the challenges they answer.  Build the
    endpoints with L{endpoint} before the service starts.
    """

    def __init__(self, reactor: Any, config: AcmeConfig, directory: Path,
                 random: Callable[[], float] = random.random) -> None:
        self.reactor = reactor
        self.config = config
        self.directory = Path(directory)
        self.challenges = Challenges()
        self.pool = ThreadPool(minthreads=0, maxthreads=1, name="leeloo-acme")
        self.issuer = AcmeIssuer(reactor, config, self.directory / "account.key", self.challenges, self.pool)
        self.backoff = Backoff(config.retry, MAX_RETRY, random)
        self.certificates: dict[tuple[str, ...], ManagedCertificate] = {}
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        for domains, endpoints in certificate_groups(config.endpoints).items():
            name = domains[0]
            store = CertificateStore(
                self.directory, (name,), reactor,
                placeholder=lambda n, domains=domains: placeholder_certificate(n, domains, reactor.seconds()),
                renewer="acme",
            )
            self.certificates[domains] = ManagedCertificate(
                name, domains, endpoints[0].key, store, self.issuer, reactor, self.directory, self.backoff)

    @property
    def stores(self) -> list[CertificateStore]:
        return [c.store for c in self.certificates.values()]

    def endpoint(self, spec: AcmeEndpoint) -> LetsEncryptServerEndpoint:
        return LetsEncryptServerEndpoint(
            self.reactor, self.certificates[spec.domains].store, port=spec.port, interface=spec.interface,
            backlog=spec.backlog, watch_interval=spec.watch,
        )

    def startService(self) -> None:
        super().startService()
        self.pool.start()
        log.info("ACME: certificates for {names} from {directory}, retrying failures after {retry}s "
                 "(doubling, at most a day)",
                 names=", ".join(",".join(d) for d in self.certificates), directory=self.config.directory_url,
                 retry=self.config.retry)
        for certificate in self.certificates.values():
            certificate.start()

    def stopService(self) -> Deferred:
        super().stopService()
        for certificate in self.certificates.values():
            certificate.stop()
        if self.pool.joined:
            return None
        self.pool.joined = True
        # The thread may be inside a request (NETWORK_TIMEOUT at most):
        # wait for it without blocking the reactor.
        pool, self.pool = self.pool, ThreadPool(minthreads=0, maxthreads=1, name="leeloo-acme")
        self.issuer.pool = self.pool
        return deferToThreadPool(self.reactor, self.reactor.getThreadPool(), pool.stop)
