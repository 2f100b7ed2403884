"""
``twistd leeloo``: command-line options -> a frozen L{Config} -> the service
tree.  This is the only place argv and the environment become objects, and
the only module that imports the global reactor (in L{makeService}).  The
wiring of the service tree is L{leeloo.service}'s; the process tuning
L{leeloo.process}'s.
"""

from __future__ import annotations

import difflib
import math
import os
import platform
import re
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from twisted.application.service import MultiService
from twisted.internet.endpoints import serverFromString
from twisted.python import usage

from leeloo import __version__
from leeloo.access import OriginPolicy, parse_network
from leeloo.limits import Rate, RelayLimits
from leeloo.listening import DEFAULT_BACKLOG, as_written, with_default_backlog
from leeloo.logs import twistd_text_observer
from leeloo.process import tune_process
from leeloo.redisurl import RedisSettings, RedisURLError, parse_redis_url
from leeloo.relay import BIND_TIMEOUT, DAY, EPHEMERAL_AGE
from leeloo.service import StartupError, build_service
from leeloo.spotify import DEFAULT_ACCOUNTS_URL, DEFAULT_API_URL, SpotifyConfig
from leeloo.tls import CertificateError
from leeloo.tls_acme import (
    LETS_ENCRYPT, LETS_ENCRYPT_STAGING, AcmeConfig, certificate_groups, is_acme, parse_endpoint,
)
from leeloo.web import HTTPLimits
from leeloo.websocket import WebSocketLimits

__all__ = ["DEFAULT_BACKLOG", "Config", "Options", "StartupError", "as_written", "build_service", "makeService",
           "with_default_backlog"]

DEFAULT_LISTEN = "tcp:8080:interface=127.0.0.1"
DEFAULT_DATA_DIR = "leeloo-data"

SETTINGS = (
    "SPOTIFY_CLIENT_ID",
    "SPOTIFY_CLIENT_SECRET",
    "SPOTIFY_REDIRECT_URI",
    "SPOTIFY_ACCOUNTS_URL",
    "SPOTIFY_API_URL",
    "TELEGRAM_API_SECRET",
    "LEELOO_REDIS_PASSWORD",
)

_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


@dataclass(frozen=True)
class Config:
    """
    Everything the relay is configured with, validated.
    """

    listen: tuple[str, ...] = (DEFAULT_LISTEN,)
    redirect_listen: tuple[str, ...] = ()
    acme_webroot: Path | None = None
    data_dir: Path = Path(DEFAULT_DATA_DIR)
    limits: WebSocketLimits = WebSocketLimits()
    http_limits: HTTPLimits = HTTPLimits()
    trusted_proxies: tuple[str, ...] = ()
    public_url: str | None = None
    admin_listen: tuple[str, ...] = ()
    # Said once at start, at warning level (never a setting's value).
    warnings: tuple[str, ...] = ()
    spotify: SpotifyConfig | None = None
    telegram_api_secret: str | None = field(default=None, repr=False)
    store: str = "sqlite"
    fsync: bool = False
    # --redis: the Redis store (store is then "redis").
    redis: RedisSettings | None = None
    # --node-heartbeat: seconds between a node's beats in Redis (with --redis).
    node_heartbeat: float = 5.0
    # None: DATA_DIR/secrets.key.
    secrets_key_file: Path | None = None
    replay_limit: int = 50
    retention_days: float = 7.0
    crew_ttl_days: float = 90.0
    presence_grace: float = 10.0
    crew_log_bytes: int = 16 * 1024 * 1024
    store_queue_bytes: int = 8 * 1024 * 1024
    relay_limits: RelayLimits = RelayLimits()
    legacy_replay_age: float = DAY
    ephemeral_age: float = EPHEMERAL_AGE
    bind_timeout: float = BIND_TIMEOUT
    # The acme: endpoints of listen, with the --acme-* options.
    acme: AcmeConfig | None = None
    # Spotify pairing: accept the deployed devices' state=device id; PKCE.
    legacy_spotify_state: bool = True
    spotify_pkce: bool = True


