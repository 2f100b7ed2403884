"""
TLS terminated by Twisted itself, from the certificates certbot keeps under
C{/etc/letsencrypt}: loading and checking them, serving them by SNI, and
replacing them on renewal without touching the connections already open.

The pieces, from the bottom up:

  - L{load_certificate} reads C{live/DOMAIN/fullchain.pem} and
    C{privkey.pem} and refuses a pair that cannot serve (unreadable, key
    and certificate that do not match, expired or not yet valid).
  - L{make_context} turns one into an C{ssl.SSLContext}: TLS is done by
    the standard library's C{ssl} module, on the system's OpenSSL (patched
    by the distribution's security updates), which holds an idle
    connection in less memory than the newer OpenSSL bundled in
    C{cryptography}'s wheels (see L{TLSConnection}).
  - L{CertificateStore} holds one context per domain, picks one by
    SNI, and replaces a domain's context when its files change (L{check},
    run by a timer) or when told to (L{reload}, on SIGHUP).  A refused
    renewal is logged and the old context stays.  For the relay's own ACME
    client (L{leeloo.tls_acme}) it serves a placeholder while a domain
    waits for its first certificate.
  - L{ServerConnectionCreator} makes each new connection from the store's
    current context; a connection keeps the context it started with.
  - L{TLSConnection} is one connection: an C{ssl.SSLObject} over memory
    BIOs, driven by Twisted's C{TLSMemoryBIOProtocol}.
  - L{LetsEncryptServerEndpoint} runs that over TCP and watches the files
    while it listens; the C{letsencrypt:} endpoint string plugin
    (C{twisted/plugins/leeloo_endpoints.py}) builds it with
    L{endpoint_from_string_args}.
"""

from __future__ import annotations

import _ssl
import ctypes
import datetime
import os
import re
import ssl
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from OpenSSL.SSL import Connection, Error, SysCallError, WantReadError, ZeroReturnError
from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ServerEndpoint, TCP6ServerEndpoint
from twisted.internet.interfaces import IListeningPort, IOpenSSLServerConnectionCreator, IStreamServerEndpoint
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory
from zope.interface import implementer

log = Logger()

DEFAULT_DIRECTORY = "/etc/letsencrypt"
DEFAULT_PORT = 443
DEFAULT_BACKLOG = 1024
DEFAULT_WATCH_INTERVAL = 60.0
EXPIRY_WARNING = datetime.timedelta(days=14)
EXPIRY_WARNING_EVERY = 24 * 3600.0

# Mozilla's "intermediate" configuration (server-side TLS guidelines 5.7),
# less the DHE suites: they need DH parameters, and every client the
# intermediate profile serves has ECDHE.  Its TLS 1.3 suites are OpenSSL's
# default ones (AES-128-GCM, AES-256-GCM, ChaCha20-Poly1305), and the
# client's preference decides, as the profile says.
# OpenSSL's security level 2, whatever the system's configuration says,
# refuses keys weaker than RSA 2048 bits (Let's Encrypt issues no weaker).
INTERMEDIATE_CIPHERS = (
    "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:"
    "ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384:"
    "ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305:@SECLEVEL=2"
)
ALPN = "http/1.1"
# The ssl options make_context sets on and off.
RELAY_OPTIONS_ON = ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION | ssl.OP_SINGLE_ECDH_USE
RELAY_OPTIONS_OFF = ssl.OP_CIPHER_SERVER_PREFERENCE | ssl.OP_NO_TICKET | ssl.OP_IGNORE_UNEXPECTED_EOF

# A domain names a directory under live/: DNS labels only, nothing that
# could walk out of it.
_DOMAIN = re.compile(r"(?=.{1,253}$)([a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?\.)*[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?")


