"""
Where the Redis store is (C{--redis URL}), parsed and checked without
importing the Redis client (so that the SQLite path never loads it).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from urllib.parse import unquote, urlsplit

PASSWORD_SETTING = "LEELOO_REDIS_PASSWORD"
DEFAULT_PORT = 6379
PREFIX = "leeloo:"


class RedisURLError(ValueError):
    """
    A C{--redis} URL the relay cannot use; the message says why.
    """


@dataclass(frozen=True)
class RedisSettings:
    """
    Where the Redis store is: C{url} as the operator wrote it (never with a
    password: that comes from C{LEELOO_REDIS_PASSWORD} alone).

    @param ca_file: the PEM certificates that C{rediss://} trusts (default:
        the system's).
    @param reply_timeout: seconds a command waits for its answer before the
        connection is dropped and made again.
    @param max_retry_delay: the longest wait between reconnection attempts.
    """

    url: str
    host: str
    port: int
    db: int = 0
    username: str | None = None
    tls: bool = False
    ca_file: str | None = None
    password: str | None = field(default=None, repr=False)
    reply_timeout: float = 5.0
    connect_timeout: float = 5.0
    max_retry_delay: float = 5.0
    prefix: str = PREFIX

    @property
    def where(self) -> str:
        return f"{'rediss' if self.tls else 'redis'}://{self.host}:{self.port}/{self.db}"


def parse_redis_url(url: str, password: str | None = None, ca_file: str | None = None,
                    reply_timeout: float = 5.0, max_retry_delay: float = 5.0) -> RedisSettings:
    """
    C{redis://[USER@]HOST:PORT/DB} or C{rediss://...} as L{RedisSettings}.

    @raise RedisURLError: another scheme, a password in the URL, no host, a
        bad port or database number.
    """
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as e:
        raise RedisURLError(f"{url!r} is not a Redis URL ({e})") from None
    if parts.scheme not in ("redis", "rediss"):
        raise RedisURLError(f"{url!r}: the scheme must be redis:// or rediss:// (TLS)")
    if parts.password is not None:
        raise RedisURLError("a password in the Redis URL would show in the process list: "
                            f"set {PASSWORD_SETTING} in the environment or the env file instead")
    if not parts.hostname:
        raise RedisURLError(f"{url!r} names no host: redis://HOST:PORT/DB")
    path = parts.path.strip("/")
    try:
        db = int(path) if path else 0
    except ValueError:
        raise RedisURLError(f"{url!r}: the database must be a number, as in redis://HOST:PORT/0") from None
    if db < 0 or parts.query or parts.fragment:
        raise RedisURLError(f"{url!r}: expected redis://[USER@]HOST:PORT/DB and nothing more")
    return RedisSettings(
        url=url, host=parts.hostname, port=port or DEFAULT_PORT, db=db,
        username=unquote(parts.username) if parts.username else None, tls=parts.scheme == "rediss",
        ca_file=ca_file, password=password or None, reply_timeout=reply_timeout,
        max_retry_delay=max_retry_delay,
    )
