"""
Spotify tokens sealed at rest: what the relay keeps of a person's Spotify
access (tokens parked for an offline device, the refresh token it holds with
their consent) reaches the store as ciphertext only, opaque to every engine.

The cipher is Fernet (AES-128-CBC with HMAC-SHA256, from the
C{cryptography} package): authenticated, with a versioned token format and a
key that is one line of text in a file (C{DATA_DIR/secrets.key}, or
C{--secrets-key-file}), created 0600 on first start.  The key never enters a
log line or an error message.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
from pathlib import Path

from cryptography.fernet import Fernet, InvalidToken

KEY_FILE_NAME = "secrets.key"
# What a sealed value of a pending token looks like in the store: a dict the
# engine keeps as it keeps any (so every engine stores it unchanged).
SEALED = "sealed"


class SealError(Exception):
    """
    A sealed value cannot be opened with this key (another key, or damaged).
    """


class KeyFileError(Exception):
    """
    The key file cannot be read, created, or holds no key.
    """


class Sealer:
    """
    Seals and opens JSON values with one Fernet key.
    """

    def __init__(self, key: bytes | None = None) -> None:
        key = key if key is not None else Fernet.generate_key()
        self._fernet = Fernet(key)
        # Tells keys apart without giving anything of them away: nodes
        # sharing one store compare it (leeloo.redisstore.RedisStore.check_key).
        self.fingerprint = hmac.new(key, b"leeloo secrets key fingerprint", hashlib.sha256).hexdigest()[:32]

    def __repr__(self) -> str:
        return "<Sealer>"

    def seal(self, value: dict) -> str:
        return self._fernet.encrypt(json.dumps(value, separators=(",", ":")).encode("utf-8")).decode("ascii")

    def open(self, sealed: str) -> dict:
        """
        @raise SealError: C{sealed} was not sealed with this key.
        """
        try:
            value = json.loads(self._fernet.decrypt(sealed.encode("ascii")))
        except (InvalidToken, ValueError, UnicodeError, AttributeError, TypeError):
            raise SealError("a sealed value does not open with this key") from None
        if not isinstance(value, dict):
            raise SealError("a sealed value holds no object")
        return value

    # Pending tokens: kept in the store as {"sealed": ...}.

    def seal_tokens(self, tokens: dict) -> dict:
        return {SEALED: self.seal(tokens)}

    def open_tokens(self, stored: dict) -> dict:
        """
        The tokens of a pending-token record as the store gave it: sealed,
        or (a store written before sealing, in memory) as they were.
        """
        if isinstance(stored, dict) and isinstance(stored.get(SEALED), str):
            return self.open(stored[SEALED])
        return stored


def is_sealed(stored: object) -> bool:
    return isinstance(stored, dict) and isinstance(stored.get(SEALED), str)


def read_key(path: Path) -> bytes:
    """
    The key in C{path}.

    @raise FileNotFoundError: there is no such file.
    @raise KeyFileError: it cannot be read or holds no Fernet key.
    """
    try:
        key = path.read_bytes().strip()
    except FileNotFoundError:
        raise
    except OSError as e:
        raise KeyFileError(f"cannot read the secrets key file {path}: {e.strerror}") from None
    try:
        Fernet(key)
    except (ValueError, TypeError):
        raise KeyFileError(f"the secrets key file {path} holds no key (44 characters of base64url)") from None
    return key


def create_key(path: Path) -> bytes:
    """
    Write a new key to C{path}, readable by its owner only (never over a
    file that exists).
    """
    key = Fernet.generate_key()
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as e:
        raise KeyFileError(f"cannot create the secrets key file {path}: {e.strerror}") from None
    try:
        os.write(fd, key + b"\n")
        os.fsync(fd)
    finally:
        os.close(fd)
    os.chmod(path, 0o600)
    return key