class CertificateError(Exception):
    """
    A certificate that cannot be served, said in one line: the domain, the
    file, what is wrong and what to do about it.
    """

    def __init__(self, domain: str, path: Path, problem: str, remedy: str) -> None:
        super().__init__(domain, path, problem, remedy)
        self.domain = domain
        self.path = path
        self.problem = problem
        self.remedy = remedy

    def line(self, webroot: str | os.PathLike | None = None) -> str:
        """
        The message, with the relay's ACME webroot in the certbot command
        when it is known.
        """
        remedy = self.remedy.replace(_WEBROOT, str(webroot) if webroot else "ACME_WEBROOT")
        if not webroot and _WEBROOT in self.remedy:
            remedy += " (ACME_WEBROOT: the relay's --acme-webroot)"
        return f"TLS certificate for {self.domain}: {self.path} {self.problem}; {remedy}"

    def __str__(self) -> str:
        return self.line()


_WEBROOT = "{webroot}"


def _utc(seconds: float) -> datetime.datetime:
    return datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc)


def iso(moment: datetime.datetime) -> str:
    return moment.astimezone(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True)
class Certificate:
    """
    One domain's certificate chain and key, read and checked.
    """

    domain: str
    leaf: x509.Certificate
    chain: tuple[x509.Certificate, ...]
    key: Any
    fingerprint: str

    @property
    def not_after(self) -> datetime.datetime:
        return self.leaf.not_valid_after_utc

    @property
    def names(self) -> tuple[str, ...]:
        """
        The DNS names the certificate is for, lower case.
        """
        try:
            alt = self.leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        except x509.ExtensionNotFound:
            return ()
        return tuple(n.lower() for n in alt.value.get_values_for_type(x509.DNSName))


def _read(domain: str, path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise CertificateError(
            domain, path, "does not exist",
            f"get a certificate with: sudo certbot certonly --webroot -w {_WEBROOT} -d {domain}",
        ) from None
    except PermissionError:
        raise CertificateError(
            domain, path, "cannot be read by this user (permission denied)",
            "give the relay's group read access to live/ and archive/ as README.rst "
            "'TLS with Let's Encrypt' shows",
        ) from None
    except OSError as e:
        raise CertificateError(domain, path, f"cannot be read ({e.strerror or e})",
                               "check the file and its permissions") from None


def _renew(domain: str) -> str:
    return f"renew it with: sudo certbot renew --cert-name {domain} --force-renewal"


def load_certificate(directory: str | os.PathLike, domain: str, now: float) -> Certificate:
    """
    Read C{live/DOMAIN/fullchain.pem} and C{privkey.pem} under C{directory}
    and check that they can be served at C{now} (seconds since the epoch).

    @raise CertificateError: they cannot.
    """
    live = Path(directory) / "live" / domain
    chain_path, key_path = live / "fullchain.pem", live / "privkey.pem"
    renew = _renew(domain)
    chain_pem = _read(domain, chain_path)
    key_pem = _read(domain, key_path)
    try:
        certificates = x509.load_pem_x509_certificates(chain_pem)
    except ValueError:
        raise CertificateError(domain, chain_path, "holds no readable PEM certificate", renew) from None
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError):
        raise CertificateError(domain, key_path, "holds no readable unencrypted PEM private key", renew) from None
    leaf = certificates[0]
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    if leaf.public_key().public_bytes(serialization.Encoding.DER, spki) != key.public_key().public_bytes(
        serialization.Encoding.DER, spki
    ):
        raise CertificateError(domain, key_path, f"does not match the certificate in {chain_path.name}", renew)
    moment = _utc(now)
    if moment < leaf.not_valid_before_utc:
        raise CertificateError(
            domain, chain_path, f"is not valid before {iso(leaf.not_valid_before_utc)}",
            "check the system clock, or " + renew,
        )
    if moment >= leaf.not_valid_after_utc:
        raise CertificateError(domain, chain_path, f"expired on {iso(leaf.not_valid_after_utc)}", renew)
    return Certificate(
        domain=domain,
        leaf=leaf,
        chain=tuple(certificates[1:]),
        key=key,
        fingerprint=leaf.fingerprint(hashes.SHA256()).hex(),
    )


