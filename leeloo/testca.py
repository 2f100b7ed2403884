"""
A throwaway certificate authority and a directory laid out like
C{/etc/letsencrypt}, for tests and benchmarks: real keys and certificates
made with C{cryptography}, never trusted outside the process that made them.
"""

from __future__ import annotations

import datetime
import os
from pathlib import Path
from typing import Any, Iterable

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

_DAY = datetime.timedelta(days=1)


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


class Issued:
    """
    A leaf certificate with its key and the intermediate that signed it.
    """

    def __init__(self, key: ec.EllipticCurvePrivateKey, cert: x509.Certificate, chain: list[x509.Certificate]) -> None:
        self.key = key
        self.cert = cert
        self.chain = chain

    @property
    def fullchain_pem(self) -> bytes:
        return b"".join(cert_pem(c) for c in [self.cert, *self.chain])

    @property
    def key_pem(self) -> bytes:
        return key_pem(self.key)


def _ca_certificate(
    subject: x509.Name, key: Any, signing_key: Any, issuer: x509.Name | None, path_length: int
) -> x509.Certificate:
    """
    A CA certificate for C{key}, valid from a day ago for ten years, signed
    by C{signing_key} as C{issuer} (itself when None).
    """
    now = _now()
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer or subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _DAY)
        .not_valid_after(now + 3650 * _DAY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
        .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
        .sign(signing_key, hashes.SHA256())
    )


class ThrowawayCA:
    """
    A root and an intermediate, like Let's Encrypt's: leaves are signed by
    the intermediate, so a server that sends only its first certificate
    fails verification against the root.
    """

    def __init__(self, name: str = "LEELOO throwaway") -> None:
        self.root_key = _key()
        self.root = _ca_certificate(_name(f"{name} root"), self.root_key, self.root_key, None, 1)
        self.intermediate_key = _key()
        self.intermediate = _ca_certificate(
            _name(f"{name} intermediate"), self.intermediate_key, self.root_key, self.root.subject, 0
        )

    @property
    def root_pem(self) -> bytes:
        return cert_pem(self.root)

    def issue(
        self,
        names: Iterable[str],
        not_before: datetime.datetime | None = None,
        not_after: datetime.datetime | None = None,
        key: Any = None,
    ) -> Issued:
        """
        A leaf certificate for C{names} (DNS names or IP addresses), valid
        from a day ago for 90 days unless told otherwise, for C{key} (by
        default a new P-256 key).
        """
        import ipaddress

        names = list(names)
        now = _now()
        key = key or _key()
        alt: list[x509.GeneralName] = []
        for n in names:
            try:
                alt.append(x509.IPAddress(ipaddress.ip_address(n)))
            except ValueError:
                alt.append(x509.DNSName(n))
        cert = (
            x509.CertificateBuilder()
            .subject_name(_name(names[0]))
            .issuer_name(self.intermediate.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before or now - _DAY)
            .not_valid_after(not_after or now + 90 * _DAY)
            .add_extension(x509.SubjectAlternativeName(alt), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(self.intermediate_key, hashes.SHA256())
        )
        return Issued(key, cert, [self.intermediate])


class LetsEncryptDirectory:
    """
    A directory laid out as certbot lays out C{/etc/letsencrypt}: the files
    live in C{archive/DOMAIN/fullchainN.pem} and C{privkeyN.pem}, and
    C{live/DOMAIN/} holds symlinks to the newest ones.  L{install} plays a
    certbot issue or renewal.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self._versions: dict[str, int] = {}

    def live(self, domain: str) -> Path:
        return self.path / "live" / domain

    def install(self, domain: str, issued: Issued | None = None, *, fullchain: bytes | None = None,
                privkey: bytes | None = None) -> None:
        """
        Write a new version of C{domain}'s files into C{archive/} and move
        the C{live/} symlinks to them, as certbot does on renewal.
        C{fullchain} and C{privkey} override what C{issued} would write.
        """
        version = self._versions.get(domain, 0) + 1
        self._versions[domain] = version
        archive = self.path / "archive" / domain
        live = self.live(domain)
        archive.mkdir(parents=True, exist_ok=True)
        live.mkdir(parents=True, exist_ok=True)
        files = {
            "fullchain": fullchain if fullchain is not None else issued.fullchain_pem,
            "privkey": privkey if privkey is not None else issued.key_pem,
        }
        if issued is not None:
            files["cert"] = cert_pem(issued.cert)
            files["chain"] = b"".join(cert_pem(c) for c in issued.chain)
        for stem, data in files.items():
            target = archive / f"{stem}{version}.pem"
            target.write_bytes(data)
            if stem == "privkey":
                target.chmod(0o600)
            link = live / f"{stem}.pem"
            temporary = live / f".{stem}.pem.new"
            if temporary.is_symlink():
                temporary.unlink()
            temporary.symlink_to(os.path.relpath(target, live))
            temporary.replace(link)