def read_env_file(path: str) -> dict[str, str]:
    """
    Read a ``KEY=VALUE`` file in the format of the original relay's ``.env``:
    blank lines and ``#`` comments allowed, values optionally quoted,
    ``export`` accepted.  Errors name the line, never its value.
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else "not UTF-8 text"
        raise usage.UsageError(f"cannot read --env-file {path}: {reason}; check the path and its permissions")
    values: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("export "):
            line = line[len("export "):].lstrip()
        key, sep, value = line.partition("=")
        key = key.strip()
        if not sep or not _KEY.fullmatch(key):
            raise usage.UsageError(f"--env-file {path}, line {number}: expected KEY=VALUE")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        else:
            value = value.split(" #", 1)[0].rstrip()
        values[key] = value
    return values


class _NoReactor:
    """
    Stands in for the reactor while endpoint strings are only checked (a
    C{letsencrypt:} endpoint reads its certificates then, and needs the time).
    """

    seconds = staticmethod(time.time)



def check_endpoint(description: str, option: str = "--listen", webroot: Path | None = None) -> str:
    written, description = description, with_default_backlog(description)
    try:
        serverFromString(_NoReactor(), description)
    except CertificateError as e:
        line = e.line(webroot)
        # Not a usage mistake, so not a UsageError (twistd would print the
        # whole usage text above it): one line, as makeService does for a
        # StartupError.
        raise SystemExit(f"leeloo: cannot start: {line}") from None
    except Exception as e:
        detail = str(e) or type(e).__name__
        if description.split(":", 1)[0].strip().lower() == "systemd" and isinstance(e, (IndexError, ValueError)):
            detail = ("systemd passed no socket with that index: this endpoint is for a relay started by "
                      "a .socket unit (socket activation)")
        raise usage.UsageError(
            f"{option} {shlex.quote(written)} is not a usable endpoint ({detail}); "
            "use e.g. tcp:8080:interface=127.0.0.1, systemd:domain=INET:index=0 "
            "or letsencrypt:domain=example.com:port=443"
        )
    return description


_DOMAIN_OPTION = re.compile(r"(?:^|:)domain=([^:]*)")


def letsencrypt_domains(description: str) -> set[str]:
    """
    The domains a C{letsencrypt:} listen string serves (none for others).
    """
    if description.split(":", 1)[0].strip().lower() != "letsencrypt":
        return set()
    return {d.strip().lower().rstrip(".") for m in _DOMAIN_OPTION.finditer(description)
            for d in m.group(1).split(",") if d.strip()}


def acme_config(options: Mapping[str, Any], listen: list[str]) -> AcmeConfig | None:
    """
    The C{acme:} endpoints among C{listen}, checked, with the C{--acme-*}
    options; None when there are none.
    """
    endpoints = []
    for description in listen:
        if is_acme(description):
            try:
                endpoints.append(parse_endpoint(description))
            except ValueError as e:
                raise usage.UsageError(f"--listen {description!r}: {e}") from None
    if not endpoints:
        return None
    try:
        certificate_groups(endpoints)
    except ValueError as e:
        raise usage.UsageError(f"--listen: {e}") from None
    certbot = set().union(*(letsencrypt_domains(d) for d in listen))
    for endpoint in endpoints:
        for domain in endpoint.domains:
            if domain in certbot:
                raise usage.UsageError(
                    f"--listen: {domain} is on both an acme: and a letsencrypt: endpoint; one certificate "
                    "source per domain (see README.rst 'Automatic HTTPS' to switch between them)")
    directory = options["acme-directory"]
    if not re.fullmatch(r"https?://[^\s/]+(/\S*)?", directory or ""):
        raise usage.UsageError(f"--acme-directory {directory!r} is not an http(s) URL; e.g. {LETS_ENCRYPT}")
    bundle = options["acme-ca-bundle"]
    if bundle is not None and not os.access(bundle, os.R_OK):
        raise usage.UsageError(f"--acme-ca-bundle {bundle} is not a readable file; give the PEM file of "
                               "the roots the ACME server's HTTPS certificate is checked against")
    if not options["acme-agree-tos"]:
        raise SystemExit(
            f"leeloo: cannot start: the acme: endpoint orders certificates from {options['acme-directory']}, "
            "which needs its terms of service accepted: read them (Let's Encrypt's: "
            "https://letsencrypt.org/repository/) and pass --acme-agree-tos")
    return AcmeConfig(
        endpoints=tuple(endpoints),
        directory_url=options["acme-directory"],
        email=options["acme-email"],
        ca_bundle=None if bundle is None else Path(bundle).absolute(),
        retry=options["acme-retry"],
    )


_TLS_TYPES = {"acme", "letsencrypt", "ssl"}


def acme_warning(listen: tuple[str, ...], redirect_listen: tuple[str, ...]) -> str | None:
    """
    A warning when acme: endpoints have no plain-HTTP listener to answer
    their HTTP-01 challenges on.
    """
    plain = [d for d in listen if d.split(":", 1)[0].strip().lower() not in _TLS_TYPES]
    if plain or redirect_listen:
        return None
    return ("acme: endpoints need the ACME server to reach the relay over plain HTTP on port 80 for the "
            "HTTP-01 challenge, and no --redirect-listen or plain --listen is given: add --redirect-listen tcp:80")


def check_webroot(path: str | None) -> Path | None:
    if path is None:
        return None
    directory = Path(path)
    if not directory.is_dir():
        raise usage.UsageError(
            f"--acme-webroot {path} is not a directory; create it (certbot writes "
            ".well-known/acme-challenge/ under it) or pass another"
        )
    return directory.absolute()


def prepare_data_dir(path: str) -> Path:
    directory = Path(path)
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        probe = directory / ".write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise usage.UsageError(
            f"--data-dir {path} is not a writable directory ({e.strerror or e}); "
            "create it for the relay's user or pass another --data-dir"
        )
    return directory


def env_file_warning(path: str) -> str | None:
    """
    A warning if the env file (which holds secrets) grants more than 0600.
    """
    try:
        mode = os.stat(path).st_mode & 0o777
    except OSError:
        return None
    if mode & ~0o600:
        return (f"--env-file {path} has mode {mode:04o}: other users may read the secrets in it; "
                f"chmod 600 {path}")
    return None


def check_proxy(value: str) -> str:
    try:
        parse_network(value)
    except ValueError as e:
        raise usage.UsageError(f"--trusted-proxy: {e}") from None
    return value.strip()


def check_public_url(value: str | None) -> str | None:
    if value is None:
        return None
    try:
        OriginPolicy(value)
    except ValueError as e:
        raise usage.UsageError(
            f"--public-url: {e}; give the address browsers reach the relay at, "
            "e.g. https://relay.example.org") from None
    return value


def settings(environ: Mapping[str, str], env_file: str | None,
             file_values: Mapping[str, str] | None = None) -> dict[str, str]:
    """
    The relay's settings: the environment, with the env file (or the
    C{file_values} read from it) filling what it lacks.
    """
    if file_values is not None:
        merged = dict(file_values)
    else:
        merged = read_env_file(env_file) if env_file else {}
    for key in SETTINGS:
        if environ.get(key):
            merged[key] = environ[key]
    return {k: v for k, v in merged.items() if k in SETTINGS and v}


def unknown_settings(path: str, values: Mapping[str, str]) -> list[str]:
    """
    A warning for each key of the env file at C{path} that the relay does
    not read (a typo is otherwise silent), naming the key, never its value.
    """
    warnings = []
    for key in values:
        if key not in SETTINGS:
            close = difflib.get_close_matches(key, SETTINGS, n=1)
            hint = f"did you mean {close[0]}? " if close else ""
            warnings.append(f"--env-file {path}: unknown setting {key} ignored; {hint}"
                            f"the relay reads {', '.join(SETTINGS)}")
    return warnings


# The values etc/leeloo.env.example ships with: none of them can work.
PLACEHOLDERS = {
    "SPOTIFY_CLIENT_ID": "your-spotify-client-id",
    "SPOTIFY_CLIENT_SECRET": "your-spotify-client-secret",
    "SPOTIFY_REDIRECT_URI": "https://relay.example.org/spotify/callback",
    "TELEGRAM_API_SECRET": "choose-a-long-random-string",
}


def check_placeholders(values: Mapping[str, str], env_file: str | None) -> None:
    """
    Refuse a setting still at its placeholder from etc/leeloo.env.example.

    @raise usage.UsageError: one is.
    """
    for key, placeholder in PLACEHOLDERS.items():
        if values.get(key) == placeholder:
            where = f"--env-file {env_file}" if env_file else "the environment"
            remedy = ("remove the SPOTIFY_ lines to run without Spotify" if key.startswith("SPOTIFY_")
                      else "remove the line to run without the bot API")
            raise usage.UsageError(
                f"{key} in {where} is still the placeholder from etc/leeloo.env.example; "
                f"set your own value, or {remedy}")


def spotify_config(values: Mapping[str, str]) -> SpotifyConfig | None:
    needed = ("SPOTIFY_CLIENT_ID", "SPOTIFY_CLIENT_SECRET", "SPOTIFY_REDIRECT_URI")
    present = [k for k in needed if values.get(k)]
    if not present:
        return None
    if len(present) != len(needed):
        missing = ", ".join(k for k in needed if k not in present)
        raise usage.UsageError(f"Spotify is half configured: set {missing} too (or none of them)")
    return SpotifyConfig(
        client_id=values["SPOTIFY_CLIENT_ID"],
        client_secret=values["SPOTIFY_CLIENT_SECRET"],
        redirect_uri=values["SPOTIFY_REDIRECT_URI"],
        accounts_url=values.get("SPOTIFY_ACCOUNTS_URL", DEFAULT_ACCOUNTS_URL),
        api_url=values.get("SPOTIFY_API_URL", DEFAULT_API_URL),
    )


# Each option's check raises ValueError saying what the option allows;
# _named turns that into one line naming the option and the value too.

def _positive_int(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        number = 0
    if number <= 0:
        raise ValueError("a whole number, 1 or more")
    return number


def _positive_float(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        number = 0.0
    if not 0 < number < math.inf:
        raise ValueError("a number above 0")
    return number


def _non_negative_float(value: str) -> float:
    number = float(value)
    if not number >= 0 or number == float("inf"):
        raise ValueError("must be zero or more, and finite")
    return number


def _code_length(value: str) -> int:
    try:
        length = int(value)
    except ValueError:
        length = 0
    if not 4 <= length <= 16:
        raise ValueError("a whole number from 4 to 16")
    return length


def _on_off(value: str) -> bool:
    if value not in ("on", "off"):
        raise ValueError("on or off")
    return value == "on"


def _store_kind(value: str) -> str:
    if value not in ("sqlite", "memory"):
        raise ValueError("sqlite or memory")
    return value


def redis_settings(options: Any, values: Mapping[str, str]) -> RedisSettings | None:
    """
    The Redis store's settings from C{--redis} and its options, with the
    password from C{LEELOO_REDIS_PASSWORD}; C{None} without C{--redis}.
    """
    url = options["redis"]
    if url is None:
        if options["redis-ca"] is not None:
            raise usage.UsageError("--redis-ca is for --redis rediss://...; give --redis too")
        return None
    if options["store"] is not None:
        raise usage.UsageError(f"--store {options['store']} and --redis both say where the state is kept: "
                               "give one of them")
    if options["fsync"]:
        raise usage.UsageError("--fsync is the SQLite store's; with --redis, durability is Redis's own "
                               "(appendonly yes with appendfsync everysec or always: see README.rst)")
    try:
        settings = parse_redis_url(url, password=values.get("LEELOO_REDIS_PASSWORD"),
                                   ca_file=options["redis-ca"], reply_timeout=options["redis-timeout"],
                                   max_retry_delay=options["redis-max-retry-delay"])
    except RedisURLError as e:
        raise usage.UsageError(f"--redis: {e}") from None
    if settings.ca_file is not None:
        if not settings.tls:
            raise usage.UsageError("--redis-ca is for rediss:// (TLS); the --redis URL is redis://")
        if not os.access(settings.ca_file, os.R_OK):
            raise usage.UsageError(f"--redis-ca {settings.ca_file}: cannot read it")
    return settings


def bad_value(option: str, value: str, allowed: str) -> usage.UsageError:
    """
    The one line for a bad option value: the option, the value as given,
    and what is allowed.
    """
    return usage.UsageError(f"--{option} {shlex.quote(value)}: must be {allowed}")


def _named(parameters: list) -> list:
    """
    C{optParameters} whose checks fail with L{bad_value}'s line rather than
    Twisted's "Parameter type enforcement failed" (which names neither the
    option nor the value).
    """

    def checked(name: str, check: Callable[[str], Any]) -> Callable[[str], Any]:
        def coerce(value: str) -> Any:
            try:
                return check(value)
            except ValueError as e:
                raise bad_value(name, value, str(e)) from None

        return coerce

    return [[*p[:4], checked(p[0], p[4])] if len(p) > 4 else p for p in parameters]


def _help(text: str) -> Callable[[Callable], Callable]:
    """
    Give an C{opt_} method its C{--help} text, one paragraph (Twisted
    prints a docstring's indentation as runs of spaces).
    """

    def give(method: Callable) -> Callable:
        method.__doc__ = text
        return method

    return give


class Options(usage.Options):
    synopsis = "[options]"
    longdesc = (
        "Run the LEELOO relay: the WebSocket at /ws that LEELOO devices share "
        "songs, reactions and messages through, with its HTTP site. Settings "
        "come from the environment, with --env-file filling what it lacks: "
        + ", ".join(SETTINGS)
        + "."
    )
    optParameters = _named([
        ["data-dir", "d", DEFAULT_DATA_DIR, "Directory the relay keeps its state in (created 0700)."],
        ["env-file", "e", None, "KEY=VALUE file of settings; the environment wins over it."],
        ["secrets-key-file", None, None,
         "The key that encrypts the Spotify tokens the relay keeps (default DATA_DIR/secrets.key, "
         "created 0600 on first start); the same file for every node sharing one store. Back it up."],
        ["acme-webroot", None, None,
         "Directory whose .well-known/acme-challenge/ the --redirect-listen endpoints serve "
         "(certbot certonly --webroot -w DIR)."],
        ["acme-email", None, None,
         "Contact e-mail for the ACME account of acme: endpoints (optional)."],
        ["acme-directory", None, LETS_ENCRYPT,
         "ACME directory URL acme: endpoints order from (Let's Encrypt's staging: "
         f"{LETS_ENCRYPT_STAGING})."],
        ["acme-ca-bundle", None, None,
         "PEM file of the roots to check the ACME server's HTTPS against (default: certifi's, as "
         "requests uses)."],
        ["acme-retry", None, 60.0,
         "Seconds before retrying a failed ACME order; doubled (with jitter) after each failure, "
         "at most a day.", _positive_float],
        ["max-message-size", None, 64 * 1024,
         "Largest WebSocket message in bytes; larger ones are refused with close 1009.",
         _positive_int],
        ["max-fragments", None, 64,
         "Most frames one WebSocket message may come in; more are refused with close 1009.",
         _positive_int],
        ["store", None, None,
         "Where state is kept: sqlite (durable, under --data-dir; the default) or memory (lost at "
         "exit). Not with --redis.",
         _store_kind],
        ["redis", None, None,
         "redis://[USER@]HOST:PORT/DB or rediss://... (TLS, the certificate verified): keep the "
         "state in Redis instead (several relays can share it). The password comes from "
         "LEELOO_REDIS_PASSWORD (environment or --env-file), never the command line."],
        ["node-heartbeat", None, 5.0,
         "With --redis: seconds between this node's heartbeats in Redis. A node silent for three "
         "beats is taken for dead by the others, which show its devices offline to their crews.",
         _positive_float],
        ["redis-ca", None, None,
         "PEM file of the certificates rediss:// trusts (default: the system's)."],
        ["redis-timeout", None, 5.0,
         "Seconds a Redis command may take before the connection is dropped and made again.",
         _positive_float],
        ["redis-max-retry-delay", None, 5.0,
         "Longest wait in seconds between attempts to reconnect to Redis.", _positive_float],
        ["replay-limit", None, 50,
         "Most missed messages replayed to a returning device.", _positive_int],
        ["retention-days", None, 7.0,
         "Days a crew message is kept for devices that were offline.", _positive_float],
        ["crew-ttl-days", None, 90.0,
         "Days after which a crew with no message and no member seen is forgotten.", _positive_float],
        ["legacy-replay-age", None, DAY,
         "Seconds within which a missed message is replayed to a legacy device (one that never "
         "sends ack or last_seq, and takes every frame for a new one).", _positive_float],
        ["ephemeral-age", None, EPHEMERAL_AGE,
         "Seconds within which a missed nudge or reaction is replayed to a legacy device.",
         _positive_float],
        ["ping-interval", None, 25.0,
         "Seconds between the WebSocket pings that keep each connection alive and prove what a "
         "device received.", _positive_float],
        ["ping-timeout", None, 20.0,
         "Seconds a device has to answer a ping before its connection is dropped.", _positive_float],
        ["bind-timeout", None, BIND_TIMEOUT,
         "Seconds a connection may stay without registering, creating or joining a crew before "
         "it is closed with 4008; 0 never.", _non_negative_float],
        ["crew-log-bytes", None, 16 * 1024 * 1024,
         "Most bytes of messages kept in one crew's log; past it the oldest go (never the "
         "newest --replay-limit).", _positive_int],
        ["store-queue-bytes", None, 8 * 1024 * 1024,
         "Most bytes of messages waiting for the store; past it the relay stops reading from "
         "their senders until half is written.", _positive_int],
        ["max-connections", None, 20000,
         "Most WebSocket connections open at once; more are refused with HTTP 503.", _positive_int],
        ["max-connections-per-address", None, 256,
         "Most TCP connections (plain HTTP and WebSocket) open at once from one client address; "
         "more are answered HTTP 503 and closed before they are read.",
         _positive_int],
        ["connect-rate", None, 10.0,
         "New TCP connections a second from one client address, in bursts of twice as many; "
         "more are answered HTTP 429 and closed.", _positive_float],
        ["max-unsent-bytes", None, 1024 * 1024,
         "A device that falls this many bytes behind reading what the relay sends it is "
         "disconnected.", _positive_int],
        ["request-timeout", None, 10.0,
         "Seconds a connection has to send a whole HTTP request (the WebSocket upgrade "
         "included); slower ones are aborted.", _positive_float],
        ["public-url", None, None,
         "The URL browsers reach the relay at (e.g. https://relay.example.org): the only "
         "browser Origin allowed to open a WebSocket. Without it, only pages from the same "
         "host the request was sent to."],
        ["messages-per-second", None, 20.0,
         "Frames a connection may send per second (token bucket).", _positive_float],
        ["message-burst", None, 40, "Frames a connection may send in a burst.", _positive_int],
        ["join-attempts", None, 10,
         "Attempts to enter crews a device is not a member of (failed joins included), per "
         "connection and per client address, in --join-window; also bot API joins per user.",
         _positive_int],
        ["join-window", None, 600.0, "Seconds over which --join-attempts refill.", _positive_float],
        ["abuse-strikes", None, 10,
         "Refusals in a row (rate limits, failed device auth) after which a connection is closed.",
         _positive_int],
        ["presence-grace", None, 10.0,
         "Seconds before a crew hears a member went offline; a device back within them is "
         "announced neither offline nor joined (Wi-Fi blips, crew hopping).", _non_negative_float],
        ["crew-code-length", None, 4,
         "Characters in new crew codes after LEELOO- (longer codes resist guessing).", _code_length],
        ["max-crews-per-device", None, 8,
         "Crews one device may be in at once (crew_add past it is answered crew_limit).", _positive_int],
        ["spotify-pkce", None, "on",
         "on or off: pair Spotify with PKCE (S256) on top of the client secret. Off falls back to "
         "the plain code flow, should Spotify refuse a verifier from a client that also "
         "authenticates.", _on_off],
    ])
    optFlags = [
        ["acme-agree-tos", None, "Accept the ACME server's terms of service (needed by acme: endpoints)."],
        ["fsync", None, "Make every commit survive a power cut, not only a crash (slower)."],
        ["require-device-key", None,
         "Refuse device ids that have no bound device key (once the fleet is updated)."],
        ["no-legacy-spotify-state", None,
         "Refuse Spotify callbacks whose state is a device id (the deployed devices' own "
         "authorize links, which anyone who knows a device id can forge); pairing then goes only "
         "through the code the device shows. Once the fleet is updated."],
    ]

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        super().__init__()
        self._environ = os.environ if environ is None else environ
        self["listen"] = []
        self["redirect-listen"] = []
        self["trusted-proxy"] = []
        self["admin-listen"] = []

    @_help("Endpoint to serve HTTP and WebSocket on (repeatable): a Twisted endpoint string, e.g. "
           "tcp:8080, letsencrypt:domain=DOMAIN:port=443 (TLS with certbot's certificates), "
           "acme:domain=DOMAIN[,DOMAIN2]:port=443 (a certificate the relay gets and renews itself), "
           "ssl:..., systemd:domain=INET:index=0 (socket activation). Default: " + DEFAULT_LISTEN)
    def opt_listen(self, endpoint: str) -> None:
        self["listen"].append(endpoint)

    @_help("Endpoint (repeatable; typically tcp:80) that serves only /.well-known/acme-challenge/ "
           "from --acme-webroot and redirects everything else to https.")
    def opt_redirect_listen(self, endpoint: str) -> None:
        self["redirect-listen"].append(endpoint)

    @_help("Address or CIDR block of a reverse proxy whose X-Forwarded-For names the client "
           "(repeatable). X-Forwarded-For from anyone else is ignored.")
    def opt_trusted_proxy(self, network: str) -> None:
        self["trusted-proxy"].append(check_proxy(network))

    @_help("Endpoint to serve the admin site (/metrics, /health) on (repeatable). Default: none; "
           "the public site serves /metrics to loopback clients only.")
    def opt_admin_listen(self, endpoint: str) -> None:
        self["admin-listen"].append(endpoint)

    @_help("Print the relay's version and exit.")
    def opt_version(self) -> None:
        import autobahn
        import ssl

        import twisted

        print(f"leeloo {__version__} (Twisted {twisted.__version__}, Autobahn {autobahn.__version__}, "
              f"Python {platform.python_version()}, {ssl.OPENSSL_VERSION})")
        sys.exit(0)

    def parseOptions(self, options: Any = None) -> None:
        """
        Parse C{options}.  Under twistd (which sets C{parent}), a mistake is
        one line on stderr and exit status 1, not twistd's whole usage text.

        @raise usage.UsageError: a mistake, when not run by twistd.
        """
        try:
            super().parseOptions(options)
        except usage.UsageError as e:
            if getattr(self, "parent", None) is None:
                raise
            raise SystemExit(f"leeloo: {e}") from None

    def postOptions(self) -> None:
        webroot = check_webroot(self["acme-webroot"])
        acme = acme_config(self, self["listen"])
        listen = tuple(e if is_acme(e) else check_endpoint(e, webroot=webroot)
                       for e in self["listen"] or [DEFAULT_LISTEN])
        redirect_listen = tuple(check_endpoint(e, "--redirect-listen") for e in self["redirect-listen"])
        admin_listen = tuple(check_endpoint(e, "--admin-listen") for e in self["admin-listen"])
        file_values = read_env_file(self["env-file"]) if self["env-file"] else {}
        values = settings(self._environ, None, file_values)
        check_placeholders(values, self["env-file"])
        warnings = []
        if acme is not None:
            warning = acme_warning(listen, redirect_listen)
            if warning:
                warnings.append(warning)
        if self["env-file"]:
            warning = env_file_warning(self["env-file"])
            if warning:
                warnings.append(warning)
            warnings.extend(unknown_settings(self["env-file"], file_values))
        if redirect_listen and webroot is None and acme is None:
            warnings.append(
                "--redirect-listen without --acme-webroot: certificate challenges "
                "(/.well-known/acme-challenge/) are redirected to https like everything else, so "
                "certbot --webroot cannot renew through this relay; pass --acme-webroot DIR")
        redis = redis_settings(self, values)
        self.config = Config(
            listen=listen,
            redirect_listen=redirect_listen,
            acme_webroot=webroot,
            data_dir=prepare_data_dir(self["data-dir"]),
            limits=WebSocketLimits(
                max_message_size=self["max-message-size"],
                max_connections=self["max-connections"],
                max_connections_per_address=self["max-connections-per-address"],
                max_unsent=self["max-unsent-bytes"],
                max_fragments=self["max-fragments"],
                auto_ping_interval=self["ping-interval"],
                auto_ping_timeout=self["ping-timeout"],
            ),
            http_limits=HTTPLimits(
                request_timeout=self["request-timeout"],
                max_connections_per_address=self["max-connections-per-address"],
                connect_rate=self["connect-rate"],
            ),
            trusted_proxies=tuple(self["trusted-proxy"]),
            public_url=check_public_url(self["public-url"]),
            admin_listen=admin_listen,
            warnings=tuple(warnings),
            spotify=spotify_config(values),
            telegram_api_secret=values.get("TELEGRAM_API_SECRET"),
            store="redis" if redis is not None else self["store"] or "sqlite",
            fsync=bool(self["fsync"]),
            redis=redis,
            node_heartbeat=self["node-heartbeat"],
            secrets_key_file=Path(self["secrets-key-file"]) if self["secrets-key-file"] else None,
            replay_limit=self["replay-limit"],
            retention_days=self["retention-days"],
            crew_ttl_days=self["crew-ttl-days"],
            presence_grace=self["presence-grace"],
            crew_log_bytes=self["crew-log-bytes"],
            store_queue_bytes=self["store-queue-bytes"],
            relay_limits=RelayLimits(
                messages=Rate(self["messages-per-second"], self["message-burst"]),
                entries=Rate.per_window(self["join-attempts"], self["join-window"]),
                abuse_strikes=self["abuse-strikes"],
                require_device_key=bool(self["require-device-key"]),
                crew_code_length=self["crew-code-length"],
                max_crews_per_device=self["max-crews-per-device"],
            ),
            legacy_replay_age=self["legacy-replay-age"],
            ephemeral_age=self["ephemeral-age"],
            bind_timeout=self["bind-timeout"],
            acme=acme,
            legacy_spotify_state=not self["no-legacy-spotify-state"],
            spotify_pkce=self["spotify-pkce"] if isinstance(self["spotify-pkce"], bool)
            else _on_off(self["spotify-pkce"]),
        )


def makeService(options: Options) -> MultiService:
    from twisted.internet import reactor

    tune_process(reactor)

    try:
        tree = build_service(options.config, reactor)
    except StartupError as e:
        raise SystemExit(f"leeloo: {e}") from None
    # twistd's own text log, for less CPU per line (leeloo.logs).
    tree.log_observer = twistd_text_observer(getattr(options, "parent", None))
    return tree