def _pem(certificate: Certificate) -> bytes:
    """
    The chain, leaf first, then the key, as one PEM file.
    """
    chain = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in (certificate.leaf, *certificate.chain))
    return chain + certificate.key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _load_chain(context: ssl.SSLContext, pem: bytes) -> None:
    """
    Give C{context} the chain and key in C{pem} without writing the key to
    a disk: C{ssl} loads only from a path, so the path is an anonymous
    memory file's.
    """
    fd = os.memfd_create("leeloo-tls", os.MFD_CLOEXEC)
    try:
        view = memoryview(pem)
        while view:
            view = view[os.write(fd, view):]
        context.load_cert_chain(f"/proc/self/fd/{fd}")
    finally:
        os.close(fd)


# OpenSSL's SSL_CTX_ctrl() commands and mode bit: the standard library sets
# SSL_MODE_RELEASE_BUFFERS on every context and offers no way to clear it,
# which only the benchmark's comparison ever wants.
_SSL_CTRL_MODE = 33
_SSL_CTRL_CLEAR_MODE = 78
_SSL_MODE_RELEASE_BUFFERS = 0x10


def _ctrl(context: ssl.SSLContext, command: int, argument: int) -> int:
    """
    C{SSL_CTX_ctrl()} on C{context}'s C{SSL_CTX}, through the libssl the
    C{ssl} module is linked with.  The C{SSL_CTX} pointer is the first
    field after the object header of CPython's C{_ssl._SSLContext}; it is
    checked against the context's options before it is used.

    @raise NotImplementedError: this Python's C{ssl} module does not allow it.
    """
    if sys.implementation.name != "cpython":
        raise NotImplementedError("only CPython's ssl module is known")
    try:
        libssl = ctypes.CDLL(_ssl.__file__)
        get_options, ctrl = libssl.SSL_CTX_get_options, libssl.SSL_CTX_ctrl
    except (OSError, AttributeError) as e:
        raise NotImplementedError(f"this Python's ssl module does not expose libssl ({e})") from None
    get_options.restype, get_options.argtypes = ctypes.c_uint64, [ctypes.c_void_p]
    ctrl.restype, ctrl.argtypes = ctypes.c_long, [ctypes.c_void_p, ctypes.c_int, ctypes.c_long, ctypes.c_void_p]
    pointer = ctypes.c_void_p.from_address(id(context) + object.__basicsize__).value
    if not pointer or get_options(pointer) != context.options:
        raise NotImplementedError("this Python's ssl module does not lay out its contexts as CPython's does")
    return ctrl(pointer, command, argument, None)


def releases_buffers(context: ssl.SSLContext) -> bool:
    """
    Whether C{context} has OpenSSL's release-buffers mode on: an idle
    connection then holds no read or write record buffer (some 34 KiB).
    """
    return bool(_ctrl(context, _SSL_CTRL_MODE, 0) & _SSL_MODE_RELEASE_BUFFERS)


def make_context(
    certificate: Certificate,
    on_server_name: Callable[[ssl.SSLObject, str | None, ssl.SSLContext], None] | None = None,
    release_buffers: bool = True,
) -> ssl.SSLContext:
    """
    A server context for C{certificate}: TLS 1.2 and 1.3 only, Mozilla's
    intermediate ciphers chosen by the client's preference, ALPN
    C{http/1.1} only (no h2: the WebSocket upgrade needs HTTP/1.1), session
    tickets, the whole chain sent, and (unless told otherwise) OpenSSL's
    release-buffers mode.

    @raise ssl.SSLError: OpenSSL refuses the certificate or the key.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.maximum_version = ssl.TLSVersion.TLSv1_3
    # Every option the relay relies on is set here, whatever this Python's
    # ssl module defaults to: Debian 12's 3.11.2, for one, turns on
    # OP_IGNORE_UNEXPECTED_EOF, which makes a truncated stream look like a
    # close_notify (and a lost connection like a clean one).
    context.options |= RELAY_OPTIONS_ON
    context.options &= ~RELAY_OPTIONS_OFF
    context.set_ciphers(INTERMEDIATE_CIPHERS)
    context.set_alpn_protocols([ALPN])
    _load_chain(context, _pem(certificate))
    if not release_buffers:
        try:
            _ctrl(context, _SSL_CTRL_CLEAR_MODE, _SSL_MODE_RELEASE_BUFFERS)
        except NotImplementedError as e:
            raise ValueError(f"letsencrypt: releasebuffers=0 is not possible here: {e}") from None
    if on_server_name is not None:
        context.sni_callback = on_server_name
    return context


def _error(e: ssl.SSLError) -> Error:
    """
    pyOpenSSL's form of C{e}, the one C{TLSMemoryBIOProtocol} understands:
    the peer's close_notify is the C{ZeroReturnError} it takes for a clean
    close (the ssl module raises C{SSLZeroReturnError} for one that comes
    after the relay's own), and an end of the stream without a close_notify
    is the C{SysCallError} it takes for a lost connection.
    """
    if isinstance(e, ssl.SSLZeroReturnError):
        return ZeroReturnError()
    # Python before 3.11.3 (Debian 12's 3.11.2) raises a plain SSLError with
    # OpenSSL 3's reason for it rather than SSLEOFError.
    if isinstance(e, ssl.SSLEOFError) or e.reason == "UNEXPECTED_EOF_WHILE_READING":
        return SysCallError(-1, "Unexpected EOF")
    return Error([(e.library or "SSL routines", "", e.reason or str(e))])


class TLSConnection(Connection):
    """
    One server-side TLS connection: an C{ssl.SSLObject} over two memory
    BIOs, in the shape of the pyOpenSSL C{Connection} that Twisted's
    C{TLSMemoryBIOProtocol} drives and Autobahn asks for the TLS channel
    binding (both check for that class).  It has the methods they call and
    raises the pyOpenSSL exceptions they expect; any other of
    C{Connection}'s methods raises C{AttributeError}.

    Why not pyOpenSSL itself: its connections run on the OpenSSL bundled in
    C{cryptography}'s wheels (4.0 as of this writing), where one costs some
    8 KiB more than on the system's OpenSSL 3.0 that the C{ssl} module uses.
    """

    __slots__ = ("_incoming", "_outgoing", "_tls")
    # Connection.__getattr__ looks here for a socket to delegate to.
    _socket = None

    def __init__(self, context: ssl.SSLContext) -> None:
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._tls = context.wrap_bio(self._incoming, self._outgoing, server_side=True)

    def set_accept_state(self) -> None:
        # Made server side already.
        pass

    def set_app_data(self, data: Any) -> None:
        # Twisted hands over its protocol; nothing here calls back into it.
        pass

    def do_handshake(self) -> None:
        try:
            self._tls.do_handshake()
        except ssl.SSLWantReadError:
            raise WantReadError() from None
        except ssl.SSLError as e:
            raise _error(e) from None

    def bio_write(self, data: bytes) -> int:
        return self._incoming.write(data)

    def bio_read(self, size: int) -> bytes:
        data = self._outgoing.read(size)
        if not data:
            raise WantReadError()
        return data

    def bio_shutdown(self) -> None:
        self._incoming.write_eof()

    def recv(self, size: int) -> bytes:
        try:
            data = self._tls.read(size)
        except ssl.SSLWantReadError:
            raise WantReadError() from None
        except ssl.SSLError as e:
            raise _error(e) from None
        if not data:
            # The ssl module's word for the peer's close_notify.
            raise ZeroReturnError()
        return data

    def send(self, data: bytes) -> int:
        try:
            return self._tls.write(data)
        except ssl.SSLWantReadError:
            raise WantReadError() from None
        except ssl.SSLError as e:
            raise _error(e) from None

    def shutdown(self) -> bool:
        """
        Send close_notify; C{True} once the peer's has come too.
        """
        try:
            self._tls.unwrap()
        except ssl.SSLWantReadError:
            return False
        except ssl.SSLError as e:
            raise _error(e) from None
        return True

    def get_peer_certificate(self) -> None:
        # The relay asks no client for a certificate.
        return None

    def get_alpn_proto_negotiated(self) -> bytes:
        return (self._tls.selected_alpn_protocol() or "").encode("ascii")

    def get_peer_finished(self) -> bytes | None:
        """
        The C{tls-unique} channel binding (RFC 5929), which Autobahn asks
        for by this name: the client's Finished message after a full
        handshake (the server's after a resumed one); C{None} before the
        handshake is done.
        """
        return self._tls.get_channel_binding("tls-unique")


def _signature(directory: Path, domain: str) -> tuple:
    """
    What changes when certbot moves C{live/DOMAIN}'s links to new files.
    """
    parts: list[Any] = []
    for name in ("fullchain.pem", "privkey.pem"):
        path = directory / "live" / domain / name
        try:
            st = os.stat(path)
            parts.append((os.path.realpath(path), st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size))
        except OSError as e:
            parts.append((str(path), e.errno))
    return tuple(parts)


def check_domain(domain: str) -> str:
    name = domain.strip().lower().rstrip(".")
    if not _DOMAIN.fullmatch(name):
        raise ValueError(f"letsencrypt: domain={domain!r} is not a domain name")
    return name


class CertificateStore:
    """
    The certificates of C{domains} under C{directory} (laid out as certbot
    keeps C{/etc/letsencrypt}), each as an OpenSSL context, kept current.

    @param clock: provides C{seconds()}; it decides validity and when to
        warn of expiry.
    @param placeholder: makes a stand-in L{Certificate} for a domain whose
        files cannot be served yet (the relay's own ACME client is getting
        them): the domain is then I{pending} (L{pending} says why) until
        its files load.  Without it such a domain is an error.
    @param renewer: who renews the certificates, for the expiry warning:
        C{"certbot"} or C{"acme"} (the relay itself).
    @raise CertificateError: at construction, when one cannot be served
        and there is no C{placeholder}.
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        domains: Sequence[str],
        clock: Any,
        release_buffers: bool = True,
        placeholder: Callable[[str], Certificate] | None = None,
        renewer: str = "certbot",
    ) -> None:
        if not domains:
            raise ValueError("at least one domain is needed")
        self.directory = Path(directory)
        self.domains = tuple(domains)
        self.clock = clock
        self.release_buffers = release_buffers
        self._certificates: dict[str, Certificate] = {}
        self._contexts: dict[str, ssl.SSLContext] = {}
        self._by_name: dict[str, str] = {}
        self._signatures: dict[str, tuple] = {}
        self._warned: dict[str, float] = {}
        self._waiting: list[Deferred] = []
        self.renewer = renewer
        # Domains served by a placeholder, with why.
        self.pending: dict[str, str] = {}
        for domain in self.domains:
            self._signatures[domain] = _signature(self.directory, domain)
            try:
                certificate = load_certificate(self.directory, domain, clock.seconds())
            except CertificateError as e:
                if placeholder is None:
                    raise
                self.pending[domain] = _pending_reason(e)
                certificate = placeholder(domain)
            self._install(certificate)

    def log_certificates(self) -> None:
        for domain in self.domains:
            certificate = self._certificates[domain]
            if domain in self.pending:
                log.info(
                    "TLS certificate for {domain} pending ({why}): serving a self-signed placeholder "
                    "until it arrives",
                    domain=domain,
                    why=self.pending[domain],
                )
                continue
            log.info(
                "TLS certificate for {domain} ({names}) valid until {not_after}, sha256 {fingerprint}",
                domain=domain,
                names=", ".join(certificate.names) or "no DNS names",
                not_after=iso(certificate.not_after),
                fingerprint=certificate.fingerprint,
            )

    # -- serving

    def certificate(self, domain: str) -> Certificate:
        return self._certificates[domain]

    def default_context(self) -> ssl.SSLContext:
        """
        The context a connection starts with: the first domain's.
        """
        return self._contexts[self.domains[0]]

    def context_for(self, server_name: str | None) -> ssl.SSLContext:
        """
        The context for the name a client asked for by SNI: a certificate
        naming it exactly, else one with a matching wildcard, else the
        first domain's.
        """
        if server_name:
            name = server_name.lower().rstrip(".")
            domain = self._by_name.get(name)
            if domain is None and "." in name:
                domain = self._by_name.get("*." + name.split(".", 1)[1])
            if domain is not None:
                return self._contexts[domain]
        return self.default_context()

    def _on_server_name(self, connection: ssl.SSLObject, server_name: str | None, context: ssl.SSLContext) -> None:
        chosen = self.context_for(server_name)
        if chosen is not context:
            connection.context = chosen

    def _install(self, certificate: Certificate) -> None:
        domain = certificate.domain
        try:
            context = make_context(certificate, self._on_server_name, self.release_buffers)
        except ssl.SSLError as e:
            raise CertificateError(domain, self.directory / "live" / domain / "fullchain.pem",
                                   f"is refused by OpenSSL ({e.reason or e})", _renew(domain)) from None
        self._certificates[domain] = certificate
        self._contexts[domain] = context
        by_name: dict[str, str] = {}
        for domain in reversed(self.domains):
            if domain in self._certificates:
                for name in (domain, *self._certificates[domain].names):
                    by_name[name] = domain
        self._by_name = by_name

    # -- renewal

    def when_reloaded(self) -> Deferred:
        """
        A Deferred that fires with the domain whose certificate is replaced
        next.
        """
        d: Deferred = Deferred()
        self._waiting.append(d)
        return d

    def reload(self) -> None:
        """
        Read every domain's files again now (on SIGHUP), replacing what
        changed.  Never raises.
        """
        for domain in self.domains:
            self._signatures[domain] = _signature(self.directory, domain)
            self._reload(domain, "reload requested")

    def reload_domain(self, domain: str, why: str) -> bool:
        """
        Read C{domain}'s files again now; whether the certificate served is
        then theirs (replaced, or unchanged).  Never raises.
        """
        self._signatures[domain] = _signature(self.directory, domain)
        return self._reload(domain, why)

    def set_pending(self, domain: str, why: str) -> None:
        """
        Say why C{domain}, if it is still pending, is still pending.
        """
        if domain in self.pending:
            self.pending[domain] = why

    def check(self) -> None:
        """
        Reload the domains whose files changed since last seen, and warn
        once a day about a certificate that expires within 14 days.  Run by
        a timer: never raises.
        """
        try:
            for domain in self.domains:
                signature = _signature(self.directory, domain)
                if signature != self._signatures[domain]:
                    self._signatures[domain] = signature
                    self._reload(domain, "files changed")
            self._warn_of_expiry()
        except Exception:
            log.failure("checking the TLS certificates failed; will check again")

    def _reload(self, domain: str, why: str) -> bool:
        old = self._certificates[domain]
        try:
            new = load_certificate(self.directory, domain, self.clock.seconds())
            if new.fingerprint == old.fingerprint:
                log.info("TLS certificate for {domain} unchanged ({why})", domain=domain, why=why)
                return True
            self._install(new)
        except CertificateError as e:
            if domain in self.pending:
                log.info("TLS certificate for {domain} still pending ({why}): {problem}",
                         domain=domain, why=why, problem=_pending_reason(e))
                return False
            log.error(
                "refused the new TLS certificate ({why}): {problem}; still serving the old one, "
                "valid until {not_after}",
                why=why,
                problem=str(e),
                not_after=iso(old.not_after),
            )
            return False
        except Exception:
            log.failure("reloading the TLS certificate for {domain} failed; still serving the old one",
                        domain=domain)
            return False
        self._warned.pop(domain, None)
        self.pending.pop(domain, None)
        log.info(
            "TLS certificate for {domain} replaced ({why}): now valid until {not_after}, sha256 {fingerprint}; "
            "new connections get it, open ones keep theirs",
            domain=domain,
            why=why,
            not_after=iso(new.not_after),
            fingerprint=new.fingerprint,
        )
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            d.callback(domain)
        return True

    def _warn_of_expiry(self) -> None:
        now = self.clock.seconds()
        for domain, certificate in self._certificates.items():
            left = certificate.not_after - _utc(now)
            if left >= EXPIRY_WARNING or domain in self.pending:
                continue
            last = self._warned.get(domain)
            if last is not None and now - last < EXPIRY_WARNING_EVERY:
                continue
            self._warned[domain] = now
            if self.renewer == "acme":
                log.warn(
                    "TLS certificate for {domain} expires on {not_after}, in {days} days, and the relay's "
                    "own ACME renewal has not replaced it yet: see the log's ACME lines for why",
                    domain=domain,
                    not_after=iso(certificate.not_after),
                    days=max(0, left.days),
                )
                continue
            log.warn(
                "TLS certificate for {domain} expires on {not_after}, in {days} days: is certbot renewing it? "
                "(sudo certbot renew --cert-name {domain})",
                domain=domain,
                not_after=iso(certificate.not_after),
                days=max(0, left.days),
            )

    def not_after(self) -> dict[str, str]:
        return {domain: iso(c.not_after) for domain, c in self._certificates.items() if domain not in self.pending}

    def expiry(self) -> dict[str, float]:
        """
        When each domain's certificate expires, in seconds since the epoch
        (a pending domain's placeholder is not its certificate: left out).
        """
        return {domain: c.not_after.timestamp() for domain, c in self._certificates.items()
                if domain not in self.pending}


def _pending_reason(e: CertificateError) -> str:
    if e.problem == "does not exist":
        return "no certificate yet"
    return f"{e.path.name} {e.problem}"


def health_fields(stores: Iterable[CertificateStore]) -> Callable[[], dict]:
    """
    A provider of C{/health}'s C{tls_not_after}: each domain's certificate
    expiry, ISO 8601 in UTC; and, while a domain waits for its first
    certificate, C{tls_pending}: why, by domain.
    """
    stores = tuple(stores)

    def fields() -> dict:
        expiry: dict[str, str] = {}
        pending: dict[str, str] = {}
        for store in stores:
            expiry.update(store.not_after())
            pending.update(store.pending)
        result: dict = {"tls_not_after": expiry}
        if pending:
            result["tls_pending"] = pending
        return result

    return fields


@implementer(IOpenSSLServerConnectionCreator)
class ServerConnectionCreator:
    """
    Makes each new TLS connection from the store's current context; SNI may
    switch it to another domain's.  A connection keeps the context it was
    made with, so a renewal never touches one already open.
    """

    def __init__(self, store: CertificateStore) -> None:
        self.store = store

    def serverConnectionForTLS(self, protocol: Any) -> TLSConnection:
        return TLSConnection(self.store.default_context())


@implementer(IListeningPort)
class _WatchingPort:
    """
    A listening port that stops watching the certificate files when it
    stops listening.
    """

    def __init__(self, port: IListeningPort, watch: LoopingCall | None) -> None:
        self._port = port
        self._watch = watch

    def startListening(self) -> None:
        self._port.startListening()

    def stopListening(self) -> Any:
        if self._watch is not None and self._watch.running:
            self._watch.stop()
        return self._port.stopListening()

    def getHost(self) -> Any:
        return self._port.getHost()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._port, name)


@implementer(IStreamServerEndpoint)
class LetsEncryptServerEndpoint:
    """
    HTTPS on a TCP port with the store's certificates; while it listens it
    checks the files every C{watch_interval} seconds (0: never).
    """

    def __init__(
        self,
        reactor: Any,
        certificates: CertificateStore,
        port: int = DEFAULT_PORT,
        interface: str = "",
        backlog: int = DEFAULT_BACKLOG,
        watch_interval: float = DEFAULT_WATCH_INTERVAL,
    ) -> None:
        self.reactor = reactor
        self.certificates = certificates
        self.port = port
        self.interface = interface
        self.backlog = backlog
        self.watch_interval = watch_interval

    def listen(self, factory: Any) -> Deferred:
        tcp = TCP6ServerEndpoint if ":" in self.interface else TCP4ServerEndpoint
        endpoint = tcp(self.reactor, self.port, self.backlog, self.interface)
        tls = TLSMemoryBIOFactory(ServerConnectionCreator(self.certificates), False, factory, clock=self.reactor)

        def listening(port: IListeningPort) -> IListeningPort:
            log.info(
                "HTTPS on {listen_address}, release-buffers {release}, checking the certificate files "
                "every {interval}s",
                listen_address=port.getHost(),
                release="on" if self.certificates.release_buffers else "off",
                interval=self.watch_interval,
            )
            self.certificates.log_certificates()
            watch = None
            if self.watch_interval > 0:
                watch = LoopingCall(self.certificates.check)
                watch.clock = self.reactor
                watch.start(self.watch_interval, now=False)
            return _WatchingPort(port, watch)

        return endpoint.listen(tls).addCallback(listening)


_OPTIONS = ("domain", "port", "interface", "directory", "backlog", "releasebuffers", "watch")


def endpoint_number(scheme: str, name: str, value: str, kind: type, minimum: float) -> Any:
    """
    The number C{value} of endpoint option C{name}, at least C{minimum}.

    @raise ValueError: naming C{scheme:name=value} and what is allowed.
    """
    try:
        number = kind(value)
    except ValueError:
        raise ValueError(f"{scheme}: {name}={value!r} is not a number") from None
    if number < minimum:
        raise ValueError(f"{scheme}: {name}={value!r} must be at least {minimum}")
    return number


def endpoint_from_string_args(reactor: Any, *args: str, **kwargs: str) -> LetsEncryptServerEndpoint:
    """
    Build the endpoint for
    C{letsencrypt:domain=D[,D2...][:port=443][:interface=ADDR][:directory=/etc/letsencrypt]
    [:backlog=1024][:releasebuffers=1][:watch=60]}, loading its certificates.

    @raise ValueError: the string is wrong.
    @raise CertificateError: a certificate cannot be served.
    """
    if args:
        raise ValueError("letsencrypt: takes only name=value options, e.g. letsencrypt:domain=example.com:port=443")
    unknown = sorted(set(kwargs) - set(_OPTIONS))
    if unknown:
        raise ValueError(f"letsencrypt: unknown option {unknown[0]!r}; known: {', '.join(_OPTIONS)}")
    if not kwargs.get("domain"):
        raise ValueError("letsencrypt: needs domain=, e.g. letsencrypt:domain=example.com:port=443")
    domains = tuple(dict.fromkeys(check_domain(d) for d in kwargs["domain"].split(",") if d.strip()))
    if not domains:
        raise ValueError("letsencrypt: needs domain=, e.g. letsencrypt:domain=example.com:port=443")
    releasebuffers = kwargs.get("releasebuffers", "1")
    if releasebuffers not in ("0", "1"):
        raise ValueError(f"letsencrypt: releasebuffers={releasebuffers!r} must be 0 or 1")
    store = CertificateStore(
        kwargs.get("directory", DEFAULT_DIRECTORY),
        domains,
        reactor,
        release_buffers=releasebuffers == "1",
    )
    def number(name: str, default: float, kind: type, minimum: float) -> Any:
        return endpoint_number("letsencrypt", name, kwargs.get(name, str(default)), kind, minimum)

    return LetsEncryptServerEndpoint(
        reactor,
        store,
        port=number("port", DEFAULT_PORT, int, 0),
        interface=kwargs.get("interface", ""),
        backlog=number("backlog", DEFAULT_BACKLOG, int, 1),
        watch_interval=number("watch", DEFAULT_WATCH_INTERVAL, float, 0),
    )


class ReloadOnHangup(Service):
    """
    Reloads the certificates on SIGHUP (certbot's deploy hook sends it).
    The handler only hands the work to the reactor thread; the previous
    handler comes back when the service stops.
    """

    def __init__(self, reactor: Any, stores: Sequence[CertificateStore], signals: Any = None) -> None:
        import signal

        self.reactor = reactor
        self.stores = tuple(stores)
        self._signal = signals or signal
        self._previous: Any = None

    def startService(self) -> None:
        super().startService()
        self._previous = self._signal.signal(self._signal.SIGHUP, self._on_hangup)

    def stopService(self) -> None:
        super().stopService()
        previous, self._previous = self._previous, None
        self._signal.signal(self._signal.SIGHUP, self._signal.SIG_DFL if previous is None else previous)

    def _on_hangup(self, signum: int, frame: Any) -> None:
        self.reactor.callFromThread(self.reload)

    def reload(self) -> None:
        log.info("SIGHUP: reloading the TLS certificates")
        for store in self.stores:
            store.reload()
